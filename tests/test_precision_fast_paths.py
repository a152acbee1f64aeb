"""The speed paths of GEMM emulation compute exactly what the plain path computes.

- the native BF16/FP16 cast taken by ``LayerNumerics.round`` agrees with ml_dtypes / numpy and with
  :func:`leantrain.numerics.quantize` bit for bit (NaN as NaN), also into reused buffers;
- :class:`OperandBuffers` never hands out a buffer that a graph or a caller still holds;
- :class:`RoundedInputs` (one rounding per tensor per forward pass) sees in-place changes;
- training with both (several steps, a layer applied twice, a conv block whose input feeds a shortcut, an LSTM,
  two forward passes before one backward, a retained graph) is bit-identical to training with both off.
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leantrain.numerics import BF16, FP16, quantize
from leantrain.precision import LayerNumerics, emulate, emulating, emulation_of, get_policy
from leantrain.precision.operands import OperandBuffers


def _specials() -> torch.Tensor:
    bits = [0, 1, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, 0x7FC00000, 0x7F800001, 0x3F808000, 0x3F818000,
            0x3F807FFF, 0x477FEFFF, 0x477FF000, 0x33800000, 0x33000001, 0x387FC000]
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(-(2**31), 2**31, (4096,), generator=gen, dtype=torch.int64)
    b = torch.cat([torch.tensor(bits, dtype=torch.int64), rand]).to(torch.int32)
    b = torch.cat([b, b | torch.tensor(-(2**31), dtype=torch.int32)])
    return b.view(torch.float32).reshape(2, -1, 8)


@pytest.mark.parametrize("name, fmt, np_dtype", [("bf16", BF16, ml_dtypes.bfloat16), ("fp16", FP16, np.float16)])
def test_native_cast_path_is_the_rounding(name: str, fmt, np_dtype) -> None:
    x = _specials()
    spec = get_policy(name).forward.a
    L = LayerNumerics("t", get_policy(name), buffers=OperandBuffers())
    ref = quantize(x, fmt)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and overflow to inf are part of the probe
        oracle = torch.from_numpy(x.numpy().astype(np_dtype).astype(np.float32))
    for xx in (x, x.transpose(0, 2)):  # contiguous and a transposed view
        for scratch in (False, True):
            q = L.round(xx, spec, "x", scratch=scratch)
            assert q.is_contiguous() and q.dtype == torch.float32
            r = ref if xx is x else quantize(xx, fmt)
            o = oracle if xx is x else oracle.transpose(0, 2)
            nan = torch.isnan(r)
            assert torch.equal(torch.isnan(q), nan) and torch.equal(torch.isnan(o), nan)
            assert torch.equal(q[~nan].view(torch.int32), r[~nan].view(torch.int32))
            assert torch.equal(q[~nan].view(torch.int32), o.contiguous()[~nan].view(torch.int32))


def test_operand_buffers_are_reused_only_when_nothing_holds_them() -> None:
    pool = OperandBuffers(per_shape=2)
    shape = torch.Size([3, 5])
    a = pool.take(shape)
    b = pool.take(shape)
    assert a is not None and b is not None and a.data_ptr() != b.data_ptr()
    assert pool.take(shape) is None  # both held and the pool is full for this shape: the caller allocates
    ptr = a.data_ptr()
    del a
    c = pool.take(shape)
    assert c is not None and c.data_ptr() == ptr and c.shape == shape and c.is_contiguous()
    assert pool.take(torch.Size([5, 3])) is not None  # another shape, another buffer


def test_operand_buffer_saved_by_a_graph_is_not_rewritten() -> None:
    pool = OperandBuffers()
    L = LayerNumerics("t", get_policy("bf16"), buffers=pool)
    spec = L.policy.forward.a
    x = torch.randn(4, 6)

    class Save(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            q = L.round(t, spec, "x", scratch=True)
            ctx.save_for_backward(q)
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            (q,) = ctx.saved_tensors
            return g * q

    t = x.clone().requires_grad_()
    y = Save.apply(t)
    for _ in range(3):  # other roundings of the same shape while the graph holds the first one
        L.round(torch.randn(4, 6) * 100, spec, "x", scratch=True)
    y.sum().backward()
    assert torch.equal(t.grad, quantize(x, BF16))


def test_rounded_inputs_see_in_place_changes() -> None:
    w = nn.Parameter(torch.randn(3, 5))
    x = torch.randn(2, 5) * 3
    before = x.clone()
    with torch.no_grad(), emulating("bf16"):
        y1 = F.linear(x, w)
        x.mul_(1.01)  # the same tensor object with new values: rounded again, not taken from the first GEMM
        y2 = F.linear(x, w)
    wq = quantize(w.detach(), BF16)
    assert torch.equal(y1, F.linear(quantize(before, BF16), wq))
    assert torch.equal(y2, F.linear(quantize(x, BF16), wq))
    assert not torch.equal(y1, y2)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.short = nn.Conv2d(4, 6, 1, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.shared = nn.Linear(6, 6)
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)) + self.short(x))      # x read by two convolutions
        h = h.mean(-1).transpose(1, 2)                               # (B, T, 6)
        h = self.shared(torch.tanh(self.shared(h)))                  # one layer applied twice
        y, _ = self.rnn(h)
        return self.head(y[:, -1])


def _train(model: nn.Module, fast: bool, steps: int = 3) -> list[torch.Tensor]:
    emulate(model, "bf16")
    emu = emulation_of(model)
    if not fast:  # the plain path: every GEMM rounds its own operands into new tensors
        for L in emu.layers.values():
            L.buffers = L.inputs = None
        emu._site = _plain_site(emu._site)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    record = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        x1, x2 = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        o1 = model(x1)
        o2 = model(x2)                       # a second forward pass before the backward pass
        loss = (o1 * o2).sum()
        loss.backward(retain_graph=True)
        loss.backward()                      # the retained graph read again
        record += [o1.detach(), o2.detach()] + [p.grad.clone() for p in model.parameters()]
        opt.step()
    return record


def _plain_site(site):
    def plain(name, kind):
        L = site(name, kind)
        L.buffers = L.inputs = None
        return L
    return plain


def test_training_with_buffers_and_shared_roundings_is_bit_identical() -> None:
    torch.manual_seed(0)
    model = _Block()
    fast = _train(copy.deepcopy(model), True)
    plain = _train(copy.deepcopy(model), False)
    assert len(fast) == len(plain)
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)
