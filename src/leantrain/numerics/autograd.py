"""Quantization points for autograd: quantize a tensor in the forward pass and its gradient in the backward pass.

``y = Q_f(x)`` in the forward pass; in the backward pass ``dL/dx = Q_b(dL/dy)``: the derivative of ``Q_f`` is
taken as the identity (straight-through estimator), and ``Q_b`` quantizes the incoming gradient. ``Q_f`` and
``Q_b`` are independent: each has its own format (``None`` = pass through unchanged), rounding mode and
random generator. This is what the precision layer inserts around GEMM inputs: e.g.
``Quantizer(forward=BF16, backward=BF16)`` on activations gives BF16 activations and BF16 error gradients.

Output dtype: float32 (float64 input stays float64; the format's values are exact in both). The gradient
is returned in the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from leantrain.numerics.formats import FloatFormat
from leantrain.numerics.rounding import check_rounding, quantize

__all__ = ["Quantizer", "quantize_ste"]


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _QuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fwd, fwd_rounding, fwd_gen, bwd, bwd_rounding, bwd_gen):  # type: ignore[override]
        ctx.bwd, ctx.bwd_rounding, ctx.bwd_gen, ctx.in_dtype = bwd, bwd_rounding, bwd_gen, x.dtype
        if fwd is None:
            return x.to(_out_dtype(x.dtype), copy=True)
        return quantize(x, fwd, fwd_rounding, generator=fwd_gen).to(_out_dtype(x.dtype))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.bwd is not None:
            grad = quantize(grad, ctx.bwd, ctx.bwd_rounding, generator=ctx.bwd_gen)
        return grad.to(ctx.in_dtype), None, None, None, None, None, None


def _check_args(forward, backward, rounding, backward_rounding, generator, backward_generator) -> None:
    for arg, fmt in (("forward", forward), ("backward", backward)):
        if fmt is not None and not isinstance(fmt, FloatFormat):
            raise TypeError(f"{arg} must be a FloatFormat or None, got {type(fmt).__name__}")
    check_rounding(rounding, "rounding")
    check_rounding(backward_rounding, "backward_rounding")
    for arg, gen in (("generator", generator), ("backward_generator", backward_generator)):
        if gen is not None and not isinstance(gen, torch.Generator):
            raise TypeError(f"{arg} must be a torch.Generator or None, got {type(gen).__name__}")


def quantize_ste(
    x: torch.Tensor,
    forward: FloatFormat | None = None,
    backward: FloatFormat | None = None,
    *,
    rounding: str = "nearest",
    backward_rounding: str = "nearest",
    generator: torch.Generator | None = None,
    backward_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Functional form of :class:`Quantizer`: ``Q_forward(x)`` now, ``Q_backward(grad)`` in the backward pass."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    _check_args(forward, backward, rounding, backward_rounding, generator, backward_generator)
    return _QuantizeSTE.apply(x, forward, rounding, generator, backward, backward_rounding, backward_generator)


class Quantizer(nn.Module):
    """A named quantization point: ``Q_forward`` on the tensor, ``Q_backward`` on its gradient, straight-through.

    Args:
        forward: format of the forward value (None: unchanged).
        backward: format of the gradient (None: unchanged).
        rounding: forward rounding mode (``"nearest"``, ``"stochastic"``, ``"truncate"``).
        backward_rounding: gradient rounding mode.
        generator / backward_generator: random sources for stochastic rounding (reproducibility).

    Example::

        q = Quantizer(forward=BF16, backward=BF16, backward_rounding="stochastic")
        y = linear(q(x))
    """

    def __init__(
        self,
        forward: FloatFormat | None = None,
        backward: FloatFormat | None = None,
        *,
        rounding: str = "nearest",
        backward_rounding: str = "nearest",
        generator: torch.Generator | None = None,
        backward_generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_args(forward, backward, rounding, backward_rounding, generator, backward_generator)
        self.fmt_forward = forward
        self.fmt_backward = backward
        self.rounding = rounding
        self.backward_rounding = backward_rounding
        self.generator = generator
        self.backward_generator = backward_generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return quantize_ste(x, self.fmt_forward, self.fmt_backward, rounding=self.rounding,
                            backward_rounding=self.backward_rounding, generator=self.generator,
                            backward_generator=self.backward_generator)

    def extra_repr(self) -> str:
        return (f"forward={self.fmt_forward}, backward={self.fmt_backward}, rounding={self.rounding}, "
                f"backward_rounding={self.backward_rounding}")
