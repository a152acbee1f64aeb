"""Quantizer: forward and backward quantization are independent; straight-through otherwise."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from leantrain.numerics import BF16, FP8_E5M2, FP16, Quantizer, quantize, quantize_ste


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(t.detach().float().numpy().astype(ml_dtypes.bfloat16).astype(np.float32))


def test_forward_and_backward_quantized_independently():
    x = torch.randn(64, 32, requires_grad=True)
    g = torch.randn(64, 32)
    y = Quantizer(forward=BF16, backward=FP16)(x)
    assert torch.equal(y, _bf16(x))
    y.backward(g)
    assert torch.equal(x.grad, torch.from_numpy(g.numpy().astype(np.float16).astype(np.float32)))


def test_none_means_pass_through_and_gradient_is_straight_through():
    x = torch.randn(100, requires_grad=True)
    g = torch.randn(100) * 1e-6  # small: FP8 E5M2 would change it visibly
    y = Quantizer(forward=FP8_E5M2)(x)
    assert torch.equal(y, quantize(x.detach(), FP8_E5M2))
    y.backward(g)
    assert torch.equal(x.grad, g)  # identity derivative, gradient untouched
    x.grad = None
    z = Quantizer(backward=FP8_E5M2)(x)
    assert torch.equal(z, x.detach())
    z.backward(g)
    assert torch.equal(x.grad, quantize(g, FP8_E5M2))


def test_inside_a_network_matches_manual_quantization():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    q = Quantizer(forward=BF16, backward=BF16)
    lin(q(x)).square().sum().backward()
    # manual: y = W bf16(x) + b; dL/d(qx) = W^T dL/dy, then bf16 on the way back
    xq = _bf16(x).requires_grad_(True)
    lin(xq).square().sum().backward()
    assert torch.equal(x.grad, _bf16(xq.grad))


def test_stochastic_is_reproducible_with_generators():
    x = torch.randn(1000, requires_grad=True)
    g = torch.randn(1000)

    def run(seed):
        q = Quantizer(forward=BF16, backward=BF16, rounding="stochastic", backward_rounding="stochastic",
                      generator=torch.Generator().manual_seed(seed), backward_generator=torch.Generator().manual_seed(seed + 1))
        x.grad = None
        y = q(x)
        y.backward(g)
        return y.detach().clone(), x.grad.clone()

    (y1, g1), (y2, g2), (y3, g3) = run(0), run(0), run(5)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert not torch.equal(y1, y3) and not torch.equal(g1, g3)


def test_dtypes_and_functional_form():
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    y = quantize_ste(x, BF16, BF16)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert x.grad.dtype == torch.float64 and torch.equal(x.grad, torch.ones(10, dtype=torch.float64))
    assert "BF16" in repr(Quantizer(forward=BF16))


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="forward"):
        Quantizer(forward="bf16")
    with pytest.raises(ValueError, match="backward_rounding"):
        Quantizer(backward=BF16, backward_rounding="odd")
    with pytest.raises(ValueError, match="rounding"):
        Quantizer(forward=BF16, rounding="odd")
    with pytest.raises(TypeError, match="backward_generator"):
        Quantizer(backward=BF16, backward_generator=1)
    with pytest.raises(TypeError, match="x"):
        quantize_ste(torch.arange(3), BF16)
