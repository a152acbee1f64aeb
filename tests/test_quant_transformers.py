"""leantrain.quant on models nobody here wrote: HF BERT and GPT-2 (small configs, random weights, no
downloads) and torch's nn.TransformerEncoder: keyword arguments, output types, roles and first/last,
packed export into the user's own model instance, integer path vs fake-quant."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from leantrain.quant import ActQuant, QuantConfig, WeightQuant, load_quantized, quantize_model, save_quantized
from leantrain.quant.layers import QuantLayer

transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")


def _bert(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def _gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _encoder(seed: int = 0, batch_first: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()


def _tokens() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 100, (6, 16), generator=g)
    mask = torch.ones(6, 16, dtype=torch.long)
    mask[0, 9:] = 0
    mask[3, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _encoder_inputs(batch_first: bool = True) -> dict[str, torch.Tensor]:
    x = torch.randn(6, 16, 32, generator=torch.Generator().manual_seed(6))
    pad = _tokens()["attention_mask"] == 0
    return {"src": x if batch_first else x.transpose(0, 1), "src_key_padding_mask": pad}


CASES = {
    "bert": (_bert, _tokens, lambda out: out.logits),
    "gpt2": (_gpt2, _tokens, lambda out: out.logits),
    "encoder": (_encoder, _encoder_inputs, lambda out: out),
}


@pytest.mark.parametrize("name", list(CASES))
def test_keyword_arguments_and_output_types_pass_through(name: str) -> None:
    build, inputs, logits = CASES[name]
    model, kw = build(), inputs()
    q = quantize_model(model, calibration=kw if name != "encoder" else kw["src"], grouping="fgq:4")
    with torch.no_grad():
        out = q(**kw)
        ref = model(**kw)
    assert type(out) is type(ref)
    assert logits(out).shape == logits(ref).shape
    assert not torch.allclose(logits(out), logits(ref), atol=1e-4)  # quantization really happened
    with torch.no_grad():  # float mode runs the original computation through the same modules
        flt = logits(q.set_mode("float")(**kw))
    if name == "encoder":  # torch's fused path leaves padded positions at 0; compare the real tokens
        keep = ~kw["src_key_padding_mask"]
        assert torch.allclose(flt[keep], ref[keep], atol=2e-6, rtol=1e-5)
    else:
        assert torch.allclose(flt, logits(ref), atol=2e-6, rtol=1e-5)
    if name != "encoder":  # tuple outputs (return_dict=False) pass through as well
        with torch.no_grad():
            tup = q.set_mode("fake")(**kw, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], logits(out))


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_never_takes_torchs_fused_fast_path_around_quantized_layers(batch_first: bool) -> None:
    enc, kw = _encoder(batch_first=batch_first), _encoder_inputs(batch_first)
    q = quantize_model(enc, calibration=kw["src"], grouping="fgq:4", keep=None)
    with torch.no_grad():
        fast_allowed = q(**kw)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = q(**kw)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        fp32 = enc(**kw)
    keep = ~kw["src_key_padding_mask"] if batch_first else ~kw["src_key_padding_mask"].t()
    assert torch.equal(fast_allowed[keep], slow[keep])
    assert (fast_allowed[keep] - fp32[keep]).abs().max() > 1e-3
    assert all(isinstance(q.model.get_submodule(f"layers.{i}.{n}"), QuantLayer)
               for i in range(2) for n in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"))


def test_first_last_and_roles_mean_what_a_transformer_user_means() -> None:
    bert_q = quantize_model(_bert(), calibration=_tokens())
    kept = {r.name for r in bert_q.report() if r.status.startswith("kept")}
    att = "bert.encoder.layer.0.attention.self."
    assert kept == {att + "query", att + "key", att + "value", "classifier"}
    roles = {r.name: r.role for r in bert_q.report()}
    assert roles[att + "query"] == roles["bert.encoder.layer.1.attention.output.dense"] == "attention"
    assert roles["bert.encoder.layer.0.intermediate.dense"] == roles["bert.encoder.layer.1.output.dense"] == "mlp"
    assert roles["bert.pooler.dense"] == roles["classifier"] == "head"

    gpt_q = quantize_model(_gpt2(), calibration=_tokens())
    assert {r.name for r in gpt_q.report() if r.status.startswith("kept")} == {"transformer.h.0.attn.c_attn", "lm_head"}
    enc_q = quantize_model(_encoder(), calibration=_encoder_inputs()["src"])
    assert {r.name for r in enc_q.report() if r.status.startswith("kept")} == {"layers.0.self_attn.in_proj", "layers.1.linear2"}

    by_role = quantize_model(_bert(), calibration=_tokens(), keep=["role:attention", "role:head"])
    status = {r.name: r.status for r in by_role.report()}
    assert all(s.startswith("kept") == (roles[n] in ("attention", "head")) for n, s in status.items())
    by_pattern = quantize_model(_bert(), QuantConfig(keep=("*.intermediate.dense",)), calibration=_tokens())
    assert {r.name for r in by_pattern.report() if r.status.startswith("kept")} == {
        "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"}
    with pytest.raises(ValueError, match="keep entry 'bert.encoder.layer.9.output'"):
        quantize_model(_bert(), calibration=_tokens(), keep=["bert.encoder.layer.9.output"])
    with pytest.raises(ValueError, match="role must be one of"):
        quantize_model(_bert(), calibration=_tokens(), keep=["role:ffn"])


def test_config_object_and_keyword_form_are_one_conversion() -> None:
    model, kw = _bert(), _tokens()
    cfg = QuantConfig(WeightQuant(bits=4, grouping="fgq:8"), ActQuant(bits=8, method="percentile", percentile=99.9),
                      keep=("first", "last"))
    a = quantize_model(model, cfg, calibration=kw)
    b = quantize_model(model, weights="int4", grouping="fgq:8", act_method="percentile", percentile=99.9, calibration=kw)
    with torch.no_grad():
        assert torch.equal(a(**kw).logits, b(**kw).logits)
    assert a.config == b.config == cfg.to_dict() and QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match="either config= or the keyword form"):
        quantize_model(model, cfg, calibration=kw, weights="int4")
    with pytest.raises(ValueError, match="unknown weights keys"):
        QuantConfig.from_dict({"weights": {"bitz": 2}})
    with pytest.raises(ValueError, match="weight bits"):
        WeightQuant(bits=9)


@pytest.mark.parametrize("name", list(CASES))
def test_export_reloads_into_the_users_model_bit_identically(name: str, tmp_path: Path) -> None:
    build, inputs, logits = CASES[name]
    model, kw = build(), inputs()
    q = quantize_model(model, calibration=kw if name != "encoder" else kw["src"], grouping="fgq:4",
                       weights="ternary")
    path = tmp_path / f"{name}.lt"
    info = save_quantized(q, path)
    assert info["bytes"] == path.stat().st_size < info["fp32_state_bytes"]
    other_init = build(seed=7)  # any instance of the architecture: every tensor comes from the file
    for target in (other_init, lambda: build(seed=9)):
        q2 = load_quantized(path, target)
        with torch.no_grad():
            assert torch.equal(logits(q2(**kw)), logits(q(**kw)))
            assert torch.equal(logits(q2.set_mode("integer")(**kw)), logits(q.set_mode("integer")(**kw)))
        q.set_mode("fake")
    assert torch.equal(next(other_init.parameters()), next(build(seed=7).parameters()))  # instance left untouched
    with pytest.raises(ValueError, match="outside leantrain's zoo"):
        load_quantized(path)
    if name == "bert":
        with pytest.raises(ValueError, match="does not match the model"):
            load_quantized(path, _bert(hidden=48))
    if name == "gpt2":  # the tied input embedding / output head (kept FP32 as "last") is stored once
        import json
        import struct

        assert model.lm_head.weight is model.transformer.wte.weight
        raw = path.read_bytes()
        header = json.loads(raw[20:20 + struct.unpack_from("<Q", raw, 12)[0]])
        fs = header["float_state"]
        assert fs["lm_head.weight"]["range"] == fs["transformer.wte.weight"]["range"]


@pytest.mark.parametrize("name", list(CASES))
def test_integer_path_vs_fake_quant_within_the_documented_bounds(name: str) -> None:
    build, inputs, _ = CASES[name]
    model, kw = build(), inputs()
    q = quantize_model(model, calibration=kw if name != "encoder" else kw["src"], grouping="fgq:8")
    # Per layer, on the same input: the integer path is the exact value rounded once; fake-quant is within
    # the float32 accumulation bound (R + 3) * 2^-24 * sum |s_x q_x| |w| (+ |b|).
    checked = 0
    for layer in q.quant_layers().values():
        captured: list[torch.Tensor] = []
        h = layer.register_forward_pre_hook(lambda m, inp, out=captured: out.append(inp[0].detach()))
        with torch.no_grad():
            q(**kw)
        h.remove()
        x = captured[0]
        with torch.no_grad():
            layer.mode = "fake"
            fake = layer(x)
            integer = layer.integer_forward(x)
        xq = layer.act.levels(x).double() * float(layer.act.scale)
        w = layer.weight_hat().double()
        b = layer.bias.double()
        ref, mag = F.linear(xq, w, b), F.linear(xq.abs(), w.abs(), b.abs())
        R = layer.layout.R
        assert bool(((integer.double() - ref).abs() <= 2.0**-23 * mag + 1e-30).all())
        assert bool(((fake.double() - ref).abs() <= (R + 3) * 2.0**-24 * mag + 1e-30).all())
        checked += 1
    assert checked == len(q.quant_layers()) > 0
    # End to end (docs/quant.md): a flipped 8-bit code moves by one step, and flips are rare.
    agree = q.path_agreement(**kw)
    assert agree["max_code_diff"] <= 1
    assert agree["flip_rate"] <= 1e-3
    assert math.isfinite(agree["rel_diff"]) and agree["rel_diff"] <= 1e-3


def test_ternary_lm_model_converts_and_round_trips(tmp_path: Path) -> None:
    from leantrain.app.experiments.ternary_lm import CharTransformer

    torch.manual_seed(0)
    lm = CharTransformer(97, seq_len=16, d_model=32, heads=4, layers=2, ff=64).eval()
    ids = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(1))
    q = quantize_model(lm, QuantConfig(WeightQuant(2, "fgq:16")), calibration=ids)
    rows = {r.name: r for r in q.report()}
    assert {n for n, r in rows.items() if r.status.startswith("kept")} == {"blocks.layers.0.self_attn.in_proj", "head"}
    assert rows["blocks.layers.1.linear1"].role == "mlp" and rows["blocks.layers.1.self_attn.out_proj"].role == "attention"
    assert rows["blocks.layers.1.linear1"].macs == 64 * 32 * 16  # K * R * L, L = 16 tokens per window
    assert rows["blocks.layers.1.linear1"].mults_replaced == pytest.approx(1 - 1 / 16)
    save_quantized(q, tmp_path / "lm.lt")
    q2 = load_quantized(tmp_path / "lm.lt", lambda: CharTransformer(97, seq_len=16, d_model=32, heads=4, layers=2, ff=64))
    with torch.no_grad():
        assert torch.equal(q2(ids), q(ids))


@pytest.mark.parametrize("batch_first", [True, False])
def test_projected_attention_computes_what_multihead_attention_computes(batch_first: bool) -> None:
    from leantrain.quant import ProjectedAttention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    pa = ProjectedAttention(mha).eval()
    g = torch.Generator().manual_seed(1)
    L, S, N = 5, 7, 3

    def seq(n: int) -> torch.Tensor:
        t = torch.randn(N, n, 16, generator=g)
        return t if batch_first else t.transpose(0, 1)

    q, kv = seq(L), seq(S)
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[1, 5:] = True
    bool_mask = torch.rand(L, S, generator=g) > 0.7
    bool_mask[:, 0] = False  # every query sees at least one key
    float_mask = torch.randn(N * 4, L, S, generator=g)
    cases = [dict(), dict(key_padding_mask=pad), dict(attn_mask=bool_mask, key_padding_mask=pad),
             dict(attn_mask=float_mask), dict(average_attn_weights=False)]
    with torch.no_grad():
        for kw in cases:
            for query, key in ((q, q), (q, kv)):  # self attention and cross attention
                if query is key:
                    kw2 = {k: (v[:, :L] if k == "key_padding_mask" else v[..., :L] if k == "attn_mask" else v)
                           for k, v in kw.items()}
                else:
                    kw2 = kw
                ref_out, ref_w = mha(query, key, key, **kw2)
                out, w = pa(query, key, key, **kw2)
                assert torch.allclose(out, ref_out, atol=1e-6, rtol=1e-5), kw
                assert torch.allclose(w, ref_w, atol=1e-6, rtol=1e-5), kw
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        ref, _ = mha(q, q, q, attn_mask=causal, need_weights=False)
        out, w = pa(q, q, q, is_causal=True, need_weights=False)
        assert w is None and torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
        single = q[0] if batch_first else q[:, 0]  # unbatched (L, E)
        assert torch.allclose(pa(single, single, single)[0], mha(single, single, single)[0], atol=1e-6, rtol=1e-5)


def _import_or_skip(name: str) -> object:
    # Registry torchvision/timm are built against CUDA torch and fail to import beside the CPU wheel
    # (ImportError, OSError or RuntimeError depending on the build): skip with that reason.
    try:
        return __import__(name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        pytest.skip(f"{name} cannot be imported beside this torch build ({type(exc).__name__}: {exc})")


def test_torchvision_cnns_quantize_and_reload(tmp_path: Path) -> None:
    _import_or_skip("torchvision")
    from torchvision.models import mobilenet_v3_small, resnet18

    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for build in (lambda: resnet18(num_classes=10), lambda: mobilenet_v3_small(num_classes=10)):
        torch.manual_seed(0)
        net = build().eval()
        q = quantize_model(net, calibration=x, grouping="fgq:8:partial")
        rows = q.report()
        assert rows[0].status.startswith("kept") and rows[-1].status.startswith("kept")  # stem and classifier
        assert all(r.status == "kept FP32 (grouped convolution)" for r in rows if r.status.startswith("kept")
                   and r.name not in (rows[0].name, rows[-1].name))
        save_quantized(q, tmp_path / "cnn.lt")
        with torch.no_grad():
            assert torch.equal(load_quantized(tmp_path / "cnn.lt", build)(x), q(x))


def test_timm_vit_quantizes_with_roles(tmp_path: Path) -> None:
    timm = _import_or_skip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = quantize_model(vit, calibration=x, grouping="fgq:8")
    rows = {r.name: r for r in q.report()}
    assert {n for n, r in rows.items() if r.status.startswith("kept")} == {"patch_embed.proj", "head"}
    assert rows["blocks.0.attn.qkv"].role == "attention" and rows["blocks.0.mlp.fc1"].role == "mlp"
    save_quantized(q, tmp_path / "vit.lt")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "vit.lt", vit)(x), q(x))
