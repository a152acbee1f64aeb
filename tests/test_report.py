"""Reproduction records and reports: atomic writes, killed runs, --resume, the README claims table."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from leantrain.app import registry
from leantrain.app.registry import Claim, Result, Table
from leantrain.app.report import write_report
from leantrain.app.reproduce import is_complete, run_experiments
from leantrain.cli import main
from leantrain.storage import remove_stale_temporaries, write_json, write_text


@pytest.fixture()
def fake_experiments():
    """Two tiny registered experiments (removed again afterwards) and a log of their runs."""
    calls = []

    def make(name, passed, fail_with=None):
        @registry.experiment(name, arxiv="0000.00000", title=f"fake {name}", claim="a fake claim", quick_minutes=0.01)
        def run(profile, out, seed=0, device="cpu"):
            calls.append((name, profile, seed))
            if fail_with is not None:
                raise fail_with
            from leantrain.plots import curves

            curves(out / "curve.png", {"ours": ([0, 1, 2], [1.0, 0.5, 0.25])}, xlabel="step", ylabel="loss")
            return Result(metrics={"value": 0.25, "profile": profile},
                          claims=[Claim("value is small", "0.3", "0.25", "<= 0.3", passed)],
                          plots=["curve.png"], tables=[Table("numbers", ["a", "b"], [[1, 2.5]])], notes="fake notes")
        return run

    make("zz-fake-pass", True)
    make("zz-fake-fail", False)
    yield calls
    for name in ("zz-fake-pass", "zz-fake-fail", "zz-fake-error", "zz-fake-interrupted"):
        registry._EXPERIMENTS.pop(name, None)


def test_reproduce_writes_records_plots_and_report(tmp_path, fake_experiments, capsys):
    code = main(["reproduce", "zz-fake-pass", "zz-fake-fail", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    rec = json.loads((tmp_path / "zz-fake-pass" / "metrics.json").read_text())
    assert rec["status"] == "complete" and rec["passed"] is True and rec["metrics"]["value"] == 0.25
    assert rec["command"].startswith("leantrain reproduce zz-fake-pass --quick")
    assert (tmp_path / "zz-fake-pass" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    for text in (md, html):
        assert "zz-fake-pass" in text and "zz-fake-fail" in text and "fake notes" in text
        assert "zz-fake-pass/curve.png" in text and "leantrain reproduce zz-fake-fail" in text
    assert "| value is small | 0.3 | 0.25 | <= 0.3 | NO |" in md
    assert "PASS" in md and "FAIL" in md
    assert html.rstrip().endswith("</html>")


def test_resume_skips_complete_experiments_only(tmp_path, fake_experiments):
    run_experiments(["zz-fake-pass", "zz-fake-fail"], "quick", tmp_path, progress=False)
    assert len(fake_experiments) == 2
    before = (tmp_path / "zz-fake-pass" / "metrics.json").read_text()
    run_experiments(["zz-fake-pass", "zz-fake-fail"], "quick", tmp_path, resume=True, progress=False)
    assert len(fake_experiments) == 2  # both complete: nothing re-run
    assert (tmp_path / "zz-fake-pass" / "metrics.json").read_text() == before
    run_experiments(["zz-fake-pass"], "quick", tmp_path, seed=1, resume=True, progress=False)
    assert fake_experiments[-1] == ("zz-fake-pass", "quick", 1)  # another seed is not "complete"
    # a record with an error, or a torn file, is not complete either
    registry.experiment("zz-fake-error", arxiv="0", title="t", claim="c")(
        lambda profile, out, seed=0, device="cpu": 1 / 0)
    recs = run_experiments(["zz-fake-error"], "quick", tmp_path, progress=False)
    assert recs[0]["status"] == "error" and "ZeroDivisionError" in recs[0]["error"]
    assert not is_complete(tmp_path, "zz-fake-error", "quick", 0)
    (tmp_path / "zz-fake-fail" / "metrics.json").write_text('{"status": "compl')
    assert not is_complete(tmp_path, "zz-fake-fail", "quick", 0)
    n = len(fake_experiments)
    run_experiments(["zz-fake-fail"], "quick", tmp_path, resume=True, progress=False)
    assert len(fake_experiments) == n + 1


def test_cli_resume_flag(tmp_path, fake_experiments, capsys):
    assert main(["reproduce", "zz-fake-pass", "--out", str(tmp_path), "--no-progress"]) == 0
    assert main(["reproduce", "zz-fake-pass", "--out", str(tmp_path), "--no-progress", "--resume"]) == 0
    assert len(fake_experiments) == 1


def test_interrupted_experiment_keeps_its_previous_record(tmp_path, fake_experiments):
    run_experiments(["zz-fake-pass"], "quick", tmp_path, progress=False)
    before = (tmp_path / "zz-fake-pass" / "metrics.json").read_text()
    registry._EXPERIMENTS.pop("zz-fake-pass")
    registry.experiment("zz-fake-pass", arxiv="0", title="t", claim="c")(
        lambda profile, out, seed=0, device="cpu": (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_experiments(["zz-fake-pass"], "quick", tmp_path, progress=False)
    assert (tmp_path / "zz-fake-pass" / "metrics.json").read_text() == before


def _tmp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_failed_report_write_leaves_previous_report(tmp_path, fake_experiments, monkeypatch):
    run_experiments(["zz-fake-pass"], "quick", tmp_path, progress=False)
    write_report(tmp_path)
    old_md, old_html = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    run_experiments(["zz-fake-fail"], "quick", tmp_path, progress=False)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "report.md").read_text() == old_md
    assert (tmp_path / "report.html").read_text() == old_html
    assert _tmp_files(tmp_path) == []  # the temporary file was removed
    write_report(tmp_path)
    assert "zz-fake-fail" in (tmp_path / "report.md").read_text()


def test_killed_report_write_leaves_previous_report(tmp_path):
    """SIGKILL in the middle of writing (after the data, before the rename): the old report survives."""
    write_json(tmp_path / "a" / "metrics.json", {"name": "a", "status": "complete", "passed": True, "claims": [],
                                                "title": "first", "wall_time_s": 1.0})
    write_report(tmp_path)
    old_md, old_html = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    write_json(tmp_path / "b" / "metrics.json", {"name": "b", "status": "complete", "passed": True, "claims": [],
                                                "title": "second", "wall_time_s": 1.0})
    script = textwrap.dedent(f"""
        import os, signal
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)   # die with the data written, unrenamed
        from leantrain.app.report import write_report
        write_report({str(tmp_path)!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    assert (tmp_path / "report.md").read_text() == old_md
    assert (tmp_path / "report.html").read_text() == old_html
    leftovers = _tmp_files(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".report.md.")  # SIGKILL cannot clean up
    write_report(tmp_path)  # the next run removes the dead writer's leftover
    assert _tmp_files(tmp_path) == []
    assert "second" in (tmp_path / "report.md").read_text()


def test_stale_temporaries_of_live_processes_are_kept(tmp_path):
    live = tmp_path / f".x.json.{os.getppid()}.abc_1234.tmp"
    live.write_text("in progress")
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    dead = tmp_path / f".x.json.{dead_pid}.abc_1234.tmp"
    dead.write_text("left over")
    other = tmp_path / "notes.tmp"
    other.write_text("not ours")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and other.exists()
    write_text(tmp_path / "y.txt", "ok")
    assert (tmp_path / "y.txt").read_text() == "ok" and not list(tmp_path.glob(".y.txt.*"))


README = """# Project

intro text that must survive

<!-- docs:start -->
old docs
<!-- docs:end -->

## Claims

<!-- claims:start -->
stale table
<!-- claims:end -->

footer stays
"""


def test_readme_claims_table_regenerates_from_results(tmp_path, fake_experiments, capsys):
    results = tmp_path / "results"
    run_experiments(["zz-fake-pass", "zz-fake-fail"], "quick", results, progress=False)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "topic.md").write_text("# A topic guide\n\ntext\n")
    readme = tmp_path / "README.md"
    readme.write_text(README)
    code = main(["report", "--out", str(results), "--readme", str(readme)])
    assert code == 0
    text = readme.read_text()
    assert text.startswith("# Project\n\nintro text that must survive\n") and text.endswith("footer stays\n")
    assert "stale table" not in text and "old docs" not in text
    assert "- [A topic guide](docs/topic.md)" in text
    block = text[text.index("<!-- claims:start -->"):text.index("<!-- claims:end -->")]
    rows = [line for line in block.splitlines() if line.startswith("| `zz-fake")]
    assert len(rows) == 2
    assert "| value is small | 0.3 | 0.25 | <= 0.3 | **FAIL** | quick |" in rows[0]  # zz-fake-fail sorts first
    assert "1 of 2 checked claims hold" in block and "(results/report.md)" in block
    again = readme.read_text()
    main(["report", "--out", str(results), "--readme", str(readme)])
    assert readme.read_text() == again  # idempotent
    assert (results / "report.html").is_file()


def test_readme_without_markers_or_results_is_a_clear_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    (tmp_path / "results").mkdir()
    assert main(["report", "--out", str(tmp_path / "results"), "--readme", str(readme)]) == 2
    assert "claims:start" in capsys.readouterr().err
    assert readme.read_text() == "# no markers\n"
    assert main(["report", "--out", str(tmp_path / "nothing-here")]) == 2
    assert "does not exist" in capsys.readouterr().err
