"""Benchmark ``optim``: the cost of one PBQN iteration and one DANCE CG iteration against one SGD step on
the same batch, and of a Hessian-vector product against a gradient, side by side.

Workloads: the tanh MLP (32, 32) on mnist1d inputs and binary logistic regression (21 features),
both float32, on one batch. "SGD step" is forward + backward + ``torch.optim.SGD.step``. A PBQN
iteration includes its per-sample gradients, sample-size test, two-loop recursion and line search;
a DANCE CG iteration is one Hessian-vector product through the retained gradient graph plus the
CG vector updates (one process, so its all-reduce is a no-op).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from leantrain.app.bench import check, compare
from leantrain.app.registry import benchmark
from leantrain.optim import PBQN, BatchLoss, ProgressiveSampler, hvp_from_gradient
from leantrain.optim.problems import binary_logistic_loss, cross_entropy_loss


def _workloads(batch: int, device: str):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    from leantrain.models import MLP

    mlp = MLP(40, 10, hidden=(32, 32), activation="tanh").to(device)
    x_mlp = torch.randn(batch, 1, 40, generator=gen).to(device)
    y_mlp = torch.randint(0, 10, (batch,), generator=gen).to(device)
    lin = nn.Linear(21, 1).to(device)
    x_lin = torch.randn(batch, 21, generator=gen).to(device)
    y_lin = torch.randint(0, 2, (batch,), generator=gen).to(device)
    return {"MLP": (mlp, cross_entropy_loss, x_mlp, y_mlp), "logreg": (lin, binary_logistic_loss, x_lin, y_lin)}


def _workload_rows(name: str, model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, *, batch: int,
                   repeats: int, device: str) -> tuple[list[dict], list[dict]]:
    params = list(model.parameters())
    objective = BatchLoss(model, loss_fn, x, y, l2=1e-4)
    # the SGD baseline steps a copy of the model, so it never invalidates the candidates' graphs
    twin = copy.deepcopy(model)
    sgd = torch.optim.SGD(twin.parameters(), lr=1e-3)
    twin_objective = BatchLoss(twin, loss_fn, x, y, l2=1e-4)

    def sgd_step() -> None:
        sgd.zero_grad(set_to_none=True)
        twin_objective.losses().mean().backward()
        sgd.step()

    # PBQN steps its own copy too; the sampler's data set is 10 batches, so the batch is a sample and
    # per-sample gradients are needed
    pbqn_model = copy.deepcopy(model)
    pbqn_objective = BatchLoss(pbqn_model, loss_fn, x, y, l2=1e-4)
    pbqn = PBQN(pbqn_model.parameters(), ProgressiveSampler(10 * batch, batch, overlap=0.25), lr=1e-3)
    _, g = objective.gradient(params, create_graph=True)
    u = torch.randn_like(g)

    def cg_iteration() -> None:
        hu = hvp_from_gradient(g, params, u)
        a = float(u.dot(u)) / float(u.dot(hu))
        (u * a + u).add_(hu, alpha=-a)

    same = dict(baseline_name="one SGD step, same batch", repeats=repeats, device=device)
    grad = dict(baseline_name="one gradient (forward + backward)", repeats=repeats, device=device)
    rows = [
        compare(f"{name}: one PBQN iteration (b={batch})", lambda: pbqn.step(pbqn_objective), sgd_step, **same),
        compare(f"{name}: one DANCE CG iteration (retained graph)", cg_iteration, sgd_step, **same),
        compare(f"{name}: HVP by double backprop (from scratch)", lambda: objective.hvp(params, u),
                lambda: objective.gradient(params), **grad),
        compare(f"{name}: HVP on the retained gradient graph", lambda: hvp_from_gradient(g, params, u),
                lambda: objective.gradient(params), **grad),
    ]
    checks = [
        check(f"{name}: HVP (from scratch) / gradient", rows[2]["ratio"], "<=", 5.0),
        check(f"{name}: DANCE CG iteration / SGD step", rows[1]["ratio"], "<=", 4.0),
        check(f"{name}: PBQN iteration / SGD step", rows[0]["ratio"], "<=", 4.0),
    ]
    return rows, checks


@benchmark("optim", description="PBQN iteration and DANCE CG iteration vs an SGD step; HVP vs gradient cost")
def run(quick: bool = False, device: str = "cpu") -> dict:
    batch = 256 if quick else 1024
    repeats = 5 if quick else 9
    rows, checks = [], []
    for name, (model, loss_fn, x, y) in _workloads(batch, device).items():
        r, c = _workload_rows(name, model, loss_fn, x, y, batch=batch, repeats=repeats, device=device)
        rows += r
        checks += c
    return {"rows": rows, "checks": checks,
            "notes": "Bounds from the methods' arithmetic: an HVP costs a forward and about two backward passes "
                     "(<= 5 gradients with overheads); a CG iteration is one HVP on a retained graph; a PBQN "
                     "iteration is a gradient assembled from per-sample gradients, one line-search evaluation "
                     "and the two-loop recursion (<= 10 SGD steps)."}
