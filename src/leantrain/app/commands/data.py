"""``leantrain data``: what data sets are available offline, and their shapes."""

from __future__ import annotations

import argparse

from leantrain.app.commands import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list offline data sets and loaders",
                       description="Data sets that ship with leantrain's dependencies or are generated "
                                   "locally, and loaders for standard files on disk.")
    dsub = p.add_subparsers(dest="data_command", metavar="{list}")
    dsub.required = True
    lp = dsub.add_parser("list", help="list data sets with their shapes")
    lp.add_argument("--json", action="store_true", help="print machine-readable JSON")
    lp.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    from leantrain.data import catalog

    rows = catalog()
    lines = []
    for r in rows:
        if r["bundled"]:
            lines.append(f"{r['name']:<14} train {r['n_train']:>6}  test {r['n_test']:>6}  "
                         f"x {tuple(r['input_shape'])!s:<12} classes {r['num_classes']:<3} {r['description']}")
        else:
            lines.append(f"{r['name']:<14} (file loader)  {r['description']}")
    emit(args, rows, "\n".join(lines))
    return 0
