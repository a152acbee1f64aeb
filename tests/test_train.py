"""The training loop: bit-identical resume from atomic checkpoints, hooks, history, bad arguments."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from leantrain.models import build, checkpoint_extra, load_model, model_spec
from leantrain.storage import load_torch
from leantrain.train import History, Hooks, epoch_order, fit, loss_for_task, sequence_cross_entropy


@pytest.fixture()
def one_thread():
    # Bit-identity is promised for equal thread counts; pin it for the comparison.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(n=70, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y % classes)


class DropoutMLP(nn.Module):
    """Dropout makes the run consume the torch RNG every step, so resume must restore it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class Interrupt(Exception):
    pass


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_after_interruption_is_bit_identical(tmp_path, one_thread, optimizer):
    train, test = _data(), _data(30, seed=1)

    def make(init_seed):
        torch.manual_seed(init_seed)
        model = DropoutMLP()
        opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
               else torch.optim.Adam(model.parameters(), lr=0.01))
        return model, opt

    kw = dict(epochs=3, batch_size=8, test=test, seed=5, eval_train=True)
    model, opt = make(0)
    straight = fit(model, opt, nn.functional.cross_entropy, train, **kw)
    expected = _params(model)

    # Interrupted run: checkpoint every 4 steps, killed (an exception) at step 14 of 27.
    ckpt = tmp_path / "run.pt"
    model, opt = make(0)

    def crash(step, loss):
        if step == 14:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(model, opt, nn.functional.cross_entropy, train, checkpoint=ckpt, checkpoint_every=4,
            step_callback=crash, **kw)
    assert load_torch(ckpt)["step"] == 12  # the last atomic checkpoint before the crash

    # Fresh objects with a *different* initialisation: everything must come from the checkpoint.
    model2, opt2 = make(123)
    resumed = fit(model2, opt2, nn.functional.cross_entropy, train, checkpoint=ckpt, checkpoint_every=4,
                  resume=True, **kw)
    got = _params(model2)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert resumed.step_loss == straight.step_loss
    assert resumed.evals == straight.evals


def test_resume_after_max_steps_in_a_new_process(tmp_path, one_thread):
    """Stop at max_steps inside an epoch, resume in another Python process from the checkpoint file."""
    ckpt = tmp_path / "lstm.pt"
    spec = model_spec("charlstm", vocab_size=11, embed_dim=4, hidden_size=8, dropout=0.2)
    script = textwrap.dedent(f"""
        import torch
        from torch.utils.data import TensorDataset
        from leantrain.models import build
        from leantrain.train import fit, sequence_cross_entropy
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 11, (40, 9), generator=g)
        ds = TensorDataset(x[:, :-1], x[:, 1:])
        spec = {spec!r}
        torch.manual_seed(INIT)
        model = build(spec["name"], **spec["kwargs"])
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        fit(model, opt, sequence_cross_entropy, ds, epochs=2, batch_size=6, seed=3, eval_train=False,
            checkpoint={str(ckpt)!r}, model_spec=spec, resume=True, max_steps=MAX_STEPS)
    """)
    def run(init: str, max_steps: str) -> subprocess.CompletedProcess:
        code = script.replace("INIT", init).replace("MAX_STEPS", max_steps)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 11, (40, 9), generator=g)
    ds = TensorDataset(x[:, :-1], x[:, 1:])

    def make():
        torch.manual_seed(0)
        model = build(spec["name"], **spec["kwargs"])
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    model, opt = make()  # first part here, stopped by max_steps inside epoch 1 ...
    fit(model, opt, sequence_cross_entropy, ds, epochs=2, batch_size=6, seed=3, eval_train=False, checkpoint=ckpt,
        model_spec=spec, max_steps=5)
    assert load_torch(ckpt)["step"] == 5
    second = run("99", "None")  # ... the rest in a new process from the file
    assert second.returncode == 0, second.stderr

    model, opt = make()
    hist = fit(model, opt, sequence_cross_entropy, ds, epochs=2, batch_size=6, seed=3, eval_train=False)
    state = load_torch(ckpt)
    assert state["step"] == len(hist.step_loss) == 14
    resumed = load_model(ckpt)
    for (k, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert History(**state["history"]).step_loss == hist.step_loss
    assert History(**state["history"]).evals == hist.evals  # the max_steps evaluation row is not duplicated


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = epoch_order(50, 1, 2), epoch_order(50, 1, 2)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(50))
    assert not torch.equal(epoch_order(50, 1, 3), a)


def test_history_rows_and_train_loss_is_the_epoch_mean():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hist = fit(model, opt, nn.functional.cross_entropy, _data(), epochs=2, batch_size=20, test=_data(10, seed=2))
    assert [r["epoch"] for r in hist.evals] == [1, 2] and [r["step"] for r in hist.evals] == [4, 8]
    assert hist.evals[0]["train_loss"] == pytest.approx(sum(hist.step_loss[:4]) / 4)
    assert {"test_loss", "test_accuracy", "train_eval_loss", "train_eval_accuracy"} <= set(hist.evals[0])
    assert hist.last("test_accuracy") == hist.evals[-1]["test_accuracy"]
    with pytest.raises(KeyError):
        hist.last("nope")


def test_evaluate_matches_a_direct_computation():
    from leantrain.train import evaluate

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    ds = _data(37)
    res = evaluate(model, nn.functional.cross_entropy, ds, batch_size=10)
    with torch.no_grad():
        out = model(ds.tensors[0])
    assert res["loss"] == pytest.approx(nn.functional.cross_entropy(out, ds.tensors[1]).item(), rel=1e-5)
    assert res["accuracy"] == pytest.approx((out.argmax(1) == ds.tensors[1]).float().mean().item())


def test_hooks_are_called_and_skipped_steps_counted(tmp_path):
    calls = {"wrap": 0, "backward": 0, "step": 0}

    class Counting(Hooks):
        def __init__(self):
            self.scale = 1.0

        def wrap(self, model, optimizer):
            calls["wrap"] += 1
            return model, optimizer

        def backward(self, loss):
            calls["backward"] += 1
            (loss * self.scale).backward()

        def step(self, optimizer):
            calls["step"] += 1
            if calls["step"] % 2:
                return False  # e.g. an overflow skipped by dynamic loss scaling
            optimizer.step()
            return True

        def state_dict(self):
            return {"scale": self.scale + 1}

        def load_state_dict(self, state):
            self.scale = state["scale"]

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    hooks = Counting()
    hist = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy, _data(), epochs=1,
               batch_size=10, hooks=hooks, checkpoint=tmp_path / "c.pt")
    assert calls == {"wrap": 1, "backward": 7, "step": 7} and hist.skipped_steps == 4
    assert load_torch(tmp_path / "c.pt")["hooks"] == {"scale": 2.0}
    again = Counting()
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy, _data(), epochs=1,
        batch_size=10, hooks=again, checkpoint=tmp_path / "c.pt", resume=True)
    assert again.scale == 2.0  # hook state restored on resume


def test_checkpoint_carries_spec_and_extra(tmp_path):
    spec = model_spec("mlp", in_features=6, num_classes=3, hidden=(8,))
    torch.manual_seed(0)
    model = build("mlp", **spec["kwargs"])
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_for_task("classification"), _data(), epochs=1,
        batch_size=16, checkpoint=tmp_path / "m.pt", model_spec=spec, extra={"dataset": "toy"})
    assert checkpoint_extra(tmp_path / "m.pt") == {"dataset": "toy"}
    assert torch.equal(load_model(tmp_path / "m.pt").net[1].weight, model.net[1].weight)
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy, _data(), epochs=1,
        batch_size=16, checkpoint=tmp_path / "nospec.pt")
    with pytest.raises(ValueError, match="model_spec"):
        load_model(tmp_path / "nospec.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_resume_refuses_a_different_batch_size(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy, _data(), epochs=1,
        batch_size=10, checkpoint=tmp_path / "c.pt", max_steps=2)
    with pytest.raises(ValueError, match="batch_size=10"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy, _data(), epochs=1,
            batch_size=20, checkpoint=tmp_path / "c.pt", resume=True)


@pytest.mark.parametrize("kwargs,message", [
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
    ({"checkpoint_every": 2}, "checkpoint path is required"),
    ({"resume": True}, "checkpoint path is required"),
    ({"max_steps": 0}, "max_steps"),
    ({"batch_size": 100, "drop_last": True}, "no batch"),
])
def test_fit_bad_arguments(kwargs, message):
    model = nn.Linear(6, 3)
    args = {"epochs": 1, "batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy, _data(), **args)


def test_task_losses_against_closed_forms():
    logits = torch.tensor([[0.3], [-1.2]])
    y = torch.tensor([1, 0])
    bce = loss_for_task("binary")(logits, y)
    p = torch.sigmoid(logits.reshape(-1))
    assert bce.item() == pytest.approx(-(torch.log(p[0]) + torch.log(1 - p[1])).item() / 2, rel=1e-6)
    seq = torch.randn(2, 3, 5)
    tgt = torch.randint(0, 5, (2, 3))
    manual = -torch.log_softmax(seq, -1).gather(-1, tgt[..., None]).mean()
    assert sequence_cross_entropy(seq, tgt).item() == pytest.approx(manual.item(), rel=1e-6)
    with pytest.raises(ValueError, match="task must be"):
        loss_for_task("ranking")


def test_evaluate_restores_every_submodule_mode():
    from torch import nn as _nn

    from leantrain.data import load_dataset as _load
    from leantrain.models import LeNet as _LeNet
    from leantrain.train import evaluate as _evaluate

    model = _LeNet(in_channels=1)
    model.train()
    model.classifier.eval()  # mixed modes, as a partially frozen model has
    before = [m.training for m in model.modules()]
    _evaluate(model, _nn.functional.cross_entropy, _load("digits").test)
    assert [m.training for m in model.modules()] == before
