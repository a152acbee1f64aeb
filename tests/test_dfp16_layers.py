"""DFP16 layers: grouped/depthwise convolutions against float64 references of the DFP-rounded operands, the native
pair kernel against the torch fallback bit for bit, and the default INT32 chunks' overflow bound."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leantrain.numerics import safe_chunk, to_dfp
from leantrain.numerics.gathered_gemm import native_available
from leantrain.precision import IntAccumulator, Recorder, emulate, get_policy, policy_names

U32 = 2.0**-24  # unit roundoff of float32
needs_native = pytest.mark.skipif(not native_available(), reason="no working C compiler for the native kernel")


def _rounded64(t: torch.Tensor) -> torch.Tensor:
    """``t`` on its DFP16 grid (one exponent, nearest), in float64: the operand the integer GEMMs multiply."""
    m, e = to_dfp(t.detach(), 16)
    return m.double() * 2.0 ** int(e)


def _on_grid(shape: tuple[int, ...], exp: int, g: torch.Generator) -> torch.Tensor:
    """Random DFP16 values ``m 2^exp`` whose largest mantissa is 2^15 - 1 (so ``to_dfp`` picks exactly ``exp``):
    stochastic rounding leaves them unchanged, so the reference knows the rounded output gradient."""
    m = torch.randint(-(2**15 - 1), 2**15, shape, generator=g)
    m.view(-1)[0] = 2**15 - 1
    return m.float() * 2.0**exp


# (module, input shape): grouped, depthwise (stride, dilation), 1-d grouped, transposed grouped
CONVS = [
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 7, 6)),
    (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (3, 6, 9, 8)),
    (lambda: nn.Conv2d(4, 8, (3, 2), padding=(2, 1), dilation=(2, 1), groups=4, bias=False), (2, 4, 8, 7)),
    (lambda: nn.Conv1d(6, 3, 5, padding=2, groups=3), (2, 6, 11)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 5, 4)),
]


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False])
@pytest.mark.parametrize("make,shape", CONVS)
def test_grouped_conv_equals_the_float64_convolution_of_the_rounded_operands(make, shape, native, monkeypatch) -> None:
    """Forward and both gradients of a grouped or depthwise convolution under dfp16 (chunks of 2 products) are
    within the float32 accumulation bound of the exact float64 grouped convolution of the DFP16-rounded operands.

    Bound: a result accumulated from n float32 roundings (one per chunk register, one per float32 add: chunk chain
    plus the col2im adds) of exact integer partial sums is within n u sum|products| of the exact value (u = 2^-24);
    a wrong group assignment is off by O(1) relative."""
    monkeypatch.setenv("LEANTRAIN_NATIVE", "1" if native else "0")
    torch.manual_seed(0)
    conv = make()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 2.0
    ref_conv = copy.deepcopy(conv).double()
    rec = Recorder()
    emulate(conv, "dfp16", recorder=rec)
    xx = x.clone().requires_grad_(True)
    y = conv(xx)
    gy = _on_grid(tuple(y.shape), -28, g)
    y.backward(gy)

    xq = _rounded64(x).requires_grad_(True)
    wq = _rounded64(conv.weight).requires_grad_(True)
    geo = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    fn = {1: F.conv1d, 2: F.conv2d}[x.dim() - 2]
    if isinstance(conv, nn.ConvTranspose2d):
        fn = F.conv_transpose2d
        geo["output_padding"] = conv.output_padding
    bias = None if conv.bias is None else ref_conv.bias.detach()
    y_ref = fn(xq, wq, bias, **geo)
    y_ref.backward(gy.double())
    with torch.no_grad():  # the same convolution on magnitudes: sum |products| per output
        absy = fn(xq.abs(), wq.abs(), None, **geo)
    taps = math.prod(conv.kernel_size)
    cg, og = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    n_fwd = math.ceil(cg * taps / 2) + taps + 1
    assert ((y.double() - y_ref.detach()).abs() <= n_fwd * U32 * absy + 1e-30).all()
    # gradients: bound from the same convolutions of |operands|
    xa = xq.detach().abs().requires_grad_(True)
    wa = wq.detach().abs().requires_grad_(True)
    fn(xa, wa, None, **geo).backward(gy.double().abs())
    out_pos = y.shape[0] * math.prod(y.shape[2:])
    n_dx = math.ceil(og * taps / 2) + taps + 1
    n_dw = math.ceil(out_pos / 2) + taps + 1
    assert ((xx.grad.double() - xq.grad).abs() <= n_dx * U32 * xa.grad).all()
    assert ((conv.weight.grad.double() - wq.grad).abs() <= n_dw * U32 * wa.grad).all()
    assert not torch.equal(conv.weight.grad, torch.zeros_like(conv.weight.grad))
    s = rec.summary()
    assert all(s[f"gemm:{k}"]["acc_overflows"] == 0 for k in ("forward", "backward_data", "backward_weight"))


@needs_native
@pytest.mark.parametrize("chunk", [2, 8, None, (2, 8, 256), 3])
@pytest.mark.parametrize("record", [False, True])
def test_native_and_fallback_are_bit_identical_for_every_gemm(chunk, record, monkeypatch) -> None:
    """A small CNN with a grouped convolution and linear layers: forward, input and weight gradients of the native
    pair kernel (and the counting kernel on recorded steps) equal the torch fallback (LEANTRAIN_NATIVE=0) bit for
    bit, and so do the recorded wrap counts."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 20), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(4, 3, 6, 6) * 4.0
    t = torch.randint(0, 5, (4,))
    policy = get_policy("dfp16").replace(accumulator=IntAccumulator(32, chunk))

    def run(native: bool):
        m = copy.deepcopy(model)
        rec = Recorder() if record else None
        emulate(m, policy, recorder=rec)
        with monkeypatch.context() as mp:
            mp.setenv("LEANTRAIN_NATIVE", "1" if native else "0")
            xx = x.clone().requires_grad_(True)
            out = m(xx)
            F.cross_entropy(out, t).backward()
        counts = None if rec is None else [(r["layer"], r["tensor"], r["acc_overflows"]) for r in rec.rows()
                                           if r["tensor"].startswith("gemm:")]
        return [out.detach(), xx.grad] + [p.grad for p in m.parameters()], counts

    (a, ca), (b, cb) = run(True), run(False)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert ca == cb


def test_default_chunk_is_overflow_free_by_bound() -> None:
    """The dfp16 default: every GEMM's chunk fits the worst case of DFP16 mantissas in INT32 (2 products), and
    the next length would not; Policy.describe says so."""
    top = 2**15 - 1
    assert safe_chunk(top, top, 32) == 2 and 3 * top * top > 2**31 - 1 >= 2 * top * top
    pol = get_policy("dfp16")
    for gemm in ("forward", "backward_data", "backward_weight"):
        assert pol.accumulator.chunk_for(gemm) == 2 and pol.wrap_free(gemm)  # type: ignore[union-attr]
    assert "overflow-free by bound" in pol.describe() and "can wrap" not in pol.describe()
    longer = pol.replace(accumulator=IntAccumulator(32, (2, 8, None)))
    assert not longer.wrap_free("backward_data") and "can wrap" in longer.describe()
    # the worst case itself: registers of 2 products (2^15 - 1)^2 do not wrap (4 in one register would)
    layer = nn.Linear(4, 1, bias=False)
    emulate(layer, "dfp16")
    with torch.no_grad():
        layer.weight.fill_(-float(top))  # mantissas -(2^15 - 1), exponent 0
    y = layer(torch.full((1, 4), -float(top)))
    pair = torch.tensor(2.0 * top * top, dtype=torch.float32)  # one register, rounded to float32
    assert torch.equal(y.reshape(()), pair + pair)


def test_grouped_conv_runs_under_every_policy() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4, 6, 6)
    for name in policy_names():
        conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        ref = copy.deepcopy(conv)
        emulate(conv, name)
        y = conv(x)
        y.sum().backward()
        assert y.shape == ref(x).shape and torch.isfinite(conv.weight.grad).all()
        if name == "fp32":
            assert torch.equal(y, ref(x))
