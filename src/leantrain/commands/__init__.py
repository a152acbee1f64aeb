"""CLI subcommands, one module each; :mod:`leantrain.cli` discovers them.

A module here defines ``register(subparsers) -> None`` that adds its subparser (with
:func:`add_common` for the shared options) and sets ``func=handler`` via ``set_defaults``. The
handler takes the parsed ``argparse.Namespace`` and returns an exit code. Library errors
(ValueError/TypeError) are reported by the CLI as one clear line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from leantrain.storage import to_jsonable

__all__ = ["add_common", "emit", "resolve_device"]


def add_common(parser: argparse.ArgumentParser, *, out: str | None = "results") -> None:
    """Add ``--seed``, ``--device``, ``--json`` and (unless ``out`` is None) ``--out``."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to compute (default cpu)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    if out is not None:
        parser.add_argument("--out", default=out, help=f"output directory (default {out})")


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
