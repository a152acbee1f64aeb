"""The ``leantrain`` command line. Subcommands live in :mod:`leantrain.commands`, one module each."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    import leantrain.commands as commands
    from leantrain import __version__

    parser = argparse.ArgumentParser(
        prog="leantrain",
        description="Train and deploy deep networks lean: low-precision training, low-bit inference, "
                    "second-order optimizers, scale-out, landscape diagnostics, risk-averse imitation.",
    )
    parser.add_argument("--version", action="version", version=f"leantrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"leantrain.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"leantrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leantrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
