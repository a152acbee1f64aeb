"""Tests of leantrain.precision against independent oracles (ml_dtypes rounding, float64 GEMMs, int64 products)."""

from __future__ import annotations

import copy
import pickle

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leantrain.models import CharLSTM, Generator, LeNet, resnet20
from leantrain.numerics import to_dfp
from leantrain.precision import (
    DFPSpec,
    FloatSpec,
    Gemm,
    IntAccumulator,
    LossScaler,
    Policy,
    PrecisionHooks,
    Recorder,
    audit,
    emulate,
    emulation_of,
    get_policy,
    restore,
    round_optimizer_state,
    unsupported_layers,
)
from leantrain.train import fit

U32 = 2.0**-24  # unit roundoff of float32


def ml_round(t: torch.Tensor, dtype) -> torch.Tensor:
    """Round-to-nearest-even through ml_dtypes (the independent oracle), back in float64."""
    return torch.from_numpy(t.detach().double().numpy().astype(np.float32).astype(dtype).astype(np.float64))


def check_close(got: torch.Tensor, ref: torch.Tensor, abs_ref: torch.Tensor, k: int) -> None:
    """|got - ref| <= (k + 2) u * (|A||B|) elementwise: the standard bound for a length-k float32 dot product
    (any summation order), plus the final rounding to float32."""
    bound = (k + 2) * U32 * abs_ref + 1e-30
    err = (got.double() - ref).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


def run_layer(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()  # makes dL/dY = g exactly
    return y.detach(), x.grad, layer.weight.grad, (layer.bias.grad if layer.bias is not None else None)


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_matches_float64_reference_of_rounded_operands(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(37, 11, bias=bias)
    emulate(layer, "bf16")
    x = torch.randn(5, 3, 37)
    g = torch.randn(5, 3, 11) * 1e-3
    y, dx, dw, db = run_layer(layer, x, g)
    xq, wq, gq = (ml_round(t, ml_dtypes.bfloat16) for t in (x, layer.weight, g))
    b64 = layer.bias.detach().double() if bias else 0.0
    check_close(y, xq @ wq.T + b64, xq.abs() @ wq.abs().T, 37)
    check_close(dx, gq @ wq, gq.abs() @ wq.abs(), 11)
    g2, x2 = gq.reshape(-1, 11), xq.reshape(-1, 37)
    check_close(dw, g2.T @ x2, g2.abs().T @ x2.abs(), 15)
    if bias:  # the bias add is FP32: its gradient is the unrounded sum of dY
        assert torch.allclose(db.double(), g.double().reshape(-1, 11).sum(0), rtol=1e-6, atol=0)
    # the operands really were rounded: an FP32 GEMM differs
    assert not torch.allclose(y, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "convtranspose2d"])
def test_bf16_conv_matches_float64_reference_of_rounded_operands(kind: str) -> None:
    torch.manual_seed(1)
    if kind == "conv2d":
        layer, x = nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(2, 3, 9, 9)
        op = lambda a, w: F.conv2d(a, w, stride=2, padding=1)
    elif kind == "conv1d":
        layer, x = nn.Conv1d(3, 4, 5, padding=2), torch.randn(2, 3, 16)
        op = lambda a, w: F.conv1d(a, w, padding=2)
    else:
        layer, x = nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1), torch.randn(2, 4, 5, 5)
        op = lambda a, w: F.conv_transpose2d(a, w, stride=2, padding=1)
    y_shape = layer(x).shape
    emulate(layer, "bf16")
    g = torch.randn(y_shape) * 1e-2
    y, dx, dw, db = run_layer(layer, x, g)
    xq = ml_round(x, ml_dtypes.bfloat16).requires_grad_(True)
    wq = ml_round(layer.weight, ml_dtypes.bfloat16).requires_grad_(True)
    gq = ml_round(g, ml_dtypes.bfloat16)
    ref = op(xq, wq)
    dx_ref, dw_ref = torch.autograd.grad(ref, (xq, wq), gq)
    xa, wa = xq.detach().abs().requires_grad_(True), wq.detach().abs().requires_grad_(True)
    abs_y = op(xa, wa)
    abs_dx, abs_dw = torch.autograd.grad(abs_y, (xa, wa), gq.abs())
    k = max(x.numel(), g.numel())  # a safe upper bound on every reduction length here
    check_close(y - layer.bias.detach().reshape(1, -1, *([1] * (y.dim() - 2))), ref.detach(), abs_y.detach(), k)
    check_close(dx, dx_ref, abs_dx, k)
    check_close(dw, dw_ref, abs_dw, k)
    assert torch.allclose(db.double(), g.double().sum(dim=[d for d in range(g.dim()) if d != 1]), rtol=1e-6, atol=0)


def test_embedding_rounds_rows_and_gradient_rows() -> None:
    torch.manual_seed(2)
    emb = nn.Embedding(10, 6)
    emulate(emb, "bf16")
    idx = torch.tensor([[1, 2, 1], [9, 1, 0]])
    g = torch.randn(2, 3, 6)
    y = emb(idx)
    (y * g).sum().backward()
    table = ml_round(emb.weight, ml_dtypes.bfloat16)
    assert torch.equal(y.double(), table[idx])
    ref = torch.zeros(10, 6, dtype=torch.float64).index_add_(0, idx.reshape(-1), ml_round(g, ml_dtypes.bfloat16).reshape(-1, 6))
    assert torch.allclose(emb.weight.grad.double(), ref, rtol=4 * U32, atol=0)


def _dfp_exact(t: torch.Tensor) -> tuple[np.ndarray, int]:
    m, e = to_dfp(t, 16)
    return m.to(torch.int64).numpy(), int(e)


@pytest.mark.parametrize("chunk", [None, 8])
def test_dfp16_forward_gemm_is_the_exact_integer_product_rescaled(chunk) -> None:
    torch.manual_seed(3)
    rec = Recorder()
    layer = nn.Linear(48, 7, bias=False)
    emulate(layer, get_policy("dfp16").replace(accumulator=IntAccumulator(32, chunk)), recorder=rec)
    x = torch.randn(6, 48)
    y = layer(x).detach()
    xm, xe = _dfp_exact(x)
    wm, we = _dfp_exact(layer.weight.detach())
    exact = (xm @ wm.T).astype(np.float64) * 2.0 ** (xe + we)  # int64 product: no overflow possible
    acc = [r for r in rec.rows() if r["tensor"] == "gemm:forward"]
    assert acc and acc[0]["acc_overflows"] == 0
    assert rec.rows()[0]["exponent"] == xe
    if chunk is None:  # one INT32 register per output: the only rounding is int32 -> float32
        assert np.allclose(y.double().numpy(), exact, rtol=U32, atol=0)
    else:  # 6 chunk registers converted to float32 and summed in float32
        bound = 7 * U32 * (np.abs(xm) @ np.abs(wm).T).astype(np.float64) * 2.0 ** (xe + we)
        assert bool((np.abs(y.double().numpy() - exact) <= bound).all())


@pytest.mark.parametrize("chunk", [None, 6])
def test_dfp16_conv_forward_is_the_exact_integer_convolution_rescaled(chunk) -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    rec = Recorder()
    emulate(conv, get_policy("dfp16").replace(accumulator=IntAccumulator(32, chunk=chunk)), recorder=rec)
    x = torch.randn(2, 2, 6, 6)
    y = conv(x).detach()
    assert rec.summary()["gemm:forward"]["acc_overflows"] == 0
    xm, xe = _dfp_exact(x)
    wm, we = _dfp_exact(conv.weight.detach())
    # float64 holds every partial sum exactly (|sum| < 2^53): an exact integer convolution
    xi, wi = torch.from_numpy(xm).double(), torch.from_numpy(wm).double()
    exact = F.conv2d(xi, wi, padding=1) * 2.0 ** (xe + we)
    if chunk is None:  # one INT32 register: the only rounding is int32 -> float32
        assert torch.allclose(y.double(), exact, rtol=U32, atol=0)
    else:  # 3 chunks of 6 (of 18) rounded to float32 and summed in float32: <= 4 roundings of partial sums
        bound = 4 * U32 * F.conv2d(xi.abs(), wi.abs(), padding=1) * 2.0 ** (xe + we)
        assert bool(((y.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("geometry", [
    dict(dims=2, cin=3, cout=5, k=3, stride=1, padding=1, dilation=1, size=(9, 7)),
    dict(dims=2, cin=4, cout=16, k=3, stride=2, padding=1, dilation=1, size=(8, 8)),
    dict(dims=2, cin=2, cout=9, k=(2, 3), stride=(2, 1), padding=(0, 2), dilation=(1, 2), size=(7, 10)),
    dict(dims=1, cin=3, cout=17, k=5, stride=2, padding=2, dilation=1, size=(11,)),
    dict(dims=2, cin=6, cout=8, k=1, stride=1, padding=0, dilation=1, size=(5, 5)),
])
@pytest.mark.parametrize("record", [True, False])
def test_dfp16_conv_without_im2col_equals_the_unfold_path(geometry, native: bool, record: bool, monkeypatch) -> None:
    """The gathered GEMMs (offset tables instead of unfold, col2im fused into backward-data, int32 or float64
    registers, native kernel or torch) give the unfold/fold path's forward and gradients bit for bit."""
    from leantrain.numerics.gathered_gemm import native_available
    from leantrain.precision.operands import LayerNumerics

    if native and not native_available():
        pytest.skip("no working C compiler for the native kernel")
    torch.manual_seed(8)
    g_ = dict(geometry)
    conv_cls = nn.Conv1d if g_.pop("dims") == 1 else nn.Conv2d
    size = g_.pop("size")
    conv = conv_cls(g_.pop("cin"), g_.pop("cout"), g_.pop("k"), **g_)
    x = torch.randn(3, conv.in_channels, *size) * 3.0
    gy = torch.randn(conv(x).shape) * 1e-3

    def run(unfold: bool):
        layer = copy.deepcopy(conv)
        emulate(layer, "dfp16", recorder=Recorder() if record else None)
        with monkeypatch.context() as m:
            m.setenv("LEANTRAIN_NATIVE", "1" if native else "0")
            if unfold:
                m.setattr(LayerNumerics, "wraps_exactly", lambda self: False)
            xx = x.clone().requires_grad_(True)
            y = layer(xx)
            y.backward(gy)
        return y.detach(), xx.grad, layer.weight.grad

    for got, ref in zip(run(False), run(True)):
        assert torch.equal(got, ref)


def test_dfp16_trains_lenet_and_counts_accumulator_overflows() -> None:
    torch.manual_seed(5)
    model = LeNet(in_channels=1, num_classes=3, width=4)
    rec = Recorder()
    emulate(model, get_policy("dfp16").replace(accumulator=IntAccumulator(32, chunk=None)), recorder=rec)
    x, t = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), t).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    summary = rec.summary()
    for gemm in ("gemm:forward", "gemm:backward_data", "gemm:backward_weight"):
        assert summary[gemm]["acc_sums"] > 0
    assert {"x", "w", "dy"} <= set(summary)


def _train_steps(model: nn.Module, steps: int = 3) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 1, 8, 8, generator=g)
        t = torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("make", [lambda: LeNet(in_channels=1), lambda: resnet20(width=4, in_channels=1, depth=8)])
def test_fp32_policy_is_bit_identical_to_unwrapped(make) -> None:
    torch.manual_seed(6)
    ref_model = make()
    model = copy.deepcopy(ref_model)
    emulate(model, "fp32")
    assert emulation_of(model) is not None and emulation_of(model).layers
    for a, b in zip(_train_steps(ref_model), _train_steps(model)):
        assert torch.equal(a, b)
    bf = copy.deepcopy(ref_model)
    emulate(bf, "bf16")
    assert not all(torch.equal(a, b) for a, b in zip(_train_steps(copy.deepcopy(ref_model)), _train_steps(bf)))


def test_state_dict_round_trip_and_restore() -> None:
    torch.manual_seed(7)
    model = CharLSTM(vocab_size=12, embed_dim=4, hidden_size=8)
    plain_keys = list(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}
    emulate(model, "bf16")
    # GEMMs are intercepted, no class is swapped
    assert {n: type(m) for n, m in model.named_modules()} == classes and "decoder" in emulation_of(model).layers
    assert list(model.state_dict()) == plain_keys
    fresh = CharLSTM(vocab_size=12, embed_dim=4, hidden_size=8)
    fresh.load_state_dict(model.state_dict())
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    clone = pickle.loads(pickle.dumps(model))
    idx = torch.randint(0, 12, (2, 5))
    assert torch.equal(clone(idx), model(idx))
    emulate(fresh, "bf16")
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(idx), model(idx))
    restore(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes and emulation_of(model) is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    plain = CharLSTM(vocab_size=12, embed_dim=4, hidden_size=8)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model(idx), plain(idx))  # restored: the plain FP32 model again


def test_loss_scaler_skips_on_injected_inf_and_recovers() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = LossScaler(init_scale=1024.0, growth_interval=2)
    scaler.scale_loss((p * 2).sum()).backward()
    p.grad[1] = float("inf")
    assert scaler.step(opt) is False
    assert torch.equal(p.detach(), torch.ones(3)) and scaler.skipped == 1 and scaler.scale == 512.0
    for _ in range(2):
        opt.zero_grad()
        scaler.scale_loss((p * 2).sum()).backward()
        assert scaler.step(opt) is True
    assert torch.allclose(p.detach(), torch.full((3,), 1 - 2 * 0.1 * 2))  # unscaled gradient 2, two steps
    assert scaler.scale == 1024.0 and scaler.steps == 2  # grew after growth_interval finite steps
    state = scaler.state_dict()
    other = LossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_fp16_scaled_fit_backs_off_from_overflow_and_trains() -> None:
    torch.manual_seed(8)
    x = torch.randn(64, 1, 8, 8)
    t = (x.mean(dim=(1, 2, 3)) > 0).long()
    data = torch.utils.data.TensorDataset(x, t)
    model = LeNet(in_channels=1, num_classes=2, width=4)
    scaler = LossScaler(init_scale=2.0**30, growth_interval=1000)  # far too large: FP16 gradients overflow
    hooks = PrecisionHooks("fp16-scaled", scaler=scaler)
    hist = fit(model, torch.optim.SGD(model.parameters(), lr=0.05), F.cross_entropy, data, epochs=3, batch_size=16,
               hooks=hooks, eval_train=False)
    assert hist.skipped_steps == scaler.skipped and scaler.skipped >= 1
    assert scaler.scale < 2.0**30 and scaler.steps > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_recorder_shows_fp16_gradient_underflow_where_bf16_has_none() -> None:
    torch.manual_seed(9)
    x = torch.randn(16, 8)
    g = torch.randn(16, 4) * 1e-8  # below FP16's smallest subnormal / 2 (2^-25 ~ 3e-8) for most entries
    fracs = {}
    for name in ("fp16", "bf16"):
        layer = nn.Linear(8, 4)
        rec = Recorder()
        emulate(layer, name, recorder=rec)
        (layer(x) * g).sum().backward()
        fracs[name] = rec.summary()["dy"]["underflow_frac"]
    direct = float((ml_round(g, np.float16) == 0).double().mean())
    assert fracs["fp16"] == pytest.approx(direct) and fracs["fp16"] > 0.5
    assert fracs["bf16"] == 0.0


def test_fp8_per_tensor_scaling_gives_representable_scaled_values() -> None:
    torch.manual_seed(10)
    rec = Recorder()
    layer = nn.Linear(16, 4, bias=False)
    emulate(layer, "fp8", recorder=rec)
    x = torch.randn(8, 16) * 1e-3  # tiny values: without scaling most would underflow E4M3
    xs = get_policy("fp8").forward.a
    assert isinstance(xs, FloatSpec) and xs.scaling == "tensor"
    layer(x)
    amax = float(x.abs().max())
    s = 2.0 ** np.floor(np.log2(448.0 / amax))
    ref = ml_round(x * s, ml_dtypes.float8_e4m3fn) / s
    from leantrain.precision.operands import LayerNumerics

    q = LayerNumerics("t", get_policy("fp8")).round(x, xs, "x")
    assert torch.equal(q.double(), ref)
    assert rec.summary()["x"]["underflow"] == 0


def test_bf16_master_weights_ablation_loses_small_updates() -> None:
    w = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        w.weight.fill_(1.0)
    pol = get_policy("bf16").replace(name="bf16-master", master_weights=FloatSpec(get_policy("bf16").forward.b.format))
    hooks = PrecisionHooks(pol)
    opt = torch.optim.SGD(w.parameters(), lr=1e-4)
    hooks.wrap(w, opt)
    hooks.backward(w(torch.ones(1, 4)).sum())
    hooks.step(opt)  # update 1e-4 < half an ulp of 1.0 in BF16 (2^-8): lost
    assert torch.equal(w.weight.detach(), torch.ones(1, 4))


def test_optimizer_state_rounding_draws_from_the_seeded_streams_not_the_global_rng() -> None:
    from leantrain.numerics import BF16, quantize

    pol = get_policy("bf16").replace(name="bf16-adam-state", optimizer_state=FloatSpec(BF16, "stochastic"))

    def step(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        w = nn.Linear(64, 32)
        opt = torch.optim.Adam(w.parameters(), lr=1e-3)
        hooks = PrecisionHooks(pol, seed=seed)
        hooks.wrap(w, opt)
        hooks.backward(w(torch.randn(8, 64)).square().sum())
        before = torch.random.get_rng_state()
        hooks.step(opt)
        assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
        return [v for st in opt.state.values() for v in st.values() if v.dim() > 0]

    a, b, c = step(5), step(5), step(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible from the seed
    assert any(not torch.equal(x, y) for x, y in zip(a, c))  # and the seed matters
    for v in a:  # every moment is a BF16 value
        assert torch.equal(v, quantize(v, BF16))
    p = nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(2)
    sgd.step()  # now there is a momentum buffer to round
    with pytest.raises(ValueError, match="streams"):
        round_optimizer_state(sgd, FloatSpec(BF16, "stochastic"))


def test_stochastic_rounding_resume_is_bit_identical(tmp_path) -> None:
    torch.manual_seed(11)
    x, t = torch.randn(48, 6), torch.randint(0, 3, (48,))
    data = torch.utils.data.TensorDataset(x, t)

    def run(ckpt, epochs, resume=False, init=None):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        if init is not None:
            model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        fit(model, opt, F.cross_entropy, data, epochs=epochs, batch_size=8, seed=3, hooks=PrecisionHooks("bf16-sr", seed=5),
            checkpoint=ckpt, checkpoint_every=2, resume=resume, eval_train=False)
        return model

    init = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict()
    full = run(tmp_path / "a.pt", 2, init=init)
    run(tmp_path / "b.pt", 1, init=init)
    resumed = run(tmp_path / "b.pt", 2, resume=True, init=init)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bad_policy_names_and_specs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="policy must be one of .*bf16"):
        get_policy("bf17")
    with pytest.raises(TypeError, match="policy must be"):
        get_policy(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rounding must be one of"):
        FloatSpec(get_policy("bf16").forward.a.format, "up")
    with pytest.raises(ValueError, match="both inputs in DFP"):
        Gemm(DFPSpec(), None)
    with pytest.raises(ValueError, match="accumulator=IntAccumulator"):
        Policy("x", forward=Gemm(DFPSpec(), DFPSpec()), backward_data=Gemm(DFPSpec(), DFPSpec()),
               backward_weight=Gemm(DFPSpec(), DFPSpec()))
    with pytest.raises(ValueError, match="chunk must be"):
        IntAccumulator(chunk=0)
    with pytest.raises(ValueError, match="tuple of 3"):
        IntAccumulator(chunk=(8, 8))
    acc = IntAccumulator(chunk=(8, None, 256))
    assert [acc.chunk_for(g) for g in ("forward", "backward_data", "backward_weight")] == [8, None, 256]
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        emulate("not a model", "bf16")  # type: ignore[arg-type]


class _OwnMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


class _CustomLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _LookupThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4, max_norm=1.0)
        self.fc = nn.Linear(4, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(idx))


def test_layers_once_refused_are_emulated_and_unsupported_ones_listed_not_silently_fp32() -> None:
    torch.manual_seed(13)
    # a custom x @ self.w layer and a Linear subclass with its own forward: their GEMMs are intercepted now
    model = nn.Sequential(nn.Linear(4, 4), _OwnMatmul(), _CustomLinear(4, 4), nn.BatchNorm1d(4))
    a = audit(model, torch.randn(3, 4), policy="bf16")
    assert a.total_unrounded == 0
    assert a.emulated == {"parameter": {"forward": 3, "backward_data": 2, "backward_weight": 3}}
    emulate(model, "bf16")
    assert emulation_of(model).norm_layers == ["3"] and "normalization layers (1): 3" in emulation_of(model).describe()
    # an embedding with max_norm renormalises its table in place: refused, listed, FP32 only when named
    bad = _LookupThenLinear()
    with pytest.raises(ValueError) as err:
        emulate(bad, "bf16")
    msg = str(err.value)
    assert "emb (Embedding)" in msg and "fc (" not in msg and "allow_unsupported" in msg and emulation_of(bad) is None
    plain = copy.deepcopy(bad)
    emulate(bad, "bf16", allow_unsupported=[nn.Embedding])
    emu = emulation_of(bad)
    assert emu.fp32_layers == ["emb"] and "allow_unsupported: emb" in emu.describe()
    idx = torch.tensor([[1, 2, 5]])
    assert torch.equal(bad.emb(idx), plain.emb(idx))  # the lookup is FP32, as declared
    assert not torch.equal(bad(idx), plain(idx))      # the linear layer is not
    with pytest.raises(ValueError, match="not unsupported"):
        emulate(nn.Sequential(nn.Linear(2, 2)), "bf16", allow_unsupported=["0"])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    assert unsupported_layers(grouped, "bf16") == []
    assert unsupported_layers(grouped, "dfp16") == []


def test_dcgan_generator_emulates_under_every_policy() -> None:
    torch.manual_seed(12)
    z = torch.randn(4, 8)
    for name in ("bf16", "fp8", "dfp16", "bf16-trunc"):
        gen = Generator(latent_dim=8, data_shape=(1, 8, 8), width=4)
        emulate(gen, name)
        out = gen(z)
        out.sum().backward()
        assert out.shape == (4, 1, 8, 8) and all(torch.isfinite(p.grad).all() for p in gen.parameters())


@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 300])
def test_int_matmul_fast_wrap_path_equals_exact_emulation(chunk) -> None:
    from leantrain.numerics import int_matmul

    g = torch.Generator().manual_seed(13)
    a = torch.randint(-32767, 32768, (9, 513), dtype=torch.int16, generator=g)
    b = torch.randint(-32767, 32768, (513, 6), dtype=torch.int16, generator=g)
    a[:4] = a[:4].abs()  # same-signed rows and columns: sums leave the INT32 range
    b[:, :3] = b[:, :3].abs()
    exact, s1 = int_matmul(a, b, chunk=chunk)
    fast, s2 = int_matmul(a, b, chunk=chunk, events=False)
    assert fast.dtype == exact.dtype and torch.equal(fast, exact)
    # registers whose exact chunk sum leaves the range, from an int64 reference
    c = chunk or 513
    sums = torch.stack([(a[:, s:s + c].long() @ b[s:s + c].long()) for s in range(0, 513, c)])
    assert s2["wrapped_outputs"] == int(((sums < -2**31) | (sums > 2**31 - 1)).sum()) and s2["overflow_events"] is None
    if chunk is None:
        assert s2["wrapped_outputs"] > 0


def test_dfp16_nonfinite_input_gives_nan_not_an_exception() -> None:
    layer = nn.Linear(4, 3)
    emulate(layer, "dfp16")
    x = torch.randn(2, 4)
    x[0, 1] = float("inf")
    y = layer(x)
    assert torch.isnan(y).all()
    y.sum().backward()
    assert torch.isnan(layer.weight.grad).all()


def test_train_command_precision_option(tmp_path) -> None:
    import json

    from leantrain.cli import main

    rc = main(["train", "--model", "mlp", "--dataset", "breast_cancer", "--epochs", "1", "--max-steps", "3",
               "--precision", "fp16-scaled", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist["steps"] == 3
    with pytest.raises(SystemExit):
        main(["train", "--model", "mlp", "--dataset", "breast_cancer", "--precision", "bf17", "--out", str(tmp_path)])
