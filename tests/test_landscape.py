"""leantrain.landscape against closed forms: quadratics with known Hessians, exact enumeration, eigvalsh."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from leantrain.landscape import (
    LossSurface,
    hessian_top_eigenvalues,
    hessian_trace,
    interpolate,
    interpolated_state,
    random_subspace,
    sharpness,
)
from leantrain.models import resnet20
from leantrain.train import evaluate

F64 = torch.float64


class Point(nn.Module):
    """A model whose only parameter is the point w itself (output = w for every sample)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.w.expand(inp.shape[0], -1)


def quadratic(h: torch.Tensor, center: torch.Tensor, c: float = 0.0):
    """loss_fn of f(w) = 0.5 (w - center)^T H (w - center) + c (the same for every sample)."""

    def loss(out: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        d = out - center
        return 0.5 * ((d @ h) * d).sum(-1).mean() + c

    return loss


DUMMY = (torch.zeros(3, 1, dtype=F64), torch.zeros(3))


def spd(n: int, eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q @ torch.diag(eigenvalues.to(F64)) @ q.T


def vertex_max(m: torch.Tensor, h: torch.Tensor) -> float:
    """max over the box |y_i| <= h_i of 0.5 y^T M y for PSD M: attained at a vertex (convexity), by enumeration."""
    best = 0.0
    for signs in itertools.product((-1.0, 1.0), repeat=len(h)):
        y = torch.tensor(signs, dtype=F64) * h
        best = max(best, 0.5 * float(y @ m @ y))
    return best


def ball_lower_bound(m: torch.Tensor, h: torch.Tensor) -> float:
    """0.5 lambda_max(D M D): the cube |z_i| <= 1 contains the unit ball (y = D z)."""
    d = torch.diag(h)
    return 0.5 * float(torch.linalg.eigvalsh(d @ m @ d)[-1])


# --- sharpness on quadratics ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-3, 5e-4, 0.3])
def test_sharpness_diagonal_quadratic_matches_closed_form(eps):
    torch.manual_seed(0)
    n, c = 40, 0.25
    xstar = torch.randn(n, dtype=F64)
    hdiag = torch.rand(n, dtype=F64) * 10
    r = sharpness(Point(xstar), quadratic(torch.diag(hdiag), xstar, c), DUMMY, epsilon=eps)
    h = eps * (xstar.abs() + 1)
    exact = 100 * (0.5 * float((hdiag * h * h).sum())) / (1 + c)  # f(x*) = c
    assert r.loss == pytest.approx(c, abs=1e-15)
    assert r.value == pytest.approx(exact, rel=1e-9)
    assert r.iterations <= 10


def test_sharpness_dense_quadratic_bounded_by_exact_vertex_maximum():
    n, eps = 8, 1e-3
    hmat = spd(n, torch.tensor([20.0, 5, 3, 1, 0.5, 0.2, 0.1, 0.01]), seed=1)
    xstar = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=F64)
    h = eps * (xstar.abs() + 1)
    exact, lower = 100 * vertex_max(hmat, h), 100 * ball_lower_bound(hmat, h)
    values = [sharpness(Point(xstar), quadratic(hmat, xstar), DUMMY, epsilon=eps, seed=s).value for s in range(3)]
    for v in values:  # L-BFGS-B is inexact: never above the true maximum, never below the inscribed ball's
        assert lower * (1 - 1e-9) <= v <= exact * (1 + 1e-9)
    assert max(values) == pytest.approx(exact, rel=1e-9)


def test_sharpness_subspace_matches_enumeration_in_the_subspace():
    n, p, eps = 30, 4, 1e-3
    hmat = spd(n, torch.linspace(0.1, 10, n), seed=3)
    xstar = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=F64)
    hits = 0
    for seed in range(3):
        a = random_subspace(n, p, seed=seed, dtype=F64)
        h = eps * (torch.from_numpy(np.linalg.pinv(a.numpy()) @ xstar.numpy()).abs() + 1)  # numpy pinv as oracle
        m = a.T @ hmat @ a
        exact = 100 * vertex_max(m, h)
        r = sharpness(Point(xstar), quadratic(hmat, xstar), DUMMY, epsilon=eps, subspace=p, seed=seed)
        assert r.subspace == p and r.maximizer.shape == (p,)
        assert 100 * ball_lower_bound(m, h) * (1 - 1e-9) <= r.value <= exact * (1 + 1e-9)
        # the same matrix passed explicitly gives the same answer
        r2 = sharpness(Point(xstar), quadratic(hmat, xstar), DUMMY, epsilon=eps, subspace=a, seed=seed)
        assert r2.value == pytest.approx(r.value, rel=1e-12)
        hits += r.value == pytest.approx(exact, rel=1e-9)
    assert hits >= 2


def test_sharpness_of_a_network_is_the_loss_at_its_maximizer_in_the_box_and_independent_of_dataset_size():
    torch.manual_seed(0)
    x = torch.randn(60, 5, dtype=F64)
    y = torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    loss = nn.functional.cross_entropy
    eps = 1e-3
    r1 = sharpness(model, loss, (x, y), epsilon=eps, iters=5, seed=3)
    r2 = sharpness(model, loss, (torch.cat([x, x]), torch.cat([y, y])), epsilon=eps, iters=5, seed=3, batch_size=7)
    assert r2.value == pytest.approx(r1.value, rel=1e-9)  # f is a mean: duplicating the data changes nothing
    # Recomputed independently: the maximizer lies in the box |y_i| <= eps (|x_i| + 1) (A = I), and phi is
    # 100 (f(x + y*) - f(x)) / (1 + f(x)) evaluated on a moved copy of the model in float64.
    x0 = nn.utils.parameters_to_vector(model.parameters()).detach()
    ystar = torch.from_numpy(np.asarray(r1.maximizer)).to(F64)
    assert ystar.shape == x0.shape
    assert bool((ystar.abs() <= eps * (x0.abs() + 1) * (1 + 1e-12)).all())
    moved = copy.deepcopy(model)
    nn.utils.vector_to_parameters(x0 + ystar, moved.parameters())
    with torch.no_grad():
        f0, f1 = float(loss(model(x), y)), float(loss(moved(x), y))
    assert r1.loss == pytest.approx(f0, rel=1e-12) and r1.max_loss == pytest.approx(f1, rel=1e-9)
    assert r1.value == pytest.approx(100 * (f1 - f0) / (1 + f0), rel=1e-9)
    assert f1 > f0  # off a minimizer (random weights, non-zero gradient) some point of the box is higher


# --- Hessian ---------------------------------------------------------------------------------------------


def test_top_eigenvalues_match_eigvalsh():
    n = 25
    hmat = spd(n, torch.linspace(-3, 12, n) ** 1, seed=5)
    xstar = torch.randn(n, dtype=F64)
    vals, vecs = hessian_top_eigenvalues(Point(xstar), quadratic(hmat, xstar), DUMMY, k=3, tol=1e-12,
                                         return_vectors=True)
    expected = torch.linalg.eigvalsh(hmat).flip(0)[:3].numpy()
    np.testing.assert_allclose(vals, expected, rtol=1e-9)
    residual = hmat.numpy() @ vecs - vecs * vals
    assert np.abs(residual).max() < 1e-8


def test_hvp_matches_dense_hessian_of_a_network():
    torch.manual_seed(1)
    x = torch.randn(20, 3, dtype=F64)
    y = torch.randint(0, 2, (20,))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    surf = LossSurface(model, nn.functional.cross_entropy, (x, y), batch_size=6)

    def f(flat: torch.Tensor) -> torch.Tensor:  # independent path: one batch, torch.autograd.functional
        return nn.functional.cross_entropy(torch.func.functional_call(model, surf.parameters_of(flat), (x,)), y)

    dense = torch.autograd.functional.hessian(f, surf.x0)
    v = torch.randn(surf.dim, dtype=F64)
    torch.testing.assert_close(surf.hvp(v), dense @ v, rtol=1e-10, atol=1e-12)
    fx, g = surf.value_and_grad()
    assert fx == pytest.approx(float(f(surf.x0)), rel=1e-12)
    x0 = surf.x0.clone().requires_grad_(True)
    torch.testing.assert_close(g, torch.autograd.grad(f(x0), x0)[0], rtol=1e-10, atol=1e-12)


def test_hutchinson_trace_within_its_statistical_tolerance():
    n, m_min, rtol = 60, 20, 0.05
    hmat = spd(n, torch.linspace(0.5, 4, n), seed=6) + 0.05 * torch.ones(n, n, dtype=F64)
    xstar = torch.zeros(n, dtype=F64)
    est = hessian_trace(Point(xstar), quadratic(hmat, xstar), DUMMY, rtol=rtol, min_samples=m_min, max_samples=400,
                        seed=7)
    exact = float(torch.trace(hmat))
    # Rademacher probes: Var(v^T H v) = 2 * sum_{i != j} H_ij^2.
    var = 2 * float((hmat ** 2).sum() - (torch.diag(hmat) ** 2).sum())
    true_se = math.sqrt(var / est.samples)
    assert est.converged and est.half_width <= rtol * abs(est.trace) and est.samples >= m_min
    assert abs(est.trace - exact) <= 4 * true_se  # 4 sigma: a chance below 1e-4 of a false alarm
    assert 0.5 < est.stderr / true_se < 2.0  # the stated standard error is the right size
    diag = hessian_trace(Point(xstar), quadratic(torch.diag(torch.diag(hmat)), xstar), DUMMY, seed=0)
    assert diag.trace == pytest.approx(exact, rel=1e-12) and diag.stderr == 0  # v^T D v = tr D exactly


def test_sharpness_along_top_eigenvector_matches_curvature_for_small_epsilon():
    """Cross-check of the sharpness and the Lanczos eigenvalue on a network (second-order Taylor model)."""
    torch.manual_seed(2)
    x = torch.randn(64, 4, dtype=F64)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64)
    loss = nn.functional.cross_entropy
    surf = LossSurface(model, loss, (x, y))
    vals, vecs = hessian_top_eigenvalues(model, loss, (x, y), k=1, tol=1e-12, return_vectors=True, surface=surf)
    u = torch.from_numpy(vecs[:, 0])
    f0, g = surf.value_and_grad()
    errors = []
    for eps in (4e-4, 1e-4):
        h = eps * (abs(float(u @ surf.x0)) + 1)
        r = sharpness(model, loss, (x, y), epsilon=eps, subspace=u[:, None], surface=surf)
        rise = r.value * (1 + f0) / 100  # max over |t| <= h of f(x + t u) - f(x)
        predicted = abs(float(g @ u)) * h + 0.5 * vals[0] * h * h
        second_order = rise - abs(float(g @ u)) * h
        errors.append(abs(second_order - 0.5 * vals[0] * h * h) / (0.5 * vals[0] * h * h))
        assert rise == pytest.approx(predicted, rel=1e-3)
    # the curvature part agrees to O(h): the relative error shrinks about 4x when eps shrinks 4x
    assert errors[1] < 0.02 and errors[1] < errors[0] / 2.5


# --- interpolation -----------------------------------------------------------------------------------------


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    with torch.no_grad():  # non-trivial running statistics
        net(torch.randn(50, 6) * (1 + seed))
    return net


def test_interpolation_endpoints_reproduce_both_models_exactly():
    torch.manual_seed(0)
    train = (torch.randn(40, 6), torch.randint(0, 3, (40,)))
    test = (torch.randn(30, 6), torch.randint(0, 3, (30,)))
    a, b = bn_net(0), bn_net(1)
    from torch.utils.data import TensorDataset

    data = {"train": TensorDataset(*train), "test": TensorDataset(*test)}
    res = interpolate(a, b, nn.functional.cross_entropy, data, alphas=[0.0, 1.0, -1.0, 2.0, 0.5])
    for j, model in ((0, a), (1, b)):
        for name, ds in data.items():
            ref = evaluate(model, nn.functional.cross_entropy, ds)
            assert res.curves[name]["loss"][j] == ref["loss"]
            assert res.curves[name]["accuracy"][j] == ref["accuracy"]
    state, clamped = interpolated_state(a.state_dict(), b.state_dict(), 0.5)
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(state[k], 0.5 * v + 0.5 * b.state_dict()[k])
    assert clamped == 0 and len(res.clamped) == 5


def test_interpolation_rejects_different_architectures():
    a = nn.Sequential(nn.Linear(4, 3))
    b = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="same architecture"):
        interpolate(a, b, nn.functional.cross_entropy, (torch.randn(5, 4), torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="alphas"):
        interpolate(a, a, nn.functional.cross_entropy, (torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), alphas=[])


# --- BatchNorm models are unchanged by every diagnostic ----------------------------------------------------


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            {k: m.training for k, m in model.named_modules()})


def test_batchnorm_model_unchanged_after_every_diagnostic():
    torch.manual_seed(0)
    model = resnet20(width=2, depth=8, in_channels=3, num_classes=4)
    x, y = torch.randn(24, 3, 8, 8), torch.randint(0, 4, (24,))
    model.train()
    model(x)  # non-default running statistics
    model.layers[0].bn1.eval()  # mixed train/eval flags must survive too
    model.fc.bias.requires_grad_(False)  # a frozen parameter: held fixed, not part of x
    before = snapshot(model)
    other = resnet20(width=2, depth=8, in_channels=3, num_classes=4)
    surf = LossSurface(model, nn.functional.cross_entropy, (x, y))
    assert surf.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # eval mode: f is the eval-mode loss (BatchNorm with running statistics)
    # (on a copy: train.evaluate restores only the top-level train flag, not mixed submodule flags)
    ref = evaluate(copy.deepcopy(model), nn.functional.cross_entropy, torch.utils.data.TensorDataset(x, y))
    assert surf.value() == pytest.approx(ref["loss"], rel=1e-5)
    sharpness(model, nn.functional.cross_entropy, (x, y), epsilon=1e-3, iters=2)
    sharpness(model, nn.functional.cross_entropy, (x, y), epsilon=1e-3, subspace=5, iters=2)
    hessian_top_eigenvalues(model, nn.functional.cross_entropy, (x, y), k=1, tol=1e-2, max_iterations=3)
    hessian_trace(model, nn.functional.cross_entropy, (x, y), min_samples=2, max_samples=3)
    interpolate(model, other, nn.functional.cross_entropy, (x, y), alphas=[-1.0, 0.5, 2.0])
    interpolate(other, model, nn.functional.cross_entropy, (x, y), alphas=[0.3])
    after = snapshot(model)
    assert before[1] == after[1] and before[2] == after[2]
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k


# --- bad arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0, -1e-3, float("nan"), float("inf")])
def test_bad_epsilon_is_a_clear_error(eps):
    with pytest.raises(ValueError, match="epsilon"):
        sharpness(Point(torch.zeros(3, dtype=F64)), quadratic(torch.eye(3, dtype=F64), torch.zeros(3)), DUMMY, eps)


def test_bad_subspace_and_other_arguments_are_clear_errors():
    model, loss = Point(torch.zeros(5, dtype=F64)), quadratic(torch.eye(5, dtype=F64), torch.zeros(5, dtype=F64))
    for p in (0, 6, -2):
        with pytest.raises(ValueError, match=r"subspace.*5"):
            sharpness(model, loss, DUMMY, subspace=p)
    with pytest.raises(ValueError, match="shape"):
        sharpness(model, loss, DUMMY, subspace=torch.ones(4, 2))
    with pytest.raises(TypeError, match="subspace"):
        sharpness(model, loss, DUMMY, subspace="all")
    with pytest.raises(ValueError, match="iters"):
        sharpness(model, loss, DUMMY, iters=0)
    with pytest.raises(ValueError, match="k must"):
        hessian_top_eigenvalues(model, loss, DUMMY, k=5)
    with pytest.raises(ValueError, match="rtol"):
        hessian_trace(model, loss, DUMMY, rtol=0)
    with pytest.raises(TypeError, match="data"):
        sharpness(model, loss, [1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        sharpness(model, loss, (torch.zeros(0, 1), torch.zeros(0)))
