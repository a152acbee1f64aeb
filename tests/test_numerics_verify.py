"""leantrain verify numerics: finds no mismatch in quantize, and does find one in a broken quantize."""

from __future__ import annotations

import json

import leantrain.numerics as numerics
from leantrain.app.commands.verify import verify_numerics
from leantrain.cli import main


def test_verify_reports_zero_mismatches_and_exit_zero(tmp_path, capsys):
    assert main(["verify", "numerics", "--samples", "20000", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "numerics.json").read_text())
    assert res["mismatches"] == 0 and len(res["checks"]) >= 8
    assert "total mismatches: 0" in capsys.readouterr().out


def test_verify_detects_a_wrong_rounding(monkeypatch, tmp_path):
    real = numerics.quantize

    def off_by_truncation(x, fmt, rounding="nearest", **kw):
        return real(x, fmt, "truncate", backend="bits")

    monkeypatch.setattr(numerics, "quantize", off_by_truncation)
    res = verify_numerics(exhaustive=False, samples=5000, seed=0, device="cpu")
    assert res["mismatches"] > 0
    assert main(["verify", "numerics", "--samples", "1000", "--out", str(tmp_path)]) == 1


def test_verify_bad_arguments(tmp_path):
    assert main(["verify", "numerics", "--samples", "-1", "--out", str(tmp_path)]) == 2
