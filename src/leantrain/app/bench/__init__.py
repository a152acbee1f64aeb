"""Benchmarks: a candidate and its named baseline, measured side by side in one process.

Each module in this package registers one benchmark with :func:`leantrain.app.registry.benchmark`.
A benchmark function ``run(quick: bool, device: str) -> dict`` returns
``{"rows": [row, ...], "checks": [check, ...], ...}`` where each row comes from :func:`compare`
(or :func:`measure` for an absolute figure) and each check from :func:`check`.

Timing rules, shared by every benchmark:

- candidate and baseline are *interleaved* in ABBA order (c, b, b, c, c, b, ...) after warm-up, so that
  drift of the machine (frequency, other load) hits both alike and neither always runs first (a call that
  follows the other side's can inherit its caches, allocator state or, across processes, its stragglers);
- each sample is the mean over ``inner`` calls, sized so that one sample lasts >= ``min_sample_s``;
- the figure is the median over ``repeats`` samples; the spread is the inter-quartile range
  divided by the median; the ratio is ``median(candidate) / median(baseline)`` (time ratio:
  below 1 means the candidate is faster);
- ``paired_ratio`` is the median over the ``repeats`` adjacent pairs of ``candidate_i / baseline_i``,
  with ``paired_ratio_ci`` the distribution-free 95% confidence interval of that median (order
  statistics of the binomial(n, 1/2), no normality assumed). On a host whose speed drifts between
  samples (a shared VM), the pairs cancel the drift that the two separate medians keep.
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


def _sample(fn: Callable[[], Any], inner: int, device: str, before: Callable[[], Any] | None = None) -> float:
    sync(device)
    if before is not None:
        before()
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


def _median_ci(ordered: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median of ``ordered`` (sorted): the order statistics
    ``x_(k)``, ``x_(n+1-k)`` with the largest ``k`` such that ``P(k <= Binomial(n, 1/2) <= n-k) >= level``
    (for n < 6 no such k exists at 95%: the whole range is returned)."""
    from scipy.stats import binom

    n = len(ordered)
    k = int(binom.ppf((1 - level) / 2, n, 0.5))  # then step down until the coverage holds
    while k > 0 and binom.cdf(k - 1, n, 0.5) * 2 > 1 - level:
        k -= 1
    if k < 1:
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]


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
    before_sample: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Time ``candidate`` against ``baseline``, interleaved in ABBA order; returns one benchmark row.

    ``before_sample`` runs, untimed, before every sample (e.g. a barrier that lines up the ranks of a
    distributed benchmark, so that one rank's lag is not timed as the other's work).

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
    for i in range(repeats):
        if i % 2 == 0:
            cs.append(_sample(candidate, inner_c, device, before_sample))
            bs.append(_sample(baseline, inner_b, device, before_sample))
        else:
            bs.append(_sample(baseline, inner_b, device, before_sample))
            cs.append(_sample(candidate, inner_c, device, before_sample))
    c, b = _stats(cs), _stats(bs)
    pairs = sorted(x / y for x, y in zip(cs, bs))
    row: dict[str, Any] = {
        "name": name,
        "baseline": baseline_name,
        "candidate_median_s": c["median_s"],
        "candidate_spread": c["spread"],
        "baseline_median_s": b["median_s"],
        "baseline_spread": b["spread"],
        "ratio": c["median_s"] / b["median_s"],
        "paired_ratio": statistics.median(pairs),
        "paired_ratio_ci": list(_median_ci(pairs)),
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
