"""Shared machinery of the precision experiments (bf16-*, dfp16-vision): one training run under a
policy, checkpointed and memoized, and the FP32-spread parity test.

Runs are keyed by everything that determines them (experiment setting, policy, seed, epochs, ...),
memoized within the process (so ``bf16-vision`` and ``dfp16-vision``, which train the same CNN with
the same seeds and hyper-parameters, share their FP32 and DFP16 runs instead of repeating them) and
checkpointed atomically through :func:`leantrain.train.fit`, so an interrupted experiment resumes.
The checkpoint's file name carries :func:`leantrain.app.provenance.run_key` of the run's whole
configuration (the policy's every field, the model's structure, the data's bytes, the
hyper-parameters) and of the source of the code it runs (:data:`CODE_MODULES`), so a run cached by
other code or another configuration is never resumed as if it were this one.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy import stats
from torch import nn

from leantrain.app.provenance import run_key, tensor_digest
from leantrain.data import Split
from leantrain.plots import curves
from leantrain.precision import PrecisionHooks, Recorder, get_policy
from leantrain.precision.policy import Policy
from leantrain.train import History, accuracy_metric, fit

__all__ = ["RunResult", "train_run", "run_config", "parity", "Parity", "paired_values", "underflow_table", "mean_curve_plot",
           "wrapped_registers", "CODE_MODULES"]

#: The code a precision run depends on: its source is part of the checkpoint's key.
CODE_MODULES = ("leantrain.numerics", "leantrain.precision", "leantrain.train", "leantrain.models",
                "leantrain.storage", "leantrain.app.experiments._precision_training")


@dataclass
class RunResult:
    """One training run: its history, the recorder's summary and per-layer totals, skipped steps, time."""

    policy: str
    seed: int
    history: History
    summary: dict[str, dict[str, float]]
    totals: list[dict[str, Any]]
    skipped: int
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def final(self, key: str) -> float:
        return self.history.last(key)


_MEMO: dict[tuple, RunResult] = {}


def train_run(setting: str, build: Callable[[], nn.Module], policy: str | Policy, data: Split, *, seed: int, epochs: int,
              batch_size: int, lr: float, out: Path | None, device: str = "cpu", momentum: float = 0.9,
              optimizer: str = "sgd", loss_fn: Callable | None = None, metric: Callable | None = accuracy_metric,
              record_every: int = 5, max_steps: int | None = None) -> RunResult:
    """Train ``build()`` (seeded with ``seed``) under ``policy`` with :func:`fit` and a :class:`Recorder`.

    ``setting`` names the experiment setting (model, data, hyper-parameters) in the memo key and the
    checkpoint name; two calls with the same key return the same (memoized) result.
    """
    pol = get_policy(policy)
    torch.manual_seed(seed)
    model = build()
    config = run_config(setting, model, pol, data, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                        momentum=momentum, optimizer=optimizer, loss_fn=loss_fn, metric=metric,
                        record_every=record_every, max_steps=max_steps, device=device)
    key = run_key(config, CODE_MODULES)
    if key in _MEMO:
        return _MEMO[key]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    rec = Recorder(every=record_every, keep_rows=True)
    hooks = PrecisionHooks(pol, recorder=rec, seed=seed)
    ckpt = None
    if out is not None:
        ckpt = Path(out) / "runs" / f"{setting}-{pol.name}-s{seed}-e{epochs}-{key}.pt"
    t0 = time.perf_counter()
    hist = fit(model, opt, loss_fn or nn.functional.cross_entropy, data.train, test=data.test, epochs=epochs,
               batch_size=batch_size, seed=seed, device=device, hooks=hooks, checkpoint=ckpt,
               checkpoint_every=200 if ckpt else 0, resume=ckpt is not None, eval_train=False, metric=metric,
               max_steps=max_steps)
    res = RunResult(pol.name, seed, hist, rec.summary(), rec.totals(), hist.skipped_steps, time.perf_counter() - t0,
                    {"model": model, "recorder": rec, "scaler": hooks.scaler, "run_key": key})
    _MEMO[key] = res
    return res


def run_config(setting: str, model: nn.Module, policy: Policy, data: Split, **hyper: Any) -> dict[str, Any]:
    """Everything that determines a run, as JSON-able data: the setting's name, the model's structure
    (its ``repr``), every field of the policy, a digest of the data's tensors and the hyper-parameters
    (callables by qualified name)."""
    def name(v: Any) -> Any:
        return f"{v.__module__}.{v.__qualname__}" if callable(v) and hasattr(v, "__qualname__") else v

    return {"setting": setting, "model": repr(model), "policy": repr(policy),
            "data": tensor_digest([*data.train.tensors, *data.test.tensors]),
            **{k: name(v) for k, v in sorted(hyper.items())}}


@dataclass
class Parity:
    """Result of :func:`parity`: the gap, the tolerance and the verdict."""

    fp32_mean: float
    fp32_std: float
    mean: float
    delta: float
    tolerance: float
    passed: bool
    n_fp32: int
    n: int

    def tolerance_text(self, metric: str) -> str:
        t = stats.t.ppf(0.975, self.n_fp32 - 1) if self.n_fp32 > 1 else float("nan")
        return (f"|mean - FP32 mean| <= t(0.975, {self.n_fp32 - 1}) * s_FP32 * sqrt(1/{self.n_fp32} + 1/{self.n}) = "
                f"{t:.2f} * {self.fp32_std:.4f} * {math.sqrt(1 / self.n_fp32 + 1 / self.n):.3f} = {self.tolerance:.4f} "
                f"({metric}): the 95% prediction interval of the FP32 seed-to-seed spread, i.e. the gap a different "
                "FP32 seed could show")


def parity(fp32: Sequence[float], values: Sequence[float]) -> Parity:
    """Is the mean of ``values`` within the FP32 seed-to-seed spread of ``fp32``?

    Tolerance = ``t_{0.975, n-1} * s * sqrt(1/n + 1/k)`` with ``n = len(fp32)`` FP32 seeds of sample
    standard deviation ``s`` and ``k = len(values)`` runs of the candidate: the two-sided 95% prediction
    interval for the mean of ``k`` new draws from the FP32 run-to-run distribution. Needs ``n >= 2``.
    """
    if len(fp32) < 2 or not values:
        raise ValueError(f"parity needs >= 2 FP32 runs and >= 1 candidate run, got {len(fp32)} and {len(values)}")
    n, k = len(fp32), len(values)
    m32, s32 = statistics.mean(fp32), statistics.stdev(fp32)
    m = statistics.mean(values)
    tol = float(stats.t.ppf(0.975, n - 1)) * s32 * math.sqrt(1 / n + 1 / k)
    delta = m - m32
    return Parity(m32, s32, m, delta, tol, bool(abs(delta) <= tol and math.isfinite(m)), n, k)


def paired_values(values: dict[str, Sequence[float]], policy: str, reference: str = "fp32") -> dict[str, list[float]]:
    """A claim's per-seed values: ``reference``'s and ``policy``'s per seed and their paired differences (over
    the seeds both have; the runs of a seed share initialization and data order)."""
    ref, pol = list(values[reference]), list(values[policy])
    return {reference: ref, policy: pol, f"{policy} - {reference}": [b - a for a, b in zip(ref, pol)]}


def underflow_table(runs: dict[str, RunResult], tensor: str = "dy") -> list[list[Any]]:
    """Rows ``[policy, underflow fraction, subnormal fraction, overflow fraction, skipped steps]`` for ``tensor``."""
    rows = []
    for name, r in runs.items():
        s = r.summary.get(tensor)
        if s is None:
            rows.append([name, "not rounded", "not rounded", "not rounded", r.skipped])
        else:
            rows.append([name, f"{s['underflow_frac']:.3e}", f"{s['subnormal_frac']:.3e}", f"{s['overflow_frac']:.3e}",
                         r.skipped])
    return rows


def mean_curve_plot(path: Path, groups: dict[str, list[RunResult]], key: str, *, xlabel: str, ylabel: str,
                    title: str) -> Path:
    """Mean (and min-max band over seeds) of ``key`` per evaluation, one line per policy."""
    series, bands = {}, {}
    for name, runs in groups.items():
        ys = [r.history.series(key) for r in runs]
        n = min(len(y) for y in ys)
        x = [r["epoch"] for r in runs[0].history.evals[:n]]
        cols = list(zip(*(y[:n] for y in ys)))
        series[name] = (x, [statistics.mean(c) for c in cols])
        if len(runs) > 1:
            bands[name] = (x, [min(c) for c in cols], [max(c) for c in cols])
    return curves(path, series, xlabel=xlabel, ylabel=ylabel, title=title, bands=bands)


def wrapped_registers(run: RunResult) -> tuple[int, int]:
    """``(wrapped, recorded)`` integer-accumulator registers of a DFP run, summed over its three GEMMs (the
    recorder's ``acc_overflows`` and ``acc_sums``); ``(0, 0)`` for a run without integer GEMMs."""
    gemms = [run.summary[f"gemm:{g}"] for g in ("forward", "backward_data", "backward_weight")
             if f"gemm:{g}" in run.summary]
    return int(sum(s["acc_overflows"] for s in gemms)), int(sum(s["acc_sums"] for s in gemms))
