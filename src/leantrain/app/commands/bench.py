"""``leantrain bench``: run registered benchmarks side by side with their baselines."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from leantrain.app.commands import add_common, emit, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run benchmarks (candidate vs named baseline, same run)",
                       description="Run benchmark NAME (or all), print ratios against the named "
                                   "baselines and write OUT/<name>.json.")
    p.add_argument("name", nargs="?", default="all", help="benchmark name or 'all' (default all)")
    p.add_argument("--list", action="store_true", help="list registered benchmarks and exit")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    add_common(p, out="results/bench")
    p.set_defaults(func=run)


def _format(name: str, res: dict) -> str:
    lines = [f"== {name}"]
    for row in res.get("rows", []):
        if "ratio" in row:
            lines.append(f"  {row['name']:<44} {row['candidate_median_s'] * 1e3:10.3f} ms vs "
                         f"{row['baseline']}: {row['baseline_median_s'] * 1e3:10.3f} ms  ratio {row['ratio']:.3f}")
        else:
            extra = f"  {row['throughput']:.3g} {row['throughput_unit']}" if "throughput" in row else ""
            lines.append(f"  {row['name']:<44} {row['median_s'] * 1e3:10.3f} ms{extra}")
    for c in res.get("checks", []):
        lines.append(f"  check {c['what']}: {c['value']:.3f} {c['op']} {c['bound']} -> {'ok' if c['passed'] else 'NOT MET'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from leantrain.app.registry import benchmarks, load_all
    from leantrain.storage import write_json

    load_all()
    registry = benchmarks()
    if args.list:
        rows = [{"name": b.name, "description": b.description} for b in registry.values()]
        emit(args, rows, "\n".join(f"{r['name']:<14} {r['description']}" for r in rows))
        return 0
    if args.name != "all" and args.name not in registry:
        raise ValueError(f"benchmark must be 'all' or one of {sorted(registry)}, got {args.name!r}")
    device = resolve_device(args.device)
    names = sorted(registry) if args.name == "all" else [args.name]
    out = Path(args.out)
    results = {}
    texts = []
    for name in names:
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        res = registry[name].run(quick=args.quick, device=device)
        res = {"benchmark": name, "description": registry[name].description, "device": device,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
               "wall_time_s": time.perf_counter() - t0, **res}
        write_json(out / f"{name}.json", res)
        results[name] = res
        texts.append(_format(name, res))
    emit(args, results, "\n".join(texts))
    return 0
