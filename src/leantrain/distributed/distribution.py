"""Process grids over ``torch.distributed``: MLSL's Distribution, with data, model and global groups.

A run of ``W`` processes is laid out as a grid of ``data_parts x model_parts`` (``W = D * M``). Global rank
``r`` sits at data index ``d = r // M`` and model index ``m = r % M``:

- the **model group** of ``r`` is ``{d*M + k : k < M}`` (contiguous ranks, so model-parallel partners share a
  node when ranks are packed per node): they hold different slices of the parameters for the same slice of
  the minibatch and exchange activations and activation gradients;
- the **data group** of ``r`` is ``{k*M + m : k < D}``: they hold the same parameter slice for different
  slices of the minibatch and exchange parameter gradients;
- the **global group** is every rank.

``Distribution(W, 1)`` is pure data parallelism, ``Distribution(1, W)`` pure model parallelism, anything in
between hybrid. Every collective here returns a :class:`Pending` request (MLSL's Start/Wait pair); waiting
on it converts a timeout or a dead peer into a :class:`CollectiveError` that names the rank, the
operation and the group, instead of a silent hang. A group of one rank does its "collective" locally and
needs no process group, so the same code runs in a single process without ``init_process_group``.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CollectiveError", "Pending", "Group", "Distribution", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0

# torch >= 2.10 renamed the tensor-in/tensor-out collectives; keep both spellings working (torch>=2.4 declared).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveError(RuntimeError):
    """A collective failed or did not finish within its timeout (a peer died, hung or diverged).

    Attributes ``rank`` (global rank that saw the failure), ``operation`` (what was being exchanged),
    ``group`` (the ranks involved) and ``elapsed_s``.
    """

    def __init__(self, rank: int, operation: str, group: Sequence[int], elapsed_s: float, timeout_s: float,
                 cause: BaseException | str) -> None:
        self.rank, self.operation, self.group, self.elapsed_s = rank, operation, list(group), elapsed_s
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(
            f"rank {rank}: collective {operation} over ranks {list(group)} failed after {elapsed_s:.1f} s "
            f"(timeout {timeout_s:g} s): {text}. A peer process probably died or is stuck; check the other "
            f"ranks' logs.")


@dataclass
class Pending:
    """A non-blocking collective in flight (MLSL's request). :meth:`wait` blocks until it completes.

    ``done_time`` (``time.perf_counter()`` of completion, recorded by the engine's completion callback or
    at the latest by :meth:`wait`) feeds the statistics and the timeline. With ``track=False`` no callback is
    registered and ``done_time`` is the time of :meth:`wait`: the callback runs Python on the engine's thread,
    which must take the GIL, and for the dozens of small messages of a pipelined exchange that cost ~5% of its
    time (measured on 2 gloo ranks).
    """

    operation: str
    group: Group
    work: Any = None
    started: float = field(default_factory=time.perf_counter)
    done_time: float | None = None
    nbytes: int = 0
    track: bool = True
    _after: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.work is None:
            self.done_time = self.started
            return
        if not self.track:
            return
        try:
            fut = self.work.get_future()
        except (RuntimeError, AttributeError):  # backends without futures: time at wait()
            return

        def mark(_f: Any) -> None:
            self.done_time = time.perf_counter()

        fut.add_done_callback(mark)

    def wait(self) -> None:
        """Wait for completion; raise :class:`CollectiveError` on failure or timeout."""
        if self.work is not None:
            timeout = self.group.timeout_s
            try:
                ok = self.work.wait(timeout=datetime.timedelta(seconds=timeout))
            except Exception as exc:  # gloo/nccl raise RuntimeError subclasses with backend text
                raise CollectiveError(self.group.global_rank, self.operation, self.group.ranks,
                                      time.perf_counter() - self.started, timeout, exc) from exc
            if ok is False:
                raise CollectiveError(self.group.global_rank, self.operation, self.group.ranks,
                                      time.perf_counter() - self.started, timeout, "timed out")
            self.work = None
        if self.done_time is None:
            self.done_time = time.perf_counter()
        for fn in self._after:
            fn()
        self._after.clear()

    def then(self, fn: Callable[[], None]) -> Pending:
        """Run ``fn`` (in the waiting thread) right after :meth:`wait` succeeds."""
        if self.work is None and not self._after and self.done_time is not None:
            fn()
        else:
            self._after.append(fn)
        return self


@dataclass
class Group:
    """A fixed set of global ranks and its ``torch.distributed`` process group (None for one rank).

    ``rank`` is this process's index inside the group; ``ranks[i]`` is the global rank of member ``i``.
    The collective methods take an ``operation`` label that error messages and traces show.
    """

    name: str
    ranks: list[int]
    handle: Any
    global_rank: int
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        return self.ranks.index(self.global_rank)

    def _run(self, operation: str, nbytes: int, launch: Callable[[], Any], track: bool = True) -> Pending:
        t0 = time.perf_counter()
        try:
            work = launch()
        except Exception as exc:
            raise CollectiveError(self.global_rank, operation, self.ranks, time.perf_counter() - t0,
                                  self.timeout_s, exc) from exc
        return Pending(operation, self, work, started=t0, nbytes=nbytes, track=track)

    def all_reduce(self, t: torch.Tensor, operation: str = "all_reduce", op: Any = None,
                   track: bool = True) -> Pending:
        """Sum (or ``op``) ``t`` in place over the group. ``track``: see :class:`Pending`."""
        if self.size == 1:
            return Pending(operation, self)
        nbytes = 2 * (self.size - 1) * t.numel() * t.element_size() // self.size  # ring: 2(P-1)/P * M sent
        return self._run(operation, nbytes, lambda: dist.all_reduce(t, op=op or dist.ReduceOp.SUM,
                                                                    group=self.handle, async_op=True), track)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, operation: str = "reduce_scatter") -> Pending:
        """``out`` (n) = sum over members of chunk ``rank`` of their ``inp`` (size * n)."""
        if inp.numel() != out.numel() * self.size:
            raise ValueError(f"reduce_scatter: input has {inp.numel()} elements, expected {self.size} x {out.numel()}")
        if self.size == 1:
            out.copy_(inp)
            return Pending(operation, self)
        nbytes = (self.size - 1) * out.numel() * out.element_size()
        return self._run(operation, nbytes, lambda: _reduce_scatter(out, inp, group=self.handle, async_op=True))

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, operation: str = "all_gather") -> Pending:
        """``out`` (size * n) = concatenation of every member's ``inp`` (n), in member order."""
        if out.numel() != inp.numel() * self.size:
            raise ValueError(f"all_gather: output has {out.numel()} elements, expected {self.size} x {inp.numel()}")
        if self.size == 1:
            out.copy_(inp.reshape(out.shape))
            return Pending(operation, self)
        nbytes = (self.size - 1) * inp.numel() * inp.element_size()
        return self._run(operation, nbytes, lambda: _all_gather(out, inp, group=self.handle, async_op=True))

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, operation: str = "all_to_all") -> Pending:
        """Chunk ``i`` of ``inp`` goes to member ``i``; chunk ``j`` of ``out`` comes from member ``j``."""
        if self.size == 1:
            out.copy_(inp)
            return Pending(operation, self)
        nbytes = (self.size - 1) * inp.numel() * inp.element_size() // self.size
        return self._run(operation, nbytes, lambda: dist.all_to_all_single(out, inp, group=self.handle, async_op=True))

    def broadcast(self, t: torch.Tensor, src: int = 0, operation: str = "broadcast") -> Pending:
        """Copy member ``src``'s ``t`` to every member (``src`` is a group index, not a global rank)."""
        if self.size == 1:
            return Pending(operation, self)
        nbytes = t.numel() * t.element_size() if self.rank == src else 0
        return self._run(operation, nbytes, lambda: dist.broadcast(t, src=self.ranks[src], group=self.handle,
                                                                   async_op=True))

    def send(self, t: torch.Tensor, dst: int, tag: int, operation: str = "send", track: bool = True) -> Pending:
        """Send ``t`` to member ``dst`` (a group index); matched by the :meth:`recv` with the same ``tag`` there.
        ``track``: see :class:`Pending`."""
        if dst == self.rank or not 0 <= dst < self.size:
            raise ValueError(f"dst must be another member's index in 0..{self.size - 1}, got {dst}")
        return self._run(operation, t.numel() * t.element_size(),
                         lambda: dist.isend(t, dst=self.ranks[dst], group=self.handle, tag=tag), track)

    def recv(self, t: torch.Tensor, src: int, tag: int, operation: str = "recv", track: bool = True) -> Pending:
        """Receive into ``t`` what member ``src`` (a group index) sends with ``tag``. ``track``: see :class:`Pending`."""
        if src == self.rank or not 0 <= src < self.size:
            raise ValueError(f"src must be another member's index in 0..{self.size - 1}, got {src}")
        return self._run(operation, 0, lambda: dist.irecv(t, src=self.ranks[src], group=self.handle, tag=tag), track)

    def all_gather_object(self, obj: Any, operation: str = "all_gather_object") -> list[Any]:
        """Every member's picklable ``obj``, in member order (blocking)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        t0 = time.perf_counter()
        try:
            dist.all_gather_object(out, obj, group=self.handle)
        except Exception as exc:
            raise CollectiveError(self.global_rank, operation, self.ranks, time.perf_counter() - t0,
                                  self.timeout_s, exc) from exc
        return out


class Distribution:
    """A ``data_parts x model_parts`` grid over all processes, with its data, model and global groups.

    Args:
        data_parts: number of minibatch slices (data-parallel replicas); default ``world_size // model_parts``.
        model_parts: number of parameter slices (model-parallel partners), default 1.
        timeout_s: how long any collective may take before it raises :class:`CollectiveError`.

    Without an initialized default process group the world is this one process (``Distribution(1, 1)``).
    All ranks must construct their Distributions in the same order (torch creates subgroups collectively).
    """

    def __init__(self, data_parts: int | None = None, model_parts: int = 1, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialized else 1
        rank = dist.get_rank() if initialized else 0
        if not isinstance(model_parts, int) or model_parts < 1:
            raise ValueError(f"model_parts must be a positive int, got {model_parts!r}")
        if data_parts is None:
            data_parts = world // model_parts
        if not isinstance(data_parts, int) or data_parts < 1:
            raise ValueError(f"data_parts must be a positive int, got {data_parts!r}")
        if data_parts * model_parts != world:
            raise ValueError(f"data_parts x model_parts must equal the world size {world}, "
                             f"got {data_parts} x {model_parts} = {data_parts * model_parts}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.data_parts, self.model_parts, self.world_size, self.rank = data_parts, model_parts, world, rank
        self.timeout_s = float(timeout_s)
        self.backend = dist.get_backend() if initialized else "none"
        d, m = divmod(rank, model_parts)
        model_sets = [[k * model_parts + j for j in range(model_parts)] for k in range(data_parts)]
        data_sets = [[k * model_parts + j for k in range(data_parts)] for j in range(model_parts)]
        self.global_group = self._group("global", list(range(world)), [list(range(world))])
        self.model_group = self._group("model", model_sets[d], model_sets)
        self.data_group = self._group("data", data_sets[m], data_sets)

    def _group(self, name: str, mine: list[int], all_sets: list[list[int]]) -> Group:
        handle = None
        if len(mine) > 1:
            if len(mine) == self.world_size:
                handle = dist.group.WORLD
            else:
                timeout = datetime.timedelta(seconds=self.timeout_s)
                for ranks in all_sets:  # every rank must create every subgroup, in the same order
                    h = dist.new_group(ranks, timeout=timeout)
                    if ranks == mine:
                        handle = h
        return Group(name, mine, handle, self.rank, self.timeout_s)

    @property
    def data_rank(self) -> int:
        """Index of this process in its data group (which minibatch slice it trains on)."""
        return self.data_group.rank

    @property
    def data_size(self) -> int:
        return self.data_group.size

    @property
    def model_rank(self) -> int:
        """Index of this process in its model group (which parameter slice it holds)."""
        return self.model_group.rank

    @property
    def model_size(self) -> int:
        return self.model_group.size

    @property
    def kind(self) -> str:
        """``"single"``, ``"data"``, ``"model"`` or ``"hybrid"``."""
        if self.world_size == 1:
            return "single"
        if self.model_parts == 1:
            return "data"
        return "model" if self.data_parts == 1 else "hybrid"

    def __repr__(self) -> str:
        return (f"Distribution(data_parts={self.data_parts}, model_parts={self.model_parts}; rank {self.rank}/"
                f"{self.world_size}: data group {self.data_group.ranks}, model group {self.model_group.ranks}, "
                f"backend {self.backend})")
