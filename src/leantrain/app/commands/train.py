"""``leantrain train``: train a zoo model on a data set with :func:`leantrain.train.fit`, with checkpoints.

The command is three steps, each its own function so that other layers can extend one of them:

- :func:`add_train_arguments` declares the options (other layers add theirs in :func:`register`);
- :func:`build_setup` turns parsed arguments into a :class:`TrainSetup` (data, model, loss,
  optimizer, hooks, checkpoint spec and extras); :func:`make_hooks` is where precision or
  distributed options become :class:`leantrain.train.Hooks`;
- :func:`run` calls ``fit`` and writes ``OUT/history.json``.

The checkpoint (``--checkpoint``, default ``OUT/checkpoint.pt``) carries the model spec and
``extra = {"dataset", "data_args", "task", "train_options"}``, so :func:`leantrain.models.load_model`
rebuilds the model and :func:`leantrain.models.checkpoint_extra` names its data.

Safety (docs/files.md): ``--resume`` compares the run-defining options (:data:`DEFINING`) with the
checkpoint's and refuses a difference unless ``--override`` names it (only :data:`OVERRIDABLE`);
a non-finite loss stops the run (exit 2, naming ``--lr``); a checkpoint that cannot be written
still leaves the history (``OUT/history.json``, else the temporary folder) and says where.
"""

from __future__ import annotations

import argparse
import errno
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leantrain.app.commands import add_common, declare_outputs, emit, key_value, resolve_device
from leantrain.validation import UsageError, float_arg, int_arg

#: Models that ``leantrain train`` cannot train with a supervised loss.
UNSUPERVISED = {"dcgan_generator": "a GAN loop", "dcgan_discriminator": "a GAN loop"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model on a data set, with atomic checkpoints and --resume",
        description="Train zoo model --model on data set --dataset with SGD or Adam. Writes OUT/history.json "
                    "and a checkpoint that `leantrain quantize` / `leantrain sharpness` can read.",
        epilog="example: leantrain train --model lenet --dataset digits --epochs 5 --out results/lenet-digits")
    add_train_arguments(p)
    add_distributed_arguments(p)
    add_common(p, out="results/train")
    declare_outputs(p, checkpoint="file", trace="file")
    p.set_defaults(func=run)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``leantrain train`` (without the common ``--seed --device --json --out``)."""
    from leantrain.models import MODELS

    p.add_argument("--model", required=True, choices=sorted(set(MODELS) - set(UNSUPERVISED)), help="zoo model")
    p.add_argument("--dataset", required=True, help="data set name (see `leantrain data list`)")
    p.add_argument("--data-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="keyword for the data set loader, e.g. root=DIR or train=FILE (repeatable)")
    p.add_argument("--model-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="keyword for the model constructor, e.g. width=8 or hidden=[64,64] (repeatable)")
    p.add_argument("--epochs", type=int_arg(1), default=5, help="epochs (default 5)")
    p.add_argument("--batch-size", type=int_arg(1), default=64, help="mini-batch size (default 64)")
    p.add_argument("--lr", type=float_arg(0, low_open=True), default=None,
                   help="learning rate (default 0.05 for sgd, 1e-3 for adam)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="optimizer (default sgd)")
    p.add_argument("--momentum", type=float_arg(0, 1, high_open=True), default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float_arg(0), default=0.0, help="L2 weight decay (default 0)")
    p.add_argument("--max-steps", type=int_arg(1), default=None, help="stop after this many optimizer steps")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default OUT/checkpoint.pt)")
    p.add_argument("--checkpoint-every", type=int_arg(0), default=0, metavar="N",
                   help="also checkpoint every N optimizer steps (default: at the end of each epoch)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint if it exists; the options that define the run must match "
                        "the checkpoint's (see --override)")
    p.add_argument("--override", type=_option_names, default=(), metavar="NAME,...",
                   help=f"with --resume: continue with these changed options ({', '.join(OVERRIDABLE)}); "
                        "the change is recorded in the checkpoint and history")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from leantrain.precision import policy_names

    p.add_argument("--precision", choices=policy_names(), default="fp32",
                   help="emulated precision policy of every GEMM (leantrain.precision; default fp32 = plain training)")


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """Data-parallel options (``torchrun --nproc-per-node N -m leantrain train ... --dp``)."""
    from leantrain.distributed import COMPRESSIONS

    g = p.add_argument_group("data parallel (start with torchrun; --batch-size is per process)")
    g.add_argument("--dp", action="store_true", help="average gradients over all processes (leantrain.distributed)")
    g.add_argument("--bucket-mb", type=float_arg(0, low_open=True), default=None, help="gradient bucket size in MiB (default 25)")
    g.add_argument("--compression", choices=COMPRESSIONS, default=None, help="gradient compression (default none)")
    g.add_argument("--no-error-feedback", action="store_true", help="drop the compression error instead of carrying it")
    g.add_argument("--no-priority", action="store_true", help="exchange buckets first-ready-first-sent")
    g.add_argument("--no-overlap", action="store_true", help="start the exchange after backward, not during it")
    g.add_argument("--distributed-update", action="store_true",
                   help="reduce-scatter, update this rank's shard, all-gather parameters (ZeRO-1)")
    g.add_argument("--trace", default=None, metavar="FILE", help="write a Chrome-trace timeline of every rank")
    g.add_argument("--comm-timeout", type=float_arg(0, low_open=True), default=300.0,
                   help="seconds before a stuck collective raises an error naming rank and operation (default 300)")


def _data_parallel_hooks(args: argparse.Namespace, inner: Any) -> Any:
    from leantrain.distributed import DataParallelHooks, Distribution, init_from_env, is_launched

    if is_launched():
        init_from_env(args.device, timeout_s=args.comm_timeout)
    return DataParallelHooks(
        Distribution(timeout_s=args.comm_timeout), inner=inner, bucket_mb=args.bucket_mb or 25.0,
        compression=args.compression or "none", error_feedback=not args.no_error_feedback,
        priority=not args.no_priority, overlap=not args.no_overlap, distributed_update=args.distributed_update,
        seed=args.seed, trace=args.trace is not None)


#: Options that define a run: ``--resume`` refuses a checkpoint written with other values.
DEFINING = ("model", "model_arg", "dataset", "data_arg", "optimizer", "lr", "momentum", "weight_decay", "seed",
            "batch_size", "precision", "dp", "compression", "no_error_feedback", "distributed_update")
#: Defining options that ``--override`` may change on resume (the checkpoint's state does not depend on them).
OVERRIDABLE = ("lr", "momentum", "weight_decay", "seed")


def _option_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lstrip("-").replace("-", "_") for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in OVERRIDABLE]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected names among {', '.join(OVERRIDABLE)}, got {text!r}")
    return names


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The run-defining options (:data:`DEFINING`) whose values differ: ``{name: (checkpoint's, now)}``.

    Options the checkpoint did not record (an older leantrain) are not compared.
    """
    norm = lambda v: [list(p) for p in v] if isinstance(v, (list, tuple)) else v  # JSON/pickle round trips
    return {k: (saved[k], now.get(k)) for k in DEFINING if k in saved and norm(saved[k]) != norm(now.get(k))}


def check_resume(ckpt: Path, options: dict[str, Any], override: tuple[str, ...]) -> dict[str, tuple[Any, Any]]:
    """Compare this run's options with those ``ckpt`` was written with; returns the overridden differences.

    Raises :class:`~leantrain.validation.UsageError` listing every difference not named in
    ``override`` (and any ``override`` name that is not different).
    """
    from leantrain.models import checkpoint_extra

    saved = checkpoint_extra(ckpt).get("train_options")
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: checkpoint {str(ckpt)!r} records no training options (not written by "
                         "`leantrain train`); cannot check that it continues the same run")
    diff = resume_differences(saved, options)
    refused = {k: v for k, v in diff.items() if k not in override}
    if refused:
        listed = "; ".join(f"{_flag(k)} {old!r} in the checkpoint, {new!r} now" for k, (old, new) in refused.items())
        can = [k for k in refused if k in OVERRIDABLE]
        hint = f", or pass --override {','.join(k.replace('_', '-') for k in can)} to continue with the new values" if can else ""
        raise UsageError(f"--resume: checkpoint {str(ckpt)!r} was written with other options: {listed}; "
                         f"rerun with the checkpoint's values{hint}")
    unused = [k for k in override if k not in diff]
    if unused:
        raise UsageError(f"--override {','.join(unused)}: the checkpoint already has the same value "
                         f"({', '.join(f'{_flag(k)} {options.get(k)!r}' for k in unused)}); nothing to override")
    return diff


@dataclass
class TrainSetup:
    """Everything :func:`run` hands to :func:`leantrain.train.fit`."""

    model: Any
    optimizer: Any
    loss_fn: Any
    hooks: Any
    data: Any
    spec: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def make_hooks(args: argparse.Namespace, model: Any, optimizer: Any) -> Any:
    """The :class:`leantrain.train.Hooks` for these options: plain FP32 training unless a layer adds its own."""
    from leantrain.train import Hooks

    hooks = Hooks()
    if getattr(args, "precision", "fp32") != "fp32":
        from leantrain.precision import PrecisionHooks

        hooks = PrecisionHooks(args.precision, seed=args.seed)
    if getattr(args, "dp", False):
        hooks = _data_parallel_hooks(args, hooks)  # the exchange finishes before the precision step runs
    else:
        given = [f for f, v in (("--bucket-mb", args.bucket_mb), ("--compression", args.compression),
                                ("--distributed-update", args.distributed_update), ("--trace", args.trace),
                                ("--no-priority", args.no_priority), ("--no-overlap", args.no_overlap),
                                ("--no-error-feedback", args.no_error_feedback)) if v]
        if given:
            raise ValueError(f"{', '.join(given)} need --dp")
    return hooks


def build_setup(args: argparse.Namespace) -> TrainSetup:
    """Load the data, build model, loss, optimizer and hooks from parsed ``leantrain train`` options."""
    import torch

    from leantrain.data import load_dataset
    from leantrain.models import build, dataset_kwargs, model_spec
    from leantrain.train import loss_for_task

    if args.model in UNSUPERVISED:
        raise UsageError(f"model {args.model!r} is trained by {UNSUPERVISED[args.model]}, not `leantrain train`")
    if args.override and not args.resume:
        raise UsageError("--override only applies with --resume")
    data_args = dict(args.data_arg)
    data = load_dataset(args.dataset, **data_args)
    kwargs = {**dataset_kwargs(args.model, data.info), **dict(args.model_arg)}
    torch.manual_seed(args.seed)  # model initialisation
    try:
        spec = model_spec(args.model, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--model-arg does not fit model {args.model!r}: {exc}") from exc
    model = build(spec["name"], **spec["kwargs"])
    lr = args.lr if args.lr is not None else (0.05 if args.optimizer == "sgd" else 1e-3)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    skip = ("func", "command", "json", "outputs", "override")
    options = {k: v for k, v in vars(args).items() if k not in skip and not callable(v)}
    options["lr"] = lr  # the value in effect, so that a resumed run compares like with like
    extra = {"dataset": args.dataset, "data_args": data_args, "task": data.info.task, "train_options": options}
    return TrainSetup(model, opt, loss_for_task(data.info.task), make_hooks(args, model, opt), data, spec, extra)


def _result(args: argparse.Namespace, setup: TrainSetup, ckpt: Path, history: Any) -> dict[str, Any]:
    return {"model_spec": setup.spec, "dataset": args.dataset, "task": setup.data.info.task, "checkpoint": str(ckpt),
            "steps": len(history.step_loss), "skipped_steps": history.skipped_steps, "evals": history.evals,
            "final": history.evals[-1] if history.evals else {},
            "resume_overrides": setup.extra.get("resume_overrides", [])}


def _summary(row: dict[str, float], task: str) -> str:
    parts = [f"epoch {int(row['epoch'])}", f"step {int(row['step'])}", f"train loss {row['train_loss']:.4f}"]
    if "test_loss" in row:
        parts.append(f"test loss {row['test_loss']:.4f}")
        if task == "language":
            parts.append(f"test bits/char {row['test_loss'] / math.log(2):.3f}")
    if "test_accuracy" in row:
        parts.append(f"test accuracy {row['test_accuracy']:.4f}")
    return ", ".join(parts)


class _Diverged(Exception):
    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss


def _divergence_check(patience: int) -> Any:
    """A ``fit`` step callback raising :class:`_Diverged` after ``patience`` consecutive non-finite losses.

    FP32 training has no reason for a single non-finite loss; emulated low precision may overflow
    in a forward pass now and then (the loss scaler skips that step), so it gets a few in a row.
    """
    run = [0]

    def check(step: int, loss: float) -> None:
        run[0] = 0 if math.isfinite(loss) else run[0] + 1
        if run[0] >= patience:
            raise _Diverged(step, loss)

    return check


def _write_history(out: Path, result: dict[str, Any]) -> tuple[Path | None, str]:
    """Write ``result`` to ``OUT/history.json``, or, if that fails, to the temporary folder; says where."""
    import os
    import tempfile

    from leantrain.storage import write_json

    try:
        return write_json(out / "history.json", result), ""
    except OSError as exc:
        first = f"{exc.strerror or exc}: {exc.filename or out / 'history.json'}"
    fallback = Path(tempfile.gettempdir()) / f"leantrain-train-history-{os.getpid()}.json"
    try:
        return write_json(fallback, result), first
    except OSError as exc:
        return None, f"{first}; also {exc.strerror or exc}: {fallback}"


def run(args: argparse.Namespace) -> int:
    from leantrain.train import CheckpointWriteError, History, fit

    device = resolve_device(args.device)
    setup = build_setup(args)
    distribution = getattr(setup.hooks, "distribution", None)  # set by --dp
    parts = distribution.data_size if distribution is not None else 1
    lead = distribution is None or distribution.rank == 0  # the process that reports and writes files
    out = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else out / "checkpoint.pt"
    overrides: dict[str, Any] = {}
    if args.resume and ckpt.is_file():
        changed = check_resume(ckpt, setup.extra["train_options"], tuple(args.override))
        from leantrain.models import checkpoint_extra

        previous = list(checkpoint_extra(ckpt).get("resume_overrides", []))
        if changed:
            previous.append({k: {"checkpoint": old, "now": new} for k, (old, new) in changed.items()})
        setup.extra["resume_overrides"] = previous
        overrides = {k: v for k, (_, v) in changed.items() if k in ("lr", "momentum", "weight_decay")}
    elif args.override:
        raise UsageError(f"--override: there is no checkpoint {str(ckpt)!r} to resume")
    task = setup.data.info.task
    fit_kwargs = {"metric": None} if task == "regression" else {}  # accuracy means nothing for regression
    diverged = None
    try:
        history = fit(setup.model, setup.optimizer, setup.loss_fn, setup.data.train, test=setup.data.test,
                      epochs=args.epochs, batch_size=args.batch_size * parts, seed=args.seed, device=device,
                      hooks=setup.hooks, checkpoint=ckpt, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, max_steps=args.max_steps, eval_train=False,
                      progress=lead and not args.no_progress, model_spec=setup.spec, extra=setup.extra,
                      resume_overrides=overrides or None,
                      step_callback=_divergence_check(1 if args.precision == "fp32" else 5), **fit_kwargs)
    except CheckpointWriteError as exc:
        if not lead:
            raise
        where, failed = _write_history(out, _result(args, setup, ckpt, exc.history))
        saved = f"the history so far is in {where}" if where else f"the history could not be saved ({failed})"
        raise OSError(exc.errno, f"{exc.strerror}; {saved}", exc.filename) from exc
    except _Diverged as d:
        diverged = d
        history = History()
    if diverged is not None:
        lr = setup.extra["train_options"]["lr"]
        raise UsageError(f"training diverged: the loss is {diverged.loss} at step {diverged.step} with --lr {lr} "
                         f"and --weight-decay {args.weight_decay}; lower --lr (the last good checkpoint, if any, "
                         f"is {str(ckpt)!r})")
    result = _result(args, setup, ckpt, history)
    if distribution is not None:
        result["distributed"] = _distributed_report(args, setup.hooks, lead)
    if not lead:
        return 0
    hist_path, failed = _write_history(out, result)
    if failed:
        where = f"written to {hist_path} instead" if hist_path else "not saved"
        raise OSError(errno.EIO, f"cannot write the history ({failed}); it was {where}; the checkpoint {ckpt} "
                      "holds the trained model")
    text = "\n".join(_summary(r, task) for r in history.evals)
    if "distributed" in result:
        d = result["distributed"]
        text += (f"\ndata parallel over {d['processes']} processes, median step {d['step_s'] * 1e3:.1f} ms: "
                 f"compute {d['compute_s'] * 1e3:.1f} ms, communication {d['comm_s'] * 1e3:.1f} ms, exposed "
                 f"{d['exposed_comm_s'] * 1e3:.1f} ms, {d['bytes_sent'] / 1e6:.3f} MB sent per step")
        if d.get("trace"):
            text += f"\ntrace: {d['trace']}"
    text += f"\ncheckpoint: {ckpt}\nhistory: {hist_path}"
    emit(args, result, text)
    return 0


def _distributed_report(args: argparse.Namespace, hooks: Any, lead: bool) -> dict[str, Any]:
    """Step statistics of this rank (medians), the bucket layout, and the merged trace (a collective)."""
    from leantrain.distributed import write_chrome_trace
    from leantrain.distributed.timeline import summarize

    dp = hooks.dp
    report: dict[str, Any] = {"processes": hooks.distribution.world_size, "compression": dp.compression.name,
                              "distributed_update": dp.distributed_update, "buckets": dp.layout(),
                              **summarize(dp.stats)}
    if dp.stats:
        report["bytes_per_bucket"] = [b.bytes_sent for b in dp.stats[-1].buckets]
    if args.trace:
        timelines = hooks.timelines()
        if lead:
            report["trace"] = str(write_chrome_trace(args.trace, timelines))
    dp.close()
    return report
