"""Every rounding backend computes the reference's bits: ``bits`` and ``native`` against ``reference``.

The reference itself is checked against ml_dtypes / numpy in test_numerics_formats.py (parametrized over
the backends) and against a float64 model of the rule for formats ml_dtypes lacks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leantrain.numerics import BACKENDS, BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, TF32, FloatFormat, quantize, round_to_integer
from leantrain.numerics.native import native_available

FORMATS = [
    BF16, FP16, FP8_E4M3, FP8_E5M2, FP32, TF32, FloatFormat(8, 0), FloatFormat(8, 22), FloatFormat(8, 7, subnormals=False),
    FloatFormat(8, 7, saturate=True), FloatFormat(5, 10, saturate=True), FloatFormat(6, 9, subnormals=False),
    FloatFormat(4, 3, special="fn", saturate=True), FloatFormat(4, 0, special="fn"), FloatFormat(3, 1),
    FloatFormat(2, 0, special="finite"), FloatFormat(1, 2, special="fn"), FloatFormat(5, 23),
]


def _patterns(fmt: FloatFormat, n: int = 150_000, seed: int = 0) -> torch.Tensor:
    """Uniform float32 bit patterns, patterns whose exponent spans the format's range, and special values;
    more than one 64K block so that the per-block random draws are exercised."""
    rng = np.random.default_rng(seed)
    uniform = rng.integers(-(2**31), 2**31, size=n, dtype=np.int64).astype(np.int32)
    e = np.clip(rng.integers(fmt.emin - fmt.man_bits - 4, fmt.emax + 4, size=n) + 127, 0, 255).astype(np.int32)
    local = (e << 23) | rng.integers(0, 2**23, size=n).astype(np.int32) | (rng.integers(0, 2, n) << 31).astype(np.int32)
    special = np.array([0, 0x7F800000, 0x7FC00000, 0x7F800001, 1, 0x007FFFFF, 0x00800000, 0x7F7FFFFF], dtype=np.int64)
    special = np.concatenate([special, special | -(2**31)]).astype(np.int32)
    return torch.from_numpy(np.concatenate([uniform, local, special]).view(np.float32))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | nan).all())


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "truncate", "stochastic"])
def test_bits_backend_equals_reference_bit_for_bit(fmt, rounding):
    x = _patterns(fmt)
    ref = quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(1), backend="reference")
    fast = quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(1), backend="bits")
    assert _same_bits(fast, ref), f"{fmt} {rounding}: bits backend differs from the reference"
    auto = quantize(x, fmt, rounding, generator=torch.Generator().manual_seed(1))
    assert _same_bits(auto, ref), f"{fmt} {rounding}: the default backend differs from the reference"


@pytest.mark.parametrize("fmt", [BF16, FP16], ids=str)
def test_native_cast_equals_reference_bit_for_bit(fmt):
    x = _patterns(fmt, seed=2)
    try:
        native = quantize(x, fmt, backend="native")
    except ValueError as err:  # the probe found torch's cast disagreeing on this CPU: then it is never used
        pytest.skip(f"torch's {fmt} cast is not used here: {err}")
    assert _same_bits(native, quantize(x, fmt, backend="reference"))


@pytest.mark.skipif(not native_available(), reason="the native kernel needs a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_stochastic_round_to_integer_equals_reference(dtype):
    x = (_patterns(FP32, n=100_000, seed=3) * 1e-30).clamp(-1e6, 1e6)  # bring patterns near the integer grid
    x = torch.cat([x, torch.randn(50_000) * 40, torch.rand(10_000) - 0.5]).to(dtype)
    ref = round_to_integer(x, "stochastic", generator=torch.Generator().manual_seed(4), backend="reference")
    nat = round_to_integer(x, "stochastic", generator=torch.Generator().manual_seed(4), backend="native")
    assert nat.dtype == ref.dtype == dtype
    assert _same_bits(nat.float(), ref.float())


def test_native_is_refused_where_no_native_implementation_exists():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="backend='native'"):
        quantize(x, FP8_E4M3, backend="native")
    with pytest.raises(ValueError, match="backend='native'"):
        quantize(x, BF16, "stochastic", backend="native")
    with pytest.raises(ValueError, match="backend='native'"):
        round_to_integer(x.double(), "stochastic", backend="native")


def test_unknown_backend_names_the_argument():
    assert BACKENDS == ("auto", "reference", "bits", "native")
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize(torch.ones(3), BF16, backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        round_to_integer(torch.ones(3), backend="fast")
