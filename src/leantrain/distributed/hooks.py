"""Plugging :class:`~leantrain.distributed.DataParallelModule` into :func:`leantrain.train.fit` (``leantrain train --dp``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leantrain.distributed.data_parallel import DataParallelModule
from leantrain.distributed.distribution import Distribution
from leantrain.distributed.timeline import Timeline
from leantrain.train import Hooks

__all__ = ["DataParallelHooks"]


class DataParallelHooks(Hooks):
    """Plug :class:`DataParallelModule` into :func:`leantrain.train.fit` (and so into ``leantrain train --dp``).

    ``fit`` is called on every rank with the *global* batch size ``P * b``; :meth:`shard` hands rank ``d`` of
    the data group rows ``[d*B/P, (d+1)*B/P)`` of each global batch ``B`` drawn from the shared epoch order,
    so ``P`` ranks see exactly the batches one process with batch ``P*b`` would. Only global rank 0 writes
    checkpoints; their content (model, full optimizer state, every rank's error-feedback residuals) is the
    same on every rank, so a restart of all ranks from it (``torchrun --max-restarts``) continues exactly.

    ``inner`` hooks (e.g. a precision layer's loss scaling) keep working: their ``backward`` returns with the
    gradients averaged, and their ``step`` runs on them. Keyword arguments go to :class:`DataParallelModule`.
    """

    def __init__(self, distribution: Distribution | None = None, *, inner: Hooks | None = None, **dp_kwargs: Any) -> None:
        self.distribution = distribution if distribution is not None else Distribution()
        self.inner = inner if inner is not None else Hooks()
        self.dp_kwargs = dp_kwargs
        self.dp: DataParallelModule | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._comm_state: dict[str, Any] = {}
        if dp_kwargs.get("distributed_update") and getattr(self.inner, "scaler", None) is not None:
            raise ValueError(f"distributed_update cannot be combined with loss scaling ({type(self.inner).__name__}): "
                             "unscaling and the overflow check read param.grad, which the sharded update bypasses")

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        model, optimizer = self.inner.wrap(model, optimizer)
        self.dp = DataParallelModule(model, self.distribution, **self.dp_kwargs)
        self.optimizer = self.dp.optimizer(optimizer)
        self.dp.load_comm_state_dict(self._comm_state)
        return self.dp, self.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.inner.backward(loss)

    def step(self, optimizer: Any) -> bool:
        return self.inner.step(optimizer)

    def shard(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        parts, d = self.distribution.data_size, self.distribution.data_rank
        n = len(batch[0])
        if n < parts:
            raise ValueError(f"a global batch of {n} samples cannot be split over {parts} data-parallel ranks")
        lo, hi = d * n // parts, (d + 1) * n // parts
        return tuple(t[lo:hi] for t in batch)

    def writes_checkpoint(self) -> bool:
        return self.distribution.rank == 0 and self.inner.writes_checkpoint()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "comm": self.dp.comm_state_dict() if self.dp is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self._comm_state = state.get("comm", {})
        if self.dp is not None:
            self.dp.load_comm_state_dict(self._comm_state)

    def timelines(self) -> list[Timeline]:
        """Every rank's timeline (a collective over the global group; rank order)."""
        if self.dp is None:
            return []
        return self.distribution.global_group.all_gather_object(self.dp.timeline, "gather of timelines")
