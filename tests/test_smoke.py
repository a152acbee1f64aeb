import subprocess
import sys

from leantrain.cli import main


def test_help_lists_core_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for cmd in ("reproduce", "bench", "data"):
        assert cmd in out


def test_unknown_experiment_is_a_clear_error(capsys, tmp_path):
    code = main(["reproduce", "no-such-experiment", "--out", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "no-such-experiment" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "leantrain", "reproduce", "--list"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "fp32-baseline" in r.stdout
