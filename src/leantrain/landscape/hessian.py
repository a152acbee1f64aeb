"""Curvature of the training function: top Hessian eigenvalues (Lanczos) and the trace (Hutchinson).

Both work matrix-free on exact Hessian-vector products ``H v`` of :class:`LossSurface` (double
backward); the Hessian itself is never formed. Model state: see :mod:`leantrain.landscape.surface`.

- :func:`hessian_top_eigenvalues`: the ``k`` algebraically largest eigenvalues of the symmetric
  ``n x n`` Hessian by the implicitly restarted Lanczos method (ARPACK via
  :func:`scipy.sparse.linalg.eigsh`, ``which="LA"``), to relative accuracy ``tol``.
- :func:`hessian_trace`: Hutchinson's estimator ``tr H = E[v^T H v]`` with Rademacher ``v``
  (``v_i = +-1``), whose variance is ``2 * sum_{i != j} H_ij^2``. It draws probes until the
  half-width of the normal-approximation confidence interval, ``z * s / sqrt(m)`` (``s`` the sample
  standard deviation of the ``m`` probes, ``z = 1.96`` for 95 %), is at most
  ``rtol * |estimate|``, or ``max_samples`` is reached (then ``converged`` is False). The
  returned :class:`TraceEstimate` carries the standard error, so every figure states its
  statistical tolerance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from leantrain.landscape.surface import LossFn, LossSurface

__all__ = ["hessian_top_eigenvalues", "hessian_trace", "TraceEstimate"]


def hessian_top_eigenvalues(model: nn.Module, loss_fn: LossFn, data: Any, k: int = 1, *, tol: float = 1e-4,
                            max_iterations: int | None = None, lanczos_vectors: int | None = None, seed: int = 0,
                            return_vectors: bool = False,
                            batch_size: int = 1024, dtype: torch.dtype | None = None,
                            surface: LossSurface | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest (algebraic) eigenvalues of the Hessian of ``f`` at the model's parameters.

    Args:
        k: number of eigenvalues, ``1 <= k < n`` (``n`` = trainable parameter count).
        tol: ARPACK's relative accuracy of the Ritz values (0 = machine precision).
        max_iterations: ARPACK's restart cap (default ``100 * n``, scipy's default); every
            Lanczos step costs one Hessian-vector product over all of ``data``.
        lanczos_vectors: ARPACK's ``ncv``, the Lanczos basis size, ``k < ncv <= n`` (default
            ``min(n, max(2k + 1, 20))``); a smaller basis restarts more often but may stop sooner
            when the top eigenvalue is well separated.
        seed: seeds the starting vector.
        return_vectors: also return the unit eigenvectors as an ``(n, k)`` array.

    Returns:
        The eigenvalues in descending order (float64 array of length ``k``), and with
        ``return_vectors`` the matching eigenvectors as columns.
    """
    surf = LossSurface.reuse(surface, model, loss_fn, data, batch_size=batch_size, dtype=dtype)
    n = surf.dim
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k must be an int with 1 <= k < {n} (the trainable parameter count), got {k!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")

    def matvec(v: np.ndarray) -> np.ndarray:
        hv = surf.hvp(torch.from_numpy(np.ascontiguousarray(v.reshape(-1))).to(surf.device, surf.dtype))
        return hv.double().cpu().numpy()

    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    if lanczos_vectors is not None and not k < lanczos_vectors <= n:
        raise ValueError(f"lanczos_vectors must satisfy k={k} < lanczos_vectors <= {n}, got {lanczos_vectors!r}")
    vals, vecs = eigsh(op, k=k, which="LA", tol=tol, v0=v0, maxiter=max_iterations, ncv=lanczos_vectors)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    return (vals, vecs) if return_vectors else vals


@dataclass
class TraceEstimate:
    """Hutchinson estimate of ``tr H``: ``trace`` +- ``stderr`` (one standard error) from ``samples`` probes.

    ``half_width`` is the ``confidence`` interval half-width ``z * stderr``; ``converged`` says
    whether it reached ``rtol * |trace|`` within ``max_samples``.
    """

    trace: float
    stderr: float
    samples: int
    half_width: float
    confidence: float
    rtol: float
    converged: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _normal_quantile(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Any, *, rtol: float = 0.05, confidence: float = 0.95,
                  min_samples: int = 10, max_samples: int = 200, seed: int = 0, batch_size: int = 1024,
                  dtype: torch.dtype | None = None, surface: LossSurface | None = None) -> TraceEstimate:
    """Hutchinson's trace estimate of the Hessian of ``f`` with a stated statistical tolerance.

    Draws Rademacher probes ``v`` (from ``seed``) and averages ``v^T H v`` until the
    ``confidence`` interval half-width ``z * s / sqrt(m)`` is ``<= rtol * |mean|`` (at least
    ``min_samples``, at most ``max_samples`` probes). One probe = one Hessian-vector product.
    """
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 2:
        raise ValueError(f"min_samples must be an int >= 2, got {min_samples!r}")
    if not isinstance(max_samples, int) or max_samples < min_samples:
        raise ValueError(f"max_samples must be an int >= min_samples ({min_samples}), got {max_samples!r}")
    surf = LossSurface.reuse(surface, model, loss_fn, data, batch_size=batch_size, dtype=dtype)
    z = _normal_quantile(confidence)
    g = torch.Generator().manual_seed(int(seed))
    values: list[float] = []
    converged = False
    while len(values) < max_samples:
        v = (torch.randint(0, 2, (surf.dim,), generator=g) * 2 - 1).to(surf.device, surf.dtype)
        values.append(float(v.double() @ surf.hvp(v).double()))
        if len(values) >= min_samples:
            mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
            if z * sd / math.sqrt(len(values)) <= rtol * abs(mean):
                converged = True
                break
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    se = sd / math.sqrt(len(values))
    return TraceEstimate(trace=mean, stderr=se, samples=len(values), half_width=z * se, confidence=confidence,
                         rtol=rtol, converged=converged)
