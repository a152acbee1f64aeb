"""Scale-out training on ``torch.distributed`` (gloo on CPU, NCCL on CUDA), after Intel MLSL (arXiv:1801.08030).

- :class:`Distribution`: the data x model process grid and its groups; collectives return :class:`Pending`
  requests and fail with :class:`CollectiveError` (rank, operation, group) instead of hanging.
- :class:`DataParallelModule` (DDP's semantics: averaged gradients when backward returns, unused parameters,
  buffer broadcast): bucketed, overlapped, prioritized, optionally compressed gradient averaging;
  :class:`ShardedOptimizer`: the distributed (sharded, ZeRO-1) update as a ``torch.optim.Optimizer``.
  ``DataParallel`` and ``DistributedOptimizer`` are deprecated aliases.
- :class:`ColumnParallelLinear` / :class:`RowParallelLinear`: model-parallel layers over a model group.
- :mod:`.scaling`: the alpha-beta scaling model behind ``leantrain scale``.
- :func:`spawn` / :func:`init_from_env`: local multi-process runs and torchrun launches.

See docs/distributed.md.
"""

from leantrain.distributed.compression import COMPRESSIONS, Compression, get_compression
from leantrain.distributed.data_parallel import (
    DataParallel,
    DataParallelModule,
    DistributedOptimizer,
    UnusedParameterError,
)
from leantrain.distributed.distribution import CollectiveError, Distribution, Group, Pending
from leantrain.distributed.hooks import DataParallelHooks
from leantrain.distributed.launch import SpawnError, free_port, init_from_env, is_launched, spawn
from leantrain.distributed.model_parallel import ColumnParallelLinear, RowParallelLinear
from leantrain.distributed.sharded_optimizer import ELEMENTWISE_OPTIMIZERS, ShardedOptimizer
from leantrain.distributed.timeline import StepStats, Timeline, write_chrome_trace

__all__ = [
    "Distribution", "Group", "Pending", "CollectiveError", "UnusedParameterError",
    "DataParallelModule", "ShardedOptimizer", "ELEMENTWISE_OPTIMIZERS", "DataParallelHooks",
    "DataParallel", "DistributedOptimizer", "ColumnParallelLinear", "RowParallelLinear",
    "Compression", "COMPRESSIONS", "get_compression",
    "spawn", "SpawnError", "init_from_env", "is_launched", "free_port",
    "StepStats", "Timeline", "write_chrome_trace",
]
