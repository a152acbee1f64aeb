"""Networks of GAIL/RAIL: the Gaussian policy, the value function, the input standardizer.

Following the RAIL/GAIL code: 2 x 100 tanh MLPs (:class:`leantrain.models.MLP`), a Gaussian policy
with a state-independent log standard deviation initialised at 0, and observation normalisation
fitted once on the expert data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from leantrain.models import MLP

__all__ = ["Standardizer", "GaussianPolicy", "ValueFunction", "diagonal_gaussian_kl", "policy_actor"]

_LOG_2PI = math.log(2.0 * math.pi)


class Standardizer(nn.Module):
    """``x -> clip((x - mean) / std, -clip, clip)`` with ``std = sqrt(var + eps)``.

    The statistics are either set once (:meth:`fit`) or merged batch by batch (:meth:`update`,
    the parallel-variance formula of Chan et al., exact for the union of all batches seen).
    ``clip=None`` disables clipping.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, dim: int, *, clip: float | None = 10.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.clip, self.eps = clip, eps

    @torch.no_grad()
    def fit(self, x: np.ndarray | torch.Tensor) -> None:
        """Replace the statistics by those of ``x`` (rows are samples)."""
        self.count.zero_()
        self.update(x)

    @torch.no_grad()
    def update(self, x: np.ndarray | torch.Tensor) -> None:
        """Merge the mean and (population) variance of the rows of ``x`` into the running statistics."""
        x = torch.as_tensor(x, dtype=torch.float64, device=self.mean.device).reshape(-1, self.mean.numel())
        n = float(x.shape[0])
        if n == 0:
            return
        bm, bv = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = bm - self.mean
        self.var.copy_((self.var * self.count + bv * n + delta**2 * self.count * n / total) / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean.to(x.dtype)) / torch.sqrt(self.var + self.eps).to(x.dtype)
        return z if self.clip is None else z.clamp(-self.clip, self.clip)


def diagonal_gaussian_kl(mean0: torch.Tensor, log_std0: torch.Tensor, mean1: torch.Tensor,
                         log_std1: torch.Tensor) -> torch.Tensor:
    """``KL(N0 || N1)`` per row for diagonal Gaussians:
    ``sum_d [log s1 - log s0 + (s0^2 + (m0 - m1)^2) / (2 s1^2) - 1/2]``."""
    var0, var1 = torch.exp(2 * log_std0), torch.exp(2 * log_std1)
    return (log_std1 - log_std0 + (var0 + (mean0 - mean1) ** 2) / (2 * var1) - 0.5).sum(-1)


class GaussianPolicy(nn.Module):
    """``pi(a | s) = N(mu_theta(norm(s)), diag(exp(2 log_std)))`` with a state-independent ``log_std``."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100, 100), *, init_log_std: float = 0.0) -> None:
        super().__init__()
        self.obs_norm = Standardizer(obs_dim)
        self.mu = MLP(obs_dim, act_dim, hidden, activation="tanh")
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))

    def distribution(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, act_dim) and log standard deviation broadcast to (B, act_dim)."""
        mean = self.mu(self.obs_norm(obs))
        return mean, self.log_std.expand_as(mean)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``log pi(a|s) = -sum_d [(a - mu)^2 / (2 s^2) + log s + log(2 pi) / 2]`` per row."""
        mean, log_std = self.distribution(obs)
        z = (actions - mean) * torch.exp(-log_std)
        return -(0.5 * z**2 + log_std + 0.5 * _LOG_2PI).sum(-1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample ``mu + s * eps`` (``eps ~ N(0, I)`` from ``generator``), or ``mu`` when deterministic."""
        mean, log_std = self.distribution(obs)
        if deterministic:
            return mean
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(log_std) * eps


def policy_actor(policy: GaussianPolicy, *, seed: int, deterministic: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """``obs[n, d] (numpy) -> actions[n, k]`` sampling from ``policy`` with its own random stream ``seed``."""
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))

    def act(obs: np.ndarray) -> np.ndarray:
        o = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
        return policy.act(o, deterministic=deterministic, generator=gen).cpu().numpy()

    return act


class ValueFunction(nn.Module):
    """``V(s) = target_mean + target_std * f(norm(s))``; :meth:`fit` regresses standardized targets."""

    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (100, 100)) -> None:
        super().__init__()
        self.obs_norm = Standardizer(obs_dim)
        self.f = MLP(obs_dim, 1, hidden, activation="tanh")
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.f(self.obs_norm(obs)).squeeze(-1) * self.target_std + self.target_mean

    def fit(self, obs: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer, *, epochs: int,
            minibatch: int, generator: torch.Generator | None = None) -> float:
        """Re-standardize to the targets' mean/std, then ``epochs`` passes of minibatch MSE; returns the last loss."""
        with torch.no_grad():
            self.target_mean.copy_(targets.mean())
            self.target_std.copy_(targets.std(unbiased=False).clamp_min(1e-6))
        z = (targets - self.target_mean) / self.target_std
        x = self.obs_norm(obs)
        loss = torch.zeros(())
        for _ in range(epochs):
            perm = torch.randperm(obs.shape[0], generator=generator, device=obs.device)
            for i in range(0, obs.shape[0], minibatch):
                idx = perm[i:i + minibatch]
                loss = ((self.f(x[idx]).squeeze(-1) - z[idx]) ** 2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return float(loss.detach())
