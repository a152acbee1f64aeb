"""The ``leantrain`` command line. Subcommands live in :mod:`leantrain.app.commands`, one module each."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    import leantrain.app.commands as commands
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
            importlib.import_module(f"leantrain.app.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    from leantrain.app.commands import check_outputs

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_outputs(args)  # fail before working
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"leantrain {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a permission refused, a path that changed under us
        print(f"leantrain {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"leantrain {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The error as one line; an OSError reads "<reason>: <file>" (its errno text and the file it names)."""
    if isinstance(exc, OSError) and exc.strerror:
        files = [f for f in (exc.filename, exc.filename2) if f]
        text = exc.strerror + "".join(f": {f!r}" if i == 0 else f" -> {f!r}" for i, f in enumerate(files))
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
