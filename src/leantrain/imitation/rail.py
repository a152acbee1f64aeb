"""RAIL: risk-averse generative adversarial imitation (arXiv:1707.06658); GAIL is ``lam = 0``.

**The objective.** The policy ``pi_theta`` and the VaR variable ``nu`` minimize, the
discriminator ``D_phi`` maximizes

    ``J(theta, nu, phi) = E_pi[log D] + E_E[log(1 - D)] + lam * H_alpha(R_D, nu)``,
    ``H_alpha(R, nu) = nu + E_xi[(R(xi) - nu)^+] / (1 - alpha)``,

where ``R_D(xi) = sum_t gamma^t log D(s_t, a_t)`` is the cost of a trajectory ``xi ~ pi_theta``
under the learned cost ``c_D = log D`` and ``E_pi[f] = E_xi[sum_t gamma^t f(s_t, a_t)]`` (the
occupancy convention of GAIL, Ho and Ermon 2016), so ``E_pi[log D] = E_xi[R_D]`` and
``J = E[R_D] + lam * H_alpha(R_D, nu) + E_E[...]``. ``min_nu H_alpha(R, nu) = CVaR_alpha(R)``
(Rockafellar-Uryasev), so the policy minimizes the mean *plus* ``lam`` times the CVaR of its
trajectory cost. The policy-entropy term of the paper has weight 0, as in the released runs.
In the code, ``D = 1 - sigmoid(z)`` for the discriminator logit ``z`` (expert pairs labelled 1),
so ``log D = -softplus(z) = -r`` with the surrogate reward ``r``.

**Each player's gradient** on one batch of ``N`` trajectories (``M`` pairs):

- ``nu`` (``theta, phi`` fixed): ``d/dnu lam H_alpha = lam (1 - #{R_j >= nu} / ((1 - alpha) N))``
  (:func:`~leantrain.imitation.risk.nu_gradient`). ``H_alpha`` is convex and piecewise linear in
  ``nu``, minimized *exactly* by the batch's ``VaR_alpha`` of ``R_j``; ``nu_mode="var"`` (the
  default) sets ``nu`` there before the other players move, so ``H_alpha = CVaR_alpha`` of the
  batch and, by the envelope theorem, the other players follow the gradient of the CVaR itself.
  ``nu_mode="gradient"`` is the authors' code: ``nu_0 ~ U[0, 1)``, one step
  ``nu <- nu - nu_lr * g_nu`` per iteration (lr 0.01). Measured here (docs/rail.md): the learned
  costs are negative (``r > 0``) and ``nu`` moves at most ``0.01 lam`` per iteration while the
  tail is empty, so at small scale no trajectory ever reaches ``nu`` and RAIL runs GAIL's update.
- policy (``nu, phi`` fixed), by the likelihood ratio:
  ``grad_theta J = E[sum_t grad log pi(a_t|s_t) (C_t + w(xi))]`` with ``C_t`` the cost-to-go
  (estimated by GAE as ``-A_t``) and ``w(xi) = (lam / (1 - alpha)) (R(xi) - nu)^+``
  (:func:`~leantrain.imitation.risk.tail_weights`). TRPO ascends
  ``L = mean_i[rho_i (A_i - w_j(i))]`` (:func:`~leantrain.imitation.trpo.trpo_step`), whose gradient at
  ``theta_old`` is ``-(N / M)`` times that estimate. ``A`` is centred and divided by its
  standard deviation ``s``; ``w`` is divided by the *same* ``s``, which leaves the TRPO step
  unchanged (the authors' code standardizes ``A`` and not ``w``, which weighs the two parts of
  ``J`` by the arbitrary factor ``s``). The ``gamma^t`` in front of ``A_t`` is dropped, as in
  every TRPO/GAIL implementation.
- discriminator (``theta, nu`` fixed): ascend ``J``. Divided by the mean discounted horizon
  ``h = mean_j sum_t gamma^t`` (a positive constant), ``J / h`` has GAIL's per-pair means
  ``mean_pi[log D] + mean_E[log(1 - D)]`` (GAIL's estimate of the normalized occupancy) plus
  ``(lam / h) H_alpha(R(phi), nu)`` with ``R_j(phi)`` recomputed from ``D`` differentiably;
  its gradient in ``phi`` is ``(lam / (h (1 - alpha) N)) sum_j 1[R_j > nu] grad R_j(phi)``,
  which *raises* the learned cost of tail trajectories
  (:class:`~leantrain.imitation.discriminator.TrajectoryCVaR`). The authors' code has the
  opposite sign and weights ~1000 (see :mod:`leantrain.imitation.discriminator`); we follow the
  objective. ``disc_cvar_weight`` (``kappa``) scales this term; 1 is the objective.

The tests check each implemented gradient against autograd / finite differences of ``J`` on a
hand-made batch (tests/test_rail.py).

**One iteration** (:meth:`RAIL.iterate`), in the order of the authors' code (method notes, step 9):

1. sample complete trajectories with at least ``batch_steps`` state-action pairs and at least
   ``min_trajectories`` trajectories (so that the alpha-tail of the batch is not empty);
2. surrogate rewards ``r = softplus(z(s, a))`` from the current discriminator, GAE advantages
   (``gamma = 0.995``, ``lambda_GAE = 0.97``) and discounted returns;
3. trajectory costs ``R_j = -sum_t gamma^t r_t``; ``nu`` (batch VaR by default), the tail
   weights ``w_j`` and ``g_nu``;
4. one TRPO step on ``mean[rho (A - w)]``;
5. one Adam step on the discriminator, expert pairs resampled to the policy's count, with the
   CVaR term above;
6. fit the value function;
7. with ``nu_mode="gradient"``: ``nu <- nu - nu_lr * g_nu``.

With ``lam = 0`` every tail weight, the discriminator term and ``g_nu`` are exactly zero, so the
same code performs GAIL's update bit for bit (the tests check it). ``nu_0`` is drawn from its own
random stream, so GAIL and RAIL runs with the same seed consume identical random numbers
everywhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.signal
import torch

from leantrain.imitation.discriminator import Discriminator, TrajectoryCVaR
from leantrain.imitation.envs import collect, make_vec_env, space_dims
from leantrain.imitation.policies import GaussianPolicy, ValueFunction, policy_actor
from leantrain.imitation.risk import (
    discount_weights,
    discounted_trajectory_costs,
    nu_gradient,
    tail_weights,
    value_at_risk,
)
from leantrain.imitation.trajectories import ExpertTrajectories, RolloutBatch
from leantrain.imitation.trpo import trpo_step
from leantrain.seeds import derive_seed

__all__ = ["RAILConfig", "RAIL", "gae", "NU_MODES"]

NU_MODES = ("var", "gradient")


@dataclass
class RAILConfig:
    """Hyper-parameters; defaults are the RAIL code's (method notes, "Parameters and defaults") except ``nu_mode``.

    ``lam = 0`` is GAIL. ``batch_steps`` (>= 50,000 in the paper), ``n_envs`` and the value-function
    fit (Adam instead of the code's trust-region regression) are ours to choose.
    ``nu_mode="var"`` (default): ``nu`` is the exact minimizer of ``H_alpha``, the batch's
    ``VaR_alpha`` of ``R_j``, set before the weights are computed; ``"gradient"``: the authors'
    gradient descent on ``nu`` (``nu_lr``, ``nu_0 ~ U[0, 1)``). ``disc_cvar_weight`` scales the
    discriminator's CVaR term (1 = the objective, 0 = off). ``min_trajectories`` (default
    ``ceil(2 / (1 - alpha))``, 20 at alpha 0.9) is the least number of complete trajectories per
    batch: with fewer than ``1 / (1 - alpha)`` the batch VaR is the largest cost and every tail weight
    ``(R_j - nu)^+`` is 0, so the tail term would not act (e.g. 5 trajectories of 1000 steps in a
    5,000-pair batch). GAIL gets the same sampler, so paired runs see batches of equal size.
    """

    alpha: float = 0.9
    lam: float = 0.5
    gamma: float = 0.995
    gae_lambda: float = 0.97
    batch_steps: int = 50_000
    min_trajectories: int | None = None
    n_envs: int = 8
    hidden: tuple[int, ...] = (100, 100)
    max_kl: float = 0.01
    cg_damping: float = 0.1
    fvp_fraction: float = 0.1
    disc_lr: float = 0.01
    disc_steps: int = 1
    disc_entropy: float = 0.001
    disc_cvar_weight: float = 1.0
    expert_subsample: int = 20
    nu_lr: float = 0.01
    nu_mode: str = "var"
    vf_lr: float = 1e-3
    vf_epochs: int = 3
    vf_minibatch: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie strictly between 0 and 1, got {self.alpha}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0 (0 is GAIL), got {self.lam}")
        if not 0 < self.gamma < 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError("gamma must lie in (0, 1) and gae_lambda in [0, 1]")
        if self.batch_steps < 1 or self.n_envs < 1:
            raise ValueError("batch_steps and n_envs must be >= 1")
        if self.min_trajectories is None:
            self.min_trajectories = math.ceil(round(2.0 / (1.0 - self.alpha), 9))
        if self.min_trajectories < 1:
            raise ValueError(f"min_trajectories must be >= 1, got {self.min_trajectories}")
        if self.lam > 0 and self.min_trajectories < 1.0 / (1.0 - self.alpha):
            raise ValueError(f"min_trajectories must be >= 1 / (1 - alpha) = {1.0 / (1.0 - self.alpha):g} for RAIL "
                             f"(lam > 0), else the batch VaR is the largest cost and the tail term is 0; got "
                             f"{self.min_trajectories}")
        if self.nu_mode not in NU_MODES:
            raise ValueError(f"nu_mode must be 'var' (nu = batch VaR, the exact minimizer) or 'gradient' (the "
                             f"authors' gradient descent on nu), got {self.nu_mode!r}")
        self.hidden = tuple(int(h) for h in self.hidden)

    @property
    def algo(self) -> str:
        return "gail" if self.lam == 0 else "rail"


def gae(rewards: np.ndarray, values: np.ndarray, lengths: np.ndarray, bootstrap: np.ndarray, gamma: float,
        lam: float) -> np.ndarray:
    """Generalized advantage estimates for back-to-back episodes.

    ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)`` with ``V(s_T) = bootstrap_j`` after the last step
    (0 for a terminated episode, ``V(final_obs)`` for one cut by the time limit), then
    ``A_t = sum_k (gamma lam)^k delta_{t+k}`` within the episode.
    """
    adv = np.empty_like(values, dtype=np.float64)
    start = 0
    for n, boot in zip(lengths, bootstrap):
        v = values[start:start + n].astype(np.float64)
        nxt = np.append(v[1:], boot)
        delta = rewards[start:start + n] + gamma * nxt - v
        adv[start:start + n] = scipy.signal.lfilter([1.0], [1.0, -gamma * lam], delta[::-1])[::-1]
        start += n
    return adv


class RAIL:
    """GAIL/RAIL learner for one gymnasium task (see the module docstring)."""

    def __init__(self, env_id: str, expert: ExpertTrajectories, config: RAILConfig | None = None, *, seed: int = 0,
                 device: str = "cpu") -> None:
        self.config = config or RAILConfig()
        self.env_id, self.seed, self.device = env_id, int(seed), torch.device(device)
        obs_dim, act_dim = space_dims(env_id)
        expert.check_spaces(obs_dim, act_dim, env_id)
        if expert.env_id and expert.env_id != env_id:
            raise ValueError(f"expert trajectories were recorded on {expert.env_id!r}, not on env {env_id!r}")
        self.expert = expert
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.policy = GaussianPolicy(obs_dim, act_dim, cfg.hidden).to(self.device)
            self.value = ValueFunction(obs_dim, cfg.hidden).to(self.device)
            self.disc = Discriminator(obs_dim, act_dim, cfg.hidden).to(self.device)
        # observation normalisation fitted once on all expert observations (as in the RAIL code)
        mask = np.arange(expert.obs.shape[1])[None, :] < expert.lengths[:, None]
        expert_obs = expert.obs[mask]
        self.policy.obs_norm.fit(expert_obs)
        self.value.obs_norm.fit(expert_obs)
        self.rng = np.random.default_rng(self.seed)
        ex_obs, ex_act = expert.pairs(subsample=cfg.expert_subsample, rng=self.rng)
        self.expert_obs = torch.as_tensor(ex_obs, device=self.device)
        self.expert_actions = torch.as_tensor(ex_act, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=cfg.vf_lr)
        self.nu = float(np.random.default_rng([self.seed, 0x4E55]).random())  # nu_0 ~ U[0, 1), own stream
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.metadata: dict[str, Any] = {}  # free-form, saved with checkpoints (e.g. the expert file)
        self._envs = None

    # ----------------------------------------------------------------------------------- rollouts
    @property
    def envs(self):
        if self._envs is None:
            self._envs = make_vec_env(self.env_id, self.config.n_envs, self.seed)
        return self._envs

    def close(self) -> None:
        if self._envs is not None:
            self._envs.close()
            self._envs = None

    def act(self, obs: np.ndarray, *, deterministic: bool = False) -> np.ndarray:
        """Actions for a batch of observations (samples from the policy unless deterministic)."""
        o = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=self.device)
        return self.policy.act(o, deterministic=deterministic, generator=self.generator).cpu().numpy()

    def collect(self, progress: Callable[[int], None] | None = None) -> RolloutBatch:
        """Step 1: complete trajectories (at least ``batch_steps`` pairs and ``min_trajectories`` of them), env
        seeds fixed by the iteration."""
        return collect(self.envs, self.act, min_steps=self.config.batch_steps,
                       min_episodes=self.config.min_trajectories, progress=progress,
                       seed=derive_seed(self.seed, self.iteration * self.config.n_envs))

    # ------------------------------------------------------------------------------------- update
    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x, device=self.device)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Steps 2-7 on one batch; returns the iteration's statistics."""
        cfg = self.config
        obs, actions = self._tensor(batch.obs), self._tensor(batch.actions)
        env_actions = self._tensor(batch.env_actions)
        # 2. surrogate rewards, values, GAE
        with torch.no_grad():
            rewards = self.disc.reward(obs, env_actions).double().cpu().numpy()
            values = self.value(obs).double().cpu().numpy()
            final_values = self.value(self._tensor(batch.final_obs)).double().cpu().numpy()
        bootstrap = np.where(batch.terminated, 0.0, final_values)
        adv = gae(rewards, values, batch.lengths, bootstrap, cfg.gamma, cfg.gae_lambda)
        returns = adv + values
        # 3. trajectory costs under the learned cost, nu, tail weights, nu gradient
        costs = discounted_trajectory_costs(rewards, batch.lengths, cfg.gamma)
        empirical_var = value_at_risk(costs, cfg.alpha)
        nu = self.nu if cfg.nu_mode == "gradient" else empirical_var
        w_traj = tail_weights(costs, nu, alpha=cfg.alpha, lam=cfg.lam)
        g_nu = nu_gradient(costs, nu, alpha=cfg.alpha, lam=cfg.lam)
        # 4. TRPO step on mean[rho (A - w)]; A and w share one scale (which leaves the step unchanged)
        scale = adv.std() + 1e-8
        a_scaled = self._tensor(((adv - adv.mean()) / scale).astype(np.float32))
        w = self._tensor(np.repeat(w_traj / scale, batch.lengths).astype(np.float32))
        pstats = trpo_step(self.policy, obs, actions, a_scaled, tail_weights=w, max_kl=cfg.max_kl,
                           damping=cfg.cg_damping, fvp_fraction=cfg.fvp_fraction, generator=self.generator)
        # 5. discriminator step on its share of J, expert pairs resampled to the policy's count
        discount = discount_weights(batch.lengths, cfg.gamma)
        horizon = float(discount.sum()) / batch.episodes  # h = mean_j sum_t gamma^t
        cvar = TrajectoryCVaR(self._tensor(batch.episode_index), self._tensor(discount.astype(np.float32)),
                              batch.episodes, float(nu), cfg.alpha, cfg.disc_cvar_weight * cfg.lam / horizon)
        idx = self._tensor(self.rng.integers(0, self.expert_obs.shape[0], size=batch.steps))
        dstats = self.disc.update(self.disc_opt, obs, env_actions, self.expert_obs[idx], self.expert_actions[idx],
                                  steps=cfg.disc_steps, entropy_weight=cfg.disc_entropy, cvar=cvar)
        # 6. value function
        vloss = self.value.fit(obs, self._tensor(returns.astype(np.float32)), self.value_opt, epochs=cfg.vf_epochs,
                               minibatch=cfg.vf_minibatch, generator=self.generator)
        # 7. the authors' VaR step (nu_mode "var" set nu to the minimizer in step 3)
        self.nu = nu - cfg.nu_lr * g_nu if cfg.nu_mode == "gradient" else nu
        true_returns = batch.episode_returns()
        stats = {
            "iteration": self.iteration, "steps": batch.steps, "episodes": batch.episodes,
            "true_return_mean": float(true_returns.mean()), "true_return_min": float(true_returns.min()),
            "episode_length_mean": float(batch.lengths.mean()), "surrogate_reward_mean": float(rewards.mean()),
            "traj_cost_mean": float(costs.mean()), "traj_cost_var": empirical_var, "nu": nu, "nu_next": self.nu,
            "g_nu": g_nu, "tail_fraction": float(np.mean(costs >= nu)),
            "tail_fraction_strict": float(np.mean(costs > nu)), "tail_weight_mean": float(w_traj.mean()),
            "value_loss": vloss, **pstats, **dstats,
        }
        self.iteration += 1
        self.history.append(stats)
        return stats

    def iterate(self, progress: Callable[[int], None] | None = None) -> dict[str, float]:
        """One full iteration: :meth:`collect` then :meth:`update`."""
        return self.update(self.collect(progress))

    @property
    def total_steps(self) -> int:
        return int(sum(h["steps"] for h in self.history))

    def learn(self, total_steps: int, *, checkpoint: str | Path | None = None, checkpoint_every: int = 1,
              resume: bool = False, eval_every: int = 0, eval_episodes: int = 10, progress: bool = True,
              desc: str | None = None, on_iteration: Callable[[dict[str, float]], None] | None = None) -> list[dict]:
        """Iterate until ``total_steps`` environment steps have been collected; returns the history.

        ``checkpoint`` is written atomically (:func:`leantrain.storage.save_torch`) every
        ``checkpoint_every`` iterations and at the end; with ``resume`` an existing checkpoint is
        loaded first and the run continues exactly where it stopped. Every ``eval_every``
        iterations (0: never) the policy is scored on ``eval_episodes`` episodes of true cost,
        with its own random stream, so evaluation does not change the training run.
        """
        from tqdm.auto import tqdm

        from leantrain.imitation.evaluation import evaluate_policy
        from leantrain.storage import load_torch, save_torch

        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if checkpoint is not None and resume and Path(checkpoint).is_file():
            self.load_state_dict(load_torch(checkpoint)["algo"])
        bar = tqdm(total=total_steps, initial=min(self.total_steps, total_steps), unit="step", disable=not progress,
                   desc=desc or f"{self.config.algo} {self.env_id}")
        try:
            while self.total_steps < total_steps:
                stats = self.iterate()
                if eval_every and (self.iteration % eval_every == 0 or self.total_steps >= total_steps):
                    ev = evaluate_policy(policy_actor(self.policy, seed=self.seed * 7 + self.iteration), self.env_id,
                                         episodes=eval_episodes, seed=self.seed, alpha=self.config.alpha)
                    stats.update({f"eval_{k}": v for k, v in ev["summary"].items()})
                bar.update(min(stats["steps"], total_steps - bar.n))
                bar.set_postfix(ret=f"{stats['true_return_mean']:.1f}", nu=f"{self.nu:.3f}")
                if on_iteration is not None:
                    on_iteration(stats)
                if checkpoint is not None and (self.iteration % checkpoint_every == 0 or self.total_steps >= total_steps):
                    save_torch(checkpoint, {"algo": self.state_dict()})
        finally:
            bar.close()
        return self.history

    # ---------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (networks, optimizers, nu, random streams, history)."""
        return {
            "env_id": self.env_id, "seed": self.seed, "config": dataclasses.asdict(self.config),
            "iteration": self.iteration, "nu": self.nu, "history": list(self.history),
            "policy": self.policy.state_dict(), "value": self.value.state_dict(), "disc": self.disc.state_dict(),
            "disc_opt": self.disc_opt.state_dict(), "value_opt": self.value_opt.state_dict(),
            "generator": self.generator.get_state(), "rng": self.rng.bit_generator.state, "metadata": dict(self.metadata),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["env_id"] != self.env_id:
            raise ValueError(f"checkpoint is for env {state['env_id']!r}, not {self.env_id!r}")
        self.policy.load_state_dict(state["policy"])
        self.value.load_state_dict(state["value"])
        self.disc.load_state_dict(state["disc"])
        self.disc_opt.load_state_dict(state["disc_opt"])
        self.value_opt.load_state_dict(state["value_opt"])
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
        self.iteration, self.nu = int(state["iteration"]), float(state["nu"])
        self.history = list(state["history"])
        self.metadata = dict(state.get("metadata", {}))

    @staticmethod
    def config_from_state(state: dict[str, Any]) -> RAILConfig:
        return RAILConfig(**state["config"])
