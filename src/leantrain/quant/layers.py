"""Quantized convolution / linear layers: ternary or k-bit weights (plus residual terms), quantized inputs.

A :class:`QuantLayer` replaces one ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``. Its weight is a sum of
``terms`` quantized terms ``W_hat = sum_{t < active_terms} alpha_t (.) T_t`` (one term for plain 8-2
or 8-4 layers; more when ternary residual edges are on), its input passes through an
:class:`~leantrain.quant.activations.ActQuantizer`, and bias stays FP32. Three forward modes:

- ``"fake"`` (default): ``conv(s_x q_x, W_hat) + b`` in float32 (quantize-dequantize);
- ``"integer"``: integer operands end to end: input codes ``q_x`` (int32), weight codes ``T_t``
  (int8 values), partial sums ``P_{t,k,g} = sum_{i in g} T_{t,k,i} q_{x,i}`` accumulated exactly
  in int32 (int64 when ``n * max|q_x| * max|T|`` could exceed 2^31 - 1), then one multiply by the
  group scale per group and term: ``y_k = s_x sum_t sum_g alpha_{t,g} P_{t,k,g} + b_k``, combined in
  float64 and rounded once to float32. On devices without integer matmul (CUDA) the same integer
  values are multiplied as float64, which is exact below 2^53.
- ``"float"``: the FP32 shadow weight and no activation quantization (the original layer).

The FP32 *shadow* weight (``weight``) is kept when the layer is converted from a float model, so it
can be fine-tuned with straight-through estimators: in training mode the weight is re-quantized at
every forward pass, ``W_ste = W + (Q(W) - W).detach()``, and the codes follow the shadow weight
whenever it changes (tracked through the tensor's version counter). Layers loaded from a packed
file have codes only (``weight is None``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from leantrain.quant.activations import ActQuantizer
from leantrain.quant.attention import no_fused_fast_path
from leantrain.quant.grouping import Grouping, GroupLayout
from leantrain.quant.selection import is_hf_conv1d
from leantrain.quant.weights import WeightCodes, dequantize, quantize_weights, ternary_expansion

__all__ = ["QuantLayer", "MODES", "quantizable"]

MODES: tuple[str, ...] = ("fake", "integer", "float")


def quantizable(module: nn.Module) -> str | None:
    """Why ``module`` cannot be converted (a reason string), or None when it can."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return "grouped convolution"
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"padding {module.padding!r}"
        return None
    return f"{type(module).__name__} is not a Conv1d/Conv2d/Linear/transformers Conv1D"


def _matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as used by ``F.linear``/``F.conv``: transformers' ``Conv1D`` stores ``(in, out)``."""
    return layer.weight.t() if is_hf_conv1d(layer) else layer.weight


class QuantLayer(nn.Module):
    """A conv/linear layer with quantized weight terms and a quantized input (module docstring)."""

    def __init__(self, layer: nn.Module | None = None, *, bits: int, grouping: str | Grouping,
                 act: ActQuantizer | None, method: str = "optimal", scale_dtype: torch.dtype = torch.float32,
                 terms: int = 1, spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.bits, self.grouping, self.method, self.scale_dtype = bits, Grouping.parse(grouping), method, scale_dtype
        if terms > 1 and bits != 2:
            raise ValueError(f"residual terms need ternary weights (bits=2), got bits={bits}")
        if layer is not None:
            reason = quantizable(layer)
            if reason:
                raise ValueError(f"cannot quantize this layer: {reason}")
            spec = self.layer_spec(layer)
            self.weight: nn.Parameter | None = nn.Parameter(_matrix(layer).detach().clone())
            self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        elif spec is None:
            raise ValueError("QuantLayer needs a layer to convert or a spec to rebuild")
        else:
            self.weight = None
            self.bias = nn.Parameter(torch.zeros(spec["shape"][0])) if spec["bias"] else None
        self.spec = dict(spec)
        self.shape = tuple(spec["shape"])
        self.layout: GroupLayout = self.grouping.layout(self.shape)
        self.act = act
        self.mode = "fake"
        self.n_terms = 0
        self._active = 1
        self._cache: tuple[int, torch.Tensor] | None = None
        self._codes_version = -1
        # torch's fused transformer fast path reads linear.weight directly; a hook makes it run forward().
        self.register_forward_pre_hook(no_fused_fast_path)
        if self.weight is not None:
            self.requantize(terms)

    @staticmethod
    def layer_spec(layer: nn.Module) -> dict[str, Any]:
        """The shape and hyper-parameters that rebuild ``layer``'s computation."""
        if isinstance(layer, nn.Linear) or is_hf_conv1d(layer):
            return {"kind": "linear", "shape": list(_matrix(layer).shape), "bias": layer.bias is not None}
        return {"kind": f"conv{layer.weight.dim() - 2}d", "shape": list(layer.weight.shape), "bias": layer.bias is not None,
                "stride": list(layer.stride), "padding": list(layer.padding), "dilation": list(layer.dilation)}

    # -- terms ------------------------------------------------------------------------------------
    def requantize(self, terms: int | None = None) -> None:
        """Recompute the ``terms`` weight terms (default: as many as stored) from the shadow weight."""
        if self.weight is None:
            raise RuntimeError("this layer has no FP32 shadow weight (loaded from a packed file); it cannot be re-quantized")
        terms = self.n_terms if terms is None else terms
        if terms < 1:
            raise ValueError(f"terms must be >= 1, got {terms}")
        self.set_terms(self._quantize(self.weight.detach(), terms))
        self._codes_version = self.weight._version

    def _quantize(self, w: torch.Tensor, terms: int) -> list[WeightCodes]:
        if self.bits == 2:
            return ternary_expansion(w, groups=self.grouping, terms=terms, method=self.method, scale_dtype=self.scale_dtype)
        if terms != 1:
            raise ValueError(f"residual terms need ternary weights (bits=2), got bits={self.bits}")
        return [quantize_weights(w, bits=self.bits, groups=self.grouping, method=self.method, scale_dtype=self.scale_dtype)]

    def set_terms(self, terms: list[WeightCodes]) -> None:
        """Install weight terms (codes and scales); used by conversion and by loading."""
        for t in range(self.n_terms):
            delattr(self, f"codes{t}")
            delattr(self, f"scales{t}")
        dev = self.bias.device if self.bias is not None else (self.weight.device if self.weight is not None else None)
        for t, (codes, scales) in enumerate(terms):
            if tuple(codes.shape) != self.shape or codes.dtype != torch.int8:
                raise ValueError(f"term {t}: codes must be int8 of shape {self.shape}, got {codes.dtype} {tuple(codes.shape)}")
            if tuple(scales.shape) != (self.layout.G,):
                raise ValueError(f"term {t}: scales must have shape ({self.layout.G},), got {tuple(scales.shape)}")
            self.register_buffer(f"codes{t}", codes.to(dev) if dev is not None else codes)
            self.register_buffer(f"scales{t}", scales.to(dev) if dev is not None else scales)
        self.n_terms = len(terms)
        self._active = min(max(self._active, 1), self.n_terms)
        self._cache = None

    def term(self, t: int) -> WeightCodes:
        """Codes and scales of term ``t`` (0 = base, >= 1 residual edges)."""
        if not 0 <= t < self.n_terms:
            raise IndexError(f"term must be in [0, {self.n_terms}), got {t}")
        return WeightCodes(getattr(self, f"codes{t}"), getattr(self, f"scales{t}"))

    @property
    def active_terms(self) -> int:
        """How many terms the forward pass uses (1 = base only; each further term is a residual edge)."""
        return self._active

    @active_terms.setter
    def active_terms(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.n_terms:
            raise ValueError(f"active_terms must be an integer in [1, {self.n_terms}], got {value!r}")
        if value != self._active:
            self._active = value
            self._cache = None

    # -- weights ----------------------------------------------------------------------------------
    def _refresh(self) -> None:
        if self.weight is not None and self.weight._version != self._codes_version:
            self.requantize()

    def weight_hat(self, terms: int | None = None) -> torch.Tensor:
        """``sum_{t < terms} alpha_t (.) T_t`` in float32 (terms defaults to ``active_terms``)."""
        self._refresh()
        terms = self._active if terms is None else terms
        if self._cache is not None and self._cache[0] == terms:
            return self._cache[1]
        w = None
        for t in range(terms):
            dq = dequantize(*self.term(t), groups=self.grouping)
            w = dq if w is None else w + dq
        assert w is not None
        self._cache = (terms, w)
        return w

    def _ste_weight(self) -> torch.Tensor:
        assert self.weight is not None
        terms = self._quantize(self.weight.detach(), self._active)
        wq = None
        for codes, scales in terms:
            dq = dequantize(codes, scales, groups=self.grouping)
            wq = dq if wq is None else wq + dq
        return self.weight + (wq - self.weight).detach()

    # -- forward ----------------------------------------------------------------------------------
    def _linear_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        kind = self.spec["kind"]
        if kind == "linear":
            return F.linear(x, w, self.bias)
        conv = F.conv1d if kind == "conv1d" else F.conv2d
        return conv(x, w, self.bias, tuple(self.spec["stride"]), tuple(self.spec["padding"]), tuple(self.spec["dilation"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            if self.weight is None:
                raise RuntimeError("float mode needs the FP32 shadow weight, which a loaded packed model does not have")
            return self._linear_op(x, self.weight)
        if self.training and self.weight is not None and torch.is_grad_enabled():
            xq = self.act(x) if self.act is not None else x
            return self._linear_op(xq, self._ste_weight())
        if self.mode == "integer":
            return self.integer_forward(x)
        xq = self.act(x) if self.act is not None else x
        return self._linear_op(xq, self.weight_hat())

    @torch.no_grad()
    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Integer execution path (module docstring): exact integer partial sums, one scale multiply per group."""
        if self.act is None:
            raise RuntimeError("the integer path needs quantized input activations (this layer has act=None)")
        self._refresh()
        if torch.isnan(x).any():
            raise ValueError("cannot quantize NaN activations")
        q = self.act.levels(x)  # integer-valued codes; exact in float32, moved losslessly by unfold
        kind, K, R = self.spec["kind"], self.layout.K, self.layout.R
        if kind == "linear":
            lead = q.shape[:-1]
            cols = q.reshape(-1, R).t().unsqueeze(-1)  # (R, B, 1)
        else:
            ks = tuple(self.shape[2:])
            st, pd, dl = (tuple(self.spec[k]) for k in ("stride", "padding", "dilation"))
            if kind == "conv1d":  # as a conv2d over a height-1 image
                q = q.unsqueeze(-2)
                ks, st, pd, dl = (1, *ks), (1, *st), (0, *pd), (1, *dl)
            out_hw = [(q.shape[2 + i] + 2 * pd[i] - dl[i] * (ks[i] - 1) - 1) // st[i] + 1 for i in range(2)]
            cols = F.unfold(q.to(torch.float32), ks, dilation=dl, padding=pd, stride=st)  # (B, R, L), (C, kh, kw) order
            cols = cols.transpose(0, 1).index_select(0, self.layout.reduction_permutation().to(cols.device))  # (R, B, L)
        B, L = cols.shape[1], cols.shape[2]
        S, n = self.layout.segments, self.layout.segment_length
        terms = [self.term(t) for t in range(self._active)]
        wmax = max(int(c.abs().max()) for c, _ in terms)
        amax = max(abs(self.act.qmin), self.act.qmax)
        itype = torch.int32 if n * amax * max(wmax, 1) < 2**31 - 1 else torch.int64
        optype = itype if x.device.type == "cpu" else torch.float64
        X = cols.to(optype).reshape(R, B * L)
        if S * n > R:  # zero-padded last segment (remainder="partial")
            X = torch.cat([X, X.new_zeros(S * n - R, B * L)])
        X = X.reshape(S, n, B * L)
        # All active terms in one batched integer matmul: (S, terms*K, n) @ (S, n, B*L).
        T = torch.cat([F.pad(self.layout.rows(c).to(optype), (0, S * n - R)).reshape(K, S, n) for c, _ in terms])
        Tb = T.permute(1, 0, 2).contiguous()  # (S, terms*K, n)
        alpha = torch.cat([self.layout.row_scales(sc).to(torch.float64) for _, sc in terms]).t()  # (S, terms*K)
        acc = torch.empty(K, B * L, dtype=torch.float64, device=x.device)
        # Column blocks keep the (S, terms*K, block) partial sums small enough to stay in cache.
        block = max(256, (1 << 18) // max(S * Tb.shape[1], 1))
        for c0 in range(0, B * L, block):
            P = torch.bmm(Tb, X[:, :, c0:c0 + block])  # exact integer sums per group
            # One multiply by the group scale per group, term and output; summed over groups and terms in float64.
            acc[:, c0:c0 + block] = torch.einsum("sk,skl->kl", alpha, P.to(torch.float64)).reshape(
                len(terms), K, -1).sum(0)
        y = (acc * float(self.act.scale)).to(torch.float32)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)[:, None]
        y = y.reshape(K, B, L).permute(1, 0, 2)
        if kind == "linear":
            return y.reshape(*lead, K)
        if kind == "conv1d":
            return y.reshape(B, K, out_hw[1])
        return y.reshape(B, K, *out_hw)

    # -- accounting -------------------------------------------------------------------------------
    def weight_error(self, terms: int | None = None) -> float:
        """Relative weight error ``||W - W_hat|| / ||W||`` (needs the shadow weight)."""
        if self.weight is None:
            return math.nan
        w = self.weight.detach().double()
        return float((w - self.weight_hat(terms).double()).norm() / w.norm().clamp_min(1e-300))

    def extra_repr(self) -> str:
        return (f"{self.spec['kind']} {tuple(self.shape)}, bits={self.bits}, grouping={self.grouping}, "
                f"terms={self._active}/{self.n_terms}, mode={self.mode}")
