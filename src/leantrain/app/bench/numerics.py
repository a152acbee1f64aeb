"""Benchmark ``numerics``: throughput of quantize / to_dfp beside the native BF16 cast, and qtorch if installed.

Rows (16M float32 elements, 1M with ``--quick``), each candidate interleaved with its baseline:

- ``quantize`` BF16 nearest, BF16 stochastic, FP16 nearest, FP8_E4M3 nearest, and ``to_dfp`` (16 bits) vs the
  native cast ``x.to(torch.bfloat16).float()``; ``throughput_ratio`` = ours / native. BF16/FP16 nearest
  use torch's probed native conversion by default (``backend="auto"``), so they are also shown with
  ``backend="bits"`` (the bit-level fast path alone) and ``backend="reference"`` (the reference routine).
- if ``qtorch`` (QPyTorch, the ``peers`` extra) imports: the same formats vs ``qtorch.quant.float_quantize``
  (its ``float_quantize`` has no special-value handling: same work, fewer rules).
- ``dfp_matmul`` (INT16 operands, INT32 accumulator) vs ``torch.matmul`` in float32 on the same shapes.

Checks (full run only: with ``--quick`` the 1M-element tensors fit in cache, where a single native op wins by
design): BF16 nearest >= 0.8x and BF16 stochastic >= 0.3x the native cast; each format >= 1x qtorch.
"""

from __future__ import annotations

import torch

from leantrain.app.bench import check, compare
from leantrain.app.registry import benchmark
from leantrain.numerics import BF16, FP8_E4M3, FP16, dfp_matmul, quantize, to_dfp


def _qtorch_float_quantize():
    try:
        from qtorch.quant import float_quantize
    except Exception:  # not installed, or its C++ extension failed to build
        return None
    return float_quantize


@benchmark("numerics", description="quantize/to_dfp throughput vs native bf16 cast (and qtorch); dfp_matmul vs matmul")
def run(quick: bool = False, device: str = "cpu") -> dict:
    n = (1 << 20) if quick else (1 << 24)
    repeats = 5 if quick else 7
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, generator=gen, device=device)

    def native() -> torch.Tensor:
        return x.to(torch.bfloat16).float()

    cases = [
        ("quantize BF16 nearest", BF16, "nearest", lambda: quantize(x, BF16)),
        ("quantize BF16 stochastic", BF16, "stochastic", lambda: quantize(x, BF16, "stochastic", generator=gen)),
        ("quantize FP16 nearest", FP16, "nearest", lambda: quantize(x, FP16)),
        ("quantize FP8_E4M3 nearest", FP8_E4M3, "nearest", lambda: quantize(x, FP8_E4M3)),
    ]
    extra = [
        ("quantize BF16 nearest, bit-level (backend='bits')", None, None, lambda: quantize(x, BF16, backend="bits")),
        ("quantize FP16 nearest, bit-level (backend='bits')", None, None, lambda: quantize(x, FP16, backend="bits")),
        ("quantize BF16 nearest, reference (backend='reference')", None, None,
         lambda: quantize(x, BF16, backend="reference")),
        ("to_dfp 16 bits", None, None, lambda: to_dfp(x, 16)),
    ]
    rows, checks = [], []
    for name, _, _, fn in cases + extra:
        row = compare(name, fn, native, baseline_name="native x.to(bfloat16).float()", repeats=repeats,
                      device=device, work=n, work_unit="elements")
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    checks.append(check("BF16 nearest throughput / native cast", by_name["quantize BF16 nearest"]["throughput_ratio"], ">=", 0.8))
    checks.append(check("BF16 stochastic throughput / native cast", by_name["quantize BF16 stochastic"]["throughput_ratio"],
                        ">=", 0.3))

    float_quantize = _qtorch_float_quantize()
    qtorch_note = "qtorch not importable: qtorch rows skipped (pip install 'leantrain[peers]')"
    if float_quantize is not None and device == "cpu":
        qtorch_note = "qtorch float_quantize measured"
        for name, fmt, rounding, fn in cases:
            def peer(fmt=fmt, rounding=rounding) -> torch.Tensor:
                return float_quantize(x, fmt.exp_bits, fmt.man_bits, rounding)

            row = compare(f"{name} vs qtorch", fn, peer, baseline_name="qtorch float_quantize", repeats=repeats,
                          device=device, work=n, work_unit="elements")
            rows.append(row)
            checks.append(check(f"{name}: throughput / qtorch", row["throughput_ratio"], ">=", 1.0))

    m, k, p = (64, 256, 64) if quick else (256, 1024, 256)
    a = torch.randn(m, k, generator=gen, device=device)
    b = torch.randn(k, p, generator=gen, device=device)
    for chunk in (None, 256):
        label = "one INT32 register" if chunk is None else f"INT32 chunks of {chunk} + float32"
        rows.append(compare(f"dfp_matmul INT16 {label} ({m}x{k} @ {k}x{p})",
                            lambda chunk=chunk: dfp_matmul(a, b, 16, chunk=chunk), lambda: a @ b,
                            baseline_name="torch.matmul float32", repeats=repeats, device=device))
    note = ("--quick: 1M elements, where the native cast runs from cache in one pass; the acceptance checks are "
            "stated for 16M elements and are only evaluated in the full run") if quick else ""
    return {"rows": rows, "checks": [] if quick else checks, "elements": n, "qtorch": qtorch_note, "note": note}
