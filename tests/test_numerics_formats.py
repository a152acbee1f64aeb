"""quantize / FloatFormat against independent oracles: ml_dtypes, numpy float16, and a float64 reference."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from leantrain.numerics import BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, TF32, FloatFormat, quantize

ORACLES = {
    "BF16": (BF16, ml_dtypes.bfloat16),
    "FP16": (FP16, np.float16),
    "FP8_E4M3": (FP8_E4M3, ml_dtypes.float8_e4m3fn),
    "FP8_E5M2": (FP8_E5M2, ml_dtypes.float8_e5m2),
    # further ml_dtypes types, expressed with our parameters
    "E4M3 ieee": (FloatFormat(4, 3), ml_dtypes.float8_e4m3),
    "E3M4 ieee": (FloatFormat(3, 4), ml_dtypes.float8_e3m4),
    "FP6 E2M3": (FloatFormat(2, 3, special="finite"), ml_dtypes.float6_e2m3fn),
    "FP6 E3M2": (FloatFormat(3, 2, special="finite"), ml_dtypes.float6_e3m2fn),
    "FP4 E2M1": (FloatFormat(2, 1, special="finite"), ml_dtypes.float4_e2m1fn),
}
MAIN = ["BF16", "FP16", "FP8_E4M3", "FP8_E5M2"]


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.int32)


def _oracle(x: np.ndarray, dtype) -> np.ndarray:
    with np.errstate(all="ignore"):
        return x.astype(dtype).astype(np.float32)


def _mismatches(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Indices where the bit patterns differ (any NaN equals any NaN)."""
    same = (_bits(ours) == _bits(ref)) | (np.isnan(ours) & np.isnan(ref))
    return np.nonzero(~same)[0]


def _special_values(fmt: FloatFormat) -> np.ndarray:
    """Every special class plus each format boundary, its neighbours and the midpoints around it."""
    f32 = np.finfo(np.float32)
    base = [0.0, np.inf, np.nan, f32.max, f32.tiny, f32.smallest_subnormal, 1.0, 1.5]
    for v in (fmt.max_normal, fmt.min_normal, fmt.min_subnormal, fmt.epsilon):
        base += [v, v * 1.5, v * 0.5, v * 0.75, v * 2, v * (1 + fmt.epsilon / 2), v * (1 + 1.5 * fmt.epsilon)]
    base += [fmt.max_normal + fmt.max_normal * fmt.epsilon / 4 * k for k in range(8)]
    with np.errstate(over="ignore"):
        vals = np.array(base, dtype=np.float32)
    bits = _bits(vals)
    near = np.concatenate([bits + k for k in (-1, 0, 1)])  # one float32 ulp either side of each
    nans = np.array([0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7F800100, 0x7FBFFFFF], dtype=np.int64).astype(np.int32)
    allb = np.concatenate([near, nans])
    allb = np.concatenate([allb, allb | np.int32(-(2**31))])  # both signs
    return allb.view(np.float32)


def _all_midpoints(dtype) -> np.ndarray:
    """Every finite value of a narrow dtype, the midpoints between neighbours, and one float32 ulp around them."""
    nbits = 16 if np.dtype(dtype).itemsize == 2 else 8
    codes = np.arange(2**nbits, dtype=np.uint32).astype(np.uint16 if nbits == 16 else np.uint8)
    vals = codes.view(dtype).astype(np.float32)
    pos = np.unique(vals[np.isfinite(vals) & (vals >= 0)]).astype(np.float64)
    mids = (pos[:-1] + pos[1:]) / 2  # exact in float64, and in float32 for these narrow formats
    x = np.concatenate([pos, mids]).astype(np.float32)
    b = _bits(x)
    x = np.concatenate([b - 1, b, b + 1]).view(np.float32)
    return np.concatenate([x, -x])


# Every backend against the oracle: "auto" is what users get (BF16/FP16 may use torch's probed cast).
@pytest.mark.parametrize("backend", ["auto", "bits", "reference"])
@pytest.mark.parametrize("name", list(ORACLES))
def test_nearest_matches_oracle_on_special_values_and_midpoints(name, backend):
    fmt, dtype = ORACLES[name]
    x = np.concatenate([_special_values(fmt), _all_midpoints(dtype)])
    ours = quantize(torch.from_numpy(x), fmt, backend=backend).numpy()
    ref = _oracle(x, dtype)
    if fmt.special == "finite":
        keep = ~np.isnan(x)  # documented difference: ml_dtypes turns NaN into -0 there, we keep NaN
        assert np.isnan(ours[~keep]).all()
        ours, ref = ours[keep], ref[keep]
    bad = _mismatches(ours, ref)
    assert bad.size == 0, f"{name}: {bad.size} mismatches, first x={x[bad[:3]]}, ours={ours[bad[:3]]}, ref={ref[bad[:3]]}"


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", MAIN)
def test_nearest_matches_oracle_on_a_million_random_bit_patterns(name, backend):
    fmt, dtype = ORACLES[name]
    rng = np.random.default_rng(hash(name) % 2**32)
    bits = rng.integers(-(2**31), 2**31, size=1_000_000, dtype=np.int64).astype(np.int32)
    # Uniform bit patterns rarely land where the narrow formats live; add 10^6 patterns whose exponent is
    # spread over the format's own range (normals, subnormals, overflow).
    e = rng.integers(fmt.emin - fmt.man_bits - 3, fmt.emax + 3, size=1_000_000)
    e = np.clip(e + 127, 1, 254).astype(np.int32)
    sign = (rng.integers(0, 2, 1_000_000) << 31).astype(np.int32)
    local = (e << 23) | rng.integers(0, 2**23, size=1_000_000).astype(np.int32) | sign
    x = np.concatenate([bits, local]).view(np.float32)
    ours = quantize(torch.from_numpy(x), fmt, backend=backend).numpy()
    bad = _mismatches(ours, _oracle(x, dtype))
    assert bad.size == 0, f"{name}: {bad.size} mismatches, first x={x[bad[:3]]}"


def test_flushing_denormals_in_torch_does_not_change_results():
    x = np.concatenate([_special_values(BF16), _all_midpoints(ml_dtypes.bfloat16)[::7]])
    ref = _oracle(x, ml_dtypes.bfloat16)
    torch.set_flush_denormal(True)
    try:
        ours = quantize(torch.from_numpy(x), BF16).numpy()
    finally:
        torch.set_flush_denormal(False)
    assert _mismatches(ours, ref).size == 0


def test_presets_match_oracle_constants():
    for name in MAIN:
        fmt, dtype = ORACLES[name]
        fi = ml_dtypes.finfo(dtype)
        assert fmt.max_normal == float(fi.max)
        assert fmt.min_normal == float(fi.smallest_normal)
        assert fmt.min_subnormal == float(fi.smallest_subnormal)
        assert fmt.epsilon == float(fi.eps)
    f32 = np.finfo(np.float32)
    assert FP32.max_normal == float(f32.max) and FP32.min_subnormal == float(f32.smallest_subnormal)
    assert (TF32.exp_bits, TF32.man_bits) == (8, 10) and TF32.epsilon == 2.0**-10
    assert FP8_E4M3.max_normal == 448.0 and FP8_E5M2.max_normal == 57344.0


# ---------------------------------------------------------------------------------------------------------
# Any (e, m, special, subnormals, saturate) against an exact float64 reference written from the definition.


def _reference(x32: np.ndarray, fmt: FloatFormat, rounding: str) -> np.ndarray:
    """Round in float64 from the format's definition (value enumeration + frexp), independent of the bit tricks."""
    e, m = fmt.exp_bits, fmt.man_bits
    bias = 2 ** (e - 1) - 1
    emin = 1 - bias
    top = 2**e - 1
    # largest finite value from the code table: (exponent code, mantissa code) of the top finite code
    if fmt.special == "ieee":
        code = (top - 1, 2**m - 1)
    elif fmt.special == "fn":
        code = (top, 2**m - 2) if m > 0 else (top - 1, 0)
    else:
        code = (top, 2**m - 1)
    vmax = 2.0 ** (code[0] - bias) * (1 + code[1] / 2**m)
    with np.errstate(invalid="ignore"):
        x = x32.astype(np.float64)
    ax = np.abs(x)
    out = np.full_like(x, np.nan)
    fin = np.isfinite(x)
    with np.errstate(all="ignore"):
        _, ex = np.frexp(ax)
        g = np.maximum(ex - 1, emin) - m
        y = np.ldexp(ax, -g)
        r = np.rint(y) if rounding == "nearest" else np.floor(y)
        res = np.ldexp(r, g)
    if not fmt.subnormals:
        res = np.where(ax < 2.0**emin, 0.0, res)
    over = res > vmax
    if fmt.saturate or fmt.special == "finite" or rounding == "truncate":
        res = np.where(over, vmax, res)
    else:
        res = np.where(over, np.inf if fmt.special == "ieee" else np.nan, res)
    out[fin] = res[fin]
    infv = np.isinf(x)
    if fmt.saturate or fmt.special == "finite":
        out[infv] = vmax
    else:
        out[infv] = np.inf if fmt.special == "ieee" else np.nan
    out = np.copysign(out, x)
    return out.astype(np.float32)


FORMATS = [
    FP32, TF32, FloatFormat(8, 0), FloatFormat(8, 22), FloatFormat(7, 5), FloatFormat(6, 9, subnormals=False),
    FloatFormat(5, 10, saturate=True), FloatFormat(4, 3, special="fn", saturate=True), FloatFormat(4, 0, special="fn"),
    FloatFormat(3, 1), FloatFormat(2, 0, special="finite"), FloatFormat(1, 2, special="fn"), FloatFormat(1, 0, special="finite"),
    FloatFormat(5, 23), FloatFormat(8, 7, subnormals=False), FloatFormat(8, 7, saturate=True), FloatFormat(2, 5, special="fn"),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "truncate"])
def test_any_format_matches_float64_reference(fmt, rounding):
    rng = np.random.default_rng(7)
    n = 60_000
    e = np.clip(rng.integers(fmt.emin - fmt.man_bits - 4, fmt.emax + 4, size=n) + 127, 1, 254).astype(np.int32)
    bits = (e << 23) | rng.integers(0, 2**23, size=n).astype(np.int32) | (rng.integers(0, 2, n) << 31).astype(np.int32)
    x = np.concatenate([bits.view(np.float32), _special_values(fmt), rng.standard_normal(10_000).astype(np.float32)])
    ours = quantize(torch.from_numpy(x), fmt, rounding).numpy()
    ref = _reference(x, fmt, rounding)
    bad = _mismatches(ours, ref)
    assert bad.size == 0, f"{fmt} {rounding}: {bad.size} mismatches, x={x[bad[:3]]} ours={ours[bad[:3]]} ref={ref[bad[:3]]}"


# ---------------------------------------------------------------------------------------------------------
# Semantics spelled out in the docs.


def test_bf16_ties_overflow_nan_and_signed_zero():
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 3.40e38, 3.3895e38, float("nan"), -0.0, -1e-45, float("-inf")])
    q = quantize(x, BF16)
    assert q[0] == 1.0 and q[1] == 1 + 2**-6
    assert q[2] == float("inf") and math.isfinite(q[3].item())
    assert torch.isnan(q[4])
    assert q[5] == 0 and math.copysign(1, q[5].item()) == -1
    assert q[6] == 0 and math.copysign(1, q[6].item()) == -1  # tiny negative rounds to -0
    assert q[7] == float("-inf")


def test_flush_to_zero_differs_exactly_on_inputs_below_min_normal():
    for fmt in (BF16, FP16, FP8_E4M3):
        ftz = FloatFormat(fmt.exp_bits, fmt.man_bits, subnormals=False, special=fmt.special)
        rng = np.random.default_rng(1)
        x = (rng.standard_normal(200_000) * np.exp2(rng.integers(fmt.emin - 12, 4, 200_000))).astype(np.float32)
        a = quantize(torch.from_numpy(x), fmt).numpy()
        b = quantize(torch.from_numpy(x), ftz).numpy()
        small = np.abs(x) < fmt.min_normal
        assert small.any() and (~small).any()
        assert (_bits(a[~small]) == _bits(b[~small])).all()
        assert (b[small] == 0).all() and (np.signbit(b[small]) == np.signbit(x[small])).all()


@pytest.mark.parametrize("fmt", [BF16, FP16, FP8_E4M3, FP8_E5M2], ids=str)
def test_saturate_clamps_overflow_and_inf(fmt):
    sat = FloatFormat(fmt.exp_bits, fmt.man_bits, special=fmt.special, saturate=True)
    x = torch.tensor([fmt.max_normal * 1.01, -fmt.max_normal * 4, float("inf"), float("-inf"), float("nan")])
    q = quantize(x, sat)
    assert q[:4].tolist() == [sat.max_normal, -sat.max_normal, sat.max_normal, -sat.max_normal]
    assert torch.isnan(q[4])


def test_fn_overflow_is_nan_and_ieee_overflow_is_inf():
    big = torch.tensor([465.0, -1e6, float("inf")])
    assert torch.isnan(quantize(big, FP8_E4M3)).all()
    assert quantize(torch.tensor([464.0]), FP8_E4M3).item() == 448.0  # tie goes to the even 448, not to NaN
    assert quantize(torch.tensor([61440.0, -1e6]), FP8_E5M2).tolist() == [float("inf"), float("-inf")]


def test_truncate_is_masking_low_mantissa_bits_for_normals():
    rng = np.random.default_rng(3)
    for fmt in (BF16, TF32, FP16, FP8_E4M3, FP8_E5M2):
        x = (rng.standard_normal(100_000) * np.exp2(rng.integers(fmt.emin, fmt.emax, 100_000))).astype(np.float32)
        x = x[(np.abs(x) >= fmt.min_normal) & (np.abs(x) <= fmt.max_normal)]
        mask = np.int32(~((1 << (23 - fmt.man_bits)) - 1))
        ours = quantize(torch.from_numpy(x), fmt, "truncate").numpy()
        assert (_bits(ours) == (_bits(x) & mask)).all()


def test_shapes_dtypes_and_noncontiguous_inputs():
    x = torch.randn(6, 5, dtype=torch.float64).t()
    q = quantize(x, FP16)
    assert q.dtype == torch.float32 and q.shape == (5, 6)
    assert torch.equal(q, torch.from_numpy(x.float().numpy().astype(np.float16).astype(np.float32)))
    h = torch.randn(100).half()
    assert torch.equal(quantize(h, FP16), h.float())
    assert quantize(torch.empty(0, 3), BF16).shape == (0, 3)
    g = torch.randn(10, requires_grad=True)  # quantize is not differentiable: Quantizer is the autograd form
    assert not any(quantize(g, f, r).requires_grad for f in (BF16, FP8_E4M3) for r in ("nearest", "stochastic"))
    x = torch.randn(300_000)  # spans several internal blocks
    assert torch.equal(quantize(x, BF16), torch.from_numpy(_oracle(x.numpy(), ml_dtypes.bfloat16)))


# ---------------------------------------------------------------------------------------------------------
# Bad input names the argument.


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="x"):
        quantize(torch.arange(4), BF16)
    with pytest.raises(TypeError, match="x"):
        quantize([1.0], BF16)
    with pytest.raises(ValueError, match="rounding"):
        quantize(torch.ones(2), BF16, "up")
    with pytest.raises(TypeError, match="fmt"):
        quantize(torch.ones(2), "bf16")
    with pytest.raises(TypeError, match="generator"):
        quantize(torch.ones(2), BF16, "stochastic", generator=0)
    with pytest.raises(ValueError, match="exp_bits"):
        FloatFormat(0, 3)
    with pytest.raises(ValueError, match="exp_bits"):
        FloatFormat(9, 3)
    with pytest.raises(ValueError, match="man_bits"):
        FloatFormat(8, 24)
    with pytest.raises(ValueError, match="special"):
        FloatFormat(5, 2, special="weird")
    with pytest.raises(TypeError, match="exp_bits"):
        FloatFormat(5.0, 2)
