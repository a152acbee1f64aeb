"""GAIL's discriminator and the imitation reward it defines.

A 2 x 100 tanh MLP on the standardized pair ``(s, a)`` outputs a logit ``z(s, a)``; expert pairs
are labelled 1, so ``sigmoid(z)`` is the probability of "expert" and GAIL's ``D = 1 - sigmoid(z)``.
The policy maximizes the surrogate reward

    ``r(s, a) = -log(1 - sigmoid(z)) = softplus(z) > 0``,

i.e. it minimizes the per-step cost ``c_D = log D = -r`` (arXiv:1707.06658, GAIL convention).

One update (:meth:`Discriminator.update`) is one Adam step on

    ``L = mean_pi[BCE(z, 0)] + mean_E[BCE(z, 1)] - beta_H * (mean_pi[H(z)] + mean_E[H(z)])
          - kappa * mean_pi[u] * mean_{pi+E}[r]``,

where ``H(z)`` is the entropy of Bernoulli(sigmoid(z)) (``beta_H = 0.001``) and the last term is
the RAIL code's discriminator-side CVaR term with per-pair weights ``u`` from
:func:`leantrain.imitation.risk.discriminator_tail_weights` (``kappa = 1`` in the released code;
``u = 0`` for GAIL, which makes the term exactly zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from leantrain.imitation.policies import Standardizer
from leantrain.models import MLP

__all__ = ["Discriminator"]


class Discriminator(nn.Module):
    """Logit network ``z(s, a)`` with running input standardization; see the module docstring."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100, 100)) -> None:
        super().__init__()
        self.input_norm = Standardizer(obs_dim + act_dim, clip=None)
        self.net = MLP(obs_dim + act_dim, 1, hidden, activation="tanh")
        # the GAIL code starts from a zero output layer: every pair begins at z = 0, r = log 2
        last = self.net.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def logits(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_norm(torch.cat([obs, actions], dim=-1))).squeeze(-1)

    def reward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Surrogate reward ``r = -log(1 - sigmoid(z)) = softplus(z)`` (the learned cost is ``-r``)."""
        return F.softplus(self.logits(obs, actions))

    def loss(self, policy_obs: torch.Tensor, policy_actions: torch.Tensor, expert_obs: torch.Tensor,
             expert_actions: torch.Tensor, *, entropy_weight: float = 1e-3, tail_weights: torch.Tensor | None = None,
             tail_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of the module docstring and diagnostics (accuracy on each side)."""
        z_pi = self.logits(policy_obs, policy_actions)
        z_ex = self.logits(expert_obs, expert_actions)

        def bernoulli_entropy(z: torch.Tensor) -> torch.Tensor:
            p = torch.sigmoid(z)
            return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))

        loss = (F.binary_cross_entropy_with_logits(z_pi, torch.zeros_like(z_pi))
                + F.binary_cross_entropy_with_logits(z_ex, torch.ones_like(z_ex))
                - entropy_weight * (bernoulli_entropy(z_pi).mean() + bernoulli_entropy(z_ex).mean()))
        if tail_weights is not None:
            reward_mean = F.softplus(torch.cat([z_pi, z_ex])).mean()
            loss = loss - tail_scale * tail_weights.mean() * reward_mean
        stats = {"disc_acc_policy": float((z_pi <= 0).float().mean()), "disc_acc_expert": float((z_ex > 0).float().mean())}
        return loss, stats

    def update(self, optimizer: torch.optim.Optimizer, policy_obs: torch.Tensor, policy_actions: torch.Tensor,
               expert_obs: torch.Tensor, expert_actions: torch.Tensor, *, steps: int = 1, entropy_weight: float = 1e-3,
               tail_weights: torch.Tensor | None = None, tail_scale: float = 1.0) -> dict[str, float]:
        """Merge the batch into the input statistics, then take ``steps`` optimizer steps on :meth:`loss`."""
        self.input_norm.update(torch.cat([torch.cat([policy_obs, policy_actions], -1),
                                          torch.cat([expert_obs, expert_actions], -1)]))
        stats: dict[str, float] = {}
        for _ in range(steps):
            loss, stats = self.loss(policy_obs, policy_actions, expert_obs, expert_actions, entropy_weight=entropy_weight,
                                    tail_weights=tail_weights, tail_scale=tail_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stats["disc_loss"] = float(loss.detach())
        return stats
