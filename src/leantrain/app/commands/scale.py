"""``leantrain scale``: predict data-parallel scaling of a zoo model from an alpha-beta network model and the
model's compute, measured here (see :mod:`leantrain.distributed.scaling`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from leantrain.app.commands import add_common, emit, key_value, resolve_device
from leantrain.validation import float_arg

DEFAULT_NODES = "1,2,4,8,16,32,64,128,256,512,1024"
#: Data sets whose input shapes fit each model by default.
DEFAULT_DATASET = {"resnet20": "synthimages", "lenet": "synthimages", "mlp": "mnist1d"}


def register(sub: argparse._SubParsersAction) -> None:
    from leantrain.distributed.compression import COMPRESSIONS
    from leantrain.distributed.scaling import ALGORITHMS

    p = sub.add_parser(
        "scale", help="predict data-parallel step time, throughput and efficiency up to many nodes",
        description="Measure the model's forward, backward (per gradient bucket) and update time here, then "
                    "predict weak-scaling step time, throughput and efficiency with an alpha-beta model of the "
                    "collectives, with and without overlap and compression.",
        epilog="example: leantrain scale --model resnet20 --nodes 1,2,4,...,1024 --bandwidth 100 --latency 2")
    p.add_argument("--model", required=True, choices=sorted(DEFAULT_DATASET), help="zoo model")
    p.add_argument("--dataset", default=None, help="data set whose input shape the model gets (default by model)")
    p.add_argument("--batch-size", type=int, default=32, help="per-process batch size (default 32)")
    p.add_argument("--nodes", default=DEFAULT_NODES,
                   help=f"process counts, comma-separated; '...' doubles up to the next value (default {DEFAULT_NODES})")
    p.add_argument("--bandwidth", type=float_arg(0, low_open=True), default=100.0, help="link bandwidth in Gbit/s (default 100)")
    p.add_argument("--latency", type=float_arg(0), default=2.0, help="per-message latency in microseconds (default 2)")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="ring", help="all-reduce algorithm (default ring)")
    p.add_argument("--ranks-per-node", type=int, default=1, help="processes per node, for --algorithm hierarchical")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size in MiB (default 25)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="int8",
                   help="compression to predict beside the uncompressed exchange (default int8)")
    p.add_argument("--model-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="model constructor keyword (VALUE read as JSON when it parses; repeatable)")
    add_common(p, out="results/scale")
    p.set_defaults(func=run)


def parse_nodes(text: str) -> list[int]:
    """``"1,2,4,...,1024"`` -> powers of two from 4 doubling up to 1024; plain lists are taken as given."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    out: list[int] = []
    for i, t in enumerate(parts):
        if t == "...":
            if not out or i + 1 >= len(parts):
                raise ValueError(f"--nodes: '...' needs a value before and after it, got {text!r}")
            nxt = int(parts[i + 1])
            while out[-1] * 2 < nxt:
                out.append(out[-1] * 2)
            continue
        try:
            v = int(t)
        except ValueError:
            raise ValueError(f"--nodes must be comma-separated positive integers (and '...'), got {text!r}") from None
        if v < 1:
            raise ValueError(f"--nodes values must be >= 1, got {v}")
        out.append(v)
    if not out:
        raise ValueError("--nodes is empty")
    return out


def run(args: argparse.Namespace) -> int:

    import torch

    from leantrain.data import load_dataset
    from leantrain.distributed.scaling import Network, plot_scaling, predict, profile_model
    from leantrain.models import build, dataset_kwargs
    from leantrain.storage import write_json

    device = resolve_device(args.device)
    nodes = parse_nodes(args.nodes)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.bucket_mb <= 0:
        raise ValueError(f"--bucket-mb must be > 0, got {args.bucket_mb}")
    net = Network.from_units(args.bandwidth, args.latency, args.algorithm, ranks_per_node=args.ranks_per_node)
    info = load_dataset(args.dataset or DEFAULT_DATASET[args.model]).info
    kwargs: dict[str, Any] = dataset_kwargs(args.model, info)
    kwargs.update(args.model_arg)
    torch.manual_seed(args.seed)
    model = build(args.model, **kwargs).to(device)
    x = torch.randn(args.batch_size, *info.input_shape, device=device)
    y = torch.randint(0, max(info.num_classes, 2), (args.batch_size,), device=device)
    prof = profile_model(model, x, y, bucket_mb=args.bucket_mb, compressions=(args.compression,), name=args.model)
    variants = {"overlap": dict(overlap=True), "no overlap": dict(overlap=False),
                f"overlap + {args.compression}": dict(overlap=True, compression=args.compression)}
    table = {name: predict(prof, nodes, net, **kw) for name, kw in variants.items()}
    out = Path(args.out)
    plot_scaling(out / f"scale_{args.model}.png", table, title=f"{args.model}, batch {args.batch_size}/process, "
                 f"{args.algorithm}, {args.bandwidth:g} Gbit/s, {args.latency:g} us")
    result = {"model": args.model, "model_kwargs": kwargs, "network": {"bandwidth_gbit": args.bandwidth,
              "latency_us": args.latency, "algorithm": args.algorithm, "ranks_per_node": args.ranks_per_node},
              "profile": prof.as_dict(), "predictions": table, "plot": str(out / f"scale_{args.model}.png")}
    write_json(out / f"scale_{args.model}.json", result)
    lines = [f"{args.model}: forward {prof.forward_s * 1e3:.1f} ms, backward {prof.backward_s * 1e3:.1f} ms, update "
             f"{prof.update_s * 1e3:.1f} ms per step of {args.batch_size}, {len(prof.bucket_bytes)} buckets, "
             f"{sum(prof.bucket_bytes) / 1e6:.2f} MB of gradients",
             f"{'P':>6} " + " ".join(f"{name:>28}" for name in table)]
    for i, p in enumerate(nodes):
        cells = [f"{rows[i]['step_s'] * 1e3:8.1f} ms {rows[i]['efficiency'] * 100:6.1f}% exp "
                 f"{rows[i]['exposed_comm_s'] * 1e3:5.1f}" for rows in table.values()]
        lines.append(f"{p:>6} " + " ".join(f"{c:>28}" for c in cells))
    lines.append(f"plot: {result['plot']}")
    emit(args, result, "\n".join(lines))
    return 0
