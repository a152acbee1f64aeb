"""CLI subcommands, one module each; :mod:`leantrain.cli` discovers them.

A module here defines ``register(subparsers) -> None`` that adds its subparser (with
:func:`add_common` for the shared options) and sets ``func=handler`` via ``set_defaults``. The
handler takes the parsed ``argparse.Namespace`` and returns an exit code.

Errors become one line on stderr, never a traceback: usage errors (``ValueError``, ``TypeError``,
:class:`leantrain.validation.UsageError`, a missing input file) exit 2; other operating-system
errors (a full disk, a permission refused) exit 1. Options that name where a command writes are
declared with :func:`declare_outputs`; the CLI checks them (:func:`check_output`) before the
command starts, so a bad location fails before any work is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from leantrain.storage import to_jsonable
from leantrain.validation import SEED_MAX, UsageError, int_arg

__all__ = ["add_common", "emit", "resolve_device", "declare_outputs", "check_output", "check_outputs", "key_value",
           "key_values"]


def add_common(parser: argparse.ArgumentParser, *, out: str | None = "results") -> None:
    """Add ``--seed``, ``--device``, ``--json`` and (unless ``out`` is None) ``--out``."""
    parser.add_argument("--seed", type=int_arg(0, SEED_MAX), default=0, help="random seed (default 0)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to compute (default cpu)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    if out is not None:
        parser.add_argument("--out", default=out, help=f"output directory (default {out})")
        declare_outputs(parser, out="dir")


def key_value(text: str) -> tuple[str, Any]:
    """Parse one ``KEY=VALUE`` (the ``--data-arg`` / ``--model-arg`` options, the MODEL-SPEC arguments).

    VALUE is read as JSON when it parses (``8`` -> 8, ``0.5`` -> 0.5, ``true`` -> True, ``[64,64]`` -> a list),
    else kept as the string. KEY must be a Python identifier (it becomes a keyword argument).
    Raises ``argparse.ArgumentTypeError`` (a ``ValueError``), so argparse reports it as a usage error.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a name, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def key_values(text: str, what: str = "arguments") -> dict[str, Any]:
    """Comma-separated ``KEY=VALUE`` items (``"width=8,depth=2"``) as a dict, each parsed by :func:`key_value`.

    For values read outside argparse: a bad item is a :class:`UsageError` (one line, exit status 2) naming ``what``.
    """
    try:
        return dict(key_value(item) for item in text.split(",") if item)
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"{what}: {err}") from None


def declare_outputs(parser: argparse.ArgumentParser, **kinds: str) -> None:
    """Declare options naming where the command writes: ``dest="dir"`` or ``dest="file"``.

    :func:`check_outputs` (called by the CLI before the command runs) checks each given one.
    """
    declared = dict(parser.get_default("outputs") or {})
    declared.update(kinds)
    parser.set_defaults(outputs=declared)


def check_output(path: str | os.PathLike, option: str, kind: str = "dir") -> Path:
    """Check, without creating anything, that ``path`` can be written as a ``kind`` ("dir"/"file").

    Refused with :class:`UsageError` naming ``option``: a directory path that is a file, a file
    path that is a directory, a path under a file, or a nearest existing folder this user may not
    write into.
    """
    p = Path(path).expanduser()
    if p.exists():
        if kind == "dir" and not p.is_dir():
            raise UsageError(f"{option} {str(path)!r} is a file, not a directory")
        if kind == "file" and p.is_dir():
            raise UsageError(f"{option} {str(path)!r} is a directory, not a file")
    folder = p if kind == "dir" else p.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UsageError(f"{option} {str(path)!r} cannot be created: {str(existing)!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(path)!r} cannot be written: no write permission in {str(existing)!r}")
    return p


def check_outputs(args: argparse.Namespace) -> None:
    """:func:`check_output` every output option declared with :func:`declare_outputs` and given a value.

    Skipped for ``--list`` (which writes nothing).
    """
    if getattr(args, "list", False):
        return
    for dest, kind in (getattr(args, "outputs", None) or {}).items():
        value = getattr(args, dest, None)
        if value:
            check_output(value, "--" + dest.replace("_", "-"), kind)


def resolve_device(name: str) -> str:
    """Check that the requested device exists here."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    return name


def emit(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text`` (or pretty JSON)."""
    if getattr(args, "json", False) or text is None:
        print(json.dumps(to_jsonable(data), indent=2))
    else:
        print(text)
    sys.stdout.flush()
