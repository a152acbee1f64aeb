"""The distributed (sharded) update: MLSL's ReduceScatter + owned-shard update + AllGather, ZeRO stage 1.

Each bucket is padded to a multiple of ``P`` and reduce-scattered, so rank ``r`` holds the averaged gradient of
chunk ``r`` of every bucket (``Bucket.shard_grad``). :class:`ShardedOptimizer` is a ``torch.optim.Optimizer``
over the model's parameters (same parameter groups and hyper-parameters as the optimizer it was built from, so
LR schedulers, ``state_dict``, ``zero_grad`` and step hooks work as usual); inside, an optimizer of the same
class updates one flat shard per bucket (optimizer state for ``1/P`` of the parameters), and the updated
parameters are all-gathered.

This is exact only for optimizers whose update of an element depends on that element's gradient and state
alone: :data:`ELEMENTWISE_OPTIMIZERS`, checked by exact type (a subclass may change the update). Anything else
(``LBFGS``, ``Adafactor``'s factored second moment, ``Muon``'s orthogonalisation, ``SparseAdam``) is refused
with a ``ValueError`` naming it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from leantrain.distributed.data_parallel import DataParallelModule

__all__ = ["ShardedOptimizer", "ELEMENTWISE_OPTIMIZERS"]

#: Optimizers whose update of every element reads only that element's gradient and state (and scalars such as
#: the step count), so that updating flat shards equals updating whole tensors.
ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.ASGD, torch.optim.Rprop,
)


class ShardedOptimizer(torch.optim.Optimizer):
    """``optimizer``'s update, applied by each rank to its shard of every bucket (see the module doc).

    Built by :meth:`DataParallelModule.optimizer` when the module has ``distributed_update=True``. The parameter
    groups are ``optimizer``'s own (the same dicts: a scheduler attached to either sees the same ``lr``).
    ``step()`` copies the groups' hyper-parameters to the shard optimizer, re-reads the owned parameter slices
    (so anything that changed the parameters since, e.g. master-weight rounding, is respected), updates the
    shards and all-gathers the parameters. ``state_dict()`` all-gathers the shards' state and returns the plain
    optimizer's format (a collective: every rank calls it), so checkpoints load with or without sharding and
    with any number of ranks.

    After backward, the averaged gradients live in the shards (``param.grad`` is None for the bucketed
    parameters): clip with :meth:`clip_grad_norm_`, and transform gradients through :meth:`shard_grads`.
    ``state`` is the shard optimizer's live state (keyed by the flat shard parameters).
    """

    ELEMENTWISE: tuple[type[torch.optim.Optimizer], ...] = ELEMENTWISE_OPTIMIZERS

    def __init__(self, optimizer: torch.optim.Optimizer, dp: DataParallelModule) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        cls = type(optimizer)
        if cls not in self.ELEMENTWISE:
            allowed = ", ".join(c.__name__ for c in self.ELEMENTWISE)
            raise ValueError(
                f"distributed_update needs an element-wise optimizer ({allowed}); {cls.__module__}.{cls.__qualname__} "
                "is not on that list (its update may couple the elements of a tensor, as LBFGS, Adafactor or Muon "
                "do, and would silently differ on shards). Use distributed_update=False, or add the class to "
                "ShardedOptimizer.ELEMENTWISE if its update is element-wise.")
        if not dp.distributed_update:
            raise ValueError("ShardedOptimizer needs a DataParallelModule built with distributed_update=True")
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.param_groups = optimizer.param_groups  # the same dicts: schedulers on either optimizer agree
        self.optimizer, self.dp = optimizer, dp
        known = set(dp._bucket_of)
        groups = [[p for p in g["params"] if p in known] for g in self.param_groups]
        missing = known - {p for g in groups for p in g}
        if missing:
            names = sorted(dp._names.get(p, "?") for p in missing)
            raise ValueError(f"distributed_update: trainable parameters missing from the optimizer: {names}")
        dp._plan(groups)
        self.shard_optimizer = self._build_shards(cls)
        self._scatter_state(optimizer.state)
        # The live state is the shards' (what in-place edits of optimizer.state, e.g. rounding of the optimizer
        # state by a precision policy, must reach); state_dict() presents it per parameter.
        self.state = self.shard_optimizer.state

    def __repr__(self) -> str:
        return f"ShardedOptimizer({type(self.optimizer).__name__}, {len(self.dp.buckets)} buckets, " \
               f"rank {self.dp.group.rank} of {self.dp.parts})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "shard_optimizer"):  # Optimizer.__init__ adds the initial groups through here
            raise NotImplementedError("ShardedOptimizer: buckets are laid out from the initial parameter groups; "
                                      "build a new DataParallelModule/optimizer to add parameters")
        super().add_param_group(param_group)

    # ---------------------------------------------------------------- shards
    def _build_shards(self, cls: type[torch.optim.Optimizer]) -> torch.optim.Optimizer:
        dp = self.dp
        r = dp.group.rank
        by_group: dict[int, list[torch.Tensor]] = {}
        for b in dp.buckets:
            b.param_full = torch.zeros_like(b.grad)
            with torch.no_grad():
                for p, off in zip(b.params, b.offsets):
                    b.param_full[off:off + p.numel()].copy_(p.reshape(-1))
            b.shard_param = nn.Parameter(b.param_full[r * b.chunk:(r + 1) * b.chunk].clone())
            by_group.setdefault(b.group_index, []).append(b.shard_param)
        self._group_map = sorted(by_group)
        hyper = [{**{k: v for k, v in self.param_groups[g].items() if k != "params"}, "params": by_group[g]}
                 for g in self._group_map]
        try:
            return cls(hyper, **self.optimizer.defaults)
        except TypeError:
            try:
                return cls(hyper)
            except TypeError as exc:
                raise TypeError(f"distributed_update could not rebuild {cls.__name__} over parameter shards: {exc}") from exc

    def _sync_hyper(self) -> None:
        for sg, g in zip(self.shard_optimizer.param_groups, self._group_map):
            for k, v in self.param_groups[g].items():
                if k != "params":
                    sg[k] = v

    def shard_grads(self) -> list[torch.Tensor]:
        """This rank's averaged gradient shards, one per bucket, without the padding (views: edit in place)."""
        r, out = self.dp.group.rank, []
        for b in self.dp.buckets:
            valid = max(0, min(b.chunk, b.numel - r * b.chunk))
            out.append(b.shard_grad[:valid])
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model's averaged gradient, applied to the shards.

        The norm is ``(sum_ranks sum_shard |g|^p)^(1/p)`` (``max`` for ``p = inf``; one all-reduce), the factor
        ``min(1, max_norm / (norm + 1e-6))`` as in torch; equal to clipping the full gradient up to summation order.
        Returns the total norm (before clipping).
        """
        grads = self.shard_grads()
        dev = self.dp.buckets[0].grad.device if self.dp.buckets else torch.device("cpu")
        p = float(norm_type)
        if p == float("inf"):
            local = torch.stack([g.abs().max() if g.numel() else torch.zeros((), device=dev) for g in grads]).max() \
                if grads else torch.zeros((), device=dev)
            total = local.to(torch.float32).reshape(1).clone()
            self.dp.group.all_reduce(total, "all_reduce of the gradient norm", op=torch.distributed.ReduceOp.MAX).wait()
            total = total[0]
        else:
            local = sum((torch.linalg.vector_norm(g, p).to(torch.float32) ** p for g in grads if g.numel()),
                        torch.zeros((), device=dev))
            total = local.reshape(1).clone()
            self.dp.group.all_reduce(total, "all_reduce of the gradient norm").wait()
            total = total[0] ** (1.0 / p)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    # ---------------------------------------------------------------- step
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.shard_optimizer.zero_grad(set_to_none=True)

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Update this rank's shards with the averaged gradients and all-gather the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t0 = time.perf_counter()
        self._sharded_step()
        self.dp._record_update(t0, time.perf_counter())
        return loss

    @torch.no_grad()
    def _sharded_step(self) -> None:
        dp = self.dp
        self._sync_hyper()
        r = dp.group.rank
        for b in dp.buckets:
            # Re-read the owned slice: anything that changed the parameters since the last step (rounding of
            # master weights, a checkpoint load, user code) must be what this step updates.
            for p, off in zip(b.params, b.offsets):
                lo, hi = max(off, r * b.chunk), min(off + p.numel(), (r + 1) * b.chunk)
                if lo < hi:
                    b.shard_param.data[lo - r * b.chunk:hi - r * b.chunk].copy_(p.detach().reshape(-1)[lo - off:hi - off])
            b.shard_param.grad = b.shard_grad.to(b.shard_param.dtype)
        self.shard_optimizer.step()
        order = sorted(dp.buckets, key=lambda b: -b.index) if dp.priority else dp.buckets
        works = [(b, dp.group.all_gather(b.param_full, b.shard_param.detach(), f"all_gather of updated bucket {b.index} "
                                                                                f"(step {dp._step_index - 1})"))
                 for b in order]
        for b, w in works:
            w.wait()
            for p, off in zip(b.params, b.offsets):
                p.copy_(b.param_full[off:off + p.numel()].view_as(p))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The plain optimizer's state dict with the full state (all-gathered shards; a collective)."""
        live, self.state = self.state, self._gather_state()
        try:
            return super().state_dict()
        finally:
            self.state = live

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        live = self.state
        super().load_state_dict(state_dict)  # self.state: the full state per parameter, cast as torch does
        # Optimizer.load_state_dict replaced the group dicts: keep sharing the wrapped optimizer's.
        for new, old in zip(self.param_groups, self.optimizer.param_groups):
            old.update({k: v for k, v in new.items() if k != "params"})
        self.param_groups = self.optimizer.param_groups
        full, self.state = self.state, live
        self._scatter_state(full)

    @torch.no_grad()
    def _gather_state(self) -> dict[torch.Tensor, dict[str, Any]]:
        dp = self.dp
        out: dict[torch.Tensor, dict[str, Any]] = {}
        for b in dp.buckets:
            shard_state = self.shard_optimizer.state.get(b.shard_param, {})
            for key in sorted(shard_state):
                value = shard_state[key]
                if isinstance(value, torch.Tensor) and value.shape == b.shard_param.shape:
                    full = torch.empty(b.padded, dtype=value.dtype, device=value.device)
                    dp.group.all_gather(full, value.contiguous(), f"all_gather of optimizer state {key!r}, "
                                                                  f"bucket {b.index}").wait()
                    for p, off in zip(b.params, b.offsets):
                        out.setdefault(p, {})[key] = full[off:off + p.numel()].view_as(p).clone()
                else:
                    for p in b.params:
                        out.setdefault(p, {})[key] = value.clone() if isinstance(value, torch.Tensor) else value
        return out

    @torch.no_grad()
    def _scatter_state(self, source: Any) -> None:
        dp = self.dp
        r = dp.group.rank
        for b in dp.buckets:
            first = source.get(b.params[0], {})
            new: dict[str, Any] = {}
            for key, value in first.items():
                if isinstance(value, torch.Tensor) and value.shape == b.params[0].shape:
                    flat = torch.zeros(b.padded, dtype=value.dtype, device=value.device)
                    for p, off in zip(b.params, b.offsets):
                        flat[off:off + p.numel()].copy_(source[p][key].reshape(-1))
                    new[key] = flat[r * b.chunk:(r + 1) * b.chunk].clone()
                else:
                    new[key] = value.clone() if isinstance(value, torch.Tensor) else value
            if new:
                self.shard_optimizer.state[b.shard_param] = new
