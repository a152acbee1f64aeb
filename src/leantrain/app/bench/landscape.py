"""Benchmark ``landscape``: cost of the diagnostics in units of one full-data gradient.

The workload is the experiment's (MLP 40-256-256-10, 78,858 parameters, on the 4,000 MNIST-1D
training samples; quick: the same workload, fewer repeats). Rows:

- one Hessian-vector product (double backward) against one gradient: theory says a small
  constant (about 2-4 gradients);
- one sharpness evaluation (10 L-BFGS-B iterations), full space and random 100-dim subspace,
  against one gradient. Its cost is (evaluations of ``f`` and its gradient) + (scipy's L-BFGS-B
  bookkeeping, which grows with the number of bounded variables: for the full space it is
  comparable to a gradient of a small network per iteration). The last rows time that
  bookkeeping alone (same dimension, bounds and iterations, a trivial objective) and the one-off
  generation of the random ``n x 100`` matrix with ``A^+ x`` (cached per surface afterwards), so
  the checks measure what leantrain's own wrapper adds: (sharpness - L-BFGS-B alone) divided by
  (evaluations x one gradient). In the subspace that includes the two ``n x p`` products
  ``A y`` and ``A^T g`` per evaluation (about 0.2 gradient here; relatively more on less data).
  These subtractive checks need a quiet machine: under heavy load the timings scatter by more
  than the bounds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import Bounds, minimize
from torch import nn

from leantrain.app.bench import check, compare, measure
from leantrain.app.registry import benchmark
from leantrain.data import load_dataset
from leantrain.landscape import LossSurface, random_subspace, sharpness
from leantrain.landscape.sharpness import pinv_coordinates
from leantrain.models import MLP


@benchmark("landscape", description="sharpness (full / 100-dim subspace) and one HVP, relative to one full gradient")
def run(quick: bool = False, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    data = load_dataset("mnist1d")
    n = len(data.train)  # the checks' bounds are set for this workload; quick only repeats less
    x, y = data.train.tensors[0][:n], data.train.tensors[1][:n]
    model = MLP(40, 10, hidden=(256, 256)).to(device)
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

    def lbfgsb_alone(dim: int) -> Callable[[], None]:
        h = np.full(dim, 1e-3)
        y0 = np.random.default_rng(0).uniform(-0.5, 0.5, dim) * h

        def fn() -> None:  # maximize 0.5 |y|^2 on the same kind of box: pure optimizer bookkeeping
            minimize(lambda y: (-0.5 * float(y @ y), -y), y0, jac=True, method="L-BFGS-B", bounds=Bounds(-h, h),
                     options={"maxiter": 10, "maxfun": 201, "ftol": 0.0, "gtol": 0.0})

        return fn

    def make_subspace() -> None:
        a = random_subspace(surface.dim, 100, seed=1, dtype=surface.dtype, device=surface.device)
        pinv_coordinates(surface.x0, a)

    rows.append(measure(f"scipy L-BFGS-B alone, n = {surface.dim}, 10 iters", lbfgsb_alone(surface.dim),
                        repeats=repeats, device=device))
    rows.append(measure("scipy L-BFGS-B alone, n = 100, 10 iters", lbfgsb_alone(100), repeats=repeats, device=device))
    rows.append(measure("random n x 100 subspace and A^+ x (once per surface)", make_subspace, repeats=repeats,
                        min_sample_s=0.0, device=device))
    # each row against its own interleaved gradient baseline (robust to drift of the machine)
    own_full = (rows[1]["candidate_median_s"] - rows[3]["median_s"]) / (counts["full"] * rows[1]["baseline_median_s"])
    own_sub = (rows[2]["candidate_median_s"] - rows[4]["median_s"]) / (counts["sub"] * rows[2]["baseline_median_s"])
    checks = [
        check("HVP / gradient time", rows[0]["ratio"], "<=", 5.0),
        check("(full-space sharpness - L-BFGS-B alone) / (evaluations x gradient)", own_full, "<=", 1.3),
        check("(subspace sharpness - L-BFGS-B alone) / (evaluations x gradient)", own_sub, "<=", 1.5),
    ]
    return {"rows": rows, "checks": checks, "parameters": surface.dim, "samples": n}
