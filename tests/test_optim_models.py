"""PBQN on real model shapes in train() mode: a ResNet with BatchNorm and a small transformer with
dropout (HF BERT built from a config, random weights), through both closure forms. Every loss PBQN
reports is recomputed independently with plain forward passes; the L2 penalty covers parameters only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leantrain.models.resnet import ResNet
from leantrain.optim import PBQN, BatchLoss, ProgressiveSampler
from leantrain.optim.pbqn import chunk_bounds, chunk_seed
from leantrain.optim.problems import cross_entropy_loss
from leantrain.optim.sampler import overlap_size


def _layout(opt: PBQN, b: int) -> list[tuple[int, int]]:
    """The micro-batches of the next iteration on a batch of ``b``: the documented layout."""
    if b == opt.sampler.num_samples:
        return chunk_bounds(b, opt.param_groups[0]["groups"])
    a = opt.state[opt.param_groups[0]["params"][0]].get("carry_size", 0)
    c = overlap_size(b, opt.sampler.overlap)
    return chunk_bounds(b, opt.param_groups[0]["groups"], (a, b - c))


def _penalty(model: nn.Module, l2: float) -> torch.Tensor:
    return 0.5 * l2 * sum(p.detach().pow(2).sum() for n, p in model.named_parameters() if not n.endswith("bias"))


def test_pbqn_resnet_with_batchnorm_in_train_mode_reports_the_true_batch_loss():
    torch.manual_seed(0)
    model = ResNet(depth=8, width=4, in_channels=3, num_classes=4).train()
    x, y = torch.randn(96, 3, 8, 8), torch.randint(0, 4, (96,))
    l2 = 1e-2
    sampler = ProgressiveSampler(96, 24, overlap=0.25, seed=0)
    opt = PBQN(model.parameters(), sampler, groups=4)
    for _ in range(5):
        rows = torch.as_tensor(sampler.next_batch())
        w0 = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():  # independent recomputation: the batch's loss with BN in train mode
            probe = ResNet(depth=8, width=4, in_channels=3, num_classes=4).train()
            probe.load_state_dict(model.state_dict())
            expected = float(nn.functional.cross_entropy(probe(x[rows]), y[rows])) + float(_penalty(model, l2))
        loss = opt.step(BatchLoss(model, cross_entropy_loss, x[rows], y[rows], l2=l2))
        rec = opt.log[-1]
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        # an accepted step decreased that same function (BN in train mode ignores its running statistics)
        if rec["accepted"]:
            with torch.no_grad():
                probe.load_state_dict(model.state_dict())
                after = float(nn.functional.cross_entropy(probe(x[rows]), y[rows])) + float(_penalty(model, l2))
            assert after < expected
        else:
            assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert len(opt.log) == 5 and all(torch.isfinite(torch.tensor(r["loss"])) for r in opt.log)
    assert sum(r["accepted"] for r in opt.log) >= 3


def test_batch_loss_penalty_covers_parameters_not_buffers():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    model[1].running_var.fill_(1e3)  # a large buffer must not enter the penalty
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    obj = BatchLoss(model, cross_entropy_loss, x, y, l2=0.5)
    params = list(model.parameters())
    values, _ = obj.per_sample_gradients(params)
    with torch.no_grad():
        plain = nn.functional.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(values, plain + _penalty(model, 0.5))
    torch.testing.assert_close(obj.value(), (plain + _penalty(model, 0.5)).mean())


def test_pbqn_plain_closure_on_a_bert_with_dropout_in_train_mode():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).train()
    tokens, labels = torch.randint(0, 40, (64, 8)), torch.randint(0, 3, (64,))
    l2 = 1e-3

    def closure(idx: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=tokens[idx]).logits
        return nn.functional.cross_entropy(logits, labels[idx]) + _penalty_live(model, l2)

    sampler = ProgressiveSampler(64, 16, overlap=0.25, seed=0)
    opt = PBQN(model.parameters(), sampler, groups=4, seed=3)
    for k in range(5):
        rows = torch.as_tensor(_replay(sampler, sampler.state_dict()).next_batch())
        chunks = _layout(opt, len(rows))
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            expected = 0.0
            for j, (lo, hi) in enumerate(chunks):
                torch.manual_seed(chunk_seed(3, k, j))
                logits = model(input_ids=tokens[rows[lo:hi]]).logits
                expected += float(nn.functional.cross_entropy(logits, labels[rows[lo:hi]], reduction="sum"))
            expected = expected / len(rows) + float(_penalty(model, l2))
        loss = opt.step(closure)
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        assert opt.log[-1]["batch_size"] == len(rows)
    assert sum(r["accepted"] for r in opt.log) >= 3


def _penalty_live(model: nn.Module, l2: float) -> torch.Tensor:
    return 0.5 * l2 * sum(p.pow(2).sum() for n, p in model.named_parameters() if not n.endswith("bias"))


def _replay(sampler: ProgressiveSampler, state: dict) -> ProgressiveSampler:
    """A copy of ``sampler`` in ``state``, to read the batch PBQN is about to draw."""
    twin = ProgressiveSampler(sampler.num_samples, 1, overlap=sampler.overlap)
    twin.load_state_dict(state)
    return twin


def test_pbqn_rejects_closures_it_cannot_use():
    model = nn.Linear(2, 1)
    opt = PBQN(model.parameters(), ProgressiveSampler(10, 4), variance="per-sample")
    with pytest.raises(TypeError, match="per-sample"):
        opt.step(lambda idx: model(torch.ones(len(idx), 2)).pow(2).mean())
    with pytest.raises(TypeError, match="closure"):
        PBQN(model.parameters(), ProgressiveSampler(10, 4)).step(3)
    with pytest.raises(ValueError, match="scalar"):
        PBQN(model.parameters(), ProgressiveSampler(10, 4)).step(lambda idx: model(torch.ones(len(idx), 2)))


@pytest.mark.parametrize("path", ["vmap", "batched-backward"])
def test_micro_batch_gradients_equal_separate_backward_passes(path):
    """Both ways PBQN gets micro-batch gradient sums of a BatchLoss (vmap over micro-batches; one backward
    batched over indicator cotangents) equal one ordinary backward pass per micro-batch."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 5))  # >= 1000 parameters
    x, y = torch.randn(1100, 20), torch.randint(0, 5, (1100,))  # batch x parameters >= 1e6: the vmap path
    obj = BatchLoss(model, cross_entropy_loss, x, y, l2=0.1)
    opt = PBQN(model.parameters(), ProgressiveSampler(2000, 1100), groups=4)
    opt._vmap_chunks = None if path == "vmap" else False
    chunks = chunk_bounds(1100, 4, (5, 828))
    sums, grads = opt._batch_evals(obj, chunks, True)
    assert opt._vmap_chunks is (True if path == "vmap" else False)
    params = list(model.parameters())
    for j, (lo, hi) in enumerate(chunks):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi], reduction="sum") + (hi - lo) * _penalty_live(model, 0.1)
        loss.backward()
        torch.testing.assert_close(sums[j], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[j], torch.cat([p.grad.reshape(-1) for p in params]), rtol=1e-4, atol=1e-6)
