"""The reproduction report: every experiment beside the paper's own numbers, in HTML and Markdown.

:func:`write_report` reads ``DIR/<experiment>/metrics.json`` (written by
:func:`leantrain.app.reproduce.run_experiments`) and writes ``DIR/report.md`` and ``DIR/report.html``
atomically, so an interrupted run leaves the previous report intact.

:func:`update_readme` rewrites two generated blocks of README.md in place (atomically): the
table of reproduced claims between ``<!-- claims:start -->`` and ``<!-- claims:end -->``, and the
list of topic guides (``docs/*.md``) between ``<!-- docs:start -->`` and ``<!-- docs:end -->``.
Everything outside the markers is left byte for byte.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leantrain.storage import remove_stale_temporaries, write_text

__all__ = ["read_records", "per_seed_text", "SETTING_TITLE", "write_report", "render_markdown", "render_html",
           "report_document", "to_markdown", "to_html", "render_claims_table", "render_docs_index", "update_readme",
           "CLAIMS_MARKERS", "DOCS_MARKERS"]


def read_records(out: str | Path) -> list[dict[str, Any]]:
    """All ``metrics.json`` records under ``out``, sorted by experiment name.

    A file that cannot be read or parsed (our writes are atomic, so it was damaged or written by
    something else) is not dropped: it becomes an ``"error"`` record naming the file and the
    reason (``"unreadable": True``), so the report shows it as ERROR.
    """
    out = Path(out)
    records = []
    for path in sorted(out.glob("*/metrics.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rec, dict):
                raise ValueError(f"holds a JSON {type(rec).__name__}, not an object")
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            rec = {"name": path.parent.name, "status": "error", "passed": False, "unreadable": True,
                   "title": "unreadable results", "claims": [], "tables": [], "plots": [],
                   "error": f"results file {str(path)!r} is unreadable: {reason}"}
        rec.setdefault("name", path.parent.name)
        records.append(rec)
    return records


def _verdict(rec: dict[str, Any]) -> str:
    if rec.get("status") != "complete":
        return "ERROR"
    return "PASS" if rec.get("passed") else "FAIL"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def per_seed_text(claim: dict[str, Any]) -> str:
    """A claim's per-seed values as text, ``"label: v1, v2, v3; ..."`` (empty when it has none)."""
    per = claim.get("per_seed") or {}
    if not per:
        return ""
    seeds = claim.get("seeds") or []
    head = f"seeds {', '.join(map(str, seeds))}: " if seeds else ""
    return head + "; ".join(f"{label}: {', '.join(_cell(float(v)) if isinstance(v, (int, float)) else str(v) for v in vals)}"
                            for label, vals in per.items())


def _claim_rows(r: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of an experiment's claims table; the per-seed column only when a claim has seeds."""
    claims = r.get("claims", [])
    with_seeds = any(c.get("per_seed") for c in claims)
    headers = ["claim", "paper", "ours"] + (["per seed"] if with_seeds else []) + ["tolerance", "pass"]
    rows = [[c["text"], c["paper"], c["ours"]] + ([per_seed_text(c)] if with_seeds else [])
            + [c["tolerance"], "yes" if c["passed"] else "NO"] for c in claims]
    return headers, rows


def _setting_rows(r: dict[str, Any]) -> list[list[Any]]:
    return [[aspect, *pair] for aspect, pair in (r.get("setting") or {}).items()]


SETTING_TITLE = "The paper's setting beside ours"


# -- the report as a document: one model, two writers ----------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """Inline text; ``style`` is ``""`` (plain), ``"code"``, ``"strong"`` or ``"em"``; ``href`` makes it a link."""

    text: str
    style: str = ""
    href: str = ""


@dataclass(frozen=True)
class Paragraph:
    spans: tuple[Span, ...]


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Caption:
    """The title of the table below it (bold in Markdown, ``<h3>`` in HTML)."""

    text: str


@dataclass(frozen=True)
class Table:
    headers: list[Any]
    rows: list[list[Any]]
    verdict_col: int | None = None  # HTML colours this column's PASS/yes cells green, the others red


@dataclass(frozen=True)
class Image:
    src: str
    alt: str


@dataclass(frozen=True)
class Preformatted:
    text: str


@dataclass(frozen=True)
class Notes:
    """Free text in Markdown paragraphs (blank-line separated), as an experiment wrote it."""

    text: str


@dataclass(frozen=True)
class Section:
    """One experiment's part of the report (``<section id=anchor>`` in HTML)."""

    anchor: str
    blocks: tuple[Any, ...]


TITLE = "leantrain reproduction report"


def _p(*parts: str | Span) -> Paragraph:
    return Paragraph(tuple(Span(x) if isinstance(x, str) else x for x in parts))


def report_document(records: list[dict[str, Any]]) -> list[Any]:
    """The report of ``records`` as a list of blocks, rendered by :func:`to_markdown` and :func:`to_html`."""
    doc: list[Any] = [Heading(1, TITLE),
                      _p("Each experiment reproduces a published claim at small scale. ", Span("Paper", "em"),
                         " shows the paper's own number where the method notes confirm it, else ",
                         Span("not recovered", "code"), ".")]
    summary = [[r["name"], f"arXiv:{r.get('arxiv', '')}", r.get("profile", ""), _verdict(r),
                f"{sum(c['passed'] for c in r.get('claims', []))}/{len(r.get('claims', []))}",
                f"{r.get('wall_time_s', 0):.1f}"] for r in records]
    doc.append(Table(["experiment", "paper", "profile", "verdict", "claims passed", "wall time (s)"], summary, 3))
    for r in records:
        ax = str(r.get("arxiv", ""))
        blocks: list[Any] = [
            Heading(2, f"{r['name']}: {r.get('title', '')}"),
            _p("Paper: ", Span(f"arXiv:{ax}", href=f"https://arxiv.org/abs/{ax}"), f". Claim: {r.get('claim', '')}"),
            _p("Verdict: ", Span(_verdict(r), "strong"), ". Profile ", Span(str(r.get("profile")), "code"),
               f", seed {r.get('seed')}, wall time {r.get('wall_time_s', 0):.1f} s. Rerun: ",
               Span(str(r.get("command", "")), "code"))]
        if r.get("status") != "complete":
            blocks.append(Preformatted(str(r.get("error", "")).strip()))
        else:
            if r.get("setting"):
                blocks += [Caption(SETTING_TITLE), Table(["", "paper", "ours"], _setting_rows(r))]
            if r.get("claims"):
                headers, rows = _claim_rows(r)
                blocks.append(Table(headers, rows, len(headers) - 1))
            for t in r.get("tables", []):
                blocks += [Caption(t["title"]), Table(t["headers"], t["rows"])]
            blocks += [Image(f"{r['name']}/{p}", p) for p in r.get("plots", [])]
            if r.get("notes"):
                blocks.append(Notes(r["notes"].strip()))
        doc.append(Section(r["name"], tuple(blocks)))
    return doc


def _md_span(s: Span) -> str:
    text = {"code": "`{}`", "strong": "**{}**", "em": "*{}*"}.get(s.style, "{}").format(s.text)
    return f"[{text}]({s.href})" if s.href else text


def _md_table(headers: list[Any], rows: list[list[Any]]) -> str:
    esc = lambda s: _cell(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_block(b: Any) -> str:
    if isinstance(b, Section):
        return "\n\n".join(_md_block(x) for x in b.blocks)
    if isinstance(b, Heading):
        return "#" * b.level + " " + b.text
    if isinstance(b, Paragraph):
        return "".join(_md_span(s) for s in b.spans)
    if isinstance(b, Caption):
        return f"**{b.text}**"
    if isinstance(b, Table):
        return _md_table(b.headers, b.rows)
    if isinstance(b, Image):
        return f"![{b.alt}]({b.src})"
    if isinstance(b, Preformatted):
        return f"```\n{b.text}\n```"
    if isinstance(b, Notes):
        return b.text.strip()
    raise TypeError(f"not a report block: {type(b).__name__}")


def to_markdown(doc: list[Any]) -> str:
    """Markdown of a :func:`report_document` (blocks separated by one blank line)."""
    return "\n\n".join(_md_block(b) for b in doc) + "\n"


def _html_span(s: Span) -> str:
    text = html.escape(s.text)
    tag = {"code": "code", "strong": "strong", "em": "em"}.get(s.style)
    if tag:
        text = f"<{tag}>{text}</{tag}>"
    return f"<a href='{html.escape(s.href)}'>{text}</a>" if s.href else text


def _html_table(t: Table) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in t.headers) + "</tr></thead><tbody>"]
    for row in t.rows:
        cells = []
        for i, c in enumerate(row):
            cls = ""
            if i == t.verdict_col:
                cls = " class='pass'" if str(c) in ("PASS", "yes") else " class='fail'"
            cells.append(f"<td{cls}>{html.escape(_cell(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _html_block(b: Any) -> str:
    if isinstance(b, Section):
        return "\n".join([f"<section id='{html.escape(b.anchor)}'>", *(_html_block(x) for x in b.blocks), "</section>"])
    if isinstance(b, Heading):
        return f"<h{b.level}>{html.escape(b.text)}</h{b.level}>"
    if isinstance(b, Paragraph):
        return "<p>" + "".join(_html_span(s) for s in b.spans) + "</p>"
    if isinstance(b, Caption):
        return f"<h3>{html.escape(b.text)}</h3>"
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Image):
        return f"<div><img src='{html.escape(b.src)}' alt='{html.escape(b.alt)}'></div>"
    if isinstance(b, Preformatted):
        return f"<pre>{html.escape(b.text)}</pre>"
    if isinstance(b, Notes):
        return "".join(f"<p>{html.escape(par)}</p>" for par in b.text.strip().split("\n\n"))
    raise TypeError(f"not a report block: {type(b).__name__}")


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.pass { background: #e3f6e3; font-weight: bold; } td.fail { background: #fbe3e3; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
code, pre { background: #f6f6f6; } pre { padding: 0.6em; overflow-x: auto; }
section { border-top: 2px solid #ddd; margin-top: 2em; }
"""


def to_html(doc: list[Any]) -> str:
    """One self-contained HTML page of a :func:`report_document` (plots linked relatively)."""
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(TITLE)}</title>\n"
            f"<style>{_CSS}</style></head><body>")
    return "\n".join([head, *(_html_block(b) for b in doc), "</body></html>"]) + "\n"


def render_markdown(records: list[dict[str, Any]]) -> str:
    """The Markdown report of ``records``."""
    return to_markdown(report_document(records))


def render_html(records: list[dict[str, Any]]) -> str:
    """The HTML report of ``records`` (one self-contained page; plots linked relatively)."""
    return to_html(report_document(records))


def write_report(out: str | Path) -> tuple[Path, Path]:
    """Write ``out/report.md`` and ``out/report.html`` from the records under ``out``."""
    out = Path(out)
    remove_stale_temporaries(out)  # leftovers of a killed earlier run
    records = read_records(out)
    md = write_text(out / "report.md", render_markdown(records))
    ht = write_text(out / "report.html", render_html(records))
    return md, ht


CLAIMS_MARKERS = ("<!-- claims:start -->", "<!-- claims:end -->")
DOCS_MARKERS = ("<!-- docs:start -->", "<!-- docs:end -->")


def render_claims_table(records: list[dict[str, Any]], *, report_link: str = "results/report.md") -> str:
    """Markdown table with one row per checked claim: experiment, paper, claim, paper's figure, ours, verdict."""
    rows = []
    for r in records:
        ax = r.get("arxiv", "")
        paper = f"[{ax}](https://arxiv.org/abs/{ax})" if ax else ""
        if r.get("status") != "complete":
            rows.append([f"`{r['name']}`", paper, r.get("claim", ""), "", "run failed", "", "ERROR", r.get("profile", "")])
            continue
        for c in r.get("claims", []):
            rows.append([f"`{r['name']}`", paper, c["text"], c["paper"], c["ours"], c["tolerance"],
                         "pass" if c["passed"] else "**FAIL**", r.get("profile", "")])
    if not rows:
        return "_No results yet: run `make run` (or `leantrain reproduce --quick`), then `leantrain report --readme README.md`._"
    n_pass = sum(row[6] == "pass" for row in rows)
    head = (f"{n_pass} of {len(rows)} checked claims hold at our scale. Generated from `results/*/metrics.json` by "
            f"`leantrain report --readme README.md`; details, plots and rerun commands in [{report_link}]({report_link}).")
    return head + "\n\n" + _md_table(["experiment", "paper", "claim", "paper's figure", "ours", "tolerance", "verdict",
                                        "profile"], rows)


def render_docs_index(docs: str | Path) -> str:
    """A Markdown list linking every ``docs/*.md`` with its first heading as the title."""
    docs = Path(docs)
    items = []
    for path in sorted(docs.glob("*.md")):
        title = path.stem
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("# "):
                title = line[2:].strip()
                break
        items.append(f"- [{title}]({docs.name}/{path.name})")
    return "\n".join(items) if items else "_No topic guides yet._"


def _replace_block(text: str, markers: tuple[str, str], body: str, where: str) -> str:
    start, end = markers
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"{where} must contain the markers {start} ... {end} (in that order)")
    return text[: i + len(start)] + "\n" + body.strip() + "\n" + text[j:]


def update_readme(readme: str | Path, results: str | Path, *, docs: str | Path | None = None) -> Path:
    """Rewrite the claims block (from ``results``) and, when its markers are present, the docs block.

    ``docs`` defaults to the ``docs`` folder beside the README. Raises ValueError naming the file
    when it is missing or lacks the claims markers.
    """
    readme = Path(readme)
    if not readme.is_file():
        raise ValueError(f"README file {str(readme)!r} does not exist")
    text = readme.read_text(encoding="utf-8")
    results = Path(results)
    try:
        link = results.resolve().relative_to(readme.parent.resolve()).as_posix() + "/report.md"
    except ValueError:
        link = (results / "report.md").as_posix()
    new = _replace_block(text, CLAIMS_MARKERS, render_claims_table(read_records(results), report_link=link),
                         f"README file {str(readme)!r}")
    if DOCS_MARKERS[0] in new:
        new = _replace_block(new, DOCS_MARKERS, render_docs_index(docs or readme.parent / "docs"),
                             f"README file {str(readme)!r}")
    if new != text:
        write_text(readme, new)
    return readme
