"""``ProgressiveSampler``: the batch sampler that :class:`~leantrain.optim.PBQN` resizes.

Use it as ``DataLoader(dataset, batch_sampler=sampler)``. Batch ``k`` is laid out as

    S_k = [ O_{k-1} | N_k | O_k ]

- ``O_{k-1}``: the overlap carried from batch ``k-1`` (empty for the first batch);
- ``N_k``: fresh indices, drawn uniformly without replacement from the indices not in ``O_{k-1}``;
- ``O_k``: the last ``floor(overlap * |S_k|)`` of the fresh draws, carried into batch ``k+1``.

So consecutive batches share exactly ``O_k`` (the multi-batch curvature pairs of PBQN use it),
indices within a batch are distinct, and a batch of the full size ``n`` is the whole data set.
The first full-size batch follows the layout (it starts with the carried ``O_{k-1}``); every later
one repeats it in the *same order*, so a function of the batch order (the micro-batches PBQN
evaluates BatchNorm models on) is the same function at every full-data iteration.
The batch size never decreases and is capped at ``n``; :meth:`grow_to` is how the optimizer
enlarges it. Resizing takes effect at the next batch the sampler *generates*: with a
DataLoader that prefetches (``num_workers > 0``) it lags by the prefetched batches, which is
harmless because the optimizer reads each batch's layout from its length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ProgressiveSampler", "overlap_size"]


def overlap_size(batch_size: int, overlap: float) -> int:
    """Size of the overlap ``O_k`` carried out of a batch: ``floor(overlap * batch_size)``."""
    return int(math.floor(overlap * batch_size + 1e-9))


class ProgressiveSampler(Sampler[list[int]]):
    """A growing, overlapping batch sampler (see the module docstring).

    Args:
        data_source: the data set (anything with ``len``) or its size ``n``.
        batch_size: the initial batch size ``|S_0|`` (1 <= batch_size; capped at ``n``).
        overlap: fraction of each batch carried into the next, in [0, 0.5] (PBQN's multi-batch
            option uses 0.25; 0 for full-overlap pairs).
        seed: seed of the index stream.
        num_batches: batches per ``iter()`` (``None``: an endless stream). The stream continues
            across ``iter()`` calls; it never restarts.
    """

    def __init__(self, data_source: Sized | int, batch_size: int, *, overlap: float = 0.25, seed: int = 0,
                 num_batches: int | None = None) -> None:
        n = data_source if isinstance(data_source, int) else len(data_source)
        if n < 1:
            raise ValueError("data_source: the data set is empty; ProgressiveSampler needs at least one sample")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not 0.0 <= overlap <= 0.5:
            raise ValueError(f"overlap must be in [0, 0.5], got {overlap}")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
        self.num_samples = int(n)
        self.overlap = float(overlap)
        self.num_batches = num_batches
        self._batch_size = min(int(batch_size), self.num_samples)
        self._rng = np.random.default_rng(seed)
        self._carry: list[int] = []
        self._full: list[int] | None = None
        self.batches_drawn = 0

    @property
    def batch_size(self) -> int:
        """The size of the next batch to be generated."""
        return self._batch_size

    def grow_to(self, size: int) -> int:
        """Set the batch size to ``min(n, max(current, size))`` (never shrinks); returns it."""
        self._batch_size = min(self.num_samples, max(self._batch_size, int(size)))
        return self._batch_size

    def next_batch(self) -> list[int]:
        """Generate the next batch of indices ``[O_{k-1} | N_k | O_k]``."""
        b = self._batch_size
        if b == self.num_samples and self._full is not None:
            self.batches_drawn += 1
            return list(self._full)
        carried = self._carry
        perm = self._rng.permutation(self.num_samples)
        if carried:
            keep = np.ones(self.num_samples, dtype=bool)
            keep[carried] = False
            perm = perm[keep[perm]]
        fresh = perm[: b - len(carried)].tolist()
        batch = carried + fresh
        c = overlap_size(b, self.overlap)
        self._carry = batch[len(batch) - c:] if c else []
        if b == self.num_samples:
            self._full = list(batch)
        self.batches_drawn += 1
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        count = 0
        while self.num_batches is None or count < self.num_batches:
            yield self.next_batch()
            count += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("ProgressiveSampler is an endless stream; give num_batches to give it a length")
        return self.num_batches

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self._batch_size, "carry": list(self._carry), "rng": self._rng.bit_generator.state,
                "batches_drawn": self.batches_drawn, "num_samples": self.num_samples, "overlap": self.overlap,
                "full": None if self._full is None else list(self._full)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.num_samples or state["overlap"] != self.overlap:
            raise ValueError("sampler state is for a different data size or overlap")
        self._batch_size = int(state["batch_size"])
        self._carry = [int(i) for i in state["carry"]]
        self._rng.bit_generator.state = state["rng"]
        self.batches_drawn = int(state["batches_drawn"])
        full = state.get("full")
        self._full = None if full is None else [int(i) for i in full]
