"""How one bucket's gradients are averaged over the data group: the exchange strategies.

- :class:`AllReduceExchange`: the gradients enter the bucket already divided by ``P`` (the division folded into
  the copy from ``param.grad``, or done in place right before sending what backward accumulated into the bucket
  itself), and a ``SUM`` all-reduce then leaves the average, with no pass over the bucket afterwards. For a
  power-of-two ``P`` the division is exact and the result is bitwise ``dist.all_reduce(g) / P``; otherwise the
  two differ by rounding (about one ulp). Buckets above ``message_bytes`` go in pieces, each divided right
  before it starts, so that dividing piece ``k+1`` overlaps the transfer of piece ``k``.
- :class:`PairwiseExchange` (two data ranks, buckets of at least ``min_bytes`` on the CPU): the average computed
  by the ranks themselves, in two point-to-point phases per piece, so that the division by 2 rides on the
  reduction instead of costing a pass of its own. Piece ``[lo, hi)`` has halves ``[lo, mid)`` (owned by rank 0)
  and ``[mid, hi)`` (rank 1): each rank sends the half it does not own and receives the peer's copy of the
  half it owns (phase 1), reduces it, ``mine = mine/2 + theirs/2``, and sends it back while receiving the other
  reduced half (phase 2). That is ``round(a/2 + b/2)`` per element, bitwise what the pre-divided ``SUM``
  all-reduce gives (``a/2`` and ``b/2`` are exact for normal numbers; the multiply-add rounds once), and the
  same ``M`` bytes sent per rank as a ring all-reduce. Pieces are pipelined, ``depth`` in flight, so reducing
  one overlaps the transfers of the others; the scratch for received halves is ``depth`` half-pieces. On 2 gloo
  ranks (2 cores) this averages a 64 MB bucket at about the bus bandwidth of a raw ``SUM`` all-reduce that does
  not average, where dividing first and then all-reducing loses the ~8% that the extra pass costs. Buckets
  under ``MIN_BYTES`` (too few pieces to pipeline) and GPU tensors (whose collectives average by themselves)
  use :class:`AllReduceExchange`.
- :class:`ReduceScatterExchange` (distributed update): the same pre-divided sum, reduce-scattered, so rank
  ``r`` receives the averaged chunk ``r`` of the padded bucket (``Bucket.shard_grad``).
- :class:`CompressedExchange`: two phases that keep the ring's cost ``2(P-1)/P`` of the payload. Every rank
  splits its (undivided) bucket into ``P`` chunks, compresses them and sends chunk ``j`` to rank ``j``
  (all-to-all); rank ``j`` decompresses and averages its chunk in float32, compresses the average and
  all-gathers it (skipped with the distributed update, which keeps the averaged chunk). Error feedback, at both
  phases: ``v = g + e; send C(v); e <- v - D(C(v))``. Stochastic rounding (int8) draws from a generator seeded
  per (rank seed, step, bucket) before the bucket's first encode, so the result does not depend on the order in
  which the communication thread happens to exchange the buckets (priority picks depend on timing).

Every collective is non-blocking: :meth:`Exchange.start` appends the :class:`Pending` requests to
``bucket.works``; a compressed exchange blocks between its phases, so it runs on the communication thread.
"""

from __future__ import annotations

import torch

from leantrain.distributed.buckets import Bucket
from leantrain.distributed.compression import Compression
from leantrain.distributed.distribution import Group, Pending

__all__ = ["Exchange", "AllReduceExchange", "PairwiseExchange", "ReduceScatterExchange", "CompressedExchange"]


class Exchange:
    """Start the averaging of one bucket over ``group``.

    ``scale`` is the factor applied on the way into the bucket (``1/P`` when the collective sums, None when the
    exchange averages by itself); ``blocks`` says whether :meth:`start` waits part-way (then it must run on the
    communication thread to keep backward going).
    """

    blocks = False

    def __init__(self, group: Group) -> None:
        self.group, self.parts = group, group.size

    @property
    def scale(self) -> float | None:
        return 1.0 / self.parts if self.parts > 1 else None

    def start(self, b: Bucket, label: str, message_bytes: int) -> None:
        raise NotImplementedError

    def divide(self, b: Bucket, lo: int, hi: int) -> None:
        """Divide by P, in place, what backward accumulated into ``b.grad[lo:hi]`` (ranges in ``b.undivided``)."""
        with torch.no_grad():
            for start, end in b.undivided:
                s, e = max(start, lo), min(end, hi)
                if s < e:
                    b.grad[s:e].mul_(self.scale)


class AllReduceExchange(Exchange):
    """``SUM`` all-reduce of the pre-divided bucket, in pieces of at most ``message_bytes``."""

    def start(self, b: Bucket, label: str, message_bytes: int) -> None:
        step = max(1, message_bytes // b.grad.element_size())
        pieces = range(0, b.padded, step)
        for lo in pieces:
            hi = min(lo + step, b.padded)
            if b.undivided:
                self.divide(b, lo, hi)
            where = f" [{lo}:{hi}]" if len(pieces) > 1 else ""
            b.works.append(self.group.all_reduce(b.grad[lo:hi], f"all_reduce of {label}{where}",
                                                 track=len(pieces) == 1))


class PairwiseExchange(AllReduceExchange):
    """Two data ranks: large buckets averaged in pipelined point-to-point halves (see the module doc), smaller
    ones by :class:`AllReduceExchange`. ``blocks`` (the exchange waits between its phases, so it runs on the
    communication thread) holds when some bucket of ``buckets`` is at least ``min_bytes``.
    """

    #: Buckets from this size up go pairwise. Below it there are too few pieces to pipeline: at 16 MB (4 pieces)
    #: the pairwise path measured 0.89-0.94x a raw all-reduce in the benchmark and dividing first, then
    #: all-reducing two 8 MB pieces, 0.90-1.04x (both with completion callbacks still on every message); at
    #: 64 MB (16 pieces) divide-first measured 0.86-0.99x, pairwise 0.997-1.06x (without callbacks).
    MIN_BYTES = 32 << 20
    #: Piece size and pieces in flight: 4 MB x 4 measured best of {1, 2, 4, 8} MB x {2, 4, 8, all} at 16-64 MB.
    PIECE_BYTES = 4 << 20
    DEPTH = 4

    def __init__(self, group: Group, buckets: list[Bucket], min_bytes: int | None = None) -> None:
        super().__init__(group)
        if group.size != 2:
            raise ValueError(f"PairwiseExchange needs a data group of 2 ranks, got {group.size}")
        self.min_bytes = int(self.MIN_BYTES if min_bytes is None else min_bytes)
        self.blocks = any(b.padded * b.grad.element_size() >= self.min_bytes for b in buckets)
        self._scratch: torch.Tensor | None = None

    def _slots(self, b: Bucket, half: int) -> torch.Tensor:
        need = self.DEPTH * half
        s = self._scratch
        if s is None or s.numel() < need or s.dtype != b.grad.dtype or s.device != b.grad.device:
            s = self._scratch = torch.empty(need, dtype=b.grad.dtype, device=b.grad.device)
        return s

    def start(self, b: Bucket, label: str, message_bytes: int) -> None:
        size = b.grad.element_size()
        if b.padded * size < self.min_bytes:
            super().start(b, label, message_bytes)
            return
        g, n, me = b.grad, b.padded, self.group.rank
        peer = 1 - me
        step = max(2, (self.PIECE_BYTES // size) // 2 * 2)  # even: each piece splits into equal halves
        starts = list(range(0, n, step))  # n is even (padded to a multiple of 2): every piece splits evenly
        half = step // 2
        slots = self._slots(b, half)
        fused = b.undivided_runs() == [(0, b.numel)]  # all undivided: halve on the way (else divide first)
        tag0 = b.index << 16  # distinct per bucket: a bucket's phase 2 may still be in flight when the next starts
        flight: dict[int, tuple[Pending, Pending, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def launch(i: int) -> None:
            lo = starts[i]
            hi = min(lo + step, n)
            mid = (lo + hi) // 2
            if not fused and b.undivided:
                self.divide(b, lo, hi)
            mine, theirs = (g[lo:mid], g[mid:hi]) if me == 0 else (g[mid:hi], g[lo:mid])
            slot = slots[(i % self.DEPTH) * half:(i % self.DEPTH) * half + mine.numel()]
            where = f"{label} [{lo}:{hi}]"
            # track=False: no completion callbacks for these dozens of messages (see Pending); done at wait
            flight[i] = (self.group.send(theirs, peer, tag0 + 2 * i, f"send (pairwise average, phase 1) of {where}",
                                         track=False),
                         self.group.recv(slot, peer, tag0 + 2 * i, f"recv (pairwise average, phase 1) of {where}",
                                         track=False),
                         mine, theirs, slot)

        for i in range(min(self.DEPTH, len(starts))):
            launch(i)
        with torch.no_grad():
            for i in range(len(starts)):
                sent, got, mine, theirs, slot = flight.pop(i)
                sent.wait()
                got.wait()
                if fused:
                    mine.mul_(0.5).add_(slot, alpha=0.5)
                else:
                    mine.add_(slot)
                where = f"{label} [{starts[i]}:{min(starts[i] + step, n)}]"
                b.works += [sent, got,
                            self.group.send(mine, peer, tag0 + 2 * i + 1,
                                            f"send (pairwise average, phase 2) of {where}", track=False),
                            self.group.recv(theirs, peer, tag0 + 2 * i + 1,
                                            f"recv (pairwise average, phase 2) of {where}", track=False)]
                if i + self.DEPTH < len(starts):
                    launch(i + self.DEPTH)


class ReduceScatterExchange(Exchange):
    """``SUM`` reduce-scatter of the pre-divided, padded bucket into ``b.shard_grad`` (chunk ``rank``)."""

    def start(self, b: Bucket, label: str, message_bytes: int) -> None:
        if b.undivided:
            self.divide(b, 0, b.padded)
        b.works.append(self.group.reduce_scatter(b.shard_grad, b.grad, f"reduce_scatter of {label}"))


class CompressedExchange(Exchange):
    """All-to-all of compressed chunks, float32 average, all-gather of the compressed average (see the module doc).

    ``sharded``: stop after the average (distributed update: ``b.shard_grad``); otherwise the decoded average
    lands in ``b.result``.
    """

    blocks = True

    def __init__(self, group: Group, compression: Compression, generator: torch.Generator, sharded: bool,
                 seed: int) -> None:
        super().__init__(group)
        self.compression, self.generator, self.sharded, self.seed = compression, generator, sharded, seed
        self.step = 0  # set by the module at the start of each step

    def _reseed(self, b: Bucket) -> None:
        # A fixed odd-multiplier mix of (seed, step, bucket): distinct streams per rank, step and bucket.
        mixed = (self.seed * 0x9E3779B97F4A7C15 + self.step * 0xBF58476D1CE4E5B9 + b.index * 0x94D049BB133111EB)
        self.generator.manual_seed(mixed % (1 << 63))

    @property
    def scale(self) -> float | None:
        return None  # the exchange averages in float32 itself

    def start(self, b: Bucket, label: str, message_bytes: int) -> None:
        comp, parts, c = self.compression, self.parts, b.chunk
        self._reseed(b)
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
        if self.sharded:
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
