"""DANCE reproductions (arXiv:1810.11507): passes to statistical accuracy, the MLP, and scaling on gloo.

``dance-logreg``: L2 logistic regression with ``l2 = 1/N`` (so DANCE's last stage, ``c = l2 N``, is the
problem itself) on breast cancer and the synthetic n = 100000 set. Effective passes until the full
objective is within the full set's statistical accuracy ``V_N = 1/N`` of the scipy optimum, for
DANCE, damped Newton-CG on the full data from the start (same CG rule), L-BFGS (full batch) and
tuned SGD.

``dance-nn``: the tanh MLP on mnist1d. No ``F*`` exists, so the target is Newton-CG's final
training objective (at its pass budget) plus ``V_N``; SGD and Adam are shown for context.

``dance-scaling``: DANCE on 1, 2 and 4 local gloo processes (each holding a strided shard):
the iterates agree to floating-point tolerance, the communication rounds and bytes are the
same, and the wall time is reported (on a 2-core machine 4 processes oversubscribe it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from leantrain.app.registry import Claim, Result, Table, experiment
from leantrain.app.runs import (
    compare_iterates,
    run_adam,
    run_dance,
    run_dance_distributed,
    run_lbfgs,
    run_newton_cg,
    tune_sgd,
)
from leantrain.optim.problems import make_problem, reference_optimum
from leantrain.plots import curves


def _fmt(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f}"


@experiment(
    "dance-logreg",
    arxiv="1810.11507",
    title="DANCE on L2 logistic regression: passes to the full set's statistical accuracy",
    claim="DANCE reaches the statistical accuracy of the full training set in fewer passes over the data than "
          "Newton-CG on the full data from scratch.",
    quick_minutes=1.0,
)
def run_logreg(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    quick = profile == "quick"
    datasets = {"breast_cancer": "breast_cancer", "synthlogreg (n=100000)": "synthlogreg"}
    metrics: dict = {"datasets": {}}
    claims, rows, plots = [], [], []
    for label, ds in datasets.items():
        first = make_problem("logreg", ds, device=device)
        ref = reference_optimum(first)
        fstar, n = ref["objective"], first.n
        v_n = 1.0 / n
        stop = lambda rec, f=fstar, v=v_n: rec["objective"] - f <= v / 100
        mk = lambda ds=ds: make_problem("logreg", ds, device=device)
        seeds = list(range(seed, seed + 5))
        dance_runs = [run_dance(mk(), seed=s, max_passes=150, stop=stop) for s in seeds]
        traces = {
            "DANCE": dance_runs[0],
            "Newton-CG (full data)": run_newton_cg(mk(), seed=seed, max_passes=150, stop=stop),
            "L-BFGS (torch, strong Wolfe)": run_lbfgs(mk(), max_passes=60 if quick else 150, stop=stop),
            "SGD (tuned)": tune_sgd(mk(), max_passes=3.0 if quick else 15.0, seed=seed, records_per_pass=5),
        }
        to_v = {m: t.passes_to(fstar + v_n) for m, t in traces.items()}
        per_seed = [t.passes_to(fstar + v_n) for t in dance_runs]
        reached = all(v is not None for v in per_seed)
        to_v["DANCE"] = float(np.mean(per_seed)) if reached else None
        dance = traces["DANCE"]
        curves(out / f"suboptimality_{label.split(' ')[0]}.png",
               {m: (t.series("passes"), [max(r["objective"] - fstar, 1e-16) for r in t.records]) for m, t in traces.items()},
               xlabel="effective passes over the data (gradients + Hessian-vector products)", ylabel="F - F*",
               logy=True, title=f"logistic regression, {label}; statistical accuracy V_N = {v_n:.1e}")
        plots.append(f"suboptimality_{label.split(' ')[0]}.png")
        metrics["datasets"][label] = {
            "optimum": fstar, "V_N": v_n, "passes_to_V_N": to_v, "stage_sizes": dance.info["stage_sizes"],
            "dance_counters": dance.counters, "newton_cg_counters": traces["Newton-CG (full data)"].counters,
            "sgd_grid": traces["SGD (tuned)"].info["grid"],
            "dance_passes_per_seed": dict(zip(map(str, seeds), per_seed)),
            "histories": {m: t.records for m, t in traces.items()},
        }
        d, nc = to_v["DANCE"], to_v["Newton-CG (full data)"]
        lb = to_v["L-BFGS (torch, strong Wolfe)"]
        spread = f"seeds {', '.join(_fmt(v) for v in per_seed)}"
        claims.append(Claim(
            f"{label}: DANCE reaches F - F* <= V_N in fewer passes than full-batch L-BFGS (torch, strong Wolfe, "
            "default budget)", "not recovered",
            f"DANCE {_fmt(d)} ({spread}) vs L-BFGS {_fmt(lb)} passes",
            "mean over 5 seeds strictly below L-BFGS's passes; one closure call = one pass, one HVP on a sample = one "
            "gradient on it", d is not None and lb is not None and d < lb))
        claims.append(Claim(
            f"{label}: DANCE reaches F - F* <= V_N = 1/N in fewer passes than full-data Newton-CG",
            "not recovered (datasets and numbers)", f"DANCE {_fmt(d)} ({spread}) vs Newton-CG {_fmt(nc)} passes",
            "strictly fewer passes (same CG rule and damped step for both; HVP on a sample = one gradient on it)",
            d is not None and (nc is None or d < nc)))
        sizes = dance.info["stage_sizes"]
        rows.append([label, n, f"{v_n:.2e}", f"{sizes[0]} -> {sizes[-1]} ({len(sizes)} stages)", _fmt(d), _fmt(nc),
                     _fmt(lb), _fmt(to_v["SGD (tuned)"]), dance.counters["cg_iterations"],
                     traces["Newton-CG (full data)"].counters["cg_iterations"]])
    table = Table("effective passes to reach F - F* <= V_N", ["data set", "N", "V_N", "DANCE stages", "DANCE",
                  "Newton-CG", "L-BFGS", "SGD", "DANCE CG its", "Newton-CG CG its"], rows)
    notes = ("V_n = 1/n, c = l2 N (so mu_n = c V_n and the last stage is the problem itself), m_0 = 128, growth 2, "
             "stage test ||grad R_n|| <= sqrt(2c) V_n, CG residual <= max(min(0.1, sqrt||g||) ||g||, 0.1 sqrt(2c) V_n), "
             "step w + v/(1 + delta): our choices where the paper's were not recovered (docs/optim.md). Newton-CG is the "
             "same code with m_0 = N. The paper's data sets, node counts and GIANT/DiSCO numbers were not recovered. "
             "DANCE's passes are the mean over 5 seeds (random data order); L-BFGS is torch.optim.LBFGS with "
             "strong Wolfe and its default budget per step (max_iter 20, max_eval 25, history 100), one pass per "
             "closure call. SGD: batch 32, step tuned over 0.01, 0.1, 1.")
    return Result(metrics=metrics, claims=claims, plots=plots, tables=[table], notes=notes)


@experiment(
    "dance-nn",
    arxiv="1810.11507",
    title="DANCE on an MLP (mnist1d): training objective and test accuracy vs passes",
    claim="On a neural network, DANCE reaches full-data Newton-CG's training objective in fewer passes.",
    quick_minutes=0.5,
)
def run_nn(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    quick = profile == "quick"
    budget = 40.0 if quick else 150.0
    mk = lambda: make_problem("mlp", "mnist1d", seed=seed, device=device, dtype=torch.float64)
    n = mk().n
    v_n = 1.0 / n
    opts = dict(max_stage_iterations=5, cg_max_iter=30)
    newton = run_newton_cg(mk(), seed=seed, max_passes=budget, **opts)
    target = newton.final("objective") + v_n
    traces = {
        "DANCE": run_dance(mk(), seed=seed, max_passes=budget, stop=lambda r: r["objective"] <= target - v_n, **opts),
        "Newton-CG (full data)": newton,
        "SGD (tuned)": tune_sgd(mk(), grid=(0.03, 0.1, 0.3), max_passes=budget / 4, seed=seed, records_per_pass=2),
        "Adam": run_adam(mk(), max_passes=budget / 4, seed=seed, records_per_pass=2),
        "L-BFGS (torch, strong Wolfe)": run_lbfgs(mk(), max_passes=budget, stop=lambda r: r["objective"] <= target),
    }
    to_t = {m: t.passes_to(target) for m, t in traces.items()}
    curves(out / "objective.png", {m: (t.series("passes"), t.series("objective")) for m, t in traces.items()},
           xlabel="effective passes over the data", ylabel="training objective", logy=True,
           title="tanh MLP (32, 32) on mnist1d")
    curves(out / "test_accuracy.png", {m: (t.series("passes"), t.series("test_accuracy")) for m, t in traces.items()},
           xlabel="effective passes over the data", ylabel="test accuracy", title="tanh MLP (32, 32) on mnist1d")
    d, nc = to_t["DANCE"], to_t["Newton-CG (full data)"]
    lb = to_t["L-BFGS (torch, strong Wolfe)"]
    claims = [Claim(
        "DANCE reaches Newton-CG's final training objective (+ V_N) in fewer passes than full-batch L-BFGS",
        "not recovered", f"DANCE {_fmt(d)} vs L-BFGS {_fmt(lb)} passes (target {target:.4f})",
        "strictly fewer passes, or L-BFGS does not reach it within the budget; one seed (deterministic L-BFGS, "
        "DANCE's data order seeded)", d is not None and (lb is None or d < lb)), Claim(
        "DANCE reaches Newton-CG's final training objective (+ V_N) in fewer passes than Newton-CG",
        "not recovered", f"DANCE {_fmt(d)} vs Newton-CG {_fmt(nc)} passes (target {target:.4f})",
        "strictly fewer passes; illustrative only (the theory is convex)", d is not None and nc is not None and d < nc)]
    rows = [[m, _fmt(to_t[m]), f"{t.final('objective'):.4f}", f"{max(t.series('test_accuracy')):.4f}",
             f"{t.final('passes'):.1f}"] for m, t in traces.items()]
    table = Table("MLP on mnist1d", ["method", "passes to target", "final objective", "best test accuracy", "passes"], rows)
    metrics = {"V_N": v_n, "target": target, "passes_to_target": to_t, "dance_counters": traces["DANCE"].counters,
               "newton_cg_counters": newton.counters, "stage_sizes": traces["DANCE"].info["stage_sizes"],
               "histories": {m: t.records for m, t in traces.items()}}
    notes = ("float64 tanh MLP, l2 = 1/N on the weights, c = l2 N; exact Hessian-vector products, CG stopped on "
             "negative curvature; at most 5 Newton iterations per stage before the sample grows (the last stage is never "
             f"cut short), CG at most 30 iterations. Newton-CG budget {budget:g} passes; SGD/Adam get a quarter of it "
             "(context only).")
    return Result(metrics=metrics, claims=claims, plots=["objective.png", "test_accuracy.png"], tables=[table],
                  notes=notes)


@experiment(
    "dance-scaling",
    arxiv="1810.11507",
    title="Distributed DANCE on 1, 2 and 4 gloo processes: same iterates, same communication, wall time",
    claim="DANCE distributes by all-reducing gradients and Hessian-vector products: K workers give the same "
          "iterates as one (to floating-point tolerance) with one all-reduce per gradient and per CG iteration.",
    quick_minutes=0.8,
)
def run_scaling(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    quick = profile == "quick"
    spec = {"problem": "logreg", "dataset": "synthlogreg", "max_train": 20_000 if quick else 100_000, "device": device}
    kwargs = {"seed": seed, "keep_iterates": True, "max_passes": 200}
    first = make_problem(**spec)
    n = first.n
    traces = {1: run_dance(first, **kwargs)}
    for k in (2, 4):
        traces[k] = run_dance_distributed(spec, k, timeout_s=300, **kwargs)
    base = traces[1]
    # both runs end with ||grad R_N|| <= target and R_N is mu = l2-strongly convex (c = l2 N): ||w - w*|| <= target / mu
    target = math.sqrt(2.0 * base.info["c"]) / n
    bound = 2.0 * target / first.l2
    scale = max(float(w.abs().max()) for w in base.iterates)
    rows, metrics = [], {"runs": {}, "final_bound_abs": bound}
    ok_before, ok_final, ok_rounds = True, True, True
    for k, t in traces.items():
        cmp = compare_iterates(base, t)
        c = t.counters
        final_abs = cmp["final_rel"] * scale
        ok_before &= cmp["max_rel_before"] <= 1e-6
        ok_final &= final_abs <= bound
        ok_rounds &= c["comm_rounds"] == c["newton_iterations"] + c["cg_iterations"] + c["stages"]
        per_cg = t.final("wall_time") / max(1, c["cg_iterations"])
        metrics["runs"][str(k)] = {**cmp, "final_abs": final_abs, "counters": c, "wall_time": t.final("wall_time"),
                                   "wall_per_cg_iteration": per_cg, "final_objective": t.final("objective")}
        div = "none" if cmp["first_divergence"] is None else f"step {cmp['first_divergence']}"
        rows.append([k, f"{cmp['max_rel_before']:.1e}", div, f"{final_abs:.1e}", c["newton_iterations"],
                     c["cg_iterations"], c["comm_rounds"], c["comm_bytes"], f"{t.final('wall_time'):.2f}",
                     f"{per_cg * 1e3:.2f}"])
    worst = max(m["max_rel_before"] for m in metrics["runs"].values())
    claims = [
        Claim("2 and 4 gloo processes give the same DANCE iterates as 1 process, step for step, until floating-point "
              "summation order flips a discrete decision (a CG stopping test)", "not recovered (no numbers)",
              f"max relative difference {worst:.1e} over the steps before any flip",
              "<= 1e-6 relative: float64 summation-order differences (1e-16) are amplified by CG on systems with "
              "condition number up to ~1e5 here (eps * kappa^2 = 1e-6); not a paper number", ok_before),
        Claim("the final weights of K = 1, 2, 4 agree within the accuracy both runs guarantee", "n/a (derived)",
              f"max |w_K - w_1| = {max(m['final_abs'] for m in metrics['runs'].values()):.1e}",
              f"<= 2 target / mu = {bound:.1e} (stage test ||grad R_N|| <= sqrt(2c)/N, R_N mu-strongly convex)", ok_final),
        Claim("communication: one all-reduce per gradient (Newton iteration or stage start) and per CG iteration",
              "O(d) per CG iteration (abstract: strong scaling)",
              f"rounds {', '.join(str(t.counters['comm_rounds']) for t in traces.values())} for K = 1, 2, 4",
              "rounds = Newton iterations + CG iterations + stages for every K", ok_rounds),
    ]
    table = Table("DANCE on K processes (gloo, localhost)", ["K", "max rel. diff before flip", "first flip",
                  "final |w_K - w_1|", "Newton its", "CG its", "all-reduces", "bytes (payload)", "wall s",
                  "ms per CG it"], rows)
    notes = (f"Synthetic logistic regression, n = {n}, d = 21, float64, l2 = 1/n. Each rank holds the strided shard "
             "i mod K = rank of every stage's sample. Wall time is rank 0's optimization time (evaluations excluded). "
             "This machine has 2 cores shared with other work, so K = 4 oversubscribes it and wall times are not a "
             "strong-scaling measurement; bytes are the reduced tensors' payload per rank and per call.")
    return Result(metrics=metrics, claims=claims, tables=[table], notes=notes)
