"""``leantrain report``: rebuild the reproduction report (and the README's claims table) from saved results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leantrain.app.commands import declare_outputs, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild report.html/report.md (and README's claims table) from results",
                       description="Read OUT/<experiment>/metrics.json written by `leantrain reproduce`, rewrite "
                                   "OUT/report.html and OUT/report.md, and with --readme rewrite the block between "
                                   "<!-- claims:start --> and <!-- claims:end --> of that README (and the docs list "
                                   "between <!-- docs:start --> and <!-- docs:end -->). Runs no experiment.")
    p.add_argument("--out", default="results", help="results directory (default results)")
    p.add_argument("--readme", default=None, metavar="PATH", help="README.md whose generated blocks to rewrite")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    declare_outputs(p, out="dir", readme="file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leantrain.app.report import read_records, update_readme, write_report

    out = Path(args.out)
    if not out.is_dir():
        raise ValueError(f"results directory {str(out)!r} does not exist; run `leantrain reproduce --out {out}` first")
    md, ht = write_report(out)
    data = {"report_md": str(md), "report_html": str(ht), "experiments": len(read_records(out))}
    if args.readme:
        data["readme"] = str(update_readme(args.readme, out))
    text = f"report: {ht} and {md} ({data['experiments']} experiments)"
    unreadable = [r["error"] for r in read_records(out) if r.get("unreadable")]
    data["unreadable"] = unreadable
    if args.readme:
        text += f"\nREADME claims table rewritten: {data['readme']}"
    emit(args, data, text)
    for e in unreadable:  # shown as ERROR in the report; exit 1 so that a script notices
        print(f"leantrain report: warning: {e}", file=sys.stderr)
    return 1 if unreadable else 0
