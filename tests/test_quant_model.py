"""Model-level tests of leantrain.quant: conversion, integer path, counting, residual edges, export, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from leantrain.models import LeNet, model_spec, resnet20
from leantrain.quant import (
    QuantizedModel,
    add_residual_edges,
    finetune,
    load_quantized,
    quantize_model,
    save_quantized,
    ternarize,
    to_torch_int8,
    torch_int8_available,
)
from leantrain.quant.layers import QuantLayer


def _tiny_resnet() -> tuple[nn.Module, torch.Tensor, dict]:
    torch.manual_seed(0)
    m = resnet20(width=4, in_channels=3, num_classes=5, depth=8).eval()
    for mod in m.modules():  # non-trivial BN statistics so that BN matters
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return m, x, model_spec("resnet20", width=4, in_channels=3, num_classes=5, depth=8)


def _layer_io(layer_kind: str):
    g = torch.Generator().manual_seed(2)
    if layer_kind == "conv2d":
        mod = nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=True)
        x = torch.randn(3, 8, 9, 9, generator=g)
    elif layer_kind == "conv1d":
        mod = nn.Conv1d(8, 6, 5, padding=2, dilation=2)
        x = torch.randn(3, 8, 17, generator=g)
    else:
        mod = nn.Linear(24, 6)
        x = torch.randn(5, 24, generator=g)
    return mod, x


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "linear"])
@pytest.mark.parametrize("spec,bits,terms", [("fgq:4", 2, 1), ("fgq:4", 2, 3), ("fgq:16:partial", 2, 2), ("cluster:2", 2, 1),
                                             ("channel", 4, 1), ("tensor", 8, 1), ("fgq:8", 4, 1)])
def test_integer_path_equals_fake_quant_path(kind: str, spec: str, bits: int, terms: int) -> None:
    from leantrain.quant import ActQuantizer

    mod, x = _layer_io(kind)
    act = ActQuantizer(8)
    act.start_calibration()
    act(x)
    act.finish_calibration()
    layer = QuantLayer(mod, bits=bits, grouping=spec, act=act, terms=terms).eval()
    layer.active_terms = terms
    fake = layer(x)
    layer.mode = "integer"
    integer = layer(x)
    assert integer.shape == fake.shape == mod(x).shape
    # Float64 reference of the exact value s_x * sum alpha T q + b, and the float32 accumulation bound.
    q = act.codes(x).double() * float(act.scale)
    w = layer.weight_hat().double()
    op = {"conv2d": lambda a, b, bias: F.conv2d(a, b, bias, 2, 1), "conv1d": lambda a, b, bias: F.conv1d(a, b, bias, 1, 2, 2),
          "linear": F.linear}[kind]
    ref = op(q, w, mod.bias.double())
    mag = op(q.abs(), w.abs(), mod.bias.double().abs())
    R = math.prod(mod.weight.shape[1:])
    bound = (R + 3) * 2.0**-24 * mag + 1e-30
    assert bool(((integer.double() - ref).abs() <= 2.0**-23 * mag + 1e-30).all())  # rounded once
    assert bool(((fake.double() - ref).abs() <= bound).all())
    assert bool(((integer.double() - fake.double()).abs() <= bound + 2.0**-23 * mag).all())


def test_integer_mode_on_whole_model_tracks_fake_mode() -> None:
    m, x, _ = _tiny_resnet()
    q = quantize_model(m, grouping="fgq:4", calibration=x)
    fake = q(x)
    integer = q.set_mode("integer")(x)
    # Layer outputs agree to float rounding; a rare 1-LSB flip of a downstream activation code is allowed.
    assert (integer - fake).abs().max() <= 0.05 * fake.abs().max()
    assert (integer.argmax(1) == fake.argmax(1)).float().mean() >= 0.9


def test_multiplication_count_equals_hand_count_on_small_conv() -> None:
    # Conv 8 -> 4 channels, 3x3, no padding, on 6x6 input: 4x4 = 16 output positions, R = 72.
    # FP32: 4 * 72 * 16 = 4608 multiplications. fgq:8 -> 72/8 = 9 scale multiplies per output:
    # 4 * 9 * 16 = 576 remain, 87.5% replaced. cluster:2 -> 1 per output: 64 remain.
    # fgq:16:partial -> ceil(72/16) = 5 segments: 320 remain.
    net = nn.Sequential(nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 8, 6, 6)
    for spec, remain in (("fgq:8", 576), ("cluster:2", 64), ("fgq:16:partial", 320), ("tensor", 64)):
        row = quantize_model(net, grouping=spec, calibration=x, keep=None).report()[0]
        assert row.macs == 4608 and row.mults == remain
        assert row.mults_replaced == pytest.approx(1 - remain / 4608)
        assert row.mem_fp32_bytes == 4 * 288
    int4 = quantize_model(net, weights="int4", grouping="fgq:8", calibration=x, keep=None).report()[0]
    assert int4.mults_replaced == 0.0 and int4.mults == 4608 + 576
    assert int4.mem_quant_bytes == 288 * 4 / 8 + 36 * 4  # 4-bit codes + 36 float32 scales


def test_quantize_model_keeps_first_last_and_leaves_the_input_model_alone() -> None:
    m, x, _ = _tiny_resnet()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    q = quantize_model(m, grouping="fgq:4", calibration=x)
    assert isinstance(q, QuantizedModel) and isinstance(q, nn.Module)
    rows = q.report()
    assert rows[0].name == "conv" and rows[0].status.startswith("kept") and rows[-1].name == "fc"
    assert all(r.status == "quantized" for r in rows[1:-1])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    q_all = quantize_model(m, grouping="channel", calibration=x, keep=None)
    assert all(r.status == "quantized" for r in q_all.report())
    # Float mode is the original network exactly.
    assert torch.equal(q.set_mode("float")(x), m(x))


def test_residual_edges_reduce_error_and_switching_off_restores_8_2_exactly() -> None:
    m, x, _ = _tiny_resnet()
    q = quantize_model(m, grouping="fgq:4", calibration=x)
    y82 = q(x)
    info = add_residual_edges(q, budget=0.5, max_terms=3)
    assert 0 < info["budget_edges"] <= len(info["edge_order"]) and info["spent"] <= 0.5
    for name, layer in q.quant_layers().items():
        errs = [layer.weight_error(t) for t in range(1, layer.n_terms + 1)]
        assert all(b < a for a, b in zip(errs, errs[1:])), (name, errs)
    y_res = q(x)
    assert not torch.equal(y_res, y82)
    yfp = m(x)
    assert (y_res - yfp).norm() < (y82 - yfp).norm()
    q.set_residuals(0)
    assert torch.equal(q(x), y82)
    q.set_residuals(len(q.edge_order))
    for layer in q.quant_layers().values():  # per-layer switches
        layer.active_terms = 1
    assert torch.equal(q(x), y82)
    # The ranking respects term order inside each layer.
    seen: dict[str, int] = {}
    for name, t in q.edge_order:
        assert t == seen.get(name, 0) + 1
        seen[name] = t


def test_sensitivity_is_the_first_order_output_perturbation() -> None:
    from leantrain.quant import perturbation_sensitivity

    m, x, _ = _tiny_resnet()
    q = quantize_model(m, grouping="fgq:4", calibration=x)
    for layer in q.quant_layers().values():
        layer.requantize(2)
    s = perturbation_sensitivity(q, x, max_terms=2)
    # Oracle: finite differences of the FP32 network along the same weight perturbation.
    name = "layers.0.conv1"
    layer = q.layer(name)
    delta = (layer.weight.detach() - layer.weight_hat(1)).double()
    net = m.double()
    p = net.get_submodule(name).weight
    eps = 1e-4
    with torch.no_grad():
        w0 = p.clone()
        p.add_(eps * delta)
        up = net(x.double())
        p.copy_(w0 - eps * delta)
        down = net(x.double())
        p.copy_(w0)
    fd = (up - down) / (2 * eps)
    assert s[name][0] == pytest.approx(float(fd.square().sum()) / len(x), rel=1e-3)


def test_random_order_and_budget_arguments() -> None:
    m, x, _ = _tiny_resnet()
    q = quantize_model(m, grouping="fgq:4", calibration=x)
    info = add_residual_edges(q, budget=0.0, sensitivity="random", max_terms=3, seed=3)
    assert info["budget_edges"] == 0 and q.residuals_on == 0
    assert len(info["edge_order"]) == 2 * len(q.quant_layers())
    with pytest.raises(ValueError, match="budget"):
        add_residual_edges(q, budget=-1)
    with pytest.raises(ValueError, match="sensitivity"):
        add_residual_edges(q, budget=0.1, sensitivity="hessian")
    with pytest.raises(ValueError, match="k must be"):
        q.set_residuals(len(q.edge_order) + 1)
    with pytest.raises(ValueError, match="active_terms"):
        next(iter(q.quant_layers().values())).active_terms = 0
    q4 = quantize_model(m, weights="int4", grouping="fgq:4", calibration=x)
    with pytest.raises(ValueError, match="ternary"):
        add_residual_edges(q4, budget=0.1)


def test_quantize_model_bad_arguments() -> None:
    m, x, _ = _tiny_resnet()
    with pytest.raises(ValueError, match="weights must be one of"):
        quantize_model(m, weights="int9", calibration=x)
    with pytest.raises(ValueError, match="layer 'layers.0.conv1'.*does not divide"):
        quantize_model(m, grouping="fgq:5", calibration=x)
    with pytest.raises(ValueError, match="unknown grouping"):
        quantize_model(m, grouping="rows:4", calibration=x)
    with pytest.raises(ValueError, match="calibration data is required"):
        quantize_model(m, calibration=None)
    with pytest.raises(ValueError, match="keep entry"):
        quantize_model(m, calibration=x, keep=["nope"])


def test_save_load_is_bit_identical_and_smaller(tmp_path: Path) -> None:
    m, x, spec = _tiny_resnet()
    for weights, grouping, sd in (("ternary", "fgq:4", torch.float32), ("int4", "cluster:2", torch.float16)):
        q = quantize_model(m, weights=weights, grouping=grouping, calibration=x, model_spec=spec, scale_dtype=sd)
        if weights == "ternary":
            add_residual_edges(q, budget=0.3, max_terms=3)
        y = q(x)
        info = save_quantized(q, tmp_path / "q.lt", edges="all")
        assert info["bytes"] == (tmp_path / "q.lt").stat().st_size < info["fp32_state_bytes"]
        q2 = load_quantized(tmp_path / "q.lt")
        assert torch.equal(q2(x), y)
        assert torch.equal(q2.set_mode("integer")(x), q.set_mode("integer")(x))
        q.set_mode("fake")
        q2.set_mode("fake")
        assert q2.edge_order == q.edge_order and q2.budget_edges == q.budget_edges
        if q.edge_order:
            q.set_residuals(0)
            q2.set_residuals(0)
            assert torch.equal(q2(x), q(x))
        assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_load_rejects_truncated_and_malformed_files(tmp_path: Path) -> None:
    m, x, spec = _tiny_resnet()
    q = quantize_model(m, grouping="fgq:4", calibration=x, model_spec=spec)
    path = tmp_path / "q.lt"
    save_quantized(q, path)
    raw = path.read_bytes()
    cases = {
        "truncated": raw[: len(raw) - 10],
        "truncated or corrupt: header": raw[:40],
        "preamble": raw[:5],
        "not a leantrain quantized model": b"XXXXXXXX" + raw[8:],
        "corrupt": raw[:-1] + bytes([raw[-1] ^ 0xFF]),
        "CRC-32 mismatch": raw + b"\0",
    }
    for match, data in cases.items():
        bad = tmp_path / "bad.lt"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=match):
            load_quantized(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_quantized(tmp_path / "missing.lt")
    save_quantized(quantize_model(m, calibration=x), tmp_path / "x.lt")  # no spec: needs the architecture to load
    with pytest.raises(ValueError, match="outside leantrain's zoo"):
        load_quantized(tmp_path / "x.lt")
    assert torch.equal(load_quantized(tmp_path / "x.lt", m)(x), quantize_model(m, calibration=x)(x))


def test_any_bit_flip_anywhere_in_a_packed_file_is_a_clear_error(tmp_path: Path) -> None:
    import struct
    import zlib

    from leantrain.quant.packed import _PREAMBLE

    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    q = quantize_model(net, grouping="fgq:4", calibration=x, keep=None)
    path = tmp_path / "q.lt"
    save_quantized(q, path)
    raw = path.read_bytes()
    hlen = struct.unpack_from("<Q", raw, 12)[0]
    regions = {"preamble": range(0, _PREAMBLE.size), "header": range(_PREAMBLE.size, _PREAMBLE.size + hlen),
               "payload": range(_PREAMBLE.size + hlen, len(raw) - 4), "trailer": range(len(raw) - 4, len(raw))}
    assert all(len(r) > 0 for r in regions.values())
    bad = tmp_path / "flipped.lt"
    for region, positions in regions.items():
        for pos in positions:  # every byte of the file, one bit each (cycling through the 8 bit positions)
            data = bytearray(raw)
            data[pos] ^= 1 << (pos % 8)
            bad.write_bytes(bytes(data))
            with pytest.raises(ValueError) as err:
                load_quantized(bad, net)
            assert repr(str(bad)) in str(err.value), (region, pos, str(err.value))
    # The header is covered: 8-bit activations rewritten as 4-bit (same length) no longer load silently.
    text = raw.decode("latin-1")
    assert text.count('"act": {"bits": 8') == 3
    edited = text.replace('"act": {"bits": 8', '"act": {"bits": 4').encode("latin-1")
    bad.write_bytes(edited)
    with pytest.raises(ValueError, match="corrupt: CRC-32 mismatch"):
        load_quantized(bad, net)
    # Recomputing only a payload checksum would not help: the trailer covers everything before it.
    body = edited[:-4]
    bad.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    q4 = load_quantized(bad, net)  # a deliberate re-signing is a different, valid file
    assert next(iter(q4.quant_layers().values())).act.bits == 4
    assert torch.equal(load_quantized(path, net)(x), q(x))


def test_finetune_trains_shadow_weights_and_codes_follow() -> None:
    from torch.utils.data import TensorDataset

    m, x, _ = _tiny_resnet()
    y = m(x).argmax(1)
    q = quantize_model(m, grouping="fgq:32:partial", calibration=x)
    name = "layers.0.conv1"
    w0 = q.layer(name).weight.detach().clone()
    finetune(q, TensorDataset(x, y), epochs=1, batch_size=8, lr=0.05)
    layer = q.layer(name)
    assert not torch.equal(layer.weight.detach(), w0)
    codes, scales = ternarize(layer.weight.detach(), groups="fgq:32:partial")
    out = q(x)
    assert torch.equal(layer.term(0).codes, codes) and torch.equal(layer.term(0).scales, scales)
    assert out.shape == (16, 5)


def test_torch_int8_engine_tracks_fp32() -> None:
    if not torch_int8_available():
        pytest.skip("torch quantized engine not available")
    torch.manual_seed(0)
    m = LeNet(in_channels=1, num_classes=10).eval()
    x = torch.randn(64, 1, 8, 8)
    qm = to_torch_int8(m, x)
    y, yq = m(x), qm(x)
    assert (yq - y).norm() / y.norm() < 0.05


def test_cli_quantize_end_to_end_on_a_fit_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from leantrain.cli import main
    from leantrain.data import load_dataset
    from leantrain.train import fit

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = LeNet(in_channels=1, num_classes=10, width=8)
    ckpt = tmp_path / "lenet.pt"
    fit(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), F.cross_entropy, data.train, epochs=2,
        batch_size=64, checkpoint=ckpt, model_spec=model_spec("lenet", in_channels=1, num_classes=10, width=8),
        eval_train=False)
    out = tmp_path / "q.lt"
    rc = main(["quantize", str(ckpt), "--weights", "ternary", "--group-size", "4", "--act-bits", "8", "--calibration",
               "digits", "--residual-budget", "0.6", "--finetune-epochs", "1", "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert out.is_file() and res["file_bytes"] == out.stat().st_size < res["fp32_state_bytes"]
    assert set(res["accuracy"]) == {"converted", "with_residual_edges", "finetuned"}
    q = load_quantized(out)
    from leantrain.train import evaluate

    assert evaluate(q, F.cross_entropy, data.test)["accuracy"] == pytest.approx(res["accuracy"]["finetuned"])
    assert main(["quantize", str(ckpt), "--group-size", "0", "--calibration", "digits", "--out", str(out)]) == 2
    assert main(["quantize", str(ckpt), "--group-size", "3", "--calibration", "digits", "--out", str(out)]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert main(["quantize", str(ckpt), "--calibration", "synthimages", "--out", str(out)]) == 2


def test_cli_quantize_on_a_leantrain_train_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from leantrain.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--model", "lenet", "--dataset", "digits", "--model-arg", "width=8", "--epochs", "1",
                 "--out", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "q.lt"
    # No --calibration: the data set recorded in the checkpoint is used.
    assert main(["quantize", str(run_dir / "checkpoint.pt"), "--group-size", "4", "--bn-recalibration",
                 "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["config"]["weights"]["grouping"] == "fgq:4" and out.stat().st_size == res["file_bytes"]
    assert load_quantized(out)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # The same conversion from a QuantConfig file; a bad file is a clear error, not a traceback.
    from leantrain.quant import ActQuant, QuantConfig, WeightQuant

    cfg = QuantConfig(WeightQuant(bits=4, grouping="cluster:2"), ActQuant(bits=6), keep=("role:other",))
    cfg_path = tmp_path / "q.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    assert main(["quantize", str(run_dir / "checkpoint.pt"), "--config", str(cfg_path), "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["config"] == cfg.to_dict()
    assert all(r["status"].startswith("kept") for r in res["layers"])  # a LeNet has no blocks: every layer is "other"
    assert main(["quantize", str(run_dir / "checkpoint.pt"), "--config", str(cfg_path), "--weights", "int8",
                 "--out", str(out)]) == 2
    assert "do not also pass --weights" in capsys.readouterr().err
    cfg_path.write_text('{"weights": {"bitz": 2}}')
    assert main(["quantize", str(run_dir / "checkpoint.pt"), "--config", str(cfg_path), "--out", str(out)]) == 2
    assert "unknown weights keys" in capsys.readouterr().err


def test_batchnorm_recalibration_matches_the_statistics_of_the_converted_network() -> None:
    from leantrain.quant.convert import recalibrate_batchnorm

    m, x, _ = _tiny_resnet()
    # The stem BN sees the (quantized) stem convolution of the input alone, whatever the other BN layers do.
    q = quantize_model(m, grouping="channel", calibration=x, act_bits=None, keep=None)
    bn = q.model.bn
    seen = []
    handle = bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        q(x)  # eval mode: the input the BN layer sees in the converted network
    handle.remove()
    assert recalibrate_batchnorm(q.model, [x]) == sum(isinstance(mm, nn.BatchNorm2d) for mm in q.modules())
    inp = seen[0].double()
    assert torch.allclose(bn.running_mean.double(), inp.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var.double(), inp.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert not bn.training and bn.momentum == 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_conversion_and_both_paths_run_on_cuda() -> None:
    m, x, _ = _tiny_resnet()
    q_cpu = quantize_model(m, grouping="fgq:4", calibration=x)
    q = quantize_model(m.cuda(), grouping="fgq:4", calibration=x.cuda())
    xc = x.cuda()
    fake = q(xc)
    assert torch.allclose(fake.cpu(), q_cpu(x), atol=1e-4)
    assert torch.allclose(q.set_mode("integer")(xc).cpu(), fake.cpu(), atol=0.05 * float(fake.abs().max()))


def test_loading_a_packed_file_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    q = quantize_model(net, calibration=x, keep=None)
    save_quantized(q, tmp_path / "q.lt")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_quantized must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert torch.equal(load_quantized(tmp_path / "q.lt", net)(x), q(x))
