"""``leantrain optimize`` end to end: JSON contents, LIBSVM files, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leantrain.cli import main


def test_optimize_json_has_history_optimum_passes_and_weights(capsys, tmp_path):
    code = main(["optimize", "--method", "pbqn", "--problem", "logreg", "--dataset", "breast_cancer", "--l2", "0.01",
                 "--max-passes", "40", "--json", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["optimum"] is not None and data["final_objective"] >= data["optimum"] - 1e-12
    assert data["suboptimality"] <= 1e-6 * data["optimum"]
    assert data["passes"] == data["history"][-1]["passes"] > 0
    assert set(data["weights"]) == {"weight", "bias"} and len(data["weights"]["weight"][0]) == 30
    assert [h["batch_size"] for h in data["history"]] == sorted(h["batch_size"] for h in data["history"])
    assert (tmp_path / "pbqn_logreg_breast_cancer.json").is_file()


def test_optimize_reads_a_libsvm_file(capsys, tmp_path):
    from sklearn.datasets import dump_svmlight_file

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    y = (x @ np.arange(1, 6) + rng.normal(size=300) > 0).astype(int) * 2 - 1  # -1/+1 labels
    path = tmp_path / "toy.svm"
    dump_svmlight_file(x, y, str(path))
    code = main(["optimize", "--method", "lbfgs", "--dataset", str(path), "--json", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_train"] == 240 and data["final_test_accuracy"] > 0.8
    assert abs(data["final_objective"] - data["optimum"]) <= 1e-6 * data["optimum"]


@pytest.mark.parametrize("argv, needle", [
    (["--method", "sgd", "--dataset", "breast_cancer", "--nproc", "2"], "dance only"),
    (["--method", "pbqn", "--dataset", "no_such_data"], "dataset"),
    (["--method", "pbqn", "--problem", "cnn", "--dataset", "mnist1d"], "image inputs"),
    (["--method", "dance", "--dataset", "breast_cancer", "--l2", "-1"], "l2"),
])
def test_optimize_bad_arguments_exit_2_with_one_line(capsys, tmp_path, argv, needle):
    assert main(["optimize", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("method", ["lbfgs", "pbqn", "dance"])
def test_optimize_reaches_the_optimum_and_says_why_it_stopped(capsys, tmp_path, method):
    argv = ["optimize", "--method", method, "--dataset", "breast_cancer", "--l2", "1e-3", "--json", "--out",
            str(tmp_path)]
    assert main([*argv, "--tol", "1e-6", "--max-passes", "100"]) == 0
    data = json.loads(capsys.readouterr().out)
    # torch's LBFGS may end first on its own tolerance_change; either way at the optimum
    assert data["stopped"] in (("tol", "converged") if method == "lbfgs" else ("tol",))
    assert data["suboptimality"] <= 1e-6 * data["optimum"] and data["passes"] <= 100
    assert main([*argv, "--max-passes", "5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stopped"] == "budget" and data["suboptimality"] > 1e-6 * data["optimum"]
