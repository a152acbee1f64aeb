"""Imitation learning: GAIL and RAIL (risk-averse imitation, arXiv:1707.06658).

Laid out like stable-baselines3, the algorithm apart from its parts:

- :mod:`~leantrain.imitation.envs`           gymnasium tasks, vectorized envs, the rollout collector
- :mod:`~leantrain.imitation.trajectories`   rollout batches and the expert ``.npz`` format
- :mod:`~leantrain.imitation.experts`        stable-baselines3 experts and their demonstrations
- :mod:`~leantrain.imitation.policies`       Gaussian policy, value function, standardizer
- :mod:`~leantrain.imitation.discriminator`  GAIL's discriminator and imitation reward
- :mod:`~leantrain.imitation.trpo`           the TRPO step carrying RAIL's trajectory term
- :mod:`~leantrain.imitation.rail`           the RAIL algorithm (GAIL = ``lam = 0``)
- :mod:`~leantrain.imitation.risk`           VaR, CVaR and RAIL's tail weights
- :mod:`~leantrain.imitation.evaluation`     cost statistics over evaluation rollouts
"""

from leantrain.imitation.discriminator import Discriminator
from leantrain.imitation.envs import TASKS, collect, make_vec_env, task
from leantrain.imitation.evaluation import evaluate_policy, load_agent
from leantrain.imitation.policies import GaussianPolicy, ValueFunction
from leantrain.imitation.rail import RAIL, RAILConfig
from leantrain.imitation.risk import conditional_value_at_risk, summarize_costs, tail_weights, value_at_risk
from leantrain.imitation.trajectories import ExpertTrajectories, RolloutBatch, load_trajectories, save_trajectories

__all__ = [
    "RAIL", "RAILConfig", "GaussianPolicy", "ValueFunction", "Discriminator", "ExpertTrajectories", "RolloutBatch",
    "load_trajectories", "save_trajectories", "TASKS", "task", "collect", "make_vec_env", "value_at_risk",
    "conditional_value_at_risk", "summarize_costs", "tail_weights", "evaluate_policy", "load_agent",
]
