"""Experts: train one with stable-baselines3, load it, record its demonstrations.

An expert directory holds ``expert.zip`` (the stable-baselines3 model, loadable with
``SAC.load``/``PPO.load``), ``expert.json`` (algorithm, task, steps, seed, evaluation) and
``trajectories.npz`` (``K`` demonstrations in the format of :mod:`leantrain.imitation.trajectories`).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from leantrain.imitation.envs import collect, make_env, make_vec_env
from leantrain.imitation.trajectories import ExpertTrajectories
from leantrain.storage import write_bytes, write_json

__all__ = ["ALGOS", "train_expert", "load_expert", "ExpertPolicy", "record_trajectories", "MODEL_FILE", "META_FILE",
           "TRAJECTORIES_FILE"]

ALGOS = ("sac", "ppo")
MODEL_FILE, META_FILE, TRAJECTORIES_FILE = "expert.zip", "expert.json", "trajectories.npz"


def _algo_class(algo: str):
    import stable_baselines3 as sb3

    classes = {"sac": sb3.SAC, "ppo": sb3.PPO}
    if algo not in classes:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    return classes[algo]


class ExpertPolicy:
    """A stable-baselines3 model as a batch policy ``obs[n, d] -> actions[n, k]``."""

    def __init__(self, model: Any, env_id: str, algo: str) -> None:
        self.model, self.env_id, self.algo = model, env_id, algo

    def __call__(self, obs: np.ndarray, *, deterministic: bool = False) -> np.ndarray:
        actions, _ = self.model.predict(obs, deterministic=deterministic)
        return np.asarray(actions, dtype=np.float32)


def train_expert(env_id: str, steps: int, out: str | Path, *, algo: str = "sac", seed: int = 0, device: str = "cpu",
                 progress: bool = True) -> ExpertPolicy:
    """Train ``algo`` (SB3 defaults) on ``env_id`` for ``steps`` environment steps; write ``out/expert.zip``."""
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cls = _algo_class(algo)
    env = make_env(env_id)

    class _Bar(BaseCallback):
        def _on_training_start(self) -> None:
            self.bar = tqdm(total=steps, desc=f"expert {algo} {env_id}", unit="step", disable=not progress)

        def _on_step(self) -> bool:
            self.bar.update(self.training_env.num_envs)
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    t0 = time.perf_counter()
    model = cls("MlpPolicy", env, seed=seed, device=device, verbose=0)
    model.learn(total_timesteps=steps, callback=_Bar())
    out = Path(out)
    buf = io.BytesIO()
    model.save(buf)
    write_bytes(out / MODEL_FILE, buf.getvalue())
    write_json(out / META_FILE, {"algo": algo, "env_id": env_id, "steps": steps, "seed": seed,
                                 "train_seconds": time.perf_counter() - t0})
    env.close()
    return ExpertPolicy(model, env_id, algo)


def load_expert(path: str | Path, env_id: str | None = None) -> ExpertPolicy:
    """Load ``expert.zip`` (or a directory holding it); the algorithm comes from ``expert.json`` when present."""
    path = Path(path)
    model_path = path / MODEL_FILE if path.is_dir() else path
    if not model_path.is_file():
        raise ValueError(f"expert model {str(model_path)!r} does not exist")
    meta_path = model_path.with_name(META_FILE)
    meta: dict = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"expert metadata file {str(meta_path)!r} is unreadable: {exc}") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"expert metadata file {str(meta_path)!r} holds a JSON {type(meta).__name__}, "
                             "expected an object with 'algo' and 'env_id'")
    algos = [meta["algo"]] if "algo" in meta else list(ALGOS)
    task = env_id or meta.get("env_id")
    if task is None:
        raise ValueError(f"{model_path}: no expert.json beside it; give the env id")
    errors = []
    for algo in algos:
        cls = _algo_class(algo)
        replacements = _unpickled_replacements(model_path, cls, task)
        try:
            model = cls.load(model_path, device="cpu", custom_objects=replacements)
        except Exception as exc:  # SB3 raises many types for the wrong class or a corrupt file
            errors.append(f"{algo}: {exc}")
            continue
        return ExpertPolicy(model, task, algo)
    raise ValueError(f"{model_path}: not a loadable stable-baselines3 {'/'.join(algos)} model ({'; '.join(errors)})")


def _unpickled_replacements(model_path: Path, cls: Any, env_id: str) -> dict[str, Any]:
    """Plain replacements for every cloudpickled entry of an SB3 ``expert.zip``, so that loading runs no code from it.

    SB3 stores some attributes (spaces, policy class, schedules, buffers) as base64 cloudpickle in
    the archive's ``data`` JSON and unpickles them on load unless ``custom_objects`` supplies them.
    We supply each: the spaces of ``env_id``'s environment, the default ``MlpPolicy`` class, and
    plain values for the training-only entries (an expert is only used to predict). An entry we do
    not know is refused rather than unpickled. (The weights themselves SB3 reads with
    ``torch.load(weights_only=True)``.)
    """
    import zipfile

    from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

    try:
        with zipfile.ZipFile(model_path) as archive:
            data = json.loads(archive.read("data"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"expert model {str(model_path)!r} is not a stable-baselines3 archive: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"expert model {str(model_path)!r}: its 'data' entry is not a JSON object")
    pickled = [k for k, v in data.items() if isinstance(v, dict) and ":serialized:" in v]
    env = make_env(env_id)
    try:
        known: dict[str, Any] = {
            "observation_space": env.observation_space, "action_space": env.action_space,
            "policy_class": cls.policy_aliases["MlpPolicy"],
            "lr_schedule": _constant_schedule(float(data.get("learning_rate", 3e-4))),
            "clip_range": 0.2, "clip_range_vf": None,
            "_last_obs": None, "_last_original_obs": None, "_last_episode_starts": None,
            "ep_info_buffer": None, "ep_success_buffer": None, "rollout_buffer_class": None,
            "replay_buffer_class": None, "action_noise": None, "learning_rate": 3e-4,
            "train_freq": TrainFreq(1, TrainFrequencyUnit.STEP),
        }
    finally:
        env.close()
    unknown = [k for k in pickled if k not in known]
    if unknown:
        raise ValueError(f"expert model {str(model_path)!r} holds pickled Python objects {unknown} that leantrain "
                         "does not unpickle (only models saved by `leantrain rail expert` / SB3 defaults load)")
    return {k: known[k] for k in pickled}


def _constant_schedule(value: float) -> Any:
    return lambda _progress: value


def record_trajectories(expert: ExpertPolicy, count: int = 25, *, seed: int = 0, deterministic: bool = False,
                        n_envs: int | None = None) -> ExpertTrajectories:
    """Roll out ``count`` complete expert episodes (stochastic by default, as the RAIL scripts do)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    envs = make_vec_env(expert.env_id, n_envs or min(count, 25), seed)
    try:
        batch = collect(envs, lambda o: expert(o, deterministic=deterministic), episodes=count)
    finally:
        envs.close()
    return batch.to_expert(expert.env_id)
