"""PBQN, DANCE and their parts against independent oracles: scipy's optimum, dense BFGS and Hessian
matrices, finite differences, numpy variances and torch.distributed (gloo) runs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from leantrain.app.runs import compare_iterates, run_dance, run_dance_distributed
from leantrain.optim import (
    DANCE,
    PBQN,
    BatchLoss,
    ProgressiveSampler,
    conjugate_gradient,
    inner_product_test,
    powell_damping,
    two_loop,
)
from leantrain.optim.pbqn import initial_steplength, quadratic_forms
from leantrain.optim.problems import binary_logistic_loss, make_problem, reference_optimum


@pytest.fixture(autouse=True, scope="module")
def _float64_default():
    """These tests compare against float64 oracles (scipy, dense algebra); scope it to this module."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def convex(_float64_default):
    """Strongly convex L2 logistic regression on breast cancer (float64) and its scipy optimum."""
    problem = make_problem("logreg", "breast_cancer", l2=1e-2)
    return problem, reference_optimum(problem)


def dense_bfgs_inverse(s_list, y_list, gamma):
    d = s_list[0].numel()
    h = gamma * torch.eye(d)
    for s, y in zip(s_list, y_list):
        rho = 1.0 / y.dot(s)
        left = torch.eye(d) - rho * torch.outer(s, y)
        h = left @ h @ left.T + rho * torch.outer(s, s)
    return h


def test_two_loop_equals_dense_bfgs_inverse():
    gen = torch.Generator().manual_seed(1)
    d, m = 7, 5
    a = torch.randn(d, d, generator=gen)
    hess = a @ a.T + 0.5 * torch.eye(d)
    s_list = [torch.randn(d, generator=gen) for _ in range(m)]
    y_list = [hess @ s + 0.01 * torch.randn(d, generator=gen) for s in s_list]
    assert all(float(y.dot(s)) > 0 for s, y in zip(s_list, y_list))
    gamma = float(s_list[-1].dot(y_list[-1]) / y_list[-1].dot(y_list[-1]))
    h = dense_bfgs_inverse(s_list, y_list, gamma)
    g = torch.randn(d, generator=gen)
    torch.testing.assert_close(two_loop(g, s_list, y_list, gamma), h @ g, rtol=1e-12, atol=1e-12)
    batch = torch.randn(4, d, generator=gen)
    torch.testing.assert_close(two_loop(batch, s_list, y_list, gamma), batch @ h.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(quadratic_forms(batch, s_list, y_list, gamma), ((batch @ h) * batch).sum(1),
                               rtol=1e-10, atol=1e-10)
    # the newest pair satisfies the secant equation H y = s
    torch.testing.assert_close(h @ y_list[-1], s_list[-1], rtol=1e-10, atol=1e-10)


def test_hvp_equals_finite_differences_and_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    loss_fn = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
    obj = BatchLoss(model, loss_fn, x, y, l2=0.1)
    params = list(model.parameters())
    w = torch.cat([p.detach().reshape(-1) for p in params])
    v = torch.randn(w.numel())
    hv = obj.hvp(params, v)

    def f(flat):
        named, off = {}, 0
        for (name, p) in model.named_parameters():
            named[name] = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
        out = torch.func.functional_call(model, named, (x,))
        return loss_fn(out, y).mean() + obj.penalty(named)

    dense = torch.autograd.functional.hessian(f, w)
    torch.testing.assert_close(hv, dense @ v, rtol=1e-10, atol=1e-12)
    eps = 1e-5

    def grad_at(flat):
        with torch.no_grad():
            for p, q in zip(params, torch.split(flat, [p.numel() for p in params])):
                p.copy_(q.view_as(p))
        return obj.gradient(params)[1]

    fd = (grad_at(w + eps * v) - grad_at(w - eps * v)) / (2 * eps)
    grad_at(w)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)


def test_per_sample_gradients_are_each_samples_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    obj = BatchLoss(model, binary_logistic_loss, x, y, l2=0.5)
    params = list(model.parameters())
    values, grads = obj.per_sample_gradients(params)
    for i in range(6):
        f_i, g_i = obj.gradient(params, torch.tensor([i]))
        torch.testing.assert_close(grads[i], g_i)
        torch.testing.assert_close(values[i], f_i)


def test_pbqn_in_a_dataloader_loop_reaches_scipy_optimum(convex):
    problem, ref = convex
    problem.set_flat_weights(torch.zeros_like(ref["weights"]))
    train = TensorDataset(problem.x_train, problem.y_train)
    sampler = ProgressiveSampler(len(train), batch_size=32, overlap=0.25, seed=0)
    loader = DataLoader(train, batch_sampler=sampler)
    opt = PBQN(problem.parameters(), sampler)
    for _, (x, y) in zip(range(200), loader):
        opt.step(BatchLoss(problem.model, problem.loss_fn, x, y, l2=problem.l2))
        if sampler.batch_size == problem.n and opt.log[-1]["grad_norm"] < 1e-11:
            break
    sizes = [r["batch_size"] for r in opt.log]
    assert sizes == sorted(sizes) and sizes[-1] == problem.n > sizes[0]
    w = problem.flat_weights()
    assert float((w - ref["weights"]).norm() / ref["weights"].norm()) <= 1e-6
    assert abs(problem.evaluate()["objective"] - ref["objective"]) <= 1e-6 * abs(ref["objective"])
    problem.set_flat_weights(torch.zeros_like(w))


def test_dance_reaches_scipy_optimum_through_its_stages(convex):
    problem, ref = convex
    problem.set_flat_weights(torch.zeros_like(ref["weights"]))
    trace = run_dance(problem, initial_samples=50, final_gradient_tol=1e-10)
    sizes = trace.info["stage_sizes"]
    assert sizes[:4] == [50, 100, 200, 400] and sizes[-1] == problem.n
    # each stage ended only when its gradient test held, and every Newton step was taken before it did
    ends = [r for r in trace.info["log"] if r["event"] == "stage_end"]
    assert [r["n"] for r in ends] == sizes and all(r["grad_norm"] <= r["target"] and not r["forced"] for r in ends)
    assert all(r["grad_norm"] > r["target"] for r in trace.info["log"] if r["event"] == "newton")
    w = problem.flat_weights()
    assert float((w - ref["weights"]).norm() / ref["weights"].norm()) <= 1e-6
    assert abs(trace.final("objective") - ref["objective"]) <= 1e-6 * abs(ref["objective"])
    problem.set_flat_weights(torch.zeros_like(w))


def test_conjugate_gradient_solves_spd_system():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(8, 8, generator=gen)
    a = a @ a.T + torch.eye(8)
    b = torch.randn(8, generator=gen)
    v, r, it, neg = conjugate_gradient(lambda u: a @ u, b, 1e-12, 50)
    assert not neg and it <= 8 + 2
    torch.testing.assert_close(v, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r, b - a @ v, rtol=1e-8, atol=1e-9)


def test_sample_test_statistic_matches_numpy_and_formula():
    gen = np.random.default_rng(0)
    dots = gen.normal(size=40)
    ghg, b, n, theta = 0.3, 40, 1000, 0.9
    t = inner_product_test(torch.from_numpy(dots), ghg, b, n, theta)
    var = np.var(dots, ddof=1)
    fpc = (n - b) / (n - 1)
    assert t.lhs == pytest.approx(fpc * var / b, rel=1e-12)
    assert t.rhs == pytest.approx(theta**2 * ghg**2, rel=1e-12)
    assert t.passed == (fpc * var / b <= theta**2 * ghg**2)
    assert t.b_hat == min(n, math.ceil(n * var / ((n - 1) * t.rhs + var)))
    grads = gen.normal(size=(40, 6))
    var_vec = float(np.var(grads, axis=0, ddof=1).sum())
    g = torch.from_numpy(grads.mean(0))
    centered = torch.from_numpy(grads - grads.mean(0))
    assert float(centered.pow(2).sum()) / 39 == pytest.approx(var_vec, rel=1e-12)
    assert initial_steplength(var_vec, g, b, n) == pytest.approx(1 / (1 + fpc * var_vec / (b * float(g.dot(g)))))
    assert initial_steplength(var_vec, g, n, n) == 1.0  # the whole data set: exact gradient, unit trial step
    # the size it asks for passes the test with the same variance estimate
    fpc_hat = (n - t.b_hat) / (n - 1)
    assert fpc_hat * var / t.b_hat <= t.rhs * (1 + 1e-12)


def test_batch_grows_when_gradients_are_noisy_not_when_exact(convex):
    problem, ref = convex
    # noisy: at the optimum a batch gradient is mostly noise
    problem.set_flat_weights(ref["weights"])
    sampler = ProgressiveSampler(problem.n, 32, seed=0)
    opt = PBQN(problem.parameters(), sampler)
    opt.step(problem.batch_loss(torch.as_tensor(sampler.next_batch())))
    assert not opt.log[-1]["test_passed"] and sampler.batch_size > 32
    problem.set_flat_weights(torch.zeros_like(ref["weights"]))
    # exact: every sample is the same, so every batch gradient is the full gradient
    model = nn.Linear(3, 1)
    x = torch.tensor([[0.5, -1.0, 2.0]]).repeat(500, 1)
    y = torch.ones(500, dtype=torch.long)
    sampler = ProgressiveSampler(500, 16, seed=0)
    opt = PBQN(model.parameters(), sampler)
    for _ in range(10):
        rows = torch.as_tensor(sampler.next_batch())
        opt.step(BatchLoss(model, binary_logistic_loss, x[rows], y[rows], l2=1e-2))
    assert all(r["test_passed"] for r in opt.log) and sampler.batch_size == 16


def test_powell_damping_keeps_update_positive_definite():
    gen = torch.Generator().manual_seed(5)
    d = 5
    # crafted pairs with negative or tiny curvature, B = I (empty memory)
    s_list = [torch.randn(d, generator=gen) for _ in range(4)]
    y_list = [-0.5 * s_list[0], 1e-3 * s_list[1], -s_list[2] + 0.1 * s_list[3], 0.2 * s_list[3]]
    raw = dense_bfgs_inverse(s_list[:1], y_list[:1], 1.0)
    assert float(torch.linalg.eigvalsh((raw + raw.T) / 2).min()) < 0  # undamped BFGS loses definiteness
    damped_s, damped_y = [], []
    for s, y in zip(s_list, y_list):
        h = dense_bfgs_inverse(damped_s, damped_y, 1.0) if damped_s else torch.eye(d)
        bs = torch.linalg.solve(h, s)
        yd, t = powell_damping(s, y, bs)
        assert float(s.dot(yd)) >= 0.2 * float(s.dot(bs)) * (1 - 1e-12)
        damped_s.append(s)
        damped_y.append(yd)
        hd = dense_bfgs_inverse(damped_s, damped_y, 1.0)
        assert float(torch.linalg.eigvalsh((hd + hd.T) / 2).min()) > 0
    # through the optimizer: the memory keeps positive curvature and counts the dampings
    model = nn.Linear(d, 1)
    opt = PBQN(model.parameters(), ProgressiveSampler(10, 10), update="powell")
    for s, y in zip(s_list, y_list):
        opt._store_pair(s, y, s.clone())
    ms, my = opt.memory()
    assert opt.counters["pairs_damped"] >= 2 and all(float(a.dot(b)) > 0 for a, b in zip(ms, my))
    # the skip rule leaves the memory unchanged
    opt2 = PBQN(model.parameters(), ProgressiveSampler(10, 10))
    opt2._store_pair(s_list[3], y_list[3], s_list[3])
    before = [t.clone() for t in opt2.memory()[0]]
    assert opt2._store_pair(s_list[0], y_list[0], s_list[0]) == "skipped"
    assert [torch.equal(a, b) for a, b in zip(before, opt2.memory()[0])] == [True] and opt2.counters["pairs_skipped"] == 1


def test_sampler_layout_overlap_and_growth():
    sampler = ProgressiveSampler(100, 20, overlap=0.25, seed=1)
    prev = sampler.next_batch()
    for size in (20, 33, 60, 100):
        sampler.grow_to(size)
        cur = sampler.next_batch()
        assert len(cur) == size and len(set(cur)) == size
        carried = prev[len(prev) - int(0.25 * len(prev)):]
        assert cur[:len(carried)] == carried
        prev = cur
    assert sorted(prev) == list(range(100))
    assert sampler.next_batch() == prev  # the full data set keeps one order
    assert sampler.grow_to(10) == 100  # never shrinks


def test_pbqn_state_dict_round_trip(convex):
    problem, ref = convex

    def fresh():
        problem.set_flat_weights(torch.zeros_like(ref["weights"]))
        sampler = ProgressiveSampler(problem.n, 40, seed=3)
        return sampler, PBQN(problem.parameters(), sampler, update="powell")

    def run(sampler, opt, k):
        for _ in range(k):
            opt.step(problem.batch_loss(torch.as_tensor(sampler.next_batch())))

    sampler, opt = fresh()
    run(sampler, opt, 6)
    saved, w_saved = copy.deepcopy(opt.state_dict()), problem.flat_weights().clone()
    run(sampler, opt, 5)
    expected = problem.flat_weights().clone()
    sampler2, opt2 = fresh()
    problem.set_flat_weights(w_saved)
    opt2.load_state_dict(saved)
    run(sampler2, opt2, 5)
    assert torch.equal(problem.flat_weights(), expected)
    assert opt2.counters["iterations"] == 11
    problem.set_flat_weights(torch.zeros_like(w_saved))


def test_bad_arguments_give_clear_errors():
    model = nn.Linear(2, 1)
    sampler = ProgressiveSampler(10, 4)
    with pytest.raises(ValueError, match="history_size"):
        PBQN(model.parameters(), sampler, history_size=0)
    for theta in (0.0, -1.0):
        with pytest.raises(ValueError, match="theta"):
            PBQN(model.parameters(), sampler, theta=theta)
    with pytest.raises(ValueError, match="empty"):
        ProgressiveSampler(TensorDataset(torch.zeros(0, 2)), 4)
    with pytest.raises(ValueError, match="empty"):
        BatchLoss(model, binary_logistic_loss, torch.zeros(0, 2), torch.zeros(0))
    with pytest.raises(ValueError, match="num_samples"):
        DANCE(model.parameters(), 0)
    with pytest.raises(ValueError, match="growth"):
        DANCE(model.parameters(), 10, growth=1.0)
    with pytest.raises(TypeError, match="ProgressiveSampler"):
        PBQN(model.parameters(), [1, 2])
    with pytest.raises(ValueError, match="multi-batch"):
        PBQN(model.parameters(), ProgressiveSampler(10, 4, overlap=0.0))
    with pytest.raises(ValueError, match="per-sample"):
        BatchLoss(model, lambda o, t: o.sum(), torch.zeros(3, 2), torch.zeros(3)).losses()


@pytest.mark.timeout(150)
def test_distributed_dance_on_two_gloo_ranks_equals_one_rank():
    spec = {"problem": "logreg", "dataset": "breast_cancer", "l2": 1e-3}
    kwargs = {"initial_samples": 64, "keep_iterates": True, "final_gradient_tol": 1e-9}
    one = run_dance(make_problem(**spec), **kwargs)
    two = run_dance_distributed(spec, 2, timeout_s=120, **kwargs)
    assert two.info["world_size"] == 2 and one.info["world_size"] == 1
    cmp = compare_iterates(one, two)
    # step for step equal until (if ever) summation order flips a CG stopping decision
    assert cmp["steps"] > 5 and cmp["max_rel_before"] <= 1e-10
    # and the answers agree: both end with ||grad|| <= 1e-9 on a 1e-3-strongly convex objective
    assert cmp["final_rel"] * max(float(w.abs().max()) for w in one.iterates) <= 2 * 1e-9 / 1e-3
    if cmp["first_divergence"] is None:
        for key in ("comm_rounds", "cg_iterations", "newton_iterations", "stages"):
            assert one.counters[key] == two.counters[key]
    assert two.counters["comm_rounds"] == two.counters["newton_iterations"] + two.counters["cg_iterations"] + \
        two.counters["stages"]  # one gradient reduction per Newton iteration/stage start, one per CG iteration


@pytest.mark.parametrize("method", ["lbfgs", "sgd", "adam", "newton-cg"])
def test_each_baseline_reaches_the_scipy_optimum(convex, method):
    """A crippled baseline cannot come back: configured as its users do, each baseline reaches the scipy
    L-BFGS-B optimum to 1e-6 relative (SGD and Adam on the full batch, where a constant step converges)."""
    from leantrain.app.runs import run_adam, run_lbfgs, run_newton_cg, run_sgd

    problem, ref = convex
    problem.set_flat_weights(torch.zeros_like(ref["weights"]))
    full = dict(batch_size=problem.n, max_passes=1500, records_per_pass=0.01)
    trace = {"lbfgs": lambda: run_lbfgs(problem, max_passes=200),
             "sgd": lambda: run_sgd(problem, lr=1.0, **full),
             "adam": lambda: run_adam(problem, lr=1e-2, **full),
             "newton-cg": lambda: run_newton_cg(problem, final_gradient_tol=1e-9)}[method]()
    assert trace.final("objective") - ref["objective"] <= 1e-6 * abs(ref["objective"])
    if method == "lbfgs":  # torch's defaults: one closure call per pass, ended by its own tolerances
        assert trace.stopped == "converged" and trace.info["max_iter"] == 20 and trace.info["max_eval"] == 25
        assert trace.counters["gradients"] == problem.n * (len(trace.records) - 1)
    problem.set_flat_weights(torch.zeros_like(ref["weights"]))


def test_scipy_newton_cg_agrees_with_the_reference_optimum(convex):
    from scipy.optimize import minimize

    from leantrain.numerics.flat import hvp

    problem, ref = convex
    params, obj = problem.parameters(), problem.batch_loss()

    def fun(w):
        problem.set_flat_weights(torch.from_numpy(w))
        f, g = obj.gradient(params)
        return float(f), g.numpy()

    def hessp(w, v):
        problem.set_flat_weights(torch.from_numpy(w))
        return hvp(obj.losses().mean(), params, torch.from_numpy(v)).numpy()

    res = minimize(fun, np.zeros(ref["weights"].numel()), jac=True, hessp=hessp, method="Newton-CG",
                   options={"xtol": 1e-12})
    assert abs(res.fun - ref["objective"]) <= 1e-10 * abs(ref["objective"])
    problem.set_flat_weights(torch.zeros_like(ref["weights"]))
