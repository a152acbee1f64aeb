"""Cached runs are keyed by configuration and code: a changed setting or changed source is never reused.

Also the report's per-seed values and the paper's setting beside ours (optional Claim/Result fields).
"""

import json
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from leantrain.app import provenance, registry
from leantrain.app.experiments import _precision_training as pt
from leantrain.app.registry import Claim, Result
from leantrain.app.report import render_html, render_markdown
from leantrain.app.reproduce import run_experiments
from leantrain.data import DatasetInfo, Split


def _fake_package(tmp_path, monkeypatch, body="X = 1\n"):
    pkg = tmp_path / "zz_fake_dep"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "zz_fake_dep", raising=False)  # another test's copy
    provenance._digest.cache_clear()
    return pkg


def test_run_key_changes_with_config_and_with_source(tmp_path, monkeypatch):
    pkg = _fake_package(tmp_path, monkeypatch)
    k0 = provenance.run_key({"lr": 0.1, "epochs": 3}, ["zz_fake_dep"])
    assert k0 == provenance.run_key({"epochs": 3, "lr": 0.1}, ["zz_fake_dep"])  # key order does not matter
    assert len(k0) == provenance.KEY_LENGTH
    assert provenance.run_key({"lr": 0.2, "epochs": 3}, ["zz_fake_dep"]) != k0
    (pkg / "__init__.py").write_text("X = 2\n")  # a source edit
    provenance._digest.cache_clear()
    k1 = provenance.run_key({"lr": 0.1, "epochs": 3}, ["zz_fake_dep"])
    assert k1 != k0
    (pkg / "extra.py").write_text("")  # a new file in the package
    provenance._digest.cache_clear()
    assert provenance.run_key({"lr": 0.1, "epochs": 3}, ["zz_fake_dep"]) not in (k0, k1)
    with pytest.raises(ValueError, match="modules"):
        provenance.code_digest([])


def test_tensor_digest_sees_values_dtype_and_shape():
    a = torch.arange(6, dtype=torch.float32)
    d = provenance.tensor_digest([a])
    assert d == provenance.tensor_digest([a.clone()])
    b = a.clone()
    b[3] = 3.5
    assert provenance.tensor_digest([b]) != d
    assert provenance.tensor_digest([a.double()]) != d
    assert provenance.tensor_digest([a.view(2, 3)]) != d


def _tiny_split() -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    info = DatasetInfo(name="tiny", input_shape=(4,), num_classes=2, task="classification", preprocessing="none")
    return Split(TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:]), info)


def _count_fits(monkeypatch):
    calls = []
    real = pt.fit

    def counting(*args, **kwargs):
        calls.append(kwargs.get("checkpoint"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pt, "fit", counting)
    return calls


def _train(tmp_path, data, **kw):
    args = dict(seed=0, epochs=2, batch_size=16, lr=0.1, out=tmp_path)
    args.update(kw)
    return pt.train_run("tiny", lambda: nn.Linear(4, 2), "fp32", data, **args)


def test_precision_run_cache_is_not_reused_after_config_or_code_change(tmp_path, monkeypatch):
    data = _tiny_split()
    calls = _count_fits(monkeypatch)
    monkeypatch.setattr(pt, "_MEMO", {})
    first = _train(tmp_path, data)
    ckpts = sorted((tmp_path / "runs").glob("*.pt"))
    assert len(ckpts) == 1 and first.extra["run_key"] in ckpts[0].name

    # Same configuration and code, a new process (empty memo): the checkpoint is resumed, not retrained.
    monkeypatch.setattr(pt, "_MEMO", {})
    again = _train(tmp_path, data)
    assert again.extra["run_key"] == first.extra["run_key"]
    assert again.history.evals == first.history.evals
    assert len(list((tmp_path / "runs").glob("*.pt"))) == 1

    # A changed hyper-parameter: a new key, a new checkpoint, a different run.
    monkeypatch.setattr(pt, "_MEMO", {})
    other = _train(tmp_path, data, lr=0.01)
    assert other.extra["run_key"] != first.extra["run_key"]
    assert len(list((tmp_path / "runs").glob("*.pt"))) == 2
    assert other.history.evals != first.history.evals

    # Changed data (one value): not reused either.
    monkeypatch.setattr(pt, "_MEMO", {})
    x, y = data.train.tensors
    x2 = x.clone()
    x2[0, 0] += 1.0
    changed = Split(TensorDataset(x2, y), data.test, data.info)
    assert _train(tmp_path, changed).extra["run_key"] != first.extra["run_key"]

    # Changed source of a module the run depends on: the old checkpoint is not reused.
    pkg = _fake_package(tmp_path / "src", monkeypatch)
    monkeypatch.setattr(pt, "CODE_MODULES", (*pt.CODE_MODULES, "zz_fake_dep"))
    monkeypatch.setattr(pt, "_MEMO", {})
    before = _train(tmp_path, data)
    (pkg / "__init__.py").write_text("X = 'edited'\n")
    provenance._digest.cache_clear()
    monkeypatch.setattr(pt, "_MEMO", {})
    n = len(list((tmp_path / "runs").glob("*.pt")))
    after = _train(tmp_path, data)
    assert after.extra["run_key"] != before.extra["run_key"]
    assert len(list((tmp_path / "runs").glob("*.pt"))) == n + 1
    # Every call above trained through fit with its own key's checkpoint.
    assert len(calls) == 6 and len({str(c) for c in calls}) == 5


def test_quant_pretrained_cache_retrains_after_code_change(tmp_path, monkeypatch):
    from leantrain.app.experiments import _quant_common as qc

    setup = {"model": "lenet", "model_kwargs": {"in_channels": 1, "num_classes": 10}, "data": "digits",
             "data_kwargs": {}, "epochs": 1, "batch_size": 64, "lr": 0.05}
    monkeypatch.setitem(qc.SETUPS, "zz-tiny", {"quick": setup})
    a = qc.pretrained("zz-tiny", "quick", cache=tmp_path)
    b = qc.pretrained("zz-tiny", "quick", cache=tmp_path)
    assert not a.cached and b.cached
    pkg = _fake_package(tmp_path / "src", monkeypatch)
    monkeypatch.setattr(qc, "CODE_MODULES", (*qc.CODE_MODULES, "zz_fake_dep"))
    c = qc.pretrained("zz-tiny", "quick", cache=tmp_path)
    assert not c.cached
    (pkg / "__init__.py").write_text("X = 'edited'\n")
    provenance._digest.cache_clear()
    assert not qc.pretrained("zz-tiny", "quick", cache=tmp_path).cached
    assert not qc.pretrained("zz-tiny", "quick", seed=1, cache=tmp_path).cached  # another seed, another model
    assert len(list(tmp_path.glob("*.pt"))) == 4


def test_claim_per_seed_values_are_checked():
    Claim("c", "p", "o", "t", True, per_seed={"a": [1.0, 2.0]}, seeds=[0, 1])
    with pytest.raises(ValueError, match="2 values for 3 seeds"):
        Claim("c", "p", "o", "t", True, per_seed={"a": [1.0, 2.0]}, seeds=[0, 1, 2])
    with pytest.raises(TypeError, match="per_seed"):
        Claim("c", "p", "o", "t", True, per_seed={"a": 1.0})


def test_report_shows_per_seed_values_and_paper_setting(tmp_path):
    @registry.experiment("zz-fake-seeds", arxiv="0000.00000", title="fake", claim="fake", quick_minutes=0.01)
    def run(profile, out, seed=0, device="cpu"):
        return Result(metrics={}, claims=[
            Claim("B beats A", "yes", "mean gap 0.5", "gap > 0 in every seed", True,
                  per_seed={"A": [0.25, 0.5, 0.75], "B - A": [0.5, 0.25, 0.75]}, seeds=[seed, seed + 1, seed + 2]),
            Claim("old-style claim", "x", "y", "z", False)],
            setting={"data": ("ImageNet", "digits"), "batch": ("256", "32")})

    try:
        recs = run_experiments(["zz-fake-seeds"], "quick", tmp_path, seed=3, progress=False)
    finally:
        registry._EXPERIMENTS.pop("zz-fake-seeds", None)
    rec = json.loads((tmp_path / "zz-fake-seeds" / "metrics.json").read_text())
    assert rec["setting"] == {"data": ["ImageNet", "digits"], "batch": ["256", "32"]}
    assert rec["claims"][0]["per_seed"]["B - A"] == [0.5, 0.25, 0.75] and rec["claims"][0]["seeds"] == [3, 4, 5]
    md, html = render_markdown(recs), render_html(recs)
    assert "| B beats A | yes | mean gap 0.5 | seeds 3, 4, 5: A: 0.25, 0.5, 0.75; B - A: 0.5, 0.25, 0.75 |" in md
    assert "| old-style claim | x | y |  | z | NO |" in md
    assert "| data | ImageNet | digits |" in md and "| batch | 256 | 32 |" in md
    assert "seeds 3, 4, 5: A: 0.25" in html and "ImageNet" in html
    # A record written before these fields existed still renders (no per-seed column, no setting table).
    old = {k: v for k, v in rec.items() if k != "setting"}
    old["claims"] = [{k: v for k, v in c.items() if k not in ("per_seed", "seeds")} for c in rec["claims"]]
    md_old = render_markdown([old])
    assert "per seed" not in md_old and "The paper's setting" not in md_old


def test_large_batch_saved_run_is_not_reused_after_config_or_code_change(tmp_path, monkeypatch):
    from leantrain.app.experiments import large_batch as lb
    from leantrain.data import load_dataset

    data = load_dataset("mnist1d")
    cfg = lb.Config(seeds=1, warm_epochs=1, contenders=("SB",), target_loss=2.0, milestones=(2.0,),
                    max_epochs=(2, 2), small_batch=256, hidden=(8,), iters=1, subspace=4)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in lb._model(cfg, 40, 10).state_dict().items()}
    x0 = torch.cat([v.reshape(-1) for v in init.values()])
    trained = []
    real = lb._train

    def counting(*args, **kwargs):
        trained.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(lb, "_train", counting)
    _, rec = lb._trained("SB", 0, init, x0, data, cfg, 4096, tmp_path, "cpu")
    _, again = lb._trained("SB", 0, init, x0, data, cfg, 4096, tmp_path, "cpu")
    assert len(trained) == 1 and again["run_key"] == rec["run_key"]  # same config and code: reused
    other = lb.Config(**{**cfg.__dict__, "lr": 2e-3})
    _, rec2 = lb._trained("SB", 0, init, x0, data, other, 4096, tmp_path, "cpu")
    assert len(trained) == 2 and rec2["run_key"] != rec["run_key"]  # changed configuration: retrained
    pkg = _fake_package(tmp_path / "src", monkeypatch)
    monkeypatch.setattr(lb, "CODE_MODULES", (*lb.CODE_MODULES, "zz_fake_dep"))
    _, rec3 = lb._trained("SB", 0, init, x0, data, cfg, 4096, tmp_path, "cpu")
    (pkg / "__init__.py").write_text("X = 'edited'\n")
    provenance._digest.cache_clear()
    _, rec4 = lb._trained("SB", 0, init, x0, data, cfg, 4096, tmp_path, "cpu")
    assert len(trained) == 4 and len({rec["run_key"], rec3["run_key"], rec4["run_key"]}) == 3  # changed code: retrained
