"""Trajectory containers: the rollout buffer of one iteration and expert demonstrations on disk.

:class:`RolloutBatch` holds complete episodes stored back to back (episode-major, flat over
steps), which is what RAIL's trajectory-level term needs: every trajectory's cost ``R_j`` is a
sum over *all* of its steps.

Expert trajectory file format (``.npz``, version 1), read by :func:`load_trajectories` and written
by :func:`save_trajectories`. ``K`` trajectories, padded to the longest length ``T``:

============  =====================  ======================================================
key           dtype, shape           meaning
============  =====================  ======================================================
obs           float32 (K, T, obs)    observation ``s_t`` before action ``a_t``; zero past length
actions       float32 (K, T, act)    action executed in the environment (inside its Box)
lengths       int64   (K,)           trajectory lengths ``1 <= T_j <= T``
rewards       float32 (K, T)         optional: environment rewards ``r_t`` (for the expert's return)
terminated    bool    (K,)           optional: episode ended by termination (not the time limit)
env_id        str     ()             optional: gymnasium id of the task, e.g. ``"Hopper-v5"``
format        str     ()             optional: ``"leantrain.rail.trajectories"``
version       int64   ()             optional: ``1``
============  =====================  ======================================================

The layout mirrors GAIL/RAIL's ``obs_B_T_Do``, ``a_B_T_Da``, ``r_B_T``, ``len_B`` datasets. Files
are read with ``allow_pickle=False``; anything malformed raises ``ValueError`` saying what is wrong.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leantrain.storage import write_bytes

__all__ = ["RolloutBatch", "ExpertTrajectories", "save_trajectories", "load_trajectories", "FORMAT_NAME",
           "FORMAT_VERSION"]

FORMAT_NAME = "leantrain.rail.trajectories"
FORMAT_VERSION = 1


@dataclass
class RolloutBatch:
    """Complete episodes, flat and episode-major.

    Per step (``N`` rows): ``obs`` (N, obs_dim), ``actions`` the policy's raw samples (used for
    log-likelihoods), ``env_actions`` the same clipped to the action Box (what the environment and
    the discriminator see), ``rewards`` the true environment rewards. Per episode (``E`` rows):
    ``lengths``, ``terminated`` (False means cut by the time limit), ``final_obs`` (the observation
    after the last step, for bootstrapping truncated episodes).
    """

    obs: np.ndarray
    actions: np.ndarray
    env_actions: np.ndarray
    rewards: np.ndarray
    lengths: np.ndarray
    terminated: np.ndarray
    final_obs: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.lengths.sum())

    @property
    def episodes(self) -> int:
        return int(self.lengths.size)

    @property
    def starts(self) -> np.ndarray:
        """Index of each episode's first step in the flat arrays."""
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    @property
    def episode_index(self) -> np.ndarray:
        """For every step, the index of its episode."""
        return np.repeat(np.arange(self.episodes), self.lengths)

    def episode_returns(self) -> np.ndarray:
        """Undiscounted true returns ``sum_t r_t`` per episode (float64)."""
        return np.add.reduceat(self.rewards.astype(np.float64), self.starts) if self.episodes else np.zeros(0)

    def to_expert(self, env_id: str) -> ExpertTrajectories:
        """Pad into an :class:`ExpertTrajectories` (the on-disk layout)."""
        k, t = self.episodes, int(self.lengths.max())
        obs = np.zeros((k, t, self.obs.shape[1]), np.float32)
        act = np.zeros((k, t, self.env_actions.shape[1]), np.float32)
        rew = np.zeros((k, t), np.float32)
        for j, (s, n) in enumerate(zip(self.starts, self.lengths)):
            obs[j, :n], act[j, :n], rew[j, :n] = self.obs[s:s + n], self.env_actions[s:s + n], self.rewards[s:s + n]
        return ExpertTrajectories(obs, act, self.lengths.astype(np.int64), rew, self.terminated.astype(bool), env_id)


@dataclass
class ExpertTrajectories:
    """Expert demonstrations in the padded layout of the ``.npz`` format (see module docstring)."""

    obs: np.ndarray
    actions: np.ndarray
    lengths: np.ndarray
    rewards: np.ndarray | None = None
    terminated: np.ndarray | None = None
    env_id: str | None = None

    def __post_init__(self) -> None:
        _validate(self, "expert trajectories")

    @property
    def count(self) -> int:
        return int(self.lengths.size)

    @property
    def obs_dim(self) -> int:
        return int(self.obs.shape[2])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[2])

    def returns(self) -> np.ndarray | None:
        """Undiscounted return of each trajectory, or None when the file has no rewards."""
        if self.rewards is None:
            return None
        mask = np.arange(self.rewards.shape[1])[None, :] < self.lengths[:, None]
        return (self.rewards.astype(np.float64) * mask).sum(axis=1)

    def pairs(self, *, subsample: int = 1, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Flat ``(obs, actions)`` pairs, keeping every ``subsample``-th step of each trajectory.

        With ``subsample > 1`` each trajectory starts at a random offset in ``[0, subsample)``
        (GAIL/RAIL use every 20th transition, which decorrelates the expert pairs).
        """
        if subsample < 1:
            raise ValueError(f"subsample must be >= 1, got {subsample}")
        rng = rng or np.random.default_rng(0)
        offsets = rng.integers(0, subsample, size=self.count) if subsample > 1 else np.zeros(self.count, np.int64)
        obs, act = [], []
        for j, n in enumerate(self.lengths):
            idx = np.arange(min(int(offsets[j]), int(n) - 1), int(n), subsample)
            obs.append(self.obs[j, idx])
            act.append(self.actions[j, idx])
        return np.concatenate(obs).astype(np.float32), np.concatenate(act).astype(np.float32)

    def check_spaces(self, obs_dim: int, act_dim: int, env_id: str | None = None) -> None:
        """Raise ValueError when the demonstrations do not fit an environment's spaces."""
        if self.obs_dim != obs_dim or self.act_dim != act_dim:
            where = f" {env_id}" if env_id else ""
            raise ValueError(f"expert trajectories have obs dim {self.obs_dim} and action dim {self.act_dim}, "
                             f"but the environment{where} has obs dim {obs_dim} and action dim {act_dim}")


def _validate(t: ExpertTrajectories, source: str) -> None:
    def bad(msg: str) -> ValueError:
        return ValueError(f"{source}: {msg}")

    for name in ("obs", "actions"):
        a = getattr(t, name)
        if not isinstance(a, np.ndarray) or a.ndim != 3:
            raise bad(f"'{name}' must be a 3-D array (K, T, dim), got shape {getattr(a, 'shape', None)}")
        if not np.issubdtype(a.dtype, np.floating):
            raise bad(f"'{name}' must be floating point, got dtype {a.dtype}")
    if not isinstance(t.lengths, np.ndarray) or t.lengths.ndim != 1 or not np.issubdtype(t.lengths.dtype, np.integer):
        raise bad(f"'lengths' must be a 1-D integer array (K,), got {getattr(t.lengths, 'dtype', None)} "
                  f"shape {getattr(t.lengths, 'shape', None)}")
    k, tmax = t.obs.shape[:2]
    if k == 0 or tmax == 0:
        raise bad(f"holds no trajectories (obs shape {t.obs.shape})")
    if t.actions.shape[:2] != (k, tmax):
        raise bad(f"'actions' shape {t.actions.shape} does not match 'obs' shape {t.obs.shape} in (K, T)")
    if t.lengths.shape != (k,):
        raise bad(f"'lengths' must have K={k} entries, got {t.lengths.shape[0]}")
    if np.any(t.lengths < 1) or np.any(t.lengths > tmax):
        raise bad(f"every length must lie in [1, {tmax}], got min {int(t.lengths.min())} max {int(t.lengths.max())}")
    mask = np.arange(tmax)[None, :] < t.lengths[:, None]
    if not (np.all(np.isfinite(t.obs[mask])) and np.all(np.isfinite(t.actions[mask]))):
        raise bad("'obs' and 'actions' must be finite (no NaN or Inf) within each trajectory's length")
    if t.rewards is not None:
        if not isinstance(t.rewards, np.ndarray) or t.rewards.shape != (k, tmax):
            raise bad(f"'rewards' must have shape (K, T) = {(k, tmax)}, got {getattr(t.rewards, 'shape', None)}")
        if not np.all(np.isfinite(t.rewards[mask])):
            raise bad("'rewards' must be finite within each trajectory's length")
    if t.terminated is not None and (not isinstance(t.terminated, np.ndarray) or t.terminated.shape != (k,)):
        raise bad(f"'terminated' must be a boolean array of K={k} entries")


def save_trajectories(path: str | Path, traj: ExpertTrajectories) -> Path:
    """Write ``traj`` as a compressed ``.npz`` (format version 1), atomically."""
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT_NAME), "version": np.array(FORMAT_VERSION, np.int64),
        "obs": traj.obs.astype(np.float32), "actions": traj.actions.astype(np.float32),
        "lengths": traj.lengths.astype(np.int64),
    }
    if traj.rewards is not None:
        arrays["rewards"] = traj.rewards.astype(np.float32)
    if traj.terminated is not None:
        arrays["terminated"] = traj.terminated.astype(bool)
    if traj.env_id:
        arrays["env_id"] = np.array(traj.env_id)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes(path, buf.getvalue())


def load_trajectories(path: str | Path) -> ExpertTrajectories:
    """Read and validate an expert ``.npz``; every malformation is a ValueError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"expert trajectory file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    except ValueError as exc:  # numpy refuses object arrays without pickle
        raise ValueError(f"{path}: unsupported content ({exc})") from exc
    missing = [k for k in ("obs", "actions", "lengths") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing required array(s) {missing}; a trajectory file needs 'obs', 'actions', "
                         f"'lengths' (see docs/rail.md)")
    if "format" in data and str(data["format"]) != FORMAT_NAME:
        raise ValueError(f"{path}: 'format' is {str(data['format'])!r}, expected {FORMAT_NAME!r}")
    if "version" in data and int(data["version"]) != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {int(data['version'])} is not supported (expected {FORMAT_VERSION})")
    terminated = data.get("terminated")
    if terminated is not None and terminated.dtype != bool:
        raise ValueError(f"{path}: 'terminated' must be boolean, got {terminated.dtype}")
    env_id = str(data["env_id"]) if "env_id" in data else None
    try:
        return ExpertTrajectories(data["obs"], data["actions"], data["lengths"], data.get("rewards"), terminated, env_id)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
