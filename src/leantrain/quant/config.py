"""What to quantize and how: :class:`QuantConfig` (weights, activations, layers kept FP32).

One config object describes a conversion, in the spirit of torchao's ``quantize_(model, config)``
and of :class:`leantrain.precision.Policy`::

    QuantConfig(weights=WeightQuant(bits=2, grouping="fgq:4", method="optimal"),
                activations=ActQuant(bits=8, method="minmax", batches=8),
                keep=("first", "last"))

- :class:`WeightQuant`: ``bits`` 2 (ternary ``{-a, 0, a}``) or 3..8 (symmetric integers),
  ``grouping`` (which weights share a scale: ``"fgq:N"``, ``"cluster:N"``, ``"channel"``,
  ``"tensor"``; :mod:`leantrain.quant.grouping`), ``method`` (ternary support: the exact
  ``"optimal"`` solver or the ``"threshold"`` 0.7*mean rule; :mod:`leantrain.quant.weights`),
  ``scale_dtype`` (``"float32"`` or ``"float16"``).
- :class:`ActQuant`: ``bits`` of the input activations of every converted layer, the calibration
  ``method`` (``"minmax"``, ``"percentile"``, ``"mse"``), ``percentile``, ``pow2`` (dynamic fixed
  point scales) and how many calibration ``batches`` are used (:mod:`leantrain.quant.activations`).
  ``activations=None`` leaves activations FP32 (weight-only quantization).
- ``keep``: selectors of layers left FP32 (:mod:`leantrain.quant.selection`): ``"first"``,
  ``"last"``, ``"role:embedding"``, ``"role:attention"``, ``"role:mlp"``, ``"role:conv"``,
  ``"role:head"``, exact module names, and ``fnmatch`` patterns (``"*.attention.*"``).
- ``bn_recalibration``: re-estimate batch-norm statistics of the converted network on the
  calibration batches (no gradient step).

``to_dict()`` / ``from_dict()`` give the JSON form stored in packed files and read by
``leantrain quantize --config FILE``. :meth:`QuantConfig.from_kwargs` maps the keyword form of
:func:`~leantrain.quant.quantize_model` (``weights="ternary"``, ``grouping="fgq:4"``, ``act_bits=8``,
...) onto a config, so both spellings run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from leantrain.quant.activations import ACT_METHODS
from leantrain.quant.grouping import Grouping
from leantrain.quant.weights import TERNARY_METHODS, WEIGHT_BITS

__all__ = ["QuantConfig", "WeightQuant", "ActQuant", "WEIGHT_KINDS", "weight_bits"]

WEIGHT_KINDS: dict[str, int] = {"ternary": 2, "int3": 3, "int4": 4, "int5": 5, "int6": 6, "int7": 7, "int8": 8}
_SCALE_DTYPES = ("float32", "float16")


def weight_bits(weights: str) -> int:
    """Bits per weight of a weight kind name (``"ternary"`` = 2, ``"int4"`` = 4, ...)."""
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_KINDS)}, got {weights!r}")
    return WEIGHT_KINDS[weights]


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class WeightQuant:
    """Weight format: ``bits`` (2 = ternary), ``grouping``, ternary ``method``, ``scale_dtype``."""

    bits: int = 2
    grouping: str = "fgq:4"
    method: str = "optimal"
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if _int("weight bits", self.bits) not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be one of {WEIGHT_BITS} (2 = ternary), got {self.bits}")
        object.__setattr__(self, "grouping", str(Grouping.parse(self.grouping)))
        if self.method not in TERNARY_METHODS:
            raise ValueError(f"weight method must be one of {TERNARY_METHODS}, got {self.method!r}")
        sd = str(self.scale_dtype).removeprefix("torch.")
        if sd not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, got {self.scale_dtype!r}")
        object.__setattr__(self, "scale_dtype", sd)

    @property
    def kind(self) -> str:
        """``"ternary"`` or ``"int<bits>"``."""
        return "ternary" if self.bits == 2 else f"int{self.bits}"


@dataclass(frozen=True)
class ActQuant:
    """Input-activation format: ``bits`` and the calibration rule (``method``, ``percentile``, ``pow2``, ``batches``)."""

    bits: int = 8
    method: str = "minmax"
    percentile: float = 99.99
    pow2: bool = False
    batches: int = 8

    def __post_init__(self) -> None:
        if not 2 <= _int("activation bits", self.bits) <= 16:
            raise ValueError(f"activation bits must be in 2..16, got {self.bits}")
        if self.method not in ACT_METHODS:
            raise ValueError(f"activation method must be one of {ACT_METHODS}, got {self.method!r}")
        if not 0 < float(self.percentile) <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if _int("calibration batches", self.batches) < 1:
            raise ValueError(f"calibration batches must be >= 1, got {self.batches}")
        object.__setattr__(self, "percentile", float(self.percentile))
        object.__setattr__(self, "pow2", bool(self.pow2))


@dataclass(frozen=True)
class QuantConfig:
    """A whole conversion: weights, activations (None = FP32), layers kept FP32, batch-norm handling."""

    weights: WeightQuant = field(default_factory=WeightQuant)
    activations: ActQuant | None = field(default_factory=ActQuant)
    keep: tuple[str, ...] = ("first", "last")
    bn_recalibration: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.weights, WeightQuant):
            raise TypeError(f"weights must be a WeightQuant, got {type(self.weights).__name__}")
        if self.activations is not None and not isinstance(self.activations, ActQuant):
            raise TypeError(f"activations must be an ActQuant or None, got {type(self.activations).__name__}")
        keep = (self.keep,) if isinstance(self.keep, str) else tuple(self.keep or ())
        if not all(isinstance(k, str) and k for k in keep):
            raise TypeError(f"keep must be a sequence of non-empty strings (selectors), got {self.keep!r}")
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "bn_recalibration", bool(self.bn_recalibration))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able nested form (inverse of :meth:`from_dict`)."""
        return {"weights": {f.name: getattr(self.weights, f.name) for f in fields(WeightQuant)},
                "activations": None if self.activations is None else
                {f.name: getattr(self.activations, f.name) for f in fields(ActQuant)},
                "keep": list(self.keep), "bn_recalibration": self.bn_recalibration}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """A config from :meth:`to_dict`'s form; unknown keys raise ValueError naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"a quantization config must be a mapping, got {type(d).__name__}")

        def check(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
            if not isinstance(obj, dict):
                raise TypeError(f"{where} must be a mapping, got {type(obj).__name__}")
            extra = set(obj) - allowed
            if extra:
                raise ValueError(f"unknown {where} keys {sorted(extra)}; allowed: {sorted(allowed)}")
            return obj

        check(d, {"weights", "activations", "keep", "bn_recalibration"}, "config")
        w = WeightQuant(**check(d.get("weights", {}), {f.name for f in fields(WeightQuant)}, "weights"))
        a = d.get("activations", {})
        act = None if a is None else ActQuant(**check(a, {f.name for f in fields(ActQuant)}, "activations"))
        return cls(w, act, tuple(d.get("keep", ("first", "last"))), bool(d.get("bn_recalibration", False)))

    @classmethod
    def from_kwargs(cls, *, weights: str = "ternary", grouping: str | Grouping = "fgq:4", act_bits: int | None = 8,
                    keep: Any = ("first", "last"), act_method: str = "minmax", percentile: float = 99.99,
                    act_pow2: bool = False, method: str = "optimal", scale_dtype: Any = "float32",
                    calibration_batches: int = 8, bn_recalibration: bool = False) -> QuantConfig:
        """The config of :func:`~leantrain.quant.quantize_model`'s keyword form (same names, same defaults)."""
        act = None if not act_bits else ActQuant(act_bits, act_method, percentile, act_pow2, calibration_batches)
        if act is None and (isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int)
                            or calibration_batches < 1):
            raise ValueError(f"calibration batches must be >= 1, got {calibration_batches!r}")
        return cls(WeightQuant(weight_bits(weights), str(grouping), method, str(scale_dtype)), act,
                   keep if keep is not None else (), bn_recalibration)

    @property
    def calibration_batches(self) -> int:
        """Calibration batches used (the activation setting; 8 when activations stay FP32)."""
        return self.activations.batches if self.activations is not None else 8
