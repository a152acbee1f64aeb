"""Data-parallel training over a :class:`~leantrain.distributed.Distribution`'s data group (MLSL style).

:class:`DataParallel` wraps a module. Every replica computes gradients on its slice of the global minibatch;
the gradients are averaged over the data group so that every replica applies the same update:

``g = (1/P) * sum_r g_r``, where ``g_r`` is the mean-loss gradient of replica ``r``'s slice and ``P`` the data
group size. With equal slices this is the gradient of the mean loss over the global batch, i.e. ``P`` replicas
with batch ``b`` each train like one process with batch ``P*b`` (up to floating-point summation order).

How the exchange is organised:

- **Buckets.** Trainable parameters are packed, in *reverse registration order* (the order backward produces
  their gradients), into flat buckets of at most ``bucket_mb`` MiB (a larger parameter gets a bucket of its
  own; a bucket never mixes dtypes, devices or, with the distributed update, optimizer parameter groups).
  Bucket 0 holds the last layers, the last bucket the first layers.
- **Averaging.** A post-accumulate-grad hook on each parameter writes ``g / P`` into the parameter's slice of
  its bucket: the division is folded into the copy (one pass, like torch's DDP), or, when backward already
  accumulated into the bucket (``param.grad`` is a view of it, see below), done in place just before the
  exchange. The collective then *sums* the pre-divided gradients, so the bucket holds the average the moment
  it completes: no pass over the bucket after the exchange. For a power-of-two ``P`` the division is exact
  and the result is bitwise the ``SUM`` all-reduce divided by ``P``; otherwise the two differ by rounding
  (about one ulp). Buckets above ``MESSAGE_BYTES`` are all-reduced in pieces, each divided in place right
  before it starts, so that dividing piece ``k+1`` overlaps the transfer of piece ``k``. Compressed exchanges
  average in float32 themselves and take the gradients undivided.
- **Overlap.** When a bucket's last gradient arrives, its non-blocking collective starts at once while backward
  continues: from the hook itself (like DDP's reducer; no thread hand-off) or, when the exchange has to block
  part-way (priority negotiation, the two phases of a compressed exchange), from the communication thread
  (MLSL's endpoint server, Horovod's background thread), so that backward never waits.
  :meth:`DataParallel.finish` (called by the wrapped optimizer's ``step``) waits for all of them and makes each
  ``param.grad`` a view of its bucket (no copy back). With ``overlap=False`` every exchange starts in ``finish()``.
- **Priority.** The next forward needs the *first* layers first, but backward readies them *last*, so a
  first-in-first-out link finishes them last. With ``priority=True`` the communication thread sends one bucket
  at a time and always picks, among the buckets ready on every rank, the one closest to the input (highest
  index). To agree on that choice without a coordinator, the ranks all-reduce (MIN) their count of ready
  buckets before each pick: backward readies buckets in the same order everywhere, so the minimum is a prefix
  that every rank holds; the negotiation of the next pick travels together with the exchange of the current
  one, and the last bucket (no choice left) goes without one. What it buys: the first layers' gradients are
  complete sooner (``StepStats.first_done_s``), which an update that starts per layer, or the all-gather of the
  distributed update, can use. What it costs: one tiny all-reduce per bucket, and one bucket on the link at a
  time. The benchmark ``leantrain bench distributed`` measures both.
- **Compression** (``none``, ``fp16``, ``bf16``, ``int8``, ``sign``; see :mod:`.compression`). A compressed
  bucket is exchanged in two phases that keep the ring's bandwidth cost ``2(P-1)/P`` of the payload: each rank
  splits its bucket into ``P`` chunks, compresses them and sends chunk ``j`` to rank ``j`` (all-to-all);
  rank ``j`` decompresses and averages its chunk in float32, compresses the average and all-gathers it.
  **Error feedback** (``error_feedback=True``): what compression dropped is added to the next step's values
  before compressing, at both phases (``e <- v - decode(encode(v))`` with ``v = g + e``), so the error does not
  accumulate; this is what makes biased compressors such as ``sign`` converge.
- **Distributed update** (``distributed_update=True``, MLSL's ReduceScatter + owned-shard update + AllGather;
  ZeRO stage 1): each bucket is padded to a multiple of ``P`` and reduce-scattered, so rank ``r`` gets the
  averaged gradient of chunk ``r`` of every bucket; :class:`DistributedOptimizer` updates only that shard with
  an optimizer of the user's class and hyper-parameters (optimizer state for ``1/P`` of the parameters), then
  all-gathers the updated parameters. Exact for element-wise optimizers (SGD, momentum, Adam, AdamW, RMSprop,
  Adagrad, ...); optimizers that couple elements across a tensor (LBFGS, per-tensor trust ratios) are refused.

All ranks must run the same model with the same parameters requiring gradients, and call forward/backward/step
in the same order (as with torch's DistributedDataParallel). Any collective failure or timeout raises
:class:`~leantrain.distributed.CollectiveError` naming the rank and the bucket.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from leantrain.distributed.compression import Compression, get_compression
from leantrain.distributed.distribution import CollectiveError, Distribution, Group, Pending
from leantrain.distributed.timeline import BucketStats, StepStats, Timeline, busy_time
from leantrain.train import Hooks

__all__ = ["DataParallel", "DistributedOptimizer", "DataParallelHooks"]


class _Bucket:
    """A flat gradient buffer for a run of parameters (in backward order), and its exchange state."""

    def __init__(self, index: int, params: list[nn.Parameter], names: list[str], parts: int, group_index: int) -> None:
        self.index, self.params, self.names, self.group_index = index, params, names, group_index
        self.numel = sum(p.numel() for p in params)
        self.chunk = -(-self.numel // parts)  # ceil: every rank owns one chunk of the padded bucket
        self.padded = self.chunk * parts
        p0 = params[0]
        self.grad = torch.zeros(self.padded, dtype=p0.dtype, device=p0.device)
        self.views: list[torch.Tensor] = []
        self.offsets: list[int] = []
        off = 0
        for p in params:
            self.views.append(self.grad[off:off + p.numel()].view_as(p))
            self.offsets.append(off)
            off += p.numel()
        self.residual: torch.Tensor | None = None  # error feedback, worker side (padded)
        self.server_residual: torch.Tensor | None = None  # error feedback, owner side (chunk)
        self.result: torch.Tensor | None = None  # averaged flat gradient after the exchange
        self.shard_grad: torch.Tensor | None = None  # distributed update: averaged owned chunk
        self.param_full: torch.Tensor | None = None  # distributed update: all-gathered flat parameters
        self.shard_param: nn.Parameter | None = None  # distributed update: this rank's chunk (master copy)
        self.pending = len(params)
        self.ready_time = self.launch_time = 0.0
        self.works: list[Pending] = []
        self.undivided: list[tuple[int, int]] = []  # ranges that backward accumulated into, still to divide by P

    @property
    def nbytes(self) -> int:
        return self.numel * self.grad.element_size()

    def reset(self) -> None:
        self.pending = len(self.params)
        self.works = []
        self.undivided = []
        self.result = None


class DataParallel(nn.Module):
    """Replicate ``module`` over the data group of ``distribution`` and average gradients (see the module doc).

    Args:
        module: the model (may be precision-wrapped, may contain model-parallel layers of the same distribution).
        distribution: the process grid; default ``Distribution()`` (every process is a data replica).
        bucket_mb: target bucket size in MiB (a larger parameter gets a bucket of its own). > 0.
        compression: ``"none"``, ``"fp16"``, ``"bf16"``, ``"int8"`` or ``"sign"``.
        error_feedback: carry the compression error into the next step (ignored without compression).
        priority: send the buckets the next forward needs first, first (see the module doc).
        overlap: start each bucket's exchange during backward as soon as it is ready.
        distributed_update: reduce-scatter gradients and update only this rank's shard (use :meth:`optimizer`).
        broadcast: copy parameters and buffers from data rank 0 at construction, so replicas start equal.
        sync_buffers: average floating-point buffers (BatchNorm running statistics) over the data group at the
            end of every step, so that replicas evaluate alike.
        seed: seeds this rank's generator for stochastic rounding (``seed * 1_000_003 + global rank``).
        trace: record a :class:`~leantrain.distributed.timeline.Timeline` of compute and communication spans.

    After ``loss.backward()`` call :meth:`finish` (or ``step`` of the optimizer from :meth:`optimizer`, which
    calls it). :attr:`stats` holds a :class:`~leantrain.distributed.timeline.StepStats` per step.
    ``state_dict()``/``load_state_dict()`` are those of ``module`` (no ``module.`` prefix), so checkpoints load
    into the bare model.
    """

    #: Buckets larger than this are all-reduced in pieces of this size (see "Averaging" in the module doc).
    MESSAGE_BYTES = 32 << 20

    def __init__(self, module: nn.Module, distribution: Distribution | None = None, *, bucket_mb: float = 25.0,
                 compression: str | Compression | None = "none", error_feedback: bool = True, priority: bool = True,
                 overlap: bool = True, distributed_update: bool = False, broadcast: bool = True,
                 sync_buffers: bool = True, seed: int = 0, trace: bool = False) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a number > 0, got {bucket_mb!r}")
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
        self._float_buffers = [b for b in module.buffers() if b.is_floating_point()] if sync_buffers else []
        self.generator = torch.Generator(device=self._device()).manual_seed(seed * 1_000_003 + self.distribution.rank)
        self.timeline = Timeline(self.distribution.rank, enabled=trace)
        self.stats: list[StepStats] = []
        self._names = {p: n for n, p in module.named_parameters()}
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[nn.Parameter, _Bucket] = {}
        self._view_of: dict[nn.Parameter, torch.Tensor] = {}
        self._offset_of: dict[nn.Parameter, int] = {}
        self._plan([[p for p in module.parameters() if p.requires_grad]])
        if broadcast:
            self._broadcast_state()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._bucket_of]
        # Step state, shared with the communication thread under self._cv.
        self._cv = threading.Condition()
        self._ready_order: list[int] = []  # bucket indices in the order they became ready here
        self._processed = 0  # buckets exchanged by the communication thread this step
        self._agreed = 0  # priority mode: length of the ready prefix every rank holds
        self._heap: list[int] = []  # priority mode: agreed, not yet exchanged (sorted; last = highest priority)
        self._step_done = threading.Event()
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self._sync = True
        self._in_step = False
        self._t_start = self._t_update = 0.0
        self._step_index = 0
        self._negotiation = torch.zeros(1, dtype=torch.int64, device=self._device())
        # Uncompressed exchanges sum gradients already divided by P on their way into the bucket (see the module
        # doc); compressed ones average in float32 themselves.
        self._scale: float | None = 1.0 / self.parts if self.parts > 1 and not self.compressed else None
        # Collectives start from the training thread unless an exchange must block part-way during backward.
        self._threaded = self.overlap and (self.priority or self.compressed)
        self._arrived: set[nn.Parameter] = set()  # parameters whose gradient is in its bucket this step
        self._buffer_flat: torch.Tensor | None = None
        self._buffer_work: Pending | None = None
        self._spent: list[torch.Tensor] = []  # gradients that backward allocated, released when the next step starts

    # ------------------------------------------------------------------ layout
    def _device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _plan(self, groups: list[list[nn.Parameter]]) -> None:
        """Pack ``groups`` (lists of parameters, e.g. optimizer param groups) into buckets in backward order."""
        order = {p: i for i, p in enumerate(self.module.parameters())}
        params = sorted(((p, g) for g, ps in enumerate(groups) for p in ps if p.requires_grad),
                        key=lambda pg: -order.get(pg[0], -1))
        self.buckets, self._bucket_of, self._view_of, self._offset_of = [], {}, {}, {}
        cur: list[nn.Parameter] = []
        cur_group, size = -1, 0
        for p, g in params:
            if cur and (size + p.numel() * p.element_size() > self.bucket_bytes or g != cur_group
                        or p.dtype != cur[0].dtype or p.device != cur[0].device):
                self._add_bucket(cur, cur_group)
                cur, size = [], 0
            cur.append(p)
            cur_group = g
            size += p.numel() * p.element_size()
        if cur:
            self._add_bucket(cur, cur_group)

    def _add_bucket(self, params: list[nn.Parameter], group_index: int) -> None:
        b = _Bucket(len(self.buckets), params, [self._names.get(p, "?") for p in params], self.parts, group_index)
        if self.error_feedback:
            b.residual = torch.zeros_like(b.grad)
            if not self.distributed_update:
                b.server_residual = torch.zeros(b.chunk, dtype=b.grad.dtype, device=b.grad.device)
        if self.distributed_update:
            b.shard_grad = torch.zeros(b.chunk, dtype=b.grad.dtype, device=b.grad.device)
        self.buckets.append(b)
        for p, view, off in zip(params, b.views, b.offsets):
            self._bucket_of[p] = b
            self._view_of[p] = view
            self._offset_of[p] = off

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

    # ------------------------------------------------------------------ module interface
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and self.training:
            self._begin_step()
        return self.module(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no exchange) inside the block, e.g. for gradient accumulation."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def optimizer(self, optimizer: torch.optim.Optimizer) -> DistributedOptimizer:
        """Wrap ``optimizer`` so that ``step()`` finishes the exchange (and, with the distributed update, updates
        only this rank's shard and all-gathers the parameters)."""
        return DistributedOptimizer(optimizer, self)

    # ------------------------------------------------------------------ backward side
    def _begin_step(self) -> None:
        if self._in_step:
            return
        if self._error is not None:
            raise self._error
        self._in_step = True
        self._t_start = time.perf_counter()
        for b in self.buckets:
            b.reset()
        self._arrived = set()
        self._spent = []
        self._buffer_flat = self._buffer_work = None
        if not self._threaded:
            return
        with self._cv:  # the thread is idle here: the previous step's exchange is complete
            self._ready_order, self._processed, self._agreed, self._heap = [], 0, 0, []
            self._step_done.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._comm_loop, name="leantrain-comm", daemon=True)
            self._thread.start()

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._sync:
            return
        self._begin_step()
        if p in self._arrived:  # exchange_gradients() after backward: this gradient is in its bucket already
            return
        self._arrived.add(p)
        b = self._bucket_of[p]
        self._fill(p, b, self._view_of[p])
        b.pending -= 1
        if b.pending == 0:
            b.ready_time = time.perf_counter()
            if self.overlap:
                self._ready(b)

    def _fill(self, p: nn.Parameter, b: _Bucket, view: torch.Tensor) -> None:
        """Write ``p``'s gradient (None counts as zero) into its bucket slice ``view``, divided by P when the
        exchange sums (one pass: the division is folded into the copy; when backward accumulated into the
        bucket itself, :meth:`_exchange` divides in place right before sending)."""
        g = p.grad
        if g is None:
            view.zero_()
        elif g.data_ptr() == view.data_ptr():
            if self._scale is not None:
                off = self._offset_of[p]
                b.undivided.append((off, off + view.numel()))
        elif self._scale is not None:
            torch.mul(g.detach(), self._scale, out=view)
        else:
            view.copy_(g.detach())

    def _ready(self, b: _Bucket) -> None:
        """Bucket ``b`` holds all its gradients: start its exchange here, or queue it for the thread."""
        if self._threaded:
            with self._cv:
                self._ready_order.append(b.index)
                self._cv.notify()
        else:
            self._exchange(b, wait=False)

    # ------------------------------------------------------------------ the communication thread
    def _comm_loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._has_work():
                    self._cv.wait()
                if self._stop:
                    return
            try:
                if self.priority and self.overlap:
                    self._priority_round()
                else:
                    with self._cv:
                        index = self._ready_order[self._processed]
                    self._exchange(self.buckets[index], wait=False)
                    self._processed += 1
            except BaseException as exc:  # surfaced by finish() in the training thread
                self._error = exc
                self._step_done.set()
                return
            if self._processed == len(self.buckets):
                self._step_done.set()

    def _has_work(self) -> bool:
        if self._step_done.is_set():
            return False
        if self.priority and self.overlap:
            return len(self._ready_order) > self._agreed or len(self._heap) > 0
        return len(self._ready_order) > self._processed

    def _priority_round(self) -> None:
        # One round: the negotiation of the next pick goes over the link together with the exchange of this one
        # (picked from the previous negotiation), so that no round trip leaves the link idle. Every rank runs
        # the same rounds: what a round does depends only on the agreed state, which all ranks share.
        n, neg = len(self.buckets), None
        if self._agreed == n - 1 and not self._heap:
            # One bucket left and nothing queued: there is no choice to agree on. Every rank knows which bucket it
            # is (the one outside the agreed prefix) and sends it as soon as it is ready here (this round runs
            # because it is): the end of backward does not wait for a negotiation round trip.
            with self._cv:
                self._heap = [self._ready_order[self._agreed]]
            self._agreed = n
        elif self._agreed < n - 1:
            with self._cv:
                local = len(self._ready_order)
            self._negotiation.fill_(local)
            neg = self.group.all_reduce(self._negotiation, f"priority negotiation (step {self._step_index})",
                                        op=torch.distributed.ReduceOp.MIN)
        b = None
        if self._heap:
            b = self.buckets[self._heap.pop()]  # highest index = closest to the input = needed first by the next forward
            self._exchange(b, wait=False)
        if neg is not None:
            neg.wait()
            agreed = int(self._negotiation.item())
            with self._cv:
                new = self._ready_order[self._agreed:agreed]
            self._heap = sorted(self._heap + new)
            self._agreed = agreed
        if b is not None:
            for w in b.works:
                w.wait()
            self._processed += 1

    def _exchange(self, b: _Bucket, *, wait: bool) -> None:
        """Start bucket ``b``'s collective(s); with ``wait`` block until they complete."""
        if self._buffer_work is None:
            self._start_buffers()  # first exchange of the step: the buffers are final once backward runs
        b.launch_time = time.perf_counter()
        label = f"bucket {b.index} ({b.nbytes / 1e6:.3g} MB, step {self._step_index})"
        if not self.compressed:
            # The gradients are divided by P on their way in: the sum is the average (see the module doc).
            if self.distributed_update:
                if b.undivided:
                    self._divide(b, 0, b.padded)
                b.works.append(self.group.reduce_scatter(b.shard_grad, b.grad, f"reduce_scatter of {label}"))
            else:
                step = max(1, self.MESSAGE_BYTES // b.grad.element_size())
                pieces = range(0, b.padded, step)
                for lo in pieces:
                    hi = min(lo + step, b.padded)
                    if b.undivided:
                        self._divide(b, lo, hi)
                    where = f" [{lo}:{hi}]" if len(pieces) > 1 else ""
                    b.works.append(self.group.all_reduce(b.grad[lo:hi], f"all_reduce of {label}{where}"))
        else:
            self._compressed_exchange(b, label)
        if wait:
            for w in b.works:
                w.wait()

    @torch.no_grad()
    def _divide(self, b: _Bucket, lo: int, hi: int) -> None:
        """Divide by P, in place, what backward accumulated into ``b.grad[lo:hi]`` (see :meth:`_fill`)."""
        for start, end in b.undivided:
            s, e = max(start, lo), min(end, hi)
            if s < e:
                b.grad[s:e].mul_(self._scale)

    def _compressed_exchange(self, b: _Bucket, label: str) -> None:
        comp, parts, c = self.compression, self.parts, b.chunk
        v = b.grad.to(torch.float32)
        if b.residual is not None:
            v = v + b.residual
        rows = v.view(parts, c)
        payload = comp.encode(rows, self.generator)
        if b.residual is not None:
            b.residual.copy_((rows - comp.decode(payload, c)).view(-1))
        recv = torch.empty_like(payload)
        phase1 = self.group.all_to_all(recv, payload, f"all_to_all (compressed {comp.name}) of {label}")
        phase1.wait()
        b.works.append(phase1)
        mean = comp.decode(recv, c).sum(dim=0) / parts
        if self.distributed_update:
            b.shard_grad.copy_(mean)
            return
        if b.server_residual is not None:
            mean = mean + b.server_residual
        mine = comp.encode(mean.view(1, c), self.generator)
        if b.server_residual is not None:
            b.server_residual.copy_(mean - comp.decode(mine, c).view(-1))
        gathered = torch.empty(parts, mine.shape[1], dtype=torch.uint8, device=mine.device)
        phase2 = self.group.all_gather(gathered.view(-1), mine.view(-1), f"all_gather (compressed {comp.name}) of {label}")

        def decode() -> None:
            b.result = comp.decode(gathered, c).view(-1).to(b.grad.dtype)

        b.works.append(phase2.then(decode))

    def exchange_gradients(self) -> StepStats | None:
        """Average the current ``param.grad`` over the data group now, without backward hooks (for gradients
        computed by other means, e.g. ``torch.autograd.grad``); a parameter without a gradient counts as zero."""
        self._begin_step()
        for p in self._bucket_of:
            if p.grad is not None:
                self._on_grad(p)
        return self.finish()

    # ------------------------------------------------------------------ finish
    def finish(self) -> StepStats | None:
        """Wait for every bucket's exchange of this step and write the averaged gradients to ``param.grad``.

        Buckets whose gradients never arrived (parameters unused in this step) are exchanged with zero
        gradients. Returns this step's statistics (None when no step was in progress). Raises
        :class:`CollectiveError` if an exchange failed or timed out.
        """
        if not self._in_step:
            return None
        t_call = time.perf_counter()
        try:
            # Parameters whose gradient did not arrive (unused in this step, or exchange_gradients()): their
            # current gradient, zero without one, goes into their bucket now; every rank does the same.
            late = [b for b in self.buckets if b.pending > 0]
            with torch.no_grad():
                for b in late:
                    for p, view in zip(b.params, b.views):
                        if p not in self._arrived:
                            self._fill(p, b, view)
                    b.pending = 0
                    b.ready_time = t_call
            if self.overlap:  # the others started during backward; these in index order on every rank
                order = late
            else:
                order = sorted(self.buckets, key=lambda b: b.index, reverse=self.priority)
            if self._threaded:
                if self.buckets:
                    self._wait_for_thread(order, t_call)
            else:
                for b in order:
                    self._exchange(b, wait=False)
            for b in self.buckets:
                for w in b.works:
                    w.wait()
            t_done = time.perf_counter()
            if not self.distributed_update:
                self._write_grads()
            self._finish_buffers()
        finally:
            self._in_step = False
        stats = self._record(t_call, t_done)
        self._t_update = time.perf_counter()
        return stats

    def _wait_for_thread(self, order: list[_Bucket], t_call: float) -> None:
        with self._cv:
            self._ready_order.extend(b.index for b in order)
            self._cv.notify()
        timeout = self.group.timeout_s + 5.0
        if not self._step_done.wait(timeout) and self._error is None:
            raise CollectiveError(self.distribution.rank, f"step {self._step_index} exchange (communication thread)",
                                  self.group.ranks, time.perf_counter() - t_call, timeout, "did not finish")
        if self._error is not None:
            raise self._error

    @torch.no_grad()
    def _write_grads(self) -> None:
        for b in self.buckets:
            if self.compressed:
                for p, off in zip(b.params, b.offsets):
                    p.grad = b.result[off:off + p.numel()].view_as(p)
                continue
            for p, view in zip(b.params, b.views):
                # param.grad becomes a view of the (averaged) bucket, no copy; with zero_grad(set_to_none=False)
                # the next backward then accumulates straight into the bucket and _fill divides it in place.
                if p.grad is not view:
                    if p.grad is not None:
                        # Freed here, mid-step, the gradients' memory goes back to the OS (heap trim) and the next
                        # forward faults it in again (~5000 page faults per ResNet-20 step measured, +10% step
                        # time); kept until the next step starts, it is reused as with torch's DDP.
                        self._spent.append(p.grad)
                    p.grad = view

    @torch.no_grad()
    def _start_buffers(self) -> None:
        """Start averaging the floating-point buffers (BatchNorm statistics: final once backward runs), with the
        step's first exchange so that the collective overlaps backward; :meth:`_finish_buffers` completes it."""
        if self.parts == 1 or not self._float_buffers:
            return
        self._buffer_flat = torch.cat([b.reshape(-1).to(torch.float32) for b in self._float_buffers])
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
        for b in self._float_buffers:
            b.copy_(flat[off:off + b.numel()].view_as(b))
            off += b.numel()

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
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for h in self._handles:
            h.remove()
        self._handles = []

    def __del__(self) -> None:
        try:
            with self._cv:
                self._stop = True
                self._cv.notify()
        except Exception:
            pass


# Optimizers whose update of an element depends on other elements of the same tensor.
_COUPLED = ("LBFGS",)


class DistributedOptimizer:
    """An optimizer bound to a :class:`DataParallel`: ``step()`` = ``finish()`` + update (+ all-gather).

    Plain mode: the wrapped optimizer steps on the averaged gradients. Distributed update: an optimizer of the
    same class, with the same hyper-parameters per parameter group, holds one flat shard per bucket (this rank's
    chunk); hyper-parameters changed on the wrapped optimizer (LR schedulers) are copied before every step.
    ``state_dict()`` returns the wrapped optimizer's format with the full (all-gathered) state, so checkpoints
    are the same as without the distributed update and load with any number of ranks; calling it is a
    collective. ``param_groups``, ``state``, ``zero_grad`` and ``add_param_group``-free use follow the wrapped
    optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, dp: DataParallel) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer, self.dp = optimizer, dp
        self.shard_optimizer: torch.optim.Optimizer | None = None
        if dp.distributed_update:
            if type(optimizer).__name__ in _COUPLED:
                raise ValueError(f"distributed_update needs an element-wise optimizer; {type(optimizer).__name__} couples "
                                 "elements across tensors")
            known = set(dp._bucket_of)
            groups = [[p for p in g["params"] if p in known] for g in optimizer.param_groups]
            missing = known - {p for g in groups for p in g}
            if missing:
                raise ValueError(f"distributed_update: {len(missing)} trainable parameters are not in the optimizer")
            dp._plan(groups)
            self._build_shards()
            self._scatter_state()

    # plain attributes of the wrapped optimizer
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        mode = "distributed update" if self.shard_optimizer is not None else "all-reduce"
        return f"DistributedOptimizer({type(self.optimizer).__name__}, {mode}, {len(self.dp.buckets)} buckets)"

    # ---------------------------------------------------------------- shards
    def _build_shards(self) -> None:
        dp = self.dp
        r, hyper = dp.group.rank, []
        by_group: dict[int, list[torch.Tensor]] = {}
        for b in dp.buckets:
            b.param_full = torch.zeros_like(b.grad)
            with torch.no_grad():
                for p, off in zip(b.params, b.offsets):
                    b.param_full[off:off + p.numel()].copy_(p.reshape(-1))
            b.shard_param = nn.Parameter(b.param_full[r * b.chunk:(r + 1) * b.chunk].clone())
            by_group.setdefault(b.group_index, []).append(b.shard_param)
        self._group_map = sorted(by_group)
        for g in self._group_map:
            settings = {k: v for k, v in self.optimizer.param_groups[g].items() if k != "params"}
            hyper.append({**settings, "params": by_group[g]})
        cls = type(self.optimizer)
        try:
            self.shard_optimizer = cls(hyper, **self.optimizer.defaults)
        except TypeError:
            try:
                self.shard_optimizer = cls(hyper)
            except TypeError as exc:
                raise TypeError(f"distributed_update could not rebuild {cls.__name__} over parameter shards: {exc}") from exc

    def _sync_hyper(self) -> None:
        for sg, g in zip(self.shard_optimizer.param_groups, self._group_map):
            for k, v in self.optimizer.param_groups[g].items():
                if k != "params":
                    sg[k] = v

    # ---------------------------------------------------------------- step
    def step(self, closure: Any = None) -> Any:
        """Finish the gradient exchange, then update (see the class doc). ``closure`` is evaluated first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.dp.finish()
        t0 = time.perf_counter()
        if self.shard_optimizer is None:
            self.optimizer.step()
        else:
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
        """The wrapped optimizer's state dict with the full state (all-gathered shards; a collective)."""
        if self.shard_optimizer is not None:
            self._gather_state()
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
        if self.shard_optimizer is not None:
            self._scatter_state()

    @torch.no_grad()
    def _gather_state(self) -> None:
        dp = self.dp
        for b in dp.buckets:
            shard_state = self.shard_optimizer.state.get(b.shard_param, {})
            for key in sorted(shard_state):
                value = shard_state[key]
                if isinstance(value, torch.Tensor) and value.shape == b.shard_param.shape:
                    full = torch.empty(b.padded, dtype=value.dtype, device=value.device)
                    dp.group.all_gather(full, value.contiguous(), f"all_gather of optimizer state {key!r}, "
                                                                  f"bucket {b.index}").wait()
                    for p, off in zip(b.params, b.offsets):
                        self.optimizer.state[p][key] = full[off:off + p.numel()].view_as(p).clone()
                else:
                    for p in b.params:
                        self.optimizer.state[p][key] = value.clone() if isinstance(value, torch.Tensor) else value

    @torch.no_grad()
    def _scatter_state(self) -> None:
        dp = self.dp
        r = dp.group.rank
        for b in dp.buckets:
            first = self.optimizer.state.get(b.params[0], {})
            new: dict[str, Any] = {}
            for key, value in first.items():
                if isinstance(value, torch.Tensor) and value.shape == b.params[0].shape:
                    flat = torch.zeros(b.padded, dtype=value.dtype, device=value.device)
                    for p, off in zip(b.params, b.offsets):
                        flat[off:off + p.numel()].copy_(self.optimizer.state[p][key].reshape(-1))
                    new[key] = flat[r * b.chunk:(r + 1) * b.chunk].clone()
                else:
                    new[key] = value.clone() if isinstance(value, torch.Tensor) else value
            if new:
                self.shard_optimizer.state[b.shard_param] = new


class DataParallelHooks(Hooks):
    """Plug :class:`DataParallel` into :func:`leantrain.train.fit` (and so into ``leantrain train --dp``).

    ``fit`` is called on every rank with the *global* batch size ``P * b``; :meth:`shard` hands rank ``d`` of
    the data group rows ``[d*B/P, (d+1)*B/P)`` of each global batch ``B`` drawn from the shared epoch order,
    so ``P`` ranks see exactly the batches one process with batch ``P*b`` would. Only global rank 0 writes
    checkpoints; their content (model, full optimizer state, every rank's error-feedback residuals) is the
    same on every rank, so a restart of all ranks from it (``torchrun --max-restarts``) continues exactly.

    ``inner`` hooks (e.g. a precision layer's loss scaling) keep working: ``backward`` and ``step`` are theirs,
    run after the gradient exchange has finished. Keyword arguments go to :class:`DataParallel`.
    """

    def __init__(self, distribution: Distribution | None = None, *, inner: Hooks | None = None, **dp_kwargs: Any) -> None:
        self.distribution = distribution if distribution is not None else Distribution()
        self.inner = inner if inner is not None else Hooks()
        self.dp_kwargs = dp_kwargs
        self.dp: DataParallel | None = None
        self.optimizer: DistributedOptimizer | None = None
        self._comm_state: dict[str, Any] = {}
        if dp_kwargs.get("distributed_update") and getattr(self.inner, "scaler", None) is not None:
            raise ValueError(f"distributed_update cannot be combined with loss scaling ({type(self.inner).__name__}): "
                             "unscaling and the overflow check read param.grad, which the sharded update bypasses")

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        model, optimizer = self.inner.wrap(model, optimizer)
        self.dp = DataParallel(model, self.distribution, **self.dp_kwargs)
        self.optimizer = self.dp.optimizer(optimizer)
        self.dp.load_comm_state_dict(self._comm_state)
        return self.dp, self.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.inner.backward(loss)

    def step(self, optimizer: Any) -> bool:
        if self.dp is not None:
            self.dp.finish()
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
