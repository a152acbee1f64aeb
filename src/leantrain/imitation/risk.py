"""Tail-risk measures of trajectory cost and RAIL's CVaR machinery (arXiv:1707.06658).

Everything here is in *cost* space: a trajectory's cost is the negative of its return, and the
tail of interest holds the **largest** costs. ``alpha`` is the confidence level (0.9 in RAIL).

Estimators on a sample ``c_1..c_n`` with order statistics ``c_(1) <= ... <= c_(n)``:

- ``VaR_alpha = min { nu : F_n(nu) >= alpha } = c_(k)`` with ``k = ceil(alpha * n)`` (the lower
  alpha-quantile of the empirical distribution, no interpolation).
- ``CVaR_alpha = VaR_alpha + (1 / (1 - alpha)) * mean((c - VaR_alpha)^+)``, the Rockafellar-Uryasev
  value at its minimiser. It is the mean of the worst ``(1 - alpha)`` fraction of the sample, with
  the boundary observation counted fractionally; when ``n (1 - alpha)`` is an integer ``m`` it is
  exactly the mean of the ``m`` largest costs. For a continuous distribution both converge to
  ``E[C | C >= VaR_alpha(C)]``. ``CVaR_alpha >= VaR_alpha`` always holds.

RAIL's training-time pieces (the objective and its gradients are derived in
:mod:`leantrain.imitation.rail`):

- trajectory cost under the learned cost ``R_j = -sum_t gamma^t r_D(s_t, a_t)`` (see
  :func:`discounted_trajectory_costs`);
- the Rockafellar-Uryasev function ``H_alpha(R, nu)`` (:func:`rockafellar_uryasev`), minimized
  over ``nu`` exactly by ``nu = VaR_alpha`` of the batch (:func:`value_at_risk`, RAIL's default),
  or by the authors' gradient descent with
  ``g_nu = lambda * (1 - (1 / ((1 - alpha) N)) * #{j : R_j >= nu})`` (see :func:`nu_gradient`);
- every trajectory with ``R_j >= nu`` gets the extra policy-gradient weight
  ``w_j = (lambda / (1 - alpha)) * (R_j - nu)``, all others ``0`` (see :func:`tail_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "value_at_risk",
    "conditional_value_at_risk",
    "rockafellar_uryasev",
    "tail_weights",
    "nu_gradient",
    "discount_weights",
    "discounted_trajectory_costs",
    "CostSummary",
    "summarize_costs",
    "relative_tail_risk",
    "gain_in_reliability",
]


def _costs(costs: Sequence[float] | np.ndarray, name: str = "costs") -> np.ndarray:
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    if c.size == 0:
        raise ValueError(f"{name} must hold at least one value, got an empty sample")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{name} must be finite (no NaN or Inf)")
    return c


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    return alpha


def value_at_risk(costs: Sequence[float] | np.ndarray, alpha: float = 0.9) -> float:
    """Empirical ``VaR_alpha`` of a cost sample: the ``ceil(alpha * n)``-th smallest cost.

    ``alpha * n`` is rounded to 9 decimals before the ceiling so that, e.g., ``0.9 * 10`` (which
    is ``9.000000000000002`` in binary) selects the 9th order statistic as the definition says.
    """
    alpha = _check_alpha(alpha)
    c = np.sort(_costs(costs))
    k = max(1, math.ceil(round(alpha * c.size, 9)))
    return float(c[k - 1])


def conditional_value_at_risk(costs: Sequence[float] | np.ndarray, alpha: float = 0.9) -> float:
    """Empirical ``CVaR_alpha``: ``VaR + mean((c - VaR)^+) / (1 - alpha)`` (mean of the worst tail)."""
    alpha = _check_alpha(alpha)
    c = _costs(costs)
    var = value_at_risk(c, alpha)
    return float(var + np.maximum(c - var, 0.0).mean() / (1.0 - alpha))


def rockafellar_uryasev(costs: Sequence[float] | np.ndarray, nu: float, alpha: float = 0.9) -> float:
    """``H_alpha(C, nu) = nu + (1 / (1 - alpha)) * mean((C - nu)^+)``; its minimum over ``nu`` is CVaR."""
    alpha = _check_alpha(alpha)
    c = _costs(costs)
    return float(nu + np.maximum(c - nu, 0.0).mean() / (1.0 - alpha))


def tail_weights(costs: Sequence[float] | np.ndarray, nu: float, *, alpha: float, lam: float) -> np.ndarray:
    """RAIL's per-trajectory policy-gradient weights ``w_j = (lam / (1 - alpha)) * (R_j - nu) * 1[R_j >= nu]``.

    Trajectories below ``nu`` get exactly ``0``; with ``lam = 0`` every weight is ``0`` (GAIL).
    """
    alpha = _check_alpha(alpha)
    if lam < 0:
        raise ValueError(f"lam (the CVaR weight) must be >= 0, got {lam}")
    c = _costs(costs)
    in_tail = c >= nu
    return np.where(in_tail, (lam / (1.0 - alpha)) * (c - nu), 0.0)


def nu_gradient(costs: Sequence[float] | np.ndarray, nu: float, *, alpha: float, lam: float) -> float:
    """Derivative of ``lam * H_alpha(R, nu)`` in ``nu``: ``lam * (1 - #{R_j >= nu} / ((1 - alpha) N))``.

    ``H_alpha`` is piecewise linear in ``nu`` with kinks at the samples; between kinks this is its
    derivative, at a kink ``nu = R_j`` it is the left derivative. At ``nu = VaR_alpha`` of the batch
    the left derivative is ``< 0`` and the right one (``#{R_j > nu}``) ``>= 0``, so the batch VaR
    minimizes ``H_alpha`` exactly (Rockafellar and Uryasev).
    The authors' code updates ``nu <- nu - eta_nu * g_nu`` once per iteration (``eta_nu = 0.01``);
    RAIL's default here sets ``nu`` to the minimizer directly.
    """
    alpha = _check_alpha(alpha)
    c = _costs(costs)
    return float(lam * (1.0 - np.count_nonzero(c >= nu) / ((1.0 - alpha) * c.size)))


def discount_weights(lengths: Sequence[int] | np.ndarray, gamma: float) -> np.ndarray:
    """``gamma^t`` for every step ``t < T_j`` of trajectories stored back to back (float64)."""
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if np.any(lens <= 0):
        raise ValueError(f"lengths must be positive, got min {int(lens.min())}")
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    t = np.arange(int(lens.sum())) - np.repeat(starts, lens)
    return float(gamma) ** t


def discounted_trajectory_costs(rewards: np.ndarray, lengths: Sequence[int] | np.ndarray, gamma: float) -> np.ndarray:
    """``R_j = -sum_{t < T_j} gamma^t r_{j,t}`` for trajectories stored back to back in ``rewards``.

    ``rewards`` is the flat, episode-major array of per-step (surrogate) rewards and ``lengths``
    the trajectory lengths ``T_j`` (they must sum to ``len(rewards)``).
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lens.sum() != r.size or np.any(lens <= 0):
        raise ValueError(f"lengths must be positive and sum to len(rewards)={r.size}, got sum {int(lens.sum())}")
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return -np.add.reduceat(r * discount_weights(lens, gamma), starts)


@dataclass(frozen=True)
class CostSummary:
    """Statistics of trajectory cost (``cost = -return``) over evaluation episodes."""

    episodes: int
    mean: float
    std: float
    var: float
    cvar: float
    alpha: float

    def as_dict(self) -> dict[str, float]:
        return {"episodes": self.episodes, "mean": self.mean, "std": self.std,
                f"VaR_{self.alpha:g}": self.var, f"CVaR_{self.alpha:g}": self.cvar}


def summarize_costs(costs: Sequence[float] | np.ndarray, alpha: float = 0.9) -> CostSummary:
    """Mean, population std (``ddof=0``), ``VaR_alpha`` and ``CVaR_alpha`` of a cost sample."""
    c = _costs(costs)
    return CostSummary(int(c.size), float(c.mean()), float(c.std()), value_at_risk(c, alpha),
                       conditional_value_at_risk(c, alpha), float(alpha))


def relative_tail_risk(agent: float, expert: float) -> float:
    """``100 * (X_expert - X_agent) / |X_expert|`` in percent (RAIL's relative tail risk; higher is better)."""
    if expert == 0:
        raise ValueError("the expert's risk measure is 0; the relative tail risk is undefined")
    return 100.0 * (expert - agent) / abs(expert)


def gain_in_reliability(rail: float, gail: float, expert: float) -> float:
    """``GR = rel(RAIL) - rel(GAIL) = 100 * (X_GAIL - X_RAIL) / |X_expert|``; positive when RAIL's tail is lower."""
    return relative_tail_risk(rail, expert) - relative_tail_risk(gail, expert)
