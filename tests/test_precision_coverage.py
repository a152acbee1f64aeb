"""Coverage of GEMM-level emulation on models nobody here wrote (HF transformers BERT / GPT-2 / ViT built from small
configs, torch's own MultiheadAttention / TransformerEncoder / LSTM / GRU, a timm-style ViT whose root owns
parameters), random weights, no downloads.

For each model: (1) the audit finds 0 GEMMs that ran unrounded under bf16; (2) forward output and every gradient
equal an independent reference: the plain model run under a TorchDispatchMode written here that rounds every
input of every aten GEMM (mm, addmm, bmm, baddbmm, convolution, convolution_backward; bias excluded) to BF16 with
ml_dtypes and runs the same FP32 kernel, while attention and recurrent layers are computed from their textbook
equations (so that their GEMMs are visible aten GEMMs); (3) the ``fp32`` policy is bit-identical to the plain model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from leantrain.precision import audit, emulate, emulating, emulation_of

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------- the reference

def bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to BF16 (nearest-even) by ml_dtypes, as float32 in ``t``'s memory layout."""
    r = torch.from_numpy(t.detach().cpu().numpy().astype(ml_dtypes.bfloat16).astype(np.float32))
    out = t.detach().clone(memory_format=torch.preserve_format)
    return out.copy_(r)


class RoundEveryAtenGemm(TorchDispatchMode):
    """Below autograd: every GEMM operand (forward and backward) rounded to BF16 by ml_dtypes, FP32 kernel; the
    bias and its gradient stay FP32; embedding rows and their gradient rows are rounded too (policy
    ``embeddings``). Any other GEMM-like operator is an error (the reference must see them all)."""

    UNSEEN = ("_scaled_dot_product", "mkldnn_rnn", "_thnn_fused", "mv", "addmv", "dot", "vdot", "_native_multi_head")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm"):
            return func(bf16(args[0]), bf16(args[1]), **kwargs)
        if name in ("addmm", "baddbmm"):
            return func(args[0], bf16(args[1]), bf16(args[2]), *args[3:], **kwargs)
        if name == "convolution":
            return func(bf16(args[0]), bf16(args[1]), *args[2:], **kwargs)
        if name == "convolution_backward":
            g = args[0]
            dx, dw, db = func(bf16(g), bf16(args[1]), bf16(args[2]), *args[3:], **kwargs)
            if db is not None:
                db = g.sum([d for d in range(g.dim()) if d != 1])
            return dx, dw, db
        if name == "embedding":  # the policy rounds embedding rows like W and their gradient rows like dY
            return func(bf16(args[0]), *args[1:], **kwargs)
        if name == "embedding_dense_backward":
            return func(bf16(args[0]), *args[1:], **kwargs)
        assert not name.startswith(self.UNSEEN), f"reference cannot round inside {name}"
        return func(*args, **kwargs)


def textbook_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(Q K^T * scale + mask) V with its two GEMMs as plain matmuls (the reference's definition)."""
    assert dropout_p == 0.0 and not enable_gqa
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)) if scale is None else scale)
    if is_causal:
        s = s.masked_fill(~torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril(), -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, -1) @ v


def textbook_rnn(kind: str, x, hx, params, has_b, layers, dropout, train, bidir, batch_first):
    """PyTorch's documented LSTM / GRU equations, gate GEMMs as F.linear."""
    dirs = 2 if bidir else 1
    per = len(params) // (layers * dirs)
    h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    seq = x.transpose(0, 1) if batch_first else x
    hs, cs = [], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            j = layer * dirs + d
            w_ih, w_hh, b_ih, b_hh = params[j * per:j * per + 4]
            h, c = h0[j], (c0[j] if c0 is not None else None)
            out = [None] * seq.shape[0]
            for t in (range(seq.shape[0]) if d == 0 else reversed(range(seq.shape[0]))):
                gi, gh = F.linear(seq[t], w_ih, b_ih), F.linear(h, w_hh, b_hh)
                if kind == "lstm":
                    i, f, g, o = (gh + gi).chunk(4, -1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                else:
                    r = torch.sigmoid(gi[:, :h.shape[1]] + gh[:, :h.shape[1]])
                    z = torch.sigmoid(gi[:, h.shape[1]:2 * h.shape[1]] + gh[:, h.shape[1]:2 * h.shape[1]])
                    n = torch.tanh(gi[:, 2 * h.shape[1]:] + r * gh[:, 2 * h.shape[1]:])
                    h = (1 - z) * n + z * h
                out[t] = h
            outs.append(torch.stack(out))
            hs.append(h)
            cs.append(c)
        seq = torch.cat(outs, -1)
    y = seq.transpose(0, 1) if batch_first else seq
    return (y, torch.stack(hs), torch.stack(cs)) if kind == "lstm" else (y, torch.stack(hs))


class Textbook(TorchFunctionMode):
    """Replaces fused attention and recurrent kernels by their textbook equations (plain matmuls)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return textbook_attention(*args, **kwargs)
        if func is torch._VF.lstm:
            return textbook_rnn("lstm", *args)
        if func is torch._VF.gru:
            return textbook_rnn("gru", *args)
        return func(*args, **kwargs)


# -------------------------------------------------------------------------------------- harness

def outputs_of(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    items = out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else []
    return [t for o in items for t in outputs_of(o)]


def step(model: nn.Module, inputs: tuple, kwargs: dict, ctx: Callable[[], Any] | None = None):
    """Output tensors and every parameter gradient of one forward/backward with a fixed random projection loss."""
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(1)
    if ctx is None:
        outs = outputs_of(model(*inputs, **kwargs))
        loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
        loss.backward()
    else:
        with ctx():
            outs = outputs_of(model(*inputs, **kwargs))
            loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
            loss.backward()
    grads = [(n, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None]
    return [o.detach() for o in outs], grads


class _Both:
    """The reference: textbook attention (also where F.multi_head_attention_forward calls it by its module-level
    name) and recurrences, every aten GEMM on ml_dtypes-rounded operands."""

    def __enter__(self):
        self.a, self.b = Textbook(), RoundEveryAtenGemm()
        self.sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, textbook_attention
        self.b.__enter__()
        self.a.__enter__()

    def __exit__(self, *exc):
        self.a.__exit__(*exc)
        self.b.__exit__(*exc)
        F.scaled_dot_product_attention = self.sdpa


def same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    """Bit equality; or, where the reference sums in another order (``exact=False``: the textbook recurrence runs
    one input GEMM per step, the emulation one per sequence), agreement to FP32 summation error, far below the
    2^-9 relative change of a single BF16 rounding left out."""
    return torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def check_model(model: nn.Module, inputs: tuple, kwargs: dict | None = None, *, activation: bool = True,
                reference: nn.Module | None = None, exact: bool = True) -> None:
    kwargs = kwargs or {}
    model.train()
    # (1) audit: no GEMM ran unrounded, and the kinds expected ran
    a = audit(model, *inputs, policy="bf16", **kwargs)
    assert a.total_unrounded == 0, a.describe()
    assert a.emulated["parameter"]["forward"] > 0 and a.emulated["parameter"]["backward_weight"] > 0
    assert (a.emulated.get("activation", {}).get("forward", 0) > 0) == activation, a.describe()
    # (2) bf16 == independent reference (rounded operands, same FP32 kernels)
    ref_model = copy.deepcopy(reference if reference is not None else model)
    ref_out, ref_grads = step(ref_model, inputs, kwargs, _Both)
    emu_model = emulate(copy.deepcopy(model), "bf16")
    out, grads = step(emu_model, inputs, kwargs)
    assert len(out) == len(ref_out) and [n for n, _ in grads] == [n for n, _ in ref_grads]
    for o, r in zip(out, ref_out):
        assert same(o, r, exact), f"output differs: max {(o - r).abs().max():.3g}"
    for (n, g), (_, r) in zip(grads, ref_grads):
        assert same(g, r, exact), f"gradient of {n} differs: max {(g - r).abs().max():.3g}"
    plain_out, plain_grads = step(copy.deepcopy(model), inputs, kwargs)
    assert any(not torch.equal(o, p) for o, p in zip(out, plain_out))  # bf16 really rounded something
    # (3) fp32 policy: bit-identical to the plain model
    fp_out, fp_grads = step(emulate(copy.deepcopy(model), "fp32"), inputs, kwargs)
    assert all(torch.equal(o, p) for o, p in zip(fp_out, plain_out))
    assert all(torch.equal(g, p) for (_, g), (_, p) in zip(fp_grads, plain_grads))


# ---------------------------------------------------------------------------------------- models

def _bert(attn: str) -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM._from_config(cfg, attn_implementation=attn)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_bert(attn: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    check_model(_bert(attn), (ids,), {"attention_mask": mask})


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_gpt2_conv1d_and_tied_weights(attn: str) -> None:
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 40, (2, 7))
    check_model(model, (ids,))
    emulate(model, "bf16")
    model(ids)
    sites = emulation_of(model).layers
    # transformers' Conv1D (torch.addmm) and the attention products are GEMM sites of their modules
    assert "transformer.h.0.attn.c_attn" in sites and "transformer.h.0.mlp.c_proj" in sites
    assert any(k.startswith("transformer.h.0.attn") and k.endswith(":activation") for k in sites)


def test_hf_vit() -> None:
    torch.manual_seed(2)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=32, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, num_labels=3)
    check_model(transformers.ViTForImageClassification(cfg), (torch.randn(2, 3, 8, 8),))


class RootParamViT(nn.Module):
    """timm's VisionTransformer layout at toy size: the root module owns ``cls_token`` and ``pos_embed``, fused
    attention through F.scaled_dot_product_attention, pre-norm blocks."""

    def __init__(self, dim: int = 16, heads: int = 4, depth: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
            "norm2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, 2 * dim), "fc2": nn.Linear(2 * dim, dim)})
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for b in self.blocks:
            B, N, C = x.shape
            q, k, v = b["qkv"](b["norm1"](x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
            x = x + b["proj"](a)
            x = x + b["fc2"](F.gelu(b["fc1"](b["norm2"](x))))
        return self.head(self.norm(x)[:, 0])


def test_root_parameter_vit() -> None:
    torch.manual_seed(3)
    model = RootParamViT()
    check_model(model, (torch.randn(2, 3, 8, 8),))
    emulate(model, "bf16")
    assert emulation_of(model).fp32_layers == []


_NO_VISION = ("the registry's torchvision wheel is built against CUDA torch and does not import beside the CPU "
              "torch wheel (timm imports torchvision), so it is not installed here")


def _import_or_skip(name: str) -> Any:
    try:
        return __import__(name)
    except Exception as err:  # noqa: BLE001 - ImportError, or the CUDA/CPU torch mismatch's RuntimeError/OSError
        pytest.skip(f"{name}: {_NO_VISION} ({type(err).__name__}: {err})")


def test_timm_vit() -> None:
    timm = _import_or_skip("timm")
    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=16,
                              depth=1, num_heads=4, num_classes=3)
    check_model(model, (torch.randn(2, 3, 32, 32),))


def test_torch_multihead_attention_with_weights() -> None:
    torch.manual_seed(5)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4)

        def forward(self, x: torch.Tensor) -> Any:
            return self.attn(x, x, x, need_weights=True)  # the explicit bmm / baddbmm path

    check_model(M(), (torch.randn(5, 2, 16),))


def test_torch_transformer_encoder() -> None:
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    check_model(model, (torch.randn(2, 5, 16),), {"mask": nn.Transformer.generate_square_subsequent_mask(5)})


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_torch_recurrent_layers(kind: str) -> None:
    torch.manual_seed(7)
    cls = nn.LSTM if kind == "lstm" else nn.GRU
    model = cls(6, 5, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 4, 6)
    # the reference's textbook equations are PyTorch's (checked in FP32 against the native kernel)
    with Textbook():
        ref = model(x)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs_of(ref), outputs_of(model(x))))
    check_model(model, (x,), activation=False, exact=False)


def test_float64_model_is_a_clear_error() -> None:
    model = nn.Linear(3, 2).double()
    with pytest.raises(TypeError, match="float32 model.*weight \\(float64\\).*model.float\\(\\)"):
        emulate(model, "bf16")
    with emulating("bf16"), pytest.raises(ValueError, match="float32 models only"):
        torch.randn(2, 3, dtype=torch.float64) @ torch.randn(3, 2, dtype=torch.float64)


def test_functional_context_manager_and_activation_policy() -> None:
    from leantrain.numerics import BF16
    from leantrain.precision import FloatSpec, Gemm, get_policy

    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 3, 4, requires_grad=True) for _ in range(3))
    with emulating("bf16") as emu:
        y = torch.einsum("bqd,bkd->bqk", q, k).softmax(-1) @ v
    y.sum().backward()
    qq, kk, vv = (bf16(t) for t in (q, k, v))
    s = torch.bmm(qq, kk.transpose(1, 2)).softmax(-1)
    assert torch.equal(y, torch.bmm(bf16(s), vv))
    assert list(emu.layers) == ["functional:activation"]
    # activation GEMMs left FP32 by the policy: the einsum is then the plain FP32 product
    bf = FloatSpec(BF16)
    pol = get_policy("bf16").replace(name="bf16-act-fp32", activation=(Gemm(), Gemm(), Gemm()))
    with emulating(pol) as emu:
        z = torch.einsum("bqd,bkd->bqk", q, k)
        w = F.linear(q, nn.Parameter(k[0].detach()))
    assert torch.equal(z, torch.bmm(q, k.transpose(1, 2)))
    assert torch.equal(w, F.linear(bf16(q), bf16(k[0])))
    assert "activation GEMMs (the policy rounds none of their inputs)" in emu.describe() and bf.label in pol.describe()
    with pytest.raises(TypeError, match="activation must be"):
        get_policy("bf16").replace(activation=(Gemm(),))


def test_torchvision_resnet18_and_mobilenet() -> None:
    tv = _import_or_skip("torchvision")
    torch.manual_seed(9)
    for make in (tv.models.resnet18, tv.models.mobilenet_v3_small):
        check_model(make(num_classes=3), (torch.randn(2, 3, 32, 32),), activation=False)


class _RawAtenMatmul(nn.Module):
    """A GEMM leantrain does not route (a direct aten call): the audit must report it, not hide it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.mm.default(self.fc(x), self.w)


def test_audit_reports_gemms_that_ran_unrounded() -> None:
    torch.manual_seed(10)
    a = audit(_RawAtenMatmul(), torch.randn(3, 4), policy="bf16")
    assert a.emulated["parameter"] == {"forward": 1, "backward_weight": 1}  # x needs no gradient
    # forward mm, and its two backward GEMMs (autograd's MmBackward0)
    assert a.unrounded == {"mm in <root> (forward)": 1, "mm in <outside the model> (backward (MmBackward0))": 2}
    assert "3 GEMM(s) ran UNROUNDED" in a.describe()
    fp = audit(_RawAtenMatmul(), torch.randn(3, 4), policy="fp32")
    assert fp.total_emulated == 0 and fp.total_unrounded == 5  # fp32 routes nothing: every GEMM is plain FP32


def test_precision_audit_command(capsys) -> None:
    import json

    from leantrain.cli import main

    assert main(["precision", "audit", "torch:mha", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_unrounded"] == 0 and out["emulated"]["activation"]["forward"] == 2
    assert main(["precision", "audit", "no-such-model"]) == 2
    assert "MODEL-SPEC must be one of" in capsys.readouterr().err


def test_dfp16_activation_gemm_is_the_exact_integer_product_rescaled() -> None:
    from leantrain.numerics import to_dfp
    from leantrain.precision import IntAccumulator, get_policy

    torch.manual_seed(11)
    a, b = torch.randn(3, 4, 20), torch.randn(3, 20, 5)
    pol = get_policy("dfp16").replace(name="dfp16-unchunked", accumulator=IntAccumulator(32, None))
    with emulating(pol):
        y = a @ b  # two activations: one batched activation GEMM, one shared exponent per tensor
    am, ae = to_dfp(a, 16)
    bm, be = to_dfp(b, 16)
    exact = torch.bmm(am.to(torch.int64).double(), bm.to(torch.int64).double())  # |sums| < 2^53: exact
    assert torch.equal(y, (exact.float() * 2.0 ** (int(ae) + int(be))))


def test_what_is_not_emulated_raises_clearly() -> None:
    torch.manual_seed(12)
    lstm = emulate(nn.LSTM(3, 4), "bf16")
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match="packed sequences .* not emulated"):
        lstm(packed)
    with emulating("dfp16"), pytest.raises(ValueError, match="conv3d cannot be emulated under the DFP policy"):
        F.conv3d(torch.randn(1, 4, 3, 5, 5), nn.Parameter(torch.randn(4, 2, 3, 3, 3)), groups=2)
    # the hooks left the module stack clean after the exception: the model still runs
    assert lstm(torch.randn(5, 2, 3))[0].shape == (5, 2, 4) and emulation_of(lstm)._stack == []
