"""FP32 models that the quantization experiments convert, trained once and cached.

``fgq-group-size``, ``cluster-ternary`` and ``ternary-residual`` all start from the same trained
FP32 networks (as the papers start from pretrained ImageNet models). :func:`pretrained` trains a
model on first use and caches its weights atomically under ``leantrain.data.bundled.cache_dir()``
(``quant-pretrained/<name>-<key>.pt``, keyed by :func:`leantrain.app.provenance.run_key` of every
setting that changes the result and of the source of the code that trains it, :data:`CODE_MODULES`),
so the three experiments, and later runs, share one training run, and a code change retrains.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leantrain.app.provenance import run_key
from leantrain.data import Split, load_dataset
from leantrain.data.bundled import cache_dir
from leantrain.models import build, model_spec
from leantrain.storage import load_torch, save_torch
from leantrain.train import evaluate, fit

__all__ = ["Pretrained", "pretrained", "SETUPS", "measure", "weight_error", "spearman", "bn_input_shift", "CODE_MODULES"]

#: The code a pretrained model depends on: its source is part of the cache key.
CODE_MODULES = ("leantrain.data", "leantrain.models", "leantrain.train", "leantrain.storage",
                "leantrain.app.experiments._quant_common")

# Per profile: model, data set, training recipe. The synthetic images are made harder (pixel noise 2.5,
# 16x16) than the defaults so that FP32 is not at 100% and quantization losses are visible.
SETUPS: dict[str, dict[str, dict[str, Any]]] = {
    "resnet20-synthimages": {
        "quick": {"model": "resnet20", "model_kwargs": {"width": 8, "in_channels": 3, "num_classes": 10},
                  "data": "synthimages", "data_kwargs": {"n_train": 4000, "n_test": 1000, "size": 16, "noise": 2.5},
                  "epochs": 8, "batch_size": 64, "lr": 0.1},
        "full": {"model": "resnet20", "model_kwargs": {"width": 16, "in_channels": 3, "num_classes": 10},
                 "data": "synthimages", "data_kwargs": {"n_train": 10000, "n_test": 2000, "size": 32, "noise": 2.5},
                 "epochs": 20, "batch_size": 64, "lr": 0.1},
    },
    "lenet-digits": {
        "quick": {"model": "lenet", "model_kwargs": {"in_channels": 1, "num_classes": 10}, "data": "digits",
                  "data_kwargs": {}, "epochs": 20, "batch_size": 32, "lr": 0.05},
        "full": {"model": "lenet", "model_kwargs": {"in_channels": 1, "num_classes": 10}, "data": "digits",
                 "data_kwargs": {}, "epochs": 40, "batch_size": 32, "lr": 0.05},
    },
}


@dataclass
class Pretrained:
    """A trained FP32 model with its data, spec, test metrics and training recipe."""

    model: nn.Module
    data: Split
    spec: dict[str, Any]
    fp32: dict[str, float]
    setup: dict[str, Any]
    cached: bool
    seed: int = 0
    logits_cache: dict[bool, torch.Tensor] = field(default_factory=dict)

    def reference_logits(self, device: str = "cpu", *, bn_recalibrated: bool = False) -> torch.Tensor:
        """The FP32 model's test-set logits (computed once); with ``bn_recalibrated`` those of an FP32 copy whose
        batch-norm statistics were re-estimated on the calibration batches exactly as
        ``quantize_model(..., calibration=data.train, bn_recalibration=True)`` does, so that a comparison with a
        re-estimated conversion measures the quantization and not the re-estimation."""
        if bn_recalibrated not in self.logits_cache:
            model = self.model
            if bn_recalibrated:
                from leantrain.quant.convert import calibration_inputs, recalibrate_batchnorm

                model = copy.deepcopy(self.model).to(device)
                recalibrate_batchnorm(model, calibration_inputs(self.data.train), device=device)
            self.logits_cache[bn_recalibrated] = _logits(model, self.data.test, device)
        return self.logits_cache[bn_recalibrated]


def _key(name: str, setup: dict[str, Any], seed: int, device: str) -> str:
    return f"{name}-{run_key({'name': name, 'setup': setup, 'seed': seed, 'device': device}, CODE_MODULES)}"


def pretrained(name: str, profile: str, *, seed: int = 0, device: str = "cpu", cache: Path | None = None) -> Pretrained:
    """The FP32 model ``name`` for ``profile`` (trained with SGD + one-cycle LR on first use, then cached)."""
    if name not in SETUPS:
        raise ValueError(f"pretrained model must be one of {sorted(SETUPS)}, got {name!r}")
    setup = SETUPS[name][profile]
    data = load_dataset(setup["data"], **setup["data_kwargs"])
    spec = model_spec(setup["model"], **setup["model_kwargs"])
    path = (cache or cache_dir() / "quant-pretrained") / f"{_key(name, setup, seed, str(device))}.pt"
    model = build(spec["name"], **spec["kwargs"])
    if path.is_file():
        try:
            state = load_torch(path)
            model.load_state_dict(state["model"])
            return Pretrained(model.to(device).eval(), data, spec, state["fp32"], setup, True, seed)
        except (ValueError, KeyError, RuntimeError):
            pass  # unreadable or stale cache entry: retrain and overwrite
    torch.manual_seed(seed)
    model = build(spec["name"], **spec["kwargs"])
    opt = torch.optim.SGD(model.parameters(), lr=setup["lr"], momentum=0.9, weight_decay=5e-4)
    steps = setup["epochs"] * ((len(data.train) + setup["batch_size"] - 1) // setup["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=setup["lr"], total_steps=steps)
    fit(model, opt, nn.functional.cross_entropy, data.train, epochs=setup["epochs"], batch_size=setup["batch_size"],
        seed=seed, device=device, scheduler=sched, eval_train=False)
    model.eval()
    fp32 = evaluate(model, nn.functional.cross_entropy, data.test, device=device)
    save_torch(path, {"model": model.state_dict(), "model_spec": spec, "fp32": fp32, "setup": setup})
    return Pretrained(model, data, spec, fp32, setup, False, seed)


def weight_error(qmodel: Any) -> float:
    """Relative weight error over all quantized layers: ``sqrt(sum ||W - W_hat||^2 / sum ||W||^2)``."""
    num = den = 0.0
    for layer in qmodel.quant_layers().values():
        w = layer.weight.detach().double()
        num += float((w - layer.weight_hat().double()).square().sum())
        den += float(w.square().sum())
    return (num / den) ** 0.5 if den else 0.0


@torch.no_grad()
def _logits(model: nn.Module, data: Any, device: str, batch_size: int = 512) -> torch.Tensor:
    was = model.training
    model.eval()
    x = data.tensors[0]
    out = torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def measure(qmodel: Any, pre: Pretrained, device: str = "cpu") -> dict[str, float]:
    """Test accuracy/loss, damage to the FP32 outputs, multiplications replaced, weight memory and error.

    Damage to the outputs, on the whole test set against the FP32 model's logits ``z`` (``z_hat``: the
    converted model's): ``kl_to_fp32 = mean_x KL(softmax(z) || softmax(z_hat))`` (nats) and
    ``output_mse = mean_x mean_k (z_hat - z)^2``. For a conversion with re-estimated batch-norm statistics
    ``z`` are the logits of the FP32 model with its statistics re-estimated the same way (the damage of
    quantizing, not of re-estimating). Unlike accuracy or test loss, which move with the few
    test samples near a decision boundary, these see every sample's every output, so small differences
    between conversions are measured rather than drowned in test-set noise.
    """
    ref = pre.reference_logits(device, bn_recalibrated=bool(getattr(qmodel, "config", {}).get("bn_recalibration")))
    out = _logits(qmodel, pre.data.test, device)  # one pass over the test set gives every measure below
    y = pre.data.test.tensors[1]
    res = {"loss": float(nn.functional.cross_entropy(out.double(), y)), "accuracy": float((out.argmax(1) == y).double().mean())}
    kl = (torch.log_softmax(ref.double(), 1).exp() * (torch.log_softmax(ref.double(), 1)
                                                       - torch.log_softmax(out.double(), 1))).sum(1).mean()
    s = qmodel.summary()
    return {"accuracy": res["accuracy"], "loss": res["loss"], "drop_points": 100 * (pre.fp32["accuracy"] - res["accuracy"]),
            "kl_to_fp32": float(kl), "output_mse": float((out.double() - ref.double()).square().mean()),
            "mults_replaced": s["mults_replaced"], "mults_replaced_quantized_layers": s["mults_replaced_quantized_layers"],
            "mem_quant_bytes": s["mem_quant_bytes"], "mem_fp32_bytes": s["mem_fp32_bytes"], "weight_error": weight_error(qmodel)}


@torch.no_grad()
def bn_input_shift(qmodel: nn.Module, pre: Pretrained, device: str = "cpu") -> float:
    """How far the converted network's batch-norm inputs moved from the statistics its batch norms use.

    For every BatchNorm layer: ``|mean_x(input_c) - running_mean_c| / sqrt(running_var_c + eps)`` per channel
    ``c`` over the test set, averaged over channels and layers. Near 0 for the FP32 model; large when a
    conversion shifts the channels' means away from the (FP32) running statistics that normalize them, which is
    what makes a plain conversion of a narrow batch-norm network collapse.
    """
    sums: dict[nn.Module, list] = {}

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        x = inp[0].detach().double().transpose(0, 1).reshape(inp[0].shape[1], -1)
        acc = sums.setdefault(mod, [0.0, 0])
        acc[0] = acc[0] + x.sum(1)
        acc[1] += x.shape[1]

    bns = [m for m in qmodel.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        _logits(qmodel, pre.data.test, device)
    finally:
        for h in handles:
            h.remove()
    shifts = [float(((total / n - m.running_mean.double()).abs() / (m.running_var.double() + m.eps).sqrt()).mean())
              for m, (total, n) in ((m, sums[m]) for m in bns if m in sums)]
    return sum(shifts) / len(shifts) if shifts else 0.0


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)
