"""DFP conversion and the narrow-accumulator integer GEMM, against float64 / int64 / sequential references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from leantrain.numerics import dfp_exponent, dfp_matmul, dfp_round, from_dfp, int_matmul, safe_chunk, to_dfp


def _data(seed: int, shape, spread: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp2(torch.randint(-spread, spread, shape, generator=g).float())


@pytest.mark.parametrize("bits", [2, 3, 8, 12, 16, 24])
def test_nearest_round_trip_within_half_a_unit_and_exponent_is_minimal(bits):
    x = _data(bits, (37, 64))
    m, e = to_dfp(x, bits)
    top = 2 ** (bits - 1) - 1
    assert int(m.to(torch.int64).abs().max()) <= top
    unit = math.ldexp(1.0, int(e))
    err = (from_dfp(m, e, dtype=torch.float64) - x.double()).abs()
    assert float(err.max()) <= unit / 2
    # minimal exponent: max|x| would not fit at E-1, and it does fit at E (exact float64 comparisons)
    amax = float(x.abs().max())
    assert amax <= top * unit and amax > top * unit / 2
    # against a float64 reference of the rounding itself
    ref = np.rint(x.double().numpy() / unit)
    assert (m.numpy().astype(np.int64) == ref).all()


def test_exponent_rule_matches_log2_formula_and_edge_cases():
    amax = torch.tensor([1.0, 32767.0, 32767.5, 32768.0, 3e38, 1e-45, 0.0, 1.5e-10], dtype=torch.float64)
    e = dfp_exponent(amax, 16)
    for v, ev in zip(amax.tolist(), e.tolist()):
        if v == 0:
            assert ev == 0
            continue
        assert v <= 32767 * 2.0**ev and v > 32767 * 2.0 ** (ev - 1)
        assert ev == math.ceil(math.log2(v / 32767)) or abs(math.log2(v / 32767) - round(math.log2(v / 32767))) < 1e-9
    assert e.tolist()[:4] == [-14, 0, 1, 1]


def test_blocks_have_their_own_exponents():
    x = _data(1, (6, 32))
    x[:, :8] *= 1e-6  # first block much smaller: it must get a finer scale
    m, e = to_dfp(x, 8, block=8)
    assert e.shape == (6, 4) and m.dtype == torch.int8
    for i in range(6):
        for j in range(4):
            blk = x[i, 8 * j:8 * j + 8]
            mb, eb = to_dfp(blk, 8)
            assert int(eb) == int(e[i, j]) and torch.equal(mb, m[i, 8 * j:8 * j + 8])
    back = from_dfp(m, e, dtype=torch.float64)
    unit = torch.exp2(e.double()).repeat_interleave(8, dim=1)
    assert bool(((back - x.double()).abs() <= unit / 2).all())


def test_stochastic_dfp_is_unbiased_and_truncate_goes_toward_zero():
    x = torch.full((200_000,), 0.3) * torch.tensor([1.0, -1.0]).repeat(100_000)
    x[0] = 1.0  # sets the exponent: unit = 2^-14 for bits=16
    m, e = to_dfp(x, 16, rounding="stochastic", generator=torch.Generator().manual_seed(0))
    unit = 2.0 ** int(e)
    vals = m[2::2].double() * unit  # the +0.3 entries (skip the 1.0)
    frac = 0.3 / unit - math.floor(0.3 / unit)
    n = vals.numel()
    sigma = math.sqrt(frac * (1 - frac) / n) * unit
    assert abs(float(vals.mean()) - float(torch.tensor(0.3))) < 6 * sigma
    mt, _ = to_dfp(x, 16, rounding="truncate")
    assert bool((mt.double().abs() * unit <= x.double().abs()).all())


def test_dfp_round_is_the_round_trip():
    x = _data(11, (5, 16))
    m, e = to_dfp(x, 8, block=4)
    assert torch.equal(dfp_round(x, 8, block=4), from_dfp(m, e))
    assert dfp_round(x.double(), 12).dtype == torch.float64


def test_zero_tensor_and_bad_input():
    m, e = to_dfp(torch.zeros(5))
    assert int(e) == 0 and not m.any()
    with pytest.raises(ValueError, match="NaN or inf"):
        to_dfp(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="bits"):
        to_dfp(torch.ones(3), 1)
    with pytest.raises(TypeError, match="bits"):
        to_dfp(torch.ones(3), 8.0)
    with pytest.raises(TypeError, match="x"):
        to_dfp(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="block"):
        to_dfp(torch.ones(2, 10), block=3)
    with pytest.raises(ValueError, match="rounding"):
        to_dfp(torch.ones(3), rounding="up")
    with pytest.raises(TypeError, match="mantissas"):
        from_dfp(torch.ones(3), 0)


# ---------------------------------------------------------------------------------------------------------
# int_matmul


def _sequential(a: np.ndarray, b: np.ndarray, acc_bits: int, mode: str, chunk: int | None):
    """The accumulation model written as plain loops (python ints: no overflow of the reference itself)."""
    lo, hi = -(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1) - 1
    k_ = a.shape[1]
    c = chunk or k_
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.float64 if chunk else np.int64)
    events = 0
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            total = np.float32(0)
            for s in range(0, k_, c):
                acc = 0
                for k in range(s, min(s + c, k_)):
                    t = acc + int(a[i, k]) * int(b[k, j])
                    if t < lo or t > hi:
                        events += 1
                        t = ((t - lo) % 2**acc_bits) + lo if mode == "wrap" else min(max(t, lo), hi)
                    acc = t
                if chunk:
                    total = np.float32(total + np.float32(acc))
                else:
                    out[i, j] = acc
            if chunk:
                out[i, j] = total
    return out, events


@pytest.mark.parametrize("mode", ["wrap", "saturate"])
@pytest.mark.parametrize("chunk", [None, 5, 16])
def test_int_matmul_reproduces_overflow_exactly(mode, chunk):
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-(2**15) + 1, 2**15, (7, 37), generator=g, dtype=torch.int16)
    b = torch.randint(-(2**15) + 1, 2**15, (37, 6), generator=g, dtype=torch.int16)
    r, st = int_matmul(a, b, chunk=chunk, overflow=mode)
    ref, events = _sequential(a.numpy(), b.numpy(), 32, mode, chunk)
    assert events > 0  # the inputs overflow by construction (full-range INT16)
    assert st["overflow_events"] == events
    assert (r.numpy() == ref).all()
    assert r.dtype == (torch.float32 if chunk else torch.int32)


def test_int_matmul_small_accumulator_and_batches():
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-100, 100, (2, 3, 40), generator=g, dtype=torch.int16)
    b = torch.randint(-100, 100, (40, 4), generator=g, dtype=torch.int16)
    for mode in ("wrap", "saturate"):
        r, st = int_matmul(a, b, acc_bits=16, overflow=mode)
        ref, events = _sequential(a.reshape(6, 40).numpy(), b.numpy(), 16, mode, None)
        assert (r.reshape(6, 4).numpy() == ref).all() and st["overflow_events"] == events > 0


def test_int_matmul_equals_int64_reference_without_overflow():
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-(2**11), 2**11, (33, 300), generator=g, dtype=torch.int16)
    b = torch.randint(-(2**11), 2**11, (300, 17), generator=g, dtype=torch.int16)
    ref = a.to(torch.int64) @ b.to(torch.int64)
    r, st = int_matmul(a, b)
    assert st["overflow_events"] == 0 and torch.equal(r.to(torch.int64), ref)


def test_error_mode_raises_and_safe_chunks_never_overflow():
    top = 2**15 - 1
    a = torch.full((4, 64), top, dtype=torch.int16)
    b = torch.full((64, 3), -top, dtype=torch.int16)  # worst case: every product is -(2^15-1)^2
    with pytest.raises(OverflowError, match="overflowed"):
        int_matmul(a, b, overflow="error")
    c = safe_chunk(top, top, 32)
    assert c == 2
    for mode in ("wrap", "saturate", "error"):
        r, st = int_matmul(a, b, chunk=c, overflow=mode)
        assert st["overflow_events"] == 0
    _, st = int_matmul(a, b, chunk=c + 1)
    assert st["overflow_events"] > 0  # the stated bound is tight
    assert safe_chunk(127, 127, 32) == 133144 and safe_chunk(2**11 - 1, 2**11 - 1, 32) == 512


def test_int_matmul_bad_input():
    with pytest.raises(TypeError, match="a"):
        int_matmul(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.int16))
    with pytest.raises(ValueError, match="overflow"):
        int_matmul(torch.ones(2, 2, dtype=torch.int16), torch.ones(2, 2, dtype=torch.int16), overflow="clip")
    with pytest.raises(ValueError, match="acc_bits"):
        int_matmul(torch.ones(2, 2, dtype=torch.int16), torch.ones(2, 2, dtype=torch.int16), acc_bits=80)
    with pytest.raises(ValueError, match="chunk"):
        int_matmul(torch.ones(2, 2, dtype=torch.int16), torch.ones(2, 2, dtype=torch.int16), chunk=0)


def test_dfp_matmul_matches_float64_product_of_the_dfp_operands():
    x, w = _data(7, (16, 256), 3), _data(8, (256, 12), 3)
    y, st = dfp_matmul(x, w, 16, chunk=2)
    mx, ex = to_dfp(x, 16)
    mw, ew = to_dfp(w, 16)
    exact = (mx.double() @ mw.double()) * 2.0 ** (int(ex) + int(ew))
    # chunked float32 accumulation: error <= (n_chunks) float32 roundings of partial sums
    tol = 128 * 2**-24 * (mx.double().abs() @ mw.double().abs()) * 2.0 ** (int(ex) + int(ew))
    assert bool(((y.double() - exact).abs() <= tol).all())
    assert st["overflow_events"] == 0 and st["exponent_x"] == int(ex)
    y1, st1 = dfp_matmul(x, w, 16)
    assert torch.equal(y1, exact.float()) or st1["overflow_events"] > 0
    assert float((y.double() - x.double() @ w.double()).abs().max()) < 1e-2 * float((x.double() @ w.double()).abs().max())


def test_int_matmul_sparse_overflow_is_found_by_the_pre_check():
    # DFP16 mantissas of Gaussian data: a few outputs overflow INT32 somewhere along k, most never do
    x, w = _data(21, (12, 2000), 1), _data(22, (2000, 9), 1)
    ix, _ = to_dfp(x, 16)
    iw, _ = to_dfp(w, 16)
    for acc_bits in (32, 30):
        for mode in ("wrap", "saturate"):
            r, st = int_matmul(ix, iw, acc_bits=acc_bits, overflow=mode)
            ref, events = _sequential(ix.numpy(), iw.numpy(), acc_bits, mode, None)
            assert st["overflow_events"] == events and (r.numpy() == ref).all()
            assert 0 < st["overflowed_outputs"] < 12 * 9 or acc_bits == 30  # sparse at INT32 (8 of 108 here)


@pytest.mark.parametrize("chunk", [None, 7, 300, 1000])
def test_wrap_fast_path_equals_exact_emulation(chunk):
    g = torch.Generator().manual_seed(31)
    a = torch.randint(-(2**15) + 1, 2**15, (9, 700), generator=g, dtype=torch.int16)
    b = torch.randint(-(2**15) + 1, 2**15, (700, 5), generator=g, dtype=torch.int16)
    fast, st_fast = int_matmul(a, b, chunk=chunk, events=False)
    slow, st_slow = int_matmul(a, b, chunk=chunk)
    assert torch.equal(fast, slow) and st_fast["overflow_events"] is None
    # wrapped_outputs counts the chunk registers whose exact sum left the INT32 range
    c = chunk or 700
    sums = [a[:, s:s + c].double() @ b[s:s + c].double() for s in range(0, 700, c)]
    assert st_fast["wrapped_outputs"] == sum(int(((t < -(2**31)) | (t > 2**31 - 1)).sum()) for t in sums)
