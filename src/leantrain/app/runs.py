"""Run PBQN, DANCE and the baselines on a :class:`~leantrain.optim.problems.Problem` with one accounting.

Every runner returns a :class:`Trace`: one record per iteration (or per logging interval) with
``passes`` (effective passes over the training data, see :mod:`leantrain.optim.objective`),
``objective`` and ``grad_norm`` of the full training objective, ``test_accuracy``, ``wall_time``
(seconds of optimization, the logging evaluations excluded) and method-specific fields
(PBQN ``batch_size``; DANCE ``stage``, ``n``, ``cg_iterations``, communication counts).
``Trace.stopped`` says why the run ended: ``"budget"`` (pass or iteration budget spent),
``"stop"`` (the caller's ``stop`` rule, e.g. a tolerance, held) or ``"converged"`` (the method's
own end: DANCE's last stage passed its test, torch LBFGS met its tolerances).

Baselines:

- ``sgd``: plain minibatch SGD (batch 32 by default) with a step from a small grid
  (:func:`tune_sgd` keeps the step with the lowest final training objective);
- ``adam``: ``torch.optim.Adam`` (lr 1e-3, batch 32);
- ``lbfgs``: ``torch.optim.LBFGS`` on the full batch as its users configure it (strong-Wolfe line
  search, torch's default evaluation budget per ``step``); each closure call (objective and
  gradient over the full data) counts one pass;
- ``newton-cg``: DANCE's damped Newton-CG run on the full data from the start (``m_0 = N``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from leantrain.optim.dance import DANCE, shard_rows
from leantrain.optim.objective import WorkCounter
from leantrain.optim.pbqn import PBQN
from leantrain.optim.problems import Problem, make_problem
from leantrain.optim.sampler import ProgressiveSampler

__all__ = ["Trace", "run_pbqn", "run_dance", "compare_iterates", "run_newton_cg", "run_sgd", "run_adam", "tune_sgd", "run_lbfgs",
           "run_method", "run_dance_distributed", "METHODS", "SGD_GRID"]

METHODS = ("pbqn", "dance", "sgd", "adam", "lbfgs", "newton-cg")
SGD_GRID = (0.01, 0.1, 1.0)
Stop = Callable[[dict[str, Any]], bool]


@dataclass
class Trace:
    """The history of one run (see the module docstring)."""

    method: str
    records: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, list] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    iterates: list[torch.Tensor] | None = None
    stopped: str = "budget"

    def series(self, key: str) -> list[float]:
        return [r[key] for r in self.records if key in r]

    def final(self, key: str) -> float:
        return self.series(key)[-1]

    def passes_to(self, threshold: float, key: str = "objective") -> float | None:
        """Passes at the first record with ``record[key] <= threshold`` (None if never)."""
        for r in self.records:
            if r[key] <= threshold:
                return r["passes"]
        return None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("iterates")
        return d


class _Recorder:
    """Appends evaluated records to a trace while keeping the evaluation time off the clock."""

    def __init__(self, problem: Problem, trace: Trace, stop: Stop | None) -> None:
        self.problem, self.trace, self.stop = problem, trace, stop
        self.elapsed = 0.0
        self.t0 = time.perf_counter()

    def __call__(self, passes: float, **extra: Any) -> bool:
        """Record the current iterate; returns True when ``stop`` says the run may end."""
        self.elapsed += time.perf_counter() - self.t0
        rec = {"passes": passes, **self.problem.evaluate(), "wall_time": self.elapsed, **extra}
        self.trace.records.append(rec)
        done = bool(self.stop(rec)) if self.stop is not None else False
        self.t0 = time.perf_counter()
        return done


def run_pbqn(problem: Problem, *, max_passes: float = 20.0, max_iterations: int = 100_000, batch_size: int = 64,
             overlap: float = 0.25, seed: int = 0, stop: Stop | None = None, records_per_pass: float | None = None,
             **options: Any) -> Trace:
    """PBQN from the problem's current weights; ``options`` go to :class:`PBQN` (``curvature``,
    ``update``, ``test``, ``theta``, ...). Full-overlap pairs use a sampler without overlap.

    Every iteration is recorded, or with ``records_per_pass`` only iterations at least
    ``1/records_per_pass`` passes after the previous record (and the last one)."""
    counter = WorkCounter()
    fo = options.get("curvature") == "full-overlap"
    sampler = ProgressiveSampler(problem.n, batch_size, overlap=0.0 if fo else overlap, seed=seed)
    opt = PBQN(problem.parameters(), sampler, **options)
    trace = Trace("pbqn", info={"initial_batch": batch_size, "overlap": sampler.overlap, **opt.defaults})
    rec = _Recorder(problem, trace, stop)
    rec(0.0, batch_size=sampler.batch_size, iteration=0)
    last_recorded = 0.0
    for it in range(1, max_iterations + 1):
        rows = torch.as_tensor(sampler.next_batch(), device=problem.y_train.device)
        opt.step(problem.batch_loss(rows, counter=counter))
        last = opt.log[-1]
        passes = counter.passes(problem.n)
        final = passes >= max_passes or it == max_iterations
        if records_per_pass is None or final or passes - last_recorded >= 1.0 / records_per_pass:
            last_recorded = passes
            done = rec(passes, iteration=it, batch_size=last["batch_size"], alpha0=last["alpha0"], alpha=last["alpha"],
                       backtracks=last["backtracks"], pair=last["pair"])
            if done:
                trace.stopped = "stop"
                break
        if final:
            break
    trace.counters = {**opt.counters, **counter.as_dict()}
    trace.info["batch_sizes"] = [r["batch_size"] for r in opt.log]
    trace.weights = problem.weights() if problem.convex else None
    return trace


def run_dance(problem: Problem, *, initial_samples: int = 128, growth: float = 2.0, c: float | None = None,
              max_passes: float = 100.0, max_iterations: int = 10_000, seed: int = 0, stop: Stop | None = None,
              keep_iterates: bool = False, method: str = "dance", **options: Any) -> Trace:
    """DANCE from the problem's current weights on a seeded random order of the training data.

    ``c`` defaults to ``l2 * N`` (so the last stage is the problem itself; 1 when ``l2 = 0``).
    Under an initialized ``torch.distributed`` group each rank takes its strided shard; only
    rank 0 records. ``options`` go to :class:`DANCE`.
    """
    import torch.distributed as dist

    n = problem.n
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    c = (problem.l2 * n if problem.l2 > 0 else 1.0) if c is None else c
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(problem.y_train.device)
    closure = problem.batch_loss(order[shard_rows(n, rank, world).to(order.device)], l2=0.0)
    opt = DANCE(problem.parameters(), n, initial_samples=initial_samples, growth=growth, c=c, **options)
    trace = Trace(method, info={"c": c, "world_size": world, **opt.defaults, "initial_samples": opt.stage_size})
    trace.iterates = [problem.flat_weights().clone()] if keep_iterates else None
    rec = _Recorder(problem, trace, stop) if rank == 0 else None
    if rec is not None:
        rec(0.0, stage=0, n=opt.stage_size, cg_iterations=0, comm_rounds=0, comm_bytes=0)
    trace.info["cg_per_step"] = []
    for _ in range(max_iterations):
        opt.step(closure)
        trace.info["cg_per_step"].append((opt.counters["stages"], opt.counters["cg_iterations"]))
        if trace.iterates is not None:
            trace.iterates.append(problem.flat_weights().clone())
        last = opt.log[-1]
        cnt = opt.counters
        stop_now = False
        if rec is not None:
            stop_now = rec(opt.passes(), stage=last["stage"], n=last["n"], cg_iterations=cnt["cg_iterations"],
                           comm_rounds=cnt["comm_rounds"], comm_bytes=cnt["comm_bytes"])
        if world > 1 and stop is not None:  # every rank must take the same decision
            flag = torch.tensor([float(stop_now)], dtype=torch.float64)
            dist.broadcast(flag.to(problem.x_train.device), src=0)
            stop_now = bool(flag.item())
        if opt.done or stop_now or opt.passes() >= max_passes:
            trace.stopped = "converged" if opt.done else "stop" if stop_now else "budget"
            break
    trace.counters = {**opt.counters, "passes": opt.passes()}
    trace.info["stage_sizes"] = list(opt.state[opt._params[0]]["stage_sizes"])
    trace.info["log"] = opt.log
    trace.weights = problem.weights() if problem.convex else None
    return trace


def compare_iterates(a: Trace, b: Trace) -> dict[str, Any]:
    """Compare two DANCE runs kept with ``keep_iterates`` (e.g. 1 process and K processes).

    Different summation orders can flip a discrete decision (a CG iteration more or less) when a
    residual lands within rounding of its tolerance; from there on the runs legitimately differ
    by up to the optimization tolerance. Returns ``first_divergence`` (index of the first step
    whose stage or cumulative CG count differs, None if none), ``max_rel_before`` (largest relative
    iterate difference up to and including the iterate produced just before it), ``final_rel``
    (relative difference of the final iterates) and ``steps`` compared.
    """
    if a.iterates is None or b.iterates is None:
        raise ValueError("both traces need keep_iterates=True")
    ca, cb = a.info["cg_per_step"], b.info["cg_per_step"]
    first = next((i for i, (x, y) in enumerate(zip(ca, cb)) if x != y), None)
    if first is None and len(ca) != len(cb):
        first = min(len(ca), len(cb))
    upto = (min(len(a.iterates), len(b.iterates)) if first is None else first + 1)
    scale = max(float(w.abs().max()) for w in a.iterates) or 1.0
    before = max(float((x - y).abs().max()) for x, y in zip(a.iterates[:upto], b.iterates[:upto])) / scale
    final = float((a.iterates[-1] - b.iterates[-1]).abs().max()) / scale
    return {"first_divergence": first, "max_rel_before": before, "final_rel": final, "steps": upto}


def run_newton_cg(problem: Problem, **kwargs: Any) -> Trace:
    """Damped Newton-CG on the full data from the start (DANCE with ``m_0 = N``)."""
    return run_dance(problem, initial_samples=problem.n, method="newton-cg", **kwargs)


def _run_first_order(problem: Problem, method: str, optimizer: torch.optim.Optimizer, *, batch_size: int,
                     max_passes: float, seed: int, records_per_pass: float, stop: Stop | None) -> Trace:
    counter = WorkCounter()
    trace = Trace(method, info={"batch_size": batch_size, **{k: v for k, v in optimizer.defaults.items()
                                                              if isinstance(v, (int, float, str, bool))}})
    rec = _Recorder(problem, trace, stop)
    params = problem.parameters()
    gen = torch.Generator().manual_seed(seed)
    next_record = 1.0 / records_per_pass
    done = rec(0.0)
    diverged = False
    while not done and counter.passes(problem.n) < max_passes:
        perm = torch.randperm(problem.n, generator=gen)
        for lo in range(0, problem.n, batch_size):
            rows = perm[lo:lo + batch_size].to(problem.y_train.device)
            optimizer.zero_grad(set_to_none=True)
            loss = problem.batch_loss(rows, counter=counter).losses().mean()
            counter.gradients += len(rows)
            loss.backward()
            optimizer.step()
            passes = counter.passes(problem.n)
            if passes >= next_record - 1e-12 or passes >= max_passes:
                next_record += 1.0 / records_per_pass
                done = rec(passes)
                if not math.isfinite(trace.records[-1]["objective"]):
                    diverged = True
                    done = True
            if done or passes >= max_passes:
                break
    trace.counters = counter.as_dict()
    trace.info["diverged"] = diverged
    trace.stopped = "diverged" if diverged else "stop" if done else "budget"
    trace.weights = problem.weights() if problem.convex else None
    del params
    return trace


def run_sgd(problem: Problem, *, lr: float = 0.1, batch_size: int = 32, max_passes: float = 10.0, seed: int = 0,
            records_per_pass: float = 10.0, stop: Stop | None = None, momentum: float = 0.0) -> Trace:
    """Minibatch SGD with constant step ``lr`` (a fresh epoch permutation per pass)."""
    opt = torch.optim.SGD(problem.parameters(), lr=lr, momentum=momentum)
    return _run_first_order(problem, "sgd", opt, batch_size=batch_size, max_passes=max_passes, seed=seed,
                            records_per_pass=records_per_pass, stop=stop)


def run_adam(problem: Problem, *, lr: float = 1e-3, batch_size: int = 32, max_passes: float = 10.0, seed: int = 0,
             records_per_pass: float = 10.0, stop: Stop | None = None) -> Trace:
    """``torch.optim.Adam`` (default betas) with minibatches."""
    opt = torch.optim.Adam(problem.parameters(), lr=lr)
    return _run_first_order(problem, "adam", opt, batch_size=batch_size, max_passes=max_passes, seed=seed,
                            records_per_pass=records_per_pass, stop=stop)


def tune_sgd(problem: Problem, *, grid: Sequence[float] = SGD_GRID, **kwargs: Any) -> Trace:
    """Run SGD for each step in ``grid`` from the problem's current weights and keep the run with the
    lowest final training objective (diverged runs lose); the problem ends at that run's weights."""
    w0 = problem.flat_weights().clone()
    best: tuple[float, Trace, torch.Tensor] | None = None
    finals = {}
    for lr in grid:
        problem.set_flat_weights(w0)
        tr = run_sgd(problem, lr=lr, **kwargs)
        final = tr.final("objective")
        finals[lr] = final
        key = final if math.isfinite(final) else math.inf
        if best is None or key < best[0]:
            best = (key, tr, problem.flat_weights().clone())
    assert best is not None
    _, trace, w = best
    problem.set_flat_weights(w)
    trace.info["grid"] = {str(k): v for k, v in finals.items()}
    trace.info["lr"] = trace.info.get("lr")
    return trace


class _Stopped(Exception):
    """Raised inside torch's LBFGS closure to end a run when ``stop`` or the budget says so."""


def run_lbfgs(problem: Problem, *, max_passes: float = 100.0, history_size: int = 100, max_iter: int = 20,
              max_eval: int | None = None, max_iterations: int = 10_000, stop: Stop | None = None) -> Trace:
    """``torch.optim.LBFGS`` on the full batch, configured as its users do: ``lr=1``,
    ``line_search_fn="strong_wolfe"`` and torch's default budget per ``step(closure)`` call
    (``max_iter=20``, ``max_eval=max_iter * 5 // 4``, ``history_size=100``, ``tolerance_grad=1e-7``,
    ``tolerance_change=1e-9``), ``step`` called in a loop.

    Every closure call is one objective+gradient over the full data and is charged one pass, and
    every call is recorded (so ``passes_to`` is exact). The run ends with ``stopped="converged"``
    when a ``step`` returns after a single evaluation (torch's tolerances met), ``"stop"`` when
    ``stop`` says so, ``"budget"`` at ``max_passes``.
    """
    params = problem.parameters()
    counter = WorkCounter()
    objective = problem.batch_loss()
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, max_eval=max_eval, history_size=history_size,
                            line_search_fn="strong_wolfe")
    trace = Trace("lbfgs", info={"history_size": history_size, "line_search": "strong_wolfe", "max_iter": max_iter,
                                 "max_eval": opt.defaults["max_eval"], "tolerance_grad": opt.defaults["tolerance_grad"],
                                 "tolerance_change": opt.defaults["tolerance_change"]})
    rec = _Recorder(problem, trace, stop)
    rec(0.0, iteration=0)
    state = {"stopped": None}

    def closure() -> torch.Tensor:
        if state["stopped"] is not None:
            raise _Stopped
        counter.gradients += problem.n
        opt.zero_grad(set_to_none=True)
        loss = objective.losses().mean()
        loss.backward()
        done = rec(counter.passes(problem.n), evaluation=counter.gradients // problem.n)
        if done:
            state["stopped"] = "stop"
        elif counter.passes(problem.n) >= max_passes - 1e-12:
            state["stopped"] = "budget"
        return loss.detach()

    for _ in range(max_iterations):
        before = counter.gradients
        try:
            opt.step(closure)
        except _Stopped:
            pass
        if state["stopped"] is not None:
            break
        if counter.gradients - before <= problem.n:
            state["stopped"] = "converged"  # one evaluation: torch's tolerance_grad / tolerance_change met
            break
    trace.stopped = state["stopped"] or "budget"
    trace.counters = counter.as_dict()
    trace.weights = problem.weights() if problem.convex else None
    return trace


def run_method(method: str, problem: Problem, *, max_passes: float = 20.0, seed: int = 0, tol: float | None = None,
               stop: Stop | None = None, **kwargs: Any) -> Trace:
    """Dispatch by name: ``pbqn``, ``dance``, ``newton-cg``, ``sgd`` (tuned over :data:`SGD_GRID`),
    ``adam``, ``lbfgs``.

    ``tol``: stop as soon as a record's full-objective gradient norm ``||grad F(w)|| <= tol``
    (then ``trace.stopped == "tol"``); DANCE and Newton-CG also get it as ``final_gradient_tol``,
    so their last stage does not end at its statistical accuracy before it.
    """
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    met = {"tol": False}

    def rule(rec: dict[str, Any]) -> bool:
        user = bool(stop(rec)) if stop is not None else False
        if tol is not None and rec["grad_norm"] <= tol:
            met["tol"] = True
            return True
        return user

    if tol is not None and method in ("dance", "newton-cg"):
        kwargs.setdefault("final_gradient_tol", tol)
    if method == "pbqn":
        trace = run_pbqn(problem, max_passes=max_passes, seed=seed, stop=rule, **kwargs)
    elif method == "dance":
        trace = run_dance(problem, max_passes=max_passes, seed=seed, stop=rule, **kwargs)
    elif method == "newton-cg":
        trace = run_newton_cg(problem, max_passes=max_passes, seed=seed, stop=rule, **kwargs)
    elif method == "sgd":
        trace = tune_sgd(problem, max_passes=max_passes, seed=seed, stop=rule, **kwargs)
    elif method == "adam":
        trace = run_adam(problem, max_passes=max_passes, seed=seed, stop=rule, **kwargs)
    elif method == "lbfgs":
        trace = run_lbfgs(problem, max_passes=max_passes, stop=rule, **kwargs)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if met["tol"] and trace.stopped in ("stop", "converged"):
        trace.stopped = "tol"
    return trace


# -- distributed DANCE -------------------------------------------------------------------------

def _dance_rank(rank: int, world: int, spec: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    device = spec.get("device", "cpu")
    if str(device).startswith("cuda"):
        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    trace = run_dance(make_problem(**{**spec, "device": device}), **kwargs)
    return asdict(trace) if rank == 0 else None  # plain data crosses the process boundary


def run_dance_distributed(spec: dict[str, Any], nproc: int, *, timeout_s: float = 300.0, **kwargs: Any) -> Trace:
    """DANCE on ``nproc`` local processes (gloo on CPU, NCCL when ``spec["device"]`` is CUDA).

    ``spec`` are the keyword arguments of :func:`make_problem` (each rank builds the same problem
    and takes its shard); ``kwargs`` go to :func:`run_dance`. Rank 0's trace is returned. The processes
    are started by :func:`leantrain.distributed.spawn` and ended after ``timeout_s`` seconds
    (:class:`~leantrain.distributed.SpawnError`, a RuntimeError naming each rank's outcome).
    """
    from leantrain.distributed.launch import default_backend, spawn

    if int(nproc) != nproc or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = default_backend(spec.get("device", "cpu"))
    values = spawn(_dance_rank, int(nproc), (spec, kwargs), backend=backend, timeout_s=timeout_s,
                   collective_timeout_s=120.0)
    return Trace(**values[0])
