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

from leantrain.optim.problems import make_problem, reference_optimum
from leantrain.optim.runs import run_adam, run_lbfgs, run_pbqn, tune_sgd
from leantrain.plots import curves, plt, save_figure
from leantrain.registry import Claim, Result, Table, experiment

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


@experiment(
    "pbqn-logreg",
    arxiv="1802.05374",
    title="PBQN on L2 logistic regression: suboptimality vs passes over the data",
    claim="Progressive-batching L-BFGS reaches the reference suboptimality in fewer passes over the data than "
          "full-batch L-BFGS, and competes with (tuned) SGD.",
    quick_minutes=1.0,
)
def run_logreg(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    quick = profile == "quick"
    svm = write_libsvm_file(out / "classification.svm", seed, n=20_000 if quick else 50_000)
    datasets = {"breast_cancer": "breast_cancer", "synthlogreg (n=100000)": "synthlogreg", "LIBSVM file": str(svm)}
    max_passes = 30.0 if quick else 60.0
    sgd_passes = 3.0 if quick else 15.0
    plain_passes = 3.0 if quick else 30.0
    metrics: dict = {"datasets": {}}
    claims, rows = [], []
    plots = []
    fig_b, ax_b = plt.subplots(figsize=(6.4, 4.2))
    for label, ds in datasets.items():
        ref = reference_optimum(make_problem("logreg", ds, device=device))
        fstar = ref["objective"]
        stop = lambda rec, f=fstar: rec["objective"] - f <= 1e-7 * abs(f)
        pbqn = dict(seed=seed, stop=stop, records_per_pass=20)
        traces = {
            "PBQN (MB)": run_pbqn(make_problem("logreg", ds, device=device), max_passes=max_passes, **pbqn),
            "PBQN (FO)": run_pbqn(make_problem("logreg", ds, device=device), max_passes=max_passes,
                                  curvature="full-overlap", **pbqn),
            "PBQN (plain sample test)": run_pbqn(make_problem("logreg", ds, device=device), max_passes=plain_passes,
                                                 debias=False, **pbqn),
            "L-BFGS (full batch)": run_lbfgs(make_problem("logreg", ds, device=device), max_passes=max_passes, stop=stop),
            "SGD (tuned)": tune_sgd(make_problem("logreg", ds, device=device), max_passes=sgd_passes, seed=seed,
                                    records_per_pass=5),
        }
        tight = {m: t.passes_to(fstar * (1 + TIGHT)) for m, t in traces.items()}
        loose = {m: t.passes_to(fstar * (1 + LOOSE)) for m, t in traces.items()}
        pb = traces["PBQN (MB)"]
        sizes = pb.info["batch_sizes"]
        ax_b.plot(range(1, len(sizes) + 1), sizes, label=label)
        name = label.split(" ")[0].lower()
        curves(out / f"suboptimality_{name}.png",
               {m: (t.series("passes"), [max(r["objective"] - fstar, 1e-16) for r in t.records]) for m, t in traces.items()},
               xlabel="effective passes over the data", ylabel="F - F*", logy=True,
               title=f"logistic regression, {label}")
        plots.append(f"suboptimality_{name}.png")
        counters = pb.counters
        metrics["datasets"][label] = {
            "optimum": fstar, "optimum_grad_norm": ref["grad_norm"], "passes_to_tight": tight, "passes_to_loose": loose,
            "batch_sizes": sizes, "pbqn_counters": counters, "pbqn_fo_counters": traces["PBQN (FO)"].counters,
            "sgd_grid": traces["SGD (tuned)"].info["grid"], "sgd_lr": traces["SGD (tuned)"].info.get("lr"),
            "alpha0_accepted_fraction": counters["alpha0_accepted"] / max(1, counters["iterations"]),
            "skip_fraction": counters["pairs_skipped"] / max(1, counters["pairs_skipped"] + counters["pairs_stored"]),
            "final_test_accuracy": {m: t.final("test_accuracy") for m, t in traces.items()},
            "histories": {m: t.records for m, t in traces.items()},
        }
        pbqn_t, lbfgs_t = tight["PBQN (MB)"], tight["L-BFGS (full batch)"]
        claims.append(Claim(
            f"{label}: PBQN reaches (F-F*)/F* <= {TIGHT:g} in fewer passes than full-batch L-BFGS",
            "not recovered (paper's figures)", f"PBQN {_fmt(pbqn_t)} vs L-BFGS {_fmt(lbfgs_t)} passes",
            "strictly fewer passes (no slack: passes are counted exactly, one line-search evaluation = one pass)",
            pbqn_t is not None and (lbfgs_t is None or pbqn_t < lbfgs_t)))
        pl, sl = loose["PBQN (MB)"], loose["SGD (tuned)"]
        claims.append(Claim(
            f"{label}: PBQN competes with tuned SGD: reaches (F-F*)/F* <= {LOOSE:g} within 2x SGD's passes",
            "not recovered", f"PBQN {_fmt(pl)} vs SGD {_fmt(sl)} passes",
            "PBQN passes <= 2 x SGD passes, or SGD does not reach it (competitive, not a win)",
            pl is not None and (sl is None or pl <= 2 * sl)))
        plain = traces["PBQN (plain sample test)"]
        rows.append([label, pb.info.get("initial_batch"), sizes[-1], _fmt(tight["PBQN (MB)"]), _fmt(tight["PBQN (FO)"]),
                     _fmt(lbfgs_t), _fmt(tight["SGD (tuned)"]), _fmt(loose["PBQN (MB)"]), _fmt(sl),
                     f"{(plain.final('objective') - fstar) / fstar:.1e} @ {plain.final('passes'):.0f} passes",
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
    table = Table("passes to reach the relative suboptimality", ["data set", "|S_0|", "final |S_k|", f"PBQN MB {TIGHT:g}",
                  f"PBQN FO {TIGHT:g}", f"L-BFGS {TIGHT:g}", f"SGD {TIGHT:g}", f"PBQN {LOOSE:g}", f"SGD {LOOSE:g}",
                  "plain test: rel. subopt.", "alpha0 accepted", "skipped pairs"], rows)
    notes = (
        "Passes = (sample gradients + sample loss evaluations) / n: a line-search trial on S_k costs |S_k| like a "
        "gradient (an upper bound), per-sample gradients for the variance estimates are the gradients of those samples "
        "(counted once), full overlap pays its extra gradient. L-BFGS counts one pass per objective+gradient "
        "evaluation. The paper's 8 data sets, its figures and its SVRG baseline were not recovered; "
        "the paper's theta = 0.9 is used (unconfirmed). PBQN's sample-size test uses a debiased estimate of "
        "g^T H g (see docs/optim.md: the plain sample test passes at the noise floor whenever the effective dimension "
        "of H Sigma exceeds 1/theta^2); the plain sample test (debias=False) is shown as an ablation "
        f"({plain_passes:g} passes: its batch stays small, so it takes many cheap iterations). "
        f"SGD: batch 32, step tuned over 0.01, 0.1, 1 by final training objective, {sgd_passes:g} passes.")
    return Result(metrics=metrics, claims=claims, plots=plots, tables=[table], notes=notes)


@experiment(
    "pbqn-nn",
    arxiv="1802.05374",
    title="PBQN on small networks (MLP on mnist1d, LeNet on digits): test accuracy vs passes",
    claim="On neural networks (no batch norm, no dropout) PBQN's best test accuracy is competitive with SGD and Adam.",
    quick_minutes=0.8,
)
def run_nn(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    quick = profile == "quick"
    seeds = [seed] if quick else list(range(seed, seed + 5))
    passes = 8.0 if quick else 30.0
    nets = {"MLP on mnist1d": ("mlp", "mnist1d"), "LeNet on digits": ("cnn", "digits")}
    metrics: dict = {"networks": {}}
    claims, rows, plots = [], [], []
    for label, (kind, ds) in nets.items():
        best: dict[str, list[float]] = {"PBQN": [], "PBQN (plain sample test)": [], "SGD (tuned)": [], "Adam": []}
        curves_acc = {}
        for s in seeds:
            def mk(kind=kind, ds=ds, s=s):
                return make_problem(kind, ds, seed=s, device=device)

            traces = {
                "PBQN": run_pbqn(mk(), max_passes=passes, seed=s, batch_size=128),
                "PBQN (plain sample test)": run_pbqn(mk(), max_passes=passes, seed=s, batch_size=128, debias=False),
                "SGD (tuned)": tune_sgd(mk(), grid=(0.03, 0.1, 0.3), max_passes=passes, seed=s, records_per_pass=2),
                "Adam": run_adam(mk(), max_passes=passes, seed=s, records_per_pass=2),
            }
            for m, t in traces.items():
                best[m].append(max(t.series("test_accuracy")))
            if s == seed:
                curves_acc = {m: (t.series("passes"), t.series("test_accuracy")) for m, t in traces.items()}
                metrics["networks"][label] = {"histories": {m: t.records for m, t in traces.items()},
                                              "pbqn_batch_sizes": traces["PBQN"].info["batch_sizes"],
                                              "pbqn_counters": traces["PBQN"].counters}
        name = kind
        curves(out / f"test_accuracy_{name}.png", curves_acc, xlabel="effective passes over the data",
               ylabel="test accuracy", title=label)
        plots.append(f"test_accuracy_{name}.png")
        mean = {m: float(np.mean(v)) for m, v in best.items()}
        sd = {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in best.items()}
        metrics["networks"][label].update(best_test_accuracy=best, mean=mean, std=sd)
        rival = max(mean["SGD (tuned)"], mean["Adam"])
        tol = 0.03 if quick else max(0.02, 2 * max(sd.values()))
        claims.append(Claim(
            f"{label}: PBQN's best test accuracy is within {tol:.3f} of the better of SGD and Adam",
            "not recovered (Table 1 values)", f"PBQN {mean['PBQN']:.4f} vs best rival {rival:.4f}",
            f"PBQN >= rival - {tol:.3f} ({'one seed: about the seed-to-seed spread' if quick else '2 std over 5 seeds'})",
            mean["PBQN"] >= rival - tol))
        rows.append([label, len(seeds), *(f"{mean[m]:.4f} ± {sd[m]:.4f}" for m in best),
                     metrics["networks"][label]["pbqn_batch_sizes"][-1]])
    table = Table(f"best test accuracy within {passes:g} passes", ["network", "seeds", "PBQN", "PBQN (plain test)",
                                                                   "SGD (tuned)", "Adam", "final PBQN |S_k|"], rows)
    notes = ("'PBQN' is leantrain's default (debiased estimate of g^T H g in the sample-size test); 'plain sample "
             "test' is the paper's practical test as reconstructed (debias=False), shown as an ablation. "
             "The paper's networks (CIFAR-10 CNNs, AlexNet-like, ResNet18) and its Table 1 values were not recovered; "
             "this runs the same comparison at CPU scale. PBQN starts at |S_0| = 128 with 25% overlap; SGD batch 32 with "
             "its step tuned over 0.03, 0.1, 0.3 by final training objective; Adam lr 1e-3, batch 32. "
             f"{'Quick profile: one seed.' if quick else 'Five seeds.'}")
    return Result(metrics=metrics, claims=claims, plots=plots, tables=[table], notes=notes)


__all__ = ["run_logreg", "run_nn", "write_libsvm_file"]
