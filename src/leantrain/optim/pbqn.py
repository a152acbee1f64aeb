r"""PBQN: progressive-batching L-BFGS (Bollapragada, Nocedal, Mudigere, Shi, Tang; arXiv:1802.05374).

L-BFGS on a sample ``S_k`` that grows whenever the quasi-Newton direction computed from it is
too noisy to trust. One iteration, on the batch ``S_k = [O_{k-1} | N_k | O_k]`` that
:class:`~leantrain.optim.ProgressiveSampler` generates:

1. **Gradients.** ``g_k = grad F_{S_k}(x_k)`` and a per-sample covariance estimate, as rows ``z_j`` with
   ``sum_j z_j z_j^T / dof``: with ``variance="groups"`` (default) from the gradient sums ``G_j`` of
   ``r = groups`` micro-batches (:func:`chunk_bounds`), ``z_j = sqrt(m_j) (G_j / m_j - g)``, ``dof = r - 1``
   (plain forward/backward passes, so BatchNorm and dropout in ``train()`` mode and any closure work);
   with ``variance="per-sample"`` exact per-sample gradients on the variance subset ``V_k`` (all of
   ``S_k`` up to ``variance_samples`` rows, else evenly spaced rows) by ``torch.func.vmap(grad)``,
   centered, ``dof = |V_k| - 1``. Each sample's gradient is computed once per iteration.
2. **Curvature pair of the previous step** (multi-batch, MB): ``y_{k-1} = grad F_{O_{k-1}}(x_k) -
   grad F_{O_{k-1}}(x_{k-1})`` on the overlap the two batches share (no extra gradient); when both
   batches are the whole data set, ``y_{k-1} = g_k - g_{k-1}``. Full overlap (FO) instead pays one
   extra gradient on ``S_k`` at ``x_{k+1}``: ``y_k = grad F_{S_k}(x_{k+1}) - g_k``.
   A pair is stored only if ``y^T s > eps ||s||^2`` (skip rule), or, with ``update="powell"``,
   after Powell damping ``y <- t y + (1-t) B s`` with ``t = 0.8 s^T B s / (s^T B s - s^T y)``
   whenever ``s^T y < 0.2 s^T B s``, where ``B_k s_k = -alpha_k g_k`` exactly (``s_k = -alpha_k H_k g_k``).
   Both keep ``H`` positive definite. Skips and dampings are counted.
3. **Direction** ``p_k = -H_k g_k`` by the two-loop recursion (:func:`two_loop`), ``H^0 = (s^T y / y^T y) I``
   from the newest pair (``I`` with an empty memory).
4. **Sample-size test** (inner-product quasi-Newton test), with ``q_i = grad F_i(x_k)^T H_k g_k``:

       fpc * Var_{i in V_k}(q_i) / |S_k|  <=  theta^2 (g_k^T H_k g_k)^2,

   where, with ``debias=True`` (default, *our choice*, measured in docs/optim.md), ``g^T H g`` is replaced by the unbiased
   estimate of ``grad F^T H grad F``: ``g^T H g - fpc * tr(H Sigma_V) / |S_k|`` (``Sigma_V`` the sample covariance
   of the per-sample gradients). The plain sample version (``debias=False``) passes at the noise
   floor whenever the effective dimension of ``H Sigma`` exceeds ``1/theta^2``, so it stops growing
   the batch exactly when it should (docs/optim.md).

   ``Var`` the sample variance (denominator ``|V_k| - 1``) and ``fpc = (n - |S_k|) / (n - 1)`` the
   finite-population correction of sampling without replacement from ``n`` samples (so the full
   data set, whose gradient is exact, always passes). With ``test="augmented"`` the
   orthogonality test in the ``H_k`` metric is added: with ``u_i = grad F_i - (q_i / g^T H g) g``,
   ``fpc * Var_H(u_i) / |S_k| <= nu^2 g^T H g`` where ``Var_H`` is the sample covariance contracted
   with ``H_k``. When a test fails the sampler is grown to the size that would pass it,
   ``b_hat = ceil(n Var / ((n - 1) rhs + Var))`` (``ceil(Var / rhs)`` without the correction),
   never shrinking, at most ``max_growth`` (2) times the current size, and the whole data set ``n`` once it
   reaches ``full_fraction * n`` (n/2), where the accepted trial point's gradient is the next
   iteration's. *Our choice* (the paper's exact control flow was not recovered): the larger sample is
   used from the **next** batch on, so the method works with any ``DataLoader``; the current step is
   still taken, guarded by the line search.
5. **Initial steplength** (the paper's variance-based trial step; form unconfirmed):
   ``alpha_k^0 = lr / (1 + fpc * Var_vec / (|S_k| ||g_k||^2))``, ``Var_vec`` the sum over coordinates
   of the per-sample gradient variances.
6. **Stochastic Armijo backtracking** on the same sample: accept the first
   ``alpha = alpha_0 tau^j`` (``j <= max_backtracks``) with ``F_S(x + alpha p) <= F_S(x) + c1 alpha g^T p``.
   If none is accepted the iterate is left unchanged and the memory is cleared.

Example, the whole loop::

    import functools, torch
    from torch.utils.data import DataLoader
    from leantrain.optim import PBQN, BatchLoss, ProgressiveSampler

    loss_fn = functools.partial(torch.nn.functional.cross_entropy, reduction="none")
    sampler = ProgressiveSampler(len(train), batch_size=64, overlap=0.25, seed=0)
    loader = DataLoader(train, batch_sampler=sampler)          # batches [O_{k-1} | N_k | O_k]
    opt = PBQN(model.parameters(), sampler)                      # resizes `sampler` when the test fails
    for step, (x, y) in zip(range(200), loader):
        loss = opt.step(BatchLoss(model, loss_fn, x, y, l2=1e-4))
        print(step, sampler.batch_size, float(loss), opt.log[-1]["alpha"])

Or with a plain closure on data-set indices (PBQN draws the batches from its sampler)::

    opt = PBQN(model.parameters(), ProgressiveSampler(len(train), batch_size=64))
    for step in range(200):
        loss = opt.step(lambda idx: torch.nn.functional.cross_entropy(model(x[idx]), y[idx]))

Everything the method keeps (memory, pending pair, counters) lives in ``self.state`` and goes
through ``state_dict()``/``load_state_dict()``, together with the sampler's state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

from leantrain.numerics.flat import add_flat_, flatten, set_flat_
from leantrain.optim.objective import BatchLoss, IndexClosure
from leantrain.optim.sampler import ProgressiveSampler, overlap_size
from leantrain.seeds import derive_seed

__all__ = ["PBQN", "two_loop", "quadratic_forms", "powell_damping", "SampleTest", "inner_product_test", "variance_test",
           "orthogonality_test", "initial_steplength", "finite_population_correction", "chunk_bounds", "chunk_seed"]


def two_loop(vectors: torch.Tensor, s_list: list[torch.Tensor], y_list: list[torch.Tensor], gamma: float) -> torch.Tensor:
    """L-BFGS two-loop recursion: ``H v`` for ``v`` of shape ``[D]`` or a batch ``[B, D]``.

    ``H`` is the BFGS inverse-Hessian approximation obtained from ``H^0 = gamma I`` by the updates
    ``H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T`` (``rho = 1 / y^T s``) with the pairs in
    order oldest to newest.
    """
    q = vectors.clone()
    batched = q.dim() == 2
    alphas = []
    for s, y in zip(reversed(s_list), reversed(y_list)):
        rho = 1.0 / torch.dot(y, s)
        a = rho * (q @ s)
        q = q - (a[:, None] * y if batched else a * y)
        alphas.append((a, rho))
    r = gamma * q
    for (s, y), (a, rho) in zip(zip(s_list, y_list), reversed(alphas)):
        beta = rho * (r @ y)
        r = r + ((a - beta)[:, None] * s if batched else (a - beta) * s)
    return r


def quadratic_forms(rows: torch.Tensor, s_list: list[torch.Tensor], y_list: list[torch.Tensor], gamma: float) -> torch.Tensor:
    """``[c_i^T H c_i]_i`` for the rows ``c_i`` of ``rows`` (``[v, D]``), ``H`` as in :func:`two_loop`.

    Uses the compact representation of Byrd, Nocedal and Schnabel (1994),
    ``H = gamma I + [S, gamma Y] M [S, gamma Y]^T`` with ``M = [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]]``,
    ``R = triu(S^T Y)``, ``D = diag(s_i^T y_i)``: one ``[v, D] x [D, 2m]`` product instead of ``4m`` passes
    over ``rows``.
    """
    base = gamma * (rows * rows).sum(1)
    if not s_list:
        return base
    S = torch.stack(s_list, 1)
    Y = torch.stack(y_list, 1)
    sy = S.T @ Y
    r_inv = torch.linalg.inv(torch.triu(sy))
    m11 = r_inv.T @ (torch.diag(torch.diagonal(sy)) + gamma * (Y.T @ Y)) @ r_inv
    P = rows @ S
    Q = rows @ Y
    return base + ((P @ m11) * P).sum(1) - 2.0 * gamma * ((P @ r_inv.T) * Q).sum(1)


def powell_damping(s: torch.Tensor, y: torch.Tensor, bs: torch.Tensor, threshold: float = 0.2) -> tuple[torch.Tensor, float]:
    """Powell's damping: returns ``(y_damped, t)``.

    If ``s^T y >= threshold * s^T B s`` the pair is kept (``t = 1``); otherwise
    ``y <- t y + (1 - t) B s`` with ``t = (1 - threshold) s^T B s / (s^T B s - s^T y)``, which makes
    ``s^T y_damped = threshold * s^T B s > 0`` (for ``B`` positive definite), so the BFGS update stays
    positive definite. ``bs`` is ``B s``.
    """
    sbs = float(torch.dot(s, bs))
    sy = float(torch.dot(s, y))
    if sbs <= 0.0:
        raise ValueError("powell_damping needs s^T B s > 0 (B positive definite, s != 0)")
    if sy >= threshold * sbs:
        return y, 1.0
    t = (1.0 - threshold) * sbs / (sbs - sy)
    return t * y + (1.0 - t) * bs, t


class SampleTest(NamedTuple):
    """Outcome of a sample-size test: ``lhs <= rhs`` passes; ``b_hat`` the size that would pass."""

    passed: bool
    lhs: float
    rhs: float
    b_hat: int


def finite_population_correction(batch_size: int, num_samples: int | None) -> float:
    """``(n - b) / (n - 1)``: the variance factor of a mean of ``b`` draws without replacement
    from ``n`` (1 for an infinite population ``n=None``, 0 when ``b = n``)."""
    if num_samples is None:
        return 1.0
    if num_samples <= 1:
        return 0.0
    return max(0.0, (num_samples - batch_size) / (num_samples - 1))


def _required_size(var: float, rhs: float, num_samples: int | None) -> int:
    if var <= 0.0:
        return 1
    if num_samples is None:
        return math.ceil(var / rhs) if rhs > 0 else 2**62
    return min(num_samples, math.ceil(num_samples * var / ((num_samples - 1) * rhs + var)))


def inner_product_test(dots: torch.Tensor, ghg: float, batch_size: int, num_samples: int | None,
                       theta: float) -> SampleTest:
    """PBQN's inner-product quasi-Newton test on ``dots = [grad F_i^T H g]_{i in V}`` (see module doc)."""
    var = float(dots.var(unbiased=True)) if dots.numel() > 1 else 0.0
    return variance_test(var, ghg, batch_size, num_samples, theta)


def variance_test(var: float, ghg: float, batch_size: int, num_samples: int | None, theta: float) -> SampleTest:
    """The inner-product test from the per-sample variance ``var`` of ``grad F_i^T H g``:
    ``fpc * var / |S| <= theta^2 (g^T H g)^2``."""
    lhs = finite_population_correction(batch_size, num_samples) * var / batch_size
    rhs = theta**2 * max(ghg, 0.0) ** 2
    return SampleTest(lhs <= rhs, lhs, rhs, _required_size(var, rhs, num_samples))


def orthogonality_test(centered: torch.Tensor, dof: int, g: torch.Tensor, hg: torch.Tensor, ghg: float, apply_h,
                       batch_size: int, num_samples: int | None, nu: float) -> SampleTest:
    """The orthogonality part of the augmented test, in the ``H`` metric (see module doc).

    ``centered`` are rows ``z_j`` with ``sum_j z_j z_j^T / dof`` the per-sample gradient covariance
    (centered per-sample gradients, or scaled micro-batch deviations), ``apply_h`` maps
    ``[v, D] -> H [v, D]``. ``u_j = z_j - (z_j^T H g / g^T H g) g`` and
    ``Var_H = sum_j u_j^T H u_j / dof``.
    """
    if dof < 1:
        var = 0.0
    else:
        gg = float(g.dot(hg))
        u = centered - ((centered @ hg) / gg)[:, None] * g[None, :] if gg > 0 else centered
        var = float((u * apply_h(u)).sum() / dof)
    lhs = finite_population_correction(batch_size, num_samples) * var / batch_size
    rhs = nu**2 * max(ghg, 0.0)
    return SampleTest(lhs <= rhs, lhs, rhs, _required_size(var, rhs, num_samples))


def initial_steplength(var_vec: float, g: torch.Tensor, batch_size: int, num_samples: int | None) -> float:
    """``1 / (1 + fpc * Var_vec / (|S| ||g||^2))``: ``Var_vec`` = sum of per-coordinate sample variances
    of the per-sample gradients (denominator ``v - 1``; 0 when there are fewer than 2)."""
    g2 = float(g.dot(g))
    if g2 == 0.0:
        return 1.0 if var_vec == 0.0 else 0.0
    return 1.0 / (1.0 + finite_population_correction(batch_size, num_samples) * var_vec / (batch_size * g2))


def chunk_bounds(batch_size: int, groups: int, cuts: Iterable[int] = ()) -> list[tuple[int, int]]:
    """Contiguous micro-batches ``[lo, hi)`` covering ``range(batch_size)``: ``groups`` near-equal parts
    (fewer if the batch is smaller), further split at ``cuts`` so no micro-batch straddles one."""
    r = max(1, min(int(groups), batch_size))
    edges = {round(j * batch_size / r) for j in range(r + 1)} | {c for c in cuts if 0 < c < batch_size}
    e = sorted(edges)
    return [(lo, hi) for lo, hi in zip(e[:-1], e[1:]) if hi > lo]


def chunk_seed(seed: int, iteration: int, chunk: int) -> int:
    """The global-RNG seed under which PBQN evaluates micro-batch ``chunk`` in ``iteration``:
    ``derive_seed(seed, iteration * 7919 + chunk) mod (2^63 - 1)`` (:func:`leantrain.seeds.derive_seed`; 7919, a
    prime above any number of micro-batches, keeps the chunks of one iteration apart)."""
    return derive_seed(seed, int(iteration) * 7919 + int(chunk)) % (2**63 - 1)


_COUNTERS = ("iterations", "pairs_stored", "pairs_skipped", "pairs_damped", "backtracks", "alpha0_accepted",
             "line_search_failures", "test_failures", "memory_resets")


class PBQN(Optimizer):
    """Progressive-batching L-BFGS (see the module docstring for the algorithm and the loop).

    Args:
        params: parameters to optimize (one group).
        sampler: the :class:`ProgressiveSampler` producing the batches; PBQN grows it.
        lr: scale of the initial trial steplength (1.0 is the paper's rule).
        history_size: L-BFGS memory ``m`` (>= 1; default 10).
        theta: inner-product test parameter (> 0; default 0.9).
        test: ``"inner"`` or ``"augmented"`` (adds the orthogonality test with ``nu``).
        nu: orthogonality test parameter (> 0; default tan(80 deg) = 5.67).
        curvature: ``"multi-batch"`` (pairs on the overlap; needs ``sampler.overlap > 0``) or
            ``"full-overlap"`` (one extra gradient per iteration).
        update: ``"skip"`` (store a pair only if ``y^T s > eps ||s||^2``) or ``"powell"`` (damping).
        eps: curvature threshold of the skip rule, absolute (>= 0; default 1e-8, see docs/optim.md).
        c1, tau, max_backtracks: Armijo constant (1e-4), backtracking factor (0.5), at most 10 backtracks.
        variance: how the per-sample variances are estimated: ``"groups"`` (default) from the
            gradients of ``groups`` micro-batches (plain forward/backward passes, so BatchNorm and
            dropout in ``train()`` mode work, and any closure), or ``"per-sample"`` from exact
            per-sample gradients by ``torch.func.vmap`` (needs a :class:`BatchLoss` and a model
            without batch-coupled or random layers).
        groups: number of micro-batches ``r`` (>= 2; default 8).
        variance_samples: cap on ``|V_k|`` for ``variance="per-sample"`` (>= 2; default 512).
        debias: use the debiased ``g^T H g`` in the test (default False: the paper's plain test;
            see docs/optim.md for the measurement behind the default).
        max_growth: one enlargement is at most ``max_growth * |S_k|`` (> 1; default 2; None: the test's ``b_hat``).
        full_fraction: when the requested size reaches ``full_fraction * n`` the sample becomes the
            whole data set (in (0, 1]; default 0.5), where the trial point's gradient is reused.
        seed: base seed of the per-iteration random state (dropout masks): every evaluation of
            micro-batch ``j`` in iteration ``k`` runs under ``torch.manual_seed(chunk_seed(seed, k, j))``
            (the generators' states are restored afterwards), so the line search compares one function.
    """

    def __init__(self, params: Iterable[torch.Tensor], sampler: ProgressiveSampler, *, lr: float = 1.0,
                 history_size: int = 10, theta: float = 0.9, test: str = "inner", nu: float = 5.67,
                 curvature: str = "multi-batch", update: str = "skip", eps: float = 1e-8, c1: float = 1e-4,
                 tau: float = 0.5, max_backtracks: int = 10, variance: str = "groups", groups: int = 8,
                 variance_samples: int = 512, debias: bool = True, max_growth: float | None = 2.0,
                 full_fraction: float = 0.5, seed: int = 0) -> None:
        if not isinstance(sampler, ProgressiveSampler):
            raise TypeError(f"sampler must be a ProgressiveSampler, got {type(sampler).__name__}")
        if int(history_size) != history_size or history_size < 1:
            raise ValueError(f"history_size must be an integer >= 1, got {history_size!r}")
        if not theta > 0:
            raise ValueError(f"theta must be > 0, got {theta}")
        if not nu > 0:
            raise ValueError(f"nu must be > 0, got {nu}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if test not in ("inner", "augmented"):
            raise ValueError(f"test must be 'inner' or 'augmented', got {test!r}")
        if curvature not in ("multi-batch", "full-overlap"):
            raise ValueError(f"curvature must be 'multi-batch' or 'full-overlap', got {curvature!r}")
        if curvature == "multi-batch" and sampler.overlap <= 0:
            raise ValueError("curvature='multi-batch' needs a sampler with overlap > 0 (e.g. 0.25)")
        if update not in ("skip", "powell"):
            raise ValueError(f"update must be 'skip' or 'powell', got {update!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not 0 < c1 < 1 or not 0 < tau < 1:
            raise ValueError(f"need 0 < c1 < 1 and 0 < tau < 1, got c1={c1}, tau={tau}")
        if max_backtracks < 0:
            raise ValueError(f"max_backtracks must be >= 0, got {max_backtracks}")
        if variance not in ("groups", "per-sample"):
            raise ValueError(f"variance must be 'groups' or 'per-sample', got {variance!r}")
        if int(groups) != groups or groups < 2:
            raise ValueError(f"groups must be an integer >= 2, got {groups!r}")
        if variance_samples < 2:
            raise ValueError(f"variance_samples must be >= 2, got {variance_samples}")
        if max_growth is not None and not max_growth > 1:
            raise ValueError(f"max_growth must be > 1 or None, got {max_growth}")
        if not 0 < full_fraction <= 1:
            raise ValueError(f"full_fraction must be in (0, 1], got {full_fraction}")
        defaults = dict(lr=lr, history_size=int(history_size), theta=theta, test=test, nu=nu, curvature=curvature,
                        update=update, eps=eps, c1=c1, tau=tau, max_backtracks=int(max_backtracks), variance=variance,
                        groups=int(groups), variance_samples=int(variance_samples), debias=bool(debias),
                        max_growth=max_growth, full_fraction=float(full_fraction), seed=int(seed))
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("PBQN supports a single parameter group (like torch.optim.LBFGS)")
        self._params: list[torch.Tensor] = self.param_groups[0]["params"]
        self.sampler = sampler
        self.log: list[dict[str, Any]] = []
        self._indicators: dict[Any, torch.Tensor] = {}
        self._vmap_chunks: bool | None = None
        st = self._state
        st.setdefault("s", [])
        st.setdefault("y", [])
        for name in _COUNTERS:
            st.setdefault(name, 0)

    # -- state ------------------------------------------------------------------------------
    @property
    def _state(self) -> dict[str, Any]:
        return self.state[self._params[0]]

    @property
    def counters(self) -> dict[str, int]:
        """Iterations, stored/skipped/damped pairs, backtracks, test failures, ..."""
        return {k: int(self._state[k]) for k in _COUNTERS}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["sampler"] = self.sampler.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        sampler_state = state_dict.pop("sampler", None)
        super().load_state_dict(state_dict)
        if sampler_state is not None:
            self.sampler.load_state_dict(sampler_state)

    def memory(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stored curvature pairs ``(s_list, y_list)``, oldest first."""
        return list(self._state["s"]), list(self._state["y"])

    def _gamma(self) -> float:
        s, y = self._state["s"], self._state["y"]
        if not s:
            return 1.0
        return float(torch.dot(s[-1], y[-1]) / torch.dot(y[-1], y[-1]))

    def _apply_h(self, v: torch.Tensor) -> torch.Tensor:
        return two_loop(v, self._state["s"], self._state["y"], self._gamma())

    def _clear_memory(self) -> None:
        st = self._state
        st["s"], st["y"] = [], []
        st["memory_resets"] += 1

    def _store_pair(self, s: torch.Tensor, y: torch.Tensor, bs: torch.Tensor) -> str:
        group, st = self.param_groups[0], self._state
        if group["update"] == "powell":
            y, t = powell_damping(s, y, bs)
            status = "damped" if t < 1.0 else "stored"
            if t < 1.0:
                st["pairs_damped"] += 1
        else:
            if not float(torch.dot(y, s)) > group["eps"] * float(torch.dot(s, s)):
                st["pairs_skipped"] += 1
                return "skipped"
            status = "stored"
        st["s"] = (st["s"] + [s])[-group["history_size"]:]
        st["y"] = (st["y"] + [y])[-group["history_size"]:]
        st["pairs_stored"] += 1
        return status

    # -- evaluations ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _seeded(self, chunk: int):
        """The global generators of the parameters' device (and the CPU's) seeded for micro-batch
        ``chunk`` of this iteration, restored afterwards: the same dropout masks at ``x_k`` and at
        every trial point. Marks the model random when an evaluation draws from them."""
        gens = [torch.default_generator]
        dev = self._params[0].device
        if dev.type == "cuda":
            gens.append(torch.cuda.default_generators[dev.index if dev.index is not None else torch.cuda.current_device()])
        saved = [g.get_state() for g in gens]
        seed = chunk_seed(self.param_groups[0]["seed"], self._state["iterations"], chunk)
        for g in gens:
            g.manual_seed(seed)
        seeded = [g.get_state() for g in gens]
        try:
            yield
        finally:
            if not self._state.get("random_model") and any(not torch.equal(a, g.get_state())
                                                           for a, g in zip(seeded, gens)):
                self._state["random_model"] = True  # dropout & co: the loss depends on the iteration's seed
            for g, st in zip(gens, saved):
                g.set_state(st)

    def _chunk_evals(self, closure, chunks: list[tuple[int, int]], with_grad: bool):
        """``(loss sums [r], gradient sums [r, D] or None)`` of the micro-batches, each under its seeded RNG."""
        if isinstance(closure, BatchLoss):
            return self._batch_evals(closure, chunks, with_grad)
        fs, gs = [], []
        for j, (lo, hi) in enumerate(chunks):
            with self._seeded(j):
                rows = torch.arange(lo, hi)
                if with_grad:
                    with torch.enable_grad():
                        f, g = closure.gradient(self._params, rows, reduction="sum")
                    fs.append(f.detach())
                    gs.append(g.detach())
                else:
                    fs.append(closure.value(rows) * (hi - lo))
        return torch.stack(fs), (torch.stack(gs) if with_grad else None)

    def _vmapped_chunks(self, closure: BatchLoss, chunks: list[tuple[int, int]]):
        """Micro-batch loss and gradient sums by ``torch.func.vmap`` of ``grad`` over the micro-batches
        (padded to one size with zero-weight rows): the cost of one backward pass over the batch.
        Models with batch-coupled or random layers (BatchNorm in train mode, dropout) raise under
        vmap; then ``None`` is returned and this path is not tried again."""
        from torch.func import functional_call, grad, vmap

        try:
            params = self._params
            names = closure.names(params)
            model = closure.model
            others = {n: t.detach() for n, t in model.named_parameters() if n not in set(names)}
            buffers = dict(model.named_buffers())
            size = max(hi - lo for lo, hi in chunks)
            idx = torch.stack([torch.arange(lo, lo + size).clamp(max=hi - 1) for lo, hi in chunks])
            weight = torch.stack([(torch.arange(size) < hi - lo) for lo, hi in chunks]).to(params[0].dtype)
            x, y = closure.inputs, closure.targets
            weight = weight.to(device=x.device)

            def chunk_sum(variables, xc, yc, wc):
                losses = closure.loss_fn(functional_call(model, {**others, **buffers, **variables}, (xc,)), yc)
                # the penalty covers parameters only (never buffers), once per sample of the chunk
                total = (losses.reshape(-1) * wc).sum() + wc.sum() * closure.penalty({**others, **variables})
                return total, total

            variables = {n: p.detach() for n, p in zip(names, params)}
            grads, sums = vmap(grad(chunk_sum, has_aux=True), in_dims=(None, 0, 0, 0))(variables, x[idx], y[idx],
                                                                                     weight)
            self._vmap_chunks = True
            return sums.detach(), torch.cat([grads[n].reshape(len(chunks), -1) for n in names], 1).detach()
        except Exception:  # noqa: BLE001 - any functorch limitation: use the batched backward instead
            self._vmap_chunks = False
            return None

    def _batch_evals(self, closure: BatchLoss, chunks: list[tuple[int, int]], with_grad: bool):
        """:meth:`_chunk_evals` for a :class:`BatchLoss`: one forward pass over the rows the chunks cover
        (the model in its own mode: BatchNorm normalizes over those rows together), per-sample losses,
        and the chunks' gradient sums from one backward pass batched over the chunks' 0/1 indicator
        cotangents (``is_grads_batched``), or one backward per chunk on the same graph if the model's
        backward does not batch."""
        lo0, hi0 = chunks[0][0], chunks[-1][1]
        rows = torch.arange(lo0, hi0)
        m = hi0 - lo0
        # vmap over micro-batches costs one backward plus a fixed overhead, the batched backward r times
        # the weight-gradient work: vmap pays from about 1e6 (batch x parameters) (bench optim, loaded
        # 2-core machine: MLP b=1024 3.2-3.9x vs 4.8x an SGD step, b=256 6.0x vs 4.0x; logreg 10x vs 4.9x)
        big = m * sum(p.numel() for p in self._params) >= 1_000_000
        if with_grad and big and self._vmap_chunks is not False and len(chunks) > 1:
            with self._seeded(0):
                out = self._vmapped_chunks(closure, chunks)
            if out is not None:
                if closure.counter is not None:
                    closure.counter.gradients += m
                return out
        with self._seeded(0), torch.enable_grad():
            losses = closure.losses(rows if m < len(closure) else None)
            if closure.counter is not None:
                if with_grad:
                    closure.counter.gradients += m
                else:
                    closure.counter.functions += m
            if not with_grad:
                return losses.detach().sum().reshape(1), None
            key = (tuple(chunks), losses.dtype, losses.device)
            ind = self._indicators.get(key)
            if ind is None:
                ind = losses.new_zeros(len(chunks), m)
                for j, (lo, hi) in enumerate(chunks):
                    ind[j, lo - lo0:hi - lo0] = 1.0
                self._indicators = {key: ind}  # batches repeat their layout; keep the last one
            sums = ind @ losses.detach()
            try:
                parts = torch.autograd.grad(losses, self._params, grad_outputs=ind, is_grads_batched=True,
                                            allow_unused=True, retain_graph=True)
                grads = torch.cat([torch.zeros(len(chunks), p.numel(), dtype=p.dtype, device=p.device) if t is None
                                   else t.reshape(len(chunks), -1) for p, t in zip(self._params, parts)], 1)
            except RuntimeError:
                rowsg = []
                for j in range(len(chunks)):
                    parts = torch.autograd.grad(losses, self._params, grad_outputs=ind[j], allow_unused=True,
                                                retain_graph=True)
                    rowsg.append(flatten([torch.zeros_like(p) if t is None else t
                                          for p, t in zip(self._params, parts)]))
                grads = torch.stack(rowsg)
        return sums, grads.detach()

    def _groups_gradients(self, closure, a: int, c: int, need_overlap: bool):
        """Loss, gradient, part sums and scaled micro-batch deviations (``variance="groups"``)."""
        b = len(closure)
        full = b == self.sampler.num_samples
        groups = self.param_groups[0]["groups"]
        # on the whole data set the split is fixed, so every full iteration (and the trial gradient it
        # reuses) sees the same function even with BatchNorm; the overlap there is evaluated on its own
        chunks = chunk_bounds(b, groups) if full else chunk_bounds(b, groups, (a, b - c))
        fsum, gsum = self._chunk_evals(closure, chunks, True)
        loss, g = fsum.sum() / b, gsum.sum(0) / b
        sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if full:
            if a > 0 and need_overlap:
                fa, ga = self._chunk_evals(closure, [(0, a)], True)
                sums["A"] = (fa[0], ga[0])
        else:
            for name, (lo, hi) in {"A": (0, a), "C": (b - c, b)}.items():
                mine = torch.tensor([lo <= clo and chi <= hi for clo, chi in chunks])
                if hi > lo:
                    sums[name] = (fsum[mine].sum(), gsum[mine].sum(0))
        if full or len(chunks) < 2:
            return loss, g, sums, g.new_zeros(0, g.numel()), 0, chunks
        # z_j = sqrt(m_j) (G_j - g): sum_j z_j z_j^T / (r - 1) estimates the per-sample covariance
        m = torch.tensor([hi - lo for lo, hi in chunks], dtype=g.dtype, device=g.device)[:, None]
        z = m.sqrt() * (gsum / m - g)
        return loss, g, sums, z, len(chunks) - 1, chunks

    def _per_sample_gradients(self, closure: BatchLoss, a: int, c: int, vmax: int):
        """Loss, gradient, part sums and centered per-sample gradients on V (``variance="per-sample"``).

        On the whole data set (``b = n``) no per-sample gradients are needed: the gradient is
        exact, the test passes and the trial step is 1 (``fpc = 0``).
        """
        params = self._params
        b = len(closure)
        if b == self.sampler.num_samples:
            v_rows = torch.zeros(0, dtype=torch.long)
        else:
            v_rows = torch.arange(b) if b <= vmax else torch.linspace(0, b - 1, vmax).round().long().unique()
        in_v = torch.zeros(b, dtype=torch.bool)
        in_v[v_rows] = True
        if len(v_rows):
            losses_v, grads_v = closure.per_sample_gradients(params, v_rows)
        else:
            p0 = params[0]
            d = sum(p.numel() for p in params)
            losses_v, grads_v = p0.new_zeros(0), p0.new_zeros(0, d)
        parts = {"A": (0, a), "B": (a, b - c), "C": (b - c, b)}
        sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pos = torch.full((b,), -1, dtype=torch.long)
        pos[v_rows] = torch.arange(len(v_rows))
        for name, (lo, hi) in parts.items():
            if hi <= lo:
                continue
            rows = torch.arange(lo, hi)
            mine = rows[in_v[rows]]
            loss_sum = losses_v[pos[mine]].sum()
            g_sum = grads_v[pos[mine]].sum(0)
            rest = rows[~in_v[rows]]
            if len(rest):
                l_rest, g_rest = closure.gradient(params, rest, reduction="sum")
                loss_sum, g_sum = loss_sum + l_rest, g_sum + g_rest
            sums[name] = (loss_sum.detach(), g_sum.detach())
        loss = sum(s[0] for s in sums.values()) / b
        g = sum(s[1] for s in sums.values()) / b
        grads_v = grads_v.detach()
        v = grads_v.shape[0]
        centered = grads_v - grads_v.mean(0, keepdim=True) if v > 1 else grads_v[:0]
        return loss, g, sums, centered, max(0, v - 1), None

    def _as_objective(self, closure):
        if isinstance(closure, (BatchLoss, IndexClosure)):
            return closure
        if callable(closure):
            return IndexClosure(closure, torch.as_tensor(self.sampler.next_batch(), dtype=torch.long))
        raise TypeError("PBQN.step needs a BatchLoss, or a closure(indices) -> mean loss over those samples "
                        f"(PBQN then draws the batch from its sampler); got {type(closure).__name__}")

    # -- one iteration -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure) -> torch.Tensor:  # type: ignore[override]
        """One PBQN iteration; returns ``F_{S_k}(x_k)`` and appends the iteration's details to :attr:`log`.

        ``closure`` is either a :class:`BatchLoss` on the sampler's batch (the DataLoader loop), or
        a plain callable ``closure(indices) -> mean loss`` over data-set samples, in which case
        PBQN draws the batch's indices from its sampler itself (``for _ in range(k): opt.step(closure)``).
        """
        closure = self._as_objective(closure)
        group, st = self.param_groups[0], self._state
        params = self._params
        n = self.sampler.num_samples
        b = len(closure)
        if b > n:
            raise ValueError(f"batch of {b} samples is larger than the sampler's data set ({n})")
        groups_mode = group["variance"] == "groups"
        if not groups_mode and not isinstance(closure, BatchLoss):
            raise TypeError("variance='per-sample' needs a BatchLoss closure (per-sample gradients by vmap); "
                            "use variance='groups' for plain closures")
        mb = group["curvature"] == "multi-batch"
        a = st.get("carry_size", 0) if mb else 0
        c = overlap_size(b, self.sampler.overlap) if mb else 0
        if a + c > b:
            raise ValueError(f"batch of {b} samples cannot hold the carried overlap ({a}) and the next one ({c}); "
                             "feed PBQN the batches of its ProgressiveSampler, in order")
        cache = st.pop("full_cache", None)
        pending = st.pop("pending", None)
        chunked = None
        if (b == n and cache is not None and not st.get("random_model")
                and (not mb or (pending is not None and pending["full"] is not None))
                and torch.equal(cache["w"], flatten([q.detach() for q in params]))):
            # the accepted trial point of the last iteration was evaluated on the whole data set
            loss, g, sums = cache["loss"], cache["g"], {}
            centered, dof = g.new_zeros(0, g.numel()), 0
        elif groups_mode:
            need_overlap = mb and pending is not None and pending["full"] is None
            loss, g, sums, centered, dof, chunked = self._groups_gradients(closure, a, c, need_overlap)
        else:
            with torch.enable_grad():
                loss, g, sums, centered, dof, _ = self._per_sample_gradients(closure, a, c, group["variance_samples"])
        rec: dict[str, Any] = {"iteration": st["iterations"], "batch_size": b, "loss": float(loss),
                               "grad_norm": float(g.norm()), "pair": None}

        # curvature pair of the previous step (multi-batch)
        if mb and pending is not None:
            if pending["full"] is not None and b == n:
                y = g - pending["full"]
            elif a > 0 and pending["overlap_grad"] is not None:
                y = sums["A"][1] / a - pending["overlap_grad"]
            else:
                y = None
            if y is not None:
                rec["pair"] = self._store_pair(pending["s"], y, pending["bs"])

        # direction
        hg = self._apply_h(g)
        ghg = float(g.dot(hg))
        if not (ghg > 0.0 and math.isfinite(ghg)):
            if st["s"]:
                self._clear_memory()
            hg = g.clone()
            ghg = float(g.dot(g))
        p = -hg

        # sample-size test from the rows z_j (sum_j z_j z_j^T / dof = per-sample covariance estimate)
        fpc = finite_population_correction(b, n)
        var_q = float((centered @ hg).pow(2).sum()) / dof if dof else 0.0
        var_vec = float(centered.pow(2).sum()) / dof if dof else 0.0
        ghg_test = ghg
        if group["debias"] and dof:
            noise = float(quadratic_forms(centered, st["s"], st["y"], self._gamma()).sum()) / dof
            ghg_test = ghg - fpc * noise / b
            rec["ghg_noise"] = ghg - ghg_test
        test = variance_test(var_q, ghg_test, b, n, group["theta"])
        b_hat = test.b_hat if not test.passed else b
        passed = test.passed
        if group["test"] == "augmented":
            orth = orthogonality_test(centered, dof, g, hg, ghg_test, self._apply_h, b, n, group["nu"])
            passed = passed and orth.passed
            if not orth.passed:
                b_hat = max(b_hat, orth.b_hat)
            rec.update(orth_lhs=orth.lhs, orth_rhs=orth.rhs)
        rec.update(test_lhs=test.lhs, test_rhs=test.rhs, test_passed=passed, requested_size=b_hat)
        if not passed:
            st["test_failures"] += 1
            if group["max_growth"] is not None:
                b_hat = min(b_hat, math.ceil(group["max_growth"] * b))
            if b_hat >= group["full_fraction"] * n:
                b_hat = n
            self.sampler.grow_to(b_hat)
        rec["next_batch_size"] = self.sampler.batch_size

        # initial steplength and Armijo backtracking on the same sample (and the same micro-batches)
        alpha0 = group["lr"] * initial_steplength(var_vec, g, b, n)
        gtp = -ghg
        alpha, accepted, backtracks = alpha0, False, 0
        f0 = float(loss)
        x0 = [q.detach().clone() for q in params]
        model = getattr(closure, "model", None)
        buffers = [t.clone() for t in model.buffers()] if model is not None else []
        chunks = chunked if chunked is not None else chunk_bounds(b, group["groups"]) if groups_mode else [(0, b)]
        g_trial = f_t = None
        for j in range(group["max_backtracks"] + 1):
            add_flat_(params, p, alpha)
            if b == n:  # on the whole data set the trial's gradient is the next iteration's gradient
                fsum, gsum = self._chunk_evals(closure, chunks, True)
                f_t, g_trial = fsum.sum() / b, gsum.sum(0) / b
                f_trial = float(f_t)
            else:
                f_trial = float(self._chunk_evals(closure, chunks, False)[0].sum() / b)
            if model is not None:  # trial evaluations do not move BatchNorm's running statistics
                for t, t0 in zip(model.buffers(), buffers):
                    t.copy_(t0)
            if math.isfinite(f_trial) and f_trial <= f0 + group["c1"] * alpha * gtp:
                accepted, backtracks = True, j
                break
            set_flat_(params, flatten(x0))
            if j < group["max_backtracks"]:
                alpha *= group["tau"]
            backtracks = j + 1
        st["backtracks"] += backtracks if accepted else group["max_backtracks"]
        rec.update(alpha0=alpha0, alpha=alpha if accepted else 0.0, backtracks=backtracks, accepted=accepted)

        s = alpha * p
        bs = -alpha * g  # B_k s_k, since s_k = -alpha H_k g_k and B_k = H_k^{-1}
        if accepted:
            if backtracks == 0:
                st["alpha0_accepted"] += 1
            if g_trial is not None:
                st["full_cache"] = {"w": flatten([q.detach() for q in params]), "loss": f_t, "g": g_trial}
            if mb:
                st["pending"] = {"s": s, "bs": bs, "overlap_grad": sums["C"][1] / c if c and "C" in sums else None,
                                 "full": g if b == n else None}
            else:
                if g_trial is None:
                    g_trial = self._chunk_evals(closure, chunks, True)[1].sum(0) / b
                rec["pair"] = self._store_pair(s, g_trial - g, bs)
        else:
            st["line_search_failures"] += 1
            self._clear_memory()
        st["carry_size"] = c
        st["iterations"] += 1
        rec["memory"] = len(st["s"])
        self.log.append(rec)
        return loss

    def flat_params(self) -> torch.Tensor:
        """The current iterate as one flat vector."""
        return flatten([p.detach() for p in self._params])
