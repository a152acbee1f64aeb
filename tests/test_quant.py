"""Unit tests of leantrain.quant's numerics: ternarizer, grouping, k-bit weights, activations, packing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from leantrain.quant import (
    ActQuantizer,
    Grouping,
    dequantize,
    pack_codes,
    quantize_weights,
    ternarize,
    ternary_expansion,
    unpack_codes,
)

GROUPINGS = ["fgq:4", "fgq:8", "fgq:16:partial", "fgq:100:partial", "cluster:2", "cluster:3:partial", "channel", "tensor"]


def _err(w: torch.Tensor, t: torch.Tensor) -> float:
    """Squared error of the best alpha >= 0 for codes t (least squares, float64)."""
    w, t = w.double(), t.double()
    tt = float((t * t).sum())
    alpha = max(float((w * t).sum()) / tt, 0.0) if tt else 0.0
    return float((w - alpha * t).square().sum())


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_optimal_ternary_matches_exhaustive_search_over_all_codes(n: int) -> None:
    # Oracle: all 3^n code vectors with their least-squares scale; the solver must reach the minimum.
    g = torch.Generator().manual_seed(n)
    all_codes = torch.tensor(list(itertools.product((-1, 0, 1), repeat=n)), dtype=torch.float64)
    for _ in range(40):
        w = torch.randn(1, n, generator=g, dtype=torch.float64) * torch.rand(1, generator=g, dtype=torch.float64)
        wt = all_codes @ w[0]
        tt = all_codes.square().sum(1)
        alpha = torch.where(tt > 0, wt / tt.clamp_min(1), 0.0).clamp_min(0)
        best = float((w[0].square().sum() - 2 * alpha * wt + alpha.square() * tt).min())
        codes, scales = ternarize(w, groups="tensor")
        ours = float((w[0] - scales.double()[0] * codes[0].double()).square().sum())
        assert ours <= best + 1e-12 * float(w.square().sum()) + 1e-15


def test_optimal_beats_or_equals_every_threshold_bruteforce() -> None:
    # Brute force over every threshold Delta in {0} u {|w_i|}: the exact solver is never worse,
    # and the 0.7*mean closed form is one of those thresholds, so never better than the optimum.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 8, generator=g) * torch.rand(64, 1, generator=g) * 3
    w[5] = 0.0
    w[6, :4] = 0.5  # ties
    opt_codes, opt_scales = ternarize(w, groups="fgq:8")
    thr_codes, thr_scales = ternarize(w, groups="fgq:8", method="threshold")
    for i in range(w.shape[0]):
        row = w[i].double()
        cands = [0.0] + row.abs().tolist()
        brute = min(_err(row, torch.sign(row) * (row.abs() > d)) for d in cands)
        ours = float((row - opt_scales[i].double() * opt_codes[i].double()).square().sum())
        thr = float((row - thr_scales[i].double() * thr_codes[i].double()).square().sum())
        tol = 1e-6 * float(row.square().sum()) + 1e-12
        assert ours <= brute + tol
        assert thr >= ours - tol


def test_optimum_straddles_half_alpha() -> None:
    w = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    codes, scales = ternarize(w, groups="fgq:16")
    for i in range(200):
        a = w[i].abs()
        kept, dropped = a[codes[i] != 0], a[codes[i] == 0]
        half = float(scales[i]) / 2
        assert float(kept.min()) >= half - 1e-6
        if dropped.numel():
            assert float(dropped.max()) <= half + 1e-6


@pytest.mark.parametrize("spec", GROUPINGS)
def test_scales_equal_least_squares_for_chosen_codes(spec: str) -> None:
    w = torch.randn(6, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    for method in ("optimal", "threshold"):
        codes, scales = ternarize(w, groups=spec, method=method)
        assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
        layout = Grouping.parse(spec).layout(w.shape)
        gw, gt = layout.to_groups(w.double()), layout.to_groups(codes.double())
        for gi in range(layout.G):
            t = gt[gi]
            if t.abs().sum() == 0:
                assert scales[gi] == 0
                continue
            lstsq = torch.linalg.lstsq(t[:, None], gw[gi][:, None]).solution.item()
            assert scales[gi].item() == pytest.approx(lstsq, rel=1e-6)
            assert torch.equal(t, torch.sign(gw[gi]) * (t != 0))  # codes carry the weights' signs


def test_fgq_groups_are_consecutive_input_channels_at_one_kernel_position() -> None:
    K, C = 2, 8
    layout = Grouping.parse("fgq:4").layout((K, C, 3, 3))
    scale_of = layout.expand(torch.arange(layout.G, dtype=torch.float32))
    # Hand-derived: row k holds 9 positions * 2 channel groups; order (kh, kw, C) channel fastest.
    for k, c, i, j in itertools.product(range(K), range(C), range(3), range(3)):
        assert scale_of[k, c, i, j] == k * 18 + (i * 3 + j) * 2 + c // 4
    cl = Grouping.parse("cluster:2").layout((6, 4, 3, 3))
    s = cl.expand(torch.arange(cl.G, dtype=torch.float32))
    assert all(bool((s[k] == k // 2).all()) for k in range(6))
    part = Grouping.parse("fgq:5:partial").layout((3, 12))
    assert part.segments == 3 and part.counts.tolist()[:3] == [5, 5, 2]


def test_per_channel_equals_cluster_of_one_and_tensor_equals_cluster_of_all() -> None:
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    for a, b in (("channel", "cluster:1"), ("tensor", "cluster:6")):
        ca, sa = ternarize(w, groups=a)
        cb, sb = ternarize(w, groups=b)
        assert torch.equal(ca, cb) and torch.equal(sa, sb)


def test_zero_padding_of_partial_groups_changes_nothing() -> None:
    # A short last group gives the same codes/scale as ternarizing those weights alone.
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(4))
    codes, scales = ternarize(w, groups="fgq:4:partial")
    for k in range(3):
        c2, s2 = ternarize(w[k, 8:].reshape(1, 2), groups="tensor")
        assert torch.equal(codes[k, 8:], c2[0]) and torch.allclose(scales[k * 3 + 2], s2[0])
    c4, s4 = quantize_weights(w, bits=4, groups="fgq:4:partial")
    assert float(s4[2]) == pytest.approx(float(w[0, 8:].abs().max()) / 7)


def test_smaller_groups_never_increase_error_on_average_and_exact_beats_closed_form() -> None:
    w = torch.randn(32, 64, 3, 3, generator=torch.Generator().manual_seed(5))
    errs = {}
    for n in (4, 16, 64, 576):
        codes, scales = ternarize(w, groups=f"fgq:{n}")
        errs[n] = float((w - dequantize(codes, scales, groups=f"fgq:{n}")).norm() / w.norm())
        tc, ts = ternarize(w, groups=f"fgq:{n}", method="threshold")
        assert errs[n] <= float((w - dequantize(tc, ts, groups=f"fgq:{n}")).norm() / w.norm())
    assert errs[4] < errs[16] < errs[64] < errs[576]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_kbit_codes_follow_round_to_nearest_of_the_scale(bits: int) -> None:
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(bits))
    codes, scales = quantize_weights(w, bits=bits, groups="fgq:8")
    q = 2 ** (bits - 1) - 1
    s = Grouping.parse("fgq:8").layout(w.shape).expand(scales).double()
    assert int(codes.abs().max()) == q  # the max of every group maps to +-q
    err = (w.double() - s * codes.double()).abs()
    assert bool((err <= s / 2 + 1e-9).all())  # nearest level, nothing clipped (scale from max)
    tern = ternarize(w, groups="fgq:8")
    assert (w - dequantize(codes, scales, groups="fgq:8")).norm() < (w - dequantize(*tern, groups="fgq:8")).norm()


def test_float16_scales_are_stored_rounded() -> None:
    w = torch.randn(4, 8)
    codes, scales = ternarize(w, groups="fgq:4", scale_dtype=torch.float16)
    assert scales.dtype == torch.float16
    c32, _ = ternarize(w, groups="fgq:4")
    assert torch.equal(codes, c32)


def test_residual_terms_monotonically_reduce_weight_error() -> None:
    g = torch.Generator().manual_seed(6)
    for spec in ("fgq:4", "fgq:64", "cluster:4", "tensor"):
        w = torch.randn(8, 64, 3, 3, generator=g)
        terms = ternary_expansion(w, groups=spec, terms=6)
        assert torch.equal(terms[0].codes, ternarize(w, groups=spec).codes)  # base term = the ternarizer
        approx, errs = torch.zeros_like(w, dtype=torch.float64), [float(w.double().norm())]
        for t in terms:
            approx = approx + dequantize(*t, groups=spec).double()
            errs.append(float((w.double() - approx).norm()))
        assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:])), errs
        assert errs[1] > errs[2] > errs[3]  # and strictly for the first edges


def test_pack_unpack_round_trip_is_exact_for_every_code_pattern() -> None:
    # Ternary: every pattern of 4 codes (a whole byte), then lengths that leave a partial byte.
    pats = torch.tensor(list(itertools.product((-1, 0, 1), repeat=4)), dtype=torch.int8).reshape(-1)
    assert torch.equal(unpack_codes(pack_codes(pats, 2), pats.numel(), 2), pats)
    assert len(pack_codes(pats, 2)) == 81
    for n in range(1, 10):
        c = pats[:n]
        assert torch.equal(unpack_codes(pack_codes(c, 2), n, 2), c)
    pairs = torch.tensor(list(itertools.product(range(-7, 8), repeat=2)), dtype=torch.int8).reshape(-1)
    assert torch.equal(unpack_codes(pack_codes(pairs, 4), pairs.numel(), 4), pairs) and len(pack_codes(pairs, 4)) == 225
    for bits in (3, 5, 8):
        q = 2 ** (bits - 1) - 1
        c = torch.arange(-q, q + 1, dtype=torch.int8)
        assert torch.equal(unpack_codes(pack_codes(c, bits), c.numel(), bits), c)


def test_unpack_rejects_invalid_slots_padding_and_lengths() -> None:
    with pytest.raises(ValueError, match="outside"):
        unpack_codes(bytes([0b10]), 1, 2)  # slot 10 is not a ternary code
    with pytest.raises(ValueError, match="outside"):
        unpack_codes(bytes([0x08]), 2, 4)  # -8 is not a 4-bit code
    with pytest.raises(ValueError, match="padding"):
        unpack_codes(bytes([0b01000000]), 3, 2)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(bytes(3), 5, 2)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([2]), 2)


def test_activation_quantizer_round_trip_and_ranges() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.relu(torch.randn(512, 16, generator=g))
    aq = ActQuantizer(8)
    aq.start_calibration()
    aq(x)
    aq.finish_calibration()
    assert not bool(aq.signed) and aq.qmin == 0 and aq.qmax == 255
    assert float(aq.scale) == pytest.approx(float(x.max()) / 255)
    q = aq.codes(x)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) == 255
    assert float((aq(x) - x).abs().max()) <= float(aq.scale) / 2 * (1 + 1e-6)  # half an LSB within range
    signed = ActQuantizer(4, method="percentile", percentile=90.0, pow2=True)
    y = torch.randn(4096, generator=g)
    signed.start_calibration()
    signed(y)
    signed.finish_calibration()
    s = float(signed.scale)
    assert bool(signed.signed) and signed.qmin == -7 and math.log2(s) == round(math.log2(s))
    assert int(signed.codes(torch.tensor([1e6])).item()) == 7  # saturates
    for bits, data in ((8, y), (8, y.abs()), (5, y * 1e-3)):
        dfp = ActQuantizer(bits, pow2=True)
        dfp.start_calibration()
        dfp(data)
        dfp.finish_calibration()
        s, clip = float(dfp.scale), float(data.abs().max())
        assert math.log2(s) == round(math.log2(s))  # a power of two: dynamic fixed point
        assert dfp.qmax * s / 2 < clip <= dfp.qmax * s  # the smallest such exponent
    mse = ActQuantizer(4, method="mse")
    mse.start_calibration()
    mse(y)
    mse.finish_calibration()
    minmax = ActQuantizer(4)
    minmax.start_calibration()
    minmax(y)
    minmax.finish_calibration()
    assert float(((mse(y) - y) ** 2).mean()) <= float(((minmax(y) - y) ** 2).mean())


def test_activation_quantizer_ste_gradient_is_clipped() -> None:
    aq = ActQuantizer(8)
    aq.start_calibration()
    aq(torch.linspace(0, 1, 100))
    aq.finish_calibration()
    aq.train()
    x = torch.tensor([0.5, 2.0], requires_grad=True)
    aq(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]


def test_bad_arguments_give_clear_errors() -> None:
    w = torch.randn(8, 6, 3, 3)
    with pytest.raises(ValueError, match="group size N must be >= 1"):
        Grouping("fgq", 0)
    with pytest.raises(ValueError, match="group size N must be >= 1"):
        ternarize(w, groups="fgq:0")
    with pytest.raises(ValueError, match="does not divide the reduction dimension R=54"):
        ternarize(w, groups="fgq:4")
    with pytest.raises(ValueError, match="does not divide the number of filters K=8"):
        ternarize(w, groups="cluster:3")
    ternarize(w, groups="fgq:4:partial")  # the stated padding rule makes it valid
    with pytest.raises(ValueError, match="unknown grouping"):
        ternarize(w, groups="blocks:4")
    with pytest.raises(ValueError, match="remainder"):
        Grouping("fgq", 4, "pad")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Grouping or a spec string"):
        ternarize(w, groups=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="takes no size"):
        Grouping.parse("channel:4")
    with pytest.raises(ValueError, match="method"):
        ternarize(w, groups="channel", method="twn")
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_weights(w, bits=9, groups="channel")
    with pytest.raises(TypeError, match="floating-point"):
        ternarize(torch.ones(4, 4, dtype=torch.int64), groups="channel")
    with pytest.raises(ValueError, match="NaN"):
        ternarize(torch.full((2, 2), math.nan), groups="channel")
    with pytest.raises(ValueError, match=">= 2 dims"):
        ternarize(torch.randn(8), groups="tensor")
    with pytest.raises(ValueError, match="activation bits"):
        ActQuantizer(1)
    with pytest.raises(ValueError, match="calibration method"):
        ActQuantizer(8, method="kl")
    with pytest.raises(RuntimeError, match="not calibrated"):
        ActQuantizer(8).codes(torch.ones(2))
