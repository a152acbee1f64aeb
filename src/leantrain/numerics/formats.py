"""Binary floating-point formats emulated in float32 storage.

A :class:`FloatFormat` with ``exp_bits`` = e and ``man_bits`` = m describes sign-magnitude numbers
``(-1)^s * 2^(E - bias) * (1 + M / 2^m)`` (normal, exponent code ``1 <= E``) and
``(-1)^s * 2^(1 - bias) * (M / 2^m)`` (subnormal, ``E = 0``), with ``bias = 2^(e-1) - 1``.

Two conventions for the top exponent code ``E = 2^e - 1`` (``special``):

- ``"ieee"``: reserved for +-inf (``M = 0``) and NaN (``M != 0``), as in IEEE 754 (FP32, FP16, BF16,
  FP8 E5M2). The largest finite value is ``2^(2^e - 2 - bias) * (2 - 2^-m)``.
- ``"fn"`` ("finite, NaN"): no infinities; the top exponent code holds finite numbers except the single
  all-ones pattern, which is NaN (FP8 E4M3 of the OCP FP8 spec: max 448). The largest finite value is
  ``2^(2^e - 1 - bias) * (2 - 2^(1-m))`` (for ``m = 0`` the top code is NaN only, and the max is the
  ieee one).
- ``"finite"``: every code is a finite number, no inf and no NaN (the OCP MX element types FP6 E2M3/E3M2
  and FP4 E2M1: max 7.5 / 28 / 6). The largest value is ``2^(2^e - 1 - bias) * (2 - 2^-m)``. Overflow
  always saturates; a NaN input stays NaN in the float32 storage (it has no encoding in the format).

``"fn"`` and ``"finite"`` need ``exp_bits <= 7``: with 8 exponent bits their range would not fit float32.

The value set is a subset of float32 for every allowed (e, m), so quantized tensors are stored as float32.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

__all__ = ["FloatFormat", "FP32", "TF32", "BF16", "FP16", "FP8_E5M2", "FP8_E4M3", "PRESETS", "float32_bits"]

Special = Literal["ieee", "fn", "finite"]


def float32_bits(value: float) -> int:
    """The IEEE binary32 bit pattern of ``value`` (rounded to float32 first) as a signed 32-bit integer."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``exp_bits`` exponent bits, ``man_bits`` stored mantissa bits.

    Args:
        exp_bits: exponent width e, ``1 <= e <= 8`` (``e = 1`` only with ``special="fn"``).
        man_bits: stored mantissa (fraction) width m, ``0 <= m <= 23``.
        subnormals: if False, the format has no subnormals and :func:`~leantrain.numerics.quantize` flushes
            every input with ``|x| < min_normal`` to a zero of the same sign (flush-to-zero on input, the rule of
            Intel's hardware FP32->BF16 conversion).
        special: ``"ieee"`` (top exponent code = inf/NaN), ``"fn"`` (no inf, one NaN pattern) or ``"finite"``
            (no inf, no NaN; implies saturation), see the module doc.
        saturate: if True, overflow (and +-inf input) rounds to +-max_normal instead of inf ("ieee") / NaN ("fn").
        name: label used in reprs, reports and benchmark rows.
    """

    exp_bits: int
    man_bits: int
    subnormals: bool = True
    special: Special = "ieee"
    saturate: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        for arg in ("exp_bits", "man_bits"):
            v = getattr(self, arg)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{arg} must be an int, got {type(v).__name__}")
        for arg in ("subnormals", "saturate"):  # a string such as "no" would otherwise read as true
            v = getattr(self, arg)
            if type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_"):
                object.__setattr__(self, arg, bool(v))
            elif not isinstance(v, bool):
                raise TypeError(f"{arg} must be True or False, got {type(v).__name__} {v!r}")
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        if not 1 <= self.exp_bits <= 8:
            raise ValueError(f"exp_bits must be in 1..8 (float32 storage), got {self.exp_bits}")
        if not 0 <= self.man_bits <= 23:
            raise ValueError(f"man_bits must be in 0..23 (float32 storage), got {self.man_bits}")
        if self.special not in ("ieee", "fn", "finite"):
            raise ValueError(f"special must be 'ieee', 'fn' or 'finite', got {self.special!r}")
        if self.special != "ieee" and self.exp_bits == 8:
            raise ValueError(f"special={self.special!r} requires exp_bits <= 7: with exp_bits=8 its range exceeds float32")
        if self.exp_bits == 1 and self.special == "ieee":
            # Code E=0 is subnormal and E=1 is inf/NaN: such a format has no normal numbers at all.
            raise ValueError("exp_bits=1 needs special='fn' or 'finite' (with 'ieee' the format has no normal numbers)")
        if self.exp_bits == 1 and self.man_bits == 0 and self.special == "fn":
            raise ValueError("exp_bits=1 with special='fn' needs man_bits >= 1 (else the only normal code is NaN)")
        if not self.name:
            suffix = {"ieee": "", "fn": "fn", "finite": "fnn"}[self.special]
            object.__setattr__(self, "name", f"E{self.exp_bits}M{self.man_bits}{suffix}")

    @property
    def bias(self) -> int:
        """Exponent bias ``2^(e-1) - 1``."""
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal number, ``1 - bias``."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite number."""
        top = (1 << self.exp_bits) - 1
        if self.special == "finite" or (self.special == "fn" and self.man_bits > 0):
            return top - self.bias
        return top - 1 - self.bias

    @property
    def max_normal(self) -> float:
        """Largest finite value."""
        m = self.man_bits
        if self.special == "fn" and m > 0:
            return math.ldexp(2.0 - math.ldexp(1.0, 1 - m), self.emax)
        return math.ldexp(2.0 - math.ldexp(1.0, -m), self.emax)

    @property
    def saturating(self) -> bool:
        """Whether overflow rounds to +-max (``saturate=True`` or ``special="finite"``)."""
        return self.saturate or self.special == "finite"

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value ``2^emin``."""
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value: ``2^(emin - m)`` with subnormals, else ``min_normal``."""
        return math.ldexp(1.0, self.emin - self.man_bits) if self.subnormals else self.min_normal

    @property
    def epsilon(self) -> float:
        """Machine epsilon: the gap between 1 and the next larger value, ``2^-m``."""
        return math.ldexp(1.0, -self.man_bits)

    @property
    def bits(self) -> int:
        """Total width in bits, ``1 + e + m``."""
        return 1 + self.exp_bits + self.man_bits

    def __str__(self) -> str:
        return self.name


FP32 = FloatFormat(8, 23, name="FP32")
TF32 = FloatFormat(8, 10, name="TF32")
BF16 = FloatFormat(8, 7, name="BF16")
FP16 = FloatFormat(5, 10, name="FP16")
FP8_E5M2 = FloatFormat(5, 2, name="FP8_E5M2")
FP8_E4M3 = FloatFormat(4, 3, special="fn", name="FP8_E4M3")

PRESETS: dict[str, FloatFormat] = {f.name: f for f in (FP32, TF32, BF16, FP16, FP8_E5M2, FP8_E4M3)}
