"""``leantrain sharpness`` / ``leantrain interpolate`` end to end on checkpoints written by fit, and the experiment."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leantrain.cli import main
from leantrain.data import load_dataset
from leantrain.landscape import sharpness
from leantrain.models import build, load_model, model_spec
from leantrain.train import evaluate, fit


def train_checkpoint(path, seed: int, batch_size: int = 32) -> None:
    spec = model_spec("mlp", in_features=64, num_classes=10, hidden=[16])
    torch.manual_seed(seed)
    model = build(spec["name"], **spec["kwargs"])
    data = load_dataset("digits")
    fit(model, torch.optim.Adam(model.parameters(), lr=1e-2), nn.functional.cross_entropy, data.train, epochs=2,
        batch_size=batch_size, seed=seed, eval_train=False, checkpoint=path, model_spec=spec)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    a, b = d / "sb.pt", d / "lb.pt"
    train_checkpoint(a, 0, batch_size=16)
    train_checkpoint(b, 1, batch_size=144)
    return a, b


def test_sharpness_cli_matches_the_library_on_a_fit_checkpoint(checkpoints, capsys):
    a, _ = checkpoints
    code = main(["sharpness", str(a), "--dataset", "digits", "--subspace", "20", "--epsilon", "1e-3", "--iters", "4",
                 "--eigenvalues", "2", "--json", "--seed", "3"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    (r,) = out["sharpness"]
    assert r["subspace"] == 20 and r["epsilon"] == 1e-3
    data = load_dataset("digits")
    ref = sharpness(load_model(a), nn.functional.cross_entropy, data.train, epsilon=1e-3, subspace=20, iters=4, seed=3)
    assert r["value"] == pytest.approx(ref.value, rel=1e-6)
    assert out["parameters"] == ref.dim == 64 * 16 + 16 + 16 * 10 + 10
    ev = out["hessian_top_eigenvalues"]
    assert len(ev) == 2 and ev[0] >= ev[1]


def test_sharpness_cli_reads_the_dataset_from_a_leantrain_train_checkpoint(tmp_path, capsys):
    code = main(["train", "--model", "mlp", "--dataset", "digits", "--epochs", "1", "--model-arg", "hidden=[8]",
                 "--out", str(tmp_path), "--no-progress", "--json"])
    assert code == 0
    capsys.readouterr()
    code = main(["sharpness", str(tmp_path / "checkpoint.pt"), "--iters", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "digits" and [r["epsilon"] for r in out["sharpness"]] == [1e-3, 5e-4]


def test_interpolate_cli_writes_png_and_data(checkpoints, tmp_path, capsys):
    a, b = checkpoints
    png = tmp_path / "plots" / "interp.png"
    code = main(["interpolate", str(a), str(b), "--dataset", "digits", "--points", "4", "--alpha-min", "0",
                 "--alpha-max", "1.5", "--out", str(png), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(png.with_suffix(".json").read_text())
    assert saved["alphas"] == out["alphas"] == [0.0, 0.5, 1.0, 1.5]
    data = load_dataset("digits")
    for j, path in ((0, a), (2, b)):
        ref = evaluate(load_model(path), nn.functional.cross_entropy, data.test)
        assert saved["curves"]["test"]["loss"][j] == pytest.approx(ref["loss"], rel=1e-12)
        assert saved["curves"]["test"]["accuracy"][j] == ref["accuracy"]


@pytest.mark.parametrize("argv, message", [
    (["--subspace", "0"], "--subspace"),
    (["--subspace", "100000"], "--subspace"),
    (["--eigenvalues", "-1"], "--eigenvalues"),
])
def test_sharpness_cli_bad_arguments(checkpoints, capsys, argv, message):
    a, _ = checkpoints
    try:
        code = main(["sharpness", str(a), "--dataset", "digits", *argv])
    except SystemExit as exc:  # refused while parsing
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_bad_epsilon_and_missing_checkpoint(checkpoints, tmp_path, capsys):
    a, _ = checkpoints
    with pytest.raises(SystemExit) as exc:
        main(["sharpness", str(a), "--dataset", "digits", "--epsilon", "0"])
    assert exc.value.code == 2 and "--epsilon: must be a finite number in (0, inf)" in capsys.readouterr().err
    assert main(["sharpness", str(tmp_path / "nope.pt"), "--dataset", "digits"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["interpolate", str(a), str(a), "--dataset", "digits", "--out", str(tmp_path / "x.txt")]) == 2
    assert ".png" in capsys.readouterr().err


def test_experiment_runs_end_to_end_on_a_tiny_profile(tmp_path, monkeypatch):
    from leantrain.app.experiments import large_batch

    monkeypatch.setitem(large_batch.PROFILES, "quick",
                        large_batch.Config(seeds=2, warm_epochs=1, contenders=large_batch.CONTENDERS, target_loss=1.0,
                                           milestones=(2.0, 1.0), max_epochs=(3, 3), small_batch=256, batch_ratio=4,
                                           hidden=(8,), subspace=5, iters=2, progressive_epochs=2))
    from leantrain.app.registry import experiments, load_all

    load_all()
    res = experiments()["large-batch-sharpness"]("quick", tmp_path)
    assert (tmp_path / "interpolation.png").is_file() and (tmp_path / "sharpness_vs_accuracy.png").is_file()
    assert (tmp_path / "sharpness_vs_training_loss.png").is_file()
    assert len(res.claims) == 7 and all(isinstance(c.passed, bool) for c in res.claims)
    for recs in res.metrics["runs"].values():  # the criterion is met or the epoch cap stops the run
        for r in recs:
            assert r["reached_criterion"] == (r["train_loss"] <= 1.0) and (r["reached_criterion"] or r["epochs"] == 3)
    assert set(res.setting) >= {"data", "model", "batch", "epochs"}
    assert set(res.metrics["runs"]) == set(large_batch.CONTENDERS)
    assert len(res.metrics["interpolation"]["alphas"]) == 25
    # a second run into the same folder reuses the saved runs and gives the same records
    again = experiments()["large-batch-sharpness"]("quick", tmp_path)
    assert again.metrics["runs"] == res.metrics["runs"]
    assert large_batch.progressive_batch_sizes(64, 400, 5)[0] == 64
    assert large_batch.progressive_batch_sizes(64, 400, 5)[-1] == 400
