"""Benchmark ``precision``: one CNN training step under each emulated policy, as a ratio to the FP32 step.

Every row times a full SGD step (forward, backward, update) of the same ResNet on the same batch: the
candidate is a copy of the model emulated under one policy, the baseline the plain FP32 model,
interleaved in one run (:func:`leantrain.app.bench.compare`). A last row times native
``torch.autocast(dtype=torch.bfloat16)`` (real BF16 kernels where the hardware has them) against the same
FP32 step, as a reference point for what emulation costs beyond native low precision. Two more rows time
bf16 and dfp16 on the small CNN the precision experiments train (ResNet-8, width 8, 8x8 digits). A transformer
row times bf16 on a small ``nn.TransformerEncoder`` classifier (every GEMM intercepted: projections, attention's
``Q K^T`` and ``P V``, feed-forward) against its FP32 step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from leantrain.app.bench import check, compare
from leantrain.app.registry import benchmark
from leantrain.models import resnet20
from leantrain.numerics.native import dfp_gemm_path
from leantrain.precision import emulate, policy_names

BOUNDS = {"bf16": 1.3, "dfp16": 5.0}
TRANSFORMER_BOUND = 1.5  # bf16 step / fp32 step of the small transformer


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: bool = False) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.functional.cross_entropy
    dev = x.device.type

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if autocast:
            with torch.autocast(device_type=dev, dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return step


@benchmark("precision", description="ResNet training step under each precision policy vs the FP32 step "
                                    "(and native torch.autocast bf16 as a reference)")
def run(quick: bool = False, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    width, batch, depth = (8, 32, 8) if quick else (16, 64, 20)
    base = resnet20(width=width, depth=depth).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fp32_step = _step_fn(base, x, y)
    rows, checks = [], []
    repeats = 3 if quick else 7
    names = [n for n in policy_names() if n != "fp16-scaled"]  # same GEMM numerics as fp16; scaling is ~free
    for name in names:
        model = emulate(copy.deepcopy(base), name)
        row = compare(f"{name} step", _step_fn(model, x, y), fp32_step, baseline_name="fp32 step (unwrapped)",
                      repeats=repeats, min_sample_s=0.1 if quick else 0.3, device=device)
        row["policy"] = name
        if name == "dfp16":
            row["gemm_path"] = dfp_gemm_path()
        rows.append(row)
        if name in BOUNDS:
            checks.append(check(f"{name} step / fp32 step", row["ratio"], "<=", BOUNDS[name]))
    # The CNN of the bf16-vision / dfp16-vision experiments (8x8 digits), where the GEMMs are small.
    small = resnet20(width=8, depth=8, in_channels=1).to(device)
    xs = torch.randn(32, 1, 8, 8, device=device)
    ys = torch.randint(0, 10, (32,), device=device)
    small_fp32 = _step_fn(small, xs, ys)
    for name in ("bf16", "dfp16"):
        model = emulate(copy.deepcopy(small), name)
        row = compare(f"{name} step, experiment CNN (8x8)", _step_fn(model, xs, ys), small_fp32,
                      baseline_name="fp32 step, experiment CNN (8x8)", repeats=repeats,
                      min_sample_s=0.1 if quick else 0.3, device=device)
        row["policy"] = name
        rows.append(row)
    # A small transformer, BERT-tiny's geometry (2 layers, d_model 128, 2 heads, feed-forward 512), on sequences of
    # 64 tokens: every GEMM intercepted, two of them per head between activations.
    torch.manual_seed(0)
    dim, heads, seq, tbatch = 128, 2, 64, (8 if quick else 16)
    tf = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0,
                                                                        batch_first=True),
                                             2, enable_nested_tensor=False),
                       nn.Flatten(), nn.Linear(dim * seq, 10)).to(device)
    xt = torch.randn(tbatch, seq, dim, device=device)
    yt = torch.randint(0, 10, (tbatch,), device=device)
    row = compare("bf16 step, transformer encoder", _step_fn(emulate(copy.deepcopy(tf), "bf16"), xt, yt),
                  _step_fn(tf, xt, yt), baseline_name="fp32 step, transformer encoder", repeats=repeats,
                  min_sample_s=0.1 if quick else 0.3, device=device)
    row["policy"] = "bf16"
    rows.append(row)
    checks.append(check("bf16 step / fp32 step, transformer encoder", row["ratio"], "<=", TRANSFORMER_BOUND))
    try:
        native = _step_fn(copy.deepcopy(base), x, y, autocast=True)
        native()
        row = compare("native torch.autocast bf16 step", native, fp32_step, baseline_name="fp32 step (unwrapped)",
                      repeats=repeats, min_sample_s=0.1 if quick else 0.3, device=device)
        row["policy"] = "autocast-bf16"
        rows.append(row)
    except RuntimeError as err:  # autocast to bf16 unsupported on this device
        rows.append({"name": "native torch.autocast bf16 step", "skipped": str(err)})
    return {"rows": rows, "checks": checks,
            "setup": {"model": f"resnet{depth} width {width}", "batch": batch, "input": [3, 32, 32],
                      "transformer": {"d_model": dim, "heads": heads, "ffn": 4 * dim, "layers": 2, "seq": seq,
                                      "batch": tbatch},
                      "threads": torch.get_num_threads(),
                      # dfp16 GEMMs (conv and linear): native C kernel, or the torch fallback where no compiler works
                      "dfp_gemm_path": dfp_gemm_path()}}
