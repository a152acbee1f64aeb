"""Gradient compression for the wire: fixed-size byte payloads, one rounding routine (:mod:`leantrain.numerics`).

A :class:`Compression` turns rows of float32 values (one row per message: a bucket chunk) into rows of bytes
of a fixed length and back. Payload layout per row:

============  =========================================  =====================================================
name          payload (bytes for n values)               decode
============  =========================================  =====================================================
``none``      ``4n``: the float32 bits                   exact
``fp16``      ``2n``: IEEE binary16 bits                 ``quantize(x, FP16, "nearest")``: overflow -> +-inf
``bf16``      ``2n``: bfloat16 bits                      ``quantize(x, BF16, "nearest")``
``int8``      ``4 + n``: scale ``s = 2^e`` (float32),    ``s * q`` with ``q = round_to_integer(x / s,
              then ``q`` as int8                         "stochastic")`` in [-127, 127], ``e`` the least
                                                         integer with ``max|x| <= 127 * 2^e``
``sign``      ``4 + ceil(n/8)``: scale ``s = mean|x|``   ``s * (+1 if x >= 0 else -1)``, 8 signs per byte
              (float32), then the sign bits              (bit ``k`` of byte ``j`` is element ``8j + k``)
============  =========================================  =====================================================

The int8 scale is a power of two so that ``x / s`` is exact and the stochastic rounding is exactly
unbiased: ``E[decode(encode(x))] = x``, with ``|error| < s <= 2 max|x| / 127`` per element. ``sign`` is biased
(that is what error feedback repairs, see :class:`leantrain.distributed.DataParallelModule`). Non-finite input
propagates: an inf or NaN in a row makes the decoded row non-finite (int8: NaN), so an overflow check after the
exchange (loss scaling) still sees it. An all-zero row decodes to zeros.
"""

from __future__ import annotations

import torch

from leantrain.numerics import BF16, FP16, FloatFormat, quantize, round_to_integer

__all__ = ["Compression", "COMPRESSIONS", "get_compression"]

COMPRESSIONS = ("none", "fp16", "bf16", "int8", "sign")


def _scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    return scale.to(torch.float32).reshape(-1, 1).contiguous().view(torch.uint8)  # (R, 4)


def _scale_of(payload: torch.Tensor) -> torch.Tensor:
    return payload[:, :4].reshape(-1).view(torch.float32).view(-1, 1)  # (R, 1); reshape copies unless one row


class Compression:
    """Encode ``(R, n)`` float32 rows into ``(R, payload_bytes(n))`` uint8 rows and back.

    ``bits`` is the nominal number of bits per value on the wire (before the per-row scale).
    """

    name = "none"
    bits = 32.0

    def payload_bytes(self, n: int) -> int:
        return 4 * n

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.to(torch.float32).contiguous().view(torch.uint8)

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        return payload.contiguous().view(torch.float32)

    def roundtrip(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``decode(encode(x))``: what the receiver will see, for error feedback."""
        return self.decode(self.encode(x, generator), x.shape[-1])

    def __repr__(self) -> str:
        return f"Compression({self.name!r})"


class _FloatCast(Compression):
    def __init__(self, name: str, fmt: FloatFormat, dtype: torch.dtype) -> None:
        self.name, self.fmt, self.dtype, self.bits = name, fmt, dtype, 16.0

    def payload_bytes(self, n: int) -> int:
        return 2 * n

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # quantize() puts every value on the format's grid; the cast to the 16-bit dtype is then exact.
        q = quantize(x, self.fmt, "nearest").to(self.dtype)
        return q.contiguous().view(torch.uint8)

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        return payload.contiguous().view(self.dtype).to(torch.float32)

    def roundtrip(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return quantize(x, self.fmt, "nearest")


class _Int8(Compression):
    name, bits = "int8", 8.0

    def payload_bytes(self, n: int) -> int:
        return 4 + n

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per row ``2^e`` with ``e`` the least integer such that ``max|x| <= 127 * 2^e`` (1 for a zero row)."""
        amax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
        _, e = torch.frexp(amax / 127.0)  # amax/127 = f * 2^e with 0.5 <= f < 1, so amax/127 < 2^e
        s = torch.ldexp(torch.ones_like(amax), e)
        s = torch.where(amax <= 127.0 * s / 2, s / 2, s)  # amax/127 rounded: step down if half still fits
        s = torch.where(amax > 0, s, torch.ones_like(s))
        return torch.where(torch.isfinite(amax), s, torch.full_like(s, float("nan")))

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.to(torch.float32)
        s = self.scale(x)
        q = round_to_integer(x / s, "stochastic", generator=generator).clamp_(-127, 127)
        q = torch.nan_to_num(q, nan=0.0).to(torch.int8)  # the NaN scale carries non-finiteness
        return torch.cat([_scale_bytes(s), q.view(torch.uint8)], dim=1)

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        q = payload[:, 4:4 + n].contiguous().view(torch.int8).to(torch.float32)
        return q * _scale_of(payload)


_BIT_WEIGHTS = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)


class _Sign(Compression):
    name, bits = "sign", 1.0

    def payload_bytes(self, n: int) -> int:
        return 4 + (n + 7) // 8

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.to(torch.float32)
        rows, n = x.shape
        s = x.abs().mean(dim=-1, keepdim=True)
        bits = torch.zeros(rows, 8 * ((n + 7) // 8), dtype=torch.uint8, device=x.device)
        bits[:, :n] = (x >= 0).to(torch.uint8)
        packed = (bits.view(rows, -1, 8) * _BIT_WEIGHTS.to(x.device)).sum(dim=-1, dtype=torch.uint8)
        return torch.cat([_scale_bytes(s), packed], dim=1)

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        packed = payload[:, 4:]
        bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)).ne(0).reshape(packed.shape[0], -1)[:, :n]
        return (bits.to(torch.float32) * 2 - 1) * _scale_of(payload)


_REGISTRY: dict[str, Compression] = {
    "none": Compression(),
    "fp16": _FloatCast("fp16", FP16, torch.float16),
    "bf16": _FloatCast("bf16", BF16, torch.bfloat16),
    "int8": _Int8(),
    "sign": _Sign(),
}


def get_compression(name: str | Compression | None) -> Compression:
    """The compression called ``name`` (one of :data:`COMPRESSIONS`; None means ``"none"``)."""
    if isinstance(name, Compression):
        return name
    if name is None:
        name = "none"
    if name not in _REGISTRY:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {name!r}")
    return _REGISTRY[name]
