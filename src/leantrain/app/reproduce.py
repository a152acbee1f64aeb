"""Run registered experiments and record each one's result atomically.

For each experiment, :func:`run_experiments` creates ``OUT/<name>/``, runs it, and writes
``OUT/<name>/metrics.json`` through :func:`leantrain.storage.write_json` (temporary file +
rename), last of all. A record with ``"status": "complete"`` and the same profile and seed is what
``resume=True`` skips; an interrupted experiment has no record (or its previous one), never a
partial one.

One run at a time per output folder: :func:`run_experiments` holds an exclusive lock on
``OUT/.leantrain.lock`` (see :func:`leantrain.storage.folder_lock`); a second run into the same
``OUT`` is refused at once, naming the process that holds it, instead of repeating the work.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from leantrain import __version__
from leantrain.app.registry import Experiment, experiments, load_all
from leantrain.storage import folder_lock, remove_stale_temporaries, write_json

__all__ = ["run_experiments", "is_complete"]


def is_complete(out: Path, name: str, profile: str, seed: int) -> bool:
    """True when ``out/name/metrics.json`` records a complete run with this profile and seed."""
    import json

    path = Path(out) / name / "metrics.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return rec.get("status") == "complete" and rec.get("profile") == profile and rec.get("seed") == seed


def _command(name: str, profile: str, out: Path, seed: int, device: str) -> str:
    cmd = f"leantrain reproduce {name} --{profile} --out {out} --seed {seed}"
    return cmd + (f" --device {device}" if device != "cpu" else "")


def run_one(exp: Experiment, profile: str, out: Path, seed: int, device: str) -> dict[str, Any]:
    """Run one experiment and write its record; returns the record."""
    exp_out = Path(out) / exp.name
    exp_out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(exp_out)
    record: dict[str, Any] = {
        "name": exp.name, "arxiv": exp.arxiv, "title": exp.title, "claim": exp.claim,
        "profile": profile, "seed": seed, "device": device, "leantrain_version": __version__,
        "command": _command(exp.name, profile, Path(out), seed, device),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    t0 = time.perf_counter()
    try:
        result = exp(profile, exp_out, seed=seed, device=device)
    except KeyboardInterrupt:
        raise
    except Exception:
        record.update(status="error", passed=False, error=traceback.format_exc(),
                      wall_time_s=time.perf_counter() - t0, claims=[], tables=[], plots=[])
    else:
        missing = [p for p in result.plots if not (exp_out / p).is_file()]
        if missing:
            record.update(status="error", passed=False, error=f"experiment listed plots it did not write: {missing}",
                          wall_time_s=time.perf_counter() - t0, claims=[], tables=[], plots=[])
            record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
            _write_record(exp_out / "metrics.json", record)
            return record
        record.update(
            status="complete", passed=result.passed, wall_time_s=time.perf_counter() - t0,
            claims=[dataclasses.asdict(c) for c in result.claims],
            tables=[dataclasses.asdict(t) for t in result.tables],
            plots=list(result.plots), notes=result.notes, metrics=result.metrics,
            setting={k: list(v) for k, v in result.setting.items()},
        )
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    _write_record(exp_out / "metrics.json", record)
    return record


def _write_record(path: Path, record: dict[str, Any]) -> None:
    try:
        write_json(path, record)
    except OSError as exc:  # say what was lost, in one line, instead of a traceback after the work
        raise type(exc)(exc.errno, f"experiment {record['name']!r} ran (status {record['status']}) but its record "
                                   f"cannot be written ({exc.strerror or exc})", str(path)) from exc


def run_experiments(names: list[str] | None, profile: str, out: str | Path, *, seed: int = 0,
                    device: str = "cpu", resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Run ``names`` (all registered when empty/None); returns the records (skipped ones re-read)."""
    load_all()
    registry = experiments()
    names = list(names) if names else sorted(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; registered: {sorted(registry)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "leantrain reproduce"):
        return _run_all(names, registry, profile, out, seed, device, resume, progress)


def _run_all(names: list[str], registry: dict[str, Experiment], profile: str, out: Path, seed: int, device: str,
             resume: bool, progress: bool) -> list[dict[str, Any]]:
    import json

    records = []
    it = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="reproduce", unit="exp")
    for name in it:
        if progress:
            it.set_postfix_str(name)
        if resume and is_complete(out, name, profile, seed):
            records.append(json.loads((out / name / "metrics.json").read_text()))
            continue
        records.append(run_one(registry[name], profile, out, seed, device))
    return records
