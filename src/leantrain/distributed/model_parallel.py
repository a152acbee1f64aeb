"""Model parallelism: a Linear layer split over the model group (MLSL's Activation exchange).

With ``y = x W^T + b``, ``W`` of shape (out, in), and ``M`` ranks in the model group:

- :class:`ColumnParallelLinear` splits the *output* features: rank ``m`` holds rows ``W_m`` (out/M of them) and
  ``b_m``, computes ``y_m = x W_m^T + b_m`` on the full (replicated) input, and, with ``gather_output=True``,
  all-gathers ``y = [y_0, ..., y_{M-1}]`` along the last dimension. Backward: ``dL/dx = sum_m dL/dy_m W_m`` is
  all-reduced over the model group (each rank only sees its own ``y_m``'s contribution).
- :class:`RowParallelLinear` splits the *input* features: rank ``m`` holds columns ``W_m`` (in/M of them), takes
  its slice ``x_m`` of the input (or receives it already split, ``input_is_parallel=True``) and all-reduces the
  partial products ``y = sum_m x_m W_m^T``, then adds the replicated bias. Backward: ``dL/dx_m = dL/dy W_m``,
  local.

Column followed by row (``gather_output=False``, ``input_is_parallel=True``) exchanges activations only once
per direction: one all-reduce in the forward, one in the backward. The four exchange points are autograd
functions whose backward is the adjoint of their forward (identity <-> all-reduce, gather <-> slice).
Features must divide evenly by the model group size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from leantrain.distributed.distribution import Distribution, Group

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "copy_to_model", "reduce_from_model", "gather_from_model",
           "scatter_to_model"]


def _model_group(group: Distribution | Group) -> Group:
    if isinstance(group, Distribution):
        return group.model_group
    if isinstance(group, Group):
        return group
    raise TypeError(f"group must be a Distribution or a Group, got {type(group).__name__}")


def _all_reduce(x: torch.Tensor, group: Group, what: str) -> torch.Tensor:
    y = x.contiguous().clone()
    group.all_reduce(y, f"all_reduce of {what} {tuple(x.shape)}").wait()
    return y


def _gather_last(x: torch.Tensor, group: Group, what: str) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty((group.size, *x.shape), dtype=x.dtype, device=x.device)
    group.all_gather(out.view(-1), x.view(-1), f"all_gather of {what} {tuple(x.shape)}").wait()
    return torch.cat(out.unbind(0), dim=-1)


def _slice_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    k = x.shape[-1] // group.size
    return x[..., group.rank * k:(group.rank + 1) * k].contiguous()


class _CopyToModel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(g, ctx.group, "input gradient (column-parallel backward)"), None


class _ReduceFromModel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x, group, "partial outputs (row-parallel forward)")

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


class _GatherFromModel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _gather_last(x, group, "output slices (column-parallel forward)")

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _slice_last(g, ctx.group), None


class _ScatterToModel(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _slice_last(x, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_last(g, ctx.group, "input-gradient slices (row-parallel backward)"), None


def copy_to_model(x: torch.Tensor, group: Distribution | Group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over the model group in backward."""
    return _CopyToModel.apply(x, _model_group(group))


def reduce_from_model(x: torch.Tensor, group: Distribution | Group) -> torch.Tensor:
    """All-reduce (sum) over the model group forward; identity backward."""
    return _ReduceFromModel.apply(x, _model_group(group))


def gather_from_model(x: torch.Tensor, group: Distribution | Group) -> torch.Tensor:
    """All-gather along the last dimension forward; this rank's slice of the gradient backward."""
    return _GatherFromModel.apply(x, _model_group(group))


def scatter_to_model(x: torch.Tensor, group: Distribution | Group) -> torch.Tensor:
    """This rank's slice along the last dimension forward; all-gather of the gradient backward."""
    return _ScatterToModel.apply(x, _model_group(group))


def _split(features: int, parts: int, what: str) -> int:
    if features % parts:
        raise ValueError(f"{what}={features} must be divisible by the model group size {parts}")
    return features // parts


def _full_init(out_features: int, in_features: int, bias: bool, seed: int, dtype: Any, device: Any
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear's default initialisation of the *full* layer, from a seed every rank shares."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    # kaiming_uniform_(a=sqrt(5)) as in nn.Linear reduces to U(-1/sqrt(in), 1/sqrt(in)).
    w = (torch.rand(out_features, in_features, generator=g, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(out_features, generator=g, dtype=torch.float64) * 2 - 1) * bound if bias else None
    return w.to(dtype=dtype, device=device), (b.to(dtype=dtype, device=device) if b is not None else None)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with the output features split over the model group (see the module doc).

    Args:
        in_features, out_features: sizes of the full layer; ``out_features`` divisible by the group size.
        group: a :class:`Distribution` (its model group is used) or a :class:`Group`.
        bias: learn a bias (split like the output features).
        gather_output: all-gather the full output (else return this rank's slice, for a following
            :class:`RowParallelLinear` with ``input_is_parallel=True``).
        seed: the full layer is initialised like ``nn.Linear`` from this seed on every rank, then sliced.
    """

    def __init__(self, in_features: int, out_features: int, group: Distribution | Group, *, bias: bool = True,
                 gather_output: bool = True, seed: int = 0, dtype: torch.dtype | None = None,
                 device: Any = None) -> None:
        super().__init__()
        self.group = _model_group(group)
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        k = _split(out_features, self.group.size, "out_features")
        w, b = _full_init(out_features, in_features, bias, seed, dtype or torch.get_default_dtype(), device)
        r = self.group.rank
        self.weight = nn.Parameter(w[r * k:(r + 1) * k].clone())
        self.bias = nn.Parameter(b[r * k:(r + 1) * k].clone()) if b is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Distribution | Group, *, gather_output: bool = True) -> ColumnParallelLinear:
        """This rank's slice of an existing full ``nn.Linear`` (same on every rank)."""
        layer = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None,
                    gather_output=gather_output, dtype=linear.weight.dtype, device=linear.weight.device)
        k, r = layer.weight.shape[0], layer.group.rank
        with torch.no_grad():
            layer.weight.copy_(linear.weight[r * k:(r + 1) * k])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[r * k:(r + 1) * k])
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_model(x, self.group), self.weight, self.bias)
        return gather_from_model(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (local {self.weight.shape[0]}), "
                f"model group {self.group.ranks}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with the input features split over the model group (see the module doc).

    Args:
        in_features, out_features: sizes of the full layer; ``in_features`` divisible by the group size.
        group: a :class:`Distribution` (its model group is used) or a :class:`Group`.
        bias: learn a bias (replicated, added once after the all-reduce).
        input_is_parallel: the input is already this rank's slice of the features (e.g. the output of a
            :class:`ColumnParallelLinear` with ``gather_output=False``); else the full input is sliced here.
        seed: as for :class:`ColumnParallelLinear`.
    """

    def __init__(self, in_features: int, out_features: int, group: Distribution | Group, *, bias: bool = True,
                 input_is_parallel: bool = False, seed: int = 0, dtype: torch.dtype | None = None,
                 device: Any = None) -> None:
        super().__init__()
        self.group = _model_group(group)
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, input_is_parallel
        k = _split(in_features, self.group.size, "in_features")
        w, b = _full_init(out_features, in_features, bias, seed, dtype or torch.get_default_dtype(), device)
        r = self.group.rank
        self.weight = nn.Parameter(w[:, r * k:(r + 1) * k].clone())
        self.bias = nn.Parameter(b.clone()) if b is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Distribution | Group, *, input_is_parallel: bool = False) -> RowParallelLinear:
        """This rank's slice of an existing full ``nn.Linear`` (same on every rank)."""
        layer = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None,
                    input_is_parallel=input_is_parallel, dtype=linear.weight.dtype, device=linear.weight.device)
        k, r = layer.weight.shape[1], layer.group.rank
        with torch.no_grad():
            layer.weight.copy_(linear.weight[:, r * k:(r + 1) * k])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_model(x, self.group)
        y = reduce_from_model(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
                f"model group {self.group.ranks}, input_is_parallel={self.input_is_parallel}")
