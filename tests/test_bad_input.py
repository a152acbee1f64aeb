"""Bad input, damaged files, full disks, concurrent runs: a clear refusal naming what is wrong, never garbage.

Every table row asserts the exit status (CLI, run in-process) or the exception type (API) *and* that
the message names the argument or file. The scenarios below the tables cover the issue's kill,
corruption, disk-full, resume and fail-before-working cases.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from leantrain import storage
from leantrain.app import registry
from leantrain.cli import main
from leantrain.storage import CHECKSUM_MAGIC, folder_lock, load_torch, save_torch, write_json, write_text
from leantrain.validation import (
    SEED_MAX,
    UsageError,
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_positive,
    check_range,
    check_seed,
)

BASE = ["--model", "mlp", "--dataset", "digits", "--model-arg", "hidden=[8]", "--no-progress"]
TINY = [*BASE, "--epochs", "1", "--max-steps", "2"]


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``leantrain argv`` in this process; argparse's exits are caught."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1] if err.strip() else ""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a tiny MLP trained on digits by `leantrain train` (2 steps)."""
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out / "checkpoint.pt"


# ------------------------------------------------------------------------------------------------ validators

@pytest.mark.parametrize("call, exc, needle", [
    (lambda: check_finite("lr", float("nan")), UsageError, "lr must be a finite number"),
    (lambda: check_finite("lr", float("inf")), UsageError, "lr"),
    (lambda: check_finite("lr", -float("inf")), UsageError, "lr"),
    (lambda: check_finite("lr", "0.1"), TypeError, "lr must be a number"),
    (lambda: check_finite("lr", None), TypeError, "lr"),
    (lambda: check_finite("lr", True), TypeError, "lr"),
    (lambda: check_positive("eps", 0), UsageError, "eps must be a finite number > 0"),
    (lambda: check_positive("eps", -1e-9), UsageError, "eps"),
    (lambda: check_positive("eps", float("nan")), UsageError, "eps"),
    (lambda: check_positive("eps", float("inf")), UsageError, "eps"),
    (lambda: check_positive("decay", -1, allow_zero=True), UsageError, "decay must be a finite number >= 0"),
    (lambda: check_positive("decay", float("nan"), allow_zero=True), UsageError, "decay"),
    (lambda: check_range("p", 1.5, 0, 1), UsageError, "p must be a finite number in [0, 1]"),
    (lambda: check_range("p", -0.1, 0, 1), UsageError, "p"),
    (lambda: check_range("p", 1.0, 0, 1, high_open=True), UsageError, "[0, 1)"),
    (lambda: check_range("p", 0.0, 0, 1, low_open=True), UsageError, "(0, 1]"),
    (lambda: check_range("p", float("nan"), 0, 1), UsageError, "p"),
    (lambda: check_range("p", float("inf")), UsageError, "(-inf, inf)"),
    (lambda: check_range("p", [0.5], 0, 1), TypeError, "p must be a number"),
    (lambda: check_int("n", 0, 1), UsageError, "n must be an integer >= 1, got 0"),
    (lambda: check_int("n", 11, 1, 10), UsageError, "<= 10"),
    (lambda: check_int("n", 2.5), TypeError, "n must be an integer"),
    (lambda: check_int("n", float("nan")), TypeError, "n"),
    (lambda: check_int("n", True), TypeError, "n must be an integer, got bool"),
    (lambda: check_int("n", "3"), TypeError, "n"),
    (lambda: check_choice("mode", "x", ["a", "b"]), UsageError, "mode must be one of 'a', 'b'"),
    (lambda: check_choice("mode", None, ["a"]), UsageError, "mode"),
    (lambda: check_bool("subnormals", "no"), TypeError, "subnormals must be True or False"),
    (lambda: check_bool("flag", 1), TypeError, "flag"),
    (lambda: check_bool("flag", None), TypeError, "flag"),
    (lambda: check_seed("seed", 2**70), UsageError, f"seed must be an integer >= 0 and <= {SEED_MAX}"),
    (lambda: check_seed("seed", -1), UsageError, "seed"),
])
def test_validators_refuse_with_the_argument_named(call, exc, needle):
    with pytest.raises(exc) as info:
        call()
    assert needle in str(info.value)


def test_validators_return_the_checked_value():
    assert check_int("n", 4.0, 1) == 4 and isinstance(check_int("n", np.int64(3)), int)
    assert check_range("p", 1, 0, 1) == 1.0 and check_positive("x", 0, allow_zero=True) == 0.0
    assert check_bool("b", np.bool_(True)) is True and check_seed("s", SEED_MAX) == SEED_MAX
    assert issubclass(UsageError, ValueError)


# ------------------------------------------------------------------------------------------------ CLI: parsing

PARSE_CASES = [
    # train
    (["train", *TINY, "--epochs", "0"], "--epochs"),
    (["train", *TINY, "--epochs", "-3"], "--epochs"),
    (["train", *TINY, "--epochs", "1.5"], "--epochs"),
    (["train", *TINY, "--batch-size", "0"], "--batch-size"),
    (["train", *TINY, "--batch-size", "x"], "--batch-size"),
    (["train", *TINY, "--lr", "0"], "--lr"),
    (["train", *TINY, "--lr", "-0.1"], "--lr"),
    (["train", *TINY, "--lr", "nan"], "--lr"),
    (["train", *TINY, "--lr", "inf"], "--lr"),
    (["train", *TINY, "--weight-decay", "nan"], "--weight-decay"),
    (["train", *TINY, "--weight-decay", "inf"], "--weight-decay"),
    (["train", *TINY, "--weight-decay", "-1e-4"], "--weight-decay"),
    (["train", *TINY, "--momentum", "1"], "--momentum"),
    (["train", *TINY, "--momentum", "-0.5"], "--momentum"),
    (["train", *TINY, "--momentum", "nan"], "--momentum"),
    (["train", *TINY, "--max-steps", "0"], "--max-steps"),
    (["train", *TINY, "--checkpoint-every", "-1"], "--checkpoint-every"),
    (["train", *TINY, "--seed", str(2**70)], "--seed"),
    (["train", *TINY, "--seed", "-1"], "--seed"),
    (["train", *TINY, "--seed", "2**70"], "--seed"),
    (["train", *TINY, "--comm-timeout", "0"], "--comm-timeout"),
    (["train", *TINY, "--bucket-mb", "nan"], "--bucket-mb"),
    (["train", *TINY, "--override", "model"], "--override"),
    (["train", *TINY, "--override", ""], "--override"),
    (["train", *TINY, "--optimizer", "lbfgs"], "--optimizer"),
    (["train", *TINY, "--model-arg", "width"], "--model-arg"),
    (["train", *TINY, "--data-arg", "=3"], "--data-arg"),
    # optimize
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--max-passes", "nan"], "--max-passes"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--max-passes", "0"], "--max-passes"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--max-passes", "inf"], "--max-passes"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--max-train", "-5"], "--max-train"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--max-train", "0"], "--max-train"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--hidden", "0"], "--hidden"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--hidden", "32,-1"], "--hidden"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--hidden", "a,b"], "--hidden"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--batch-size", "0"], "--batch-size"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--lr", "nan"], "--lr"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--nproc", "0"], "--nproc"),
    (["optimize", "--method", "dance", "--dataset", "breast_cancer", "--initial-samples", "0"], "--initial-samples"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--seed", str(2**70)], "--seed"),
    # landscape
    (["sharpness", "x.pt", "--epsilon", "0"], "--epsilon"),
    (["sharpness", "x.pt", "--epsilon", "nan"], "--epsilon"),
    (["sharpness", "x.pt", "--subspace", "0"], "--subspace"),
    (["sharpness", "x.pt", "--iters", "0"], "--iters"),
    (["sharpness", "x.pt", "--eigenvalues", "-1"], "--eigenvalues"),
    (["sharpness", "x.pt", "--batch-size", "0"], "--batch-size"),
    (["interpolate", "a.pt", "b.pt", "--points", "1"], "--points"),
    (["interpolate", "a.pt", "b.pt", "--alpha-min", "nan"], "--alpha-min"),
    (["interpolate", "a.pt", "b.pt", "--alpha-max", "inf"], "--alpha-max"),
    # scale
    (["scale", "--model", "mlp", "--latency", "inf"], "--latency"),
    (["scale", "--model", "mlp", "--latency", "-1"], "--latency"),
    (["scale", "--model", "mlp", "--bandwidth", "nan"], "--bandwidth"),
    (["scale", "--model", "mlp", "--bandwidth", "0"], "--bandwidth"),
    # reproduce / common
    (["reproduce", "--seed", "-4"], "--seed"),
    (["reproduce", "--quick", "--full"], "--full"),
]


@pytest.mark.parametrize("argv, needle", PARSE_CASES)
def test_cli_refuses_bad_options_while_parsing(argv, needle, capsys, tmp_path):
    code, _, err = run_cli([*argv, "--out", tmp_path / "o"] if argv[0] not in ("interpolate", "sharpness") else argv,
                           capsys)
    assert code == 2, err
    assert needle in last_line(err) and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ CLI: running

def _libsvm(tmp_path, text, name="d.svm"):
    p = tmp_path / name
    p.write_text(text)
    return p


RUN_CASES = [
    (["train", *TINY, "--model-arg", "hidden=[0]"], "hidden"),
    (["train", *TINY, "--model-arg", "hidden=[-3]"], "hidden"),
    (["train", *TINY, "--model-arg", "colour=3"], "--model-arg"),
    (["train", "--model", "lenet", "--dataset", "digits", "--model-arg", "width=0", "--no-progress"], "width"),
    (["train", "--model", "lenet", "--dataset", "digits", "--model-arg", "width=-3", "--no-progress"], "width"),
    (["train", "--model", "lenet", "--dataset", "digits", "--model-arg", "width=2.5", "--no-progress"], "width"),
    (["train", "--model", "resnet20", "--dataset", "digits", "--model-arg", "depth=7", "--no-progress"], "depth"),
    (["train", "--model", "charlstm", "--dataset", "digits", "--no-progress"], "language"),
    (["train", *TINY[:2], "--dataset", "no-such-data"], "dataset"),
    (["train", *TINY[:2], "--dataset", "libsvm"], "train=FILE"),
    (["train", *TINY[:2], "--dataset", "libsvm", "--data-arg", "train=/nonexistent/x.svm"], "/nonexistent/x.svm"),
    (["train", *TINY[:2], "--dataset", "gmm", "--data-arg", "separation=nan"], "separation"),
    (["train", *TINY[:2], "--dataset", "gmm", "--data-arg", "separation=-1"], "separation"),
    (["train", *TINY[:2], "--dataset", "gmm", "--data-arg", "classes=1"], "classes"),
    (["train", *TINY[:2], "--dataset", "gmm", "--data-arg", "dim=0"], "dim"),
    (["train", *TINY[:2], "--dataset", "gmm", "--data-arg", "seed=-1"], "seed"),
    (["train", *TINY, "--compression", "int8"], "--compression"),
    (["train", *TINY, "--override", "lr"], "--override"),
    (["optimize", "--method", "sgd", "--dataset", "no_such_file.svm"], "no_such_file.svm"),
    (["optimize", "--method", "sgd", "--dataset", "dir/none.txt"], "no such LIBSVM file"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--l2", "nan"], "l2"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--l2", "-1"], "l2"),
    (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--nproc", "2"], "dance only"),
    (["sharpness", "/nonexistent/c.pt", "--dataset", "digits"], "/nonexistent/c.pt"),
    (["quantize", "/nonexistent/c.pt", "--calibration", "digits"], "/nonexistent/c.pt"),
    (["reproduce", "no-such-experiment", "--no-progress"], "no-such-experiment"),
]


@pytest.mark.parametrize("argv, needle", RUN_CASES)
def test_cli_refuses_bad_input_in_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("LEANTRAIN_DATA", raising=False)
    extra = {"quantize": ["--out", tmp_path / "q.lt"], "sharpness": []}.get(argv[0], ["--out", tmp_path / "o"])
    code, _, err = run_cli([*argv, *extra], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


LIBSVM_CASES = [
    ("1 1:0.5 2:nan\n0 1:1 2:2\n", "non-finite feature"),
    ("1 1:0.5 2:inf\n0 1:1 2:2\n", "non-finite feature"),
    ("1 1:0.5 2:-inf\n0 1:1 2:2\n", "non-finite feature"),
    ("nan 1:0.5\n0 1:1\n1 1:2\n", "label"),
    ("inf 1:0.5\n0 1:1\n1 1:2\n", "label"),
    ("1 1:0.5\n1 1:1\n1 1:2\n1 1:3\n", "2 distinct label values"),
    ("1 1:0.5\n0 x:1\n", "malformed"),
    ("", "no samples"),
]


@pytest.mark.parametrize("text, needle", LIBSVM_CASES)
def test_libsvm_files_that_would_be_silently_wrong_are_refused(text, needle, tmp_path, capsys):
    path = _libsvm(tmp_path, text)
    code, _, err = run_cli(["train", *TINY[:2], "--dataset", "libsvm", "--data-arg", f"train={path}",
                            "--out", tmp_path / "o"], capsys)
    assert code == 2 and needle in err and str(path) in err, err
    code, _, err = run_cli(["optimize", "--method", "sgd", "--dataset", path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and needle in err and str(path) in err, err


# ------------------------------------------------------------------------------------------------ output locations

def _output_cases(tmp: Path):
    a_file = tmp / "a_file"
    a_file.write_text("x")
    a_dir = tmp / "a_dir"
    a_dir.mkdir()
    return [
        (["train", *TINY, "--out", a_file], "--out", "is a file"),
        (["train", *TINY, "--out", a_file / "sub"], "--out", "is a file"),
        (["train", *TINY, "--out", tmp / "o", "--checkpoint", a_dir], "--checkpoint", "is a directory"),
        (["train", *TINY, "--out", tmp / "o", "--checkpoint", a_file / "c.pt"], "--checkpoint", "is a file"),
        (["train", *TINY, "--out", tmp / "o", "--dp", "--trace", a_dir], "--trace", "is a directory"),
        (["optimize", "--method", "sgd", "--dataset", "breast_cancer", "--out", a_file], "--out", "is a file"),
        (["reproduce", "zz-none", "--out", a_file], "--out", "is a file"),
        (["reproduce", "zz-none", "--out", a_file / "x" / "y"], "--out", "is a file"),
        (["reproduce", "zz-none", "--out", tmp / "r", "--readme", a_dir], "--readme", "is a directory"),
        (["report", "--out", a_file], "--out", "is a file"),
        (["quantize", "c.pt", "--out", a_dir], "--out", "is a directory"),
        (["quantize", "c.pt", "--out", a_file / "q.lt"], "--out", "is a file"),
        (["interpolate", "a.pt", "b.pt", "--out", a_dir], "--out", "is a directory"),
        (["bench", "--out", a_file], "--out", "is a file"),
        (["verify", "numerics", "--out", a_file], "--out", "is a file"),
        (["scale", "--model", "mlp", "--out", a_file], "--out", "is a file"),
    ]


@pytest.mark.parametrize("index", range(16))
def test_bad_output_locations_fail_before_any_work(index, tmp_path, capsys, monkeypatch):
    argv, option, needle = _output_cases(tmp_path)[index]
    import leantrain.app.commands.train as train_cmd

    monkeypatch.setattr(train_cmd, "build_setup", lambda args: pytest.fail("train started working"))
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    line = last_line(err)
    assert option in line and needle in line and "Traceback" not in err


def test_unwritable_output_folder_is_refused_before_work(tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    import leantrain.app.commands.train as train_cmd

    monkeypatch.setattr(train_cmd, "build_setup", lambda args: pytest.fail("train started working"))
    code, _, err = run_cli(["train", *TINY, "--out", tmp_path / "new" / "run"], capsys)
    assert code == 2 and "--out" in err and "no write permission" in err and str(tmp_path) in err


# ------------------------------------------------------------------------------------------------ API

def _api_cases():
    from leantrain.data import load_dataset
    from leantrain.data.files import libsvm_arrays
    from leantrain.models import build
    from leantrain.numerics import FloatFormat
    from leantrain.numerics.dfp import from_dfp
    from leantrain.optim.problems import make_problem
    from leantrain.train import fit

    lin = torch.nn.Linear(2, 2)
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy
    return [
        (lambda: FloatFormat(8, 7, subnormals="no"), TypeError, "subnormals"),
        (lambda: FloatFormat(8, 7, subnormals=0), TypeError, "subnormals"),
        (lambda: FloatFormat(8, 7, saturate="yes"), TypeError, "saturate"),
        (lambda: FloatFormat(8, 7, name=3), TypeError, "name"),
        (lambda: FloatFormat(8.0, 7), TypeError, "exp_bits"),
        (lambda: load_dataset("gmm", separation=float("nan")), UsageError, "separation"),
        (lambda: load_dataset("gmm", separation=float("inf")), UsageError, "separation"),
        (lambda: load_dataset("gmm", n_train=0), UsageError, "n_train"),
        (lambda: load_dataset("gmm", classes=2.5), TypeError, "classes"),
        (lambda: load_dataset("gmm", seed=2**70), UsageError, "seed"),
        (lambda: build("mlp", in_features=4, num_classes=2, hidden=[0]), UsageError, "hidden[0]"),
        (lambda: build("lenet", width=-3), UsageError, "width"),
        (lambda: build("lenet", width=0), UsageError, "width"),
        (lambda: build("charlstm", vocab_size=5, dropout=1.5), UsageError, "dropout"),
        (lambda: build("charlstm", vocab_size=5, dropout=float("nan")), UsageError, "dropout"),
        (lambda: build("nope"), UsageError, "model must be one of"),
        (lambda: build("lenet", colour=3), TypeError, "lenet"),
        (lambda: make_problem("logreg", "breast_cancer", l2=float("nan")), UsageError, "l2"),
        (lambda: make_problem("logreg", "breast_cancer", max_train=-5), UsageError, "max_train"),
        (lambda: make_problem("mlp", "breast_cancer", hidden=(0,)), UsageError, "hidden[0]"),
        (lambda: make_problem("svm", "breast_cancer"), UsageError, "problem"),
        (lambda: make_problem("logreg", "breast_cancer", seed=2**70), UsageError, "seed"),
        (lambda: make_problem("logreg", "missing/file.svm"), ValueError, "missing/file.svm"),
        (lambda: libsvm_arrays(["/nonexistent.svm"]), ValueError, "/nonexistent.svm"),
        (lambda: from_dfp(torch.tensor([30000]), 120, overflow="error"), OverflowError, "overflow torch.float32"),
        (lambda: from_dfp(torch.tensor([1]), 0, overflow="clip"), ValueError, "overflow"),
        (lambda: from_dfp(torch.tensor([1]), 0, dtype=torch.int32), ValueError, "dtype"),
        (lambda: fit(lin, opt, loss, ds, epochs=0, batch_size=2), ValueError, "epochs"),
        (lambda: fit(lin, opt, loss, ds, epochs=1, batch_size=0), ValueError, "batch_size"),
        (lambda: fit(lin, opt, loss, ds, epochs=1, batch_size=2, resume=True), ValueError, "checkpoint"),
        (lambda: save_torch("/tmp/never-written.pt", {"f": lambda: 0}), TypeError, "payload['f']"),
        (lambda: save_torch("/tmp/never-written.pt", {"a": [np.zeros(2)]}), TypeError, "payload['a'][0]"),
        (lambda: load_torch("/nonexistent/ckpt.pt"), ValueError, "/nonexistent/ckpt.pt"),
    ]


@pytest.mark.parametrize("index", range(33))
def test_api_refuses_bad_input_naming_the_argument(index):
    call, exc, needle = _api_cases()[index]
    with pytest.raises(exc) as info:
        call()
    assert needle in str(info.value)


def test_save_torch_refuses_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_torch(tmp_path / "c.pt", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_int_matmul_with_k_zero_is_the_empty_sum():
    from leantrain.numerics import int_matmul

    for chunk, dtype in ((None, torch.int32), (4, torch.float32)):
        r, stats = int_matmul(torch.zeros(2, 3, 0, dtype=torch.int16), torch.zeros(0, 5, dtype=torch.int16),
                              chunk=chunk)
        ref = torch.zeros(2, 3, 0) @ torch.zeros(0, 5)  # torch's own empty reduction
        assert r.shape == ref.shape and r.dtype == dtype and torch.equal(r.float(), ref)
        assert stats["accumulations"] == 0 and stats["overflow_events"] == 0


def test_from_dfp_overflow_modes_follow_the_nearest_rounding_rule():
    from leantrain.numerics.dfp import from_dfp

    m = torch.tensor([30000, -30000, 3])
    big = 30000 * 2.0**120  # beyond float32, inside float64
    out = from_dfp(m, 120)
    assert out[0] == math.inf and out[1] == -math.inf and out[2] == 3 * 2.0**120  # IEEE nearest: overflow -> inf
    sat = from_dfp(m, 120, overflow="saturate")
    fmax = torch.finfo(torch.float32).max
    assert sat[0] == fmax and sat[1] == -fmax and sat[2] == 3 * 2.0**120
    assert from_dfp(m, 120, dtype=torch.float64)[0] == big


def test_quantize_truncate_of_float64_never_rounds_away_from_zero():
    from leantrain.numerics import FloatFormat, quantize

    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = torch.tensor([1e39, -1e300, 3.4e38, 1.0 + 2**-30, -(1.0 + 2**-30), float("inf"), 0.0], dtype=torch.float64)
    for fmt, fmax in ((FloatFormat(8, 23), torch.finfo(torch.float32).max),
                      (FloatFormat(8, 7), float(ml_dtypes.finfo(ml_dtypes.bfloat16).max))):
        q = quantize(x, fmt, rounding="truncate").double()
        assert q[0] == fmax and q[1] == -fmax  # finite beyond the range: +-max, never inf
        finite = torch.isfinite(x)
        assert torch.all(q[finite].abs() <= x[finite].abs())  # toward zero
        assert q[3] == 1.0 and q[4] == -1.0 and q[5] == math.inf


# ------------------------------------------------------------------------------------------------ checkpoints

def test_pickled_payload_is_refused_and_never_runs(tmp_path, capsys, trained):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    torch.save({"model": Payload(), "model_spec": {"name": "mlp", "kwargs": {}}}, buf)
    body = buf.getvalue()
    evil = tmp_path / "evil.pt"
    evil.write_bytes(body + CHECKSUM_MAGIC + hashlib.sha256(body).digest())  # a valid checksum does not help
    with pytest.raises(ValueError, match="refusing to unpickle") as info:
        load_torch(evil)
    assert str(evil) in str(info.value)
    for argv in (["quantize", evil, "--calibration", "digits", "--out", tmp_path / "q.lt"],
                 ["sharpness", evil, "--dataset", "digits"],
                 ["interpolate", evil, evil, "--dataset", "digits", "--out", tmp_path / "i.png"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and str(evil) in err and "unpickle" in err
    out = tmp_path / "run"
    out.mkdir()
    evil_ckpt = out / "checkpoint.pt"
    evil_ckpt.write_bytes(evil.read_bytes())
    code, _, err = run_cli(["train", *TINY, "--out", out, "--resume"], capsys)
    assert code == 2 and "unpickle" in err
    from leantrain.models import load_model

    with pytest.raises(ValueError, match="unpickle"):
        load_model(evil)
    assert not marker.exists()


def test_a_bit_flip_anywhere_in_a_checkpoint_is_detected(tmp_path):
    path = tmp_path / "c.pt"
    save_torch(path, {"w": torch.arange(6.0), "step": 3, "name": "x"})
    raw = path.read_bytes()
    assert load_torch(path)["step"] == 3
    bad = tmp_path / "bad.pt"
    for pos in range(len(raw)):  # every byte of the file, one bit each (rotating which bit)
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << (pos % 8)
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError) as info:
            load_torch(bad)
        assert str(bad) in str(info.value)
    for cut in (0, 10, len(raw) // 2, len(raw) - 1):  # truncation
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="checksum"):
            load_torch(bad)


def test_corrupted_checkpoint_is_refused_by_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", *TINY, "--out", out], capsys)[0] == 0
    ckpt = out / "checkpoint.pt"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # inside the weights
    ckpt.write_bytes(bytes(raw))
    code, _, err = run_cli(["train", *BASE, "--out", out, "--resume", "--epochs", "2", "--max-steps", "4"], capsys)
    assert code == 2 and "corrupt" in err and str(ckpt) in err


def test_plain_torch_file_without_trailer_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="no leantrain checksum trailer") as info:
        load_torch(path)
    assert str(path) in str(info.value)


def test_checkpoint_stays_readable_by_plain_torch_load(tmp_path):
    path = tmp_path / "c.pt"
    save_torch(path, {"w": torch.ones(3), "n": np.float64(0.5), "b": np.bool_(True)})
    plain = torch.load(path, weights_only=True)  # zip readers ignore the trailer
    assert torch.equal(plain["w"], torch.ones(3)) and plain["n"] == 0.5 and type(plain["n"]) is float
    assert plain["b"] is True


# ------------------------------------------------------------------------------------------------ resume

def test_resume_refuses_changed_options_listing_each(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", *TINY, "--out", out], capsys)[0] == 0
    code, _, err = run_cli(["train", *TINY, "--out", out, "--resume", "--lr", "0.5", "--seed", "99"], capsys)
    line = last_line(err)
    assert code == 2 and "--lr 0.05 in the checkpoint, 0.5 now" in line and "--seed 0 in the checkpoint, 99 now" in line
    assert "--override lr,seed" in line
    code, _, err = run_cli(["train", *TINY, "--out", out, "--resume", "--optimizer", "adam"], capsys)
    assert code == 2 and "--optimizer 'sgd' in the checkpoint, 'adam' now" in err and "--override lr" in err
    code, _, err = run_cli(["train", *TINY, "--model-arg", "hidden=[16]", "--out", out, "--resume"], capsys)
    assert code == 2 and "--model-arg" in err
    code, _, err = run_cli(["train", *TINY, "--out", out, "--resume", "--override", "lr"], capsys)
    assert code == 2 and "nothing to override" in err


def test_resume_override_applies_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", *BASE, "--epochs", "2", "--max-steps", "2", "--out", out], capsys)[0] == 0
    code, _, err = run_cli(["train", *BASE, "--epochs", "2", "--max-steps", "4", "--out", out,
                            "--resume", "--lr", "0.01", "--override", "lr"], capsys)
    assert code == 0, err
    hist = json.loads((out / "history.json").read_text())
    assert hist["resume_overrides"] == [{"lr": {"checkpoint": 0.05, "now": 0.01}}] and hist["steps"] == 4
    state = load_torch(out / "checkpoint.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.01  # the new value is in effect, not the checkpoint's
    assert state["extra"]["train_options"]["lr"] == 0.01
    assert state["extra"]["resume_overrides"] == hist["resume_overrides"]


def test_fit_refuses_another_models_or_optimizers_checkpoint(tmp_path):
    from leantrain.train import fit

    ds = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    loss = torch.nn.functional.cross_entropy
    a = torch.nn.Linear(3, 2)
    fit(a, torch.optim.SGD(a.parameters(), lr=0.1), loss, ds, epochs=1, batch_size=4, checkpoint=tmp_path / "c.pt")
    b = torch.nn.Linear(3, 5)
    with pytest.raises(ValueError, match="another model") as info:
        fit(b, torch.optim.SGD(b.parameters(), lr=0.1), loss, ds, epochs=2, batch_size=4,
            checkpoint=tmp_path / "c.pt", resume=True)
    assert str(tmp_path / "c.pt") in str(info.value)
    c = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="SGD optimizer"):
        fit(c, torch.optim.Adam(c.parameters()), loss, ds, epochs=2, batch_size=4, checkpoint=tmp_path / "c.pt",
            resume=True)


# ------------------------------------------------------------------------------------------------ disk full, OS errors

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_train_that_cannot_save_its_checkpoint_keeps_its_history(tmp_path, capsys, monkeypatch):
    import leantrain.train as train_mod

    monkeypatch.setattr(train_mod, "save_torch", _enospc)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", *TINY, "--out", out], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "checkpoint.pt" in err and str(out / "history.json") in err
    hist = json.loads((out / "history.json").read_text())
    assert hist["steps"] == 2 and hist["evals"]


def test_train_on_a_full_disk_writes_history_elsewhere_and_says_where(tmp_path, capsys, monkeypatch):
    real = storage.write_bytes
    out = tmp_path / "run"

    def full_under_out(path, data):
        if Path(path).is_relative_to(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(storage, "write_bytes", full_under_out)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "spare"))
    (tmp_path / "spare").mkdir()
    code, _, err = run_cli(["train", *TINY, "--out", out], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "No space left" in err
    saved = list((tmp_path / "spare").glob("leantrain-train-history-*.json"))
    assert len(saved) == 1 and str(saved[0]) in err and json.loads(saved[0].read_text())["steps"] == 2


def test_disk_full_during_a_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError) as info:
        write_text(tmp_path / "x.json", "{}")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


RUNS: list[str] = []


@pytest.fixture()
def fake_experiment():
    from leantrain.app.registry import Result

    @registry.experiment("zz-bad-input", arxiv="0", title="t", claim="c", quick_minutes=0.01)
    def run(profile, out, seed=0, device="cpu"):
        RUNS.append(str(out))
        return Result(metrics={"v": 1.0}, claims=[], plots=[], tables=[], notes="")

    RUNS.clear()
    yield "zz-bad-input"
    registry._EXPERIMENTS.pop("zz-bad-input", None)


def test_reproduce_that_cannot_write_its_record_says_so_in_one_line(tmp_path, capsys, monkeypatch, fake_experiment):
    import leantrain.app.reproduce as rep

    monkeypatch.setattr(rep, "write_json", _enospc)
    code, _, err = run_cli(["reproduce", fake_experiment, "--out", tmp_path, "--no-progress"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert fake_experiment in err and "cannot be written" in err and "metrics.json" in err


def test_concurrent_reproduce_into_one_folder_is_refused(tmp_path, capsys, fake_experiment):
    with folder_lock(tmp_path, "leantrain reproduce"):
        code, _, err = run_cli(["reproduce", fake_experiment, "--out", tmp_path, "--no-progress"], capsys)
        assert code == 1 and f"pid {os.getpid()}" in err and str(tmp_path) in err
        assert not (tmp_path / fake_experiment / "metrics.json").exists() and RUNS == []  # no work was done
    assert run_cli(["reproduce", fake_experiment, "--out", tmp_path, "--no-progress"], capsys)[0] == 0
    assert len(RUNS) == 1  # the lock was released


def test_report_names_an_unparsable_metrics_file(tmp_path, capsys):
    write_json(tmp_path / "good" / "metrics.json", {"name": "good", "status": "complete", "passed": True,
                                                    "claims": [], "title": "g", "wall_time_s": 1.0})
    broken = tmp_path / "broken" / "metrics.json"
    broken.parent.mkdir()
    broken.write_text('{"name": "broken", "status": ')
    code, out, err = run_cli(["report", "--out", tmp_path], capsys)
    assert code == 1 and str(broken) in err and "(2 experiments)" in out
    md = (tmp_path / "report.md").read_text()
    assert "broken" in md and "ERROR" in md and "unreadable" in md


def test_expert_json_errors_name_the_file(tmp_path):
    from leantrain.imitation.experts import load_expert

    (tmp_path / "expert.zip").write_bytes(b"PK")
    (tmp_path / "expert.json").write_text("{not json")
    with pytest.raises(ValueError) as info:
        load_expert(tmp_path)
    assert str(tmp_path / "expert.json") in str(info.value)


# ------------------------------------------------------------------------------------------------ files

def test_stale_checkpoint_temporaries_are_removed_but_not_foreign_or_live_ones(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = out / f".checkpoint.pt.{2**22 + 4321}.abcd1234.tmp"  # a pid above pid_max: its writer is gone
    live = out / f".checkpoint.pt.{os.getppid()}.abcd1234.tmp"
    foreign = out / ".notes.99999999.tmp"  # not our pattern (no 8-character random part)
    for p in (dead, live, foreign):
        p.write_text("x")
    assert run_cli(["train", *TINY, "--out", out], capsys)[0] == 0
    assert not dead.exists() and live.exists() and foreign.exists()


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_files_respect_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        p = write_text(tmp_path / "f.txt", "x")
        c = save_torch(tmp_path / "c.pt", {"a": 1})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == mode and c.stat().st_mode & 0o777 == mode


def test_replacing_a_file_keeps_its_mode(tmp_path):
    p = write_text(tmp_path / "f.txt", "x")
    os.chmod(p, 0o600)
    write_text(p, "y")
    assert p.stat().st_mode & 0o777 == 0o600 and p.read_text() == "y"


def test_diverging_training_is_an_error_not_garbage(tmp_path, capsys):
    code, _, err = run_cli(["train", *BASE, "--epochs", "1", "--max-steps", "30", "--lr", "1e30", "--out", tmp_path],
                           capsys)
    assert code == 2 and "diverged" in err and "--lr 1e+30" in err


def test_sharpness_on_a_dataset_of_the_wrong_shape(trained, capsys):
    code, _, err = run_cli(["sharpness", trained, "--dataset", "breast_cancer", "--iters", "1"], capsys)
    assert code == 2 and "breast_cancer" in err and str(trained) in err and "Traceback" not in err


def test_quantize_option_checks(trained, tmp_path, capsys):
    for opt, value in (("--calibration-batches", "0"), ("--max-terms", "0"), ("--finetune-lr", "nan"),
                       ("--finetune-lr", "-1"), ("--act-bits", "-2"), ("--residual-budget", "nan")):
        code, _, err = run_cli(["quantize", trained, opt, value, "--out", tmp_path / "q.lt"], capsys)
        assert code == 2 and opt in err, (opt, err)


@pytest.mark.parametrize("key", ["observation_space", "policy_class", "lr_schedule", "zz_unknown"])
def test_expert_archive_with_a_pickled_payload_never_runs_it(tmp_path, key):
    import base64
    import zipfile

    cloudpickle = pytest.importorskip("cloudpickle")
    from leantrain.app.experiments.rail import asset_dir
    from leantrain.imitation.experts import load_expert

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = asset_dir("InvertedPendulum-v5")
    evil = tmp_path / "expert"
    evil.mkdir()
    (evil / "expert.json").write_text((src / "expert.json").read_text())
    with zipfile.ZipFile(src / "expert.zip") as zin, zipfile.ZipFile(evil / "expert.zip", "w") as zout:
        for item in zin.infolist():
            raw = zin.read(item.filename)
            if item.filename == "data":
                data = json.loads(raw)
                data[key] = {":type:": "x", ":serialized:": base64.b64encode(cloudpickle.dumps(Payload())).decode()}
                raw = json.dumps(data).encode()
            zout.writestr(item, raw)
    if key == "zz_unknown":
        with pytest.raises(ValueError, match="does not unpickle") as info:
            load_expert(evil)
        assert str(evil / "expert.zip") in str(info.value) and "zz_unknown" in str(info.value)
    else:
        expert = load_expert(evil)  # the known entries are replaced, never unpickled
        assert expert.env_id == "InvertedPendulum-v5"
    assert not marker.exists()


@pytest.mark.parametrize("name", ["data/train.svm", "missing.libsvm"])
def test_a_path_given_as_data_set_name_is_explained(name, tmp_path, capsys):
    code, _, err = run_cli(["train", "--model", "mlp", "--dataset", name, "--out", tmp_path], capsys)
    assert code == 2 and f"dataset {name!r} is a path" in err and "--dataset libsvm --data-arg train=" in err
    assert "does not exist" in err


def test_key_value_options_share_one_parser_and_fail_as_one_line(capsys):
    from leantrain.app.commands import key_value, key_values

    assert key_value("hidden=[64,64]") == ("hidden", [64, 64]) and key_value("root=/data") == ("root", "/data")
    assert key_values("width=8,scale=0.5,bias=true") == {"width": 8, "scale": 0.5, "bias": True}
    assert main(["precision", "audit", "resnet20:width"]) == 2
    err = capsys.readouterr().err
    assert "MODEL-SPEC arguments: expected KEY=VALUE" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["scale", "--model", "lenet", "--model-arg", "width"])
    assert exc.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err
