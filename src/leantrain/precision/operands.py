"""Rounding of GEMM operands for one wrapped layer, by the policy's specs, with instrumentation.

:class:`LayerNumerics` is what an emulated layer holds: its name, the :class:`Policy`, an optional
:class:`Recorder` and the random generators for stochastic rounding. Its methods apply one
:class:`FloatSpec` or :class:`DFPSpec` to a tensor through the project's single rounding routine
(:func:`leantrain.numerics.quantize`, :func:`leantrain.numerics.to_dfp`) and run integer GEMMs
through :func:`leantrain.numerics.int_matmul`.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from leantrain.numerics import int_matmul, quantize, to_dfp
from leantrain.numerics.gathered_gemm import gathered_int_gemm, native_available
from leantrain.numerics.intmatmul import wrap_chunk_sums_t
from leantrain.numerics.rounding import native_cast_dtype
from leantrain.precision.instrument import Recorder
from leantrain.precision.policy import DFPSpec, FloatSpec, IntAccumulator, Policy

__all__ = ["RandomStreams", "LayerNumerics", "RoundedInputs", "OperandBuffers"]


class RandomStreams:
    """One ``torch.Generator`` per device for stochastic rounding, seeded from ``seed``.

    Stochastic rounding draws its uniforms from these generators, never from the global RNG, so an
    emulated run with ``bf16-sr`` consumes exactly the same global random numbers (dropout, data
    order) as an FP32 run, and its own stream is checkpointed by :meth:`state_dict`.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._gens: dict[str, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._gens:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._gens[key] = g
        return self._gens[key]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "states": {k: g.get_state() for k, g in self._gens.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._gens = {}
        for key, st in state["states"].items():
            self.get(torch.device(key)).set_state(st)


class RoundedInputs:
    """The forward operands rounded so far in one forward pass, so that a tensor that several GEMMs read with the
    same deterministic spec is rounded once: a block's input read by its first convolution and by its shortcut,
    the hidden states read by the query, key and value projections, a recurrent weight read at every time step,
    a tied weight. The result is the same tensor a second rounding would give (nearest and truncate are
    functions of the values), so sharing it changes no bit.

    An entry is keyed by the tensor object and its version counter (an in-place change misses) and holds the
    tensor, so its identity cannot be reused while the entry lives. At most ``size`` entries (the oldest are
    dropped); :meth:`clear` at the end of every forward pass (the owner's job) releases them."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: dict[tuple[int, int], tuple[torch.Tensor, int, torch.Tensor]] = {}

    def get(self, t: torch.Tensor, spec: FloatSpec) -> torch.Tensor | None:
        e = self._entries.get((id(t), id(spec)))
        if e is None or e[0] is not t or t.is_inference() or e[1] != t._version:
            return None
        return e[2]

    def put(self, t: torch.Tensor, spec: FloatSpec, q: torch.Tensor) -> None:
        if t.is_inference():  # no version counter: an in-place change could not be seen
            return
        if len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        # the spec object is kept alive by the policy that owns it, and the key holds the tensor itself
        self._entries[(id(t), id(spec))] = (t, t._version, q)

    def clear(self) -> None:
        self._entries.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {"size": self.size, "_entries": {}}  # run-time only


class OperandBuffers:
    """Float32 buffers reused for the rounded GEMM operands of CPU tensors, from one training step to the next.

    Why: every emulated GEMM creates rounded copies of its operands (X and W, saved for the backward GEMMs, and
    dY), about the size of the model's activations, freed again when the backward pass has used them. Taken from
    the C allocator at every step, that memory comes back from the operating system page by page (glibc returns
    the freed top of its heap), which measured as much as the rounding itself on a small CNN.

    A buffer is handed out as a fresh view and is free again once that view is gone: no autograd graph saves it
    any longer (the backward pass ran, or the graph was dropped) and no code holds it. Only code that never lets
    the view (or a view of it) escape to the caller may take one (``LayerNumerics.round(..., scratch=True)``).
    Per thread; at most ``per_shape`` buffers per shape and ``shapes`` shapes (least recently used dropped);
    beyond that the caller allocates as usual. CUDA tensors are never pooled (their allocator caches already,
    and a buffer read by a queued kernel must not be rewritten from another stream)."""

    def __init__(self, shapes: int = 64, per_shape: int = 32) -> None:
        self.shapes, self.per_shape = shapes, per_shape
        self._local = threading.local()

    def _state(self) -> tuple[dict[Any, list[list[Any]]], dict[torch.dtype, torch.Tensor]]:
        st = getattr(self._local, "state", None)
        if st is None:
            st = self._local.state = ({}, {})
        return st

    def take(self, shape: torch.Size) -> torch.Tensor | None:
        """A contiguous float32 CPU tensor of ``shape`` that nothing else references (or None: the pool is full)."""
        pools = self._state()[0]
        entries = pools.pop(shape, None)
        if entries is None:
            if len(pools) >= self.shapes:
                del pools[next(iter(pools))]
            entries = []
        pools[shape] = entries  # most recently used last
        for entry in entries:
            if entry[1]() is None:
                view = entry[0].view(shape)
                entry[1] = weakref.ref(view)
                return view
        if len(entries) >= self.per_shape:
            return None
        base = torch.empty(shape, dtype=torch.float32)
        view = base.view(shape)
        entries.append([base, weakref.ref(view)])
        return view

    def temporary(self, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        """A contiguous CPU tensor of ``dtype`` and ``shape`` for an intermediate that dies before the next call on
        this thread (one growing buffer per dtype)."""
        temps = self._state()[1]
        n = shape.numel()
        buf = temps.get(dtype)
        if buf is None or buf.numel() < n:
            buf = temps[dtype] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def __getstate__(self) -> dict[str, Any]:
        return {"shapes": self.shapes, "per_shape": self.per_shape}  # the buffers are run-time only

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["shapes"], state["per_shape"])  # type: ignore[misc]


def _pow2_scale(x: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """``2**floor(log2(fmt_max / amax))`` as a 0-dim float32 tensor (1 when amax is 0 or not finite)."""
    amax = x.detach().abs().amax().float()
    ok = torch.isfinite(amax) & (amax > 0)
    e = torch.floor(torch.log2(fmt_max / torch.where(ok, amax, torch.ones_like(amax))))
    # Clamp so that the scale itself is a normal float32 power of two.
    return torch.where(ok, torch.exp2(e.clamp(-126, 126)), torch.ones_like(amax))


@dataclass
class LayerNumerics:
    """The numerics of one emulated layer: ``name`` (its qualified module name), ``policy``,
    ``recorder`` (or None), ``streams`` (stochastic-rounding generators, shared by the model), ``inputs``
    (the forward operands rounded so far in the running forward pass, shared by the model's layers, or None) and
    ``buffers`` (reused memory for rounded operands, shared by the model's layers, or None)."""

    name: str
    policy: Policy
    recorder: Recorder | None = None
    streams: RandomStreams = field(default_factory=RandomStreams)
    training: bool = True
    inputs: RoundedInputs | None = None
    buffers: OperandBuffers | None = None

    def recording(self) -> bool:
        return self.training and self.recorder is not None and self.recorder.active

    def _gen(self, t: torch.Tensor, rounding: str) -> torch.Generator | None:
        return self.streams.get(t.device) if rounding == "stochastic" else None

    def round(self, t: torch.Tensor, spec: FloatSpec | DFPSpec | None, tensor: str, *,
              shared: RoundedInputs | None = None, scratch: bool = False) -> torch.Tensor:
        """``t`` rounded by ``spec`` as a float32 tensor of exactly representable values
        (``spec=None``: ``t`` itself; a DFP spec: ``mantissas * 2**exponent``).

        ``shared``: forward operands already rounded in this pass (:class:`RoundedInputs`), consulted and filled
        for deterministic float specs (nearest, truncate) while nothing is recorded (the recorder counts every
        rounding of every layer). ``scratch=True``: the caller only hands the result to GEMMs and to
        ``save_for_backward`` and never returns it (or a view of it), so it may live in one of ``buffers``
        (:class:`OperandBuffers`)."""
        if spec is None:
            return t
        if shared is not None and isinstance(spec, FloatSpec) and spec.rounding != "stochastic" \
                and not self.recording():
            q = shared.get(t, spec)
            if q is None:
                q = self.round(t, spec, tensor, scratch=scratch)
                shared.put(t, spec, q)
            return q
        if type(spec) is FloatSpec and spec.rounding == "nearest" and spec.scaling == "none" \
                and t.dtype == torch.float32 and not self.recording():
            dtype = native_cast_dtype(spec.format, t.device)
            if dtype is not None:
                # quantize's own native path, op for op (the same conversion kernel, the same contiguous layout),
                # without its argument checks: a GEMM rounds three tensors per call
                if torch.is_grad_enabled():
                    t = t.detach()
                if scratch and self.buffers is not None and t.device.type == "cpu":
                    out = self.buffers.take(t.shape)
                    if out is not None:
                        return out.copy_(self.buffers.temporary(dtype, t.shape).copy_(t))
                return t.contiguous().to(dtype).to(torch.float32)
        if isinstance(spec, DFPSpec):
            m, e = self.dfp(t, spec, tensor)
            return m if e == NONFINITE else ldexp(m, e)
        fmt = spec.format
        if spec.scaling == "tensor":
            s = _pow2_scale(t, fmt.max_normal)
            q = quantize(t * s, fmt, spec.rounding, generator=self._gen(t, spec.rounding)) / s
            if self.recording():
                s_val = float(s)
                self.recorder.observe(self.name, tensor, t, q, max_value=fmt.max_normal / s_val,  # type: ignore[union-attr]
                                      min_normal=fmt.min_normal / s_val if fmt.subnormals else None)
            return q
        q = quantize(t, fmt, spec.rounding, generator=self._gen(t, spec.rounding))
        if self.recording():
            self.recorder.observe(self.name, tensor, t, q, max_value=fmt.max_normal,  # type: ignore[union-attr]
                                  min_normal=fmt.min_normal if fmt.subnormals else None)
        return q

    def dfp(self, t: torch.Tensor, spec: DFPSpec, tensor: str) -> tuple[torch.Tensor, int]:
        """DFP conversion of ``t`` (:func:`leantrain.numerics.to_dfp`, one exponent per tensor): the integer
        mantissas held exactly in a float32 tensor (|m| < 2^24), and the shared exponent as a Python int
        (value = mantissa * 2**exponent).

        DFP has no encoding for Inf/NaN: a tensor containing them (a diverged step) gives NaN mantissas and
        the exponent :data:`NONFINITE`, and every GEMM it enters returns NaN (the step's gradients are NaN).
        """
        try:
            m, e = to_dfp(t.detach(), spec.bits, rounding=spec.rounding, generator=self._gen(t, spec.rounding))
        except ValueError:  # to_dfp refuses Inf/NaN (its other checks cannot fail here)
            return torch.full_like(t, float("nan"), dtype=torch.float32), NONFINITE
        mf = m.to(torch.float32)
        exp = int(e)
        if self.recording():
            q = ldexp(mf, exp)
            top = ldexp(torch.tensor(float((1 << (spec.bits - 1)) - 1)), exp).item()
            self.recorder.observe(self.name, tensor, t, q, max_value=top, min_normal=None, exponent=exp)  # type: ignore[union-attr]
        return mf, exp

    def _operand_bits(self) -> int:
        """The widest DFP mantissa (sign included) of the policy's GEMM inputs."""
        return max(s.bits for g in self.policy.gemms().values() for s in (g.a, g.b) if isinstance(s, DFPSpec))

    def wraps_exactly(self) -> bool:
        """Whether the integer GEMMs take the exact-chunk-sum path: a wrapping accumulator and operands of at most
        16 bits (DFP16 mantissas, |m| < 2^15), so that only the exact chunk sums matter (module doc of
        :mod:`leantrain.numerics.intmatmul`); saturating or raising accumulators need the event emulation."""
        acc = self.policy.accumulator
        if not isinstance(acc, IntAccumulator) or acc.overflow != "wrap" or acc.bits > 62:
            return False
        return self._operand_bits() <= 16

    def gathered_gemm(self, s: torch.Tensor, srow: torch.Tensor, scol: torch.Tensor, v: torch.Tensor, scale_exp: int,
                      gemm: str, *, vrow: torch.Tensor | None = None, n: int | None = None,
                      transpose_out: bool = False, into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                      accumulate: bool = False) -> torch.Tensor:
        """:func:`leantrain.numerics.gathered_gemm.gathered_int_gemm` rescaled by ``2**scale_exp``, with the policy's
        accumulator for GEMM ``gemm`` (requires :meth:`wraps_exactly`), instrumented: the convolution GEMMs without
        an im2col copy. Arguments as there; an operand that held Inf/NaN (``scale_exp`` = :data:`NONFINITE`) gives
        NaN results (the whole ``into`` buffer)."""
        acc = self.policy.accumulator
        assert isinstance(acc, IntAccumulator)
        nb = s.shape[0] if vrow is None else max(s.shape[0], v.shape[0])
        r, cols = srow.shape[0], (v.shape[1] if vrow is None else int(n))  # type: ignore[arg-type]
        if scale_exp >= NONFINITE // 2:  # an operand held Inf/NaN
            if into is not None:
                return into[0].fill_(float("nan"))
            shape = (nb, cols, r) if transpose_out else (nb, r, cols)
            return torch.full(shape, float("nan"), dtype=torch.float32, device=s.device)
        chunk = acc.chunk_for(gemm)
        # Unrecorded steps need no count, nor do chunks that cannot wrap by bound (the count is 0): int32 registers
        # wrap by themselves (the faster native kernel).
        count = self.recording() and not self.policy.wrap_free(gemm)
        out, bad = gathered_int_gemm(s, srow, scol, v, vrow=vrow, n=n, chunk=chunk, acc_bits=acc.bits,
                                     scale_exp=scale_exp, transpose_out=transpose_out, into=into, accumulate=accumulate,
                                     count_wraps=count)
        if self.recording():
            t = scol.shape[0]
            nch = -(-t // min(chunk or t, t)) if t else 0
            self.recorder.observe_accumulator(self.name, gemm, nch * nb * r * cols, bad or 0)  # type: ignore[union-attr]
        return out

    def int_gemm(self, a: torch.Tensor, b: torch.Tensor, scale_exp: int, gemm: str, *,
                 transposed: bool = False, b_transposed: bool = False) -> torch.Tensor:
        """``(a @ b) * 2**scale_exp`` for integer-valued float32 ``a`` (M, K) and ``b`` (K, N), the products
        accumulated exactly as the policy's :class:`IntAccumulator` does (:func:`leantrain.numerics.int_matmul`:
        chunks, overflow rule), the result rescaled to float32.

        ``transposed=True``: ``a`` holds A^T instead, as any tensor whose row-major element order is that of the
        (K, M) matrix A^T (e.g. a convolution's (C*k, N, L) view), which saves the transposing copy;
        ``b_transposed=True`` likewise for ``b``: B^T (N, K) in row-major order, with ``b.shape[0] == N``."""
        acc = self.policy.accumulator
        assert isinstance(acc, IntAccumulator)
        if b_transposed:
            n = b.shape[0]
            k = b.numel() // n if n else 0
        else:
            k, n = b.shape
        m = (a.numel() // k if k else 0) if transposed else a.shape[0]
        if scale_exp >= NONFINITE // 2:  # an operand held Inf/NaN
            return torch.full((m, n), float("nan"), dtype=torch.float32, device=a.device)
        # events=False: with wrap-around only the exact chunk sums matter (fast exact path of int_matmul);
        # the stats then count registers whose sum left the accumulator range (wrong results).
        chunk = acc.chunk_for(gemm)
        if self.wraps_exactly() and 0 < k < 2**23 and a.device.type == "cpu" and native_available():
            # the native pair kernel (gathered_int_gemm) reading A and B where they lie: A[m, k] at
            # m stride_m + k stride_k of its storage (A^T's row-major order when transposed)
            if transposed:
                flat, sm, sk = a.reshape(-1), 1, m
            elif a.is_contiguous() or not a.t().is_contiguous():
                flat, sm, sk = a.contiguous(), k, 1
            else:  # a transposed view, e.g. the output gradient's (O, batch)
                flat, sm, sk = a.t(), 1, m
            bmat = b.reshape(n, k).t() if b_transposed else b
            out = self.gathered_gemm(flat.reshape(1, -1), torch.arange(m, device=a.device) * sm,
                                     torch.arange(k, device=a.device) * sk, bmat, scale_exp, gemm)
            return out[0]
        if self.wraps_exactly() and 0 < k < 2**23:
            # int_matmul's fast wrap path itself, without the integer casts: DFP16 mantissas are integers with
            # |m| < 2^15, so K |a| |b| < 2^53 (its exactness condition) holds for K < 2^23.
            out, bad, _, nch = wrap_chunk_sums_t(a if transposed else a.t(), b, chunk or k, acc.bits, chunk is None,
                                                  b_transposed)
            if self.recording():
                self.recorder.observe_accumulator(self.name, gemm, nch * m * n, bad)  # type: ignore[union-attr]
            return ldexp(out.to(torch.float32), scale_exp)
        if transposed:
            a = a.reshape(k, m).t()
        if b_transposed:
            b = b.reshape(n, k).t()
        dt = torch.int16 if self._operand_bits() <= 16 else torch.int32
        out, stats = int_matmul(a.to(dt), b.to(dt), acc_bits=acc.bits, chunk=chunk,
                                overflow=acc.overflow, events=False)
        if self.recording():
            if stats.get("wrapped_outputs") is not None:
                regs, bad = stats["registers"], stats["wrapped_outputs"]
            else:  # saturate / error / wide operands: exact event emulation
                regs, bad = stats["accumulations"], stats["overflow_events"]
            self.recorder.observe_accumulator(self.name, gemm, regs, bad)  # type: ignore[union-attr]
        return ldexp(out.to(torch.float32), scale_exp)


NONFINITE = 1 << 40  # exponent marking a DFP tensor converted from Inf/NaN input


def ldexp(x: torch.Tensor, e: int) -> torch.Tensor:
    """``x * 2**e`` exactly (two power-of-two factors, so neither over- nor underflows float32 on its own)."""
    h = e // 2
    return x * (2.0 ** h) * (2.0 ** (e - h))
