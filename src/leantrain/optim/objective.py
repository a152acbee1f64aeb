"""Sample objectives shared by PBQN and DANCE: values, gradients, per-sample gradients and
Hessian-vector products of ``F_S(w) = (1/|S|) sum_{i in S} F_i(w)``, with work accounting.

Each sample's function is ``F_i(w) = loss_fn(model(x_i), y_i) + (l2 / 2) * ||w_reg||^2``, where
``w_reg`` are the parameters whose name does not end in one of ``unregularized`` (by default
the biases: an L2 penalty on the bias would make the optimum depend on the location of the
data). ``loss_fn`` must return *per-sample* losses (shape ``[b]``), e.g.
``functools.partial(torch.nn.functional.cross_entropy, reduction="none")``.

Parameters are handled as one flat vector, in the order of the optimizer's parameter list
(:func:`flatten`). Work is counted in *sample evaluations* on a :class:`WorkCounter`:
a gradient on ``b`` samples adds ``b`` gradient evaluations, a loss-only evaluation adds ``b``
function evaluations, a Hessian-vector product adds ``b`` HVP evaluations. Effective passes
over the data = (gradients + functions + hvps) / n: an HVP on a sample counts as one more
gradient evaluation on it, and a loss-only evaluation (line search) is charged like a gradient
(an upper bound: a forward pass alone costs about a third of forward plus backward).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from leantrain.numerics.flat import add_flat_, flatten, hvp_from_gradient, unflatten

__all__ = ["WorkCounter", "BatchLoss", "IndexClosure", "flatten", "unflatten", "add_flat_", "hvp_from_gradient", "Rows"]

Rows = torch.Tensor | slice | None
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class WorkCounter:
    """Sample evaluations done so far (see the module docstring for how passes are counted)."""

    gradients: int = 0
    functions: int = 0
    hvps: int = 0

    @property
    def total(self) -> int:
        return self.gradients + self.functions + self.hvps

    def passes(self, n: int) -> float:
        """Effective passes over a data set of ``n`` samples."""
        return self.total / n

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class BatchLoss:
    """The sample objective ``F_S`` on a batch ``(inputs, targets)`` of a model.

    This is the "closure" of :class:`~leantrain.optim.PBQN` and :class:`~leantrain.optim.DANCE`:
    unlike torch's closures it can evaluate sub-batches (``rows``), per-sample gradients
    (``torch.func.vmap`` over ``torch.func.grad``) and Hessian-vector products.

    Args:
        model: the network; its parameters are the variables (those not given to an optimizer
            are held fixed).
        loss_fn: ``loss_fn(outputs, targets) -> per-sample losses`` of shape ``[b]``.
        inputs, targets: the batch (same first dimension, at least one sample).
        l2: L2 coefficient ``l2`` in ``F_i = loss_i + (l2/2) ||w_reg||^2`` (>= 0).
        unregularized: parameter-name suffixes left out of the penalty (default: biases).
        counter: where sample evaluations are counted (optional).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, *,
                 l2: float = 0.0, unregularized: Sequence[str] = ("bias",), counter: WorkCounter | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(outputs, targets) -> per-sample losses")
        if len(inputs) == 0:
            raise ValueError("inputs: the batch (data set) is empty; need at least one sample")
        if len(inputs) != len(targets):
            raise ValueError(f"inputs and targets differ in length: {len(inputs)} vs {len(targets)}")
        if not (l2 >= 0.0):
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.model, self.loss_fn = model, loss_fn
        self.inputs, self.targets = inputs, targets
        self.l2 = float(l2)
        self.unregularized = tuple(unregularized)
        self.counter = counter
        self._names = {id(p): n for n, p in model.named_parameters()}

    def __len__(self) -> int:
        return len(self.inputs)

    # -- parameters -------------------------------------------------------------------------
    def names(self, params: Sequence[torch.Tensor]) -> list[str]:
        """The model's names of ``params`` (ValueError if one is not a parameter of the model)."""
        try:
            return [self._names[id(p)] for p in params]
        except KeyError:
            raise ValueError("params: every optimized tensor must be a parameter of the BatchLoss's model") from None

    def is_regularized(self, name: str) -> bool:
        return not any(name.endswith(s) for s in self.unregularized)

    def regularized_mask(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """Flat 0/1 vector: 1 where the entry belongs to a regularized parameter."""
        return flatten([torch.full_like(p, float(self.is_regularized(n))) for p, n in zip(params, self.names(params))])

    def penalty(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(l2/2) * sum of squares of the regularized tensors`` in ``named``."""
        terms = [t.pow(2).sum() for n, t in named.items() if self.is_regularized(n)]
        if self.l2 == 0.0 or not terms:
            return next(iter(named.values())).new_zeros(())
        return 0.5 * self.l2 * torch.stack(terms).sum()

    # -- evaluations ------------------------------------------------------------------------
    def _select(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            return self.inputs, self.targets
        return self.inputs[rows], self.targets[rows]

    def _per_sample_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = self.loss_fn(self.model(x), y)
        if losses.shape != (len(x),):
            raise ValueError(f"loss_fn must return per-sample losses of shape ({len(x)},), got {tuple(losses.shape)}; "
                             "use reduction='none'")
        if self.l2 == 0.0:
            return losses
        return losses + self.penalty(dict(self.model.named_parameters()))

    def losses(self, rows: Rows = None) -> torch.Tensor:
        """Per-sample ``F_i`` on ``rows`` (all by default), differentiable; not counted."""
        return self._per_sample_losses(*self._select(rows))

    @torch.no_grad()
    def value(self, rows: Rows = None) -> torch.Tensor:
        """``F_S`` (mean over ``rows``) without gradient; counts ``|rows|`` function evaluations."""
        x, y = self._select(rows)
        if self.counter is not None:
            self.counter.functions += len(x)
        return self._per_sample_losses(x, y).mean()

    def gradient(self, params: Sequence[torch.Tensor], rows: Rows = None, *, reduction: str = "mean",
                 create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F, flat gradient)`` over ``rows``, summed (``reduction="sum"``) or averaged.

        Counts ``|rows|`` gradient evaluations. With ``create_graph`` the gradient can be
        differentiated again (:func:`hvp_from_gradient`).
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        x, y = self._select(rows)
        if self.counter is not None:
            self.counter.gradients += len(x)
        with torch.enable_grad():
            losses = self._per_sample_losses(x, y)
            total = losses.sum() if reduction == "sum" else losses.mean()
            parts = torch.autograd.grad(total, params, create_graph=create_graph, allow_unused=True)
        g = flatten([torch.zeros_like(p) if t is None else t for p, t in zip(params, parts)])
        return (total if create_graph else total.detach()), g

    def per_sample_gradients(self, params: Sequence[torch.Tensor], rows: Rows = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact per-sample ``(F_i, grad F_i)`` for ``rows``: shapes ``[v]`` and ``[v, D]``.

        Computed with ``torch.func.vmap(torch.func.grad(...))`` over single-sample calls of the
        model (``functional_call``), so each row is that sample's own gradient, penalty included.
        Models with batch-coupled layers (batch norm in training mode) have no per-sample
        gradient and are not supported. Counts ``v`` gradient evaluations.
        """
        x, y = self._select(rows)
        if self.counter is not None:
            self.counter.gradients += len(x)
        names = self.names(params)
        fixed = {n: t.detach() for n, t in self.model.named_parameters() if n not in set(names)}
        fixed.update(dict(self.model.named_buffers()))

        def sample_loss(variables: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
            out = functional_call(self.model, {**fixed, **variables}, (xi.unsqueeze(0),))
            value = self.loss_fn(out, yi.unsqueeze(0)).reshape(())
            return value, value

        variables = {n: p.detach() for n, p in zip(names, params)}
        grads, values = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0))(variables, x, y)
        flat = torch.cat([grads[n].reshape(len(x), -1) for n in names], dim=1)
        if self.l2 != 0.0:
            # the penalty is the same for every sample: its value and gradient l2 * w_reg are added once.
            # It covers the model's parameters only, never its buffers (BatchNorm statistics, position ids).
            values = values + self.penalty({n: t.detach() for n, t in self.model.named_parameters()
                                            if n not in variables} | variables)
            w = flatten([v for v in variables.values()])
            flat = flat + self.l2 * self.regularized_mask(params).to(w) * w
        return values, flat

    def hvp(self, params: Sequence[torch.Tensor], vector: torch.Tensor, rows: Rows = None) -> torch.Tensor:
        """``nabla^2 F_S(w) vector`` (mean over ``rows``) by double backprop; counts ``|rows|`` gradient
        evaluations (the gradient it differentiates) and ``|rows|`` HVP evaluations."""
        _, g = self.gradient(params, rows, create_graph=True)
        if self.counter is not None:
            self.counter.hvps += len(self._select(rows)[0])
        return hvp_from_gradient(g, params, vector).detach()


class IndexClosure:
    """A plain closure on sample indices, seen as a sample objective on one batch.

    ``fn(indices) -> scalar`` must return the *mean* loss (regularization included, if any) over
    the data-set samples ``indices`` (a 1-D ``torch.long`` tensor), computed by the caller's model
    in whatever mode it is in; ``indices`` are the batch's global indices from the sampler. This is
    the closure form :meth:`leantrain.optim.PBQN.step` accepts besides :class:`BatchLoss`. It offers
    values and gradients on sub-batches (``rows`` index into ``indices``), not per-sample gradients,
    so PBQN estimates variances from micro-batch gradients (``variance="groups"``).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], indices: torch.Tensor, *,
                 counter: WorkCounter | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"closure must be callable as closure(indices) -> mean loss, got {type(fn).__name__}")
        self.fn = fn
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        if self.indices.dim() != 1 or len(self.indices) == 0:
            raise ValueError("indices: need a non-empty 1-D tensor of sample indices")
        self.counter = counter

    def __len__(self) -> int:
        return len(self.indices)

    def _call(self, rows: Rows) -> torch.Tensor:
        idx = self.indices if rows is None else self.indices[rows]
        loss = self.fn(idx)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("closure(indices) must return the mean loss over those samples as a scalar tensor, got "
                             f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
        return loss

    @torch.no_grad()
    def value(self, rows: Rows = None) -> torch.Tensor:
        """Mean loss over ``rows`` (all by default) without gradient; counts ``|rows|`` function evaluations."""
        loss = self._call(rows)
        if self.counter is not None:
            self.counter.functions += len(self.indices) if rows is None else len(self.indices[rows])
        return loss.detach()

    def gradient(self, params: Sequence[torch.Tensor], rows: Rows = None, *, reduction: str = "mean",
                 create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F, flat gradient)`` over ``rows``, summed or averaged; counts ``|rows|`` gradient evaluations."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        m = len(self.indices) if rows is None else len(self.indices[rows])
        if self.counter is not None:
            self.counter.gradients += m
        with torch.enable_grad():
            loss = self._call(rows)
            total = loss * m if reduction == "sum" else loss
            parts = torch.autograd.grad(total, params, create_graph=create_graph, allow_unused=True)
        g = flatten([torch.zeros_like(p) if t is None else t for p, t in zip(params, parts)])
        return (total if create_graph else total.detach()), g
