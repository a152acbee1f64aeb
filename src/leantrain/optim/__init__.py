"""Fewer passes over the data: PBQN (progressive-batching L-BFGS, arXiv:1802.05374) and DANCE
(distributed Newton-CG on an accumulating sample, arXiv:1810.11507).

- :class:`PBQN` with :class:`ProgressiveSampler`: a torch optimizer whose sample grows by a
  variance test on the quasi-Newton direction (:mod:`leantrain.optim.pbqn`);
- :class:`DANCE`: multistage damped Newton-CG, distributed by ``torch.distributed``
  (:mod:`leantrain.optim.dance`);
- :class:`BatchLoss`: the sample objective both use (per-sample gradients, HVPs, work counting);
- :mod:`leantrain.optim.problems` (logistic regression, MLP, CNN; scipy reference optimum) and
  :mod:`leantrain.app.runs` (the methods and baselines with one accounting).

See docs/optim.md.
"""

from leantrain.numerics.flat import conjugate_gradient, hvp_from_gradient
from leantrain.optim.dance import DANCE, shard_rows
from leantrain.optim.objective import BatchLoss, IndexClosure, WorkCounter
from leantrain.optim.pbqn import PBQN, inner_product_test, powell_damping, two_loop
from leantrain.optim.sampler import ProgressiveSampler

__all__ = ["PBQN", "DANCE", "ProgressiveSampler", "BatchLoss", "IndexClosure", "WorkCounter", "two_loop", "powell_damping",
           "inner_product_test", "conjugate_gradient", "shard_rows", "hvp_from_gradient"]
