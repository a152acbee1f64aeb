"""Environments for imitation: gymnasium tasks, vectorized, and the rollout collector.

Tasks are plain gymnasium ids (``Hopper-v5``, ``InvertedPendulum-v5``, ``Pendulum-v1``, ...) with a
continuous (Box) action space; MuJoCo runs headless (no render mode is ever requested).
:func:`make_vec_env` builds a :class:`gymnasium.vector.SyncVectorEnv` in ``SAME_STEP`` autoreset
mode: when a sub-environment's episode ends, ``step`` returns the *next* episode's first
observation and puts the terminal one in ``info["final_obs"]``.

:func:`collect` is the one rollout loop of the package; training batches, evaluation episodes and
expert demonstrations all come from it. It only ever keeps *complete* episodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from leantrain.imitation.trajectories import RolloutBatch

__all__ = ["TaskSpec", "TASKS", "task", "make_env", "make_vec_env", "collect", "space_dims"]


@dataclass(frozen=True)
class TaskSpec:
    """Per-task settings. ``lam`` and ``iterations`` are the RAIL run scripts' values where they exist."""

    env_id: str
    lam: float
    iterations: int
    expert_trajectories: int
    expert_algo: str
    expert_steps: int
    paper: bool  # True when lam/iterations/trajectories come from the authors' run scripts


TASKS: dict[str, TaskSpec] = {
    "Hopper-v5": TaskSpec("Hopper-v5", 0.5, 501, 25, "sac", 1_000_000, True),
    "HalfCheetah-v5": TaskSpec("HalfCheetah-v5", 0.5, 501, 25, "sac", 1_000_000, True),
    "Walker2d-v5": TaskSpec("Walker2d-v5", 0.25, 501, 25, "sac", 1_000_000, True),
    "Reacher-v5": TaskSpec("Reacher-v5", 0.25, 201, 18, "sac", 200_000, True),
    "Humanoid-v5": TaskSpec("Humanoid-v5", 0.75, 1501, 240, "sac", 2_000_000, True),
    # fast tasks for quick runs: not in the paper, so lambda is our choice (the Hopper value)
    "InvertedPendulum-v5": TaskSpec("InvertedPendulum-v5", 0.5, 40, 25, "ppo", 100_000, False),
    "Pendulum-v1": TaskSpec("Pendulum-v1", 0.5, 200, 25, "sac", 20_000, False),
}


def task(env_id: str) -> TaskSpec:
    """Settings for ``env_id``; unknown-but-valid gymnasium Box tasks get generic defaults."""
    if env_id in TASKS:
        return TASKS[env_id]
    space_dims(env_id)  # raises a clear error for ids gymnasium does not know
    return TaskSpec(env_id, 0.5, 200, 25, "sac", 200_000, False)


def make_env(env_id: str) -> gym.Env:
    """One headless environment; ValueError for unknown ids or non-Box spaces."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as exc:
        raise ValueError(f"env must be a registered gymnasium id such as 'Hopper-v5' or 'Pendulum-v1', got "
                         f"{env_id!r} ({exc})") from exc
    if not isinstance(env.action_space, gym.spaces.Box) or not isinstance(env.observation_space, gym.spaces.Box):
        env.close()
        raise ValueError(f"env {env_id!r} must have Box observation and action spaces (continuous control)")
    return env


def space_dims(env_id: str) -> tuple[int, int]:
    """``(obs_dim, act_dim)`` of a task."""
    env = make_env(env_id)
    dims = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
    env.close()
    return dims


def make_vec_env(env_id: str, n_envs: int, seed: int) -> gym.vector.VectorEnv:
    """``n_envs`` copies of ``env_id`` stepped in this process; sub-env ``i`` is seeded ``seed + i``."""
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    make_env(env_id).close()
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * n_envs,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.reset(seed=seed)
    envs.action_space.seed(seed)
    return envs


def collect(envs: gym.vector.VectorEnv, act: Callable[[np.ndarray], np.ndarray], *, min_steps: int | None = None,
            episodes: int | None = None, min_episodes: int = 1, seed: int | None = None,
            progress: Callable[[int], None] | None = None) -> RolloutBatch:
    """Run ``act`` in ``envs`` and return complete episodes.

    Exactly one of:

    - ``min_steps``: start new episodes while the steps of finished plus running episodes are below
      ``min_steps`` or fewer than ``min_episodes`` episodes have been started, then let the running
      ones finish (the GAIL/RAIL sampler: at least ``min_steps`` state-action pairs and
      ``min_episodes`` trajectories, whole trajectories only);
    - ``episodes``: exactly this many episodes, assigned to sub-environments up front
      (``episodes // n + (i < episodes % n)`` each), so that the sample is not biased towards short
      episodes.

    ``act(obs[n_envs, obs_dim]) -> actions[n_envs, act_dim]`` returns the policy's raw samples; the
    environment receives them clipped to the action Box. The environments are reset at the start
    (with ``seed`` when given, else continuing their random streams), so every call starts fresh
    episodes. ``progress(n)`` is called with the length of every kept episode as it finishes.
    """
    if (min_steps is None) == (episodes is None):
        raise ValueError("give exactly one of min_steps or episodes")
    if min_steps is not None and min_steps < 1:
        raise ValueError(f"min_steps must be >= 1, got {min_steps}")
    if min_episodes < 1:
        raise ValueError(f"min_episodes must be >= 1, got {min_episodes}")
    if episodes is not None and episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    n = envs.num_envs
    low, high = envs.single_action_space.low, envs.single_action_space.high
    quota = None if episodes is None else np.array([episodes // n + (i < episodes % n) for i in range(n)])
    obs, _ = envs.reset(seed=seed)
    live = np.ones(n, bool) if quota is None else quota > 0  # env is inside an episode we keep
    started = live.astype(np.int64)
    ep_start = np.zeros(n, np.int64)
    finished_steps = 0
    steps_obs, steps_act, steps_env_act, steps_rew = [], [], [], []
    segments: list[tuple[int, int, int, bool, np.ndarray]] = []  # (env, t0, t1, terminated, final_obs)
    t = 0
    while live.any():
        a = np.asarray(act(obs), dtype=np.float32).reshape(n, -1)
        a_env = np.clip(a, low, high)
        next_obs, reward, term, trunc, info = envs.step(a_env)
        steps_obs.append(obs)
        steps_act.append(a)
        steps_env_act.append(a_env)
        steps_rew.append(np.asarray(reward, dtype=np.float32))
        t += 1
        done = np.logical_or(term, trunc)
        for i in np.flatnonzero(done):
            if live[i]:
                segments.append((int(i), int(ep_start[i]), t, bool(term[i]), np.asarray(info["final_obs"][i])))
                finished_steps += t - ep_start[i]
                if progress is not None:
                    progress(t - int(ep_start[i]))
            ep_start[i] = t
            if quota is not None:
                live[i] = started[i] < quota[i]
            else:
                running = int(sum(t - ep_start[j] for j in range(n) if live[j] and j != i))
                live[i] = finished_steps + running < min_steps or int(started.sum()) < min_episodes
            started[i] += int(live[i])
        obs = next_obs
    if not segments:
        raise RuntimeError("no episode finished")
    obs_a, act_a = np.stack(steps_obs), np.stack(steps_act)
    env_a, rew_a = np.stack(steps_env_act), np.stack(steps_rew)
    idx_t = np.concatenate([np.arange(t0, t1) for _, t0, t1, _, _ in segments])
    idx_e = np.concatenate([np.full(t1 - t0, e) for e, t0, t1, _, _ in segments])
    return RolloutBatch(
        obs=obs_a[idx_t, idx_e].astype(np.float32), actions=act_a[idx_t, idx_e], env_actions=env_a[idx_t, idx_e],
        rewards=rew_a[idx_t, idx_e], lengths=np.array([t1 - t0 for _, t0, t1, _, _ in segments], np.int64),
        terminated=np.array([s[3] for s in segments], bool),
        final_obs=np.stack([s[4] for s in segments]).astype(np.float32))
