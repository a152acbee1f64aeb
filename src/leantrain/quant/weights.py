"""Weight quantizers: the one ternarizer (FGQ groups, filter clusters, residual edges) and k-bit weights.

**Ternary approximation of one group** ``W_g`` (n weights): ``min_{alpha >= 0, T in {-1,0,1}^n}
||W_g - alpha T||^2``. For a support ``I`` (the non-zero codes, with ``T_i = sign(W_i)`` on it) the
best scale is the least-squares one, ``alpha = <W_g, T> / <T, T> = mean_{i in I} |W_i|``, and the
error is ``||W_g||^2 - (sum_{i in I} |W_i|)^2 / |I|``. Two ways of choosing the support:

- ``method="optimal"`` (default): the exact minimiser. Sort ``|W_g|`` in descending order, take
  prefix sums ``S_k``, and keep the ``k* = argmax_k S_k^2 / k`` largest magnitudes (smallest k* on
  ties). Exact, O(n log n) per group, and every group gets its own optimum; at the optimum the
  k*-th magnitude is ``>= alpha/2 >=`` the (k*+1)-th, i.e. each weight rounds to the nearest of
  ``{-alpha, 0, alpha}``.
- ``method="threshold"``: the closed-form approximation of Ternary Weight Networks,
  ``Delta = delta_factor * mean|W_g|`` (``delta_factor = 0.7``), ``T_i = sign(W_i) 1[|W_i| > Delta]``,
  then the same least-squares ``alpha``. It is derived for large Gaussian/uniform groups and is
  never better than ``"optimal"`` (tested against a brute-force search over all thresholds).

``"optimal"`` is the default because it is exact for every group size, costs little more than the
approximation, and matters most for the small groups (N = 4) where the papers convert without
retraining: a 0.7*mean rule is a large-sample approximation that small groups do not satisfy.

All-zero groups get ``alpha = 0`` and all-zero codes. The solver works in float64; scales are
returned as ``scale_dtype`` (float32 or float16), and the codes are those chosen before the scale is
rounded to that dtype.

**k-bit weights** (``bits`` in 3..8): symmetric uniform levels ``{-q, ..., q}`` with ``q = 2^(bits-1)
- 1`` (``[-7, 7]`` for 4 bits, ``[-127, 127]`` for 8 bits) and one real scale per group,
``alpha = max|W_g| / q``; codes are ``clamp(round(W / alpha), -q, q)`` with round-half-to-even.

**Residual expansion** (ternary residual edges, arXiv:1707.04679): ``W ~= sum_k alpha_k T_k`` where
term ``k`` is the ternarization of the residual ``W - sum_{j<k} alpha_j T_j`` (with the stored,
dtype-rounded scales). Since ``alpha = 0`` is feasible, each term never increases the error.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from leantrain.numerics import round_to_integer
from leantrain.quant.grouping import Grouping, GroupLayout

__all__ = ["WeightCodes", "ternarize", "ternary_expansion", "quantize_weights", "dequantize",
           "TERNARY_METHODS", "WEIGHT_BITS", "SCALE_DTYPES"]

TERNARY_METHODS: tuple[str, ...] = ("optimal", "threshold")
WEIGHT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
SCALE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16)


class WeightCodes(NamedTuple):
    """Integer weight codes (int8, the weight's shape) and one scale per group (``(G,)``)."""

    codes: torch.Tensor
    scales: torch.Tensor


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got dtype {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("w contains NaN or infinity; quantization needs finite weights")


def _check_scale_dtype(scale_dtype: torch.dtype) -> None:
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")



def ternarize(w: torch.Tensor, *, groups: str | Grouping, method: str = "optimal", delta_factor: float = 0.7,
              scale_dtype: torch.dtype = torch.float32) -> WeightCodes:
    """Ternary codes ``T in {-1, 0, 1}`` (int8) and per-group scales with ``W ~= alpha_g T`` (module docstring)."""
    _check_weight(w)
    _check_scale_dtype(scale_dtype)
    if method not in TERNARY_METHODS:
        raise ValueError(f"method must be one of {TERNARY_METHODS}, got {method!r}")
    if not delta_factor > 0:
        raise ValueError(f"delta_factor must be > 0, got {delta_factor}")
    layout = Grouping.parse(groups).layout(w.shape)
    g = layout.to_groups(w.detach().to(torch.float64))
    a = g.abs()
    if method == "optimal":
        s, order = a.sort(dim=1, descending=True)
        prefix = s.cumsum(dim=1)
        k = torch.arange(1, layout.n + 1, dtype=torch.float64, device=g.device)
        kstar = (prefix.square() / k).argmax(dim=1, keepdim=True)  # 0-based: keep ranks 0..kstar
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(layout.n, device=g.device).expand_as(order).contiguous())
        keep = ranks <= kstar
    else:
        counts = layout.counts.to(g.device, torch.float64)
        delta = delta_factor * a.sum(dim=1, keepdim=True) / counts[:, None]
        keep = a > delta
    t = torch.sign(g) * keep
    nnz = t.abs().sum(dim=1)
    alpha = (a * t.abs()).sum(dim=1) / nnz.clamp_min(1.0)
    return WeightCodes(layout.from_groups(t).to(torch.int8), alpha.to(scale_dtype))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, *, groups: str | Grouping) -> torch.Tensor:
    """``alpha_g * T`` in float32, in the weight's shape."""
    layout = Grouping.parse(groups).layout(codes.shape)
    return layout.expand(scales.to(torch.float32)) * codes.to(torch.float32)


def ternary_expansion(w: torch.Tensor, *, groups: str | Grouping, terms: int, method: str = "optimal",
                      scale_dtype: torch.dtype = torch.float32) -> list[WeightCodes]:
    """``terms`` ternary terms ``(T_k, alpha_k)``: term k ternarizes the residual left by terms < k."""
    _check_weight(w)
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
        raise ValueError(f"terms must be an integer >= 1, got {terms!r}")
    grouping = Grouping.parse(groups)
    residual = w.detach().to(torch.float64)
    out: list[WeightCodes] = []
    for _ in range(terms):
        term = ternarize(residual, groups=grouping, method=method, scale_dtype=scale_dtype)
        out.append(term)
        residual = residual - dequantize(term.codes, term.scales, groups=grouping).to(torch.float64)
    return out


def quantize_weights(w: torch.Tensor, *, bits: int, groups: str | Grouping, method: str = "optimal",
                     scale_dtype: torch.dtype = torch.float32) -> WeightCodes:
    """k-bit weight codes with one scale per group; ``bits=2`` is ternary (:func:`ternarize`).

    ``bits`` in 3..8: symmetric levels ``[-q, q]``, ``q = 2^(bits-1) - 1``, ``alpha = max|W_g| / q``
    (rounded to ``scale_dtype`` before the codes are computed), codes ``clamp(round(W/alpha), -q, q)``.
    ``method`` applies to ``bits=2`` only.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in WEIGHT_BITS:
        raise ValueError(f"bits must be one of {WEIGHT_BITS} (2 = ternary), got {bits!r}")
    if bits == 2:
        return ternarize(w, groups=groups, method=method, scale_dtype=scale_dtype)
    _check_weight(w)
    _check_scale_dtype(scale_dtype)
    layout: GroupLayout = Grouping.parse(groups).layout(w.shape)
    qmax = 2 ** (bits - 1) - 1
    g = layout.to_groups(w.detach().to(torch.float64))
    alpha = (g.abs().amax(dim=1) / qmax).to(scale_dtype)
    a64 = alpha.to(torch.float64)[:, None]
    codes = torch.where(a64 > 0, round_to_integer(g / torch.where(a64 > 0, a64, 1.0)), 0.0).clamp(-qmax, qmax)
    return WeightCodes(layout.from_groups(codes).to(torch.int8), alpha)
