"""Multi-process tests of leantrain.distributed: gloo ranks on 127.0.0.1, spawned here, bounded by timeouts.

Oracles: single-process training on the global batch (float64), nn.Linear (float64), numpy least squares, and
an uninterrupted run for the kill/resume test. Each spawn runs several checks, to pay the process start-up
(importing torch) once; the test functions then assert on the collected results.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from leantrain.distributed import (
    ColumnParallelLinear,
    DataParallelHooks,
    DataParallelModule,
    Distribution,
    RowParallelLinear,
    SpawnError,
    spawn,
)

STEPS = 4
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(global_batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, global_batch, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (STEPS, global_batch), generator=g))


def _optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=0.01)


def _reference(kind: str) -> list[torch.Tensor]:
    """One process, global batch, plain optimizer."""
    model = _mlp()
    opt = _optimizer(kind, model.parameters())
    X, Y = _batches()
    for x, y in zip(X, Y):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _dp_run(rank: int, ws: int, d: Distribution, kind: str, **kw) -> tuple[list[torch.Tensor], dict]:
    set_to_none = kw.pop("set_to_none", True)  # False: backward accumulates straight into the buckets
    message_bytes = kw.pop("message_bytes", None)  # all-reduce buckets in pieces of this many bytes
    model = _mlp()
    dp = DataParallelModule(model, d, bucket_mb=0.001, **kw)  # ~1 KB buckets: several buckets for this tiny MLP
    if message_bytes:
        dp.MESSAGE_BYTES = message_bytes
    opt = dp.optimizer(_optimizer(kind, model.parameters()))
    X, Y = _batches()
    b = X.shape[1] // ws
    for x, y in zip(X, Y):
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(dp(x[rank * b:(rank + 1) * b]), y[rank * b:(rank + 1) * b]).backward()
        opt.step()
    state = opt.state_dict()
    info = {"buckets": len(dp.buckets), "bytes": dp.stats[-1].bytes_sent, "opt_state": state, "layout": dp.layout()}
    dp.close()
    return [p.detach().clone() for p in model.parameters()], info


# ---------------------------------------------------------------------------------------------- 2-rank worker
class _NetWithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))
        self.unused = nn.Linear(3, 2)  # not called by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _averaging_worker(rank: int, ws: int, d: Distribution) -> dict:
    """DataParallelModule's averaged gradients and buffers vs the oracle ``dist.all_reduce(local) / ws``, in float32,
    for every way a gradient reaches a bucket: copied (fresh ``param.grad``), accumulated into the bucket
    (``set_to_none=False``), explicit (``exchange_gradients``, a parameter unused by forward but with a gradient).
    With backward, the module that forward never calls is found unused (``find_unused_parameters``) and keeps
    ``grad`` None on every rank, as with DDP."""
    import torch.distributed as dist

    def net() -> nn.Module:
        torch.manual_seed(4)
        return _NetWithUnused()

    def oracle(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / ws

    g = torch.Generator().manual_seed(10 + rank)  # every rank has its own data
    results: dict = {}
    for mode in ({}, {"priority": False}, {"overlap": False}, {"set_to_none": False},
                 {"set_to_none": False, "priority": False}, {"autograd": True},
                 {"set_to_none": False, "priority": False, "message_bytes": 24}):
        kw = dict(mode)
        set_to_none, by_autograd = kw.pop("set_to_none", True), kw.pop("autograd", False)
        message_bytes = kw.pop("message_bytes", None)
        model, local = net(), net()
        if not by_autograd:
            kw["find_unused_parameters"] = True
        kw["broadcast_buffers"] = "average"
        dp = DataParallelModule(model, d, bucket_mb=0.00005, **kw)  # 52 B: many buckets, the first mixes used and unused
        if message_bytes:  # buckets all-reduced in pieces that cut through parameters
            dp.MESSAGE_BYTES = message_bytes
        mismatches = []
        for step in range(3):
            x = torch.randn(6, 5, generator=g)
            stale = torch.full_like(model.unused.weight, float(rank + step))
            # oracle: the same step on an unwrapped copy holding the same parameters
            local.load_state_dict(model.state_dict())
            loss_local = local(x).pow(2).sum()
            grads = torch.autograd.grad(loss_local, [p for n, p in local.named_parameters() if not n.startswith("unused")])
            expect = [oracle(t) for t in grads]
            expect += [oracle(stale), oracle(torch.zeros_like(model.unused.bias))] if by_autograd else [None, None]
            expect_buffers = [oracle(b) for b in local.buffers() if b.is_floating_point()]
            if step > 0:
                for p in model.parameters():
                    if set_to_none:
                        p.grad = None
                    elif p.grad is not None:
                        p.grad.zero_()
            loss = dp(x).pow(2).sum()
            if by_autograd:  # gradients computed by other means, then exchanged explicitly
                used = [p for n, p in model.named_parameters() if not n.startswith("unused")]
                for p, gr in zip(used, torch.autograd.grad(loss, used)):
                    p.grad = gr
                model.unused.weight.grad = stale.clone()
                dp.exchange_gradients()
            else:
                loss.backward()  # the averaged gradients are in param.grad when backward returns
            got = [p.grad for p in model.parameters()]
            mismatches += [i for i, (a, b) in enumerate(zip(got, expect))
                           if (a is None) != (b is None) or (a is not None and not torch.equal(a, b))]
            bufs = [b for b in model.buffers() if b.is_floating_point()]
            mismatches += [f"buffer {i}" for i, (a, b) in enumerate(zip(bufs, expect_buffers)) if not torch.equal(a, b)]
        results[tuple(sorted(mode.items()))] = (mismatches, len(dp.buckets))
        dp.close()
    return results


def _lstsq_problem(ws: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    A = torch.randn(ws, 40, 20, generator=g)
    A[1] *= 0.3  # ranks see differently scaled data: their gradients disagree at the optimum
    A[:, :, :5] *= 3
    return A, torch.randn(ws, 40, generator=g)


def _two_rank_worker(rank: int, ws: int, resume_dir: str) -> dict:
    torch.manual_seed(0)
    d = Distribution(timeout_s=30)
    out: dict = {"rank": rank, "data_group": d.data_group.ranks, "model_group": d.model_group.ranks, "kind": d.kind}
    # data-parallel equivalence, every scheduling mode, plain and distributed update
    for kind in ("sgd", "adam"):
        for mode in ({}, {"priority": False}, {"overlap": False}, {"overlap": False, "priority": False},
                     {"distributed_update": True}, {"distributed_update": True, "priority": False},
                     {"set_to_none": False}, {"set_to_none": False, "priority": False},
                     {"message_bytes": 200, "set_to_none": False}):
            out[("dp", kind, tuple(sorted(mode.items())))] = _dp_run(rank, ws, d, kind, **mode)
    # model-parallel Linear vs nn.Linear (float64), forward and backward
    torch.manual_seed(5)
    full1, full2 = nn.Linear(6, 8).double(), nn.Linear(8, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    col = ColumnParallelLinear.from_linear(full1, d.global_group, gather_output=False)
    row = RowParallelLinear.from_linear(full2, d.global_group, input_is_parallel=True)
    y = row(torch.tanh(col(x)))
    (y.pow(2).sum()).backward()
    col_g = ColumnParallelLinear.from_linear(full1, d.global_group, gather_output=True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = col_g(x2)
    (y2 * torch.arange(8, dtype=torch.float64)).sum().backward()
    row_full = RowParallelLinear.from_linear(full2, d.global_group, input_is_parallel=False)
    x3 = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    y3 = row_full(x3)
    (y3 * torch.arange(4, dtype=torch.float64)).sum().backward()
    out["mp"] = {"y": y.detach(), "x_grad": x.grad, "col_w_grad": col.weight.grad, "col_b_grad": col.bias.grad,
                 "row_w_grad": row.weight.grad, "row_b_grad": row.bias.grad, "y2": y2.detach(), "x2_grad": x2.grad,
                 "y3": y3.detach(), "x3_grad": x3.grad, "row_full_w_grad": row_full.weight.grad}
    # error feedback on a convex problem: least squares, sign and int8 compression
    A, b = _lstsq_problem(ws)
    for comp, ef in (("sign", True), ("sign", False), ("int8", True), ("none", False)):
        model = nn.Linear(20, 1, bias=False)
        nn.init.zeros_(model.weight)
        dp = DataParallelModule(model, d, compression=comp, error_feedback=ef)
        opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
        for _ in range(250):
            opt.zero_grad()
            (0.5 * (dp(A[rank]).squeeze(1) - b[rank]).pow(2).mean()).backward()
            opt.step()
        out[("ef", comp, ef)] = (model.weight.detach().view(-1).clone(), dp.stats[-1].bytes_sent)
        dp.close()
    out["averaging"] = _averaging_worker(rank, ws, d)
    out["fit"] = _fit_worker(rank, ws)
    out["resume_reference"] = _resume_fit(resume_dir, 0)  # uninterrupted run for the kill/resume test
    return out


@pytest.fixture(scope="module")
def resume_reference_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume_reference")


@pytest.fixture(scope="module")
def two_ranks(resume_reference_dir) -> list[dict]:
    return spawn(_two_rank_worker, 2, (str(resume_reference_dir),), timeout_s=150, collective_timeout_s=60)


MODES = [(), (("priority", False),), (("overlap", False),), (("overlap", False), ("priority", False)),
         (("distributed_update", True),), (("distributed_update", True), ("priority", False)), (("set_to_none", False),),
         (("priority", False), ("set_to_none", False)), (("message_bytes", 200), ("set_to_none", False))]


def test_distribution_groups(two_ranks):
    for r, res in enumerate(two_ranks):
        assert res["data_group"] == [0, 1] and res["model_group"] == [r] and res["kind"] == "data"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m) or "default")
def test_data_parallel_equals_single_process_large_batch(two_ranks, kind, mode):
    ref = _reference(kind)
    for res in two_ranks:
        params, info = res[("dp", kind, mode)]
        assert info["buckets"] >= 3
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    # the replicas stay bitwise equal to each other
    for p, q in zip(two_ranks[0][("dp", kind, mode)][0], two_ranks[1][("dp", kind, mode)][0]):
        assert torch.equal(p, q)


def test_averaged_gradients_and_buffers_equal_all_reduce_oracle(two_ranks):
    for res in two_ranks:
        for mode, (mismatches, buckets) in res["averaging"].items():
            assert buckets >= 3, mode
            assert mismatches == [], (mode, mismatches)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_distributed_update_equals_plain_update(two_ranks, kind):
    plain_params, plain = two_ranks[0][("dp", kind, ())]
    for res in two_ranks:
        params, sharded = res[("dp", kind, (("distributed_update", True),))]
        for p, q in zip(params, plain_params):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        # the consolidated optimizer state has the plain optimizer's format and values
        a, b = sharded["opt_state"]["state"], plain["opt_state"]["state"]
        assert a.keys() == b.keys()
        for k in a:
            for key in b[k]:
                torch.testing.assert_close(a[k][key], b[k][key], rtol=1e-12, atol=1e-12)
        # reduce-scatter sends half of what an all-reduce does
        assert sharded["bytes"] * 2 == plain["bytes"]


@pytest.mark.timeout(200)
def test_model_parallel_linear_equals_nn_linear(two_ranks):
    import copy

    torch.manual_seed(5)
    full1, full2 = nn.Linear(6, 8).double(), nn.Linear(8, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    # graph 1: column (sliced output) -> tanh -> row (sliced input)
    y = full2(torch.tanh(full1(x)))
    y.pow(2).sum().backward()
    # graph 2: column with gathered output alone; graph 3: row with the full input alone
    x2 = x.detach().clone().requires_grad_(True)
    y2 = copy.deepcopy(full1)(x2)
    (y2 * torch.arange(8, dtype=torch.float64)).sum().backward()
    x3 = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    y3 = copy.deepcopy(full2)(x3)
    (y3 * torch.arange(4, dtype=torch.float64)).sum().backward()
    for r, res in enumerate(two_ranks):
        mp = res["mp"]
        torch.testing.assert_close(mp["y"], y.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mp["x_grad"], x.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mp["col_w_grad"], full1.weight.grad[4 * r:4 * (r + 1)], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mp["col_b_grad"], full1.bias.grad[4 * r:4 * (r + 1)], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mp["row_w_grad"], full2.weight.grad[:, 4 * r:4 * (r + 1)], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mp["row_b_grad"], full2.bias.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mp["y2"], y2.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mp["x2_grad"], x2.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mp["y3"], y3.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mp["x3_grad"], x3.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(200)
def test_error_feedback_makes_sign_compression_converge(two_ranks):
    A, b = _lstsq_problem(2)
    w_star = np.linalg.lstsq(A.reshape(-1, 20).double().numpy(), b.reshape(-1).double().numpy(), rcond=None)[0]

    def rel_err(key):
        w = two_ranks[0][key][0].double().numpy()
        return np.linalg.norm(w - w_star) / np.linalg.norm(w_star)

    exact = rel_err(("ef", "none", False))
    with_ef, without_ef = rel_err(("ef", "sign", True)), rel_err(("ef", "sign", False))
    # error-feedback sign SGD gets as close as uncompressed SGD (same steps) up to a small margin ...
    assert with_ef < exact + 0.05
    # ... while plain scaled-sign exchange stalls far from the optimum
    assert without_ef > 5 * with_ef and without_ef > 0.2
    assert rel_err(("ef", "int8", True)) < exact + 0.01
    # bytes on the wire per step: fp32 all-reduce 2(P-1)/P*80 B; sign: 2 phases x (4 B scale + 10 bits -> 2 B)
    assert two_ranks[0][("ef", "none", False)][1] == 80
    assert two_ranks[0][("ef", "sign", True)][1] == 2 * (4 + 2)
    assert two_ranks[0][("ef", "int8", True)][1] == 2 * (4 + 10)
    # the replicas apply the same (decompressed) update
    assert torch.equal(two_ranks[0][("ef", "sign", True)][0], two_ranks[1][("ef", "sign", True)][0])


# ---------------------------------------------------------------------------------------------- hybrid 2 x 2
def _hybrid_model(d: Distribution | None) -> nn.Module:
    torch.manual_seed(7)
    l1, l2 = nn.Linear(6, 8).double(), nn.Linear(8, 3).double()
    if d is None:
        return nn.Sequential(l1, nn.Tanh(), l2)
    return nn.Sequential(ColumnParallelLinear.from_linear(l1, d, gather_output=False), nn.Tanh(),
                         RowParallelLinear.from_linear(l2, d, input_is_parallel=True))


def _hybrid_worker(rank: int, ws: int) -> dict:
    d = Distribution(2, 2, timeout_s=30)
    model = _hybrid_model(d)
    dp = DataParallelModule(model, d, bucket_mb=0.0005)
    opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    X, Y = _batches()
    b = X.shape[1] // d.data_size
    lo = d.data_rank * b
    for x, y in zip(X, Y):
        opt.zero_grad()
        nn.functional.cross_entropy(dp(x[lo:lo + b]), y[lo:lo + b]).backward()
        opt.step()
    return {"data": d.data_group.ranks, "model": d.model_group.ranks, "kind": d.kind, "model_rank": d.model_rank,
            "params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.timeout(150)
def test_hybrid_two_by_two_on_four_processes():
    res = spawn(_hybrid_worker, 4, timeout_s=140, collective_timeout_s=60)
    assert [r["model"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["data"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r["kind"] == "hybrid" for r in res)
    ref = _hybrid_model(None)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    X, Y = _batches()
    for x, y in zip(X, Y):
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    w1, b1, w2, b2 = (p.detach() for p in ref.parameters())
    for r in res:
        m = r["model_rank"]
        cw1, cb1, rw2, rb2 = r["params"]
        torch.testing.assert_close(cw1, w1[4 * m:4 * (m + 1)], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cb1, b1[4 * m:4 * (m + 1)], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rw2, w2[:, 4 * m:4 * (m + 1)], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rb2, b2, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- faults
def _dies_mid_training(rank: int, ws: int) -> None:
    d = Distribution(timeout_s=8)
    model = _mlp()
    dp = DataParallelModule(model, d)
    opt = dp.optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    X, Y = _batches()
    for step, (x, y) in enumerate(zip(X, Y)):
        if step == 2 and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        opt.zero_grad()
        nn.functional.cross_entropy(dp(x), y).backward()
        opt.step()


@pytest.mark.timeout(90)
def test_killed_rank_gives_clear_error_within_timeout():
    with pytest.raises(SpawnError) as info:
        spawn(_dies_mid_training, 2, timeout_s=60, collective_timeout_s=8)
    err = info.value
    assert err.outcomes[1].startswith("died")
    text = err.errors[0]
    assert "CollectiveError" in text, text
    m = re.search(r"rank 0: collective (.+?) over ranks \[0, 1\] failed after ([0-9.]+) s \(timeout 8 s\)", text)
    assert m, text
    assert "bucket" in m.group(1) or "negotiation" in m.group(1)
    assert float(m.group(2)) <= 8 + 2  # within the collective timeout (plus scheduling slack)


# ---------------------------------------------------------------------------------------------- kill + resume
def _resume_fit(out: str, kill_at: int) -> list[torch.Tensor]:
    """fit() with DataParallelHooks (int8 compression, error feedback), checkpoint every 3 steps; rank 1
    SIGKILLs itself after step ``kill_at`` of the first torchrun attempt (0: never)."""
    from leantrain.train import fit

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hooks = DataParallelHooks(Distribution(timeout_s=20), compression="int8", bucket_mb=0.001)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    with open(os.path.join(out, "attempts.txt"), "a") as f:
        f.write(f"{os.environ['RANK']}:{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}\n")

    def maybe_die(step: int, loss: float) -> None:
        if kill_at and first_attempt and step == kill_at and int(os.environ["RANK"]) == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    fit(model, opt, nn.functional.cross_entropy, torch.utils.data.TensorDataset(x, y), epochs=2, batch_size=16,
        seed=0, hooks=hooks, checkpoint=os.path.join(out, "ckpt.pt"), checkpoint_every=3, resume=True,
        eval_train=False, step_callback=maybe_die)
    return [p.detach().clone() for p in model.parameters()]


TRAIN_SCRIPT = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from leantrain.distributed import init_from_env
from test_distributed_multiprocess import _resume_fit
init_from_env(timeout_s=20)
_resume_fit(sys.argv[1], int(sys.argv[2]))
"""


def _torchrun(script: Path, out: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    # The monitor polls every 2 s: torchrun terminates the survivor when it sees rank 1 gone, and a shorter
    # interval races the survivor's own CollectiveError (asserted below) on a loaded machine.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--standalone", "--monitor-interval", "2",
           str(script), str(out), str(kill_at)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)


@pytest.mark.timeout(150)
def test_resume_after_kill_under_torchrun_is_bit_identical(tmp_path, two_ranks, resume_reference_dir):
    script = tmp_path / "train_dp.py"
    script.write_text(TRAIN_SCRIPT)
    killed = _torchrun(script, tmp_path, kill_at=8)
    assert killed.returncode == 0, killed.stderr[-3000:]
    # rank 1 was killed in the first attempt; torchrun restarted both ranks once, from the step-6 checkpoint
    assert sorted((tmp_path / "attempts.txt").read_text().split()) == ["0:0", "0:1", "1:0", "1:1"]
    assert "CollectiveError: rank 0" in killed.stderr  # the survivor's clear error
    a = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    b = torch.load(resume_reference_dir / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 12
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, st in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], st["momentum_buffer"])
    # both ranks' error-feedback residuals are in the one checkpoint, and identical after resume
    ra, rb = a["hooks"]["comm"]["ranks"], b["hooks"]["comm"]["ranks"]
    assert len(ra) == 2
    for x, y in zip(ra, rb):
        for u, v in zip(x["residual"], y["residual"]):
            assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------------- fit + hooks
def _fit_worker(rank: int, ws: int) -> list[torch.Tensor]:
    from leantrain.train import fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fit(model, opt, nn.functional.cross_entropy, torch.utils.data.TensorDataset(x, y), epochs=2, batch_size=16,
        seed=0, hooks=DataParallelHooks(Distribution(timeout_s=30), bucket_mb=0.001), eval_train=False)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.timeout(200)
def test_fit_with_data_parallel_hooks_equals_single_process_fit(two_ranks):
    from leantrain.train import fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fit(model, opt, nn.functional.cross_entropy, torch.utils.data.TensorDataset(x, y), epochs=2, batch_size=16,
        seed=0, eval_train=False)
    for res in two_ranks:
        for p, q in zip(res["fit"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.timeout(120)
def test_cli_train_dp_under_torchrun_writes_history_and_merged_trace(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "leantrain",
           "train", "--model", "mlp", "--dataset", "digits", "--dp", "--epochs", "1", "--batch-size", "16",
           "--max-steps", "6", "--bucket-mb", "0.01", "--compression", "int8", "--distributed-update",
           "--trace", str(tmp_path / "t.json"), "--out", str(tmp_path), "--no-progress", "--json"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    hist = json.loads((tmp_path / "history.json").read_text())
    d = hist["distributed"]
    assert d["processes"] == 2 and d["compression"] == "int8" and d["distributed_update"] is True
    assert hist["steps"] == 6 and len(d["bytes_per_bucket"]) == len(d["buckets"]) >= 2
    trace = json.loads((tmp_path / "t.json").read_text())
    assert {e["pid"] for e in trace["traceEvents"]} == {0, 1}
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["batch_size"] == 32  # the global batch: 2 processes x 16
