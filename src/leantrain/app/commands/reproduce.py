"""``leantrain reproduce``: run registered experiments and write the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from leantrain.app.commands import add_common, declare_outputs, emit, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="run paper-reproduction experiments and write the report",
                       description="Run registered experiments (all when none named), write "
                                   "OUT/<name>/metrics.json and plots, then OUT/report.html and OUT/report.md.")
    p.add_argument("names", nargs="*", help="experiments to run (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="profile", action="store_const", const="quick", help="quick profile (default)")
    g.add_argument("--full", dest="profile", action="store_const", const="full", help="full profile")
    p.set_defaults(profile="quick")
    p.add_argument("--list", action="store_true", help="list registered experiments and exit")
    p.add_argument("--resume", action="store_true", help="skip experiments whose results are complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--readme", default=None, metavar="PATH",
                   help="also rewrite the claims table of this README (see `leantrain report`)")
    add_common(p, out="results")
    declare_outputs(p, readme="file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leantrain.app.registry import experiments, load_all

    if args.list:
        load_all()
        rows = [{"name": e.name, "arxiv": e.arxiv, "title": e.title, "claim": e.claim,
                 "quick_minutes": e.quick_minutes} for e in sorted(experiments().values(), key=lambda e: e.name)]
        text = "\n".join(f"{r['name']:<26} arXiv:{r['arxiv']:<11} {r['title']}" for r in rows)
        emit(args, rows, text)
        return 0
    from leantrain.app.report import write_report
    from leantrain.app.reproduce import run_experiments

    device = resolve_device(args.device)
    if args.readme and not Path(args.readme).is_file():
        raise ValueError(f"--readme file {args.readme!r} does not exist")
    records = run_experiments(args.names, args.profile, args.out, seed=args.seed, device=device,
                              resume=args.resume, progress=not args.no_progress)
    md, ht = write_report(args.out)
    if args.readme:
        from leantrain.app.report import update_readme

        update_readme(args.readme, args.out)
    summary = [{"name": r["name"], "status": r["status"], "passed": r.get("passed"),
                "wall_time_s": r.get("wall_time_s")} for r in records]
    text = "\n".join(f"{s['name']:<26} {'ERROR' if s['status'] != 'complete' else ('PASS' if s['passed'] else 'FAIL'):<6}"
                     f" {s['wall_time_s']:.1f}s" for s in summary) + f"\nreport: {ht} and {md}"
    emit(args, {"experiments": summary, "report_html": str(ht), "report_md": str(md)}, text)
    return 0 if all(s["status"] == "complete" for s in summary) else 1
