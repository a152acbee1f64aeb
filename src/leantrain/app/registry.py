"""Registries of reproduction experiments and benchmarks.

Capability packages only *add* entries: an experiment module in :mod:`leantrain.app.experiments`
or a benchmark module in :mod:`leantrain.app.bench` registers itself at import with
:func:`experiment` or :func:`benchmark`, and :func:`load_all` imports every module of those
packages. Nothing here knows the individual experiments.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Profile",
    "Claim",
    "Table",
    "Result",
    "Experiment",
    "Benchmark",
    "experiment",
    "benchmark",
    "experiments",
    "benchmarks",
    "load_all",
]

Profile = Literal["quick", "full"]
PROFILES: tuple[str, ...] = ("quick", "full")


@dataclass
class Claim:
    """One checked claim of a paper.

    ``paper`` is the paper's own number as text, or ``"not recovered"`` when the notes mark it
    unconfirmed (only unmarked numbers from the notes are shown as the paper's). ``ours`` is what
    this run measured; ``tolerance`` says in words what counts as agreement and why;
    ``passed`` is the verdict.

    ``per_seed`` (optional) maps a label (an arm, or the paired quantity the verdict uses, e.g.
    ``"LB/SB"``) to that quantity's value for each seed, in the experiment's seed order, so the report
    shows the seeds and not only their mean. ``seeds`` (optional) names those seeds.
    """

    text: str
    paper: str
    ours: str
    tolerance: str
    passed: bool
    per_seed: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for label, values in self.per_seed.items():
            if not isinstance(values, (list, tuple)):
                raise TypeError(f"per_seed[{label!r}] must be a list of per-seed values, got {type(values).__name__}")
            if self.seeds and len(values) != len(self.seeds):
                raise ValueError(f"per_seed[{label!r}] has {len(values)} values for {len(self.seeds)} seeds")


@dataclass
class Table:
    """A small table for the report: a title, column headers and rows of cells."""

    title: str
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Result:
    """What an experiment's ``run`` returns.

    ``metrics`` is free-form JSON-able data; ``plots`` are PNG file names relative to the
    experiment's output folder; ``claims`` are the checked claims; ``tables`` show the comparison
    with the paper; ``notes`` is Markdown shown under the experiment in the report. ``setting``
    (optional) puts the paper's setting beside ours: aspect (``"data"``, ``"model"``, ``"batch"``,
    ``"epochs"``, ...) -> ``(paper's, ours)``, shown as a table so that a reader sees how far the
    small-scale form is from the paper's.
    """

    metrics: dict[str, Any]
    claims: list[Claim] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: str = ""
    setting: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.claims)


RunFn = Callable[..., Result]


@dataclass(frozen=True)
class Experiment:
    """A registered reproduction: ``run(profile, out, seed, device) -> Result``."""

    name: str
    arxiv: str
    title: str
    claim: str
    run: RunFn
    quick_minutes: float = 1.0

    def __call__(self, profile: Profile, out: Path, seed: int = 0, device: str = "cpu") -> Result:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result = self.run(profile=profile, out=out, seed=seed, device=device)
        if not isinstance(result, Result):
            raise TypeError(f"experiment {self.name!r} returned {type(result).__name__}, not Result")
        return result


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: ``run(quick, device) -> dict`` (see :mod:`leantrain.app.bench`)."""

    name: str
    description: str
    run: Callable[..., dict[str, Any]]


_EXPERIMENTS: dict[str, Experiment] = {}
_BENCHMARKS: dict[str, Benchmark] = {}


def experiment(
    name: str, *, arxiv: str, title: str, claim: str, quick_minutes: float = 1.0, threads: int | None = None
) -> Callable[[RunFn], RunFn]:
    """Decorator registering ``fn(profile, out, seed, device) -> Result`` as an experiment.

    ``threads``: run with that many torch intra-op threads, restoring the caller's count afterwards (for
    latency-bound experiments, where a second thread on shared cores only waits, and whose reductions should
    not depend on the machine's thread count). None leaves the count alone.
    """

    def deco(fn: RunFn) -> RunFn:
        run = fn if threads is None else _with_threads(fn, threads)
        known = _EXPERIMENTS.get(name)
        if known is not None and getattr(known.run, "__wrapped__", known.run) is not fn:
            raise ValueError(f"experiment name {name!r} is registered twice")
        _EXPERIMENTS[name] = Experiment(name, arxiv, title, claim, run, quick_minutes)
        return run

    return deco


def _with_threads(fn: RunFn, threads: int) -> RunFn:
    import functools

    import torch

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return run


def benchmark(name: str, *, description: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Decorator registering ``fn(quick: bool, device: str) -> dict`` as a benchmark."""

    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in _BENCHMARKS and _BENCHMARKS[name].run is not fn:
            raise ValueError(f"benchmark name {name!r} is registered twice")
        _BENCHMARKS[name] = Benchmark(name, description, fn)
        return fn

    return deco


def _import_submodules(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def load_all() -> None:
    """Import every experiment and benchmark module so that they register."""
    _import_submodules("leantrain.app.experiments")
    _import_submodules("leantrain.app.bench")


def experiments() -> dict[str, Experiment]:
    """All registered experiments, by name (call :func:`load_all` first)."""
    return dict(_EXPERIMENTS)


def benchmarks() -> dict[str, Benchmark]:
    """All registered benchmarks, by name (call :func:`load_all` first)."""
    return dict(_BENCHMARKS)
