"""Custom autograd functions: linear, convolution and embedding with named quantization points.

Each function rounds exactly the GEMM inputs its :class:`LayerNumerics` policy names:

- forward: ``Xq = R(X, forward.a)``, ``Wq = R(W, forward.b)``, ``Y = Xq (x) Wq + b``;
- backward: ``dYd = R(dY, backward_data.a)``, ``Wd = R(W, backward_data.b)``, ``dX = dYd (x)^T Wd``;
  ``Xw = R(X, backward_weight.a)``, ``dYw = R(dY, backward_weight.b)``, ``dW = Xw^T (x) dYw``;
  ``db = sum dY`` in FP32 (the bias add is an FP32 op);

where ``(x)`` is the layer's GEMM (matrix product or convolution). A tensor consumed by two GEMMs
with the same spec is rounded once and shared; so is a forward operand that several GEMMs of one forward pass
read (``LayerNumerics.inputs``), for the deterministic roundings. Float GEMMs run the ordinary FP32 kernels on the
rounded values: for BF16/FP16/FP8 inputs every elementwise product is exact in FP32 (at most
2 x 11 significand bits), so this *is* "low-precision multiply, FP32 accumulate", up to the order
of summation. Integer (DFP) GEMMs are lowered to matrix products (``unfold``/``fold`` for
convolutions) and run through :func:`leantrain.numerics.int_matmul` with the policy's accumulator,
then rescaled by ``2**(E_a + E_b)``. For convolutions, the backward-data GEMM reduces over output
channels in the integer accumulator; the sum over the kernel taps that overlap an input position
(``fold``) happens afterwards in FP32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function

from leantrain.precision.operands import LayerNumerics
from leantrain.precision.policy import DFPSpec

__all__ = ["ConvGeometry", "linear", "bmm", "conv", "embedding", "LinearFunction", "BmmFunction", "ConvFunction",
           "EmbeddingFunction"]


def _reuse(first: Any, second: Any) -> bool:
    """Whether a tensor rounded with spec ``first`` can serve a GEMM that asks for ``second``."""
    return first == second


# ----------------------------------------------------------------------------------------- linear

class LinearFunction(Function):
    """The autograd Function behind :func:`linear` (forward and both backward GEMMs rounded per its numerics)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, L: LayerNumerics) -> torch.Tensor:
        p = L.policy
        if p.forward.integer:
            xm, xe = L.dfp(x, p.forward.a, "x")  # type: ignore[arg-type]
            wm, we = L.dfp(w, p.forward.b, "w")  # type: ignore[arg-type]
            y = L.int_gemm(xm.reshape(-1, x.shape[-1]), wm.t(), xe + we, "forward").reshape(*x.shape[:-1], w.shape[0])
            if b is not None:
                y = y + b
            ctx.save_for_backward(xm, wm)
            ctx.exps = (xe, we)
        else:
            xq = L.round(x, p.forward.a, "x", shared=L.inputs, scratch=True)
            wq = L.round(w, p.forward.b, "w", shared=L.inputs, scratch=True)
            y = F.linear(xq, wq, b)
            ctx.save_for_backward(xq if _reuse(p.forward.a, p.backward_weight.a) else x,
                                  wq if _reuse(p.forward.b, p.backward_data.b) else w)
        ctx.L, ctx.has_bias = L, b is not None
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        L: LayerNumerics = ctx.L
        p = L.policy
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xs, ws = ctx.saved_tensors
        out_f, in_f = ws.shape
        g2 = g.reshape(-1, out_f)
        dx = dw = db = None
        if p.forward.integer:
            xe, we = ctx.exps
            gd, gw = _round_dy_dfp(L, g2, need_x, need_w)
            if need_x:
                gm, ge = gd
                dx = L.int_gemm(gm, ws, ge + we, "backward_data").reshape(*g.shape[:-1], in_f)
            if need_w:
                gm, ge = gw
                dw = L.int_gemm(gm.t(), xs.reshape(-1, in_f), ge + xe, "backward_weight")
        else:
            gd, gw = _round_dy(L, g2, need_x, need_w)
            if need_x:
                wd = ws if _reuse(p.forward.b, p.backward_data.b) else L.round(ws, p.backward_data.b, "w@backward_data",
                                                                               scratch=True)
                dx = gd.mm(wd).reshape(*g.shape[:-1], in_f)
            if need_w:
                xw = xs if _reuse(p.forward.a, p.backward_weight.a) else L.round(xs, p.backward_weight.a,
                                                                                 "x@backward_weight", scratch=True)
                dw = gw.t().mm(xw.reshape(-1, in_f))
        if need_b and ctx.has_bias:
            db = g2.sum(0)
        return dx, dw, db, None


def _round_dy(L: LayerNumerics, g: torch.Tensor, need_x: bool, need_w: bool) -> tuple[Any, Any]:
    """dY rounded for the backward-data and backward-weight GEMMs (one shared rounding when the specs agree)."""
    p = L.policy
    sd, sw = p.backward_data.a, p.backward_weight.b
    if need_x and need_w and _reuse(sd, sw):
        r = L.round(g, sd, "dy", scratch=True)
        return r, r
    gd = L.round(g, sd, "dy", scratch=True) if need_x else None
    gw = L.round(g, sw, "dy@backward_weight" if need_x else "dy", scratch=True) if need_w else None
    return gd, gw


def _round_dy_dfp(L: LayerNumerics, g: torch.Tensor, need_x: bool, need_w: bool) -> tuple[Any, Any]:
    p = L.policy
    sd, sw = p.backward_data.a, p.backward_weight.b
    if need_x and need_w and _reuse(sd, sw):
        r = L.dfp(g, sd, "dy")  # type: ignore[arg-type]
        return r, r
    gd = L.dfp(g, sd, "dy") if need_x else None  # type: ignore[arg-type]
    gw = L.dfp(g, sw, "dy@backward_weight" if need_x else "dy") if need_w else None  # type: ignore[arg-type]
    return gd, gw


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, numerics: LayerNumerics) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the GEMM inputs rounded by ``numerics.policy``."""
    return LinearFunction.apply(x, weight, bias, numerics)


# ------------------------------------------------------------------------------ batched matmul

class BmmFunction(Function):
    """The autograd Function behind :func:`bmm` (forward and both backward GEMMs rounded per its numerics)."""

    """``Y[i] = A[i] B[i]`` for (n, M, K) x (n, K, N): A plays the role of X, B that of W (``forward.a`` / ``.b``),
    so ``dA = dY B^T`` is the backward-data GEMM and ``dB = A^T dY`` the backward-weight GEMM."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, L: LayerNumerics) -> torch.Tensor:
        p = L.policy
        if p.forward.integer:
            am, ae = L.dfp(a, p.forward.a, "x")  # type: ignore[arg-type]
            bm, be = L.dfp(b, p.forward.b, "w")  # type: ignore[arg-type]
            y = torch.stack([L.int_gemm(am[i], bm[i], ae + be, "forward") for i in range(a.shape[0])]) \
                if a.shape[0] else a.new_zeros(0, a.shape[1], b.shape[2])
            ctx.save_for_backward(am, bm)
            ctx.exps = (ae, be)
        else:
            aq = L.round(a, p.forward.a, "x", shared=L.inputs, scratch=True)
            bq = L.round(b, p.forward.b, "w", shared=L.inputs, scratch=True)
            y = torch.bmm(aq, bq)
            ctx.save_for_backward(aq if _reuse(p.forward.a, p.backward_weight.a) else a,
                                  bq if _reuse(p.forward.b, p.backward_data.b) else b)
        ctx.L = L
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        L: LayerNumerics = ctx.L
        p = L.policy
        need_a, need_b = ctx.needs_input_grad[:2]
        as_, bs = ctx.saved_tensors
        da = db = None
        if p.forward.integer:
            ae, be = ctx.exps
            gd, gw = _round_dy_dfp(L, g, need_a, need_b)
            if need_a:
                gm, ge = gd
                da = torch.stack([L.int_gemm(gm[i], bs[i].t(), ge + be, "backward_data") for i in range(g.shape[0])])
            if need_b:
                gm, ge = gw
                db = torch.stack([L.int_gemm(as_[i].t(), gm[i], ge + ae, "backward_weight") for i in range(g.shape[0])])
        else:
            gd, gw = _round_dy(L, g, need_a, need_b)
            if need_a:
                bd = bs if _reuse(p.forward.b, p.backward_data.b) else L.round(bs, p.backward_data.b, "w@backward_data",
                                                                               scratch=True)
                da = torch.bmm(gd, bd.transpose(1, 2))
            if need_b:
                aw = as_ if _reuse(p.forward.a, p.backward_weight.a) else L.round(as_, p.backward_weight.a,
                                                                                   "x@backward_weight", scratch=True)
                db = torch.bmm(aw.transpose(1, 2), gw)
        return da, db, None


def bmm(a: torch.Tensor, b: torch.Tensor, numerics: LayerNumerics) -> torch.Tensor:
    """``torch.bmm(a, b)`` ((n, M, K) x (n, K, N)) with the GEMM inputs rounded by ``numerics.policy``: ``a`` is
    rounded as X, ``b`` as W, the output gradient as dY (for a GEMM of two activations, such as attention's
    ``Q K^T`` and ``P V``, the policy's activation GEMM specs, :meth:`Policy.for_kind`)."""
    return BmmFunction.apply(a, b, numerics)


# ------------------------------------------------------------------------------------ convolution

@dataclass(frozen=True)
class ConvGeometry:
    """Integer parameters of a convolution (``nn.ConvNd`` / ``nn.ConvTransposeNd``), padding explicit."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int

    def args(self) -> tuple[Any, ...]:
        return (list(self.stride), list(self.padding), list(self.dilation), self.transposed,
                list(self.output_padding), self.groups)


def _as2d(t: torch.Tensor) -> torch.Tensor:
    """A 1-d convolution's (N, C, L) tensor viewed as 2-d (N, C, 1, L)."""
    return t.unsqueeze(-2) if t.dim() == 3 else t


def _geom2d(geo: ConvGeometry) -> tuple[tuple[int, int], ...]:
    if len(geo.stride) == 1:
        return (1, geo.stride[0]), (0, geo.padding[0]), (1, geo.dilation[0]), (0, geo.output_padding[0])
    return tuple(geo.stride), tuple(geo.padding), tuple(geo.dilation), tuple(geo.output_padding)  # type: ignore[return-value]


def _unfold_rows(x2: torch.Tensor, k: tuple[int, int], dil: Any, pad: Any, stride: Any) -> torch.Tensor:
    """im2col: (N, C, H, W) -> (N*L, C*kh*kw), one row per output position."""
    cols = F.unfold(x2, k, dilation=dil, padding=pad, stride=stride)  # (N, C*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _fold_rows(rows: torch.Tensor, n: int, out_hw: tuple[int, int], k: tuple[int, int], dil: Any, pad: Any,
               stride: Any) -> torch.Tensor:
    """col2im, the adjoint of :func:`_unfold_rows`: (N*L, C*kh*kw) -> (N, C, H, W), overlaps summed."""
    cols = rows.reshape(n, -1, rows.shape[1]).transpose(1, 2)
    return F.fold(cols, out_hw, k, dilation=dil, padding=pad, stride=stride)


class ConvFunction(Function):
    """The autograd Function behind :func:`conv` (forward and both backward GEMMs rounded per its numerics)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, L: LayerNumerics,
                geo: ConvGeometry) -> torch.Tensor:
        p = L.policy
        ctx.L, ctx.geo, ctx.has_bias, ctx.x_shape = L, geo, b is not None, x.shape
        if p.forward.integer:
            xm, xe = L.dfp(x, p.forward.a, "x")  # type: ignore[arg-type]
            wm, we = L.dfp(w, p.forward.b, "w")  # type: ignore[arg-type]
            y = _dfp_conv_forward(L, xm, wm, xe + we, geo, x.shape)
            if b is not None:
                y = y + b.reshape(1, -1, *([1] * (y.dim() - 2)))
            ctx.save_for_backward(xm, wm)
            ctx.exps = (xe, we)
            ctx.y_shape = y.shape
            return y
        xq = L.round(x, p.forward.a, "x", shared=L.inputs, scratch=True)
        wq = L.round(w, p.forward.b, "w", shared=L.inputs, scratch=True)
        y = torch.ops.aten.convolution(xq, wq, b, *geo.args())
        ctx.save_for_backward(xq if _reuse(p.forward.a, p.backward_weight.a) else x,
                              wq if _reuse(p.forward.b, p.backward_data.b) else w)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        L: LayerNumerics = ctx.L
        p, geo = L.policy, ctx.geo
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xs, ws = ctx.saved_tensors
        dx = dw = db = None
        if need_b and ctx.has_bias:
            db = g.sum(dim=[d for d in range(g.dim()) if d != 1])
        if p.forward.integer:
            gd, gw = _round_dy_dfp(L, g, need_x, need_w)
            dx, dw = _dfp_conv_backward(L, xs, ws, ctx.exps, gd, gw, geo, ctx.x_shape)
            return dx, dw, db, None, None
        gd, gw = _round_dy(L, g, need_x, need_w)
        wd, xw = ws, xs
        if need_x:
            wd = ws if _reuse(p.forward.b, p.backward_data.b) else L.round(ws, p.backward_data.b, "w@backward_data", scratch=True)
        if need_w:
            xw = xs if _reuse(p.forward.a, p.backward_weight.a) else L.round(xs, p.backward_weight.a, "x@backward_weight",
                                                                             scratch=True)
        if need_x and need_w and gd is gw and (wd is ws) and (xw is xs):
            dx, dw, _ = torch.ops.aten.convolution_backward(gd, xs, ws, None, *geo.args(), [True, True, False])
        else:
            if need_x:
                dx = torch.ops.aten.convolution_backward(gd, xs, wd, None, *geo.args(), [True, False, False])[0]
            if need_w:
                dw = torch.ops.aten.convolution_backward(gw, xw, ws, None, *geo.args(), [False, True, False])[1]
        return dx, dw, db, None, None


def _steps(m: int, step: int, device: torch.device) -> torch.Tensor:
    """``[0, step, 2 step, ..., (m - 1) step]`` as int64 offsets."""
    return torch.arange(m, dtype=torch.int64, device=device) * step


def _tap_offsets(c: int, kh: int, kw: int, hp: int, wp: int, dil: Any, device: torch.device) -> torch.Tensor:
    """Offsets of the reduction index ``k = (c, i, j)`` (im2col's row order) in a padded (C, Hp, Wp) input."""
    return (_steps(c, hp * wp, device)[:, None, None] + _steps(kh, dil[0] * wp, device)[None, :, None]
            + _steps(kw, dil[1], device)[None, None, :]).reshape(-1)


def _position_offsets(ho: int, wo: int, wp: int, stride: Any, device: torch.device) -> torch.Tensor:
    """Offsets of the output positions ``p = (oh, ow)`` (im2col's column order) in a padded input plane."""
    return (_steps(ho, stride[0] * wp, device)[:, None] + _steps(wo, stride[1], device)[None, :]).reshape(-1)


def _group_slices(geo: ConvGeometry, xm: torch.Tensor, wm: torch.Tensor) -> list[tuple[slice, slice]]:
    """Per group: its input channels (dim 1 of X) and its rows of the weight (dim 0): a grouped
    convolution is ``groups`` independent convolutions, group ``g`` reading input channels ``g C/G ..`` with weight
    rows ``g O/G ..`` (``ConvTranspose``: weight rows are input channels, ``g C/G ..`` too)."""
    ci, wo = xm.shape[1] // geo.groups, wm.shape[0] // geo.groups
    return [(slice(g * ci, (g + 1) * ci), slice(g * wo, (g + 1) * wo)) for g in range(geo.groups)]


def _dfp_conv_forward(L: LayerNumerics, xm: torch.Tensor, wm: torch.Tensor, exp: int, geo: ConvGeometry,
                      x_shape: torch.Size) -> torch.Tensor:
    if geo.groups > 1:  # one integer convolution per group, same shared exponents; outputs side by side
        one = dataclasses.replace(geo, groups=1)
        return torch.cat([_dfp_conv_forward(L, xm[:, xs], wm[ws], exp, one, x_shape)
                          for xs, ws in _group_slices(geo, xm, wm)], dim=1)
    stride, pad, dil, opad = _geom2d(geo)
    x2, w2 = _as2d(xm), _as2d(wm)
    n, (kh, kw) = x2.shape[0], w2.shape[-2:]
    if not geo.transposed:
        ho = (x2.shape[2] + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (x2.shape[3] + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    if not geo.transposed and L.wraps_exactly():
        # im2col never built: the GEMM gathers the padded input through offset tables (gathered_int_gemm)
        xp = F.pad(x2, (pad[1], pad[1], pad[0], pad[0]))
        hp, wp = xp.shape[2:]
        y = L.gathered_gemm(xp.reshape(n, -1), _position_offsets(ho, wo, wp, stride, xm.device),
                            _tap_offsets(x2.shape[1], kh, kw, hp, wp, dil, xm.device),
                            w2.reshape(w2.shape[0], -1).t(), exp, "forward", transpose_out=True)  # (N, O, L)
        y = y.reshape(n, -1, ho, wo)
    elif not geo.transposed:
        cols = F.unfold(x2, (kh, kw), dilation=dil, padding=pad, stride=stride)  # (N, C*k, L)
        # rows (N*L, C*k) handed over transposed: (C*k, N, L) is A^T in row-major order, no transposing copy
        out = L.int_gemm(cols.transpose(0, 1), w2.reshape(w2.shape[0], -1).t(), exp, "forward",
                         transposed=True)                                             # (N*L, O)
        y = out.reshape(n, ho * wo, -1).transpose(1, 2).reshape(n, -1, ho, wo)
    else:
        cin = x2.shape[1]
        rows = x2.reshape(n, cin, -1).transpose(1, 2).reshape(-1, cin)            # (N*Lin, Cin)
        cols = L.int_gemm(rows, w2.reshape(cin, -1), exp, "forward")             # (N*Lin, Cout*k)
        ho = (x2.shape[2] - 1) * stride[0] - 2 * pad[0] + dil[0] * (kh - 1) + opad[0] + 1
        wo = (x2.shape[3] - 1) * stride[1] - 2 * pad[1] + dil[1] * (kw - 1) + opad[1] + 1
        y = _fold_rows(cols, n, (ho, wo), (kh, kw), dil, pad, stride)
    return y.squeeze(-2) if len(x_shape) == 3 else y


def _dfp_conv_backward(L: LayerNumerics, xm: torch.Tensor, wm: torch.Tensor, exps: tuple[int, int], gd: Any, gw: Any,
                       geo: ConvGeometry, x_shape: torch.Size) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if geo.groups > 1:  # per group (its output-gradient channels: O/G, or Cout/G when transposed); concatenated
        one = dataclasses.replace(geo, groups=1)
        co = (gd or gw)[0].shape[1] // geo.groups
        parts = []
        for g, (xs, ws) in enumerate(_group_slices(geo, xm, wm)):
            ys = slice(g * co, (g + 1) * co)
            parts.append(_dfp_conv_backward(L, xm[:, xs], wm[ws], exps, gd and (gd[0][:, ys], gd[1]),
                                            gw and (gw[0][:, ys], gw[1]), one, x_shape))
        return (None if gd is None else torch.cat([p[0] for p in parts], dim=1),
                None if gw is None else torch.cat([p[1] for p in parts], dim=0))
    stride, pad, dil, _ = _geom2d(geo)
    xe, we = exps
    x2, w2 = _as2d(xm), _as2d(wm)
    n, (kh, kw) = x2.shape[0], w2.shape[-2:]
    dx = dw = None
    if not geo.transposed and L.wraps_exactly():
        o, c = w2.shape[:2]
        (h, w_), (ho, wo) = x2.shape[2:], _as2d((gd or gw)[0]).shape[-2:]
        lo = ho * wo
        hp, wp = h + 2 * pad[0], w_ + 2 * pad[1]
        taps = _tap_offsets(c, kh, kw, hp, wp, dil, xm.device)
        pos = _position_offsets(ho, wo, wp, stride, xm.device)
        if gd is not None:
            gm, ge = gd
            # cols[b, k, p] = sum_o W[o, k] dY[b, o, p]: the integer registers reduce over output channels (W is the
            # gathered operand, dY's rows the vector one). The col2im is fused: each (k, p) is added to the padded
            # input gradient at taps[k] + pos[p], rows k in increasing order, F.fold's float32 order.
            kk = w2[0].numel()
            dxp = torch.zeros(n, c * hp * wp, dtype=torch.float32, device=xm.device)
            L.gathered_gemm(w2.reshape(1, -1), _steps(kk, 1, xm.device), _steps(o, kk, xm.device), gm.reshape(n, o * lo),
                            ge + we, "backward_data", vrow=_steps(o, lo, xm.device), n=lo, into=(dxp, taps, pos),
                            accumulate=True)
            # contiguous, like the FP32 convolution's gradient: downstream FP32 kernels (batch norm) sum in an order
            # that depends on the memory layout
            dx = dxp.view(n, c, hp, wp)[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w_].contiguous()
        if gw is not None:
            gm, ge = gw
            xp = F.pad(x2, (pad[1], pad[1], pad[0], pad[0]))
            # reduction over (image, position) in that order; A[k, (b, p)] = Xpad[b] at taps[k] + pos[p]
            q = _steps(n, c * hp * wp, xm.device)[:, None] + pos[None, :]
            dw = L.gathered_gemm(xp.reshape(1, -1), taps, q.reshape(-1),
                                 gm.reshape(n, o, lo).transpose(1, 2).reshape(n * lo, o), ge + xe,
                                 "backward_weight", transpose_out=True).reshape(w2.shape)
    elif not geo.transposed:
        o = w2.shape[0]
        if gd is not None:
            gm, ge = gd
            g_t = _as2d(gm).reshape(n, o, -1).transpose(0, 1)                          # (O, N, L): rows^T
            rows = L.int_gemm(g_t, w2.reshape(o, -1), ge + we, "backward_data", transposed=True)  # (N*L, C*k)
            dx = _fold_rows(rows, n, tuple(x2.shape[2:]), (kh, kw), dil, pad, stride)   # type: ignore[arg-type]
        if gw is not None:
            gm, ge = gw
            g_t = _as2d(gm).reshape(n, o, -1).transpose(1, 2)                          # (N, L, O): (g_rows.t())^T
            x_cols = F.unfold(x2, (kh, kw), dilation=dil, padding=pad, stride=stride)    # (N, C*k, L)
            # x_rows (N*L, C*k) handed over transposed: (C*k, N, L) is x_rows^T in row-major order
            dw = L.int_gemm(g_t, x_cols.transpose(0, 1), ge + xe, "backward_weight", transposed=True,
                            b_transposed=True).reshape(w2.shape)
    else:
        cin = x2.shape[1]
        if gd is not None:
            gm, ge = gd
            g_rows = _unfold_rows(_as2d(gm), (kh, kw), dil, pad, stride)                # (N*Lin, Cout*k)
            rows = L.int_gemm(g_rows, w2.reshape(cin, -1).t(), ge + we, "backward_data")  # (N*Lin, Cin)
            dx = rows.reshape(n, -1, cin).transpose(1, 2).reshape(x2.shape)
        if gw is not None:
            gm, ge = gw
            g_rows = _unfold_rows(_as2d(gm), (kh, kw), dil, pad, stride)
            x_rows = x2.reshape(n, cin, -1).transpose(1, 2).reshape(-1, cin)
            dw = L.int_gemm(x_rows.t(), g_rows, ge + xe, "backward_weight").reshape(w2.shape)
    if dx is not None and len(x_shape) == 3:
        dx = dx.squeeze(-2)
    if dw is not None and wm.dim() == 3:
        dw = dw.squeeze(-2)
    return dx, dw


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry,
         numerics: LayerNumerics) -> torch.Tensor:
    """``aten.convolution`` (any ``nn.ConvNd``/``nn.ConvTransposeNd``) with the GEMM inputs rounded.

    DFP policies support 1-d and 2-d convolutions (checked by :func:`leantrain.precision.emulate`), grouped and
    depthwise ones as one integer convolution per group.
    """
    return ConvFunction.apply(x, weight, bias, numerics, geometry)


# -------------------------------------------------------------------------------------- embedding

class EmbeddingFunction(Function):
    """The autograd Function behind :func:`embedding` (forward and both backward GEMMs rounded per its numerics)."""

    @staticmethod
    def forward(ctx: Any, idx: torch.Tensor, w: torch.Tensor, padding_idx: int | None, L: LayerNumerics) -> torch.Tensor:
        spec = L.policy.forward.b
        if isinstance(spec, DFPSpec):
            table = L.round(w, spec, "w")  # the shared exponent belongs to the whole table
            y = F.embedding(idx, table)
        else:
            # Float rounding is elementwise: rounding the gathered rows equals gathering rounded rows.
            y = L.round(F.embedding(idx, w), spec, "w")
        ctx.save_for_backward(idx)
        ctx.L, ctx.padding_idx, ctx.num = L, padding_idx, w.shape[0]
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (idx,) = ctx.saved_tensors
        L: LayerNumerics = ctx.L
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        gq = L.round(g, L.policy.backward_weight.b, "dy").reshape(-1, g.shape[-1])
        flat = idx.reshape(-1)
        if ctx.padding_idx is not None:
            gq = gq * (flat != ctx.padding_idx).unsqueeze(1).to(gq.dtype)
        dw = torch.zeros(ctx.num, g.shape[-1], dtype=g.dtype, device=g.device)
        dw.index_add_(0, flat, gq)  # the one-hot GEMM: FP32 accumulation of rounded gradient rows
        return None, dw, None, None


def embedding(idx: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, numerics: LayerNumerics) -> torch.Tensor:
    """``F.embedding(idx, weight, padding_idx)`` with the table rows rounded by ``forward.b`` and the
    incoming gradient rows by ``backward_weight.b``; the table gradient is summed in FP32."""
    return EmbeddingFunction.apply(idx, weight, padding_idx, numerics)
