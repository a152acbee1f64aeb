"""Benchmarks: a candidate and its named baseline, measured side by side in one process.

Each module in this package registers one benchmark with :func:`leantrain.app.registry.benchmark`.
A benchmark function ``run(quick: bool, device: str) -> dict`` returns
``{"rows": [row, ...], "checks": [check, ...], ...}`` where each row comes from :func:`compare`
(or :func:`measure` for an absolute figure) and each check from :func:`check`.

Timing rules, shared by every benchmark:

- candidate and baseline are *interleaved* (c, b, c, b, ...) after warm-up, so that drift of the
  machine (frequency, other load) hits both alike;
- each sample is the mean over ``inner`` calls, sized so that one sample lasts >= ``min_sample_s``;
- the figure is the median over ``repeats`` samples; the spread is the inter-quartile range
  divided by the median; the ratio is ``median(candidate) / median(baseline)`` (time ratio:
  below 1 means the candidate is faster).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["compare", "measure", "check", "sync"]


def sync(device: str | torch.device = "cpu") -> None:
    """Wait for queued device work, so that a timer measures it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _calibrate(fn: Callable[[], Any], min_sample_s: float, device: str) -> int:
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(min_sample_s / one))


def _sample(fn: Callable[[], Any], inner: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def _stats(samples: list[float]) -> dict[str, float]:
    med = statistics.median(samples)
    if len(samples) >= 4:
        q = statistics.quantiles(samples, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = max(samples) - min(samples)
    return {"median_s": med, "spread": iqr / med if med > 0 else 0.0, "min_s": min(samples)}


def measure(
    name: str,
    fn: Callable[[], Any],
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_sample_s: float = 0.05,
    device: str = "cpu",
    work: float | None = None,
    work_unit: str = "",
) -> dict[str, Any]:
    """Time ``fn`` alone; ``work`` (e.g. elements) per call gives a throughput ``work/s``."""
    for _ in range(warmup):
        fn()
    inner = _calibrate(fn, min_sample_s, device)
    samples = [_sample(fn, inner, device) for _ in range(repeats)]
    row: dict[str, Any] = {"name": name, **_stats(samples), "repeats": repeats, "inner": inner}
    if work is not None:
        row["throughput"] = work / row["median_s"]
        row["throughput_unit"] = f"{work_unit}/s"
    return row


def compare(
    name: str,
    candidate: Callable[[], Any],
    baseline: Callable[[], Any],
    *,
    baseline_name: str,
    repeats: int = 7,
    warmup: int = 2,
    min_sample_s: float = 0.05,
    device: str = "cpu",
    work: float | None = None,
    work_unit: str = "",
) -> dict[str, Any]:
    """Time ``candidate`` against ``baseline``, interleaved; returns one benchmark row.

    ``ratio`` is candidate time over baseline time. With ``work`` given, throughputs are reported
    too and ``throughput_ratio`` = baseline time / candidate time (= 1 / ratio).
    """
    for _ in range(warmup):
        candidate()
        baseline()
    inner_c = _calibrate(candidate, min_sample_s, device)
    inner_b = _calibrate(baseline, min_sample_s, device)
    cs: list[float] = []
    bs: list[float] = []
    for _ in range(repeats):
        cs.append(_sample(candidate, inner_c, device))
        bs.append(_sample(baseline, inner_b, device))
    c, b = _stats(cs), _stats(bs)
    row: dict[str, Any] = {
        "name": name,
        "baseline": baseline_name,
        "candidate_median_s": c["median_s"],
        "candidate_spread": c["spread"],
        "baseline_median_s": b["median_s"],
        "baseline_spread": b["spread"],
        "ratio": c["median_s"] / b["median_s"],
        "repeats": repeats,
    }
    if work is not None:
        row["candidate_throughput"] = work / c["median_s"]
        row["baseline_throughput"] = work / b["median_s"]
        row["throughput_unit"] = f"{work_unit}/s"
        row["throughput_ratio"] = b["median_s"] / c["median_s"]
    return row


def check(what: str, value: float, op: str, bound: float) -> dict[str, Any]:
    """A pass/fail line of a benchmark: ``value op bound`` with ``op`` in ``<=``, ``>=``."""
    if op not in ("<=", ">="):
        raise ValueError(f"op must be '<=' or '>=', got {op!r}")
    passed = value <= bound if op == "<=" else value >= bound
    return {"what": what, "value": value, "op": op, "bound": bound, "passed": bool(passed)}
