"""``leantrain quantize``: convert a training checkpoint to a low-bit model and write it packed."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from leantrain.app.commands import add_common, declare_outputs, emit, resolve_device
from leantrain.validation import check_int, check_positive, check_range

if TYPE_CHECKING:
    from leantrain.quant.config import QuantConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="convert a checkpoint to ternary/4-bit/8-bit weights with 8-bit activations",
        description="Load CHECKPOINT (written by the training loop with a model spec), convert it with "
                    "leantrain.quant.quantize_model (no retraining; a QuantConfig from the options or --config), "
                    "optionally add ternary residual edges "
                    "and fine-tune, print the per-layer report and the accuracy before/after, and write the "
                    "packed model (2-bit ternary codes, 4 per byte) to --out.")
    p.add_argument("checkpoint", help="checkpoint file from leantrain.train.fit(..., model_spec=...) / leantrain train")
    p.add_argument("--weights", default="ternary", choices=["ternary", "int3", "int4", "int5", "int6", "int7", "int8"],
                   help="weight format (default ternary)")
    p.add_argument("--grouping", default="fgq", choices=["fgq", "cluster", "channel", "tensor"],
                   help="which weights share a scale: fgq = N consecutive weights along the reduction dim, "
                        "cluster = N whole filters (default fgq)")
    p.add_argument("--group-size", type=int, default=4, help="N for fgq/cluster (default 4)")
    p.add_argument("--remainder", default="error", choices=["error", "partial"],
                   help="when N does not divide a dimension: error, or a shorter last group (default error)")
    p.add_argument("--method", default="optimal", choices=["optimal", "threshold"],
                   help="ternary solver: exact per-group optimum or the 0.7*mean closed form (default optimal)")
    p.add_argument("--act-bits", type=int, default=8, help="activation bits, 0 = keep FP32 (default 8)")
    p.add_argument("--act-method", default="minmax", choices=["minmax", "percentile", "mse"],
                   help="activation clip calibration (default minmax)")
    p.add_argument("--calibration", default=None,
                   help="data set for calibration (training split) and accuracy (test split), e.g. digits "
                        "(default: the data set recorded in the checkpoint by `leantrain train`)")
    p.add_argument("--calibration-batches", type=int, default=8, help="calibration batches of 128 (default 8)")
    p.add_argument("--keep", nargs="*", default=["first", "last"],
                   help="layers kept FP32: first, last (by data flow: the first/last layer executed and the layers "
                        "reading the same input), role:embedding|attention|mlp|conv|head|other, module names or "
                        "fnmatch patterns (default: first last)")
    p.add_argument("--config", default=None,
                   help="JSON file with a QuantConfig (leantrain.quant.QuantConfig.to_dict() form: weights, "
                        "activations, keep, bn_recalibration); replaces the weight/activation/keep options")
    p.add_argument("--bn-recalibration", action="store_true",
                   help="re-estimate batch-norm statistics of the converted model on the calibration batches")
    p.add_argument("--scale-dtype", default="float32", choices=["float32", "float16"], help="weight scale dtype")
    p.add_argument("--residual-budget", type=float, default=None,
                   help="add ternary residual edges by perturbation sensitivity until this extra size fraction is spent")
    p.add_argument("--residual-unit", default="size", choices=["size", "ops"], help="budget unit (default size)")
    p.add_argument("--max-terms", type=int, default=4, help="ternary terms per layer at most, base included (default 4)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="STE fine-tuning epochs on the training split (default 0)")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tuning learning rate (default 0.01)")
    add_common(p, out=None)
    p.add_argument("--out", default="qmodel.lt", help="packed output file (default qmodel.lt)")
    declare_outputs(p, out="file")
    p.set_defaults(func=run, config_defaults={d: p.get_default(d) for d in _CONFIG_DESTS})


# Options that --config replaces (an explicit one beside --config is an error, not silently ignored).
_CONFIG_DESTS = ("weights", "grouping", "group_size", "remainder", "method", "act_bits", "act_method",
                 "calibration_batches", "keep", "bn_recalibration", "scale_dtype")


def _config(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig of the command line: ``--config FILE`` or the individual options (one conversion either way)."""
    import json

    from leantrain.quant.config import QuantConfig

    if args.config is not None:
        clash = [f"--{d.replace('_', '-')}" for d in _CONFIG_DESTS if getattr(args, d) != args.config_defaults[d]]
        if clash:
            raise ValueError(f"--config replaces the weight/activation/keep options; do not also pass {', '.join(clash)}")
        try:
            raw = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"--config file {args.config!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"--config file {args.config!r} is not valid JSON: {exc}") from None
        try:
            return QuantConfig.from_dict(raw)
        except TypeError as exc:
            raise ValueError(f"--config file {args.config!r}: {exc}") from None
    grouping = args.grouping if args.grouping in ("channel", "tensor") else f"{args.grouping}:{args.group_size}"
    if args.grouping in ("fgq", "cluster") and args.remainder == "partial":
        grouping += ":partial"
    return QuantConfig.from_kwargs(weights=args.weights, grouping=grouping, act_bits=args.act_bits or None,
                                   keep=args.keep, act_method=args.act_method, method=args.method,
                                   scale_dtype=args.scale_dtype, calibration_batches=args.calibration_batches,
                                   bn_recalibration=args.bn_recalibration)


def run(args: argparse.Namespace) -> int:
    import torch

    from leantrain.data import load_dataset
    from leantrain.models import checkpoint_extra, load_model
    from leantrain.quant import add_residual_edges, finetune, quantize_model, save_quantized
    from leantrain.storage import load_torch
    from leantrain.train import evaluate

    device = resolve_device(args.device)
    check_int("--group-size", args.group_size, 1)
    check_int("--act-bits (0 = FP32 activations)", args.act_bits, 0, 16)
    check_int("--finetune-epochs", args.finetune_epochs, 0)
    check_int("--calibration-batches", args.calibration_batches, 1)
    check_int("--max-terms", args.max_terms, 1)
    check_positive("--finetune-lr", args.finetune_lr)
    if args.residual_budget is not None:
        check_range("--residual-budget", args.residual_budget, 0)
    torch.manual_seed(args.seed)
    spec = load_torch(args.checkpoint).get("model_spec")
    model = load_model(args.checkpoint).to(device).eval()
    extra = checkpoint_extra(args.checkpoint)
    name = args.calibration or extra.get("dataset")
    if not name:
        raise ValueError("--calibration is required: the checkpoint does not record the data set it was trained on")
    # The checkpoint's loader arguments (e.g. image size) apply when it names the same data set.
    data_args = (extra.get("data_args") or {}) if extra.get("dataset") == name else {}
    data = load_dataset(name, **data_args)
    if data.info.task != "classification":
        raise ValueError(f"data set {name!r} is a {data.info.task} task; quantize reports classification accuracy only")
    args.calibration = name
    x0 = data.train.tensors[0][:2]
    try:
        model(x0.to(device))
    except RuntimeError as exc:
        raise ValueError(f"data set {args.calibration!r} (inputs {tuple(data.info.input_shape)}) does not fit the "
                         f"checkpoint's model {spec.get('name') if spec else '?'}: {str(exc).splitlines()[0]}") from None
    config = _config(args)
    if args.residual_budget is not None and config.weights.bits != 2:
        raise ValueError("--residual-budget needs ternary weights (residual edges are ternary)")
    loss = torch.nn.functional.cross_entropy
    before = evaluate(model, loss, data.test, device=device)
    qmodel = quantize_model(model, config, calibration=data.train, model_spec=spec, device=device)
    after = {"converted": evaluate(qmodel, loss, data.test, device=device)}
    residual = None
    if args.residual_budget is not None:
        residual = add_residual_edges(qmodel, budget=args.residual_budget, unit=args.residual_unit, max_terms=args.max_terms)
        after["with_residual_edges"] = evaluate(qmodel, loss, data.test, device=device)
    if args.finetune_epochs:
        finetune(qmodel, data.train, args.finetune_epochs, lr=args.finetune_lr, seed=args.seed, device=device,
                 progress=True)
        after["finetuned"] = evaluate(qmodel, loss, data.test, device=device)
    saved = save_quantized(qmodel, args.out)
    ckpt_bytes = os.path.getsize(args.checkpoint)
    result = {
        "checkpoint": str(Path(args.checkpoint)), "out": saved["path"], "config": qmodel.config,
        "accuracy_fp32": before["accuracy"], "accuracy": {k: v["accuracy"] for k, v in after.items()},
        "loss_fp32": before["loss"], "loss": {k: v["loss"] for k, v in after.items()},
        "summary": qmodel.summary(), "layers": qmodel.report_dicts(),
        "file_bytes": saved["bytes"], "fp32_state_bytes": saved["fp32_state_bytes"], "checkpoint_bytes": ckpt_bytes,
        "residual_edges": None if residual is None else {"budget_edges": residual["budget_edges"],
                                                          "spent": residual["spent"], "unit": residual["unit"]},
    }
    lines = [qmodel.format_report(), ""]
    lines.append(f"accuracy on {args.calibration} test: FP32 {before['accuracy']:.4f}")
    for k, v in after.items():
        lines.append(f"  {k:<20} {v['accuracy']:.4f} (drop {100 * (before['accuracy'] - v['accuracy']):+.2f} points)")
    if residual is not None:
        lines.append(f"residual edges: {residual['budget_edges']} on, {100 * residual['spent']:.1f}% extra {residual['unit']}")
    fp32 = saved["fp32_state_bytes"]
    lines.append(f"wrote {saved['path']}: {saved['bytes']} bytes; FP32 state dict {fp32} bytes"
                 f" ({fp32 / saved['bytes']:.2f}x larger); checkpoint file {ckpt_bytes} bytes (with optimizer state)")
    emit(args, result, "\n".join(lines))
    return 0
