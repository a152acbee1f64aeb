"""GEMM interception: every matrix product a model runs, whatever module or function issues it, goes through
the emulating autograd functions of :mod:`leantrain.precision.functions`.

Mechanism: a ``torch.overrides.TorchFunctionMode`` (:class:`GemmInterceptor`), active while the model's forward
runs (entered by a forward pre-hook, left by an always-called forward hook) or inside :func:`emulating`. It sees
the call at the level where the roles of the operands are still known (``F.linear(x, weight)``: X and W;
``q @ k.transpose(-2, -1)``: two activations) and routes it to an autograd function, which rounds the operands of
the forward GEMM and, in its backward, those of the two backward GEMMs (dY, and the saved X / W). The backward
pass therefore needs no mode. A ``TorchDispatchMode`` would see the backward GEMMs too, but below autograd, where
X, W and dY are indistinguishable; it is used only by the audit (:mod:`leantrain.precision.audit`), to find
GEMMs that escaped. Measured on 2 shared cores: a pass-through mode costs a few microseconds per torch call, about
5% of a small ResNet step; the rounding itself costs more. What keeps that cost down (all bit-identical to rounding
every operand into a new tensor): a forward operand read by several GEMMs of one forward pass is rounded once
(:class:`leantrain.precision.operands.RoundedInputs`), BF16/FP16 nearest-even is torch's verified cast called
directly, and the rounded copies of CPU tensors live in buffers reused from step to step
(:class:`leantrain.precision.operands.OperandBuffers`): allocated afresh, their pages came back from the operating
system at every step, which cost as much as the rounding.

Intercepted (everything else runs unchanged, in FP32):

- ``F.linear``, ``torch.matmul`` / ``@`` / ``mm`` / ``bmm`` / ``mv`` / ``dot`` / ``inner`` / ``vdot`` /
  ``linalg.multi_dot`` / ``chain_matmul``, ``addmm`` / ``baddbmm`` / ``addbmm`` / ``addmv`` (and their Tensor
  methods, in-place forms and ``out=``), ``einsum`` and ``tensordot`` (contracted pairwise, left to right, each
  pair as one batched GEMM), ``F.bilinear``;
- ``F.conv1d/2d/3d`` and ``F.conv_transpose1d/2d/3d`` (stride, padding including ``"same"``, dilation,
  output padding and groups passed through);
- ``F.scaled_dot_product_attention``: decomposed into ``S = Q K^T`` (a GEMM), ``S * scale``, the causal or given
  mask, softmax (FP32), dropout, and ``O = P V`` (a GEMM); ``nn.MultiheadAttention``
  (``F.multi_head_attention_forward``) runs its own code with the mode active, so its projections and attention
  GEMMs are seen;
- ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells (``torch._VF.lstm``/``gru``/``rnn_tanh``/``rnn_relu`` and
  the ``*_cell`` functions): decomposed into one input GEMM over all time steps per layer and direction, one
  recurrent GEMM per step (and the LSTM projection), gates in FP32;
- ``F.embedding`` (when the policy rounds embeddings).

GEMM kinds: ``"parameter"`` when an operand is an ``nn.Parameter`` (or a view of one); then that operand is W.
``"activation"`` when neither is (attention, DLRM interactions, a computed kernel): the first operand plays X,
the second W, and the policy's activation GEMM formats apply (:meth:`Policy.for_kind`). ``"embedding"``: a
lookup. Not emulated, with a clear error: packed RNN sequences, embeddings with ``max_norm``/``sparse``/
``scale_grad_by_freq``, DFP convolutions with 3-d kernels. Any GEMM inside a C++
operator leantrain does not route (``cdist``, ``conv_tbc``, a custom extension) runs FP32 and is reported by the
audit.
"""

from __future__ import annotations

import math
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from leantrain.precision.functions import BmmFunction, ConvFunction, ConvGeometry, EmbeddingFunction, LinearFunction
from leantrain.precision.operands import LayerNumerics

__all__ = ["GemmInterceptor", "GemmNumerics", "KINDS", "current_gemm"]

KINDS = ("parameter", "activation", "embedding")


@dataclass
class GemmNumerics(LayerNumerics):
    """:class:`LayerNumerics` of the GEMMs of one kind issued by one module: ``kind`` is ``"parameter"``,
    ``"activation"`` or ``"embedding"``; ``policy`` is already the policy of that kind."""

    kind: str = "parameter"


# ------------------------------------------------------------------ scope (read by the audit's dispatch mode)

_scope = threading.local()
# The audit's callback; process-wide, since autograd may run backward functions on its own device threads.
_counter: list[Callable[[GemmNumerics, tuple[str, ...]], None]] = []


def current_gemm() -> tuple[GemmNumerics, tuple[str, ...]] | None:
    """``(numerics, GEMMs)`` of the emulated function running on this thread (None outside one): every aten GEMM
    the audit sees while this is set is one leantrain issued on rounded operands."""
    st = getattr(_scope, "stack", None)
    return st[-1] if st else None


def _run(L: GemmNumerics, gemms: tuple[str, ...], fn: Callable[..., Any], *args: Any) -> Any:
    st = _scope.__dict__.setdefault("stack", [])
    st.append((L, gemms))
    if _counter:
        _counter[-1](L, gemms)
    try:
        # The operands are already rounded: no mode (ours or another) may route these GEMMs again.
        with torch._C.DisableTorchFunction():
            return fn(*args)
    finally:
        st.pop()


def _backward_gemms(ctx: Any, data: int | None, weight: int) -> tuple[str, ...]:
    need = ctx.needs_input_grad
    return ((("backward_data",) if data is not None and need[data] else ())
            + (("backward_weight",) if need[weight] else ()))


class _LinearG(LinearFunction):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, L: GemmNumerics) -> torch.Tensor:
        return _run(L, ("forward",), LinearFunction.forward, ctx, x, w, b, L)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _run(ctx.L, _backward_gemms(ctx, 0, 1), LinearFunction.backward, ctx, g)


class _ConvG(ConvFunction):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, L: GemmNumerics,
                geo: ConvGeometry) -> torch.Tensor:
        return _run(L, ("forward",), ConvFunction.forward, ctx, x, w, b, L, geo)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _run(ctx.L, _backward_gemms(ctx, 0, 1), ConvFunction.backward, ctx, g)


class _BmmG(BmmFunction):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, L: GemmNumerics) -> torch.Tensor:
        return _run(L, ("forward",), BmmFunction.forward, ctx, a, b, L)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _run(ctx.L, _backward_gemms(ctx, 0, 1), BmmFunction.backward, ctx, g)


class _EmbeddingG(EmbeddingFunction):
    @staticmethod
    def forward(ctx: Any, idx: torch.Tensor, w: torch.Tensor, padding_idx: int | None, L: GemmNumerics) -> torch.Tensor:
        return _run(L, ("forward",), EmbeddingFunction.forward, ctx, idx, w, padding_idx, L)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _run(ctx.L, _backward_gemms(ctx, None, 1), EmbeddingFunction.backward, ctx, g)


# ----------------------------------------------------------------------------------------- the mode

class GemmInterceptor(TorchFunctionMode):
    """Routes the GEMM functions listed in the module docstring to the emulating autograd functions.

    ``routing`` supplies ``numerics(kind) -> GemmNumerics`` (the numerics of the innermost running module for
    that kind of GEMM) and ``passthrough() -> bool`` (True inside a module left FP32 by ``allow_unsupported``):
    an :class:`leantrain.precision.Emulation`."""

    def __init__(self, routing: Any) -> None:
        super().__init__()
        self.routing = routing

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None) -> Any:
        # Every torch call of the forward pass comes here: the non-GEMMs leave after one dictionary lookup.
        handler = _HANDLERS.get(func)
        if handler is None or self.routing.passthrough():
            return func(*args, **(kwargs or {}))
        return handler(self, func, args, kwargs or {})

    def numerics(self, kind: str) -> GemmNumerics:
        return self.routing.numerics(kind)


def _bind(args: Sequence[Any], kwargs: dict, names: Sequence[str], defaults: dict) -> list[Any]:
    """Positional-or-keyword arguments of a torch function, in ``names`` order."""
    out = []
    for i, n in enumerate(names):
        if i < len(args):
            out.append(args[i])
        elif n in kwargs:
            out.append(kwargs[n])
        elif n in defaults:
            out.append(defaults[n])
        else:
            raise TypeError(f"missing argument {n!r}")
    return out


def _floats(*ts: Any) -> bool:
    """Whether the tensor operands are floating point (integer GEMMs pass through). Only float32 is emulated:
    the policies accumulate in FP32, so a float64 or float16 operand is a ValueError, not a silent FP32 GEMM."""
    fl = [t for t in ts if isinstance(t, torch.Tensor)]
    if not all(t.is_floating_point() for t in fl):
        return False
    for t in fl:
        if t.dtype != torch.float32:
            # ValueError, not TypeError: torch turns a TypeError raised under ``a @ b`` into NotImplemented
            raise ValueError(f"leantrain.precision emulates float32 models only (GEMMs accumulate in FP32), got a "
                            f"{t.dtype} operand; convert the model and inputs with .float()")
    return True


def _is_param(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


def _with_out(kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    out = kwargs.get("out")
    if out is None:
        return y
    with torch.no_grad():
        return out.copy_(y)


# ------------------------------------------------------------------------------- matrix products

def _matmul(m: GemmInterceptor, a: torch.Tensor, b: torch.Tensor, L: GemmNumerics | None = None) -> torch.Tensor:
    """``torch.matmul(a, b)`` (all its broadcasting rules) as one emulated GEMM. A 2-d parameter operand is W:
    ``A W`` is ``F.linear(A, W^T)``, ``W B`` is ``F.linear(B^T, W)^T``; otherwise the batch dimensions are
    broadcast and flattened into one batched GEMM (the broadcast's gradient is summed in FP32 by autograd)."""
    pa, pb = _is_param(a), _is_param(b)
    if L is None:
        L = m.numerics("parameter" if pa or pb else "activation")
    A = a.unsqueeze(0) if a.dim() == 1 else a
    B = b.unsqueeze(-1) if b.dim() == 1 else b
    if B.dim() == 2 and not (A.dim() == 2 and pa and not pb):
        y = _LinearG.apply(A, B.mT, None, L)
    elif A.dim() == 2:
        y = _LinearG.apply(B.mT, A, None, L).mT
    else:
        batch = A.shape[:-2]
        if batch == B.shape[:-2]:  # no broadcast (attention): torch.broadcast_shapes is slow Python
            A3, B3 = A.reshape(-1, *A.shape[-2:]), B.reshape(-1, *B.shape[-2:])
        else:
            batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
            A3 = A.expand(*batch, *A.shape[-2:]).reshape(-1, *A.shape[-2:])
            B3 = B.expand(*batch, *B.shape[-2:]).reshape(-1, *B.shape[-2:])
        y = _BmmG.apply(A3, B3, L).reshape(*batch, A.shape[-2], B.shape[-1])
    if a.dim() == 1:
        y = y.squeeze(-2)
    if b.dim() == 1:
        y = y.squeeze(-1)
    return y


def _h_matmul(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    a, b = args[0], (args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2", kwargs.get("vec"))))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _floats(a, b)):
        return func(*args, **kwargs)
    return _with_out(kwargs, _matmul(m, a, b))


def _h_rmatmul(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    return _h_matmul(m, torch.matmul, (args[1], args[0]), kwargs)


def _h_addmm(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    """``beta * input + alpha * (mat1 @ mat2)``, the sum over the batch for ``addbmm``; in-place forms write back.
    transformers' ``Conv1D`` (GPT-2) is ``addmm(bias, x, weight)``: an emulated linear with an FP32 bias add."""
    inp, m1, m2 = _bind(args, kwargs, ("input", "mat1", "mat2"), {})
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if len(args) > 3 or not _floats(inp, m1, m2):
        return func(*args, **kwargs)
    name = getattr(func, "__name__", "")
    if name in ("addmm", "addmm_") and inp.dim() == 1 and m2.dim() == 2 and beta == 1 and alpha == 1 \
            and _is_param(m2):
        y = _LinearG.apply(m1, m2.mT, inp, m.numerics("parameter"))
    else:
        y = _matmul(m, m1, m2)
        if name.startswith("addbmm"):
            y = y.sum(0)
        if alpha != 1:
            y = y * alpha
        if beta != 0:
            y = (inp if beta == 1 else inp * beta) + y
    if name.endswith("_"):
        return inp.copy_(y)
    return _with_out(kwargs, y)


def _h_addmv(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    inp, mat, vec = _bind(args, kwargs, ("input", "mat", "vec"), {})
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if not _floats(inp, mat, vec):
        return func(*args, **kwargs)
    y = _matmul(m, mat, vec)
    y = (y * alpha if alpha != 1 else y)
    y = y if beta == 0 else (inp if beta == 1 else inp * beta) + y
    return _with_out(kwargs, y)


def _h_multi_dot(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    ts = list(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else list(args)
    if not _floats(*ts):
        return func(*args, **kwargs)
    y = ts[0]
    for t in ts[1:]:
        y = _matmul(m, y, t)
    return _with_out(kwargs, y)


def _h_inner(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    a, b = args[0], (args[1] if len(args) > 1 else kwargs["other"])
    if not _floats(a, b):
        return func(*args, **kwargs)
    if a.dim() == 0 or b.dim() == 0:
        return func(*args, **kwargs)  # a scalar product: no reduction
    return _with_out(kwargs, _tensordot(m, a, b, [a.dim() - 1], [b.dim() - 1]))


# ------------------------------------------------------------------------------------ einsum

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _einsum_terms(eq: str, ops: Sequence[torch.Tensor]) -> tuple[list[str], str]:
    """Explicit subscripts (ellipses replaced by fresh letters, right-aligned) and the output subscript."""
    eq = eq.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        raise ValueError(f"einsum equation {eq!r} names {len(terms)} operands, got {len(ops)}")
    used = set(eq) - {".", ",", "-", ">"}
    fresh = [c for c in _LETTERS if c not in used]
    n_ell = max((t.dim() - len(s.replace("...", "")) for s, t in zip(terms, ops) if "..." in s), default=0)
    ell = "".join(fresh[:n_ell])
    full = []
    for s, t in zip(terms, ops):
        if "..." in s:
            k = t.dim() - len(s.replace("...", ""))
            s = s.replace("...", ell[n_ell - k:] if k else "")
        full.append(s)
    if arrow:
        out = out.replace("...", ell)
    else:
        counts: dict[str, int] = {}
        for s in full:
            for c in s:
                counts[c] = counts.get(c, 0) + 1
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    return full, out


def _contract2(m: GemmInterceptor, a: torch.Tensor, sa: str, b: torch.Tensor, sb: str,
               keep: set[str]) -> tuple[torch.Tensor, str]:
    """One pairwise contraction as a batched GEMM: letters in both and kept are batch, in both and not kept are
    contracted; letters in one operand only are its free dimensions (summed first when not kept)."""
    def reduce(t: torch.Tensor, s: str, other: str) -> tuple[torch.Tensor, str]:
        # repeated letters (diagonals) and letters needed nowhere else: a one-operand einsum, no GEMM
        uniq = "".join(dict.fromkeys(c for c in s if c in other or c in keep))
        if uniq != s:
            t = torch.einsum(f"{s}->{uniq}", t)
        return t, uniq

    a, sa = reduce(a, sa, sb)
    b, sb = reduce(b, sb, sa)
    batch = [c for c in sa if c in sb and c in keep]
    con = [c for c in sa if c in sb and c not in keep]
    left = [c for c in sa if c not in sb]
    right = [c for c in sb if c not in sa]
    size = {c: max(a.shape[sa.index(c)] if c in sa else 1, b.shape[sb.index(c)] if c in sb else 1)
            for c in sa + sb}
    A = a.permute([sa.index(c) for c in batch + left + con])
    B = b.permute([sb.index(c) for c in batch + con + right])
    A = A.expand(*[size[c] for c in batch], *A.shape[len(batch):])  # size-1 batch dimensions broadcast
    B = B.expand(*[size[c] for c in batch], *B.shape[len(batch):])
    nb, nl, nk, nr = (math.prod(size[c] for c in g) for g in (batch, left, con, right))
    y = _matmul(m, A.reshape(nb, nl, nk), B.reshape(nb, nk, nr), m.numerics(
        "parameter" if _is_param(a) or _is_param(b) else "activation"))
    return y.reshape([size[c] for c in batch + left + right]), "".join(batch + left + right)


def _einsum(m: GemmInterceptor, eq: str, ops: Sequence[torch.Tensor]) -> torch.Tensor:
    terms, out = _einsum_terms(eq, ops)
    if len(ops) == 1:
        return torch.einsum(f"{terms[0]}->{out}", ops[0])
    t, s = ops[0], terms[0]
    for i in range(1, len(ops)):
        later = set(out).union(*terms[i + 1:])
        t, s = _contract2(m, t, s, ops[i], terms[i], later)
    return torch.einsum(f"{s}->{out}", t) if s != out else t


def _h_einsum(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    eq, ops = args[0], args[1:]
    if len(ops) == 1 and isinstance(ops[0], list | tuple):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or len(ops) < 2 or not _floats(*ops):
        return func(*args, **kwargs)
    return _einsum(m, eq, ops)


def _tensordot(m: GemmInterceptor, a: torch.Tensor, b: torch.Tensor, da: Sequence[int], db: Sequence[int]) -> torch.Tensor:
    la, lb = _LETTERS[:a.dim()], list(_LETTERS[a.dim():a.dim() + b.dim()])
    for i, j in zip(da, db):
        lb[j % b.dim()] = la[i % a.dim()]
    sb = "".join(lb)
    out = "".join(c for c in la if c not in sb) + "".join(c for c in sb if c not in la)
    return _einsum(m, f"{la},{sb}->{out}", (a, b))


def _h_tensordot(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    a, b, dims = _bind(args, kwargs, ("a", "b", "dims"), {"dims": 2})
    if not _floats(a, b) or kwargs.get("out") is not None:
        return func(*args, **kwargs)
    if isinstance(dims, torch.Tensor):
        dims = dims.tolist()
    if isinstance(dims, int):
        da, db = list(range(a.dim() - dims, a.dim())), list(range(dims))
    else:
        da, db = ([d] if isinstance(d, int) else list(d) for d in dims)
    return _tensordot(m, a, b, da, db)


def _h_bilinear(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    x1, x2, w, bias = _bind(args, kwargs, ("input1", "input2", "weight", "bias"), {"bias": None})
    if not _floats(x1, x2, w, bias):
        return func(*args, **kwargs)
    y = _einsum(m, "...i,oij,...j->...o", (x1, w, x2))
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------- convolution

def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, list | tuple) else (int(v),) * n


def _conv_handler(nd: int, transposed: bool) -> Callable[..., Any]:
    names = (("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation") if transposed
             else ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
    defaults = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
    # ConvGeometry by the raw geometry arguments (stride, padding, ...) of a call, when they are hashable: an
    # nn.ConvNd passes the same tuples at every call
    geometries: dict[tuple[Any, ...], ConvGeometry] = {}

    def geometry(vals: dict[str, Any], x: torch.Tensor, w: torch.Tensor) -> tuple[ConvGeometry, torch.Tensor]:
        stride, dilation = _tuple(vals["stride"], nd), _tuple(vals["dilation"], nd)
        padding = vals["padding"]
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * nd
            else:  # "same": nn.ConvNd's split, the odd element on the high side
                total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
                lo = [t // 2 for t in total]
                if any(t % 2 for t in total):
                    pads = [p for i in reversed(range(nd)) for p in (lo[i], total[i] - lo[i])]
                    x = F.pad(x, pads)
                    padding = (0,) * nd
                else:
                    padding = tuple(lo)
        return ConvGeometry(stride, _tuple(padding, nd), dilation, transposed,
                            _tuple(vals.get("output_padding", 0), nd), int(vals["groups"])), x

    def handler(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
        bound = args if not kwargs and len(args) == len(names) else _bind(args, kwargs, names, defaults)
        x, w, b = bound[0], bound[1], bound[2]
        if not _floats(x, w, b):
            return func(*args, **kwargs)
        unbatched = x.dim() == nd + 1
        if unbatched:
            x = x.unsqueeze(0)
        key = tuple(bound[3:])
        try:
            geo = geometries.get(key)
        except TypeError:  # a list argument
            key, geo = None, None
        if geo is None:
            geo, x = geometry(dict(zip(names, bound)), x, w)
            if key is not None and not isinstance(key[1], str):  # "same" padding may pad x itself: not cached
                geometries[key] = geo
        L = m.numerics("parameter" if _is_param(w) else "activation")
        if nd == 3 and L.policy.forward.integer:
            raise ValueError(f"{'transposed ' if transposed else ''}conv3d cannot be emulated under the DFP policy "
                             f"{L.policy.name!r} (DFP convolutions: 1-d and 2-d, any groups); name the module in "
                             f"allow_unsupported to keep it FP32")
        y = _ConvG.apply(x, w, b, L, geo)
        return y.squeeze(0) if unbatched else y

    return handler


# ---------------------------------------------------------------------------------- embedding

def _h_embedding(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    idx, w, pad, max_norm, _, by_freq, sparse = _bind(args, kwargs, names, {
        "padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False})
    L = m.numerics("embedding")
    if not (L.policy.rounds and L.policy.embeddings) or not _floats(w):
        return func(*args, **kwargs)
    if max_norm is not None or by_freq or sparse:
        raise ValueError("F.embedding with max_norm, scale_grad_by_freq or sparse is not emulated; name the module "
                         "in allow_unsupported to keep it FP32, or use a policy with embeddings=False")
    if pad is not None and pad < 0:
        pad += w.shape[0]
    return _EmbeddingG.apply(idx, w, pad, L)


# ------------------------------------------------------------------------------------ attention

def _h_sdpa(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    q, k, v, mask, p, causal, scale, gqa = _bind(args, kwargs, names, {
        "attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
    if not _floats(q, k, v):
        return func(*args, **kwargs)
    L = m.numerics("activation")
    if gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    s = _matmul(m, q, k.transpose(-2, -1), L) * scale
    masked = causal or mask is not None
    if causal:
        s = s.masked_fill(~torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril(), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    pr = torch.softmax(s, -1)
    if masked:  # torch's reference gives 0, not NaN, for a row with every key masked
        pr = pr.masked_fill(torch.isneginf(s).all(-1, keepdim=True), 0.0)
    if p > 0:
        pr = F.dropout(pr, p)
    return _matmul(m, pr, v, L)


_UNDISPATCHED: dict[Any, tuple[Callable[..., Any], tuple[tuple[str, Any], ...]]] = {}
_ABSENT = object()


def _undispatched(func: Any) -> Callable[..., Any]:
    """``func`` (a Python function of torch that hands itself to the active mode via ``has_torch_function``)
    with that check off, so that its body runs with the mode active and every GEMM inside it is routed; a mode
    never sees the calls nested inside a function it handles otherwise. Built on a copy of its module's globals,
    kept while every global its code names is still the same object, so a later change to them (a patched
    ``F.scaled_dot_product_attention``) is seen."""
    src = func.__globals__
    hit = _UNDISPATCHED.get(func)
    if hit is not None and all(src.get(n, _ABSENT) is v for n, v in hit[1]):
        return hit[0]
    glb = dict(src)
    for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
        glb[name] = lambda *a: False
    f = types.FunctionType(func.__code__, glb, func.__name__, func.__defaults__, func.__closure__)
    f.__kwdefaults__ = func.__kwdefaults__
    _UNDISPATCHED[func] = (f, tuple((n, src.get(n, _ABSENT)) for n in func.__code__.co_names))
    return f


def _h_composite(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    with m:
        return _undispatched(func)(*args, **kwargs)


# ------------------------------------------------------------------------------- recurrent layers

def _cell(kind: str, gi: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, w_hh: torch.Tensor,
          b_hh: torch.Tensor | None, L: GemmNumerics) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One time step from the input GEMM ``gi`` (bias included) and the state: ATen's cell formulas, the
    recurrent GEMM emulated, gates and state updates FP32."""
    gh = _LinearG.apply(h, w_hh, b_hh, L)
    if kind == "lstm":
        i, f, g, o = (gh + gi).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if kind == "gru":
        ir, iz, inn = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(hr + ir), torch.sigmoid(hz + iz)
        n = torch.tanh(inn + hn * r)
        return (h - n) * z + n, None
    pre = gh + gi
    return (torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)), None


def _rnn_handler(kind: str) -> Callable[..., Any]:
    def handler(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
        if kwargs or len(args) != 9:
            raise TypeError(f"unexpected torch._VF.{kind} call signature")
        if isinstance(args[3], list | tuple):
            raise ValueError(f"packed sequences (nn.utils.rnn.PackedSequence) through {kind.upper()} are not "
                             "emulated; pass padded tensors, or name the module in allow_unsupported to keep it FP32")
        x, hx, params, has_b, layers, dropout, train, bidir, batch_first = args
        if not _floats(x, *params):
            return func(*args, **kwargs)
        L = m.numerics("parameter")
        dirs = 2 if bidir else 1
        per = len(params) // (layers * dirs)
        h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
        seq = x.transpose(0, 1) if batch_first else x
        hs, cs = [], []
        for layer in range(layers):
            outs = []
            for d in range(dirs):
                j = layer * dirs + d
                w = params[j * per:(j + 1) * per]
                b_ih, b_hh = (w[2], w[3]) if has_b else (None, None)
                w_hr = w[-1] if per in (3, 5) else None
                gi = _LinearG.apply(seq, w[0], b_ih, L)
                h, c = h0[j], (c0[j] if c0 is not None else None)
                steps = range(seq.shape[0]) if d == 0 else range(seq.shape[0] - 1, -1, -1)
                out: list[torch.Tensor] = [h] * seq.shape[0]
                for t in steps:
                    h, c = _cell(kind, gi[t], h, c, w[1], b_hh, L)
                    if w_hr is not None:
                        h = _LinearG.apply(h, w_hr, None, L)
                    out[t] = h
                outs.append(torch.stack(out))
                hs.append(h)
                cs.append(c)
            seq = torch.cat(outs, -1) if dirs == 2 else outs[0]
            if dropout and train and layer < layers - 1:
                seq = F.dropout(seq, dropout, True)
        y = seq.transpose(0, 1) if batch_first else seq
        if kind == "lstm":
            return y, torch.stack(hs), torch.stack(cs)  # type: ignore[arg-type]
        return y, torch.stack(hs)

    return handler


def _cell_handler(kind: str) -> Callable[..., Any]:
    def handler(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
        x, hx, w_ih, w_hh, b_ih, b_hh = _bind(args, kwargs, ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"),
                                              {"b_ih": None, "b_hh": None})
        if not _floats(x, w_ih, w_hh):
            return func(*args, **kwargs)
        L = m.numerics("parameter")
        gi = _LinearG.apply(x, w_ih, b_ih, L)
        if kind == "lstm":
            return _cell(kind, gi, hx[0], hx[1], w_hh, b_hh, L)
        return _cell(kind, gi, hx, None, w_hh, b_hh, L)[0]

    return handler


# ------------------------------------------------------------------------------------- the table

def _handlers() -> dict[Any, Callable[..., Any]]:
    T = torch.Tensor
    table: dict[Any, Callable[..., Any]] = {F.linear: lambda m, f, a, k: _h_linear(m, f, a, k)}
    for f in (torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.bmm, T.bmm, torch.mv, T.mv,
              torch.dot, T.dot, torch.vdot, T.vdot):
        table[f] = _h_matmul
    table[T.__rmatmul__] = _h_rmatmul
    for f in (torch.addmm, T.addmm, T.addmm_, torch.baddbmm, T.baddbmm, T.baddbmm_, torch.addbmm, T.addbmm,
              T.addbmm_):
        table[f] = _h_addmm
    for f in (torch.addmv, T.addmv):
        table[f] = _h_addmv
    for f in (torch.linalg.multi_dot, torch.chain_matmul):
        table[f] = _h_multi_dot
    for f in (torch.inner, T.inner):
        table[f] = _h_inner
    table[torch.einsum] = _h_einsum
    table[torch.tensordot] = _h_tensordot
    table[F.bilinear] = _h_bilinear
    for nd in (1, 2, 3):
        table[getattr(F, f"conv{nd}d")] = _conv_handler(nd, False)
        table[getattr(F, f"conv_transpose{nd}d")] = _conv_handler(nd, True)
    table[F.embedding] = _h_embedding
    table[F.scaled_dot_product_attention] = _h_sdpa
    table[F.multi_head_attention_forward] = _h_composite
    for kind in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        table[getattr(torch._VF, kind)] = _rnn_handler(kind)
        table[getattr(torch._VF, f"{kind}_cell")] = _cell_handler(kind)
    return table


def _h_linear(m: GemmInterceptor, func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    x, w, b = _bind(args, kwargs, ("input", "weight", "bias"), {"bias": None})
    if not _floats(x, w, b):
        return func(*args, **kwargs)
    return _LinearG.apply(x, w, b, m.numerics("parameter" if _is_param(w) or _is_param(x) else "activation"))


_HANDLERS = _handlers()

