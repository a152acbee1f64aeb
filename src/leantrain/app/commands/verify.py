"""``leantrain verify numerics [--exhaustive]``: check quantize bit for bit against independent oracles.

Oracles: ml_dtypes (bfloat16, float8_e4m3fn, float8_e5m2, and the further float8/float6/float4 types) and
numpy float16. Cases: every special class (signed zeros, infinities, NaN payloads, float32 subnormals,
each format's boundaries with their float32 neighbours, every midpoint between neighbouring values of the
narrow format) and random float32 bit patterns. ``--exhaustive`` adds all 2^32 float32 bit patterns for BF16
and FP16 nearest. Every backend of :func:`leantrain.numerics.quantize` is checked: ``"auto"`` as users call it
(BF16/FP16 may use torch's probed cast), the bit-level fast paths (``"bits"``) and the reference routine
(``"reference"``). Any NaN equals any NaN; everything else must match bit for bit. Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from leantrain.app.commands import add_common, emit, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="verify implementations against independent oracles (numerics)",
                       description="Compare leantrain.numerics.quantize with ml_dtypes/numpy bit for bit; exit 1 on mismatch.")
    p.add_argument("target", choices=["numerics"], help="what to verify")
    p.add_argument("--exhaustive", action="store_true",
                   help="also all 2^32 float32 bit patterns for BF16 and FP16 nearest (minutes)")
    p.add_argument("--samples", type=int, default=1_000_000, help="random bit patterns per format (default 10^6)")
    p.add_argument("--chunk-bits", type=int, default=24, help="exhaustive: 2^N patterns per chunk (default 24)")
    add_common(p, out="results/verify")
    p.set_defaults(func=run)


def _oracles():
    try:
        import ml_dtypes
    except ImportError as exc:  # a test dependency; the command needs it as its oracle
        raise ValueError("verify numerics needs ml_dtypes as its oracle: pip install ml_dtypes") from exc
    import numpy as np

    from leantrain.numerics import BF16, FP8_E4M3, FP8_E5M2, FP16, FloatFormat

    return [
        (BF16, ml_dtypes.bfloat16),
        (FP16, np.float16),
        (FP8_E4M3, ml_dtypes.float8_e4m3fn),
        (FP8_E5M2, ml_dtypes.float8_e5m2),
        (FloatFormat(4, 3, name="E4M3 ieee"), ml_dtypes.float8_e4m3),
        (FloatFormat(3, 4, name="E3M4 ieee"), ml_dtypes.float8_e3m4),
        (FloatFormat(2, 3, special="finite", name="FP6 E2M3"), ml_dtypes.float6_e2m3fn),
        (FloatFormat(3, 2, special="finite", name="FP6 E3M2"), ml_dtypes.float6_e3m2fn),
        (FloatFormat(2, 1, special="finite", name="FP4 E2M1"), ml_dtypes.float4_e2m1fn),
    ]


def _oracle(bits, dtype):
    """The oracle's rounding of float32 bit patterns (int32 numpy array) to ``dtype``, back in float32."""
    import numpy as np

    with np.errstate(all="ignore"):
        return bits.view(np.float32).astype(dtype).astype(np.float32)


BACKENDS = ("auto", "bits", "reference")


def _path(backend: str) -> str:
    return "quantize" if backend == "auto" else f"quantize({backend})"


def _mismatches(bits, fmt, dtype, device: str, backend: str, ref=None) -> int:
    """Number of float32 bit patterns (int32 numpy array) where quantize disagrees with ``astype(dtype)``."""
    import numpy as np
    import torch

    from leantrain.numerics import quantize

    x = bits.view(np.float32)
    if ref is None:
        ref = _oracle(bits, dtype)
    ours = quantize(torch.from_numpy(x).to(device), fmt, backend=backend).cpu().numpy()
    same = (ours.view(np.int32) == ref.view(np.int32)) | (np.isnan(ours) & np.isnan(ref))
    if fmt.special == "finite":  # no NaN encoding: ml_dtypes returns -0, we keep NaN (documented)
        same |= np.isnan(x) & np.isnan(ours)
    return int((~same).sum())


def _special_patterns(fmt, dtype):
    """Special classes, boundaries with float32 neighbours, every narrow-format value and midpoint (+-1 ulp)."""
    import numpy as np

    f32 = np.finfo(np.float32)
    vals = [0.0, 1.0, float(f32.max), float(f32.tiny), float(f32.smallest_subnormal)]
    for v in (fmt.max_normal, fmt.min_normal, fmt.min_subnormal):
        vals += [v * s for s in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 1 + fmt.epsilon / 2, 1 + 1.5 * fmt.epsilon)]
    with np.errstate(over="ignore"):
        base = np.array(vals, dtype=np.float32).view(np.int32).astype(np.int64)
    nbits = 16 if np.dtype(dtype).itemsize == 2 else 8
    with np.errstate(invalid="ignore"):
        codes = np.arange(2**nbits, dtype=np.uint32).astype(np.uint16 if nbits == 16 else np.uint8).view(dtype).astype(np.float64)
    pos = np.unique(codes[np.isfinite(codes) & (codes >= 0)])
    grid = np.concatenate([pos, (pos[:-1] + pos[1:]) / 2]).astype(np.float32).view(np.int32).astype(np.int64)
    specials = np.array([0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7FA00000], dtype=np.int64)
    subnormals = np.arange(0, 1 << 23, 37, dtype=np.int64)  # a stride through every float32 subnormal binade
    allb = np.concatenate([base - 1, base, base + 1, grid - 1, grid, grid + 1, specials, subnormals])
    allb = np.clip(allb, 0, 0x7FFFFFFF).astype(np.int32)
    return np.concatenate([allb, allb | np.int32(-(2**31))])


def verify_numerics(*, exhaustive: bool, samples: int, seed: int, device: str, chunk_bits: int = 24) -> dict:
    """Run every check; returns ``{"checks": [...], "mismatches": total}``."""
    import numpy as np
    from tqdm import tqdm

    if samples < 0:
        raise ValueError(f"--samples must be >= 0, got {samples}")
    if not 16 <= chunk_bits <= 28:
        raise ValueError(f"--chunk-bits must be in 16..28, got {chunk_bits}")
    checks = []
    rng = np.random.default_rng(seed)
    for fmt, dtype in _oracles():
        special = _special_patterns(fmt, dtype)
        rand = rng.integers(-(2**31), 2**31, size=samples, dtype=np.int64).astype(np.int32)
        for backend in BACKENDS:
            checks.append({"format": fmt.name, "path": _path(backend), "cases": "special classes",
                           "n": int(special.size), "mismatches": _mismatches(special, fmt, dtype, device, backend)})
            checks.append({"format": fmt.name, "path": _path(backend), "cases": "random bit patterns",
                           "n": int(rand.size), "mismatches": _mismatches(rand, fmt, dtype, device, backend)})
    if exhaustive:
        fmts = [(f, d) for f, d in _oracles() if f.name in ("BF16", "FP16")]
        step = 1 << chunk_bits
        with tqdm(total=len(fmts) * (1 << 32), unit="pattern", unit_scale=True, desc="exhaustive", mininterval=2.0) as bar:
            for fmt, dtype in fmts:
                bad = dict.fromkeys(BACKENDS, 0)
                t0 = time.perf_counter()
                for start in range(-(2**31), 2**31, step):
                    bits = np.arange(start, start + step, dtype=np.int64).astype(np.int32)
                    ref = _oracle(bits, dtype)  # computed once, compared with every backend
                    for backend in BACKENDS:
                        bad[backend] += _mismatches(bits, fmt, dtype, device, backend, ref=ref)
                    bar.update(step)
                for backend in BACKENDS:
                    check = {"format": fmt.name, "path": _path(backend),
                             "cases": "all 2^32 float32 bit patterns", "n": 1 << 32, "mismatches": bad[backend],
                             "seconds": time.perf_counter() - t0}
                    checks.append(check)
                    bar.write(f"{check['format']} {check['path']}: {check['mismatches']} mismatches in all 2^32 patterns")
    return {"checks": checks, "mismatches": sum(c["mismatches"] for c in checks)}


def run(args: argparse.Namespace) -> int:
    from leantrain.storage import write_json

    device = resolve_device(args.device)
    res = verify_numerics(exhaustive=args.exhaustive, samples=args.samples, seed=args.seed, device=device,
                          chunk_bits=args.chunk_bits)
    res["exhaustive"] = args.exhaustive
    write_json(Path(args.out) / "numerics.json", res)
    lines = [f"{c['format']:<10} {c['path']:<24} {c['cases']:<30} n={c['n']:>11,d}  mismatches={c['mismatches']}"
             for c in res["checks"]]
    lines.append(f"total mismatches: {res['mismatches']}  ({'FAIL' if res['mismatches'] else 'ok'})")
    emit(args, res, "\n".join(lines))
    return 1 if res["mismatches"] else 0
