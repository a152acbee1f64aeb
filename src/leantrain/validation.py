"""Checks of user-supplied values: one idiom for the CLI and the public functions.

Each ``check_*`` function takes the argument's *name as the user wrote it* (``"lr"`` for a
function keyword, ``"--lr"`` for a CLI option) and its value, returns the value (converted to
``int``/``float``/``bool`` where that is the point of the check) and otherwise raises:

- :class:`UsageError` (a ``ValueError``) when the value has the right kind but is not allowed
  (``nan``, out of range, not one of the choices); the CLI reports it in one line and exits 2;
- ``TypeError`` when the value has the wrong kind (a string where a number is needed, ``"no"``
  where a bool is needed); the CLI treats it like a usage error.

Every message names the argument, says what is allowed and shows what was given, e.g.
``--weight-decay must be a finite number >= 0, got nan``.

:func:`int_arg` and :func:`float_arg` wrap the same checks as ``argparse`` ``type=`` callables, so
that an option is refused while parsing (exit 2, argparse's ``argument --x:`` prefix).

Where these checks may be used. The architecture says ``numerics`` imports nothing of ours, so
:mod:`leantrain.numerics` keeps raising plain ``ValueError``/``TypeError`` with the same wording
rather than importing this module; every other layer (precision, quant, optim, landscape, data,
models, experiments, commands) uses these. This module imports only the standard library, so it
can never create an import cycle.
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from leantrain.seeds import SEED_STRIDE

__all__ = ["UsageError", "check_finite", "check_positive", "check_range", "check_choice", "check_int",
           "check_bool", "check_seed", "int_arg", "float_arg", "SEED_MAX"]

T = TypeVar("T")

#: Largest accepted random seed: ``torch.manual_seed`` takes seeds in ``[0, 2**64)``, and the streams
#: derived from a seed (:func:`leantrain.seeds.derive_seed`, ``seed * SEED_STRIDE + index``) must stay below
#: ``2**63`` for every index below ``SEED_STRIDE``.
SEED_MAX = 2**63 // (SEED_STRIDE + 1)


class UsageError(ValueError):
    """A value the user supplied is not allowed; the message names it and what is allowed.

    A subclass of ``ValueError`` so that callers catching ``ValueError`` keep working; the CLI
    maps it (and any ``ValueError``/``TypeError``) to exit status 2.
    """


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def check_finite(name: str, value: Any) -> float:
    """``value`` as a float; refuses ``nan``, ``inf``, ``-inf`` and non-numbers."""
    v = _number(name, value)
    if not math.isfinite(v):
        raise UsageError(f"{name} must be a finite number, got {v}")
    return v


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a finite float ``> 0`` (``>= 0`` with ``allow_zero``)."""
    v = _number(name, value)
    ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise UsageError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v}")
    return v


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the interval from ``low`` to ``high`` (closed unless ``*_open``).

    ``None`` for a bound means unbounded on that side; ``nan`` and infinities are always refused.
    """
    v = _number(name, value)
    bad = not math.isfinite(v)
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        raise UsageError(f"{name} must be a finite number in {_interval(low, high, low_open, high_open)}, got {v}")
    return v


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]``; refuses bools, floats with a fraction, ``nan``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    if isinstance(value, numbers.Integral):
        v = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        v = int(value)
    else:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "" if low is None else f">= {low}"
        hi = "" if high is None else f"<= {high}"
        raise UsageError(f"{name} must be an integer {' and '.join(s for s in (lo, hi) if s)}, got {v}")
    return v


def check_choice(name: str, value: T, allowed: Iterable[T]) -> T:
    """``value`` if it is one of ``allowed``; the message lists them."""
    options = list(allowed)
    if value not in options:
        raise UsageError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True``/``False`` (or numpy's bool); a string such as ``"no"`` is a TypeError."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_seed(name: str, value: Any) -> int:
    """A random seed: an integer in ``[0, SEED_MAX]`` (see :data:`SEED_MAX`)."""
    return check_int(name, value, 0, SEED_MAX)


def _arg_type(check: Callable[[str, Any], T], parse: Callable[[str], Any], what: str) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return check("value", value)
        except (UsageError, TypeError) as exc:
            # argparse prefixes "argument --name:"; keep only what is allowed and what was given.
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value ")) from None

    convert.__name__ = what  # argparse shows the type's name in some messages
    return convert


def int_arg(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An ``argparse`` ``type=`` accepting integers in ``[low, high]`` (see :func:`check_int`)."""
    return _arg_type(lambda n, v: check_int(n, v, low, high), int, "an integer")


def float_arg(low: float | None = None, high: float | None = None, *, low_open: bool = False,
              high_open: bool = False) -> Callable[[str], float]:
    """An ``argparse`` ``type=`` accepting finite floats in a range (see :func:`check_range`)."""
    return _arg_type(lambda n, v: check_range(n, v, low, high, low_open=low_open, high_open=high_open),
                     float, "a number")
