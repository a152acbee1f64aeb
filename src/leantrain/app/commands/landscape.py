"""``leantrain sharpness`` and ``leantrain interpolate``: landscape diagnostics of saved checkpoints.

Both read checkpoints written by :func:`leantrain.train.fit` with a model spec (``leantrain train``
writes such files) and evaluate on ``--dataset`` (default: the data set named in the checkpoint),
with the task's training loss (:func:`leantrain.train.loss_for_task`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from leantrain.app.commands import add_common, declare_outputs, emit, key_value, resolve_device
from leantrain.validation import UsageError, float_arg, int_arg


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None,
                   help="data set name (see `leantrain data list`; default: the one stored in the checkpoint)")
    p.add_argument("--data-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="keyword for the data set loader (repeatable; default: the checkpoint's)")
    p.add_argument("--batch-size", type=int_arg(1), default=1024, help="evaluation batch size (default 1024)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sharpness", help="sharpness of a checkpoint (Keskar et al. metric; full space or random subspace)",
        description="Sharpness phi = 100 (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)) of the training loss f "
                    "at the checkpoint's parameters x, maximized by L-BFGS-B (arXiv:1609.04836, Metric 2.1). "
                    "The model is evaluated in eval mode (BatchNorm running statistics held fixed).",
        epilog="example: leantrain sharpness results/train/checkpoint.pt --dataset digits --subspace 100 --json")
    p.add_argument("checkpoint", help="checkpoint written by `leantrain train` / fit(..., model_spec=...)")
    _add_data_arguments(p)
    p.add_argument("--epsilon", type=float_arg(0, low_open=True), action="append", default=None, metavar="EPS",
                   help="box scale eps > 0 (repeatable; default 1e-3 and 5e-4, the paper's two values)")
    p.add_argument("--subspace", type=int_arg(1), default=None, metavar="P",
                   help="random P-dimensional subspace (the paper: 100) instead of the full space")
    p.add_argument("--iters", type=int_arg(1), default=10, help="L-BFGS-B iterations (default 10, as the paper)")
    p.add_argument("--eigenvalues", type=int_arg(0), default=0, metavar="K",
                   help="also compute the K largest Hessian eigenvalues (Lanczos; default 0 = no)")
    p.add_argument("--trace", action="store_true", help="also estimate the Hessian trace (Hutchinson, 5%% at 95%%)")
    add_common(p, out=None)
    p.set_defaults(func=run_sharpness)

    q = sub.add_parser(
        "interpolate", help="1-D interpolation plot between two checkpoints (train/test loss and accuracy)",
        description="Evaluate (1 - alpha) A + alpha B (parameters and BatchNorm buffers) on the train and test "
                    "split for alphas in [--alpha-min, --alpha-max]; write the PNG to --out and the data as JSON "
                    "next to it.",
        epilog="example: leantrain interpolate sb.pt lb.pt --dataset mnist1d --out results/interp.png")
    q.add_argument("checkpoint_a", help="checkpoint A (alpha = 0)")
    q.add_argument("checkpoint_b", help="checkpoint B (alpha = 1); same architecture as A")
    _add_data_arguments(q)
    q.add_argument("--alpha-min", type=float_arg(), default=-1.0, help="first alpha (default -1)")
    q.add_argument("--alpha-max", type=float_arg(), default=2.0, help="last alpha (default 2)")
    q.add_argument("--points", type=int_arg(2), default=25, help="number of alphas (default 25, as the paper's code)")
    add_common(q, out=None)
    q.add_argument("--out", default="interpolation.png", help="PNG path (default interpolation.png); data: same name .json")
    declare_outputs(q, out="file")
    q.set_defaults(func=run_interpolate)


def load_checkpoint_and_data(path: str, args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """The model of checkpoint ``path``, its data split, the task loss and the data set name."""
    import torch

    from leantrain.data import load_dataset
    from leantrain.models import checkpoint_extra, load_model
    from leantrain.train import loss_for_task

    if not Path(path).is_file():
        raise ValueError(f"checkpoint file {path!r} does not exist")
    extra = checkpoint_extra(path)
    name = args.dataset or extra.get("dataset")
    if not name:
        raise ValueError(f"checkpoint {path!r} names no data set: pass --dataset")
    if args.data_arg:
        data_args = dict(args.data_arg)
    else:  # the checkpoint's loader arguments belong to the checkpoint's data set only
        data_args = dict(extra.get("data_args") or {}) if name == extra.get("dataset") else {}
    data = load_dataset(name, **data_args)
    model = load_model(path, map_location=args.device)
    loss_fn = loss_for_task(data.info.task)
    x, y = data.train[:2][:2]
    was_training = model.training
    try:  # one small batch: a model that cannot consume this data set fails here, not deep inside a diagnostic
        with torch.no_grad():
            loss_fn(model.eval()(x.to(args.device)), y.to(args.device))
        model.train(was_training)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise UsageError(f"the model of checkpoint {path!r} does not fit data set {name!r} (inputs "
                         f"{tuple(x.shape[1:])}, task {data.info.task!r}): {' '.join(str(exc).split())[:200]}; "
                         "pass the --dataset it was trained on") from exc
    return model, data, loss_fn, name


def run_sharpness(args: argparse.Namespace) -> int:
    from leantrain.landscape import LossSurface, hessian_top_eigenvalues, hessian_trace, sharpness

    device = resolve_device(args.device)
    args.device = device
    model, data, loss_fn, name = load_checkpoint_and_data(args.checkpoint, args)
    surface = LossSurface(model, loss_fn, data.train, batch_size=args.batch_size)
    if args.subspace is not None and not 1 <= args.subspace <= surface.dim:
        raise ValueError(f"--subspace must be between 1 and {surface.dim} (the model's trainable parameter count), "
                         f"got {args.subspace}")
    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    if args.eigenvalues < 0 or args.eigenvalues >= surface.dim:
        raise ValueError(f"--eigenvalues must be between 0 and {surface.dim - 1}, got {args.eigenvalues}")
    epsilons = args.epsilon or [1e-3, 5e-4]
    results = []
    bar = None
    if not args.no_progress and not args.json:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(epsilons), desc="sharpness", leave=False)
    for eps in epsilons:
        r = sharpness(model, loss_fn, data.train, epsilon=eps, subspace=args.subspace, iters=args.iters,
                      seed=args.seed, surface=surface)
        results.append(r.as_dict())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out: dict[str, Any] = {"checkpoint": args.checkpoint, "dataset": name, "parameters": surface.dim,
                           "train_samples": surface.size, "train_loss": results[0]["loss"], "sharpness": results}
    if args.eigenvalues:
        vals = hessian_top_eigenvalues(model, loss_fn, data.train, args.eigenvalues, seed=args.seed, surface=surface)
        out["hessian_top_eigenvalues"] = [float(v) for v in vals]
    if args.trace:
        out["hessian_trace"] = hessian_trace(model, loss_fn, data.train, seed=args.seed, surface=surface).as_dict()
    where = "full space" if args.subspace is None else f"random {args.subspace}-dim subspace"
    lines = [f"{args.checkpoint}: {surface.dim} parameters, train loss {out['train_loss']:.6g} on {name} "
             f"({surface.size} samples)"]
    lines += [f"sharpness ({where}, eps {r['epsilon']:g}, {r['iterations']} L-BFGS-B iterations): {r['value']:.6g}"
              for r in results]
    if "hessian_top_eigenvalues" in out:
        lines.append("top Hessian eigenvalues: " + ", ".join(f"{v:.6g}" for v in out["hessian_top_eigenvalues"]))
    if "hessian_trace" in out:
        t = out["hessian_trace"]
        lines.append(f"Hessian trace: {t['trace']:.6g} +- {t['half_width']:.3g} (95%, {t['samples']} probes)")
    emit(args, out, "\n".join(lines))
    return 0


def run_interpolate(args: argparse.Namespace) -> int:
    import numpy as np

    from leantrain.landscape import interpolate, plot_interpolation
    from leantrain.storage import write_json

    device = resolve_device(args.device)
    args.device = device
    if args.points < 2:
        raise ValueError(f"--points must be >= 2, got {args.points}")
    if not (math.isfinite(args.alpha_min) and math.isfinite(args.alpha_max)) or args.alpha_min >= args.alpha_max:
        raise ValueError(f"--alpha-min must be below --alpha-max (both finite), got {args.alpha_min}, {args.alpha_max}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png path, got {args.out!r}")
    model_a, data, loss_fn, name = load_checkpoint_and_data(args.checkpoint_a, args)
    model_b, _, _, _ = load_checkpoint_and_data(args.checkpoint_b, args)
    metric_kw = {"metric": None} if data.info.task == "regression" else {}
    res = interpolate(model_a, model_b, loss_fn, data, np.linspace(args.alpha_min, args.alpha_max, args.points),
                      batch_size=args.batch_size, labels=(Path(args.checkpoint_a).stem, Path(args.checkpoint_b).stem),
                      progress=not args.no_progress and not args.json, **metric_kw)
    plot_interpolation(res, out, title=f"{Path(args.checkpoint_a).name} -> {Path(args.checkpoint_b).name} on {name}")
    payload = {"checkpoint_a": args.checkpoint_a, "checkpoint_b": args.checkpoint_b, "dataset": name,
               "plot": str(out), **res.as_dict()}
    data_path = write_json(out.with_suffix(".json"), payload)
    lines = [f"{'alpha':>7} " + " ".join(f"{k + ' loss':>12} {k + ' acc':>10}" for k in res.curves)]
    for j, a in enumerate(res.alphas):
        lines.append(f"{a:7.3f} " + " ".join(f"{c['loss'][j]:12.5g} {c['accuracy'][j]:10.4f}" for c in res.curves.values()))
    lines.append(f"plot: {out}\ndata: {data_path}")
    emit(args, payload, "\n".join(lines))
    return 0
