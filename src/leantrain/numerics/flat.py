"""Parameters as one flat vector, exact Hessian-vector products and conjugate gradients.

The one home of the matrix-free second-order floor that :mod:`leantrain.optim` (PBQN, DANCE) and
:mod:`leantrain.landscape` (sharpness, Lanczos, Hutchinson) share. Pure torch; imports nothing
else of leantrain.

Flat order: a flat vector ``w`` is the concatenation of ``t.reshape(-1)`` for the tensors in the
given order (an optimizer's parameter list, or a model's ``named_parameters()``); :func:`unflatten`
and :func:`named_views` are the inverse maps and return *views* into ``w``, so a function of the
views is a differentiable function of ``w``.

One contract for losses: every function here differentiates the scalar it is given. Whether that
scalar is a mean or a sum over samples is the caller's choice and the result scales with it
(``H v`` of a sum is ``|S|`` times ``H v`` of the mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["flatten", "unflatten", "named_views", "add_flat_", "set_flat_", "hvp_from_gradient", "hvp",
           "conjugate_gradient"]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (a copy)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like`` (ValueError if the sizes differ)."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset:offset + n].view(t.shape))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the tensors {offset}")
    return out


def named_views(vector: torch.Tensor, names: Sequence[str], like: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: view}`` of a flat vector, the mapping :func:`torch.func.functional_call` substitutes."""
    return dict(zip(names, unflatten(vector, like)))


@torch.no_grad()
def add_flat_(params: Sequence[torch.Tensor], vector: torch.Tensor, alpha: float = 1.0) -> None:
    """``params += alpha * vector`` in place, ``vector`` flat in the order of ``params``."""
    for p, v in zip(params, unflatten(vector, params)):
        p.add_(v, alpha=alpha)


@torch.no_grad()
def set_flat_(params: Sequence[torch.Tensor], vector: torch.Tensor) -> None:
    """``params <- vector`` in place (cast to each tensor's dtype and device)."""
    for p, v in zip(params, unflatten(vector, params)):
        p.copy_(v)


def hvp_from_gradient(gradient: torch.Tensor, inputs: Sequence[torch.Tensor], vector: torch.Tensor) -> torch.Tensor:
    """Exact Hessian-vector product by double backpropagation.

    ``gradient`` is the flat gradient of a scalar ``f`` with respect to ``inputs``, computed with
    ``create_graph=True``; the result is ``d/dw (gradient(w) . vector) = H(w) vector`` (flat, in the
    order of ``inputs``; inputs ``f`` does not depend on contribute zeros). The graph is retained, so
    one gradient serves every conjugate-gradient iteration at one point.
    """
    parts = torch.autograd.grad(gradient, inputs, grad_outputs=vector, retain_graph=True, allow_unused=True)
    return flatten([torch.zeros_like(p) if g is None else g for p, g in zip(inputs, parts)])


def hvp(scalar: torch.Tensor, inputs: Sequence[torch.Tensor], vector: torch.Tensor) -> torch.Tensor:
    """``H v`` of the scalar ``f`` (built with grad enabled) with respect to ``inputs``: one gradient
    with ``create_graph=True``, then :func:`hvp_from_gradient`. Detached result."""
    parts = torch.autograd.grad(scalar, inputs, create_graph=True, allow_unused=True)
    g = flatten([torch.zeros_like(p) if t is None else t for p, t in zip(inputs, parts)])
    if not g.requires_grad:  # f is linear in the inputs: H = 0
        return torch.zeros_like(g)
    return hvp_from_gradient(g, inputs, vector).detach()


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, tol: float,
                       max_iter: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Solve ``A v = b`` by CG from ``v = 0`` with ``matvec(u) = A u``; returns ``(v, r, iterations, neg)``.

    ``r = b - A v`` is the recursively updated residual; stops when ``||r|| <= tol``, after
    ``max_iter`` products, or on non-positive curvature ``u^T A u <= 0`` (``neg=True``; ``v`` is the
    last iterate, or ``b`` itself with ``r = 0`` if it happened on the first product).
    """
    v = torch.zeros_like(b)
    r = b.clone()
    u = r.clone()
    rr = float(r.dot(r))
    it = 0
    while math.sqrt(rr) > tol and it < max_iter:
        au = matvec(u)
        it += 1
        uau = float(u.dot(au))
        if uau <= 0.0:
            if it == 1:
                return b.clone(), torch.zeros_like(b), it, True
            return v, r, it, True
        step = rr / uau
        v = v + step * u
        r = r - step * au
        rr_new = float(r.dot(r))
        u = r + (rr_new / rr) * u
        rr = rr_new
    return v, r, it, False
