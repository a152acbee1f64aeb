"""How one bucket's gradients are averaged over the data group: the exchange strategies.

- :class:`AllReduceExchange`: the gradients enter the bucket already divided by ``P`` (the division folded into
  the copy from ``param.grad``, or done in place right before sending what backward accumulated into the bucket
  itself), and a ``SUM`` all-reduce then leaves the average, with no pass over the bucket afterwards. For a
  power-of-two ``P`` the division is exact and the result is bitwise ``dist.all_reduce(g) / P``; otherwise the
  two differ by rounding (about one ulp). Buckets above ``message_bytes`` go in pieces, each divided right
  before it starts, so that dividing piece ``k+1`` overlaps the transfer of piece ``k``.
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
from leantrain.distributed.distribution import Group

__all__ = ["Exchange", "AllReduceExchange", "ReduceScatterExchange", "CompressedExchange"]


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
            b.works.append(self.group.all_reduce(b.grad[lo:hi], f"all_reduce of {label}{where}"))


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
