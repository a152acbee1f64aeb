"""Sharpness of a minimizer: the box-constrained metric of Keskar et al. (arXiv:1609.04836, Metric 2.1).

For the training function ``f`` at the solution ``x`` (``n`` trainable parameters), a matrix
``A`` (``n x p``) and ``eps > 0``::

    C_eps = { y in R^p : |y_i| <= eps * (|(A^+ x)_i| + 1) },    i = 1..p
    phi_{x,f}(eps, A) = 100 * (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x))

``A^+`` is the Moore-Penrose pseudo-inverse. ``A = I`` (``subspace=None``) probes the full space;
``subspace=p`` draws a random ``n x p`` matrix with i.i.d. ``N(0, 1/n)`` entries (columns of
expected unit norm, nearly orthonormal for ``p << n``; the paper does not state its
distribution, so this is our choice), and an explicit ``n x p`` matrix may be passed instead.

The maximization is solved inexactly, as in the paper, by scipy's L-BFGS-B on ``-f(x + A y)``
with the box as bounds, exact PyTorch gradients ``A^T grad f(x + A y)``, and ``iters`` (the
paper: 10) iterations. The value reported is the best ``f`` seen at any evaluated point (``y = 0``
included, so ``phi >= 0``). At a minimizer ``grad f(x) ~ 0``, so starting at ``y = 0`` can stall;
L-BFGS-B starts at ``y0 = u * start * h`` with ``u ~ U(-1, 1)^p`` drawn from ``seed`` and ``h``
the half-widths (``start=0`` starts at the centre).

Relation to curvature (second order, ``A = I``, ``D = diag(h)``): if ``grad f(x) = 0`` the exact box
maximum of the quadratic model lies between ``lambda_max(D H D) / 2`` (the unit ball in
``z = D^-1 y`` fits in the cube) and ``n * lambda_max(D H D) / 2``. Along one unit direction ``u``
(``subspace=u[:, None]``) the maximum is ``|g.u| h + lambda h^2 / 2 + O(h^3)`` when
``u`` is an eigenvector with eigenvalue ``lambda > 0``; the tests use this to cross-check
:func:`leantrain.landscape.hessian_top_eigenvalues`.

Model state: see :mod:`leantrain.landscape.surface` (private eval-mode copy; the model is unchanged).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import Bounds, minimize
from torch import nn

from leantrain.landscape.surface import LossFn, LossSurface

__all__ = ["Sharpness", "sharpness", "random_subspace", "box_half_widths", "pinv_coordinates"]


@dataclass
class Sharpness:
    """Result of :func:`sharpness`.

    ``value`` is ``phi``; ``loss`` is ``f(x)``; ``max_loss`` the best ``f(x + A y)`` found;
    ``subspace`` is ``None`` (full space) or ``p``; ``iterations``/``evaluations`` are L-BFGS-B's
    counts; ``maximizer`` is the best ``y`` (length ``p`` or ``n``; not included in :meth:`as_dict`).
    """

    value: float
    epsilon: float
    subspace: int | None
    loss: float
    max_loss: float
    dim: int
    iters: int
    iterations: int
    evaluations: int
    seed: int
    start: float
    dtype: str
    maximizer: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("maximizer")
        return d


def random_subspace(n: int, p: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """A random ``n x p`` matrix with i.i.d. ``N(0, 1/n)`` entries, drawn from ``seed`` on the CPU."""
    if not 1 <= p <= n:
        raise ValueError(f"subspace dimension p must satisfy 1 <= p <= {n} (the parameter count), got {p}")
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(n, p, generator=g, dtype=torch.float64) / math.sqrt(n)
    return a.to(device=device, dtype=dtype)


def pinv_coordinates(x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
    """``A^+ x`` in float64 (``x`` itself when ``a`` is None, i.e. ``A = I``)."""
    if a is None:
        return x.double()
    # A^+ x is the least-squares solution of A z = x (A has full column rank for a random A).
    return torch.linalg.lstsq(a.double(), x.double()[:, None]).solution[:, 0]


def box_half_widths(x: torch.Tensor, epsilon: float, a: torch.Tensor | None = None) -> torch.Tensor:
    """``h_i = eps * (|(A^+ x)_i| + 1)`` (``A = I`` when ``a`` is None), in float64."""
    return epsilon * (pinv_coordinates(x, a).abs() + 1.0)


def _check_epsilon(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def _subspace(subspace: Any, seed: int, surface: LossSurface) -> tuple[torch.Tensor | None, np.ndarray]:
    """The matrix ``A`` (None for ``I``) and ``|A^+ x|`` as float64 numpy; random ones are cached on the surface."""
    n = surface.dim
    if subspace is None:
        return None, surface.x0.double().abs().cpu().numpy()
    if isinstance(subspace, bool):
        raise TypeError("subspace must be None, an int p or an n x p matrix, got a bool")
    if isinstance(subspace, (int, np.integer)):
        p = int(subspace)
        if not 1 <= p <= n:
            raise ValueError(f"subspace must satisfy 1 <= subspace <= {n} (the model's trainable parameter count), "
                             f"got {p}")
        key = ("random subspace", p, int(seed))
        if key not in surface.cache:
            surface.cache.pop(next((k for k in surface.cache if k[0] == "random subspace"), None), None)  # keep one
            a = random_subspace(n, p, seed=seed, dtype=surface.dtype, device=surface.device)
            surface.cache[key] = (a, pinv_coordinates(surface.x0, a).abs().cpu().numpy())
        return surface.cache[key]
    if isinstance(subspace, (np.ndarray, torch.Tensor)):
        a = torch.as_tensor(subspace)
        if a.dim() != 2 or a.shape[0] != n or not 1 <= a.shape[1] <= n:
            raise ValueError(f"a subspace matrix must have shape (n={n}, p) with 1 <= p <= n, got {tuple(a.shape)}")
        if not torch.isfinite(a).all():
            raise ValueError("the subspace matrix has non-finite entries")
        a = a.to(device=surface.device, dtype=surface.dtype)
        return a, pinv_coordinates(surface.x0, a).abs().cpu().numpy()
    raise TypeError(f"subspace must be None, an int p or an n x p matrix, got {type(subspace).__name__}")


def sharpness(model: nn.Module, loss_fn: LossFn, data: Any, epsilon: float = 1e-3, subspace: Any = None,
              iters: int = 10, seed: int = 0, *, start: float = 0.5, batch_size: int = 1024,
              dtype: torch.dtype | None = None, surface: LossSurface | None = None) -> Sharpness:
    """The sharpness ``phi_{x,f}(eps, A)`` of ``model`` on ``data`` (see the module docstring).

    Args:
        model: the network at the solution ``x``; never modified.
        loss_fn: mean-reduced loss ``loss_fn(output, target)``; ``f`` is its mean over ``data``.
        data: the training set (Dataset, ``(inputs, targets)`` or a Split, whose train part is used).
        epsilon: box scale ``eps > 0`` (the paper uses 1e-3 and 5e-4).
        subspace: ``None`` for ``A = I``; an int ``p`` (1 <= p <= n) for a random ``n x p`` matrix
            drawn from ``seed``; or an explicit ``n x p`` tensor/array.
        iters: L-BFGS-B iteration cap (the paper: 10). Each iteration costs one or more
            evaluations of ``f`` and its gradient on all of ``data``.
        seed: seeds the random matrix and the start point.
        start: start point ``y0 = u * start * h``, ``u ~ U(-1, 1)``; in [0, 1].
        batch_size, dtype: evaluation batch size and compute dtype (see :class:`LossSurface`).
        surface: reuse an existing :class:`LossSurface` of the same model and data (saves the copy).

    Raises:
        ValueError: ``epsilon <= 0`` or not finite, ``iters < 1``, ``start`` outside [0, 1],
            ``subspace`` outside ``1..n`` or a matrix of the wrong shape.
    """
    eps = _check_epsilon(epsilon)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if not 0.0 <= start <= 1.0:
        raise ValueError(f"start must be in [0, 1], got {start!r}")
    surf = LossSurface.reuse(surface, model, loss_fn, data, batch_size=batch_size, dtype=dtype)
    x = surf.x0
    n = surf.dim
    a, abs_z = _subspace(subspace, seed, surf)
    h = eps * (abs_z + 1.0)
    rng = np.random.default_rng(seed)
    y0 = rng.uniform(-1.0, 1.0, size=h.shape) * start * h
    f0 = surf.value()
    best = {"f": f0, "y": np.zeros_like(h)}

    def objective(y: np.ndarray) -> tuple[float, np.ndarray]:
        yt = torch.from_numpy(y).to(device=surf.device, dtype=surf.dtype)
        f, g = surf.value_and_grad(x + (yt if a is None else a @ yt))
        if not math.isfinite(f):
            raise ValueError(f"the loss is not finite at a point of the box (f = {f}); the model may be diverged")
        if f > best["f"]:
            best["f"], best["y"] = f, y.copy()
        g = g if a is None else a.T @ g
        return -f, -g.double().cpu().numpy()

    # ftol = gtol = 0: stop on the iteration cap (or an exactly stationary projected gradient),
    # not on the small absolute changes typical of loss values near a minimum.
    res = minimize(objective, y0, jac=True, method="L-BFGS-B", bounds=Bounds(-h, h),
                   options={"maxiter": iters, "maxfun": 20 * iters + 1, "ftol": 0.0, "gtol": 0.0})
    phi = 100.0 * (best["f"] - f0) / (1.0 + f0)
    return Sharpness(value=phi, epsilon=eps, subspace=None if a is None else int(a.shape[1]), loss=f0,
                     max_loss=best["f"], dim=n, iters=iters, iterations=int(res.nit), evaluations=int(res.nfev),
                     seed=int(seed), start=float(start), dtype=str(surf.dtype).replace("torch.", ""),
                     maximizer=best["y"])
