r"""DANCE: distributed accumulated Newton-CG on a growing sample (Jahani et al.; arXiv:1810.11507).

Stage ``k`` minimizes, on the first ``n_k`` samples (the earlier stages' samples included),

    R_n(w) = (1/n) sum_{i<n} F_i(w) + (mu_n / 2) ||w_reg||^2,   mu_n = c V_n,  V_n = 1/n

(``V_n`` is the statistical accuracy of ``n`` samples; ``accuracy="1/sqrt(n)"`` is offered too;
``w_reg`` are the parameters the :class:`BatchLoss` regularizes, i.e. not the biases). It is
warm-started from stage ``k-1`` and stops when ``||grad R_n(w)|| <= sqrt(2 c) V_n``, which for a
``mu_n``-strongly convex ``R_n`` gives ``R_n(w) - R_n^* <= ||grad||^2 / (2 mu_n) <= V_n``: the stage is
solved to its statistical accuracy and no further. Then ``n <- min(ceil(growth * n), N)``
(growth 2). The run ends when the stage with ``n = N`` passes its test (or, with
``final_gradient_tol``, the tighter ``||grad R_N|| <= final_gradient_tol``).

Each :meth:`DANCE.step` is one inexact, damped Newton iteration on the current stage:

- gradient ``g = grad R_n(w)`` (one all-reduce of ``[loss sum, gradient sum, sample count]``);
- conjugate gradients on ``(nabla^2 R_n(w)) v = -g`` with exact Hessian-vector products (double
  backprop through the gradient's graph; one all-reduce per CG iteration), stopped when the
  residual ``||nabla^2 R_n v + g|| <= max(min(eta, sqrt(||g||)) ||g||, rho sqrt(2c) V_n)``: a
  forcing term (superlinear local convergence) floored at a fraction ``rho`` of the stage's
  target (no stage needs more). *Our choice*: the paper's tolerance was not recovered. On
  non-positive curvature (non-convex models) CG stops and returns its current iterate (``-g``
  if it happens at the first iteration);
- damped Newton step ``w <- w + v / (1 + delta)``, ``delta = sqrt(v^T nabla^2 R_n v)`` (Newton decrement,
  from the CG residual, no extra product).

When a stage's test passes inside :meth:`step`, the next stage starts in the same call: the
gradient graph of the old samples is kept and only the new samples are evaluated, so every
sample gradient is computed once per Newton iteration.

**Distributed.** Rank ``r`` of ``K`` holds the samples ``i`` with ``i mod K == r`` (in the data
order): the strided shard, so each stage's first ``n`` samples are split evenly
(:func:`shard_rows`). Gradients and HVPs are summed with ``torch.distributed.all_reduce`` (gloo
on CPU, NCCL on GPU; launch with ``torchrun``), every rank then does the same CG arithmetic,
so all ranks hold identical iterates, equal to one process's up to summation order.
Communication is counted per call: ``comm_rounds`` (all-reduce calls, one per gradient and per
CG iteration) and ``comm_bytes`` (payload bytes of the reduced tensors per rank; a ring
all-reduce moves about ``2 (K-1)/K`` times that). The counts are of the algorithm's calls, so a
single process reports the same counts as ``K`` ranks.

Work: ``gradient_evals`` (sample gradients) and ``hvp_evals`` (one per sample per HVP), global
over ranks. Effective passes = (gradient_evals + hvp_evals) / N.

Example (each rank runs the same code, e.g. under ``torchrun --nproc_per_node 2``)::

    opt = DANCE(model.parameters(), num_samples=len(x), initial_samples=128, c=l2 * len(x))
    rows = shard_rows(len(x), rank, world_size)
    objective = BatchLoss(model, loss_fn, x[rows], y[rows])   # this rank's shard, in order
    while not opt.done:
        opt.step(objective)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from leantrain.numerics.flat import add_flat_, conjugate_gradient, flatten, hvp_from_gradient
from leantrain.optim.objective import BatchLoss

__all__ = ["DANCE", "shard_rows", "shard_count"]


def shard_count(n: int, rank: int, world_size: int) -> int:
    """How many of the first ``n`` samples rank ``rank`` holds: ``#{i < n : i mod K == rank}``."""
    return max(0, -(-(n - rank) // world_size))


def shard_rows(num_samples: int, rank: int, world_size: int) -> torch.Tensor:
    """Global indices of rank ``rank``'s strided shard: ``rank, rank + K, rank + 2K, ...``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return torch.arange(rank, num_samples, world_size)


_COUNTERS = ("newton_iterations", "cg_iterations", "gradient_evals", "hvp_evals", "comm_rounds", "comm_bytes",
             "negative_curvature", "forced_stage_ends")


class DANCE(Optimizer):
    """Multistage Newton-CG on an accumulating sample (see the module docstring).

    Args:
        params: parameters (one group).
        num_samples: ``N``, the full data size (all ranks together).
        initial_samples: ``m_0`` (default 128, capped at ``N``); ``m_0 = N`` is plain damped Newton-CG
            on the full data.
        growth: sample growth factor ``alpha > 1`` (default 2).
        c: regularization constant, ``mu_n = c V_n`` (> 0). ``c = l2 * N`` (with ``V_n = 1/n``) makes the
            last stage exactly the ``l2``-regularized full problem.
        accuracy: ``"1/n"`` (default) or ``"1/sqrt(n)"`` for ``V_n``.
        cg_forcing: ``eta`` of the CG tolerance (default 0.1); cg_floor: ``rho`` (default 0.1).
        cg_max_iter: CG iterations per Newton step at most (default 100).
        max_stage_iterations: Newton iterations after which a stage ends even if its test fails
            (counted in ``forced_stage_ends``; default None = no limit; the last stage is never forced).
        final_gradient_tol: tighter gradient target for the last stage (optional).
        process_group: torch.distributed group (default: the world group when initialized).
    """

    def __init__(self, params: Iterable[torch.Tensor], num_samples: int, *, initial_samples: int = 128,
                 growth: float = 2.0, c: float = 1.0, accuracy: str = "1/n", cg_forcing: float = 0.1,
                 cg_floor: float = 0.1, cg_max_iter: int = 100, max_stage_iterations: int | None = None,
                 final_gradient_tol: float | None = None, process_group: Any = None) -> None:
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1 (the data set is empty?), got {num_samples!r}")
        if int(initial_samples) != initial_samples or initial_samples < 1:
            raise ValueError(f"initial_samples must be an integer >= 1, got {initial_samples!r}")
        if not growth > 1.0:
            raise ValueError(f"growth must be > 1, got {growth}")
        if not c > 0:
            raise ValueError(f"c must be > 0, got {c}")
        if accuracy not in ("1/n", "1/sqrt(n)"):
            raise ValueError(f"accuracy must be '1/n' or '1/sqrt(n)', got {accuracy!r}")
        if not (0 < cg_forcing < 1 and 0 <= cg_floor < 1):
            raise ValueError(f"need 0 < cg_forcing < 1 and 0 <= cg_floor < 1, got {cg_forcing}, {cg_floor}")
        if cg_max_iter < 1:
            raise ValueError(f"cg_max_iter must be >= 1, got {cg_max_iter}")
        if max_stage_iterations is not None and max_stage_iterations < 1:
            raise ValueError(f"max_stage_iterations must be >= 1 or None, got {max_stage_iterations}")
        if final_gradient_tol is not None and not final_gradient_tol > 0:
            raise ValueError(f"final_gradient_tol must be > 0, got {final_gradient_tol}")
        defaults = dict(growth=float(growth), c=float(c), accuracy=accuracy, cg_forcing=cg_forcing, cg_floor=cg_floor,
                        cg_max_iter=int(cg_max_iter), max_stage_iterations=max_stage_iterations,
                        final_gradient_tol=final_gradient_tol)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("DANCE supports a single parameter group")
        self._params: list[torch.Tensor] = self.param_groups[0]["params"]
        self.num_samples = int(num_samples)
        self.process_group = process_group
        self.log: list[dict[str, Any]] = []
        st = self._state
        st.setdefault("n", min(int(initial_samples), self.num_samples))
        st.setdefault("stage", 0)
        st.setdefault("stage_iterations", 0)
        st.setdefault("done", False)
        st.setdefault("stage_sizes", [st["n"]])
        for name in _COUNTERS:
            st.setdefault(name, 0)

    # -- state and distribution -------------------------------------------------------------
    @property
    def _state(self) -> dict[str, Any]:
        return self.state[self._params[0]]

    @property
    def world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process in the group (``(0, 1)`` without torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    @property
    def stage_size(self) -> int:
        return int(self._state["n"])

    @property
    def done(self) -> bool:
        return bool(self._state["done"])

    @property
    def counters(self) -> dict[str, int]:
        st = self._state
        out = {k: int(st[k]) for k in _COUNTERS}
        out.update(stages=len(st["stage_sizes"]), stage_size=int(st["n"]))
        return out

    def passes(self) -> float:
        """Effective passes over the data: (sample gradients + sample HVPs) / N."""
        st = self._state
        return (st["gradient_evals"] + st["hvp_evals"]) / self.num_samples

    def accuracy(self, n: int) -> float:
        """``V_n``."""
        return 1.0 / n if self.param_groups[0]["accuracy"] == "1/n" else 1.0 / math.sqrt(n)

    def target(self, n: int) -> float:
        """Gradient-norm target of the stage on ``n`` samples: ``sqrt(2c) V_n`` (tighter at the end if asked)."""
        group = self.param_groups[0]
        t = math.sqrt(2.0 * group["c"]) * self.accuracy(n)
        if n == self.num_samples and group["final_gradient_tol"] is not None:
            t = min(t, group["final_gradient_tol"])
        return t

    def _allreduce(self, t: torch.Tensor) -> torch.Tensor:
        st = self._state
        st["comm_rounds"] += 1
        st["comm_bytes"] += t.numel() * t.element_size()
        if self.world[1] > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        return t

    # -- one Newton iteration -----------------------------------------------------------------
    def _local_gradient(self, closure: BatchLoss, lo: int, hi: int):
        """Sum of F_i and of grad F_i over local rows [lo, hi), with graph; None when empty."""
        if hi <= lo:
            return None
        return closure.gradient(self._params, torch.arange(lo, hi), reduction="sum", create_graph=True)

    def _reduce_gradient(self, pieces, n: int, mask: torch.Tensor, w: torch.Tensor):
        p0 = self._params[0]
        d = mask.numel()
        buf = torch.zeros(d + 2, dtype=p0.dtype, device=p0.device)
        for loss_sum, g_sum, count in pieces:
            buf[0] += loss_sum.detach()
            buf[1] += count
            buf[2:] += g_sum.detach()
        self._allreduce(buf)
        if int(round(float(buf[1]))) != n:
            raise ValueError(f"the ranks' objectives cover {int(buf[1])} samples of the stage, expected {n}: give each "
                             "rank a BatchLoss over its whole shard (shard_rows), in data order")
        mu = self.param_groups[0]["c"] * self.accuracy(n)
        wreg = mask * w
        value = float(buf[0]) / n + 0.5 * mu * float(wreg.dot(wreg))
        return value, buf[2:] / n + mu * wreg

    @torch.no_grad()
    def step(self, closure: BatchLoss) -> torch.Tensor:  # type: ignore[override]
        """One damped Newton-CG iteration (after any stage advances); returns ``R_n(w)`` before it.

        ``closure`` is a :class:`BatchLoss` over this rank's whole shard of the data
        (:func:`shard_rows`), rows in data order; DANCE picks each stage's rows from it.
        """
        if not isinstance(closure, BatchLoss):
            raise TypeError("DANCE.step needs a BatchLoss over this rank's shard of the data")
        group, st = self.param_groups[0], self._state
        params = self._params
        rank, world = self.world
        N = self.num_samples
        if len(closure) != shard_count(N, rank, world):
            raise ValueError(f"rank {rank} of {world} must hold {shard_count(N, rank, world)} samples of {N} "
                             f"(strided shard), the BatchLoss has {len(closure)}")
        w = flatten([p.detach() for p in params])
        mask = closure.regularized_mask(params).to(w)
        n = int(st["n"])
        if st["done"]:
            return torch.tensor(float("nan"))
        with torch.enable_grad():
            local_n = shard_count(n, rank, world)
            piece = self._local_gradient(closure, 0, local_n)
            pieces = [] if piece is None else [(piece[0], piece[1], local_n)]
            st["gradient_evals"] += n
            value, g = self._reduce_gradient(pieces, n, mask, w)
            while True:
                gnorm = float(g.norm())
                stage_done = gnorm <= self.target(n)
                forced = (not stage_done and n < N and group["max_stage_iterations"] is not None
                          and st["stage_iterations"] >= group["max_stage_iterations"])
                if not (stage_done or forced):
                    break
                if forced:
                    st["forced_stage_ends"] += 1
                self.log.append({"event": "stage_end", "stage": st["stage"], "n": n, "objective": value,
                                 "grad_norm": gnorm, "target": self.target(n), "cg_iterations": 0, "forced": forced,
                                 "done": n == N})
                if n == N:
                    st["done"] = True
                    return torch.tensor(value)
                n_new = min(N, math.ceil(group["growth"] * n))
                lo, hi = shard_count(n, rank, world), shard_count(n_new, rank, world)
                piece = self._local_gradient(closure, lo, hi)
                if piece is not None:
                    pieces.append((piece[0], piece[1], hi - lo))
                st["gradient_evals"] += n_new - n
                n = n_new
                st["n"], st["stage"], st["stage_iterations"] = n, st["stage"] + 1, 0
                st["stage_sizes"] = st["stage_sizes"] + [n]
                value, g = self._reduce_gradient(pieces, n, mask, w)

            mu = group["c"] * self.accuracy(n)

            def hvp(u: torch.Tensor) -> torch.Tensor:
                local = torch.zeros_like(u)
                for _, g_sum, _ in pieces:
                    local += hvp_from_gradient(g_sum, params, u)
                st["hvp_evals"] += n
                return self._allreduce(local) / n + mu * mask * u

            tol = max(min(group["cg_forcing"], math.sqrt(gnorm)) * gnorm, group["cg_floor"] * self.target(n))
            v, r, cg_it, neg = conjugate_gradient(hvp, -g, tol, group["cg_max_iter"])
        if neg:
            st["negative_curvature"] += 1
        vhv = float(v.dot(-g - r)) if not (neg and cg_it == 1) else float(g.dot(g))
        delta = math.sqrt(max(vhv, 0.0))
        add_flat_(params, v, 1.0 / (1.0 + delta))
        st["newton_iterations"] += 1
        st["cg_iterations"] += cg_it
        st["stage_iterations"] += 1
        self.log.append({"event": "newton", "stage": st["stage"], "n": n, "objective": value, "grad_norm": gnorm,
                         "target": self.target(n), "cg_iterations": cg_it, "cg_residual": float(r.norm()),
                         "cg_tol": tol, "delta": delta, "negative_curvature": neg, "done": False})
        return torch.tensor(value)
