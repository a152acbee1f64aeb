"""bf16-recsys: a DLRM-style click model in BF16 vs FP32 (AUC, log loss).

The BF16 paper (arXiv:1905.12322) trains industrial recommenders (a Deep & Cross Network and a DNN
recommender) with BF16 activation and weight inputs of the fully connected layers, forward and backward,
and an FP32 weight update, and reports FP32 parity (values not recovered). Here: the zoo's ``DLRM``
(embeddings, bottom and top MLPs, pairwise dot interactions kept FP32) on the synthetic ``clicks`` data,
under ``fp32``, ``bf16`` and ``bf16-trunc`` (the notes mention a round-to-nearest vs truncation remark
for recommenders). Metrics: test AUC and log loss.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from leantrain.app.experiments._precision_training import RunResult, mean_curve_plot, paired_values, parity, train_run
from leantrain.app.registry import Claim, Result, Table, experiment
from leantrain.data import load_dataset
from leantrain.models import DLRM
from leantrain.train import binary_cross_entropy


def _setting(profile: str) -> dict:
    if profile == "quick":
        return {"name": "dlrm-clicks", "epochs": 4, "batch_size": 128, "lr": 5e-3, "fp32_seeds": 3, "seeds": 1,
                "policies": ("fp32", "bf16", "bf16-trunc")}
    return {"name": "dlrm-clicks", "epochs": 10, "batch_size": 128, "lr": 5e-3, "fp32_seeds": 5, "seeds": 3,
            "policies": ("fp32", "bf16", "bf16-sr", "bf16-trunc", "fp16", "fp16-scaled")}


@torch.no_grad()
def _auc(run: RunResult, data, device: str) -> float:
    model = run.extra["model"]
    model.eval()
    x, y = data.test.tensors
    p = torch.cat([model(x[i:i + 4096].to(device)).float().cpu() for i in range(0, len(x), 4096)])
    return float(roc_auc_score(y.numpy(), p.numpy()))


@experiment(
    "bf16-recsys",
    arxiv="1905.12322",
    title="BF16 training of a DLRM-style click model on synthetic click data vs FP32",
    claim="A recommender trained with BF16 FC-layer inputs (forward and backward) and an FP32 update reaches FP32's "
          "AUC and log loss.",
    quick_minutes=0.5,
)
def run(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    cfg = _setting(profile)
    data = load_dataset("clicks")
    dense = data.info.extra.get("dense", 8)
    cards = data.info.extra.get("cardinalities", (50, 30, 20, 10))
    seeds32 = list(range(seed, seed + cfg["fp32_seeds"]))
    runs: dict[str, list[RunResult]] = {}
    for name in cfg["policies"]:
        runs[name] = [train_run(cfg["name"], lambda: DLRM(dense=dense, cardinalities=cards), name, data, seed=s,
                                epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], out=out, device=device,
                                optimizer="adam", loss_fn=binary_cross_entropy, metric=None)
                      for s in (seeds32 if name in ("fp32", "bf16") else seeds32[:cfg["seeds"]])]  # bf16: claims, paired
    auc = {k: [_auc(r, data, device) for r in v] for k, v in runs.items()}
    logloss = {k: [r.final("test_loss") for r in v] for k, v in runs.items()}
    par_auc = {k: parity(auc["fp32"], auc[k]) for k in runs if k != "fp32"}
    par_ll = {k: parity(logloss["fp32"], logloss[k]) for k in runs if k != "fp32"}
    claims = [
        Claim("bf16 reaches FP32's test AUC (same hyper-parameters and iterations)", "not recovered",
              f"bf16 {par_auc['bf16'].mean:.4f} vs FP32 {par_auc['bf16'].fp32_mean:.4f} (delta {par_auc['bf16'].delta:+.4f})",
              par_auc["bf16"].tolerance_text("test AUC"), par_auc["bf16"].passed,
              per_seed=paired_values(auc, "bf16"), seeds=seeds32),
        Claim("bf16 reaches FP32's test log loss", "not recovered",
              f"bf16 {par_ll['bf16'].mean:.4f} vs FP32 {par_ll['bf16'].fp32_mean:.4f} (delta {par_ll['bf16'].delta:+.4f})",
              par_ll["bf16"].tolerance_text("test log loss"), par_ll["bf16"].passed,
              per_seed=paired_values(logloss, "bf16"), seeds=seeds32),
    ]
    rows = [[k, len(auc[k]), f"{statistics.mean(auc[k]):.4f}", "-" if k == "fp32" else f"{par_auc[k].delta:+.4f}",
             "-" if k == "fp32" else f"{par_auc[k].tolerance:.4f}", f"{statistics.mean(logloss[k]):.4f}",
             "-" if k == "fp32" else f"{par_ll[k].delta:+.4f}", "-" if k == "fp32" else f"{par_ll[k].tolerance:.4f}"]
            for k in runs]
    table = Table(f"test AUC and log loss after {cfg['epochs']} epochs ({len(data.train)} training rows)",
                  ["policy", "seeds", "AUC", "delta", "tol", "log loss", "delta", "tol"], rows)
    mean_curve_plot(out / "test_loss.png", runs, "test_loss", xlabel="epoch", ylabel="test log loss",
                    title="DLRM on clicks: test log loss per policy")
    notes = (f"bf16 (the claims) runs on every FP32 seed {seeds32}, paired; the other policies on "
             f"{seeds32[:cfg['seeds']]} (table rows, no claim). "
             "DLRM: the embedding lookups and every nn.Linear of the bottom and top MLPs are emulated; the pairwise "
             "dot interactions (activation x activation, no parameters) stay FP32. Adam, constant learning rate.")
    metrics = {"setting": cfg, "auc": auc, "log_loss": logloss,
               "parity_auc": {k: vars(p) for k, p in par_auc.items()},
               "parity_log_loss": {k: vars(p) for k, p in par_ll.items()},
               "wall_s": {k: [r.wall_s for r in v] for k, v in runs.items()}}
    setting = {"data": ("not recovered", f"synthetic clicks ({len(data.train)} training rows)"),
               "model": ("Deep & Cross Network, a DNN recommender", "DLRM-style (embeddings, bottom/top MLPs, dot "
                         "interactions)"),
               "batch / epochs": ("not recovered (the FP32 baseline's, same iterations)",
                                  f"{cfg['batch_size']}, {cfg['epochs']} epochs, Adam"),
               "seeds": ("not recovered", f"FP32 and bf16 {len(seeds32)} paired; other policies {cfg['seeds']}")}
    return Result(metrics, claims, ["test_loss.png"], [table], notes, setting=setting)
