"""FP32 reference training: the baseline every low-precision claim is measured against.

The BF16 and DFP16 papers judge a low-precision run by whether it matches FP32 "within
run-to-run variation". This experiment trains the LeNet-style CNN on scikit-learn digits in FP32
over several seeds and reports that variation, so the reader sees the yardstick itself.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch import nn

from leantrain.app.registry import Claim, Result, Table, experiment
from leantrain.data import load_dataset
from leantrain.models import LeNet
from leantrain.plots import curves
from leantrain.train import fit


@experiment(
    "fp32-baseline",
    arxiv="1905.12322",
    title="FP32 reference training curve (LeNet on digits)",
    claim="The FP32 baseline that BF16/DFP16 runs must match trains to a high, stable accuracy; "
          "its seed-to-seed spread is the tolerance used by the precision experiments.",
    quick_minutes=0.5,
)
def run(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    epochs, seeds = (8, 3) if profile == "quick" else (30, 5)
    data = load_dataset("digits")
    runs = []
    for s in range(seed, seed + seeds):
        torch.manual_seed(s)
        model = LeNet(in_channels=1, num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        hist = fit(model, opt, nn.functional.cross_entropy, data.train, test=data.test, epochs=epochs,
                   batch_size=32, seed=s, device=device, eval_train=False)
        runs.append(hist)
    accs = [h.last("test_accuracy") for h in runs]
    mean, spread = statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)
    x = list(range(1, epochs + 1))
    curves(out / "test_accuracy.png", {f"seed {seed + i}": (x, h.series("test_accuracy")) for i, h in enumerate(runs)},
           xlabel="epoch", ylabel="test accuracy", title="FP32 LeNet on digits")
    claims = [
        Claim("FP32 LeNet reaches >= 95% test accuracy on digits (every seed)", "not recovered (toy task)",
              f"min {min(accs):.4f}, mean {mean:.4f}", ">= 0.95 for each seed", min(accs) >= 0.95),
        Claim("seed-to-seed spread (std of final test accuracy) is small", "n/a (our yardstick)",
              f"{spread:.4f}", "std <= 0.02", spread <= 0.02),
    ]
    table = Table("final test accuracy per seed", ["seed", "test accuracy", "final train loss"],
                  [[seed + i, h.last("test_accuracy"), h.last("train_loss")] for i, h in enumerate(runs)])
    return Result(metrics={"test_accuracy": accs, "mean": mean, "std": spread, "epochs": epochs,
                           "history": [h.evals for h in runs]},
                  claims=claims, plots=["test_accuracy.png"], tables=[table],
                  setting={"data": ("ImageNet-1K and others (the BF16 paper's FP32 baselines)", "scikit-learn digits"),
                           "model": ("AlexNet, ResNet-50, ...", "LeNet"),
                           "batch / epochs": ("not recovered", f"32, {epochs} epochs, SGD lr 0.05 momentum 0.9"),
                           "seeds": ("not recovered", f"{seeds} ({seed}..{seed + seeds - 1})")})
