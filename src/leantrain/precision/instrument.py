"""Instrumentation of emulated training: what the rounding did to every quantized tensor.

A :class:`Recorder` attached by :func:`leantrain.precision.emulate` (``recorder=``) receives, for every
rounded GEMM input of every wrapped layer in training mode, the tensor before and after rounding,
and counts per (step, layer, tensor):

- ``numel``: elements; ``nonzero``: finite non-zero elements before rounding;
- ``underflow``: finite non-zero values that became zero (gradient underflow is how FP16 without
  loss scaling fails);
- ``subnormal``: values that landed in the format's subnormal range (precision partly lost);
- ``overflow``: finite values that became +-Inf or NaN;
- ``saturate``: finite values clamped to the largest representable magnitude (saturating formats,
  DFP's integer clamp);
- ``nonfinite``: values already Inf/NaN before rounding;
- ``exponent``: the shared DFP exponent chosen for the tensor (DFP only);

and for every integer GEMM ``acc_sums`` (accumulator registers used: outputs x chunks) and ``acc_overflows``
(registers whose exact sum left the accumulator's range: with wrap-around their result is wrong; with
``overflow="saturate"`` the exact per-addition overflow events are counted instead, see
:func:`leantrain.numerics.int_matmul`). Tensor names are ``x``, ``w``, ``dy`` (one rounding shared by
the GEMMs that consume it) or ``x@backward_weight``, ``w@backward_data``, ``dy@backward_weight`` when
a GEMM rounds its own copy with a different spec. Integer GEMMs are ``gemm:forward``,
``gemm:backward_data``, ``gemm:backward_weight``.

Counting costs a few elementwise passes, so recording is opt-in and can be thinned with ``every=k``
(record steps 0, k, 2k, ...). :meth:`Recorder.next_step` advances the step counter (done by
:class:`leantrain.precision.PrecisionHooks` after each optimizer step).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

__all__ = ["Recorder", "COUNTS"]

COUNTS = ("numel", "nonzero", "underflow", "subnormal", "overflow", "saturate", "nonfinite")
_ACC = ("acc_sums", "acc_overflows")


def _with_fractions(tot: dict[str, float]) -> dict[str, float]:
    """Summed counts plus their fractions: underflow over nonzero values, overflow/saturate/subnormal over all
    values, wrapped accumulator registers over registers."""
    row = dict(tot)
    if "numel" in tot:
        row["underflow_frac"] = tot["underflow"] / max(tot["nonzero"], 1)
        for k in ("overflow", "saturate", "subnormal"):
            row[f"{k}_frac"] = tot[k] / max(tot["numel"], 1)
    if "acc_sums" in tot:
        row["acc_overflow_frac"] = tot["acc_overflows"] / max(tot["acc_sums"], 1)
    return row


class Recorder:
    """Collects rounding statistics per step, layer and tensor (see the module docstring).

    ``every``: record only steps that are multiples of ``every``. ``keep_rows``: keep one row per
    (step, layer, tensor); totals over all recorded steps are always kept.
    """

    def __init__(self, every: int = 1, keep_rows: bool = True) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every = every
        self.keep_rows = keep_rows
        self.step = 0
        self._rows: list[dict[str, Any]] = []
        self._totals: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._exponents: dict[tuple[str, str], list[int]] = defaultdict(list)

    @property
    def active(self) -> bool:
        """Whether the current step is recorded."""
        return self.step % self.every == 0

    def next_step(self) -> None:
        """Advance to the next training step."""
        self.step += 1

    def _add(self, layer: str, tensor: str, counts: dict[str, int | float]) -> None:
        tot = self._totals[(layer, tensor)]
        for k, v in counts.items():
            if k != "exponent":
                tot[k] += v
        tot["observations"] += 1
        if self.keep_rows:
            self._rows.append({"step": self.step, "layer": layer, "tensor": tensor, **counts})

    @torch.no_grad()
    def observe(self, layer: str, tensor: str, original: torch.Tensor, rounded: torch.Tensor, *,
                max_value: float, min_normal: float | None, exponent: int | None = None) -> None:
        """Count what rounding ``original`` to ``rounded`` did (both float, same shape).

        ``max_value`` is the largest finite magnitude of the target (after any per-tensor scaling,
        expressed in ``original``'s units); ``min_normal`` its smallest normal magnitude
        (``None`` for fixed point, which has no subnormals).
        """
        finite = torch.isfinite(original)
        nonzero = finite & (original != 0)
        r_abs = rounded.abs()
        r_finite = torch.isfinite(rounded)
        stacked = [
            nonzero,
            nonzero & (rounded == 0),
            (r_abs > 0) & (r_abs < min_normal) if min_normal is not None else torch.zeros_like(finite),
            finite & ~r_finite,
            finite & r_finite & (original.abs() > max_value) & (r_abs == max_value),
            ~finite,
        ]
        sums = torch.stack([s.sum() for s in stacked]).tolist()
        counts: dict[str, int | float] = {"numel": original.numel()}
        counts.update(dict(zip(COUNTS[1:], (int(v) for v in sums))))
        if exponent is not None:
            counts["exponent"] = int(exponent)
            self._exponents[(layer, tensor)].append(int(exponent))
        self._add(layer, tensor, counts)

    def observe_accumulator(self, layer: str, gemm: str, sums: int, overflows: int) -> None:
        """Record an integer GEMM: ``sums`` accumulations of which ``overflows`` left the range."""
        self._add(layer, f"gemm:{gemm}", {"acc_sums": int(sums), "acc_overflows": int(overflows)})

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (step, layer, tensor) observation, in the order they happened."""
        return list(self._rows)

    def totals(self) -> list[dict[str, Any]]:
        """Per (layer, tensor): summed counts over recorded steps and the fractions
        ``underflow_frac = underflow / nonzero``, ``overflow_frac``, ``saturate_frac``,
        ``subnormal_frac`` (over ``numel``), ``acc_overflow_frac = acc_overflows / acc_sums``, and the
        range of DFP exponents seen."""
        out = []
        for (layer, tensor), tot in self._totals.items():
            row: dict[str, Any] = {"layer": layer, "tensor": tensor, **_with_fractions(tot)}
            ex = self._exponents.get((layer, tensor))
            if ex:
                row["exponent_min"], row["exponent_max"] = min(ex), max(ex)
            out.append(row)
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """Totals over all layers, per tensor role (``x``, ``w``, ``dy``, ``gemm:...``) with fractions."""
        agg: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for (_, tensor), tot in self._totals.items():
            role = tensor.split("@")[0]
            for k, v in tot.items():
                agg[role][k] += v
        out: dict[str, dict[str, float]] = {}
        for role, tot in agg.items():
            out[role] = _with_fractions(tot)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue recording after a resume (rows included when kept)."""
        return {"every": self.every, "keep_rows": self.keep_rows, "step": self.step, "rows": list(self._rows),
                "totals": {f"{k[0]}\t{k[1]}": dict(v) for k, v in self._totals.items()},
                "exponents": {f"{k[0]}\t{k[1]}": list(v) for k, v in self._exponents.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.every, self.keep_rows, self.step = state["every"], state["keep_rows"], state["step"]
        self._rows = list(state["rows"])
        self._totals = defaultdict(lambda: defaultdict(float))
        for key, v in state["totals"].items():
            self._totals[tuple(key.split("\t", 1))].update(v)  # type: ignore[index]
        self._exponents = defaultdict(list, {tuple(k.split("\t", 1)): list(v) for k, v in state["exponents"].items()})
