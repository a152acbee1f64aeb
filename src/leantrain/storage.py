"""Atomic file writing: a reader never sees a half-written file.

Every writer here writes to a temporary file in the destination's directory, flushes and fsyncs
it, then ``os.replace``-s it over the destination. ``os.replace`` is atomic on POSIX and Windows
when source and destination are on the same file system, which the same-directory temporary
guarantees. A run killed at any point leaves either the previous file or the new one, never a mix;
the temporary file (``.<name>.<pid>.<random>.tmp``) is removed on any Python-level error. A
process killed outright (SIGKILL, power loss) cannot clean up; :func:`remove_stale_temporaries`
deletes such leftovers whose writing process no longer exists.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_bytes", "write_text", "write_json", "save_torch", "load_torch", "to_jsonable",
           "remove_stale_temporaries"]


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours, or the platform cannot tell: keep its file
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete ``folder``'s temporary files left by killed writers (their pid is gone); returns them.

    Only files named like this module's temporaries (``.<name>.<pid>.<random>.tmp``) are touched,
    and only when process ``<pid>`` no longer exists, so a concurrent writer's file is safe.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(".*.tmp"):
        parts = tmp.name.split(".")
        pid = next((int(p) for p in reversed(parts[:-2]) if p.isdigit()), None)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, paths and dataclasses into JSON-compatible values.

    Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` so the output is
    strict JSON (``json.dumps(..., allow_nan=False)`` accepts it).
    """
    import dataclasses

    import numpy as np

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Serialize ``obj`` (via :func:`to_jsonable`) and write it atomically as strict JSON."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)
    return write_text(path, text + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def load_torch(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by :func:`save_torch`; a missing or corrupt file raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # pickle/zip errors have many types
        raise ValueError(f"checkpoint file {str(path)!r} is not a readable torch file: {exc}") from exc
