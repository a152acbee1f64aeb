"""Stochastic rounding: the round-up frequency equals the fractional distance; results are unbiased.

Tolerances come from the sample size: with N copies of x and round-up probability p, the count of round-ups
is Binomial(N, p), so the frequency lies within 6 sigma = 6 sqrt(p(1-p)/N) of p except with probability
< 2e-9 per value (and the generators are seeded, so the test is deterministic).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from leantrain.numerics import BF16, FP8_E4M3, FP8_E5M2, FP16, TF32, FloatFormat, quantize, round_low_bits, round_to_integer

N = 20_000


def _grid(x: np.ndarray, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """(lower neighbour in magnitude, step) from the format's definition, in float64."""
    ax = np.abs(x.astype(np.float64))
    _, ex = np.frexp(ax)
    step = np.ldexp(1.0, np.maximum(ex - 1, fmt.emin) - fmt.man_bits)
    return np.floor(ax / step) * step, step


def _values(fmt: FloatFormat, rng) -> np.ndarray:
    """Values across binades: normals from min_normal to near max, target subnormals, below the smallest step."""
    exps = np.linspace(fmt.emin, min(fmt.emax, 60), 12).round().astype(int)
    normals = np.ldexp(1 + rng.random(exps.size), exps)
    subs = fmt.min_normal * rng.random(6)
    tiny = fmt.min_subnormal * np.array([0.5, 0.25, 0.01, 0.9])
    v = np.concatenate([normals, subs, tiny]).astype(np.float32)
    v = v[v <= fmt.max_normal]  # overflow has its own test
    return np.concatenate([v, -v[::3]])


@pytest.mark.parametrize("fmt", [BF16, FP16, FP8_E4M3, FP8_E5M2, TF32, FloatFormat(3, 1), FloatFormat(8, 0)], ids=str)
def test_round_up_frequency_matches_fractional_distance(fmt):
    rng = np.random.default_rng(fmt.exp_bits * 31 + fmt.man_bits)
    vals = _values(fmt, rng)
    x = torch.from_numpy(np.repeat(vals, N))
    q = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(1)).numpy().reshape(vals.size, N)
    lo, step = _grid(vals, fmt)
    hi = lo + step
    mag = np.abs(q.astype(np.float64))
    assert ((mag == lo[:, None]) | (mag == hi[:, None])).all(), "a stochastic result is not a neighbour"
    assert (np.signbit(q) == np.signbit(vals)[:, None]).all()
    p = (np.abs(vals.astype(np.float64)) - lo) / step
    freq = (mag == hi[:, None]).mean(axis=1)
    tol = 6 * np.sqrt(p * (1 - p) / N)
    assert (np.abs(freq - p) <= tol).all(), f"worst |freq - p| / tol = {np.max(np.abs(freq - p) / np.maximum(tol, 1e-300))}"
    # unbiased: the mean of the copies converges to x with the same tolerance, scaled by the step
    mean = q.astype(np.float64).mean(axis=1)
    assert (np.abs(mean - vals) <= tol * step + 1e-300).all()


def test_stochastic_overflow_frequency_in_fn_and_ieee_formats():
    # between max and the next step, rounding up overflows: NaN (fn) / inf (ieee) with probability p
    for fmt, x, nxt in ((FP8_E4M3, 456.0, 480.0), (FP8_E5M2, 60000.0, 65536.0)):
        q = quantize(torch.full((N,), x), fmt, "stochastic", generator=torch.Generator().manual_seed(2)).numpy()
        p = (x - fmt.max_normal) / (nxt - fmt.max_normal)
        over = ~np.isfinite(q)
        assert ((q == fmt.max_normal) | over).all()
        assert abs(over.mean() - p) <= 6 * math.sqrt(p * (1 - p) / N)


def test_stochastic_quantize_is_reproducible():
    x = torch.randn(100_000)
    for fmt in (BF16, FP8_E4M3):
        a = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(7))
        b = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(7))
        c = quantize(x, fmt, "stochastic", generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_round_to_integer_stochastic_is_unbiased():
    vals = np.array([0.3, 2.7, -1.25, 1e-3, 7.0, 1e6 + 0.5, -3.999, 2.0**-20], dtype=np.float32)
    for dtype in (torch.float32, torch.float64):
        x = torch.from_numpy(np.repeat(vals, N)).to(dtype)
        r = round_to_integer(x, "stochastic", generator=torch.Generator().manual_seed(3)).double().numpy().reshape(-1, N)
        v = vals.astype(np.float64)
        p = np.abs(v) - np.floor(np.abs(v))
        freq = (np.abs(r) == np.floor(np.abs(v))[:, None] + 1).mean(axis=1)
        assert (np.abs(freq - p) <= 6 * np.sqrt(p * (1 - p) / N)).all()


def test_truncate_equals_masking_for_normals_on_random_bit_patterns():
    rng = np.random.default_rng(9)
    bits = rng.integers(-(2**31), 2**31, size=200_000, dtype=np.int64).astype(np.int32)
    x = bits.view(np.float32)
    normal = np.isfinite(x) & (np.abs(x) >= BF16.min_normal)
    q = quantize(torch.from_numpy(x[normal]), BF16, "truncate").numpy()
    assert (q.view(np.int32) == (bits[normal] & np.int32(-65536))).all()


@pytest.mark.parametrize("shift", [1, 3, 8, 12, 16, 20, 30])
def test_round_low_bits_stochastic_frequency(shift):
    # covers every random-bit source: 8-bit and 16-bit slices of 64-bit draws, 31-bit (int32), 63-bit (int64)
    rng = np.random.default_rng(shift)
    rem = rng.integers(0, 2**shift, size=8)
    a = torch.from_numpy(np.repeat(rem + 5 * 2**shift, N).astype(np.int64 if shift > 25 else np.int32))
    r = round_low_bits(a, shift, "stochastic", generator=torch.Generator().manual_seed(shift)).numpy().reshape(8, N)
    assert np.isin(r, [5 * 2**shift, 6 * 2**shift]).all()
    p = rem / 2**shift
    freq = (r == 6 * 2**shift).mean(axis=1)
    assert (np.abs(freq - p) <= 6 * np.sqrt(p * (1 - p) / N)).all()
