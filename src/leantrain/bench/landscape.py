"""Benchmark ``landscape``: cost of the diagnostics in units of one full-data gradient.

The workload is the experiment's (MLP 40-256-256-10 on the 4,000 MNIST-1D training samples; quick:
a 64-wide MLP on 1,000 samples). Rows:

- one Hessian-vector product (double backward) against one gradient: theory says a small
  constant (about 2-4 gradients);
- one sharpness evaluation (10 L-BFGS-B iterations), full space and random 100-dim subspace,
  against one gradient; the checks divide by the number of ``f``/gradient evaluations L-BFGS-B
  made, so they measure the overhead of the optimizer loop and of the subspace matrix (its
  generation and the least-squares ``A^+ x``) on top of the evaluations that are the method's cost.
"""

from __future__ import annotations

import torch
from torch import nn

from leantrain.bench import check, compare
from leantrain.data import load_dataset
from leantrain.landscape import LossSurface, sharpness
from leantrain.models import MLP
from leantrain.registry import benchmark


@benchmark("landscape", description="sharpness (full / 100-dim subspace) and one HVP, relative to one full gradient")
def run(quick: bool = False, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    data = load_dataset("mnist1d")
    n = 1000 if quick else len(data.train)
    x, y = data.train.tensors[0][:n], data.train.tensors[1][:n]
    model = MLP(40, 10, hidden=(64, 64) if quick else (256, 256)).to(device)
    loss = nn.functional.cross_entropy
    surface = LossSurface(model, loss, (x, y), batch_size=n)
    v = torch.randn(surface.dim, device=surface.device)
    repeats = 3 if quick else 5

    def grad() -> None:
        surface.value_and_grad()

    def hvp() -> None:
        surface.hvp(v)

    counts: dict[str, int] = {}

    def full() -> None:
        counts["full"] = sharpness(model, loss, (x, y), 1e-3, surface=surface).evaluations

    def sub() -> None:
        counts["sub"] = sharpness(model, loss, (x, y), 1e-3, subspace=100, surface=surface).evaluations

    rows = [compare("Hessian-vector product", hvp, grad, baseline_name="one gradient", repeats=repeats * 2,
                    device=device),
            compare("sharpness, full space, 10 L-BFGS-B iters", full, grad, baseline_name="one gradient",
                    repeats=repeats, min_sample_s=0.0, device=device),
            compare("sharpness, 100-dim subspace, 10 iters", sub, grad, baseline_name="one gradient",
                    repeats=repeats, min_sample_s=0.0, device=device)]
    rows[1]["evaluations"], rows[2]["evaluations"] = counts["full"], counts["sub"]
    checks = [
        check("HVP / gradient time", rows[0]["ratio"], "<=", 5.0),
        check("full-space sharpness / (evaluations x gradient)", rows[1]["ratio"] / counts["full"], "<=", 1.5),
        check("subspace sharpness / (evaluations x gradient)", rows[2]["ratio"] / counts["sub"], "<=", 3.0),
    ]
    return {"rows": rows, "checks": checks, "parameters": surface.dim, "samples": n}
