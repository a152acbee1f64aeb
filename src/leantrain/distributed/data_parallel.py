"""Data-parallel training over a :class:`~leantrain.distributed.Distribution`'s data group (MLSL style), with the
semantics of torch's ``DistributedDataParallel``.

:class:`DataParallelModule` wraps a module. Every replica computes gradients on its slice of the global minibatch;
the gradients are averaged over the data group so that every replica applies the same update:

``g = (1/P) * sum_r g_r``, where ``g_r`` is the mean-loss gradient of replica ``r``'s slice and ``P`` the data
group size. With equal slices this is the gradient of the mean loss over the global batch, i.e. ``P`` replicas
with batch ``b`` each train like one process with batch ``P*b`` (up to floating-point summation order).

As with DDP, the averaged gradients are in ``param.grad`` when ``loss.backward()`` returns: a post-accumulate-grad
hook writes each gradient into its bucket (:mod:`.buckets`) and starts the bucket's exchange (:mod:`.exchange`)
during backward, from the hook or from the communication thread (:mod:`.scheduler`: priority order, compressed
exchanges); a callback queued on the autograd engine waits for the last bucket at the end of backward and makes
each ``param.grad`` a view of its averaged bucket. So anything between ``backward()`` and ``step()`` (gradient
clipping, GradScaler's unscale, logging) sees the average, and any ``torch.optim.Optimizer`` steps on it.

**Unused parameters.** By default every trainable parameter must receive a gradient in every backward on every
rank (as DDP without ``find_unused_parameters``); a parameter that does not raises
:class:`UnusedParameterError` naming it. With ``find_unused_parameters=True`` each forward walks the autograd
graph from its outputs to find the parameters it did not use; they count as zero on this rank, and one small
all-reduce of a used-map tells every rank which parameters no rank used: those keep ``grad`` None (as DDP), the
others get the average over all ranks (zero contributions included).

**Buffers** (``broadcast_buffers``): ``True`` (default, as DDP) copies every buffer from data rank 0 at the start
of a forward that follows a synchronised training forward; ``"average"`` averages the floating buffers (BatchNorm
statistics) at the end of each synchronised backward, overlapped with the gradient exchange; ``False`` leaves
them local.

All ranks must run the same model with the same parameters requiring gradients, and call forward/backward/step
in the same order. Any collective failure or timeout raises :class:`~leantrain.distributed.CollectiveError`
naming the rank and the bucket.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from leantrain.distributed.buckets import Bucket, plan_buckets
from leantrain.distributed.compression import Compression, get_compression
from leantrain.distributed.distribution import CollectiveError, Distribution, Group, Pending
from leantrain.distributed.exchange import (
    AllReduceExchange,
    CompressedExchange,
    Exchange,
    PairwiseExchange,
    ReduceScatterExchange,
)
from leantrain.distributed.scheduler import ExchangeScheduler
from leantrain.distributed.sharded_optimizer import ShardedOptimizer
from leantrain.distributed.timeline import BucketStats, StepStats, Timeline, busy_time
from leantrain.seeds import derive_seed

__all__ = ["DataParallelModule", "UnusedParameterError", "BUFFER_MODES"]

BUFFER_MODES = ("broadcast", "average", "none")


class UnusedParameterError(CollectiveError):
    """Parameters received no gradient in a backward where every parameter must (``find_unused_parameters=False``).

    ``names`` lists them. The exchange of this step cannot complete on this rank, so the module refuses further
    steps; ranks that did compute those gradients fail with a :class:`CollectiveError` for the bucket.
    """

    def __init__(self, rank: int, group: list[int], names: list[str], step: int) -> None:
        self.rank, self.operation, self.group, self.elapsed_s, self.names = rank, f"step {step}", list(group), 0.0, names
        shown = ", ".join(repr(n) for n in names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        RuntimeError.__init__(
            self, f"rank {rank}: step {step}: parameters received no gradient in this backward: {shown}. Every "
            "trainable parameter must take part in the loss on every rank; pass find_unused_parameters=True when "
            "some parameters (or some ranks) do not use them, or set requires_grad=False on parameters never trained.")


def _find_tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors inside a forward's output (tensors, lists, tuples, dicts, dataclass-like objects such as HF outputs)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _find_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _find_tensors(o)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for f in obj.__dataclass_fields__ for t in _find_tensors(getattr(obj, f))]
    return []


def _graph_parameters(outputs: list[torch.Tensor]) -> set[torch.Tensor]:
    """The leaf tensors whose AccumulateGrad nodes backward from ``outputs`` reaches (as DDP's graph search)."""
    seen, found = set(), set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            found.add(var)
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return found


class DataParallelModule(nn.Module):
    """Replicate ``module`` over the data group of ``distribution`` and average gradients (see the module doc).

    Args:
        module: the model (may be precision-wrapped, may contain model-parallel layers of the same distribution).
        distribution: the process grid; default ``Distribution()`` (every process is a data replica).
        bucket_mb: target bucket size in MiB (a larger parameter gets a bucket of its own). > 0.
        compression: ``"none"``, ``"fp16"``, ``"bf16"``, ``"int8"`` or ``"sign"``.
        error_feedback: carry the compression error into the next step (ignored without compression).
        priority: send the buckets the next forward needs first, first (see :mod:`.scheduler`).
        overlap: start each bucket's exchange during backward as soon as it is ready (else all at the end).
        distributed_update: reduce-scatter gradients and update only this rank's shard (use :meth:`optimizer`,
            which returns a :class:`~leantrain.distributed.ShardedOptimizer`).
        find_unused_parameters: allow parameters (on some or all ranks) without a gradient (see the module doc).
        broadcast_buffers: ``True``/``"broadcast"`` (copy buffers from data rank 0 at forward, as DDP),
            ``"average"`` (average floating buffers at the end of backward) or ``False``/``"none"``.
        broadcast: copy parameters and buffers from data rank 0 at construction, so replicas start equal.
        seed: seeds this rank's stochastic rounding (``derive_seed(seed, global rank)``, mixed with the step and
            the bucket index, see :class:`.exchange.CompressedExchange`).
        trace: record a :class:`~leantrain.distributed.timeline.Timeline` of compute and communication spans.

    :attr:`stats` holds a :class:`~leantrain.distributed.timeline.StepStats` per step. ``state_dict()`` and
    ``load_state_dict()`` are those of ``module`` (no ``module.`` prefix), so checkpoints load into the bare model.
    """

    #: Buckets larger than this are all-reduced in pieces of this size (see :class:`.exchange.AllReduceExchange`):
    #: when backward left the gradient in the bucket, the in-place division by P of piece k+1 then overlaps the
    #: transfer of piece k instead of delaying the bucket's only collective. 8 MB: on 2 gloo ranks (2 shared
    #: cores, loaded) a 16 MB bucket averaged in 2 pieces took 0.96x the time of a raw sum, in one piece 0.85x
    #: (paired medians, 41 samples); at 64 MB, 8 and 32 MB pieces measured alike.
    MESSAGE_BYTES = 8 << 20

    def __init__(self, module: nn.Module, distribution: Distribution | None = None, *, bucket_mb: float = 25.0,
                 compression: str | Compression | None = "none", error_feedback: bool = True, priority: bool = True,
                 overlap: bool = True, distributed_update: bool = False, find_unused_parameters: bool = False,
                 broadcast_buffers: bool | str = True, broadcast: bool = True, seed: int = 0,
                 trace: bool = False) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a number > 0, got {bucket_mb!r}")
        buffers = {True: "broadcast", False: "none"}.get(broadcast_buffers, broadcast_buffers) \
            if isinstance(broadcast_buffers, bool) else broadcast_buffers
        if buffers not in BUFFER_MODES:
            raise ValueError(f"broadcast_buffers must be True, False or one of {BUFFER_MODES}, got {broadcast_buffers!r}")
        if find_unused_parameters and distributed_update:
            raise ValueError("find_unused_parameters=True cannot be combined with distributed_update=True: a flat "
                             "shard cannot skip a parameter that no rank used (torch would leave it and its "
                             "optimizer state untouched)")
        self.module = module
        self.distribution = distribution if distribution is not None else Distribution()
        if not isinstance(self.distribution, Distribution):
            raise TypeError(f"distribution must be a Distribution, got {type(self.distribution).__name__}")
        self.group: Group = self.distribution.data_group
        self.parts = self.group.size
        self.bucket_bytes = int(bucket_mb * (1 << 20))
        self.compression = get_compression(compression)
        self.compressed = self.compression.name != "none"
        self.error_feedback = bool(error_feedback) and self.compressed
        self.priority, self.overlap, self.distributed_update = bool(priority), bool(overlap), bool(distributed_update)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.buffer_mode = buffers
        self.generator = torch.Generator(device=self._device()).manual_seed(derive_seed(seed, self.distribution.rank))
        self.timeline = Timeline(self.distribution.rank, enabled=trace)
        self.stats: list[StepStats] = []
        self._names = {p: n for n, p in module.named_parameters()}
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[nn.Parameter, Bucket] = {}
        # the gradient hook's lookup, keyed by id(p) (Tensor.__hash__ is a Python-level call): bucket, view (the
        # parameter's slice of the bucket), offset, numel and the view's data pointer
        self._slot: dict[int, tuple[Bucket, torch.Tensor, int, int, int]] = {}
        self._plan([[p for p in module.parameters() if p.requires_grad]])
        if self.compressed:
            self._strategy: Exchange = CompressedExchange(self.group, self.compression, self.generator,
                                                          sharded=self.distributed_update,
                                                          seed=derive_seed(seed, self.distribution.rank))
        elif self.distributed_update:
            self._strategy = ReduceScatterExchange(self.group)
        elif self.parts == 2 and self._device().type == "cpu":
            self._strategy = PairwiseExchange(self.group, self.buckets)
        else:
            self._strategy = AllReduceExchange(self.group)
        self._scale = self._strategy.scale
        if broadcast:
            self._broadcast_state()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._bucket_of]
        # Collectives start from the training thread unless an exchange must block part-way during backward.
        self._threaded = self.overlap and (self.priority or self._strategy.blocks)
        self._scheduler = ExchangeScheduler(self.group, self._exchange, self.priority and self.overlap)
        self._sync = True
        self._in_step = False
        self._backward_queued = False
        self._t_start = 0.0
        self._step_index = 0
        self._next_ready = 0  # buckets[:_next_ready] are ready here (and launched, or handed to the thread)
        self._arrived: set[int] = set()  # id() of the parameters whose gradient is in its bucket this step
        self._error: BaseException | None = None
        self._buffer_flat: torch.Tensor | None = None
        self._buffer_work: Pending | None = None
        self._buffers_next_forward = True  # DDP's require_forward_param_sync
        self._graph_params: set[torch.Tensor] = set()  # find_unused: parameters reached by this step's forwards
        self._used_unsynced: set[nn.Parameter] = set()  # find_unused: gradients accumulated under no_sync()
        self._used_map: torch.Tensor | None = None
        self._used_work: Pending | None = None
        self._spent: list[torch.Tensor] = []  # gradients that backward allocated, released when the next step starts
        self._optimizers_hooked: set[int] = set()

    # ------------------------------------------------------------------ layout
    def _device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _plan(self, groups: list[list[nn.Parameter]]) -> None:
        """Pack ``groups`` (lists of parameters, e.g. optimizer param groups) into buckets in backward order."""
        order = {p: i for i, p in enumerate(self.module.parameters())}
        params = sorted(((p, g) for g, ps in enumerate(groups) for p in ps if p.requires_grad),
                        key=lambda pg: -order.get(pg[0], -1))
        self.buckets = plan_buckets(params, self._names, self.bucket_bytes, self.parts)
        self._bucket_of, self._slot = {}, {}
        for b in self.buckets:
            if self.error_feedback:
                b.residual = torch.zeros_like(b.grad)
                if not self.distributed_update:
                    b.server_residual = torch.zeros(b.chunk, dtype=b.grad.dtype, device=b.grad.device)
            if self.distributed_update:
                b.shard_grad = torch.zeros(b.chunk, dtype=b.grad.dtype, device=b.grad.device)
            for p, view, off in zip(b.params, b.views, b.offsets):
                self._bucket_of[p] = b
                self._slot[id(p)] = (b, view, off, view.numel(), view.data_ptr())

    def layout(self) -> list[dict[str, Any]]:
        """The buckets: index, parameter names (backward order), elements and bytes."""
        return [{"index": b.index, "params": b.names, "numel": b.numel, "bytes": b.nbytes} for b in self.buckets]

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        if self.parts == 1:
            return
        named = [("parameter", n, p) for n, p in self.module.named_parameters()]
        named += [("buffer", n, b) for n, b in self.module.named_buffers()]
        works = [self.group.broadcast(t.data, 0, f"broadcast of initial {kind} {name!r}") for kind, name, t in named]
        for w in works:
            w.wait()

    @torch.no_grad()
    def _broadcast_buffers(self) -> None:
        """Copy every buffer from data rank 0, one message per dtype (as DDP's coalesced broadcast); the messages
        go out together and are waited for together, so the forward pays one round trip, not one per dtype."""
        by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for b in self.module.buffers():
            by_dtype.setdefault((b.dtype, b.device), []).append(b)
        flats = [(torch.cat([b.reshape(-1) for b in bufs]), bufs) for bufs in by_dtype.values()]
        works = [self.group.broadcast(flat, 0, f"broadcast of buffers ({flat.dtype}, step {self._step_index})")
                 for flat, _ in flats]
        for w in works:
            w.wait()
        for flat, bufs in flats:
            off = 0
            for b in bufs:
                b.copy_(flat[off:off + b.numel()].view_as(b))
                off += b.numel()

    # ------------------------------------------------------------------ module interface
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._error is not None:
            raise self._error
        if self.buffer_mode == "broadcast" and self._buffers_next_forward and self.parts > 1:
            self._broadcast_buffers()
        training = torch.is_grad_enabled() and self.training
        if training:
            self._begin_step()
        out = self.module(*args, **kwargs)
        if training and self._sync and self.find_unused_parameters:
            self._graph_params |= _graph_parameters(_find_tensors(out))
        self._buffers_next_forward = torch.is_grad_enabled() and self._sync
        return out

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no exchange) inside the block, e.g. for gradient accumulation; the next
        backward outside the block averages the accumulated sum (as DDP's ``no_sync``)."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer to step with. Plain: ``optimizer`` itself (step hooks added for :attr:`stats`); with the
        distributed update: a :class:`~leantrain.distributed.ShardedOptimizer` built from it."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self.distributed_update:
            return ShardedOptimizer(optimizer, self)
        if id(optimizer) not in self._optimizers_hooked:
            self._optimizers_hooked.add(id(optimizer))
            t0 = [0.0]

            def before(opt: Any, args: Any, kwargs: Any) -> None:
                t0[0] = time.perf_counter()

            def after(opt: Any, args: Any, kwargs: Any) -> None:
                self._record_update(t0[0], time.perf_counter())

            optimizer.register_step_pre_hook(before)
            optimizer.register_step_post_hook(after)
        return optimizer

    # ------------------------------------------------------------------ backward side
    def _begin_step(self) -> None:
        if self._in_step:
            return
        if self._error is not None:
            raise self._error
        self._in_step = True
        self._backward_queued = False
        self._t_start = time.perf_counter()
        for b in self.buckets:
            b.reset()
        self._next_ready = 0
        self._arrived = set()
        self._graph_params = set()
        self._spent = []
        self._buffer_flat = self._buffer_work = None
        self._used_map = self._used_work = None
        if isinstance(self._strategy, CompressedExchange):
            self._strategy.step = self._step_index
        if self._threaded:
            self._scheduler.begin(self.buckets, self._step_index)

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._sync:
            if self.find_unused_parameters:
                self._used_unsynced.add(p)
            return
        if self._error is not None:
            return
        if not self._in_step:
            self._begin_step()
        if not self._backward_queued:
            self._backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            if self.find_unused_parameters:
                self._mark_locally_unused()
        if id(p) in self._arrived:
            name = self._names.get(p, "?")
            self._error = RuntimeError(
                f"parameter {name!r} received its gradient after it was counted as unused: it is not reached from "
                "the output of forward (e.g. a penalty on the parameters added to the loss outside the module); "
                "with find_unused_parameters=True every parameter in the loss must be reached through forward's output")
            raise self._error
        self._mark(p)

    def _mark_locally_unused(self) -> None:
        """find_unused: start the used-map all-reduce and count the parameters this step's forwards did not reach
        as ready (their current gradient, zero without one), before any bucket of the step is launched."""
        params = list(self._bucket_of)
        used = [p in self._graph_params or p in self._used_unsynced for p in params]
        self._used_unsynced = set()
        if self.parts > 1:
            self._used_map = torch.tensor(used, dtype=torch.int32, device=self._device())
            self._used_work = self.group.all_reduce(self._used_map, f"all_reduce of the used-parameter map "
                                                                    f"(step {self._step_index})",
                                                    op=torch.distributed.ReduceOp.MAX)
        else:
            self._used_map = torch.tensor(used, dtype=torch.int32)
        with torch.no_grad():
            for p in params:
                if p not in self._graph_params:  # no gradient from this backward: its current one (no_sync), or zero
                    self._mark(p)

    def _mark(self, p: nn.Parameter) -> None:
        pid = id(p)
        self._arrived.add(pid)
        b, view, off, numel, ptr = self._slot[pid]
        self._fill(p.grad, b, view, off, numel, ptr)
        b.pending -= 1
        if b.pending == 0:
            if b.staged_views:
                with torch.no_grad():
                    torch._foreach_copy_(b.staged_views, b.staged_grads)
                b.staged_views, b.staged_grads = [], []
            b.ready_time = time.perf_counter()
            if self.overlap:
                self._advance()

    #: Gradients of at most this many elements are staged and copied into their bucket together (one foreach
    #: copy when the bucket is complete, the division by P then done over contiguous runs by the exchange):
    #: per-parameter dispatch from Python costs ~15-20 us, which for the many small tensors of a CNN or
    #: transformer (biases, norms) outweighs the arithmetic; larger ones are copied at once, divided on the way.
    STAGE_NUMEL = 1 << 15

    def _fill(self, g: torch.Tensor | None, b: Bucket, view: torch.Tensor, off: int, numel: int, ptr: int) -> None:
        """Write the gradient ``g`` (None counts as zero) into its bucket slice ``view`` (``numel`` elements at
        ``off``, data at ``ptr``), divided by P when the exchange sums: a large gradient in one pass (the division
        folded into the copy); a small one staged for the bucket's batched copy; when backward accumulated into the
        bucket itself, or after a staged copy, the exchange divides in place right before sending."""
        if g is None:
            view.zero_()
            return
        if g.requires_grad:  # create_graph=True: the copy must not enter the graph
            g = g.detach()
        if g.data_ptr() == ptr:
            if self._scale is not None:
                b.mark_undivided(off, numel)
        elif numel <= self.STAGE_NUMEL:
            b.staged_views.append(view)
            b.staged_grads.append(g)
            if self._scale is not None:
                b.mark_undivided(off, numel)
        elif self._scale is not None:
            torch.mul(g, self._scale, out=view)
        else:
            view.copy_(g)

    def _advance(self) -> None:
        """Launch (or hand to the thread) the buckets that complete the ready prefix, in index order."""
        start = self._next_ready
        while self._next_ready < len(self.buckets) and self.buckets[self._next_ready].ready:
            self._next_ready += 1
        if self._next_ready == start:
            return
        if self._threaded:
            self._scheduler.ready(self._next_ready)
        else:
            for b in self.buckets[start:self._next_ready]:
                self._exchange(b)

    def _exchange(self, b: Bucket) -> None:
        """Start bucket ``b``'s collective(s) (the buffers' average goes with the step's first one)."""
        if self._buffer_work is None:
            self._start_buffers()
        b.launch_time = time.perf_counter()
        self._strategy.start(b, f"bucket {b.index} ({b.nbytes / 1e6:.3g} MB, step {self._step_index})",
                             self.MESSAGE_BYTES)

    def exchange_gradients(self) -> StepStats | None:
        """Average the current ``param.grad`` over the data group now, without backward hooks (for gradients
        computed by other means, e.g. ``torch.autograd.grad``); a parameter without a gradient counts as zero."""
        if self._in_step and self._backward_queued:
            raise RuntimeError("exchange_gradients() called during backward")
        self._begin_step()
        with torch.no_grad():
            for p in self._bucket_of:
                if p.grad is not None and id(p) not in self._arrived:
                    self._mark(p)
        return self._complete(late_allowed=True)

    # ------------------------------------------------------------------ end of backward
    def _end_of_backward(self) -> None:
        self._complete(late_allowed=False)

    def finish(self) -> None:
        """Nothing left to do: backward completes the exchange (kept for callers of the earlier API)."""
        return None

    def _complete(self, late_allowed: bool) -> StepStats | None:
        """Wait for every bucket of this step and write the averaged gradients to ``param.grad``."""
        if not self._in_step:
            return None
        t_call = time.perf_counter()
        try:
            missing = [p for p in self._bucket_of if id(p) not in self._arrived]
            if missing and not late_allowed:
                self._error = UnusedParameterError(self.distribution.rank, self.group.ranks,
                                                   [self._names.get(p, "?") for p in missing], self._step_index)
                raise self._error
            with torch.no_grad():
                for p in missing:  # exchange_gradients(): no gradient counts as zero on every rank
                    self._mark(p)
            if self.overlap:
                self._advance()
            else:
                for b in sorted(self.buckets, key=lambda b: b.index, reverse=self.priority):
                    self._exchange(b)
            try:
                if self._threaded:
                    self._scheduler.wait(self.group.timeout_s + 5.0, t_call, self.distribution.rank)
                for b in self.buckets:
                    for w in b.works:
                        w.wait()
            except CollectiveError as exc:
                if not self.find_unused_parameters:
                    exc.add_note("If some ranks did not use every parameter in this backward (a peer then fails with "
                                 "UnusedParameterError naming them), pass find_unused_parameters=True.")
                raise
            t_done = time.perf_counter()
            unused_everywhere: set[nn.Parameter] = set()
            if self._used_map is not None:
                if self._used_work is not None:
                    self._used_work.wait()
                unused_everywhere = {p for p, u in zip(self._bucket_of, self._used_map.tolist()) if not u}
            if self.distributed_update:
                self._drop_local_grads()
            else:
                self._write_grads(unused_everywhere)
            self._finish_buffers()
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            raise
        finally:
            self._in_step = False
            self._backward_queued = False
        stats = self._record(t_call, t_done)
        return stats

    @torch.no_grad()
    def _write_grads(self, skip: set[nn.Parameter]) -> None:
        for b in self.buckets:
            if self.compressed:
                for p, off in zip(b.params, b.offsets):
                    if p not in skip:
                        p.grad = b.result[off:off + p.numel()].view_as(p)
                continue
            for p, view in zip(b.params, b.views):
                # param.grad becomes a view of the (averaged) bucket, no copy; with zero_grad(set_to_none=False)
                # the next backward then accumulates straight into the bucket and _fill divides it in place.
                # A parameter no rank used keeps its gradient (None after zero_grad()), as with DDP.
                if p in skip or p.grad is view:
                    continue
                if p.grad is not None:
                    # Freed here, mid-step, the gradients' memory goes back to the OS (heap trim) and the next
                    # forward faults it in again (~5000 page faults per ResNet-20 step measured, +10% step
                    # time); kept until the next step starts, it is reused as with torch's DDP.
                    self._spent.append(p.grad)
                p.grad = view

    @torch.no_grad()
    def _drop_local_grads(self) -> None:
        """Distributed update: the averaged gradient is in the shards; the local one must not be mistaken for it."""
        for p in self._bucket_of:
            if p.grad is not None:
                self._spent.append(p.grad)
                p.grad = None

    @torch.no_grad()
    def _start_buffers(self) -> None:
        """``"average"``: start averaging the floating buffers (final once backward runs) with the step's first
        exchange, so that the collective overlaps backward; :meth:`_finish_buffers` completes it."""
        if self.buffer_mode != "average" or self.parts == 1:
            return
        floats = [b for b in self.module.buffers() if b.is_floating_point()]
        if not floats:
            return
        self._buffer_flat = torch.cat([b.reshape(-1).to(torch.float32) for b in floats])
        self._buffer_work = self.group.all_reduce(self._buffer_flat, f"all_reduce of buffers (step {self._step_index})")

    @torch.no_grad()
    def _finish_buffers(self) -> None:
        if self._buffer_work is None:  # no bucket was exchanged this step
            self._start_buffers()
            if self._buffer_work is None:
                return
        self._buffer_work.wait()
        flat = self._buffer_flat
        flat /= self.parts
        off = 0
        for b in (b for b in self.module.buffers() if b.is_floating_point()):
            b.copy_(flat[off:off + b.numel()].view_as(b))
            off += b.numel()

    # ------------------------------------------------------------------ statistics
    def _record(self, t_call: float, t_done: float) -> StepStats:
        t0 = self._t_start
        st = StepStats(step=self._step_index, compute_s=t_call - t0, exposed_comm_s=t_done - t_call, step_s=t_done - t0)
        intervals = []
        for b in self.buckets:
            ends = [w.done_time or t_done for w in b.works] or [b.launch_time]
            done = max(ends)
            sent = sum(w.nbytes for w in b.works)
            intervals.append((b.launch_time, done))
            st.buckets.append(BucketStats(b.index, b.numel, sent, b.ready_time - t0, b.launch_time - t0, done - t0))
            st.bytes_sent += sent
            self.timeline.span(f"bucket {b.index}", "comm", b.launch_time, done, bytes=sent, numel=b.numel)
        st.comm_s = busy_time(intervals)
        if self.buckets:
            st.first_bucket_s = st.buckets[-1].done_s - (t_call - t0)
            st.first_done_s = st.buckets[-1].done_s
        self.timeline.span("forward+backward", "compute", t0, t_call)
        if t_done > t_call:
            self.timeline.span("wait (exposed comm)", "compute", t_call, t_done)
        self.stats.append(st)
        self._step_index += 1
        return st

    def _record_update(self, t0: float, t1: float) -> None:
        if self.stats:
            st = self.stats[-1]
            st.update_s = t1 - t0
            st.step_s = t1 - self._t_start
        self.timeline.span("update", "update", t0, t1)

    # ------------------------------------------------------------------ state
    def comm_state_dict(self) -> dict[str, Any]:
        """Error-feedback residuals and the rounding generator of *every* data rank (a collective: all ranks call
        it together), so that one checkpoint restores all of them."""
        mine = {"residual": [b.residual.cpu() if b.residual is not None else None for b in self.buckets],
                "server_residual": [b.server_residual.cpu() if b.server_residual is not None else None for b in self.buckets],
                "generator": self.generator.get_state(), "step": self._step_index}
        return {"parts": self.parts, "ranks": self.group.all_gather_object(mine, "gather of error-feedback state")}

    def load_comm_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's entry of :meth:`comm_state_dict` (same data-group size required)."""
        if not state:
            return
        if state.get("parts") != self.parts:
            raise ValueError(f"communication state was saved with {state.get('parts')} data ranks, this run has {self.parts}")
        mine = state["ranks"][self.group.rank]
        for b, r, s in zip(self.buckets, mine["residual"], mine["server_residual"]):
            if b.residual is not None and r is not None:
                b.residual.copy_(r)
            if b.server_residual is not None and s is not None:
                b.server_residual.copy_(s)
        self.generator.set_state(mine["generator"])
        self._step_index = mine["step"]

    def close(self) -> None:
        """Stop the communication thread and remove the gradient hooks."""
        self._scheduler.close()
        for h in self._handles:
            h.remove()
        self._handles = []

    def __del__(self) -> None:
        try:
            self._scheduler.close()
        except Exception:
            pass


class DataParallel(DataParallelModule):
    """Deprecated name of :class:`DataParallelModule` (it clashed with ``torch.nn.DataParallel``); its old
    ``sync_buffers`` argument maps to ``broadcast_buffers="average"`` (True) or False."""

    def __init__(self, *args: Any, sync_buffers: bool | None = None, **kwargs: Any) -> None:
        warnings.warn("leantrain.distributed.DataParallel is renamed DataParallelModule", DeprecationWarning, stacklevel=2)
        if sync_buffers is not None:  # the old name of broadcast_buffers="average" (True) / False
            kwargs.setdefault("broadcast_buffers", "average" if sync_buffers else False)
        super().__init__(*args, **kwargs)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, dp: DataParallelModule) -> torch.optim.Optimizer:  # noqa: N802
    """Deprecated: use ``dp.optimizer(optimizer)`` (the optimizer itself, or a ShardedOptimizer)."""
    warnings.warn("DistributedOptimizer(opt, dp) is replaced by dp.optimizer(opt)", DeprecationWarning, stacklevel=2)
    return dp.optimizer(optimizer)
