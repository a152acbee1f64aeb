"""How far will synchronous data-parallel training scale? An alpha-beta model fed by measured compute.

**Collectives** (``P`` processes, ``n`` bytes, per-message latency ``alpha`` s, link bandwidth ``beta`` bytes/s):

- ring all-reduce: ``2(P-1) alpha + 2 (P-1)/P * n / beta`` (reduce-scatter then all-gather around a ring);
- tree all-reduce: ``2 ceil(log2 P) alpha + 2 n / beta`` (pipelined binary-tree reduce then broadcast: the
  latency grows with ``log P``, the bandwidth term does not shrink with ``P``);
- hierarchical (``g`` ranks per node, ``P = nodes * g``): ring reduce-scatter inside the node over the fast
  intra-node link, ring all-reduce of ``n/g`` bytes across nodes, ring all-gather inside the node;
- reduce-scatter, all-gather (ring): ``(P-1) alpha + (P-1)/P * n / beta`` each;
- compressed exchange (leantrain's two phases): all-to-all plus all-gather of the compressed payload ``n_c``:
  ``2 (P-1) alpha + 2 (P-1)/P * n_c / beta``, plus the measured encode/decode time.

**Step time** (weak scaling: per-process batch fixed). Measured here for one process: forward time ``F``, the
time ``r_j`` after backward starts at which bucket ``j`` is ready (gradient hooks), backward time ``B`` and
update time ``U``. With overlap the buckets go over one link in ready order:
``s_j = max(r_j, e_{j-1})``, ``e_j = s_j + c_j`` and the exposed communication is ``max(0, e_last - B)``;
without overlap it is ``sum_j c_j``. ``T(P) = F + B + exposed + U`` (the distributed update replaces ``U`` by
``U/P`` plus a parameter all-gather, and the all-reduce by a reduce-scatter). Throughput ``P b / T(P)``,
scaling efficiency ``E(P) = T(1) / T(P)``.

Everything here is arithmetic on measured or given numbers; :func:`profile_model` does the measuring.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Network", "ModelProfile", "allreduce_time", "reduce_scatter_time", "all_gather_time", "compressed_time",
           "profile_model", "predict", "fit_alpha_beta", "ALGORITHMS"]

ALGORITHMS = ("ring", "tree", "hierarchical")


@dataclass(frozen=True)
class Network:
    """Link parameters: ``latency_s`` (alpha) per message and ``bandwidth`` in bytes/s (beta), between nodes;
    ``ranks_per_node`` processes per node with ``intra_*`` for their shared-memory link (hierarchical only)."""

    latency_s: float
    bandwidth: float
    algorithm: str = "ring"
    ranks_per_node: int = 1
    intra_latency_s: float = 1e-6
    intra_bandwidth: float = 50e9

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if not (self.latency_s >= 0 and self.bandwidth > 0 and self.intra_latency_s >= 0 and self.intra_bandwidth > 0):
            raise ValueError(f"latency must be >= 0 and bandwidth > 0, got {self.latency_s}, {self.bandwidth}")
        if self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1, got {self.ranks_per_node}")

    @classmethod
    def from_units(cls, bandwidth_gbit: float, latency_us: float, algorithm: str = "ring", **kw: Any) -> Network:
        """From Gbit/s and microseconds (how links are usually quoted)."""
        return cls(latency_s=latency_us * 1e-6, bandwidth=bandwidth_gbit * 1e9 / 8, algorithm=algorithm, **kw)


def _ring(nbytes: float, p: int, alpha: float, beta: float) -> float:
    return 0.0 if p <= 1 else 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / beta


def allreduce_time(nbytes: float, p: int, net: Network) -> float:
    """Seconds for an all-reduce of ``nbytes`` over ``p`` processes (see the module doc for the formulas)."""
    if p <= 1:
        return 0.0
    if net.algorithm == "ring":
        return _ring(nbytes, p, net.latency_s, net.bandwidth)
    if net.algorithm == "tree":
        return 2 * math.ceil(math.log2(p)) * net.latency_s + 2 * nbytes / net.bandwidth
    g = min(net.ranks_per_node, p)
    nodes = max(1, p // g)
    inside = 0.0 if g == 1 else 2 * ((g - 1) * net.intra_latency_s + (g - 1) / g * nbytes / net.intra_bandwidth)
    return inside + _ring(nbytes / g, nodes, net.latency_s, net.bandwidth)


def reduce_scatter_time(nbytes: float, p: int, net: Network) -> float:
    """Ring reduce-scatter (also the all-gather time): ``(P-1) alpha + (P-1)/P n / beta``."""
    return 0.0 if p <= 1 else (p - 1) * net.latency_s + (p - 1) / p * nbytes / net.bandwidth


all_gather_time = reduce_scatter_time


def compressed_time(payload_bytes: float, p: int, net: Network, *, both_phases: bool = True) -> float:
    """All-to-all (+ all-gather) of a compressed payload of ``payload_bytes`` per rank."""
    one = reduce_scatter_time(payload_bytes, p, net)
    return 2 * one if both_phases else one


@dataclass
class ModelProfile:
    """One process's measured step: forward, backward, update seconds; per bucket its bytes and ready time
    (seconds after backward starts), plus encode+decode seconds per bucket for each compression."""

    name: str
    batch_size: int
    forward_s: float
    backward_s: float
    update_s: float
    bucket_bytes: list[int]
    bucket_ready_s: list[float]
    numel: int
    codec_s: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def profile_model(model: nn.Module, example: torch.Tensor, target: torch.Tensor, *, loss_fn: Any = None,
                  bucket_mb: float = 25.0, steps: int = 5, compressions: tuple[str, ...] = ("int8",),
                  name: str = "model") -> ModelProfile:
    """Measure forward, backward (with per-bucket readiness) and update of one SGD step in this process.

    Buckets are laid out as :class:`~leantrain.distributed.DataParallelModule` would (same code, a one-process
    world). Medians over ``steps`` after one warm-up step.
    """
    from leantrain.distributed.compression import get_compression
    from leantrain.distributed.data_parallel import DataParallelModule

    loss_fn = loss_fn or nn.functional.cross_entropy
    dp = DataParallelModule(model, bucket_mb=bucket_mb, broadcast=False)
    opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))
    fwd, bwd, upd, ready = [], [], [], []
    for i in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = loss_fn(dp(example), target)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i == 0:
            continue
        st = dp.stats[-1]
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        upd.append(t3 - t2)
        ready.append([b.ready_s - (t1 - t0) for b in st.buckets])
    layout = dp.layout()
    dp.close()
    bucket_ready = [_median([r[j] for r in ready]) for j in range(len(layout))]
    codec: dict[str, list[float]] = {}
    for cname in compressions:
        comp = get_compression(cname)
        times = []
        for b in layout:
            x = torch.randn(1, b["numel"])
            t0 = time.perf_counter()
            for _ in range(3):
                comp.decode(comp.encode(x), b["numel"])
            times.append((time.perf_counter() - t0) / 3 * 2)  # two phases: worker and owner side
        codec[cname] = times
    return ModelProfile(name=name, batch_size=int(example.shape[0]), forward_s=_median(fwd), backward_s=_median(bwd),
                        update_s=_median(upd), bucket_bytes=[b["bytes"] for b in layout], bucket_ready_s=bucket_ready,
                        numel=sum(b["numel"] for b in layout), codec_s=codec)


def predict(profile: ModelProfile, nodes: list[int], net: Network, *, overlap: bool = True, compression: str = "none",
            distributed_update: bool = False, compute_scale: Any = None) -> list[dict[str, float]]:
    """Predicted step time, throughput and efficiency for each process count in ``nodes`` (see the module doc).

    ``compute_scale(P) -> factor`` multiplies the measured compute times (e.g. CPU oversubscription when ``P``
    processes share fewer cores in a validation run); default 1.
    """
    from leantrain.distributed.compression import get_compression

    comp = get_compression(compression)
    rows = []
    for p in nodes:
        if p < 1:
            raise ValueError(f"process counts must be >= 1, got {p}")
        k = float(compute_scale(p)) if compute_scale is not None else 1.0
        f, b, u = profile.forward_s * k, profile.backward_s * k, profile.update_s * k
        costs = []
        for j, nbytes in enumerate(profile.bucket_bytes):
            n = nbytes // 4
            if p == 1:
                costs.append(0.0)
            elif comp.name != "none":
                chunk = -(-n // p)
                codec = profile.codec_s.get(comp.name, [0.0] * len(profile.bucket_bytes))[j] * k
                costs.append(compressed_time(p * comp.payload_bytes(chunk), p, net, both_phases=not distributed_update)
                             + codec)
            elif distributed_update:
                costs.append(reduce_scatter_time(nbytes, p, net))
            else:
                costs.append(allreduce_time(nbytes, p, net))
        comm = sum(costs)
        if overlap:
            end = 0.0
            for r, c in sorted(zip([x * k for x in profile.bucket_ready_s], costs)):
                end = max(r, end) + c
            exposed = max(0.0, end - b)
        else:
            exposed = comm
        update = u
        if distributed_update and p > 1:
            update = u / p + sum(all_gather_time(nb, p, net) for nb in profile.bucket_bytes)
        step = f + b + exposed + update
        rows.append({"processes": p, "step_s": step, "compute_s": f + b + update, "comm_s": comm,
                     "exposed_comm_s": exposed, "throughput": p * profile.batch_size / step})
    t1 = None
    for r in rows:
        if r["processes"] == 1:
            t1 = r["step_s"]
    if t1 is None:  # efficiency relative to the one-process step of the same profile
        t1 = profile.forward_s + profile.backward_s + profile.update_s
    for r in rows:
        r["efficiency"] = t1 / r["step_s"]
    return rows


def fit_alpha_beta(sizes: list[float], seconds: list[float], p: int) -> tuple[float, float]:
    """Least-squares ``(alpha, beta)`` of the ring all-reduce model from measured (bytes, seconds) pairs.

    ``t = 2(P-1) alpha + 2(P-1)/P * n / beta``: linear in ``n`` with intercept ``2(P-1) alpha`` and slope
    ``2(P-1)/(P beta)``. Raises ValueError for fewer than two sizes, ``P < 2`` or a non-positive slope.
    """
    if len(sizes) < 2 or len(sizes) != len(seconds):
        raise ValueError("fit_alpha_beta needs at least two (size, seconds) pairs")
    if p < 2:
        raise ValueError(f"p must be >= 2, got {p}")
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(seconds) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sxx
    intercept = my - slope * mx
    if slope <= 0:
        raise ValueError(f"measured times do not grow with message size (slope {slope:g}); cannot fit bandwidth")
    alpha = max(intercept, 0.0) / (2 * (p - 1))
    beta = 2 * (p - 1) / (p * slope)
    return alpha, beta


def plot_scaling(path: Any, series: dict[str, list[dict[str, float]]], *, key: str = "efficiency", title: str = "",
                 points: dict[str, tuple[list[float], list[float]]] | None = None) -> Any:
    """Predicted ``key`` against processes (log2 axis) per series, plus optional measured ``points``."""
    from leantrain.plots import save_figure, subplots

    fig, ax = subplots(figsize=(6.4, 4.2))
    for label, rows in series.items():
        ax.plot([r["processes"] for r in rows], [r[key] for r in rows], marker=".", label=label)
    for label, (xs, ys) in (points or {}).items():
        ax.plot(xs, ys, linestyle="none", marker="o", markersize=7, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("processes")
    ax.set_ylabel({"efficiency": "scaling efficiency T(1)/T(P)", "step_s": "step time (s)",
                   "throughput": "samples/s"}.get(key, key))
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
