"""Atomic file writing: a reader never sees a half-written file.

Every writer here writes to a temporary file in the destination's directory, flushes and fsyncs
it, then ``os.replace``-s it over the destination. ``os.replace`` is atomic on POSIX and Windows
when source and destination are on the same file system, which the same-directory temporary
guarantees. A run killed at any point leaves either the previous file or the new one, never a mix;
the temporary file (``.<name>.<pid>.<random>.tmp``) is removed on any Python-level error. A
process killed outright (SIGKILL, power loss) cannot clean up; :func:`remove_stale_temporaries`
deletes such leftovers whose writing process no longer exists. Files are created with the
permissions ``open()`` would give them (umask-respecting), not ``mkstemp``'s ``0o600``.

Torch files (checkpoints) are safe to read and self-checking: :func:`save_torch` stores tensors
and plain data only, followed by a SHA-256 trailer; :func:`load_torch` verifies the checksum
(any changed byte is a ValueError naming the file) and unpickles with
``torch.load(weights_only=True)``, so a file cannot run code however it was made.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_bytes", "write_text", "write_json", "save_torch", "load_torch", "to_jsonable",
           "remove_stale_temporaries", "CHECKSUM_MAGIC", "folder_lock"]


def _file_mode(path: Path) -> int:
    """The mode a new file gets from ``open()`` under the current umask; an existing file keeps its own."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        pass
    mask = os.umask(0)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename).

    The file gets the permissions a plain ``open(path, "w")`` would give it (``0o666`` minus the
    umask), or keeps those of the file it replaces; ``mkstemp``'s private ``0o600`` is not kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename != str(path):
            # a full disk fails in write/fsync with no file name: name the destination
            raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from exc
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


#: ``.<name>.<pid>.<8 random characters of mkstemp>.tmp``: the only names cleanup ever deletes.
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete ``folder``'s temporary files left by killed writers (their pid is gone); returns them.

    Only regular files named exactly like this module's temporaries
    (``.<name>.<pid>.<8 characters>.tmp``) are touched, and only when process ``<pid>`` no longer
    exists on this machine, so a concurrent writer's file is safe. (On a folder shared between
    machines a pid says nothing about another machine's processes: do not run writers from two
    machines into one folder.)
    """
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(".*.tmp"):
        m = _TEMPORARY.match(tmp.name)
        if m is None or not tmp.is_file() or tmp.is_symlink():
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder/.leantrain.lock`` while the block runs; refuse if another holds it.

    ``fcntl.flock`` on POSIX: the kernel releases the lock when its holder exits, however it dies
    (SIGKILL included), so a lock is never stale. A second holder gets ``BlockingIOError`` at once
    (not a wait), naming ``what`` holds it (the lock file records the holder's pid). Where
    ``fcntl`` does not exist (Windows) the block runs unlocked.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".leantrain.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode(path))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            raise BlockingIOError(errno.EWOULDBLOCK, f"another {what} (pid {holder}) is writing into this folder; "
                                  "wait for it to finish or choose another output folder", str(folder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


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


#: The trailer of a leantrain torch file: 8 magic bytes, then the SHA-256 of everything before them.
CHECKSUM_MAGIC = b"LTSHA256"
_TRAILER = len(CHECKSUM_MAGIC) + 32

#: Leaf types a torch file of ours may hold: what ``torch.load(weights_only=True)`` reads back
#: without any allow-listing. Containers: dict, OrderedDict, list, tuple, torch.Size.
_LEAVES = (str, bytes, int, float, bool, complex, type(None))


def _plain(obj: Any, where: str) -> Any:
    """``obj`` as tensors and plain data; numpy scalars become the equal Python number, anything else is refused."""
    import collections

    import numpy as np

    if isinstance(obj, (torch.Tensor, torch.dtype, torch.device, torch.Size)) or type(obj) in _LEAVES:
        return obj
    if isinstance(obj, np.generic) and not isinstance(obj, (np.void, np.object_)):
        return obj.item()  # the same value as a Python number/bool/str; numpy's pickle needs allow-listing
    if isinstance(obj, dict):
        items = [(_plain(k, f"{where} key"), _plain(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        return collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) else dict(items)
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"save_torch stores tensors and plain data only (dict, list, tuple, str, numbers, bool, None); "
                    f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: convert it first")


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, followed by a SHA-256 trailer.

    ``obj`` must be tensors and plain data (see :func:`load_torch`); numpy scalars are stored as
    the equal Python numbers; anything else is a TypeError naming where it sits, raised before any
    byte is written. The file is ``torch.save``'s zip
    archive followed by ``CHECKSUM_MAGIC`` and the 32-byte SHA-256 of the archive; a plain
    ``torch.load(path, weights_only=True)`` still reads it (zip readers ignore trailing bytes).
    """
    obj = _plain(obj, "payload")
    buf = io.BytesIO()
    torch.save(obj, buf)
    body = buf.getvalue()
    return write_bytes(path, body + CHECKSUM_MAGIC + hashlib.sha256(body).digest())


def load_torch(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by :func:`save_torch`, verifying it first; never runs code from the file.

    Raises ValueError naming the file when it is missing, is not a leantrain torch file (no
    checksum trailer: written by something else, or truncated), fails its SHA-256 check (any
    changed byte: a bit flip, a partial copy), or holds anything but tensors and plain data (it is
    read with ``torch.load(weights_only=True)``, which refuses to unpickle other objects, so a
    payload such as ``os.system`` is never called).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"checkpoint file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    body, magic, digest = raw[:-_TRAILER], raw[-_TRAILER:-32], raw[-32:]
    if len(raw) < _TRAILER or magic != CHECKSUM_MAGIC:
        raise ValueError(f"checkpoint file {str(path)!r} has no leantrain checksum trailer: it is damaged, truncated, "
                         "or was not written by leantrain.storage.save_torch; refusing to load it")
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt: its SHA-256 checksum does not match its "
                         "contents (changed or damaged bytes)")
    try:
        return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; keep only the line naming what was refused.
        lines = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        what = f" ({lines[0]})" if lines else ""
        raise ValueError(f"checkpoint file {str(path)!r} holds Python objects other than tensors and plain data"
                         f"{what}; refusing to unpickle them") from exc
    except Exception as exc:  # zip/format errors have many types
        raise ValueError(f"checkpoint file {str(path)!r} is not a readable torch file: {exc}") from exc
