"""Per-step statistics and a Chrome-trace timeline of compute and communication (MLSL's Statistics).

Times are ``time.perf_counter()`` seconds. On Linux that clock is CLOCK_MONOTONIC, shared by every process of
one machine, so the ranks' spans line up in one trace; across machines each rank's clock is its own.

Definitions used by :class:`StepStats` (one training step, from the first forward to the end of the update):

- ``compute_s``: first forward call to the end of backward (forward + backward; communication started during
  backward overlaps this);
- ``comm_s``: length of the union of the step's ``[launch, completion]`` intervals of every collective (time
  the link was busy with this step's messages);
- ``exposed_comm_s``: how long the end of backward waited for the exchange, i.e. communication not hidden behind
  backward;
- ``update_s``: the optimizer step (with the distributed update: shard update + parameter all-gather);
- ``first_bucket_s``: from the end of backward to the completion of the highest-priority bucket (the
  parameters the next forward needs first);
- ``first_done_s``: from the first forward to that completion: when the next forward could start on the first
  layers, whatever share of the exchange ran during backward (what priority scheduling shortens).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BucketStats", "StepStats", "Timeline", "busy_time", "write_chrome_trace", "summarize"]


@dataclass
class BucketStats:
    """One bucket in one step: its size, the bytes this rank sent for it and its times relative to the step start."""

    index: int
    numel: int
    bytes_sent: int
    ready_s: float
    launch_s: float
    done_s: float


@dataclass
class StepStats:
    """Statistics of one step (see the module docstring for the definitions)."""

    step: int
    compute_s: float = 0.0
    comm_s: float = 0.0
    exposed_comm_s: float = 0.0
    update_s: float = 0.0
    step_s: float = 0.0
    first_bucket_s: float = 0.0
    first_done_s: float = 0.0
    bytes_sent: int = 0
    buckets: list[BucketStats] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end]`` intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def summarize(stats: list[StepStats], skip: int = 1) -> dict[str, float]:
    """Medians over steps (after ``skip`` warm-up steps) of the step statistics, plus bytes per step."""
    import statistics

    rows = stats[skip:] if len(stats) > skip else stats
    if not rows:
        return {}
    keys = ("compute_s", "comm_s", "exposed_comm_s", "update_s", "step_s", "first_bucket_s", "first_done_s")
    out = {k: statistics.median(getattr(r, k) for r in rows) for k in keys}
    out["bytes_sent"] = statistics.median(r.bytes_sent for r in rows)
    out["steps"] = len(rows)
    return out


class Timeline:
    """Spans (name, lane, start, end) of one rank; :meth:`chrome_events` renders them for chrome://tracing.

    Lanes are ``"compute"`` and ``"comm"`` (one row each per rank). Keeping at most ``max_events`` spans bounds
    memory on long runs (the oldest are dropped).
    """

    LANES = ("compute", "comm", "update")

    def __init__(self, rank: int = 0, *, enabled: bool = True, max_events: int = 200_000) -> None:
        self.rank, self.enabled, self.max_events = rank, enabled, max_events
        self.spans: list[tuple[str, str, float, float, dict[str, Any]]] = []

    def span(self, name: str, lane: str, start: float, end: float, **args: Any) -> None:
        if not self.enabled:
            return
        if len(self.spans) >= self.max_events:
            del self.spans[: len(self.spans) // 2]
        self.spans.append((name, lane, start, end, args))

    def chrome_events(self, origin: float | None = None) -> list[dict[str, Any]]:
        """Chrome trace-event dicts: complete events (``ph: X``) in microseconds, plus lane and rank names."""
        if origin is None:
            origin = min((s[2] for s in self.spans), default=time.perf_counter())
        pid = self.rank
        events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"rank {pid}"}}]
        for tid, lane in enumerate(self.LANES):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": lane}})
        for name, lane, s, e, args in self.spans:
            events.append({"name": name, "cat": lane, "ph": "X", "pid": pid, "tid": self.LANES.index(lane),
                           "ts": (s - origin) * 1e6, "dur": max(e - s, 0.0) * 1e6, "args": args})
        return events


def write_chrome_trace(path: str | os.PathLike, timelines: list[Timeline]) -> Path:
    """Write the ranks' timelines as one Chrome-trace JSON file (atomically); open it in chrome://tracing or Perfetto."""
    from leantrain.storage import write_text

    origin = min((s[2] for t in timelines for s in t.spans), default=0.0)
    events = [ev for t in timelines for ev in t.chrome_events(origin)]
    return write_text(path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}) + "\n")
