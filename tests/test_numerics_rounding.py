"""round_to_integer / round_low_bits: the shared rounding primitive, against numpy and exact integer arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leantrain.numerics import round_low_bits, round_to_integer


def test_round_to_integer_nearest_and_truncate_match_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(50_000) * 100, np.arange(-8, 8) + 0.5, [0.0, -0.0, np.inf, -np.inf, np.nan]])
    for dtype in (np.float32, np.float64):
        xt = torch.from_numpy(x.astype(dtype))
        np.testing.assert_array_equal(round_to_integer(xt, "nearest").numpy(), np.rint(x.astype(dtype)))
        np.testing.assert_array_equal(round_to_integer(xt, "truncate").numpy(), np.trunc(x.astype(dtype)))


def test_round_to_integer_stochastic_picks_a_neighbour_and_keeps_specials():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(50_000) * 10.0 ** rng.integers(-8, 8, 50_000), [0.0, -0.0, np.inf, -np.inf]])
    for dtype in (np.float32, np.float64):
        xs = x.astype(dtype)
        r = round_to_integer(torch.from_numpy(xs), "stochastic", generator=torch.Generator().manual_seed(0)).numpy()
        assert r.dtype == xs.dtype
        assert ((r == np.floor(xs)) | (r == np.ceil(xs))).all()
        assert (np.signbit(r) == np.signbit(xs)).all()
    assert torch.isnan(round_to_integer(torch.tensor([float("nan")]), "stochastic")).all()


def test_round_to_integer_stochastic_is_reproducible_from_a_generator():
    x = torch.randn(10_000) * 5
    a = round_to_integer(x, "stochastic", generator=torch.Generator().manual_seed(3))
    b = round_to_integer(x, "stochastic", generator=torch.Generator().manual_seed(3))
    c = round_to_integer(x, "stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_round_low_bits_matches_exact_integer_rounding(dtype):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 2**29, 20_000)
    for shift in (0, 1, 5, 13, 28):
        step = 2**shift
        lo, rem = a // step * step, a % step
        half = step // 2
        nearest = np.where((rem > half) | ((rem == half) & (shift > 0) & ((a // step) % 2 == 1)), lo + step, lo)
        t = torch.from_numpy(a).to(dtype)
        assert (round_low_bits(t, shift, "nearest").numpy() == nearest).all()
        assert (round_low_bits(t, shift, "truncate").numpy() == lo).all()
        s = round_low_bits(t, shift, "stochastic", generator=torch.Generator().manual_seed(0)).numpy()
        assert ((s == lo) | (s == lo + step)).all()
        sh = torch.full_like(t, shift)  # tensor shifts agree with int shifts
        assert torch.equal(round_low_bits(t, sh, "nearest"), round_low_bits(t, shift, "nearest"))


def test_round_to_integer_bad_input():
    with pytest.raises(TypeError, match="x"):
        round_to_integer(torch.arange(3), "nearest")
    with pytest.raises(ValueError, match="rounding"):
        round_to_integer(torch.ones(3), "banker")
