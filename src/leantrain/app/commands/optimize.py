"""``leantrain optimize``: run PBQN, DANCE or a baseline on a problem and report passes over the data."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from leantrain.app.commands import add_common, emit, resolve_device
from leantrain.validation import float_arg, int_arg

METHODS = ("pbqn", "dance", "newton-cg", "sgd", "adam", "lbfgs")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optimize", help="run PBQN / DANCE / SGD / Adam / L-BFGS on logistic regression, an MLP or a CNN",
        description="Minimize the L2-regularized training loss of a problem with one method and record objective, "
                    "gradient norm, test accuracy, wall time and effective passes over the data. For convex problems "
                    "the exact optimum (scipy L-BFGS-B to gradient norm 1e-10) is reported too. DANCE runs on "
                    "--nproc local gloo processes, or under torchrun (one process per rank).")
    p.add_argument("--method", required=True, choices=METHODS, help="optimizer")
    p.add_argument("--problem", default="logreg", choices=("logreg", "mlp", "cnn"), help="model (default logreg)")
    p.add_argument("--dataset", required=True,
                   help="a leantrain data set name (breast_cancer, digits, mnist1d, gmm, ...), 'synthlogreg' "
                        "(synthetic logistic data, n=100000), or a LIBSVM/svmlight file")
    p.add_argument("--l2", type=float, default=None, help="L2 coefficient on the weights, biases excluded (default 1/n)")
    p.add_argument("--nproc", type=int_arg(1), default=1, help="local processes for DANCE (gloo on CPU; default 1)")
    p.add_argument("--max-passes", type=float_arg(0, low_open=True), default=20.0,
                   help="budget in effective passes over the data (default 20)")
    p.add_argument("--tol", type=float_arg(0, low_open=True), default=None,
                   help="stop once the full training objective's gradient norm is <= TOL (default: none; DANCE then "
                        "ends at the full set's statistical accuracy, torch L-BFGS at its own tolerances). The JSON "
                        "field 'stopped' says why a run ended: tol, converged, budget or diverged")
    p.add_argument("--batch-size", type=int_arg(1), default=None,
                   help="PBQN initial sample size (default 64) or SGD/Adam batch size (default 32)")
    p.add_argument("--lr", type=float_arg(0, low_open=True), default=None,
                   help="SGD step (default: tuned over 0.01, 0.1, 1) or Adam lr (1e-3)")
    p.add_argument("--initial-samples", type=int_arg(1), default=128, help="DANCE first-stage sample size m_0 (default 128)")
    p.add_argument("--hidden", type=_widths, default=(32, 32), help="MLP hidden widths, comma-separated (default 32,32)")
    p.add_argument("--max-train", type=int_arg(1), default=None, help="use only the first N training samples")
    add_common(p, out="results/optimize")
    p.set_defaults(func=run)


def _widths(text: str) -> tuple[int, ...]:
    """``--hidden``: comma-separated layer widths, each an integer >= 1."""
    try:
        widths = tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return widths


_STOPPED = {"tol": "gradient norm <= --tol", "converged": "the method's own convergence test",
            "budget": "budget exhausted (--max-passes) before convergence", "diverged": "diverged"}


def _method_kwargs(args: argparse.Namespace) -> dict:
    kw: dict = {}
    if args.method == "pbqn" and args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    if args.method in ("sgd", "adam"):
        if args.batch_size is not None:
            kw["batch_size"] = args.batch_size
        if args.lr is not None:
            kw["grid" if args.method == "sgd" else "lr"] = (args.lr,) if args.method == "sgd" else args.lr
    if args.method == "dance":
        kw["initial_samples"] = args.initial_samples
    if args.method in ("dance", "newton-cg") and args.tol is not None:
        kw["final_gradient_tol"] = args.tol
    return kw


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from leantrain.app.runs import run_dance, run_dance_distributed, run_method
    from leantrain.optim.problems import make_problem, reference_optimum
    from leantrain.storage import write_json

    device = resolve_device(args.device)
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if (args.nproc > 1 or torchrun) and args.method != "dance":
        raise ValueError(f"--nproc > 1 / torchrun is for --method dance only, not {args.method!r}")
    hidden = args.hidden
    spec = {"problem": args.problem, "dataset": args.dataset, "l2": args.l2, "seed": args.seed, "hidden": hidden,
            "device": device, "max_train": args.max_train}
    problem = make_problem(**spec)
    kwargs = _method_kwargs(args)
    rank = 0
    optimum = None
    if problem.convex and not torchrun:
        optimum = reference_optimum(problem)
    torch.manual_seed(args.seed)
    if torchrun:
        import torch.distributed as dist

        from leantrain.distributed.launch import init_from_env

        rank, _ = init_from_env(device)
        try:
            trace = run_dance(problem, max_passes=args.max_passes, seed=args.seed, **kwargs)
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return 0
        if problem.convex:
            optimum = reference_optimum(make_problem(**spec))
    elif args.nproc > 1:
        trace = run_dance_distributed(spec, args.nproc, max_passes=args.max_passes, seed=args.seed, **kwargs)
    else:
        bar = tqdm(total=args.max_passes, unit="pass", desc=f"{args.method} {problem.name}",
                   disable=True if args.json else None, leave=False, mininterval=0.5)

        def progress(rec: dict) -> bool:
            bar.update(max(0.0, min(rec["passes"], args.max_passes) - bar.n))
            return False

        try:
            trace = run_method(args.method, problem, max_passes=args.max_passes, seed=args.seed, stop=progress,
                               tol=args.tol, **kwargs)
        finally:
            bar.close()
    final = trace.records[-1]
    stopped = "tol" if args.tol is not None and final["grad_norm"] <= args.tol else trace.stopped
    data = {
        "stopped": stopped, "tol": args.tol,
        "method": args.method, "problem": args.problem, "dataset": str(args.dataset), "l2": problem.l2,
        "n_train": problem.n, "dim": problem.info["dim"], "nproc": args.nproc if not torchrun else "torchrun",
        "final_objective": final["objective"], "final_grad_norm": final["grad_norm"],
        "final_test_accuracy": final["test_accuracy"], "passes": final["passes"], "wall_time": final["wall_time"],
        "optimum": None if optimum is None else optimum["objective"],
        "suboptimality": None if optimum is None else final["objective"] - optimum["objective"],
        "counters": trace.counters, "info": {k: v for k, v in trace.info.items() if k != "log"},
        "history": trace.records, "weights": trace.weights,
    }
    out = Path(args.out) / f"{args.method}_{args.problem}_{Path(str(args.dataset)).stem}.json"
    write_json(out, data)
    sub = "" if optimum is None else f", F - F* = {data['suboptimality']:.3e}"
    text = (f"{args.method} on {problem.name} (n={problem.n}, l2={problem.l2:.3g}): F = {data['final_objective']:.8g}"
            f"{sub}, |grad F| = {data['final_grad_norm']:.3e}, test accuracy {data['final_test_accuracy']:.4f}, "
            f"{data['passes']:.2f} passes, {data['wall_time']:.2f} s, stopped: {_STOPPED.get(stopped, stopped)}"
            f"\nwritten {out}")
    emit(args, data, text)
    return 0
