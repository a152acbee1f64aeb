"""Benchmark ``quant``: conversion time and low-bit inference latency against FP32, side by side.

Rows (ResNet-20, 3x32x32 inputs; width 8 with ``--quick``, else 16):

- ``quantize_model`` conversion time (ternary, fgq:4, 8-bit activations, 2 calibration batches);
- fake-quantized 8-2 inference (cached dequantized weights, activations quantized) vs FP32;
- the integer execution path (int32 accumulation of ternary codes x 8-bit activation codes, one
  multiply per group) vs FP32 -- an emulation on general-purpose integer matmuls, not a low-bit kernel;
- torch's quantized CPU engine (int8 per-channel weights, x86/fbgemm kernels) vs FP32, when available.
"""

from __future__ import annotations

import torch

from leantrain.app.bench import check, compare, measure
from leantrain.app.registry import benchmark
from leantrain.models import resnet20
from leantrain.quant import quantize_model, to_torch_int8, torch_int8_available


@benchmark("quant", description="ternary/int8 inference (integer path, torch int8 kernels) and conversion time vs FP32")
def run(quick: bool = False, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    width, batch = (8, 32) if quick else (16, 64)
    repeats = 5 if quick else 9
    model = resnet20(width=width).to(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    calib = [torch.randn(batch, 3, 32, 32, device=device) for _ in range(2)]
    rows, checks = [], []

    conv = measure("quantize_model (ternary fgq:4, 8-bit acts)", lambda: quantize_model(model, calibration=calib),
                   repeats=3 if quick else 5, warmup=1, device=device)
    rows.append(conv)
    q = quantize_model(model, calibration=calib)

    @torch.no_grad()
    def fp32() -> None:
        model(x)

    @torch.no_grad()
    def fake() -> None:
        q(x)

    @torch.no_grad()
    def integer() -> None:
        q.set_mode("integer")(x)
        q.set_mode("fake")

    work = float(batch)
    r_fake = compare("8-2 fake-quantized inference", fake, fp32, baseline_name="FP32 inference", repeats=repeats,
                     device=device, work=work, work_unit="images")
    r_int = compare("8-2 integer execution path", integer, fp32, baseline_name="FP32 inference", repeats=repeats,
                    device=device, work=work, work_unit="images")
    rows += [r_fake, r_int]
    checks.append(check("fake-quant 8-2 / FP32 time", r_fake["ratio"], "<=", 1.5))
    # An emulation: int32 matmuls without low-bit kernels, then one float64 multiply per group and output
    # (25% of the MACs at N=4). Measured 18-25x on 2 loaded cores; the bound guards against regressions.
    checks.append(check("integer path / FP32 time (emulated integer matmuls)", r_int["ratio"], "<=", 30.0))
    if torch_int8_available() and torch.device(device).type == "cpu":
        q8 = to_torch_int8(model, calib)

        @torch.no_grad()
        def int8() -> None:
            q8(x)

        r8 = compare("torch int8 per-channel kernels", int8, fp32, baseline_name="FP32 inference", repeats=repeats,
                     device=device, work=work, work_unit="images")
        rows.append(r8)
        checks.append(check("torch int8 / FP32 time", r8["ratio"], "<=", 1.0))
    checks.append(check("conversion time, seconds", conv["median_s"], "<=", 10.0))
    return {"rows": rows, "checks": checks, "model": f"resnet20 width {width}", "batch": batch}
