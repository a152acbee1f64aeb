"""The ``leantrain`` command line: help everywhere, clear errors for bad arguments, ``train`` end to end."""

import argparse
import json

import pytest
import torch

from leantrain import __version__
from leantrain.cli import build_parser, main
from leantrain.models import checkpoint_extra, load_model


def _run(argv, capsys):
    """Exit code and (stdout, stderr) of ``leantrain argv``; argparse exits are caught."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _subcommand_paths(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommand_paths(sub, (*prefix, name))


def test_help_and_version(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0 and "usage: leantrain" in out
    for cmd in ("reproduce", "bench", "data", "train"):
        assert cmd in out
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"leantrain {__version__}"


def test_every_subcommand_has_help(capsys):
    paths = list(_subcommand_paths(build_parser()))
    assert ("train",) in paths and ("data", "list") in paths
    for path in paths:
        code, out, err = _run([*path, "--help"], capsys)
        assert code == 0, (path, err)
        assert out.startswith("usage: leantrain " + " ".join(path)), path


@pytest.mark.parametrize("argv,message", [
    ([], "required: COMMAND"),
    (["no-such-command"], "invalid choice"),
    (["train", "--dataset", "digits"], "--model"),
    (["train", "--model", "nope", "--dataset", "digits"], "invalid choice"),
    (["train", "--model", "mlp", "--dataset", "digits", "--epochs", "0"], "integer >= 1"),
    (["train", "--model", "mlp", "--dataset", "digits", "--lr", "-1"], "number in (0, inf)"),
    (["train", "--model", "mlp", "--dataset", "digits", "--data-arg", "root"], "KEY=VALUE"),
    (["train", "--model", "mlp", "--dataset", "no-such-data"], "dataset must be one of"),
    (["train", "--model", "lenet", "--dataset", "breast_cancer"], "channels"),
    (["train", "--model", "mlp", "--dataset", "digits", "--model-arg", "colour=3"], "--model-arg"),
    (["train", "--model", "mlp", "--dataset", "mnist"], "root=DIR"),
    (["train", "--model", "mlp", "--dataset", "digits", "--optimizer", "lbfgs"], "invalid choice"),
    (["reproduce", "--quick", "--full"], "not allowed with"),
    (["reproduce", "no-such-experiment", "--no-progress"], "no-such-experiment"),
    (["bench", "no-such-benchmark"], "no-such-benchmark"),
    (["data"], "required"),
    (["data", "list", "--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_give_one_clear_line_and_nonzero_exit(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("LEANTRAIN_DATA", raising=False)
    if argv[:1] in (["train"], ["reproduce"]):
        argv = [*argv, "--out", str(tmp_path)]
    code, out, err = _run(argv, capsys)
    assert code == 2, (argv, out, err)
    assert message in err
    assert "Traceback" not in err


def test_train_command_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "mlp", "--dataset", "digits", "--model-arg", "hidden=[32]", "--epochs", "2",
            "--batch-size", "128", "--lr", "0.1", "--out", str(out), "--no-progress", "--json"]
    code, stdout, err = _run([*argv, "--max-steps", "15"], capsys)
    assert code == 0, err
    first = json.loads(stdout)
    assert first["steps"] == 15 and first["model_spec"]["kwargs"]["hidden"] == [32]
    ckpt = out / "checkpoint.pt"
    assert checkpoint_extra(ckpt)["dataset"] == "digits"
    code, stdout, err = _run([*argv, "--resume"], capsys)
    assert code == 0, err
    resumed = json.loads(stdout)
    assert resumed["steps"] == 2 * 12  # 1438 training images / 128 = 12 batches per epoch
    assert [r["epoch"] for r in resumed["evals"]] == [1, 2]
    assert resumed["final"]["test_accuracy"] > 0.5
    assert json.loads((out / "history.json").read_text())["final"] == resumed["final"]
    model = load_model(ckpt)
    from leantrain.data import load_dataset

    x, y = load_dataset("digits").tensors("test")
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(resumed["final"]["test_accuracy"], abs=1e-6)


def test_train_command_language_and_binary_tasks(tmp_path, capsys):
    code, stdout, err = _run(["train", "--model", "charlstm", "--dataset", "pydocs", "--data-arg", "seq_len=16",
                              "--data-arg", "max_train_chars=3000", "--data-arg", "max_test_chars=800",
                              "--model-arg", "hidden_size=16", "--epochs", "1", "--optimizer", "adam",
                              "--out", str(tmp_path / "lm"), "--no-progress"], capsys)
    assert code == 0, err
    assert "bits/char" in stdout
    assert checkpoint_extra(tmp_path / "lm" / "checkpoint.pt")["task"] == "language"
    code, stdout, err = _run(["train", "--model", "dlrm", "--dataset", "clicks", "--data-arg", "n_train=600",
                              "--data-arg", "n_test=200", "--epochs", "1", "--optimizer", "adam",
                              "--out", str(tmp_path / "rec"), "--no-progress", "--json"], capsys)
    assert code == 0, err
    assert "test_accuracy" in json.loads(stdout)["final"]


def test_reproduce_list_and_data_list(capsys):
    code, out, _ = _run(["reproduce", "--list", "--json"], capsys)
    assert code == 0 and any(r["name"] == "fp32-baseline" for r in json.loads(out))
    code, out, _ = _run(["data", "list", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["digits"]["input_shape"] == [1, 8, 8] and rows["mnist"]["bundled"] is False


def test_bench_list(capsys):
    code, out, _ = _run(["bench", "--list", "--json"], capsys)
    assert code == 0 and "train" in {r["name"] for r in json.loads(out)}
