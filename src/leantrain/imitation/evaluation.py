"""Evaluation on the true environment cost: ``cost = -(undiscounted episode return)``.

RAIL's evaluation (method notes): 50 rollouts per agent, mean/std/VaR_0.9/CVaR_0.9 of the cost,
the tail risk of each agent relative to the expert, ``rel_X = 100 (X_expert - X_agent) / |X_expert|``,
and the gain in reliability ``GR_X = rel_X(RAIL) - rel_X(GAIL)`` for ``X`` in {VaR, CVaR}.
Policies are *sampled* (not their mean action), as in the authors' run scripts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leantrain.imitation.envs import collect, make_vec_env, space_dims
from leantrain.imitation.policies import GaussianPolicy, policy_actor
from leantrain.imitation.risk import gain_in_reliability, relative_tail_risk, summarize_costs
from leantrain.storage import load_torch

__all__ = ["evaluate_policy", "load_agent", "tail_report", "cost_histograms", "EVAL_SEED_OFFSET"]

EVAL_SEED_OFFSET = 7_919_000  # evaluation episodes never reuse a training seed


def evaluate_policy(act: Callable[[np.ndarray], np.ndarray], env_id: str, *, episodes: int = 50, seed: int = 0,
                    alpha: float = 0.9, n_envs: int | None = None) -> dict[str, Any]:
    """Run ``episodes`` complete episodes; returns ``{"returns", "costs", "lengths", "summary"}``.

    Episode ``i`` runs in sub-environment ``i mod n_envs``; with the same ``seed`` every agent
    faces the same initial states.
    """
    envs = make_vec_env(env_id, n_envs or min(episodes, 50), EVAL_SEED_OFFSET + seed)
    try:
        batch = collect(envs, act, episodes=episodes)
    finally:
        envs.close()
    returns = batch.episode_returns()
    costs = -returns
    return {"returns": returns.tolist(), "costs": costs.tolist(), "lengths": batch.lengths.tolist(),
            "summary": summarize_costs(costs, alpha).as_dict()}


def load_agent(checkpoint: str | Path | dict[str, Any], *, seed: int = 0,
               deterministic: bool = False) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """A batch policy from a RAIL checkpoint file (``{"algo": state}``) or a :meth:`RAIL.state_dict`.

    Returns the policy and the algorithm state (env id, config, history, metadata).
    """
    state = checkpoint if isinstance(checkpoint, dict) else load_torch(checkpoint)
    if isinstance(state, dict) and isinstance(state.get("algo"), dict):
        state = state["algo"]
    if not isinstance(state, dict) or "policy" not in state or "env_id" not in state:
        raise ValueError("checkpoint is not a leantrain RAIL/GAIL checkpoint (no 'policy'/'env_id' entries)")
    obs_dim, act_dim = space_dims(state["env_id"])
    policy = GaussianPolicy(obs_dim, act_dim, tuple(state["config"]["hidden"]))
    policy.load_state_dict(state["policy"])
    return policy_actor(policy, seed=EVAL_SEED_OFFSET + seed, deterministic=deterministic), state


def tail_report(expert: Mapping[str, float], agents: Mapping[str, Mapping[str, float]], alpha: float = 0.9) -> dict[str, Any]:
    """Relative tail risk of each agent and, with both "GAIL" and "RAIL" present, the gains in reliability.

    ``expert`` and each agent are :meth:`CostSummary.as_dict` outputs.
    """
    keys = {"VaR": f"VaR_{alpha:g}", "CVaR": f"CVaR_{alpha:g}"}
    out: dict[str, Any] = {"relative_tail_risk_percent": {
        name: {x: relative_tail_risk(s[k], expert[k]) for x, k in keys.items()} for name, s in agents.items()}}
    if "GAIL" in agents and "RAIL" in agents:
        out["gain_in_reliability_percent"] = {
            x: gain_in_reliability(agents["RAIL"][k], agents["GAIL"][k], expert[k]) for x, k in keys.items()}
    return out


def cost_histograms(path: str | Path, costs: Mapping[str, Sequence[float]], *, title: str, alpha: float = 0.9) -> Path:
    """One plot: overlaid histograms of trajectory cost per agent (log counts), with each agent's CVaR marked."""
    from leantrain.plots import save_figure, subplots

    fig, ax = subplots(figsize=(6.4, 4.2))
    allc = np.concatenate([np.asarray(c, float) for c in costs.values()])
    lo, hi = float(allc.min()), float(allc.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    styles = ["-", "--", ":", "-."]
    for i, (label, c) in enumerate(costs.items()):
        c = np.asarray(c, float)
        # outlined histograms stay readable when two agents' distributions coincide
        color = f"C{i}"
        ax.hist(c, bins=bins, histtype="step", linewidth=2.2 - 0.4 * (i % 3), linestyle=styles[i % 4], color=color,
                label=f"{label} (n={c.size}, CVaR {summarize_costs(c, alpha).cvar:.1f})")
        ax.axvline(summarize_costs(c, alpha).cvar, color=color, linestyle=styles[i % 4], alpha=0.7)
    ax.set_xlabel(f"trajectory cost = -return (vertical lines: CVaR_{alpha:g})")
    ax.set_yscale("log")  # the tail is a few episodes beside a peak of hundreds
    ax.set_ylabel("episodes (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
