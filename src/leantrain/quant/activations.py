"""Per-tensor activation quantization with calibration.

An :class:`ActQuantizer` maps a float tensor ``x`` to integer codes
``q = clamp(round(x / s), qmin, qmax)`` (round half to even) and back to ``s * q``, with one scale
``s`` per tensor fixed by calibration (static quantization, zero point 0 so that a zero input, and
the zero padding of a convolution, is code 0):

- unsigned (all calibration values >= 0, e.g. after ReLU): ``[qmin, qmax] = [0, 2^b - 1]``;
- signed: ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (symmetric, the most negative code unused);
- ``s = clip / qmax``, where the clip value comes from the calibration batches by ``method``:
  ``"minmax"`` the largest magnitude seen (nothing saturates on calibration data; the dynamic
  fixed-point rule of arXiv:1701.08978), ``"percentile"`` the ``percentile``-th percentile of the
  magnitudes, ``"mse"`` the clip in ``{clip_max * j / 128, j = 8..128}`` minimising the mean squared
  quantization error on the calibration sample;
- ``pow2=True`` rounds ``s`` up to a power of two, ``s = 2^E`` with E from
  :func:`leantrain.numerics.dfp_exponent` (the smallest E with ``clip <= qmax * 2^E``): the codes are
  then dynamic fixed point numbers ``q * 2^E`` with one exponent per tensor, fixed by calibration.

Values beyond the clip saturate to ``qmin``/``qmax``. NaN has no code: :meth:`codes` raises, the
fake-quantized forward propagates it. In
training mode the forward pass is a clipped straight-through estimator: the gradient passes
unchanged where ``qmin*s <= x <= qmax*s`` and is zero where the value saturated.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from leantrain.numerics import dfp_exponent, round_to_integer

__all__ = ["ActQuantizer", "ACT_METHODS"]

ACT_METHODS: tuple[str, ...] = ("minmax", "percentile", "mse")
_SAMPLE_PER_BATCH = 1 << 15
_SAMPLE_CAP = 1 << 18



class ActQuantizer(nn.Module):
    """Calibrated per-tensor uniform quantizer of ``bits`` bits (module docstring).

    Use: ``start_calibration()``, run a few batches through ``forward`` (values pass through
    unchanged and are observed), ``finish_calibration()``; afterwards ``forward`` fake-quantizes
    and :meth:`codes` gives the integer codes.
    """

    def __init__(self, bits: int = 8, *, method: str = "minmax", percentile: float = 99.99, pow2: bool = False) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"activation bits must be an integer in 2..16, got {bits!r}")
        if method not in ACT_METHODS:
            raise ValueError(f"calibration method must be one of {ACT_METHODS}, got {method!r}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.bits, self.method, self.percentile, self.pow2 = bits, method, float(percentile), bool(pow2)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("calibrated", torch.tensor(False))
        self.observing = False
        self._samples: list[torch.Tensor] = []
        self._amin = math.inf
        self._amax = -math.inf
        self._seen = 0

    # -- range ------------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if bool(self.signed) else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if bool(self.signed) else 2**self.bits - 1

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, method={self.method}, pow2={self.pow2}, scale={float(self.scale):.4g}, "
                f"signed={bool(self.signed)}")

    # -- calibration ------------------------------------------------------------------------------
    def start_calibration(self) -> None:
        """Forget earlier observations and observe the next forward passes."""
        self.observing = True
        self._samples, self._amin, self._amax, self._seen = [], math.inf, -math.inf, 0

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        if torch.isnan(x).any():
            raise ValueError("activation calibration saw NaN values")
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        self._amin = min(self._amin, float(flat.min()))
        self._amax = max(self._amax, float(flat.max()))
        self._seen += flat.numel()
        if sum(s.numel() for s in self._samples) < _SAMPLE_CAP:
            if flat.numel() > _SAMPLE_PER_BATCH:
                # A fixed-stride subsample: deterministic, and spread over the whole tensor.
                step = flat.numel() // _SAMPLE_PER_BATCH
                flat = flat[::step][:_SAMPLE_PER_BATCH]
            self._samples.append(flat.cpu())

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Fix sign, clip and scale from the observations (module docstring)."""
        if self._seen == 0:
            raise ValueError("activation quantizer saw no calibration data: run batches between "
                             "start_calibration() and finish_calibration()")
        self.observing = False
        signed = self._amin < 0
        self.signed.fill_(signed)
        mags = torch.cat(self._samples).abs() if signed else torch.cat(self._samples).clamp_min(0)
        clip_max = max(abs(self._amin), abs(self._amax)) if signed else max(self._amax, 0.0)
        if self.method == "minmax" or clip_max == 0.0:
            clip = clip_max
        elif self.method == "percentile":
            clip = float(torch.quantile(mags.double(), self.percentile / 100.0))
        else:
            clip = self._mse_clip(mags, clip_max)
        clip = clip if clip > 0 else 1.0  # all-zero activations: any scale gives code 0
        scale = clip / self.qmax
        if self.pow2:
            # The DFP exponent rule of leantrain.numerics: the smallest E with clip <= qmax * 2^E, where
            # qmax = 2^(b'-1) - 1 for b' = bits (signed) or bits + 1 (unsigned: one more magnitude bit).
            width = self.bits if bool(self.signed) else self.bits + 1
            scale = 2.0 ** int(dfp_exponent(torch.tensor(clip, dtype=torch.float64), width))
        self.scale.fill_(scale)
        self.calibrated.fill_(True)
        self._samples = []

    def _mse_clip(self, mags: torch.Tensor, clip_max: float) -> float:
        best, best_err = clip_max, math.inf
        m = mags.double()
        for j in range(8, 129):
            clip = clip_max * j / 128
            s = clip / self.qmax
            err = float((round_to_integer(m / s).clamp(0, self.qmax) * s - m).square().mean())
            if err < best_err:
                best, best_err = clip, err
        return best

    # -- quantization -----------------------------------------------------------------------------
    def _ready(self) -> None:
        if not bool(self.calibrated):
            raise RuntimeError("activation quantizer is not calibrated: run calibration batches first")

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """The codes ``clamp(round(x / s), qmin, qmax)`` as integer-valued floats of ``x``'s dtype (NaN stays NaN)."""
        self._ready()
        return round_to_integer(x / self.scale).clamp(self.qmin, self.qmax)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes ``clamp(round(x / s), qmin, qmax)`` as int32; NaN raises ValueError."""
        if torch.isnan(x).any():
            raise ValueError("cannot quantize NaN activations")
        return self.levels(x).to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        q = self.levels(x.detach()) * self.scale.to(x.dtype)
        if not (self.training and x.requires_grad):
            return q
        inside = (x >= self.qmin * self.scale) & (x <= self.qmax * self.scale)
        return q + (x - x.detach()) * inside
