"""PBQN reproductions (arXiv:1802.05374): logistic regression and small networks, measured in passes.

``pbqn-logreg``: L2 logistic regression (``l2 = 1/n``) on breast cancer, a synthetic set with
n = 100000 and a LIBSVM file the experiment writes (scikit-learn ``make_classification`` data,
``dump_svmlight_file``, read back through leantrain's LIBSVM loader). PBQN (multi-batch 25%
overlap, and full overlap) against ``torch.optim.LBFGS`` on the full batch (strong Wolfe) and
SGD with a tuned step, suboptimality ``F - F*`` against the scipy optimum vs effective passes.

``pbqn-nn``: an MLP on mnist1d and LeNet on digits: test accuracy vs passes against SGD (tuned)
and Adam.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from leantrain.app.registry import Claim, Result, Table, experiment
from leantrain.app.runs import run_adam, run_lbfgs, run_pbqn, tune_sgd
from leantrain.optim.problems import make_problem, reference_optimum
from leantrain.plots import curves, save_figure, subplots

TIGHT = 1e-4  # reference relative suboptimality (F - F*) / F*, for the comparison with L-BFGS
LOOSE = 1e-2  # the accuracy at which the comparison with SGD is made


def _fmt(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f}"


def write_libsvm_file(path: Path, seed: int, n: int = 20_000) -> Path:
    """A binary classification problem in LIBSVM format (scikit-learn ``make_classification``)."""
    from sklearn.datasets import dump_svmlight_file, make_classification

    from leantrain.storage import write_bytes

    x, y = make_classification(n_samples=n, n_features=40, n_informative=15, n_redundant=10, flip_y=0.05,
                               class_sep=0.8, random_state=seed)
    buf = io.BytesIO()
    dump_svmlight_file(x, y, buf, zero_based=False)
    return write_bytes(path, buf.getvalue())


def _seed_stats(values: list[float | None]) -> tuple[float | None, float | None, float | None]:
    """Mean, min and max over seeds (None if any seed did not reach the target)."""
    if not values or any(v is None for v in values):
        return None, None, None
    return float(np.mean(values)), float(min(values)), float(max(values))


@experiment(
    "pbqn-logreg",
    arxiv="1802.05374",
    title="PBQN on L2 logistic regression: passes to (F-F*)/F* <= 1e-4 against a fair full-batch L-BFGS",
    claim="Progressive-batching L-BFGS reaches the reference suboptimality in fewer passes over the data than "
          "full-batch L-BFGS, and competes with (tuned) SGD.",
    quick_minutes=1.5,
)
def run_logreg(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    quick = profile == "quick"
    svm = write_libsvm_file(out / "classification.svm", seed, n=20_000 if quick else 50_000)
    datasets = {"breast_cancer": "breast_cancer", "synthlogreg (n=100000)": "synthlogreg", "LIBSVM file": str(svm)}
    seeds = list(range(seed, seed + 5))
    max_passes = 40.0 if quick else 80.0
    sgd_passes = 3.0 if quick else 15.0
    metrics: dict = {"datasets": {}, "seeds": seeds}
    claims, rows = [], []
    plots = []
    fig_b, ax_b = subplots(figsize=(6.4, 4.2))
    for label, ds in datasets.items():
        ref = reference_optimum(make_problem("logreg", ds, device=device))
        fstar = ref["objective"]
        target = fstar * (1 + TIGHT)
        stop = lambda rec, f=target: rec["objective"] <= f
        mk = lambda ds=ds: make_problem("logreg", ds, device=device)
        lbfgs = run_lbfgs(mk(), max_passes=max_passes, stop=stop)
        pbqn_runs = [run_pbqn(mk(), max_passes=max_passes, seed=s, stop=stop, records_per_pass=20) for s in seeds]
        plain = run_pbqn(mk(), max_passes=max_passes, seed=seed, stop=stop, records_per_pass=20, debias=False)
        sgd = tune_sgd(mk(), max_passes=sgd_passes, seed=seed, records_per_pass=5)
        per_seed = [t.passes_to(target) for t in pbqn_runs]
        lb = lbfgs.passes_to(target)
        mean, lo, hi = _seed_stats(per_seed)
        margin = None if mean is None or lb is None else lb - mean
        wins = sum(1 for v in per_seed if v is not None and lb is not None and v < lb)
        pb = pbqn_runs[0]
        sizes = pb.info["batch_sizes"]
        ax_b.plot(range(1, len(sizes) + 1), sizes, label=label)
        name = label.split(" ")[0].lower()
        traces = {f"PBQN (seed {seed})": pb, "PBQN, plain test": plain, "L-BFGS (torch, strong Wolfe)": lbfgs,
                  "SGD (tuned)": sgd}
        curves(out / f"suboptimality_{name}.png",
               {m: (t.series("passes"), [max(r["objective"] - fstar, 1e-16) for r in t.records]) for m, t in traces.items()},
               xlabel="effective passes over the data", ylabel="F - F*", logy=True,
               title=f"logistic regression, {label}")
        plots.append(f"suboptimality_{name}.png")
        counters = pb.counters
        loose = {m: t.passes_to(fstar * (1 + LOOSE)) for m, t in traces.items()}
        metrics["datasets"][label] = {
            "optimum": fstar, "optimum_grad_norm": ref["grad_norm"], "lbfgs_passes": lb,
            "pbqn_passes_per_seed": dict(zip(map(str, seeds), per_seed)), "pbqn_mean": mean, "pbqn_min": lo,
            "pbqn_max": hi, "margin_passes": margin, "seeds_won": wins,
            "plain_test_passes": plain.passes_to(target), "passes_to_loose": loose,
            "lbfgs_stopped": lbfgs.stopped, "lbfgs_info": lbfgs.info,
            "batch_sizes": sizes, "pbqn_counters": counters,
            "sgd_grid": sgd.info["grid"], "sgd_lr": sgd.info.get("lr"),
            "alpha0_accepted_fraction": counters["alpha0_accepted"] / max(1, counters["iterations"]),
            "skip_fraction": counters["pairs_skipped"] / max(1, counters["pairs_skipped"] + counters["pairs_stored"]),
            "histories": {m: t.records for m, t in traces.items()},
        }
        claims.append(Claim(
            f"{label}: PBQN reaches (F-F*)/F* <= {TIGHT:g} in fewer passes than full-batch L-BFGS (torch, strong Wolfe, "
            "default budget)",
            "not recovered (paper's figures)",
            f"PBQN {_fmt(mean)} (seeds {', '.join(_fmt(v) for v in per_seed)}; range {_fmt(lo)}-{_fmt(hi)}) vs L-BFGS "
            f"{_fmt(lb)} passes; margin {_fmt(margin)}; {wins}/{len(seeds)} seeds fewer",
            "mean over 5 seeds strictly below L-BFGS's passes (deterministic run), every seed reaching the target; "
            "passes counted exactly (one closure or line-search evaluation over the full data = one pass)",
            mean is not None and lb is not None and mean < lb))
        pl, sl = loose[f"PBQN (seed {seed})"], loose["SGD (tuned)"]
        claims.append(Claim(
            f"{label}: PBQN competes with tuned SGD: reaches (F-F*)/F* <= {LOOSE:g} within 2x SGD's passes",
            "not recovered", f"PBQN {_fmt(pl)} vs SGD {_fmt(sl)} passes",
            "PBQN passes <= 2 x SGD passes, or SGD does not reach it (competitive, not a win)",
            pl is not None and (sl is None or pl <= 2 * sl)))
        rows.append([label, pb.info.get("initial_batch"), sizes[-1], f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]", _fmt(lb),
                     _fmt(margin), f"{wins}/{len(seeds)}", _fmt(plain.passes_to(target)), _fmt(loose["SGD (tuned)"]),
                     f"{metrics['datasets'][label]['alpha0_accepted_fraction']:.2f}",
                     f"{metrics['datasets'][label]['skip_fraction']:.2f}"])
    ax_b.set_xlabel("PBQN iteration")
    ax_b.set_ylabel("|S_k| (batch size)")
    ax_b.set_yscale("log")
    ax_b.set_title("PBQN batch-size schedule")
    ax_b.grid(alpha=0.3)
    ax_b.legend(fontsize=8)
    save_figure(fig_b, out / "batch_sizes.png")
    plots.append("batch_sizes.png")
    table = Table(f"passes to (F-F*)/F* <= {TIGHT:g}", ["data set", "|S_0|", "final |S_k|", "PBQN mean [min, max], 5 seeds",
                  "L-BFGS", "margin", "seeds won", "PBQN plain test", f"SGD to {LOOSE:g}", "alpha0 accepted",
                  "skipped pairs"], rows)
    notes = (
        "Passes = (sample gradients + sample loss evaluations) / n: a line-search trial on S_k costs |S_k| like a "
        "gradient (an upper bound). L-BFGS is torch.optim.LBFGS as its users configure it: lr 1, "
        "line_search_fn='strong_wolfe', torch's defaults (max_iter 20, max_eval 25, history 100, tolerance_grad 1e-7, "
        "tolerance_change 1e-9) with step(closure) in a loop; each closure call (full-data loss and gradient) is one pass "
        "and every call is recorded. PBQN defaults: |S_0| = 64, 25% overlap, theta = 0.9 (paper, unconfirmed), debiased "
        "g^T H g (default chosen from this experiment's ablation: the plain sample test passes at the noise floor, so its "
        "batch stops growing and it rarely reaches 1e-4), one enlargement at most 2x, the whole data set once the "
        "requested size reaches n/2, variances from 8 micro-batch gradients. "
        f"SGD: batch 32, step tuned over 0.01, 0.1, 1 by final training objective, {sgd_passes:g} passes.")
    return Result(metrics=metrics, claims=claims, plots=plots, tables=[table], notes=notes)


ADAM_GRID = (3e-4, 1e-3, 3e-3)
NN_SGD_GRID = (0.03, 0.1, 0.3)


def _tune(run, problem_for_seed, grid, **kwargs):
    """Run ``run(problem, lr=...)`` for each step in ``grid`` and keep the lowest final training objective."""
    best = None
    finals = {}
    for lr in grid:
        tr = run(problem_for_seed(), lr=lr, **kwargs)
        final = tr.final("objective")
        finals[str(lr)] = final
        if best is None or (np.isfinite(final) and final < best[0]):
            best = (final if np.isfinite(final) else np.inf, lr, tr)
    assert best is not None
    return best[1], best[2], finals


@experiment(
    "pbqn-nn",
    arxiv="1802.05374",
    title="PBQN on small networks (MLP on mnist1d, LeNet on digits, a BatchNorm ResNet in train mode): test accuracy "
          "at equal passes",
    claim="On neural networks PBQN's best test accuracy is competitive with tuned SGD and Adam at the same passes.",
    quick_minutes=2.0,
)
def run_nn(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    from leantrain.app.runs import run_sgd

    quick = profile == "quick"
    seeds = list(range(seed, seed + 5))
    passes = 6.0 if quick else 30.0
    batch = 64
    tol = 0.03
    nets = {"MLP on mnist1d": ("mlp", "mnist1d"), "LeNet on digits": ("cnn", "digits"),
            "BatchNorm ResNet-8 on digits (train mode)": ("bncnn", "digits")}
    metrics: dict = {"networks": {}, "seeds": seeds, "passes": passes, "batch_size": batch}
    claims, rows, plots = [], [], []
    for label, (kind, ds) in nets.items():
        def mk(s, kind=kind, ds=ds):
            return make_problem(kind, ds, seed=s, device=device)

        common = dict(max_passes=passes, batch_size=batch, records_per_pass=2)
        sgd_lr, sgd0, sgd_grid = _tune(run_sgd, lambda: mk(seed), NN_SGD_GRID, seed=seed, **common)
        adam_lr, adam0, adam_grid = _tune(run_adam, lambda: mk(seed), ADAM_GRID, seed=seed, **common)
        best: dict[str, list[float]] = {"PBQN": [], "PBQN (debiased test)": [], "SGD (tuned)": [], "Adam (tuned)": []}
        pbqn0 = deb0 = None
        for s in seeds:
            # networks use the paper's plain sample test (debias=False): within a few passes the debiased
            # test doubles the batch at nearly every iteration (docs/optim.md); the default is shown beside it
            pb = run_pbqn(mk(s), max_passes=passes, seed=s, batch_size=batch, records_per_pass=2, debias=False)
            db = run_pbqn(mk(s), max_passes=passes, seed=s, batch_size=batch, records_per_pass=2)
            sg = sgd0 if s == seed else run_sgd(mk(s), lr=sgd_lr, seed=s, **common)
            ad = adam0 if s == seed else run_adam(mk(s), lr=adam_lr, seed=s, **common)
            for m, t in (("PBQN", pb), ("PBQN (debiased test)", db), ("SGD (tuned)", sg), ("Adam (tuned)", ad)):
                best[m].append(max(t.series("test_accuracy")))
            if s == seed:
                pbqn0, deb0 = pb, db
        assert pbqn0 is not None and deb0 is not None
        traces = {"PBQN": pbqn0, "PBQN (debiased test)": deb0, "SGD (tuned)": sgd0, "Adam (tuned)": adam0}
        curves(out / f"test_accuracy_{kind}.png", {m: (t.series("passes"), t.series("test_accuracy"))
                                                   for m, t in traces.items()},
               xlabel="effective passes over the data", ylabel="test accuracy", title=f"{label}, seed {seed}")
        plots.append(f"test_accuracy_{kind}.png")
        mean = {m: float(np.mean(v)) for m, v in best.items()}
        sd = {m: float(np.std(v, ddof=1)) for m, v in best.items()}
        rival_name = max(("SGD (tuned)", "Adam (tuned)"), key=lambda m: mean[m])
        gaps = [p - r for p, r in zip(best["PBQN"], best[rival_name])]
        metrics["networks"][label] = {
            "best_test_accuracy_per_seed": {m: dict(zip(map(str, seeds), v)) for m, v in best.items()},
            "mean": mean, "std": sd, "rival": rival_name, "paired_gap_per_seed": dict(zip(map(str, seeds), gaps)),
            "sgd_lr": sgd_lr, "sgd_grid": sgd_grid, "adam_lr": adam_lr, "adam_grid": adam_grid,
            "pbqn_batch_sizes": pbqn0.info["batch_sizes"], "pbqn_counters": pbqn0.counters,
            "histories": {m: t.records for m, t in traces.items()}}
        claims.append(Claim(
            f"{label}: at {passes:g} passes PBQN's best test accuracy is within {tol:.2f} of the better of tuned SGD "
            "and Adam",
            "not recovered (Table 1 values; paper: 'competitive' on CIFAR-10 nets)",
            f"PBQN {mean['PBQN']:.4f} +- {sd['PBQN']:.4f} vs {rival_name} {mean[rival_name]:.4f} +- {sd[rival_name]:.4f}; "
            f"paired gaps {', '.join(f'{g:+.3f}' for g in gaps)}",
            f"mean over 5 seeds (paired by seed) PBQN >= rival - {tol:.2f}", mean["PBQN"] >= mean[rival_name] - tol))
        rows.append([label, *(f"{mean[m]:.4f} ± {sd[m]:.4f}" for m in best), f"{sgd_lr:g}", f"{adam_lr:g}",
                     pbqn0.info["batch_sizes"][-1]])
    table = Table(f"best test accuracy within {passes:g} passes (5 seeds)", ["network", "PBQN (paper's test)",
                  "PBQN (debiased test)", "SGD (tuned)", "Adam (tuned)", "SGD lr", "Adam lr", "final PBQN |S_k| (seed 0)"], rows)
    notes = (f"All three methods start from the same seeded weights at batch {batch} (PBQN's |S_0|, 25% overlap; SGD "
             f"and Adam's minibatch). SGD's step is tuned over {', '.join(map(str, NN_SGD_GRID))} and Adam's lr over "
             f"{', '.join(map(str, ADAM_GRID))} on the first seed by final training objective, then used for all seeds. "
             "'PBQN' runs the paper's plain inner-product test (debias=False); leantrain's default debiased test is "
             "shown beside it (on convex problems it is what reaches 1e-4, see pbqn-logreg; on networks within a few "
             "passes it grows the batch too fast). Passes count gradients and line-search evaluations alike. "
             "The BatchNorm ResNet trains in train() mode "
             "(batch statistics; PBQN's variance from 8 micro-batch gradients of one forward pass) and is evaluated in "
             "eval() mode. The paper's networks (CIFAR-10 CNNs, AlexNet-like, ResNet18, without BN/dropout) and its "
             "Table 1 values were not recovered.")
    return Result(metrics=metrics, claims=claims, plots=plots, tables=[table], notes=notes)


__all__ = ["run_logreg", "run_nn", "write_libsvm_file"]
