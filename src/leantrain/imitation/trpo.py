"""A compact TRPO step that can carry RAIL's trajectory-level term.

Why not sb3-contrib's ``TRPO``: its surrogate ``(advantages * ratio).mean()`` is built inline in
``TRPO.train()`` (for the gradient and again in the line search) with no hook for an extra
per-sample term, and its ``RolloutBuffer`` holds a fixed number of steps per environment, cutting
trajectories at rollout boundaries, while RAIL's weight needs each *complete* trajectory's cost.
Carrying the term would mean re-writing ``train()`` and the buffer, i.e. forking the algorithm; the
step below is the same algorithm (Schulman et al. 2015) in ~100 lines with the term built in.

One step maximizes, within ``mean KL(pi_old || pi_theta) <= max_kl``,

    ``L(theta) = mean_i[rho_i(theta) * (A_i - w_i)]``,

``rho_i = pi_theta(a_i|s_i) / pi_old(a_i|s_i)``. ``A`` is the (scaled) advantage and ``w`` RAIL's
tail weight of the pair's trajectory in the same units (``w = 0`` or ``None`` is GAIL): the CVaR
term acts as an extra, trajectory-level negative advantage. At ``theta_old`` the gradient of
``mean[rho w]`` equals that of the authors' ``mean[w log pi]``; the ratio form keeps the line
search's ``L`` the first-order model of the objective's change (see :mod:`leantrain.imitation.rail`).
A step's direction and length do not change when ``A`` and ``w`` are multiplied by the same
positive number (``x`` scales with ``g`` and the step is normalized by ``x^T F x``).

1. ``g = grad L(theta_old)``;
2. solve ``(F + damping I) x = g`` by ``cg_iters`` conjugate-gradient iterations, where ``F v`` is
   the Hessian-vector product of the mean KL on a random ``fvp_fraction`` of the batch;
3. full step ``s = sqrt(2 max_kl / x^T (F + damping I) x) * x``;
4. backtracking ``theta_old + 0.5^k s`` (``k = 0..backtracks-1``): accept the first point with
   ``L > L(theta_old)`` and ``mean KL <= max_kl`` on the whole batch; otherwise keep ``theta_old``.
"""

from __future__ import annotations

import torch

from leantrain.imitation.policies import GaussianPolicy, diagonal_gaussian_kl
from leantrain.numerics.flat import conjugate_gradient, flatten, hvp_from_gradient, set_flat_

__all__ = ["trpo_step", "trpo_surrogate"]


def trpo_surrogate(policy: GaussianPolicy, obs: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor,
                   old_logp: torch.Tensor, tail_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``L(theta) = mean_i[rho_i(theta) * (A_i - w_i)]`` (``w = None``: ``mean_i[rho_i A_i]``), differentiable."""
    ratio = torch.exp(policy.log_prob(obs, actions) - old_logp)
    if tail_weights is None:
        return (ratio * advantages).mean()
    return (ratio * (advantages - tail_weights)).mean()


def trpo_step(policy: GaussianPolicy, obs: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor, *,
              tail_weights: torch.Tensor | None = None, max_kl: float = 0.01, damping: float = 0.1,
              fvp_fraction: float = 0.1, cg_iters: int = 10, backtracks: int = 10,
              generator: torch.Generator | None = None) -> dict[str, float]:
    """One TRPO update of ``policy`` in place (see the module docstring); returns diagnostics."""
    if not 0 < fvp_fraction <= 1:
        raise ValueError(f"fvp_fraction must lie in (0, 1], got {fvp_fraction}")
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        old_mean, old_log_std = policy.distribution(obs)
        old_logp = policy.log_prob(obs, actions)

    def surrogate() -> torch.Tensor:
        return trpo_surrogate(policy, obs, actions, advantages, old_logp, tail_weights)

    def mean_kl(index: torch.Tensor | None = None) -> torch.Tensor:
        o = obs if index is None else obs[index]
        mean, log_std = policy.distribution(o)
        m0 = old_mean if index is None else old_mean[index]
        s0 = old_log_std if index is None else old_log_std[index]
        return diagonal_gaussian_kl(m0, s0, mean, log_std).mean()

    loss0 = surrogate()
    g = flatten(torch.autograd.grad(loss0, params))
    n_sub = max(1, int(round(fvp_fraction * obs.shape[0])))
    sub = torch.randperm(obs.shape[0], generator=generator, device=obs.device)[:n_sub]
    kl_sub = mean_kl(sub)
    grad_kl = flatten(torch.autograd.grad(kl_sub, params, create_graph=True))

    def fvp(v: torch.Tensor) -> torch.Tensor:
        return hvp_from_gradient(grad_kl, params, v) + damping * v

    l0 = float(loss0.detach())
    stats = {"surrogate_before": l0, "surrogate_after": l0, "kl": 0.0, "step_fraction": 0.0}
    if not torch.isfinite(g).all() or float(g @ g) == 0.0:
        return stats
    # F + damping*I is positive definite, so CG never meets non-positive curvature; ||r|| <= 1e-5 is the
    # classic TRPO stop r.r <= 1e-10.
    x, _, _, _ = conjugate_gradient(fvp, g, 1e-5, cg_iters)
    shs = float(x @ fvp(x))
    if not shs > 0:
        return stats
    full_step = x * (2.0 * max_kl / shs) ** 0.5
    theta0 = flatten([p.detach() for p in params])
    with torch.no_grad():
        frac = 1.0
        for _ in range(backtracks):
            set_flat_(params, theta0 + frac * full_step)
            new, kl = surrogate(), mean_kl()
            if torch.isfinite(new) and float(new) > l0 and float(kl) <= max_kl:
                stats.update(surrogate_after=float(new), kl=float(kl), step_fraction=frac)
                return stats
            frac *= 0.5
        set_flat_(params, theta0)
    return stats
