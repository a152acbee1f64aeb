"""Unit tests of leantrain.imitation: risk measures, RAIL's weights, GAIL equivalence, data formats."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from leantrain.imitation import rail as rail_module
from leantrain.imitation.discriminator import Discriminator, TrajectoryCVaR
from leantrain.imitation.envs import collect, make_vec_env
from leantrain.imitation.policies import GaussianPolicy, Standardizer
from leantrain.imitation.rail import RAIL, RAILConfig, gae
from leantrain.imitation.risk import (
    conditional_value_at_risk,
    discount_weights,
    discounted_trajectory_costs,
    gain_in_reliability,
    nu_gradient,
    relative_tail_risk,
    rockafellar_uryasev,
    tail_weights,
    value_at_risk,
)
from leantrain.imitation.trajectories import ExpertTrajectories, load_trajectories, save_trajectories
from leantrain.imitation.trpo import trpo_step, trpo_surrogate

ENV = "InvertedPendulum-v5"


# ------------------------------------------------------------------------------------ risk measures
def _closed_form_cvar(dist, alpha: float) -> float:
    """CVaR_alpha = (1 / (1 - alpha)) * int_alpha^1 F^{-1}(u) du, by numerical quadrature of scipy's ppf."""
    val, _ = integrate.quad(dist.ppf, alpha, 1.0, limit=200)
    return val / (1.0 - alpha)


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.95])
def test_var_cvar_uniform_closed_form(alpha):
    rng = np.random.default_rng(0)
    c = rng.uniform(0.0, 1.0, size=400_000)
    # U(0,1): VaR = alpha, CVaR = (1 + alpha) / 2; sampling error of both is < 1e-3 here
    assert value_at_risk(c, alpha) == pytest.approx(alpha, abs=3e-3)
    assert conditional_value_at_risk(c, alpha) == pytest.approx((1 + alpha) / 2, abs=3e-3)
    assert conditional_value_at_risk(c, alpha) == pytest.approx(_closed_form_cvar(stats.uniform(), alpha), abs=3e-3)


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.95])
def test_var_cvar_exponential_closed_form(alpha):
    rate = 2.0
    rng = np.random.default_rng(1)
    c = rng.exponential(1.0 / rate, size=400_000)
    var = -math.log(1 - alpha) / rate  # quantile of Exp(rate)
    cvar = var + 1.0 / rate  # memorylessness: E[C | C >= v] = v + 1/rate
    assert cvar == pytest.approx(_closed_form_cvar(stats.expon(scale=1 / rate), alpha), rel=1e-6)
    # standard errors: VaR ~ sqrt(a(1-a)/n)/f(VaR) <= 2.5e-3, CVaR ~ 0.5/sqrt(n(1-a)) <= 3.6e-3
    assert value_at_risk(c, alpha) == pytest.approx(var, abs=1e-2)
    assert conditional_value_at_risk(c, alpha) == pytest.approx(cvar, abs=1.5e-2)


def test_var_cvar_hand_computed():
    c = np.arange(1.0, 11.0)  # 1..10
    assert value_at_risk(c, 0.9) == 9.0  # 9th order statistic; 0.9*10 is 9.000000000000002 in binary
    assert conditional_value_at_risk(c, 0.9) == pytest.approx(10.0)  # worst 10% = {10}
    assert value_at_risk(c, 0.8) == 8.0
    assert conditional_value_at_risk(c, 0.8) == pytest.approx(9.5)  # mean of {9, 10}
    # 3 samples, alpha 0.5: the worst 1.5 samples are 3 and half of 2 -> (3 + 0.5*2) / 1.5
    assert value_at_risk([3.0, 1.0, 2.0], 0.5) == 2.0
    assert conditional_value_at_risk([3.0, 1.0, 2.0], 0.5) == pytest.approx(4.0 / 1.5)
    # 50 episodes at alpha 0.9: CVaR is the mean of the 5 largest costs
    rng = np.random.default_rng(3)
    x = rng.normal(size=50)
    assert conditional_value_at_risk(x, 0.9) == pytest.approx(np.sort(x)[-5:].mean())
    assert value_at_risk([4.0], 0.9) == conditional_value_at_risk([4.0], 0.9) == 4.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.sampled_from([0.5, 0.75, 0.9, 0.95]))
def test_cvar_is_rockafellar_uryasev_minimum(xs, alpha):
    x = np.array(xs)
    var, cvar = value_at_risk(x, alpha), conditional_value_at_risk(x, alpha)
    assert cvar >= var - 1e-9
    # H_alpha(nu) is convex piecewise-linear with kinks at the samples: its minimum is at one of them
    h_min = min(rockafellar_uryasev(x, nu, alpha) for nu in x)
    assert cvar == pytest.approx(h_min, rel=1e-9, abs=1e-9)
    assert value_at_risk(x, alpha) <= x.max() and var >= x.min()


def test_bad_alpha_and_samples_are_clear_errors():
    with pytest.raises(ValueError, match="alpha"):
        value_at_risk([1.0], 1.0)
    with pytest.raises(ValueError, match="empty"):
        conditional_value_at_risk([], 0.9)
    with pytest.raises(ValueError, match="finite"):
        value_at_risk([1.0, float("nan")], 0.9)


def test_relative_tail_risk_and_gain_in_reliability():
    # costs are negated returns: expert -1000, GAIL -800, RAIL -900
    assert relative_tail_risk(-800.0, -1000.0) == pytest.approx(-20.0)
    assert gain_in_reliability(-900.0, -800.0, -1000.0) == pytest.approx(10.0)


# ------------------------------------------------------------------------------ RAIL's tail weights
def test_tail_weights_formula_on_crafted_batch():
    costs = np.array([-5.0, -1.0, 0.2, 0.5, 2.0])
    nu, alpha, lam = 0.2, 0.9, 0.5
    w = tail_weights(costs, nu, alpha=alpha, lam=lam)
    expected = [0.0, 0.0, 0.0, (0.5 / 0.1) * 0.3, (0.5 / 0.1) * 1.8]
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert np.all(w[costs < nu] == 0) and np.all(w[costs > nu] > 0)
    # nu gradient: 3 of 5 trajectories at or above nu -> lam * (1 - 3 / (0.1 * 5))
    assert nu_gradient(costs, nu, alpha=alpha, lam=lam) == pytest.approx(0.5 * (1 - 3 / 0.5))
    np.testing.assert_allclose(discount_weights([2, 3], 0.9), [1, 0.9, 1, 0.9, 0.81])
    assert np.all(tail_weights(costs, -100.0, alpha=alpha, lam=0.0) == 0)


def test_discounted_costs_and_gae_against_loops():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 1, 5])
    r = rng.normal(size=lengths.sum())
    v = rng.normal(size=lengths.sum())
    boot = np.array([0.7, 0.0, -0.3])
    gamma, lam = 0.9, 0.8
    costs = discounted_trajectory_costs(r, lengths, gamma)
    adv = gae(r, v, lengths, boot, gamma, lam)
    start = 0
    for j, n in enumerate(lengths):
        rr, vv = r[start:start + n], v[start:start + n]
        assert costs[j] == pytest.approx(-sum(gamma**t * rr[t] for t in range(n)))
        vnext = list(vv[1:]) + [boot[j]]
        for t in range(n):
            ref = sum((gamma * lam) ** (k - t) * (rr[k] + gamma * vnext[k] - vv[k]) for k in range(t, n))
            assert adv[start + t] == pytest.approx(ref, rel=1e-10, abs=1e-12)
        start += n


def _batch(seed: int = 0, steps: int = 600):
    """A small InvertedPendulum batch from a random Gaussian policy."""
    envs = make_vec_env(ENV, 4, seed)
    rng = np.random.default_rng(seed)
    try:
        return collect(envs, lambda o: rng.normal(size=(o.shape[0], 1)).astype(np.float32), min_steps=steps)
    finally:
        envs.close()


def _expert(seed: int = 0) -> ExpertTrajectories:
    """Stand-in demonstrations (for the update-rule tests the data only has to be well-formed)."""
    b = _batch(seed + 100, 400)
    return b.to_expert(ENV)


def test_rail_update_uses_notes_tail_weights(monkeypatch):
    """Inside RAIL.update the TRPO step receives w_j = lam/(1-alpha) (R_j - nu) 1[R_j >= nu] per pair,
    divided by the same scale std(A) as the advantages (nu_mode "gradient": the authors' nu step)."""
    cfg = RAILConfig(lam=0.5, alpha=0.9, batch_steps=600, n_envs=4, vf_epochs=1, nu_mode="gradient")
    algo = RAIL(ENV, _expert(), cfg, seed=0)
    batch = _batch(1)
    with torch.no_grad():  # a zero output layer (GAIL's code's init): r = log 2 on every pair, so
        algo.disc.net.net[-1].weight.zero_()
        algo.disc.net.net[-1].bias.zero_()
    # R_j = -log(2) (1 - gamma^T_j) / (1 - gamma) in closed form
    costs = -math.log(2) * (1 - cfg.gamma ** batch.lengths.astype(float)) / (1 - cfg.gamma)
    distinct = np.unique(costs)
    k = len(distinct) // 2
    algo.nu = float(0.5 * (distinct[k - 1] + distinct[k]))  # between two costs: no float32/float64 tie at nu
    captured = {}
    real = rail_module.trpo_step

    def spy(*args, **kwargs):
        captured["w"] = kwargs["tail_weights"].clone()
        return real(*args, **kwargs)

    with torch.no_grad():  # the advantages RAIL computes (r = log 2 everywhere), for their scale
        values = algo.value(torch.as_tensor(batch.obs)).double().numpy()
        final = algo.value(torch.as_tensor(batch.final_obs)).double().numpy()
    adv = gae(np.full(batch.steps, math.log(2)), values, batch.lengths, np.where(batch.terminated, 0.0, final),
              cfg.gamma, cfg.gae_lambda)
    monkeypatch.setattr(rail_module, "trpo_step", spy)
    stats = algo.update(batch)
    w_traj = np.where(costs >= stats["nu"], 0.5 / 0.1 * (costs - stats["nu"]), 0.0)
    np.testing.assert_allclose(captured["w"].numpy() * adv.std(), np.repeat(w_traj, batch.lengths), rtol=1e-4,
                               atol=1e-5)
    assert 0 < stats["tail_fraction"] < 1
    frac = np.mean(costs >= stats["nu"])
    assert algo.nu == pytest.approx(stats["nu"] - 0.01 * 0.5 * (1 - frac / 0.1), rel=1e-12)
    algo.close()


# ------------------------------------------------------- the RAIL objective: each player's gradient
# J(theta, nu, phi) = E_pi[log D] + E_E[log(1 - D)] + lam * H_alpha(R_D, nu), R_D(xi) = sum_t gamma^t log D,
# min over theta and nu, max over phi (leantrain.imitation.rail). The oracles below evaluate J on a
# hand-made batch in float64, written out independently of the implementation (loops, log(1 - sigmoid)).
LENGTHS = [3, 1, 4, 2]  # N = 4 trajectories, M = 10 pairs
ALPHA, LAM, GAMMA = 0.75, 0.5, 0.9


def _hand_batch():
    g = torch.Generator().manual_seed(7)
    m = sum(LENGTHS)
    obs, act = torch.randn(m, 2, generator=g, dtype=torch.float64), torch.randn(m, 1, generator=g, dtype=torch.float64)
    ex_obs, ex_act = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64)
    episode = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    return obs, act, ex_obs, ex_act, episode


def _oracle_rockafellar(costs: list, nu) -> torch.Tensor:
    excess = sum(torch.clamp(c - nu, min=0.0) for c in costs)
    return nu + excess / ((1 - ALPHA) * len(costs))


def test_nu_gradient_and_minimizer_against_the_objective():
    costs = np.array([-7.0, -2.5, -4.0, -1.0, -3.2, -6.1, -0.4, -5.5])
    h = lambda nu: LAM * rockafellar_uryasev(costs, nu, ALPHA)  # noqa: E731
    for nu in (-8.0, -5.0, -3.0, -2.0, -0.7, 1.0):  # away from the kinks (the samples)
        fd = (h(nu + 1e-6) - h(nu - 1e-6)) / 2e-6
        assert nu_gradient(costs, nu, alpha=ALPHA, lam=LAM) == pytest.approx(fd, abs=1e-6)
    # the default nu, the batch VaR, is the exact minimizer: no nu on a fine grid does better
    var = value_at_risk(costs, ALPHA)
    grid = np.linspace(-8.0, 1.0, 9001)
    assert h(var) <= min(h(nu) for nu in grid) + 1e-12
    assert h(var) == pytest.approx(LAM * conditional_value_at_risk(costs, ALPHA))
    # and the authors' step direction at the VaR: left derivative < 0, right derivative >= 0
    assert nu_gradient(costs, var, alpha=ALPHA, lam=LAM) < 0 <= nu_gradient(costs, var + 1e-9, alpha=ALPHA, lam=LAM)


def test_policy_gradient_of_the_cvar_term_against_the_objective():
    """grad of the TRPO surrogate's tail part == -(N/M) grad_theta [lam * H_alpha] by likelihood ratio."""
    obs, act, *_, episode = _hand_batch()
    torch.manual_seed(0)
    policy = GaussianPolicy(2, 1, (5,)).double()
    costs = np.array([-1.0, -3.0, -0.5, -2.0])
    nu = -1.5  # between samples; trajectories 0 and 2 are in the tail
    n, m = len(LENGTHS), sum(LENGTHS)
    params = list(policy.parameters())
    with torch.no_grad():
        old_logp = policy.log_prob(obs, act)
    w = torch.as_tensor(np.repeat(tail_weights(costs, nu, alpha=ALPHA, lam=LAM), LENGTHS))
    got = torch.autograd.grad(trpo_surrogate(policy, obs, act, torch.zeros(m, dtype=torch.float64), old_logp, w), params)

    # oracle: the importance-weighted estimate of lam * H_alpha(R, nu) on trajectories sampled from pi_old,
    # each trajectory weighted by its likelihood ratio prod_t pi_theta / pi_old
    logp = policy.log_prob(obs, act)
    ratios = [torch.exp((logp - old_logp)[episode == j].sum()) for j in range(n)]
    j_cvar = LAM * (nu + sum(r * max(c - nu, 0.0) for r, c in zip(ratios, costs)) / ((1 - ALPHA) * n))
    want = torch.autograd.grad(j_cvar, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, -(n / m) * b, rtol=1e-10, atol=1e-12)
    # sign: a small step up the surrogate lowers the log-likelihood of the tail trajectories only on balance
    with torch.no_grad():
        for p, gp in zip(params, got):
            p.add_(1e-3 * gp)
        new_logp = policy.log_prob(obs, act)
    tail = torch.as_tensor(np.repeat(costs > nu, LENGTHS))
    assert (new_logp - old_logp)[tail].sum() < 0


def test_policy_surrogate_scale_is_shared_by_advantages_and_tail_weights():
    """Multiplying A and w by one positive number leaves the TRPO step unchanged (RAIL divides both by std(A))."""
    torch.manual_seed(0)
    obs, actions, adv = torch.randn(200, 3), torch.randn(200, 1), torch.randn(200)
    w = torch.where(torch.arange(200) < 30, torch.rand(200) * 4, torch.zeros(200))
    p1, p2 = GaussianPolicy(3, 1, (8,)), GaussianPolicy(3, 1, (8,))
    p2.load_state_dict(p1.state_dict())
    trpo_step(p1, obs, actions, adv, tail_weights=w, generator=torch.Generator().manual_seed(1))
    trpo_step(p2, obs, actions, 7.5 * adv, tail_weights=7.5 * w, generator=torch.Generator().manual_seed(1))
    for a, b in zip(p1.parameters(), p2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _oracle_disc_objective(d: Discriminator, obs, act, ex_obs, ex_act, nu: float, beta: float) -> torch.Tensor:
    """J/h for the discriminator (to be maximized), written out with loops and log(1 - sigmoid)."""
    z_pi, z_ex = d.logits(obs, act), d.logits(ex_obs, ex_act)
    log_d_pi = torch.log(1 - torch.sigmoid(z_pi))  # D = 1 - sigmoid(z): "policy" probability
    log_1md_ex = torch.log(torch.sigmoid(z_ex))

    def ent(z):
        p = torch.sigmoid(z)
        return (-(p * torch.log(p) + (1 - p) * torch.log(1 - p))).mean()

    costs, start, horizon = [], 0, 0.0
    for t_len in LENGTHS:
        costs.append(sum(GAMMA**t * log_d_pi[start + t] for t in range(t_len)))
        horizon += sum(GAMMA**t for t in range(t_len)) / len(LENGTHS)
        start += t_len
    return (log_d_pi.mean() + log_1md_ex.mean() + beta * (ent(z_pi) + ent(z_ex))
            + (LAM / horizon) * _oracle_rockafellar(costs, nu))


def _hand_disc():
    torch.manual_seed(3)
    d = Discriminator(2, 1, (5,)).double()
    with torch.no_grad():  # a non-degenerate output layer (the constructor zeroes it)
        for p in d.parameters():
            p.copy_(torch.randn_like(p))
    return d


def _hand_cvar(episode, nu) -> TrajectoryCVaR:
    disc = torch.as_tensor(discount_weights(LENGTHS, GAMMA))
    horizon = float(disc.sum()) / len(LENGTHS)
    return TrajectoryCVaR(episode, disc, len(LENGTHS), nu, ALPHA, LAM / horizon)


def test_discriminator_gradient_against_the_objective():
    """grad of Discriminator.loss == -grad_phi J/h (autograd of the oracle, and central finite differences)."""
    obs, act, ex_obs, ex_act, episode = _hand_batch()
    d = _hand_disc()
    with torch.no_grad():
        r = d.reward(obs, act).numpy()
    costs = discounted_trajectory_costs(r, LENGTHS, GAMMA)
    srt = np.sort(costs)
    nu = float(0.5 * (srt[1] + srt[2]))  # between samples: two trajectories in the tail
    loss, _ = d.loss(obs, act, ex_obs, ex_act, entropy_weight=0.01, cvar=_hand_cvar(episode, nu))
    params = [p for p in d.parameters()]
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(_oracle_disc_objective(d, obs, act, ex_obs, ex_act, nu, 0.01), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, -b, rtol=1e-9, atol=1e-12)
    # finite differences of the oracle on every entry of the first layer's bias and the output layer
    for p, gp in zip(params, got):
        if p.dim() != 1:
            continue
        for i in range(p.numel()):
            with torch.no_grad():
                old = float(p[i])
                p[i] = old + 1e-6
                up = float(_oracle_disc_objective(d, obs, act, ex_obs, ex_act, nu, 0.01))
                p[i] = old - 1e-6
                down = float(_oracle_disc_objective(d, obs, act, ex_obs, ex_act, nu, 0.01))
                p[i] = old
            assert float(gp[i]) == pytest.approx(-(up - down) / 2e-6, rel=1e-5, abs=1e-8)


def test_discriminator_cvar_term_raises_the_learned_cost_of_the_tail():
    """D maximizes J: its CVaR term pushes the tail trajectories' learned cost R_j up (the authors' code: down)."""
    obs, act, ex_obs, ex_act, episode = _hand_batch()
    d = _hand_disc()
    cvar = _hand_cvar(episode, 0.0)
    with torch.no_grad():
        costs = cvar.costs(d.logits(obs, act))
    nu = float(torch.sort(costs).values[1:3].mean())
    cvar = _hand_cvar(episode, nu)
    params = list(d.parameters())
    with_term = torch.autograd.grad(d.loss(obs, act, ex_obs, ex_act, cvar=cvar)[0], params)
    without = torch.autograd.grad(d.loss(obs, act, ex_obs, ex_act)[0], params)
    with torch.no_grad():  # a small descent step on the CVaR term's share of the loss only
        for p, a, b in zip(params, with_term, without):
            p.sub_(1e-3 * (a - b))
        new = cvar.costs(d.logits(obs, act))
    tail = costs > nu
    assert tail.sum() == 2 and (new - costs)[tail].sum() > 0


# ------------------------------------------------------------------------------- GAIL = RAIL(lam=0)
def test_trpo_zero_tail_weights_equal_plain_surrogate():
    torch.manual_seed(0)
    obs, actions, adv = torch.randn(256, 4), torch.randn(256, 1), torch.randn(256)
    p1 = GaussianPolicy(4, 1, (16, 16))
    p2 = GaussianPolicy(4, 1, (16, 16))
    p2.load_state_dict(p1.state_dict())
    s1 = trpo_step(p1, obs, actions, adv, tail_weights=torch.zeros(256), generator=torch.Generator().manual_seed(1))
    s2 = trpo_step(p2, obs, actions, adv, tail_weights=None, generator=torch.Generator().manual_seed(1))
    assert s1["step_fraction"] > 0 and s1 == s2
    for a, b in zip(p1.parameters(), p2.parameters()):
        assert torch.equal(a, b)
    # and a nonzero weight changes the step: the term is live
    p3 = GaussianPolicy(4, 1, (16, 16))
    p3.load_state_dict(p1.state_dict())
    p4 = GaussianPolicy(4, 1, (16, 16))
    p4.load_state_dict(p1.state_dict())
    trpo_step(p3, obs, actions, adv, tail_weights=None, generator=torch.Generator().manual_seed(1))
    trpo_step(p4, obs, actions, adv, tail_weights=torch.rand(256), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(p3.log_std, p4.log_std)


def test_lambda_zero_is_gail_update_exactly(monkeypatch):
    """RAIL(lam=0) with every trajectory in the 'tail' (nu far below the costs) == GAIL's plain update."""
    expert, batch = _expert(), _batch(2)
    cfg = RAILConfig(lam=0.0, batch_steps=600, n_envs=4, vf_epochs=1, nu_mode="gradient")
    rail0 = RAIL(ENV, expert, cfg, seed=5)
    rail0.nu = -1e6  # the indicator 1[R >= nu] is 1 for every trajectory; lam = 0 must still give w = 0
    rail0.update(batch)

    # reference: GAIL, i.e. TRPO on the plain surrogate and the plain logistic discriminator loss
    ref = RAIL(ENV, expert, cfg, seed=5)
    real_trpo, real_disc = rail_module.trpo_step, Discriminator.update

    def plain_trpo(*args, **kwargs):
        kwargs["tail_weights"] = None
        return real_trpo(*args, **kwargs)

    def plain_disc(self, *args, **kwargs):
        kwargs["cvar"] = None
        return real_disc(self, *args, **kwargs)

    monkeypatch.setattr(rail_module, "trpo_step", plain_trpo)
    monkeypatch.setattr(Discriminator, "update", plain_disc)
    ref.update(batch)
    for name in ("policy", "disc", "value"):
        sa, sb = getattr(rail0, name).state_dict(), getattr(ref, name).state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs"
    assert rail0.nu == -1e6  # g_nu = lam * (...) = 0
    assert rail0.history[-1]["tail_weight_mean"] == 0.0
    rail0.close()
    ref.close()


# ------------------------------------------------------------------------------------ discriminator
def test_discriminator_separates_expert_from_random_on_toy_task():
    g = torch.Generator().manual_seed(0)

    def expert_pairs(n):
        s = torch.randn(n, 2, generator=g)
        return s, (-s[:, :1] - 0.5 * s[:, 1:]) + 0.05 * torch.randn(n, 1, generator=g)  # a linear controller

    def random_pairs(n):
        return torch.randn(n, 2, generator=g), 2 * torch.rand(n, 1, generator=g) - 1

    torch.manual_seed(0)
    d = Discriminator(2, 1, (32, 32))
    opt = torch.optim.Adam(d.parameters(), lr=0.01)
    for _ in range(300):
        es, ea = expert_pairs(256)
        rs, ra = random_pairs(256)
        d.update(opt, rs, ra, es, ea)
    es, ea = expert_pairs(2000)
    rs, ra = random_pairs(2000)
    with torch.no_grad():
        acc = 0.5 * ((d.logits(es, ea) > 0).float().mean() + (d.logits(rs, ra) <= 0).float().mean())
        r_exp, r_rand = d.reward(es, ea).mean(), d.reward(rs, ra).mean()
    assert acc > 0.9
    assert r_exp > r_rand + 0.5  # the imitation reward prefers expert-like pairs


def test_discriminator_tail_term_zero_weights_changes_nothing():
    torch.manual_seed(0)
    x = [torch.randn(64, 3), torch.randn(64, 1), torch.randn(64, 3), torch.randn(64, 1)]
    d1 = Discriminator(3, 1, (8, 8))
    d2 = Discriminator(3, 1, (8, 8))
    d2.load_state_dict(d1.state_dict())
    o1, o2 = torch.optim.Adam(d1.parameters(), 0.01), torch.optim.Adam(d2.parameters(), 0.01)
    cvar = TrajectoryCVaR(torch.arange(64) // 8, torch.ones(64), 8, -3.0, 0.9, weight=0.0)
    for _ in range(3):
        d1.update(o1, *x, cvar=cvar)
        d2.update(o2, *x, cvar=None)
    for a, b in zip(d1.state_dict().values(), d2.state_dict().values()):
        assert torch.equal(a, b)


def test_standardizer_merge_equals_concatenated_statistics():
    rng = np.random.default_rng(0)
    parts = [rng.normal(3, 2, size=(n, 3)) for n in (5, 17, 1, 40)]
    s = Standardizer(3)
    for p in parts:
        s.update(p)
    allx = np.concatenate(parts)
    np.testing.assert_allclose(s.mean.numpy(), allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.var.numpy(), allx.var(0), rtol=1e-12)


# ----------------------------------------------------------------------------- rollouts and formats
def test_collect_episodes_and_min_steps():
    envs = make_vec_env("Pendulum-v1", 3, 0)
    try:
        b = collect(envs, lambda o: np.zeros((o.shape[0], 1), np.float32), episodes=5)
        assert b.episodes == 5 and np.all(b.lengths == 200) and not b.terminated.any()  # time limit only
        b2 = collect(envs, lambda o: np.full((o.shape[0], 1), 5.0, np.float32), min_steps=450)
        assert b2.steps >= 450 and np.all(b2.lengths == 200)
        b4 = collect(envs, lambda o: np.zeros((o.shape[0], 1), np.float32), min_steps=450, min_episodes=7)
        assert b4.episodes >= 7 and b4.episodes <= 7 + 2  # the other sub-envs finish their running episodes
        assert np.all(np.abs(b2.env_actions) <= 2.0) and np.all(b2.actions == 5.0)  # clipped for the env only
    finally:
        envs.close()
    b3 = _batch(0, 300)
    assert b3.terminated.all() and b3.obs.shape == (b3.steps, 4)
    assert np.all(np.abs(b3.final_obs[:, 1]) > 0.2)  # InvertedPendulum terminates when |angle| > 0.2


def test_expert_npz_round_trip(tmp_path):
    traj = _batch(4, 300).to_expert(ENV)
    path = save_trajectories(tmp_path / "demo.npz", traj)
    back = load_trajectories(path)
    for k in ("obs", "actions", "lengths", "rewards", "terminated"):
        np.testing.assert_array_equal(getattr(back, k), getattr(traj, k))
    assert back.env_id == ENV
    # InvertedPendulum-v5: reward 1 per step, 0 on the terminating step
    np.testing.assert_allclose(back.returns(), traj.lengths - traj.terminated)
    obs, act = back.pairs(subsample=20, rng=np.random.default_rng(0))
    assert obs.shape[1] == 4 and act.shape[1] == 1 and obs.shape[0] >= traj.count


def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_malformed_expert_files_give_clear_errors(tmp_path):
    ok = {"obs": np.zeros((2, 5, 4), np.float32), "actions": np.zeros((2, 5, 1), np.float32),
          "lengths": np.array([5, 3])}
    assert load_trajectories(_write_npz(tmp_path / "ok.npz", **ok)).count == 2
    cases = {
        "missing required": {k: v for k, v in ok.items() if k != "actions"},
        "3-D array": {**ok, "obs": np.zeros((2, 5), np.float32)},
        r"must lie in \[1, 5\]": {**ok, "lengths": np.array([6, 3])},
        "does not match": {**ok, "actions": np.zeros((3, 5, 1), np.float32)},
        "finite": {**ok, "obs": np.where(np.arange(5)[None, :, None] == 1, np.nan, 0.0).repeat(2, 0).repeat(4, 2)},
        "integer": {**ok, "lengths": np.array([5.0, 3.0])},
        "rewards": {**ok, "rewards": np.zeros((2, 4), np.float32)},
        "version": {**ok, "version": np.array(7)},
    }
    for i, (msg, arrays) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=msg):
            load_trajectories(_write_npz(tmp_path / f"bad{i}.npz", **arrays))
    # NaN beyond a trajectory's length is padding and allowed
    padded = {**ok, "obs": np.where(np.arange(5)[None, :, None] == 4, np.nan, 0.0).repeat(2, 0).repeat(4, 2)}
    padded["lengths"] = np.array([4, 3])
    assert load_trajectories(_write_npz(tmp_path / "pad.npz", **padded)).count == 2
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_trajectories(tmp_path / "text.npz")
    with zipfile.ZipFile(tmp_path / "obj.npz", "w") as z:
        with z.open("obs.npy", "w") as f:
            np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_trajectories(tmp_path / "obj.npz")
    with pytest.raises(ValueError, match="does not exist"):
        load_trajectories(tmp_path / "missing.npz")
    traj = load_trajectories(tmp_path / "ok.npz")
    with pytest.raises(ValueError, match="obs dim 4 and action dim 1"):
        traj.check_spaces(11, 3, "Hopper-v5")


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    from leantrain.cli import main

    (tmp_path / "bad.npz").write_text("nope")
    assert main(["rail", "expert", "--env", ENV, "--trajectories", str(tmp_path / "bad.npz"), "--out", str(tmp_path)]) == 2
    assert "not a readable .npz" in capsys.readouterr().err
    assert main(["rail", "train", "--env", ENV, "--algo", "gail", "--lam", "0.5", "--expert", "x.npz",
                 "--steps", "10", "--out", str(tmp_path)]) == 2
    assert "lam = 0" in capsys.readouterr().err
    assert main(["rail", "train", "--env", "NoSuchEnv-v0", "--algo", "rail", "--expert", "x.npz",
                 "--steps", "10", "--out", str(tmp_path)]) == 2
    assert "gymnasium id" in capsys.readouterr().err
