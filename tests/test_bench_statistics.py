"""The benchmark harness's statistics: ABBA interleaving and the paired ratio's confidence interval."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from leantrain.app.bench import _median_ci, compare


@pytest.mark.parametrize("n", [6, 11, 21, 43, 61])
def test_median_interval_is_the_tightest_with_95_percent_coverage(n):
    lo, hi = _median_ci([float(i) for i in range(1, n + 1)])
    k = int(lo)
    assert hi == n + 1 - k  # symmetric order statistics
    coverage = binom.cdf(n - k, n, 0.5) - binom.cdf(k - 1, n, 0.5)
    tighter = binom.cdf(n - k - 1, n, 0.5) - binom.cdf(k, n, 0.5)
    assert coverage >= 0.95 > tighter


def test_median_interval_covers_the_true_median_by_simulation():
    # A skewed distribution (lognormal, median 1): the interval is distribution-free.
    rng = np.random.default_rng(0)
    hits = 0
    trials = 4000
    for _ in range(trials):
        x = sorted(rng.lognormal(0.0, 0.5, size=21))
        lo, hi = _median_ci(x)
        hits += lo <= 1.0 <= hi
    assert hits / trials >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / trials)


def test_compare_alternates_abba_and_pairs_adjacent_samples(monkeypatch):
    import leantrain.app.bench as bench

    calls, clock = [], {"t": 0.0}

    def fake_sample(fn, inner, device, before=None):
        # Drift: every sample is slower than the last, so a fixed c-then-b order would always favour c.
        fn()
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(bench, "_sample", fake_sample)
    monkeypatch.setattr(bench, "_calibrate", lambda fn, min_sample_s, device: 1)
    row = compare("x", lambda: calls.append("c"), lambda: calls.append("b"), baseline_name="b", repeats=4, warmup=0)
    assert calls == ["c", "b", "b", "c", "c", "b", "b", "c"]
    # equal costs under linear drift: the pairs (c/b) are 1/2, 4/3, 5/6, 8/7, their median (5/6 + 8/7) / 2
    assert row["paired_ratio"] == pytest.approx((5 / 6 + 8 / 7) / 2)
    assert row["ratio"] == pytest.approx(1.0)
    assert row["paired_ratio_ci"] == [0.5, 4 / 3]  # n = 4 < 6: the whole range of the pairs
