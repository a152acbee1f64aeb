"""bf16-gan: the small DCGAN on 8x8 digits in BF16 vs FP32, scored by a digits classifier.

The BF16 paper (arXiv:1905.12322) trains DCGAN with BF16 inputs to the convolutions (and batch-norm
layers) and reports FP32-quality results (metrics not recovered). Here: the zoo's DCGAN ``Generator``
(linear projection, transposed convolutions, BatchNorm) and ``Discriminator`` (strided convolutions) on
scikit-learn digits scaled to [-1, 1], both emulated under the policy, trained with the standard
non-saturating loss and Adam(5e-4, betas (0.5, 0.999)). Sample quality is scored honestly by an FP32
LeNet digits classifier trained once on the real training set (its test accuracy is reported):

- ``confident``: fraction of 2000 samples the classifier labels with probability >= 0.9 (quality);
- ``classes``: number of digit classes among the confident samples with >= 2% share (mode coverage);
- ``digit score``: exp(E_x KL(p(y|x) || p(y))), the inception score computed with the digits
  classifier (1 = useless, 10 = every sample a confident digit and all classes equally often).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch import nn

from leantrain.app.experiments._precision_training import paired_values, parity
from leantrain.app.provenance import run_key, tensor_digest
from leantrain.app.registry import Claim, Result, Table, experiment
from leantrain.data import load_dataset
from leantrain.models import Discriminator, Generator, LeNet
from leantrain.plots import curves, save_figure, subplots
from leantrain.precision import PrecisionHooks, Recorder, get_policy
from leantrain.storage import load_torch, save_torch
from leantrain.train import fit

BCE = nn.functional.binary_cross_entropy_with_logits
_CODE_MODULES = ("leantrain.numerics", "leantrain.precision", "leantrain.train", "leantrain.models",
                 "leantrain.storage", "leantrain.app.experiments.bf16_gan")


def _setting(profile: str) -> dict:
    if profile == "quick":
        return {"steps": 1200, "batch": 64, "width": 16, "latent": 16, "lr": 5e-4, "fp32_seeds": 3, "seeds": 1,
                "policies": ("fp32", "bf16"), "eval_every": 300, "samples": 2000}
    return {"steps": 4000, "batch": 64, "width": 32, "latent": 32, "lr": 5e-4, "fp32_seeds": 5, "seeds": 3,
            "policies": ("fp32", "bf16", "bf16-sr", "fp16-scaled"), "eval_every": 500, "samples": 4000}


_CLASSIFIER: dict[str, tuple[nn.Module, float]] = {}


def _classifier(device: str) -> tuple[nn.Module, float]:
    """An FP32 LeNet trained on real digits (fixed seed), and its test accuracy."""
    if device not in _CLASSIFIER:
        data = load_dataset("digits")
        torch.manual_seed(1234)
        clf = LeNet(in_channels=1, num_classes=10)
        hist = fit(clf, torch.optim.SGD(clf.parameters(), lr=0.05, momentum=0.9), nn.functional.cross_entropy,
                   data.train, test=data.test, epochs=8, batch_size=32, seed=1234, device=device, eval_train=False)
        clf.eval()
        _CLASSIFIER[device] = (clf, hist.last("test_accuracy"))
    return _CLASSIFIER[device]


def _scores(p: torch.Tensor) -> dict[str, float]:
    """Quality and coverage from classifier probabilities ``p`` (n, 10) (see the module docstring)."""
    p = p.double()
    conf, label = p.max(dim=1)
    confident = conf >= 0.9
    share = torch.bincount(label[confident], minlength=10).double() / max(float(confident.sum()), 1.0)
    py = p.mean(0)
    kl = (p * (torch.log(p + 1e-12) - torch.log(py + 1e-12))).sum(1).mean()
    return {"confident": float(confident.double().mean()), "classes": int((share >= 0.02).sum()),
            "digit_score": float(torch.exp(kl))}


@torch.no_grad()
def score(gen: nn.Module, clf: nn.Module, n: int, seed: int, device: str) -> dict[str, float]:
    """Classifier-based quality and coverage of ``n`` samples (see the module docstring)."""
    was = gen.training
    gen.eval()
    z = torch.randn(n, gen.latent_dim, generator=torch.Generator().manual_seed(10_000 + seed)).to(device)
    x = gen(z)
    gen.train(was)
    # the classifier was trained on digits in [0, 1] (pixels / 16): map [-1, 1] back
    return _scores(torch.softmax(clf((x + 1) / 2), dim=1))


def train_gan(policy: str, seed: int, cfg: dict, real: torch.Tensor, out: Path, device: str) -> dict:
    """Train G and D under ``policy`` (checkpointed every eval, resumable); returns scores and losses."""
    torch.manual_seed(seed)
    gen = Generator(latent_dim=cfg["latent"], data_shape=(1, 8, 8), width=cfg["width"]).to(device)
    disc = Discriminator(data_shape=(1, 8, 8), width=cfg["width"]).to(device)
    # The checkpoint is valid only for this configuration and this code (see leantrain.app.provenance).
    key = run_key({"cfg": cfg, "policy": repr(get_policy(policy)), "seed": seed, "device": device, "gen": repr(gen),
                   "disc": repr(disc), "real": tensor_digest([real])}, _CODE_MODULES)
    ckpt = out / "runs" / f"gan-{policy}-s{seed}-{cfg['steps']}-{key}.pt"
    og = torch.optim.Adam(gen.parameters(), lr=cfg["lr"], betas=(0.5, 0.999))
    od = torch.optim.Adam(disc.parameters(), lr=cfg["lr"], betas=(0.5, 0.999))
    rec = Recorder(every=10)
    hg, hd = PrecisionHooks(policy, recorder=rec, seed=seed), PrecisionHooks(policy, seed=seed + 1)
    state = {"step": 0, "history": [], "d_loss": [], "g_loss": []}
    if ckpt.is_file():
        st = load_torch(ckpt, map_location=device)
        gen.load_state_dict(st["gen"])
        disc.load_state_dict(st["disc"])
        og.load_state_dict(st["og"])
        od.load_state_dict(st["od"])
        hg.load_state_dict(st["hg"])
        hd.load_state_dict(st["hd"])
        state = st["state"]
        torch.set_rng_state(st["rng"])
    hg.wrap(gen, og)
    hd.wrap(disc, od)
    clf, _ = _classifier(device)
    gdata = torch.Generator().manual_seed(seed)
    gdata.manual_seed(seed * 7919 + state["step"])  # a resumed run draws the same batches from here on
    n = real.shape[0]
    while state["step"] < cfg["steps"]:
        idx = torch.randint(0, n, (cfg["batch"],), generator=gdata)
        x = real[idx].to(device)
        z = torch.randn(cfg["batch"], cfg["latent"], generator=gdata).to(device)
        od.zero_grad(set_to_none=True)
        fake = gen(z)
        d_loss = BCE(disc(x), torch.ones(len(x), device=device)) + BCE(disc(fake.detach()), torch.zeros(len(x), device=device))
        hd.backward(d_loss)
        hd.step(od)
        og.zero_grad(set_to_none=True)
        g_loss = BCE(disc(fake), torch.ones(len(x), device=device))
        hg.backward(g_loss)
        hg.step(og)
        state["step"] += 1
        state["d_loss"].append(float(d_loss.detach()))
        state["g_loss"].append(float(g_loss.detach()))
        if state["step"] % cfg["eval_every"] == 0 or state["step"] == cfg["steps"]:
            state["history"].append({"step": state["step"], **score(gen, clf, cfg["samples"] // 2, seed, device)})
            save_torch(ckpt, {"gen": gen.state_dict(), "disc": disc.state_dict(), "og": og.state_dict(),
                              "od": od.state_dict(), "hg": hg.state_dict(), "hd": hd.state_dict(), "state": state,
                              "rng": torch.get_rng_state()})
            gdata.manual_seed(seed * 7919 + state["step"])
    final = score(gen, clf, cfg["samples"], seed, device)
    with torch.no_grad():
        gen.eval()
        grid = gen(torch.randn(32, cfg["latent"], generator=torch.Generator().manual_seed(99)).to(device)).cpu()
    return {"final": final, "history": state["history"], "d_loss": state["d_loss"], "g_loss": state["g_loss"],
            "grid": grid, "dy": rec.summary().get("dy")}


@experiment(
    "bf16-gan",
    arxiv="1905.12322",
    title="BF16 training of a small DCGAN on 8x8 digits vs FP32 (classifier-based score)",
    claim="A DCGAN trained with BF16 GEMM inputs in generator and discriminator reaches FP32's sample quality and mode "
          "coverage with the same hyper-parameters and iterations.",
    quick_minutes=1.0,
)
def run(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    cfg = _setting(profile)
    data = load_dataset("digits")
    real = data.train.tensors[0] * 2 - 1  # digits are scaled to [0, 1]; the generator's tanh covers [-1, 1]
    clf, clf_acc = _classifier(device)
    seeds32 = list(range(seed, seed + cfg["fp32_seeds"]))
    # bf16 (the claims) on every FP32 seed, paired (same initialization and batches); others: table rows.
    runs = {name: [train_gan(name, s, cfg, real, out, device)
                   for s in (seeds32 if name in ("fp32", "bf16") else seeds32[:cfg["seeds"]])]
            for name in cfg["policies"]}
    ds = {k: [r["final"]["digit_score"] for r in v] for k, v in runs.items()}
    conf = {k: [r["final"]["confident"] for r in v] for k, v in runs.items()}
    par = {k: parity(ds["fp32"], ds[k]) for k in runs if k != "fp32"}
    parc = {k: parity(conf["fp32"], conf[k]) for k in runs if k != "fp32"}
    real_score = score_real(clf, real, device)
    claims = [
        Claim(f"bf16 DCGAN reaches FP32's digit score after {cfg['steps']} steps (same hyper-parameters)",
              "not recovered (paper: DCGAN/SRGAN FP32 parity, metric values not recovered)",
              f"bf16 {par['bf16'].mean:.3f} vs FP32 {par['bf16'].fp32_mean:.3f} (delta {par['bf16'].delta:+.3f}); "
              f"real data {real_score['digit_score']:.3f}",
              par["bf16"].tolerance_text("digit score"), par["bf16"].passed, per_seed=paired_values(ds, "bf16"),
              seeds=seeds32),
        Claim("bf16 DCGAN reaches FP32's fraction of confidently recognised samples", "not recovered",
              f"bf16 {parc['bf16'].mean:.3f} vs FP32 {parc['bf16'].fp32_mean:.3f} (delta {parc['bf16'].delta:+.3f})",
              parc["bf16"].tolerance_text("confident fraction"), parc["bf16"].passed,
              per_seed=paired_values(conf, "bf16"), seeds=seeds32),
    ]
    rows = [[k, len(ds[k]), f"{statistics.mean(ds[k]):.3f}", f"{statistics.mean(conf[k]):.3f}",
             f"{statistics.mean(r['final']['classes'] for r in runs[k]):.1f}",
             "-" if k == "fp32" else f"{par[k].delta:+.3f} (tol {par[k].tolerance:.3f})"] for k in runs]
    rows.append(["real digits", "-", f"{real_score['digit_score']:.3f}", f"{real_score['confident']:.3f}",
                 real_score["classes"], "-"])
    table = Table(f"sample quality after {cfg['steps']} steps ({cfg['samples']} samples; classifier test accuracy "
                  f"{clf_acc:.3f})", ["policy", "seeds", "digit score", "confident", "classes", "delta score vs FP32"], rows)
    series = {}
    for k, v in runs.items():
        hist = v[0]["history"]
        series[f"{k} (seed {seed})"] = ([h["step"] for h in hist], [h["digit_score"] for h in hist])
    curves(out / "digit_score.png", series, xlabel="step", ylabel="digit score (classifier IS)",
           title="DCGAN on digits: score during training")
    fig, axes = subplots(len(runs), 1, figsize=(8, 1.6 * len(runs)))
    for ax, (k, v) in zip(axes if len(runs) > 1 else [axes], runs.items()):
        grid = v[0]["grid"][:16, 0]
        ax.imshow(torch.cat(list(grid), dim=1).numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(k, fontsize=9)
        ax.axis("off")
    save_figure(fig, out / "samples.png")
    notes = ("Both networks are emulated (ConvTranspose2d, Conv2d and Linear GEMM inputs rounded; BatchNorm FP32 — the "
             "paper also rounds the batch-norm inputs, which here are FP32 GEMM outputs). Digit score = exp(E KL(p(y|x)"
             " || p(y))) under an FP32 LeNet trained on the real digits; GAN runs vary strongly between seeds, which the "
             "FP32 spread (and so the tolerance) reflects.")
    metrics = {"setting": cfg, "digit_score": ds, "confident": conf, "classifier_test_accuracy": clf_acc,
               "real": real_score, "parity": {k: vars(p) for k, p in par.items()},
               "history": {k: [r["history"] for r in v] for k, v in runs.items()},
               "dy": {k: v[0]["dy"] for k, v in runs.items()}}
    setting = {"data": ("not recovered", "scikit-learn digits (8x8)"),
               "model": ("DCGAN, SRGAN", f"small DCGAN, width {cfg['width']}, latent {cfg['latent']}"),
               "batch / steps": ("not recovered (the FP32 baseline's, same iterations)",
                                 f"{cfg['batch']}, {cfg['steps']} steps, Adam lr {cfg['lr']}"),
               "metric": ("inception score", "classifier-based digit score (FP32 LeNet)"),
               "seeds": ("not recovered", f"FP32 and bf16 {len(seeds32)} paired; other policies {cfg['seeds']}")}
    return Result(metrics, claims, ["digit_score.png", "samples.png"], [table], notes, setting=setting)


@torch.no_grad()
def score_real(clf: nn.Module, real: torch.Tensor, device: str) -> dict[str, float]:
    """The same scores for the real training digits (the ceiling)."""
    return _scores(torch.softmax(clf(((real + 1) / 2).to(device)), dim=1))
