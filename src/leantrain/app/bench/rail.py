"""Benchmark ``rail``: rollout throughput and the cost of RAIL's CVaR term per training iteration.

Rows:

- vectorized rollout collection (:func:`leantrain.imitation.envs.collect`, 8 envs, the Gaussian
  policy batched) against a plain one-environment gymnasium loop with the same policy, in env
  steps/s, on fixed-length tasks (Pendulum-v1: 200 steps, HalfCheetah-v5: 1000 steps) so that the
  work per call is exact;
- one RAIL update (steps 2-7) against one GAIL update on the same batch, and one full iteration
  (collection + update) of each, every call starting from the same saved state so that both
  collect the identical batch. RAIL runs with its default settings (``nu`` at the batch's
  empirical VaR, so ~10% of trajectories are weighted); the check is RAIL / GAIL <= 1.1. The iteration
  is also timed in process CPU time with alternating order (ABBA), which a shared machine
  disturbs much less than wall-clock time.
"""

from __future__ import annotations

import copy
import statistics
import time

import numpy as np
import torch

from leantrain.app.bench import check, compare
from leantrain.app.registry import benchmark


def _demos(env_id: str, n_envs: int = 4):
    """Stand-in demonstrations from a random policy (timing does not depend on their quality)."""
    from leantrain.imitation.envs import collect, make_vec_env

    envs = make_vec_env(env_id, n_envs, 123)
    rng = np.random.default_rng(0)
    try:
        act_dim = envs.single_action_space.shape[0]
        batch = collect(envs, lambda o: rng.normal(size=(o.shape[0], act_dim)).astype(np.float32), episodes=n_envs)
        return batch.to_expert(env_id)
    finally:
        envs.close()


def _rollout_row(env_id: str, episodes: int, length: int, device: str) -> dict:
    import gymnasium as gym

    from leantrain.imitation.envs import collect, make_vec_env, space_dims
    from leantrain.imitation.policies import GaussianPolicy, policy_actor

    obs_dim, act_dim = space_dims(env_id)
    torch.manual_seed(0)
    policy = GaussianPolicy(obs_dim, act_dim).to(device)
    act = policy_actor(policy, seed=0)
    envs = make_vec_env(env_id, 8, 0)
    env = gym.make(env_id)
    env.reset(seed=0)
    low, high = env.action_space.low, env.action_space.high

    def vectorized() -> None:
        b = collect(envs, act, episodes=episodes)
        assert b.steps == episodes * length

    def single() -> None:
        n = 0
        for _ in range(episodes):
            obs, _ = env.reset()
            done = False
            while not done:
                a = act(obs[None, :])[0]
                obs, _, term, trunc, _ = env.step(np.clip(a, low, high))
                done = term or trunc
                n += 1
        assert n == episodes * length

    try:
        return compare(f"{env_id} rollout collection, 8 vectorized envs", vectorized, single,
                       baseline_name="one env, plain gymnasium loop", repeats=3, warmup=1, min_sample_s=0.0,
                       device=device, work=episodes * length, work_unit="env steps")
    finally:
        envs.close()
        env.close()


def _abba_cpu_row(name: str, candidate, baseline, *, pairs: int) -> dict:
    """Median process CPU time of each, alternating the order (c b, b c, ...) to cancel order effects.

    On a machine shared with other jobs, wall-clock samples mostly measure the scheduler; CPU time
    of this process does not (it still carries cache and frequency noise).
    """
    times: dict[str, list[float]] = {"c": [], "b": []}
    for i in range(pairs):
        for key, fn in (("c", candidate), ("b", baseline)) if i % 2 == 0 else (("b", baseline), ("c", candidate)):
            t0 = time.process_time()
            fn()
            times[key].append(time.process_time() - t0)
    c, b = statistics.median(times["c"]), statistics.median(times["b"])
    return {"name": name, "baseline": "GAIL iteration", "candidate_median_s": c, "baseline_median_s": b, "ratio": c / b,
            "repeats": pairs, "clock": "process_time"}


@benchmark("rail", description="RAIL: vectorized rollout steps/s; time per iteration of RAIL vs GAIL (target <= 1.1)")
def run(quick: bool = False, device: str = "cpu") -> dict:
    from leantrain.imitation.rail import RAIL, RAILConfig

    rows = [_rollout_row("Pendulum-v1", 8 if quick else 16, 200, device)]
    if not quick:
        rows.append(_rollout_row("HalfCheetah-v5", 8, 1000, device))

    env_id = "InvertedPendulum-v5"
    demos = _demos(env_id)
    batch_steps = 2000 if quick else 5000
    gail = RAIL(env_id, demos, RAILConfig(lam=0.0, batch_steps=batch_steps, n_envs=8), seed=0, device=device)
    rail = RAIL(env_id, demos, RAILConfig(lam=0.5, batch_steps=batch_steps, n_envs=8), seed=0,
                device=device)
    batch = gail.collect()  # a fixed batch of the untrained policy: many short trajectories
    # every timed call starts from the same state (networks, optimizers, nu, random streams, iteration), so
    # GAIL and RAIL collect the identical batch and differ only by the CVaR term
    start = copy.deepcopy(gail.state_dict())

    def from_start(algo: RAIL, step):
        def call():
            algo.load_state_dict(start)
            return step()
        return call

    repeats = 3 if quick else 7
    upd = compare(f"update on a {batch.steps}-step batch ({batch.episodes} trajectories)",
                  from_start(rail, lambda: rail.update(batch)), from_start(gail, lambda: gail.update(batch)),
                  baseline_name="GAIL update (lam = 0)", repeats=repeats, warmup=1, min_sample_s=0.0, device=device)
    upd["rail_tail_fraction"] = rail.history[-1]["tail_fraction"]
    it = compare("full iteration (collect + update), same start state", from_start(rail, rail.iterate),
                 from_start(gail, gail.iterate), baseline_name="GAIL iteration", repeats=repeats, warmup=1,
                 min_sample_s=0.0, device=device)
    it["steps_collected"] = [rail.history[-1]["steps"], gail.history[-1]["steps"]]
    cpu = _abba_cpu_row("full iteration, CPU time, ABBA order", from_start(rail, rail.iterate),
                        from_start(gail, gail.iterate), pairs=4 if quick else 8)
    for a in (gail, rail):
        a.close()
    rows += [upd, it, cpu]
    checks = [check("RAIL / GAIL time per update", upd["ratio"], "<=", 1.1),
              check("RAIL / GAIL time per iteration", it["ratio"], "<=", 1.1),
              check("RAIL / GAIL CPU time per iteration (ABBA)", cpu["ratio"], "<=", 1.1),
              check("RAIL tail term active in the timed update (fraction weighted)", upd["rail_tail_fraction"], ">=", 0.05)]
    return {"rows": rows, "checks": checks}
