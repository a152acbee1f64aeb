"""Optimization problems for PBQN, DANCE and their baselines, and the exact convex reference.

A :class:`Problem` is a model, a per-sample loss, training and test tensors and an L2
coefficient; its objective is ``F(w) = (1/n) sum_i loss(model(x_i), y_i) + (l2/2) ||w_reg||^2``
(biases unregularized). Builders:

- ``logreg``: L2-regularized logistic regression, binary (one logit, binary cross-entropy) or
  multiclass (softmax, one weight row per class), on features standardized with the *training*
  mean and standard deviation (constant features left at 0); weights and bias start at 0;
  float64 by default. Convex; :func:`reference_optimum` finds ``F*`` with scipy.
- ``mlp``: :class:`leantrain.models.MLP` (tanh, so the Hessian exists everywhere) on flattened inputs;
- ``cnn``: :class:`leantrain.models.LeNet` on image data sets (``(C, H, W)`` inputs, ``H, W >= 8``);
- ``bncnn``: a ResNet-8 of width 4 with BatchNorm (:class:`leantrain.models.resnet.ResNet`), trained in
  ``train()`` mode (batch statistics); accuracy is measured in ``eval()`` mode (running statistics),
  and evaluations never change the model's buffers.

Data sets: any name of :func:`leantrain.data.load_dataset`, a LIBSVM/svmlight file path (read by
the ``libsvm`` loader), or ``synthlogreg`` (:func:`synthetic_logistic`, n = 100000 by default).
The default ``l2`` is ``1/n``, the statistical accuracy of ``n`` samples.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leantrain.numerics.flat import flatten, named_views, set_flat_
from leantrain.optim.objective import BatchLoss, WorkCounter
from leantrain.validation import check_choice, check_int, check_range, check_seed

__all__ = ["Problem", "make_problem", "synthetic_logistic", "reference_optimum", "binary_logistic_loss",
           "cross_entropy_loss", "load_split", "PROBLEMS"]

PROBLEMS = ("logreg", "mlp", "cnn", "bncnn")


def binary_logistic_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample ``log(1 + exp(-z))`` form of binary cross-entropy on one logit (labels 0/1)."""
    return nn.functional.binary_cross_entropy_with_logits(outputs.reshape(-1), targets.to(outputs.dtype),
                                                          reduction="none")


cross_entropy_loss = functools.partial(nn.functional.cross_entropy, reduction="none")


@dataclass
class Problem:
    """A model, its per-sample loss, the data and the L2 coefficient (see the module docstring)."""

    name: str
    kind: str
    model: nn.Module
    loss_fn: Any
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    l2: float
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def convex(self) -> bool:
        return self.kind == "logreg"

    @property
    def n(self) -> int:
        return len(self.x_train)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def batch_loss(self, rows: torch.Tensor | None = None, *, counter: WorkCounter | None = None,
                   l2: float | None = None) -> BatchLoss:
        """The :class:`BatchLoss` of the training samples ``rows`` (all by default)."""
        x = self.x_train if rows is None else self.x_train[rows]
        y = self.y_train if rows is None else self.y_train[rows]
        return BatchLoss(self.model, self.loss_fn, x, y, l2=self.l2 if l2 is None else l2, counter=counter)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.num_classes == 2 and out.shape[-1] == 1:
            return (out.reshape(-1) > 0).long()
        return out.argmax(-1)

    @torch.no_grad()
    def accuracy(self, split: str = "test") -> float:
        """Accuracy in ``eval()`` mode (BatchNorm on its running statistics); the mode is restored."""
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        was = self.model.training
        self.model.eval()
        try:
            return float((self._predict(x) == y).double().mean())
        finally:
            self.model.train(was)

    def evaluate(self) -> dict[str, float]:
        """Full training objective, its gradient norm and test accuracy (not counted as work; the
        model's buffers, e.g. BatchNorm running statistics, are left as they were)."""
        buffers = [t.clone() for t in self.model.buffers()]
        obj, g = self.batch_loss().gradient(self.parameters())
        with torch.no_grad():
            for t, t0 in zip(self.model.buffers(), buffers):
                t.copy_(t0)
        return {"objective": float(obj), "grad_norm": float(g.norm()), "test_accuracy": self.accuracy("test")}

    def flat_weights(self) -> torch.Tensor:
        return flatten([p.detach() for p in self.parameters()])

    def set_flat_weights(self, w: torch.Tensor) -> None:
        set_flat_(self.parameters(), w)

    def weights(self) -> dict[str, list]:
        """The parameters by name, as nested lists (the final weights of a linear model)."""
        return {n: p.detach().cpu().tolist() for n, p in self.model.named_parameters()}


def synthetic_logistic(n_train: int = 100_000, n_test: int = 20_000, dim: int = 20, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A logistic-regression data set with correlated features.

    ``x = z A`` with ``z ~ N(0, I_d)`` and a fixed random ``A`` whose singular values decay as
    ``1/(1+j)`` (so standardized features stay correlated and the problem is ill-conditioned);
    ``y ~ Bernoulli(sigmoid(x w_true + 0.3))`` with ``w_true ~ N(0, I/d) * 4``. Returns
    ``(x_train, y_train, x_test, y_test)`` as float64 / int64 arrays.
    """
    if n_train < 1 or n_test < 1 or dim < 1:
        raise ValueError("n_train, n_test and dim must be >= 1")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = q * (1.0 / (1.0 + np.arange(dim)))[None, :] @ np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    w_true = rng.normal(size=dim) * 4.0 / np.sqrt(dim)
    scale = np.linalg.norm(a, axis=0)  # the standard deviation of each feature

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, dim)) @ a
        p = 1.0 / (1.0 + np.exp(-((x / scale) @ w_true + 0.3)))
        return x, (rng.uniform(size=n) < p).astype(np.int64)

    return (*draw(n_train), *draw(n_test))


def load_split(dataset: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(x_train, y_train, x_test, y_test, info)`` for a data-set name, a LIBSVM file or ``synthlogreg``."""
    from leantrain.data import DATASETS, load_dataset

    name = str(dataset)
    if name == "synthlogreg":
        xs = synthetic_logistic()
        return (torch.from_numpy(xs[0]), torch.from_numpy(xs[1]), torch.from_numpy(xs[2]), torch.from_numpy(xs[3]),
                {"name": "synthlogreg", "input_shape": (xs[0].shape[1],), "num_classes": 2})
    if Path(name).is_file():
        split = load_dataset("libsvm", train=name)
    else:
        try:
            split = load_dataset(name)
        except ValueError:
            if name not in DATASETS and (Path(name).suffix or "/" in name or os.sep in name):
                raise ValueError(f"dataset {name!r}: no such LIBSVM file (and it is not a data set name; "
                                 "see `leantrain data list`)") from None
            raise
    if split.info.num_classes < 2:
        raise ValueError(f"dataset {name!r} is a {split.info.task} task; optimize needs classification labels")
    xtr, ytr = split.tensors("train")
    xte, yte = split.tensors("test")
    return xtr, ytr, xte, yte, {"name": split.info.name, "input_shape": tuple(split.info.input_shape),
                                "num_classes": split.info.num_classes}


def make_problem(problem: str, dataset: str | Path, l2: float | None = None, *, dtype: torch.dtype | None = None,
                 seed: int = 0, hidden: tuple[int, ...] = (32, 32), device: str = "cpu",
                 max_train: int | None = None) -> Problem:
    """Build a :class:`Problem` (``problem`` in ``logreg``, ``mlp``, ``cnn``; see the module docstring).

    ``dtype`` defaults to float64 for ``logreg`` and float32 otherwise; ``seed`` initializes
    the networks; ``max_train`` keeps only the first training samples (quick profiles).
    """
    check_choice("problem", problem, PROBLEMS)
    if l2 is not None:
        check_range("l2", l2, 0)
    if max_train is not None:
        check_int("max_train", max_train, 1)
    for i, h in enumerate(hidden):
        check_int(f"hidden[{i}]", h, 1)
    check_seed("seed", seed)
    xtr, ytr, xte, yte, info = load_split(dataset)
    if max_train is not None:
        xtr, ytr = xtr[:max_train], ytr[:max_train]
    if len(xtr) == 0:
        raise ValueError(f"dataset {str(dataset)!r} has no training samples")
    dtype = dtype or (torch.float64 if problem == "logreg" else torch.float32)
    k = int(info["num_classes"])
    n = len(xtr)
    l2 = 1.0 / n if l2 is None else float(l2)
    shape = tuple(info["input_shape"])
    if problem == "logreg":
        xtr, xte = xtr.reshape(n, -1).double(), xte.reshape(len(xte), -1).double()
        mu, sd = xtr.mean(0), xtr.std(0, unbiased=False)
        sd[sd == 0] = 1.0
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
        model = nn.Linear(xtr.shape[1], 1 if k == 2 else k)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        loss_fn = binary_logistic_loss if k == 2 else cross_entropy_loss
        prep = "features standardized by training mean/std; zero init"
    elif problem == "mlp":
        from leantrain.models import MLP

        torch.manual_seed(seed)
        model = MLP(int(np.prod(shape)), k, hidden=hidden, activation="tanh")
        loss_fn = cross_entropy_loss
        prep = f"MLP {hidden} tanh, seed {seed}"
    elif problem == "bncnn":
        from leantrain.models.resnet import ResNet

        if len(shape) != 3:
            raise ValueError(f"problem 'bncnn' needs image inputs (C, H, W); dataset {info['name']!r} has input shape {shape}")
        torch.manual_seed(seed)
        model = ResNet(depth=8, width=4, in_channels=shape[0], num_classes=k).train()
        loss_fn = cross_entropy_loss
        prep = f"ResNet-8 width 4 with BatchNorm in train mode, seed {seed}"
    else:
        from leantrain.models import LeNet

        if len(shape) != 3 or min(shape[1:]) < 8:
            raise ValueError(f"problem 'cnn' needs image inputs (C, H, W) with H, W >= 8; dataset {info['name']!r} "
                             f"has input shape {shape}")
        torch.manual_seed(seed)
        model = LeNet(in_channels=shape[0], num_classes=k, width=8)
        loss_fn = cross_entropy_loss
        prep = f"LeNet width 8, seed {seed}"
    model = model.to(device=device, dtype=dtype)
    cast = lambda t: t.to(device=device, dtype=dtype)
    return Problem(f"{problem}:{info['name']}", problem, model, loss_fn, cast(xtr), ytr.to(device), cast(xte),
                   yte.to(device), l2, k, {"dataset": info["name"], "n_train": n, "n_test": len(xte), "dim":
                                           sum(p.numel() for p in model.parameters()), "preprocessing": prep})


def reference_optimum(problem: Problem, *, gtol: float = 1e-10, max_iter: int = 20_000) -> dict[str, Any]:
    """The exact optimum of a convex problem: scipy L-BFGS-B in float64 to ``||grad F|| <= gtol``.

    L-BFGS-B runs with ``ftol=0`` and a projected-gradient tolerance of ``gtol / sqrt(D)``; if it
    stops above ``gtol`` (line-search breakdown at rounding level), Newton steps with the exact
    dense Hessian (least-squares solve, so the flat direction of a softmax's biases is harmless)
    finish the job. Returns ``objective``, ``weights`` (flat tensor), ``grad_norm``, ``iterations``,
    ``newton_polish`` (steps used). The problem's model is left at its initial weights.
    """
    from scipy.optimize import minimize

    if not problem.convex:
        raise ValueError("reference_optimum needs a convex problem (logreg)")
    params = problem.parameters()
    w0 = problem.flat_weights().clone()
    obj = problem.batch_loss()
    dtype = w0.dtype

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        problem.set_flat_weights(torch.from_numpy(w).to(dtype))
        f, g = obj.gradient(params)
        return float(f), g.double().cpu().numpy()

    d = w0.numel()
    res = minimize(fun, w0.double().cpu().numpy(), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "maxfun": 4 * max_iter, "ftol": 0.0, "gtol": gtol / np.sqrt(d),
                            "maxcor": 20})
    w = torch.from_numpy(res.x).to(dtype)
    polish = 0
    for _ in range(20):
        problem.set_flat_weights(w)
        f, g = obj.gradient(params)
        if float(g.norm()) <= gtol:
            break
        h = torch.autograd.functional.hessian(lambda v: _objective_at(problem, obj, v), w)
        step = np.linalg.lstsq(h.double().cpu().numpy(), g.double().cpu().numpy(), rcond=None)[0]
        w = w - torch.from_numpy(step).to(dtype)
        polish += 1
    problem.set_flat_weights(w)
    f, g = obj.gradient(params)
    out = {"objective": float(f), "weights": w.clone(), "grad_norm": float(g.norm()), "iterations": int(res.nit),
           "newton_polish": polish}
    problem.set_flat_weights(w0)
    return out


def _objective_at(problem: Problem, obj: BatchLoss, w: torch.Tensor) -> torch.Tensor:
    """``F(w)`` as a function of the flat weights (for the dense Hessian)."""
    from torch.func import functional_call

    names, params = zip(*problem.model.named_parameters())
    named = named_views(w, names, params)
    losses = problem.loss_fn(functional_call(problem.model, named, (problem.x_train,)), problem.y_train)
    return losses.mean() + obj.penalty(named)
