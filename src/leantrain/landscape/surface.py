"""The training function ``f(x)`` of a network as a function of its flattened trainable parameters.

Every diagnostic in :mod:`leantrain.landscape` evaluates one object, :class:`LossSurface`::

    f(x) = (1/M) * sum_{i=1..M} loss_fn(model_x(input_i), target_i)

where ``x`` is the concatenation (in ``model.named_parameters()`` order) of the model's
*trainable* parameters (``requires_grad=True``) and ``model_x`` is the network with those
parameters replaced by ``x``. ``loss_fn`` must return the mean over its batch (PyTorch's default
``reduction="mean"``); batches are re-weighted by their size, so ``f`` is the exact mean over the
whole data set whatever ``batch_size`` is.

Module state policy (the same for sharpness, interpolation and the Hessian tools):

- the diagnostic works on a private ``copy.deepcopy`` of the model; the caller's model, its
  parameters, buffers, ``requires_grad`` flags and the train/eval flag of every submodule are
  never written to;
- the copy is put in **eval mode**: BatchNorm normalizes with its stored running statistics and
  dropout is off, so ``f`` is a deterministic function of ``x`` (as in the paper's recipe);
- buffers (BatchNorm running mean/variance) are *not* part of ``x``: they are held fixed at the
  model's values, never perturbed, differentiated or updated; frozen parameters
  (``requires_grad=False``) are held fixed likewise.

Gradients are exact (reverse mode); Hessian-vector products are exact (double backward, i.e.
``H v = d/dx (grad f(x) . v)``), computed batch by batch and summed with the same weights as ``f``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset, TensorDataset

from leantrain.numerics.flat import hvp, named_views
from leantrain.train import batches

__all__ = ["LossSurface", "as_dataset", "LossFn"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_dataset(data: Any, *, name: str = "data") -> Dataset:
    """Coerce ``data`` into a map-style dataset of (input, target) pairs.

    Accepted: a ``torch.utils.data.Dataset`` (e.g. ``TensorDataset``), an ``(inputs, targets)``
    pair of tensors, or a :class:`leantrain.data.Split` (its ``train`` part: the paper's metrics
    are computed on the training function).
    """
    if hasattr(data, "train") and hasattr(data, "test") and isinstance(data.train, Dataset):
        return data.train
    if isinstance(data, Dataset):
        n = len(data)  # type: ignore[arg-type]
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise ValueError(f"{name}: inputs and targets differ in length ({len(data[0])} vs {len(data[1])})")
        data = TensorDataset(data[0], data[1])
        n = len(data)
    else:
        raise TypeError(f"{name} must be a torch Dataset, an (inputs, targets) tensor pair or a leantrain Split, "
                        f"got {type(data).__name__}")
    if n == 0:
        raise ValueError(f"{name} is empty")
    return data


class LossSurface:
    """``f(x)``: the mean loss of ``model`` over ``data`` as a function of its flat trainable parameters.

    Args:
        model: the network; it is deep-copied and never modified (see the module docstring).
        loss_fn: ``loss_fn(output, target) -> scalar`` mean over the batch.
        data: see :func:`as_dataset`. It is split into batches of ``batch_size`` once and kept on
            the model's device for the repeated evaluations the diagnostics make.
        batch_size: evaluation batch size (memory only: ``f`` does not depend on it up to rounding).
        dtype: compute dtype (default: the dtype of the model's first trainable parameter).
            ``torch.float64`` gives more accurate small differences ``f(x + d) - f(x)`` at twice
            the cost; floating inputs are cast to it.

    Attributes:
        x0: the model's own parameter vector (a detached copy, in ``dtype``); ``dim`` its length.
        size: the number of samples ``M``.
        cache: quantities derived from ``x0`` that diagnostics reuse across calls on this surface
            (e.g. :func:`leantrain.landscape.sharpness` keeps its last random subspace and ``A^+ x``).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, *, batch_size: int = 1024,
                 dtype: torch.dtype | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(output, target)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.dtype = dtype or trainable[0][1].dtype
        self.loss_fn = loss_fn
        probe = copy.deepcopy(model)
        if dtype is not None:
            probe.to(dtype)
        probe.eval()
        self._probe = probe
        names = {k for k, _ in trainable}
        params = [(k, p) for k, p in probe.named_parameters() if k in names]
        self.names = [k for k, _ in params]
        self.shapes = [p.shape for _, p in params]
        self.numels = [p.numel() for _, p in params]
        self._like = [p for _, p in params]
        self.device = params[0][1].device
        self.x0 = torch.cat([p.detach().reshape(-1).to(self.dtype) for _, p in params]).clone()
        self.dim = int(self.x0.numel())
        self.cache: dict[Any, Any] = {}
        dataset = as_dataset(data)
        self.size = len(dataset)  # type: ignore[arg-type]
        self._batches = [self._to_device(b) for b in batches(dataset, torch.arange(self.size), batch_size)]

    @classmethod
    def reuse(cls, surface: LossSurface | None, model: nn.Module, loss_fn: LossFn, data: Any, *, batch_size: int,
              dtype: torch.dtype | None) -> LossSurface:
        """``surface`` when given (after checking it has ``model``'s parameter count), else a new one."""
        if surface is None:
            return cls(model, loss_fn, data, batch_size=batch_size, dtype=dtype)
        if not isinstance(surface, LossSurface):
            raise TypeError(f"surface must be a LossSurface, got {type(surface).__name__}")
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if n != surface.dim:
            raise ValueError(f"surface has {surface.dim} parameters but model has {n}: build it from the same model")
        return surface

    def _to_device(self, batch: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = tuple(batch)[:2]
        x = x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)
        return x, y.to(self.device)

    def parameters_of(self, x: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """The parameter dictionary (views into ``x``) that :func:`torch.func.functional_call` substitutes."""
        return named_views(x, self.names, self._like)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != (self.dim,):
            raise ValueError(f"x must be a flat vector of {self.dim} parameters, got shape {tuple(x.shape)}")
        return x.to(self.device, self.dtype)

    def _batch_loss(self, x: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, target = batch
        out = functional_call(self._probe, self.parameters_of(x), (inputs,))
        # loss_fn returns a batch mean; weight by batch size so the sum is the data-set mean.
        return self.loss_fn(out, target) * (len(target) / self.size)

    def value(self, x: torch.Tensor | None = None) -> float:
        """``f(x)`` (``x`` defaults to the model's own parameters)."""
        x = self.x0 if x is None else self._check(x)
        with torch.no_grad():
            return float(sum(float(self._batch_loss(x, b)) for b in self._batches))

    def value_and_grad(self, x: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """``(f(x), grad f(x))`` with the exact gradient (reverse mode, batch by batch)."""
        x = (self.x0 if x is None else self._check(x)).detach().requires_grad_(True)
        total, grad = 0.0, torch.zeros_like(x)
        for b in self._batches:
            loss = self._batch_loss(x, b)
            (g,) = torch.autograd.grad(loss, x)
            grad += g
            total += float(loss.detach())
        return total, grad.detach()

    def hvp(self, v: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The exact Hessian-vector product ``H(x) v`` (double backward, batch by batch)."""
        v = self._check(v)
        x = (self.x0 if x is None else self._check(x)).detach().requires_grad_(True)
        out = torch.zeros_like(x)
        for b in self._batches:
            out += hvp(self._batch_loss(x, b), [x], v)
        return out
