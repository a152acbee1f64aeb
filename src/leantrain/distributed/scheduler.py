"""The communication thread: starts bucket exchanges during backward, first-in-first-out or by priority.

Buckets become *ready* in index order: bucket ``k`` counts as ready once buckets ``0..k`` all hold their
gradients on this rank, so every rank launches its collectives in the same order whatever order its backward
produced the gradients in (what keeps ranks with different graphs from pairing mismatched collectives).

**FIFO** (``priority=False``): each ready bucket's exchange starts in turn. The thread is only needed when an
exchange blocks part-way (the two phases of a compressed one); plain all-reduces start from the gradient hook.

**Priority** (``priority=True``): the next forward needs the *first* layers first, but backward readies them
*last*. The thread sends one bucket at a time and always picks, among the buckets ready on every rank, the one
closest to the input (highest index). The ranks agree on that set without a coordinator: they all-reduce (MIN)
their count of ready buckets, a prefix that every rank holds. The negotiation of the next pick travels together
with the exchange of the current one, and the last bucket (no choice left) goes without one, so the end of
backward waits for no negotiation round trip.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from leantrain.distributed.buckets import Bucket
from leantrain.distributed.distribution import CollectiveError, Group

__all__ = ["ExchangeScheduler"]


class ExchangeScheduler:
    """Runs ``start(bucket)`` for each bucket of a step on a daemon thread (MLSL's endpoint server, Horovod's
    background thread), in agreed priority order or FIFO. An exception on the thread is re-raised by :meth:`wait`.
    """

    def __init__(self, group: Group, start: Callable[[Bucket], None], priority: bool) -> None:
        self.group, self.start, self.priority = group, start, priority
        self._cv = threading.Condition()
        self._buckets: list[Bucket] = []
        self._ready = 0  # buckets[:_ready] are ready on this rank
        self._processed = 0  # buckets whose exchange this thread completed (priority) or started (FIFO)
        self._agreed = 0  # priority: length of the ready prefix that every rank holds
        self._heap: list[int] = []  # priority: agreed, not yet sent (sorted; last = highest priority)
        self._done = threading.Event()
        self._negotiation = torch.zeros(1, dtype=torch.int64)
        self._label = ""
        self.error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    def begin(self, buckets: list[Bucket], step_index: int) -> None:
        """A new step (called by the training thread while this thread is idle)."""
        if self.error is not None:
            raise self.error
        with self._cv:
            self._buckets, self._ready, self._processed, self._agreed, self._heap = buckets, 0, 0, 0, []
            self._label = f"step {step_index}"
            self._negotiation = torch.zeros(1, dtype=torch.int64, device=buckets[0].grad.device if buckets else "cpu")
            self._done.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="leantrain-comm", daemon=True)
            self._thread.start()

    def ready(self, count: int) -> None:
        """Buckets ``0..count-1`` are ready on this rank."""
        with self._cv:
            self._ready = count
            self._cv.notify()

    def wait(self, timeout_s: float, t_call: float, rank: int) -> None:
        """Block until every bucket of the step was handled; raise the thread's error or a timeout."""
        if not self._buckets:
            return
        if not self._done.wait(timeout_s) and self.error is None:
            raise CollectiveError(rank, f"{self._label} exchange (communication thread)", self.group.ranks,
                                  time.perf_counter() - t_call, timeout_s, "did not finish")
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._has_work():
                    self._cv.wait()
                if self._stop:
                    return
            try:
                if self.priority:
                    self._priority_round()
                else:
                    self.start(self._buckets[self._processed])
                    self._processed += 1
            except BaseException as exc:  # surfaced by wait() in the training thread
                self.error = exc
                self._done.set()
                return
            if self._processed == len(self._buckets):
                self._done.set()

    def _has_work(self) -> bool:
        if self._done.is_set() or not self._buckets:
            return False
        if self.priority:
            return self._ready > self._agreed or len(self._heap) > 0
        return self._ready > self._processed

    def _priority_round(self) -> None:
        # One round: the negotiation of the next pick goes over the link together with the exchange of this one
        # (picked from the previous negotiation). Every rank runs the same rounds: what a round does depends only
        # on the agreed state, which all ranks share.
        n, neg = len(self._buckets), None
        if self._agreed == n - 1 and not self._heap:
            # One bucket left and nothing queued: no choice to agree on; it is ready here (this round runs because
            # it is), so it goes at once and the end of backward does not wait for a negotiation round trip.
            self._heap = [n - 1]
            self._agreed = n
        elif self._agreed < n - 1:
            with self._cv:
                local = self._ready
            self._negotiation.fill_(local)
            neg = self.group.all_reduce(self._negotiation, f"priority negotiation ({self._label})",
                                        op=torch.distributed.ReduceOp.MIN)
        b = None
        if self._heap:
            b = self._buckets[self._heap.pop()]  # highest index = closest to the input = needed first next forward
            self.start(b)
        if neg is not None:
            neg.wait()
            agreed = int(self._negotiation.item())
            self._heap = sorted(self._heap + list(range(self._agreed, agreed)))
            self._agreed = agreed
        if b is not None:
            for w in b.works:
                w.wait()
            self._processed += 1
