"""Which weights share one scale: FGQ groups, filter clusters, per channel, per tensor.

A weight tensor of a convolution has shape ``(K, C, kh, kw)`` (K output filters, C input channels)
and of a linear layer ``(K, C)``. Each output ``k`` is a dot product over the *reduction* dimension
of length ``R = C * kh * kw`` (``R = C`` for linear layers). Every grouping below cuts the weights
into groups; one group shares one scale ``alpha`` (and, for ternary weights, one threshold).

- ``fgq:N`` (fine-grained quantization, arXiv:1705.01462): groups of N consecutive weights of the
  same output filter along the reduction dimension, in ``(kh, kw, C)`` order (input channel
  fastest). With ``N <= C`` and ``N | C`` a group is N consecutive input channels at one kernel
  position, the notes' reading of the paper. Row ``k`` holds ``ceil(R / N)`` groups.
- ``cluster:N`` (arXiv:1701.08978): clusters of N whole output filters (consecutive, no k-means);
  each cluster of ``N * R`` weights shares one scale.
- ``channel``: one scale per output filter (= ``cluster:1``).
- ``tensor``: one scale for the whole tensor.

**Remainder rule.** When N does not divide the dimension it cuts (R for ``fgq``, K for
``cluster``), ``remainder="error"`` (the default) raises ValueError, and ``remainder="partial"``
states the padding rule: the *last* group of each row (fgq) or the last cluster (cluster) is
shorter, holding the ``R mod N`` (or ``K mod N``) remaining weights. Internally short groups are
padded with zeros, which the ternary and k-bit solvers provably ignore (a zero never enters the
support of the optimal ternary code and never raises a max).

Spec strings: ``"fgq:4"``, ``"fgq:64:partial"``, ``"cluster:8"``, ``"channel"``, ``"tensor"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Grouping", "GroupLayout", "KINDS", "REMAINDERS"]

KINDS: tuple[str, ...] = ("fgq", "cluster", "channel", "tensor")
REMAINDERS: tuple[str, ...] = ("error", "partial")


@dataclass(frozen=True)
class Grouping:
    """A grouping rule; see the module docstring. Build it directly or with :meth:`parse`."""

    kind: Literal["fgq", "cluster", "channel", "tensor"]
    size: int | None = None
    remainder: Literal["error", "partial"] = "error"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"grouping kind must be one of {KINDS}, got {self.kind!r}")
        if self.remainder not in REMAINDERS:
            raise ValueError(f"grouping remainder must be one of {REMAINDERS}, got {self.remainder!r}")
        if self.kind in ("fgq", "cluster"):
            if isinstance(self.size, bool) or not isinstance(self.size, int):
                raise TypeError(f"grouping {self.kind!r} needs an integer group size N, got {self.size!r}")
            if self.size < 1:
                raise ValueError(f"group size N must be >= 1, got {self.size}")
        elif self.size is not None:
            raise ValueError(f"grouping {self.kind!r} takes no group size, got {self.size!r}")

    @classmethod
    def parse(cls, spec: str | Grouping) -> Grouping:
        """``"fgq:N[:partial]"``, ``"cluster:N[:partial]"``, ``"channel"`` or ``"tensor"``."""
        if isinstance(spec, Grouping):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"groups must be a Grouping or a spec string like 'fgq:4', got {type(spec).__name__}")
        parts = spec.strip().lower().split(":")
        kind = parts[0]
        if kind not in KINDS:
            raise ValueError(f"unknown grouping {spec!r}: use 'fgq:N', 'cluster:N', 'channel' or 'tensor'")
        if kind in ("channel", "tensor"):
            if len(parts) != 1:
                raise ValueError(f"grouping {kind!r} takes no size, got {spec!r}")
            return cls(kind)  # type: ignore[arg-type]
        if len(parts) not in (2, 3):
            raise ValueError(f"grouping {spec!r} must look like '{kind}:N' or '{kind}:N:partial'")
        try:
            size = int(parts[1])
        except ValueError:
            raise ValueError(f"group size in {spec!r} must be an integer, got {parts[1]!r}") from None
        remainder = parts[2] if len(parts) == 3 else "error"
        return cls(kind, size, remainder)  # type: ignore[arg-type]

    def __str__(self) -> str:
        if self.kind in ("channel", "tensor"):
            return self.kind
        return f"{self.kind}:{self.size}" + (":partial" if self.remainder == "partial" else "")

    def layout(self, shape: torch.Size | tuple[int, ...]) -> GroupLayout:
        """The concrete cut of a weight tensor of ``shape`` (checks divisibility)."""
        return GroupLayout(self, tuple(int(s) for s in shape))


class GroupLayout:
    """A grouping applied to one weight shape: maps weights to a ``(G, n)`` group matrix and back.

    Attributes: ``K`` output filters, ``R`` reduction length, ``G`` groups, ``n`` (padded) group
    length, ``segments`` groups per output row along the reduction (``ceil(R/N)`` for fgq, else 1),
    ``counts`` the true (unpadded) number of weights in each group.
    """

    def __init__(self, grouping: Grouping, shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise ValueError(f"weight must have >= 2 dims (K, C, ...) to be grouped, got shape {shape}")
        if any(s < 1 for s in shape):
            raise ValueError(f"weight shape must be non-empty, got {shape}")
        self.grouping, self.shape = grouping, shape
        self.K, self.R = shape[0], math.prod(shape[1:])
        g = grouping
        if g.kind == "fgq":
            n = g.size
            assert n is not None
            if self.R % n and g.remainder == "error":
                raise ValueError(
                    f"group size N={n} does not divide the reduction dimension R={self.R} (C*kh*kw of weight "
                    f"shape {shape}); choose N dividing R or use remainder='partial' (last group of each row shorter)")
            self.segments, self.n = math.ceil(self.R / n), min(n, self.R)
            self.G = self.K * self.segments
            counts = torch.full((self.K, self.segments), self.n, dtype=torch.int64)
            counts[:, -1] = self.R - (self.segments - 1) * self.n
        else:
            size = {"cluster": g.size, "channel": 1, "tensor": self.K}[g.kind]
            assert size is not None
            if self.K % size and g.remainder == "error":
                raise ValueError(
                    f"cluster size N={size} does not divide the number of filters K={self.K} (weight shape {shape}); "
                    f"choose N dividing K or use remainder='partial' (last cluster smaller)")
            self.cluster = min(size, self.K)
            self.segments, self.n = 1, self.cluster * self.R
            self.G = math.ceil(self.K / self.cluster)
            counts = torch.full((self.G,), self.n, dtype=torch.int64)
            counts[-1] = (self.K - (self.G - 1) * self.cluster) * self.R
        self.counts = counts.reshape(-1)

    @property
    def segment_length(self) -> int:
        """Length of one scale segment of an output row: N for fgq (padded), else the whole row R."""
        return self.n if self.grouping.kind == "fgq" else self.R

    # -- reduction order -------------------------------------------------------------------------
    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` as a ``(K, R)`` matrix in reduction order ``(kh, kw, C)`` (channel fastest)."""
        self._check(w)
        if w.dim() > 2:
            w = w.movedim(1, -1)
        return w.reshape(self.K, self.R)

    def unrows(self, m: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rows`."""
        if len(self.shape) > 2:
            moved = (self.shape[0], *self.shape[2:], self.shape[1])
            return m.reshape(moved).movedim(-1, 1).contiguous()
        return m.reshape(self.shape)

    def reduction_permutation(self) -> torch.Tensor:
        """Index ``p`` with ``unfold(x)[:, p]`` in reduction order (for the integer conv path).

        ``torch.nn.functional.unfold`` orders the reduction as ``(C, kh, kw)``; our order is
        ``(kh, kw, C)``.
        """
        if len(self.shape) == 2:
            return torch.arange(self.R)
        idx = torch.arange(self.R).reshape(self.shape[1:])
        return idx.movedim(0, -1).reshape(-1)

    # -- groups ----------------------------------------------------------------------------------
    def to_groups(self, w: torch.Tensor) -> torch.Tensor:
        """The ``(G, n)`` group matrix of ``w`` (short groups zero-padded at the end)."""
        m = self.rows(w)
        if self.grouping.kind == "fgq":
            pad = self.segments * self.n - self.R
            if pad:
                m = torch.nn.functional.pad(m, (0, pad))
            return m.reshape(self.G, self.n)
        pad_rows = self.G * self.cluster - self.K
        if pad_rows:
            m = torch.cat([m, m.new_zeros(pad_rows, self.R)])
        return m.reshape(self.G, self.n)

    def from_groups(self, g: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_groups` (padding dropped), in the weight's shape."""
        if self.grouping.kind == "fgq":
            m = g.reshape(self.K, self.segments * self.n)[:, : self.R]
        else:
            m = g.reshape(self.G * self.cluster, self.R)[: self.K]
        return self.unrows(m)

    def valid_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean ``(G, n)``: True for real weights, False for padding."""
        return torch.arange(self.n, device=device)[None, :] < self.counts.to(device)[:, None]

    def row_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """Per-group ``scales`` (G,) as a ``(K, segments)`` matrix: the scale of row k, segment s."""
        if scales.shape != (self.G,):
            raise ValueError(f"scales must have shape ({self.G},) for {self.grouping} on {self.shape}, got {tuple(scales.shape)}")
        if self.grouping.kind == "fgq":
            return scales.reshape(self.K, self.segments)
        return scales.repeat_interleave(self.cluster)[: self.K].reshape(self.K, 1)

    def expand(self, scales: torch.Tensor) -> torch.Tensor:
        """Each weight's scale, in the weight's shape."""
        rs = self.row_scales(scales)
        if self.grouping.kind == "fgq":
            full = rs.repeat_interleave(self.n, dim=1)[:, : self.R]
        else:
            full = rs.expand(self.K, self.R)
        return self.unrows(full)

    def _check(self, w: torch.Tensor) -> None:
        if tuple(w.shape) != self.shape:
            raise ValueError(f"tensor shape {tuple(w.shape)} does not match the layout's weight shape {self.shape}")
