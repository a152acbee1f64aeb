"""Identity of a cached run: a hash of its configuration and of the code it depends on.

A cached training run (a checkpoint an experiment reuses instead of retraining) is valid only for
the configuration *and* the code that produced it: a change to a rounding routine or to the
training loop must not silently reuse a run trained by the old code. :func:`run_key` hashes both:

    run_key(config, modules) = sha256( json(config, sorted keys) || leantrain.__version__ ||
                                        code_digest(modules) )[:16]

where :func:`code_digest` is the sha256 of the source files of ``modules`` (a package contributes
every ``*.py`` file below it), each as its path relative to the package root followed by its bytes,
in sorted path order. Editing, adding or removing a source file of a dependency therefore changes
the key; so does any setting in ``config``. The key is meant for file names (``<name>-<key>.pt``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["code_digest", "run_key", "tensor_digest", "KEY_LENGTH"]

#: Hex digits of a run key: 64 bits, far beyond the handful of runs an output folder holds.
KEY_LENGTH = 16


def _source_files(module_name: str) -> list[tuple[str, Path]]:
    module = importlib.import_module(module_name)
    paths = getattr(module, "__path__", None)
    if paths:  # a package: every source file below it
        files = []
        for root in paths:
            root = Path(root)
            files += [(f"{module_name}/{p.relative_to(root).as_posix()}", p) for p in root.rglob("*.py")]
        return sorted(files)
    file = getattr(module, "__file__", None)
    if file is None:
        raise ValueError(f"module {module_name!r} has no source file to hash")
    return [(f"{module_name}.py", Path(file))]


@cache
def _digest(names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        for rel, path in _source_files(name):
            h.update(rel.encode())
            h.update(b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def code_digest(modules: Iterable[str]) -> str:
    """sha256 (hex) of the source files of ``modules`` (dotted names; packages include all their files).

    Computed once per process and set of modules (sources do not change under a running process).
    """
    names = tuple(sorted(set(modules)))
    if not names:
        raise ValueError("modules must name at least one module")
    return _digest(names)


def tensor_digest(tensors: Iterable[Any]) -> str:
    """sha256 (hex) of tensors' dtypes, shapes and bytes (CPU copies): the identity of a data set in a run key."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        t = torch.as_tensor(t).detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_key(config: Any, modules: Iterable[str]) -> str:
    """A :data:`KEY_LENGTH`-hex-digit key of ``config`` (JSON-able; non-JSON values by ``str``),
    the leantrain version and :func:`code_digest` of ``modules``."""
    from leantrain import __version__

    blob = json.dumps(config, sort_keys=True, default=str)
    h = hashlib.sha256()
    for part in (blob, __version__, code_digest(modules)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:KEY_LENGTH]
