"""GAIL's discriminator and the imitation reward it defines.

A 2 x 100 tanh MLP on the standardized pair ``(s, a)`` outputs a logit ``z(s, a)``; expert pairs
are labelled 1, so ``sigmoid(z)`` is the probability of "expert" and GAIL's ``D = 1 - sigmoid(z)``.
The policy maximizes the surrogate reward

    ``r(s, a) = -log(1 - sigmoid(z)) = softplus(z) > 0``,

i.e. it minimizes the per-step cost ``c_D = log D = -r`` (arXiv:1707.06658, GAIL convention).

One update (:meth:`Discriminator.update`) is one Adam step on the discriminator's loss, the
negative of its share of RAIL's objective (derived in :mod:`leantrain.imitation.rail`):

    ``L = mean_pi[BCE(z, 0)] + mean_E[BCE(z, 1)] - beta_H * (mean_pi[H(z)] + mean_E[H(z)])
          - kappa * (lam / h) * H_alpha(R(z), nu)``,

where ``mean_pi[BCE(z, 0)] = -mean_pi[log D]``, ``mean_E[BCE(z, 1)] = -mean_E[log(1 - D)]``,
``H(z)`` is the entropy of Bernoulli(sigmoid(z)) (``beta_H = 0.001``, GAIL's code; not part of
the paper's objective), and the last term is the CVaR term of the objective on the policy's
batch (:class:`TrajectoryCVaR`):

- ``R_j(z) = sum_t gamma^t log D(s_jt, a_jt) = -sum_t gamma^t softplus(z_jt)``, a differentiable
  function of the discriminator;
- ``H_alpha(R, nu) = nu + mean_j (R_j - nu)^+ / (1 - alpha)`` (Rockafellar-Uryasev);
- ``h = mean_j sum_t gamma^t`` converts the trajectory sum to the per-pair units of the BCE
  means (see the objective in :mod:`leantrain.imitation.rail`); ``kappa = 1`` is the objective,
  ``0`` switches the term off.

D maximizes the objective, so the term enters the minimized loss with a minus sign: its
gradient ``(kappa lam / (h (1 - alpha) N)) sum_j 1[R_j >= nu] sum_t gamma^t d softplus(z_jt)``
lowers the surrogate reward (raises the learned cost) of the tail trajectories. The authors'
code adds ``- mean(u) * mean(r)`` with ``u_j = (lam / (1 - alpha)) 1[R_j >= nu] (1 - gamma^T_j) / (1 - gamma)``
instead: the opposite sign (it *raises* the reward of every pair) and weights up to
``5 * 200 = 1000``; that term is not reproduced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leantrain.imitation.policies import Standardizer
from leantrain.models import MLP

__all__ = ["Discriminator", "TrajectoryCVaR"]


@dataclass
class TrajectoryCVaR:
    """The CVaR term's data on the policy batch (one entry per policy pair unless noted).

    ``episode`` is the index of each pair's trajectory (0..N-1, long), ``discount`` its
    ``gamma^t``; ``weight`` is ``kappa * lam / h`` (see the module docstring).
    """

    episode: torch.Tensor
    discount: torch.Tensor
    episodes: int
    nu: float
    alpha: float
    weight: float

    def costs(self, z_pi: torch.Tensor) -> torch.Tensor:
        """``R_j = -sum_t gamma^t softplus(z_jt)`` for each trajectory, differentiable in ``z``."""
        per_pair = F.softplus(z_pi) * self.discount.to(z_pi.dtype)
        return -torch.zeros(self.episodes, dtype=z_pi.dtype, device=z_pi.device).index_add(0, self.episode, per_pair)

    def value(self, z_pi: torch.Tensor) -> torch.Tensor:
        """``weight * H_alpha(R(z), nu)``."""
        excess = torch.relu(self.costs(z_pi) - self.nu)
        return self.weight * (self.nu + excess.mean() / (1.0 - self.alpha))


class Discriminator(nn.Module):
    """Logit network ``z(s, a)`` with running input standardization; see the module docstring."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100, 100)) -> None:
        super().__init__()
        self.input_norm = Standardizer(obs_dim + act_dim, clip=None)
        self.net = MLP(obs_dim + act_dim, 1, hidden, activation="tanh")
        # The output layer keeps torch's default (random) init. GAIL's code zeroes it, so every pair starts at
        # r = log 2 and, on a task whose episodes all run to the time limit (HalfCheetah), every trajectory has
        # the same first learned cost: the batch VaR then equals all of them and RAIL's tail term is 0 there.

    def logits(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_norm(torch.cat([obs, actions], dim=-1))).squeeze(-1)

    def reward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Surrogate reward ``r = -log(1 - sigmoid(z)) = softplus(z)`` (the learned cost is ``-r``)."""
        return F.softplus(self.logits(obs, actions))

    def loss(self, policy_obs: torch.Tensor, policy_actions: torch.Tensor, expert_obs: torch.Tensor,
             expert_actions: torch.Tensor, *, entropy_weight: float = 1e-3,
             cvar: TrajectoryCVaR | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of the module docstring and diagnostics (accuracy on each side)."""
        z_pi = self.logits(policy_obs, policy_actions)
        z_ex = self.logits(expert_obs, expert_actions)

        def bernoulli_entropy(z: torch.Tensor) -> torch.Tensor:
            p = torch.sigmoid(z)
            return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))

        loss = (F.binary_cross_entropy_with_logits(z_pi, torch.zeros_like(z_pi))
                + F.binary_cross_entropy_with_logits(z_ex, torch.ones_like(z_ex))
                - entropy_weight * (bernoulli_entropy(z_pi).mean() + bernoulli_entropy(z_ex).mean()))
        stats = {"disc_acc_policy": float((z_pi <= 0).float().mean()), "disc_acc_expert": float((z_ex > 0).float().mean())}
        if cvar is not None and cvar.weight != 0:
            term = cvar.value(z_pi)
            loss = loss - term
            stats["disc_cvar_term"] = float(term.detach())
        return loss, stats

    def update(self, optimizer: torch.optim.Optimizer, policy_obs: torch.Tensor, policy_actions: torch.Tensor,
               expert_obs: torch.Tensor, expert_actions: torch.Tensor, *, steps: int = 1, entropy_weight: float = 1e-3,
               cvar: TrajectoryCVaR | None = None) -> dict[str, float]:
        """Merge the batch into the input statistics, then take ``steps`` optimizer steps on :meth:`loss`."""
        self.input_norm.update(torch.cat([torch.cat([policy_obs, policy_actions], -1),
                                          torch.cat([expert_obs, expert_actions], -1)]))
        stats: dict[str, float] = {}
        for _ in range(steps):
            loss, stats = self.loss(policy_obs, policy_actions, expert_obs, expert_actions, entropy_weight=entropy_weight,
                                    cvar=cvar)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stats["disc_loss"] = float(loss.detach())
        return stats
