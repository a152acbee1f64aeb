"""Gradient buckets: flat buffers that hold a run of parameters' gradients, packed in backward order.

Trainable parameters are packed, in *reverse registration order* (the order backward produces their gradients),
into flat buckets of at most ``bucket_bytes`` (a larger parameter gets a bucket of its own). A bucket never mixes
dtypes, devices or parameter groups (the distributed update keeps optimizer groups apart). Bucket 0 holds the
last layers, the last bucket the first layers. Each bucket is padded to a multiple of the data-group size ``P``
so that rank ``r`` can own chunk ``r`` of it (reduce-scatter, compressed exchanges).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leantrain.distributed.distribution import Pending

__all__ = ["Bucket", "plan_buckets"]


class Bucket:
    """A flat gradient buffer for a run of parameters (in backward order), and its exchange state in this step.

    ``views[i]`` is parameter ``i``'s slice of ``grad`` shaped like the parameter, starting at ``offsets[i]``;
    ``chunk`` is the length each rank owns of the padded buffer (``padded = chunk * P``).
    """

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
        self.result: torch.Tensor | None = None  # compressed exchange: averaged flat gradient
        self.shard_grad: torch.Tensor | None = None  # distributed update: averaged owned chunk
        self.param_full: torch.Tensor | None = None  # distributed update: all-gathered flat parameters
        self.shard_param: nn.Parameter | None = None  # distributed update: this rank's chunk (master copy)
        self.pending = len(params)
        self.ready_time = self.launch_time = 0.0
        self.works: list[Pending] = []
        self.undivided: list[tuple[int, int]] = []  # ranges that backward accumulated into, still to divide by P
        self.staged_views: list[torch.Tensor] = []  # small gradients to copy into the bucket once it is complete
        self.staged_grads: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return self.numel * self.grad.element_size()

    @property
    def ready(self) -> bool:
        return self.pending == 0

    def reset(self) -> None:
        self.pending = len(self.params)
        self.works = []
        self.undivided = []
        self.staged_views, self.staged_grads = [], []
        self.result = None

    def undivided_runs(self) -> list[tuple[int, int]]:
        """The undivided ranges sorted and merged where they touch."""
        runs: list[tuple[int, int]] = []
        for lo, hi in sorted(self.undivided):
            if runs and runs[-1][1] >= lo:
                runs[-1] = (runs[-1][0], max(runs[-1][1], hi))
            else:
                runs.append((lo, hi))
        return runs

    def mark_undivided(self, offset: int, numel: int) -> None:
        """Record ``grad[offset:offset+numel]`` as still to divide by P, merged with the previous range when
        they touch (gradients mostly arrive in bucket order, so the exchange divides a few long runs)."""
        if self.undivided and self.undivided[-1][1] == offset:
            self.undivided[-1] = (self.undivided[-1][0], offset + numel)
        else:
            self.undivided.append((offset, offset + numel))


def plan_buckets(params: Sequence[tuple[nn.Parameter, int]], names: dict[nn.Parameter, str], bucket_bytes: int,
                 parts: int) -> list[Bucket]:
    """Pack ``(parameter, group index)`` pairs, already in backward order, into :class:`Bucket` s.

    A bucket closes before it would exceed ``bucket_bytes``, and when the group, dtype or device changes.
    """
    buckets: list[Bucket] = []
    cur: list[nn.Parameter] = []
    cur_group, size = -1, 0

    def close() -> None:
        buckets.append(Bucket(len(buckets), cur, [names.get(p, "?") for p in cur], parts, cur_group))

    for p, g in params:
        if cur and (size + p.numel() * p.element_size() > bucket_bytes or g != cur_group
                    or p.dtype != cur[0].dtype or p.device != cur[0].device):
            close()
            cur, size = [], 0
        cur.append(p)
        cur_group = g
        size += p.numel() * p.element_size()
    if cur:
        close()
    return buckets
