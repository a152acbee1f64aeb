"""Integer GEMM with a gathered operand and chunked narrow accumulators: the convolution lowering of DFP training.

For a batch of flat integer-valued storages ``s[b]``, offset tables ``srow`` (R,) and ``scol`` (T,) and an
integer-valued matrix ``v`` (T, N), :func:`gathered_int_gemm` computes, exactly::

    A_b[r, t] = s[b, srow[r] + scol[t]]                        (the gathered operand, never materialised natively)
    S_bj[r, n] = sum over t in chunk j of A_b[r, t] * v[t, n]   (chunk j = t in [j c, (j+1) c), c = chunk)
    out[b, r, n] = fp32(wrap(S_b0)) (+) fp32(wrap(S_b1)) (+) ...  (float32 additions, in chunk order)

where ``wrap`` is two's-complement wrap-around into ``[-2^(acc_bits-1), 2^(acc_bits-1) - 1]``, ``fp32`` rounds to
nearest even, and ``chunk=None`` is one chunk over all of T (the register itself, converted to float32). This is
:func:`leantrain.numerics.int_matmul`'s chunked wrap semantics (``events=False``) for the matrix ``A_b``, bit for
bit. The separable addressing ``srow[r] + scol[t]`` expresses im2col without building it: for a convolution with
a zero-padded input ``X`` (C, Hp, Wp), output position ``p = (oh, ow)`` and reduction index ``k = (c, i, j)``,
``srow[p] = oh s_h Wp + ow s_w`` and ``scol[k] = c Hp Wp + i d_h Wp + j d_w``; the backward GEMMs are the same with
the roles of the tables exchanged.

Exactness: operands are integers with ``|x| < 2^15`` (DFP16 mantissas), so every product is below ``2^30`` and
every partial sum of a chunk below ``T 2^30 < 2^53`` (``T < 2^23``, checked): float64 holds them exactly in any
summation order. Only the float32 chain across chunks is order-sensitive, and both backends do it in chunk order.

Backends (the same results, bit for bit; tested against each other and against int64 references):

- native: a C kernel (:mod:`leantrain.numerics.native`: compiled on first use, cached, run on torch's OpenMP
  threads, ``torch.get_num_threads()``).
  It keeps each chunk's registers in CPU registers, so the ``T/c`` partial sums per output never reach memory, and
  gathers its operand through the offset tables, so im2col is never built. CPU tensors only.
- torch: gathers ``A`` (like ``unfold``) and runs the tiled batched float64 GEMM of ``int_matmul``'s fast path.
  Used on other devices, when no C compiler works, or when ``LEANTRAIN_NATIVE=0``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from leantrain.numerics.intmatmul import wrap_chunk_sums_t
from leantrain.numerics.native import GEMM_BLOCKS, native_available, native_library

__all__ = ["gathered_int_gemm", "native_available"]

_pool: ThreadPoolExecutor | None = None

def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="leantrain-gemm")
    return _pool


def _check(s: torch.Tensor, srow: torch.Tensor, scol: torch.Tensor, v: torch.Tensor, vrow: torch.Tensor | None,
           n: int | None, chunk: int | None, acc_bits: int) -> None:
    for name, t in (("s", s), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor of integer values")
    for name, t in (("srow", srow), ("scol", scol), ("vrow", vrow)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1):
            raise TypeError(f"{name} must be a 1-d int64 torch.Tensor")
    if s.dim() != 2:
        raise ValueError(f"s must be (B, storage), got shape {tuple(s.shape)}")
    if vrow is None:
        if v.dim() != 2 or v.shape[0] != scol.shape[0]:
            raise ValueError(f"v must be (T, N) with T = len(scol) = {scol.shape[0]}, got shape {tuple(v.shape)}")
    else:
        if v.dim() != 2 or vrow.shape[0] != scol.shape[0]:
            raise ValueError(f"with vrow, v must be (B, storage) and len(vrow) = len(scol) = {scol.shape[0]}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"with vrow, n (the number of columns) must be an int >= 0, got {n!r}")
        if s.shape[0] != v.shape[0] and 1 not in (s.shape[0], v.shape[0]):
            raise ValueError(f"s and v batch sizes must agree or be 1, got {s.shape[0]} and {v.shape[0]}")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    if not isinstance(acc_bits, int) or not 2 <= acc_bits <= 62:
        raise ValueError(f"acc_bits must be an int in 2..62, got {acc_bits!r}")
    if scol.shape[0] >= 2**23:
        raise ValueError(f"the reduction length T = {scol.shape[0]} must be below 2^23 for exact float64 sums")


def gathered_int_gemm(s: torch.Tensor, srow: torch.Tensor, scol: torch.Tensor, v: torch.Tensor, *,
                      vrow: torch.Tensor | None = None, n: int | None = None, chunk: int | None, acc_bits: int = 32,
                      scale_exp: int = 0, transpose_out: bool = False,
                      into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, accumulate: bool = False,
                      count_wraps: bool = True, native: bool | None = None) -> tuple[torch.Tensor, int | None]:
    """``out[b, r, j]`` of the module doc: chunked narrow-accumulator GEMM of ``A_b[r, t] = s[b, srow[r] + scol[t]]``
    and ``V_b``, exact.

    Args:
        s: (B or 1, storage) float tensor holding integers with ``|x| < 2^15`` (not checked: the caller's DFP
            mantissas); a batch of 1 is shared by every ``b``.
        srow: (R,) int64 offsets; scol: (T,) int64 offsets; every ``srow[r] + scol[t]`` must index ``s[b]``
            (the caller's geometry guarantees it; not checked per element).
        v: the second operand, integers with ``|x| < 2^15``: a (T, N) matrix shared by every ``b``, or, with
            ``vrow``, (B or 1, storage) flat storages with ``V_b[t, j] = v[b, vrow[t] + j]`` for ``j < n``.
        vrow: (T,) int64 row offsets into ``v`` (see ``v``); n: the number of columns with ``vrow``.
        chunk: chunk length along T, or None (one register per output).
        acc_bits: register width (wrap-around modulo ``2^acc_bits``).
        scale_exp: the result is rescaled by ``2^scale_exp`` as ``(out * f1) * f2`` in float32, with ``f1 = 2^h``,
            ``f2 = 2^(scale_exp - h)``, ``h = floor(scale_exp / 2)`` rounded to float32 (DFP's exponent; exact
            unless the result leaves the normal float32 range).
        transpose_out: return (B, N, R) instead of (B, R, N) (both contiguous).
        into: ``(buffer, orow, ocol)``: write result ``[b, r, n]`` to ``buffer[b, orow[r] + ocol[n]]`` instead
            (``buffer`` a contiguous float32 (B, storage) tensor, returned); for each ``r`` the ``n`` addresses
            must be distinct. ``accumulate=True`` adds instead of writing, row by row in increasing ``r`` (so
            an element's contributions are summed in float32 in that order: the col2im of a convolution's
            backward-data GEMM, in ``F.fold``'s order).
        count_wraps: count the wrapped registers. ``False`` lets the native kernel use its pair kernel (when
            ``acc_bits <= 32``: int16 operands, two products per instruction into int32 registers, which wrap by
            themselves; several times faster); ``wrapped`` is then None.
        native: force (True) or forbid (False) the native kernel; None uses it when available for CPU tensors.

    Returns:
        ``(out float32, wrapped)``: ``wrapped`` counts registers (outputs x chunks) whose exact sum left the
        register's range, i.e. whose wrapped value differs from the exact one (None without ``count_wraps``).
    """
    _check(s, srow, scol, v, vrow, n, chunk, acc_bits)
    dev = s.device
    if vrow is None:
        nb, n_ = s.shape[0], v.shape[1]
    else:
        nb, n_ = max(s.shape[0], v.shape[0]), int(n)  # type: ignore[arg-type]
    r_, t_ = srow.shape[0], scol.shape[0]
    shape = (nb, n_, r_) if transpose_out else (nb, r_, n_)
    if into is not None:
        buf, orow, ocol = into
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.float32 or buf.dim() != 2 or buf.shape[0] != nb \
                or not buf.is_contiguous():
            raise ValueError(f"into[0] must be a contiguous float32 (B={nb}, storage) tensor")
        if orow.shape != (r_,) or ocol.shape != (n_,) or orow.dtype != torch.int64 or ocol.dtype != torch.int64:
            raise ValueError(f"into's offset tables must be int64 of lengths R={r_} and N={n_}")
    if nb == 0 or r_ == 0 or n_ == 0 or t_ == 0:
        if into is not None:
            if not accumulate:
                into[0].view(nb, -1)[:, (into[1].unsqueeze(1) + into[2].unsqueeze(0)).reshape(-1)] = 0.0
            return into[0], (0 if count_wraps else None)
        return torch.zeros(shape, dtype=torch.float32, device=dev), (0 if count_wraps else None)
    use_native = dev.type == "cpu" and v.device.type == "cpu" and (native is not False) and native_available()
    if native and not use_native:
        raise ValueError("native=True but the native kernel is unavailable (CPU tensors and a C compiler are needed)")
    c = t_ if chunk is None else min(chunk, t_)
    lo, hi = -(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1) - 1
    h = scale_exp // 2
    f1, f2 = 2.0**h, 2.0 ** (scale_exp - h)
    if not use_native:
        out, count = _torch_path(s, srow, scol, v, vrow, nb, n_, c, acc_bits, chunk is None)
        wrapped = count if count_wraps else None
        out = out * f1 * f2  # float32 tensor times Python floats: float32 products, as the kernel's
        if into is None:
            return (out.transpose(1, 2).contiguous() if transpose_out else out.contiguous()), wrapped
        buf, orow, ocol = into
        for r in range(r_):  # row by row: each row's addresses are distinct, rows in increasing r
            idx = orow[r] + ocol
            if accumulate:
                buf[:, idx] += out[:, r]
            else:
                buf[:, idx] = out[:, r]
        return buf, wrapped
    if not count_wraps and acc_bits <= 32:
        return _pair_native(s, srow, scol, v, vrow, nb, r_, n_, t_, c, acc_bits, f1, f2, shape, transpose_out, into,
                            accumulate), None
    name = "lt_gathered_gemm_n8" if n_ <= 8 else "lt_gathered_gemm_n16"
    dt, extra = torch.float64, (float(lo), float(hi), float(2**acc_bits))
    vb = GEMM_BLOCKS[name][1]
    vn = -(-n_ // vb) * vb  # columns rounded up to whole vector blocks
    s64 = s.to(dt).contiguous()
    s_batch = s64.shape[1] if s64.shape[0] > 1 else 0
    if vrow is None:  # a (T, N) matrix: rows padded to whole vector blocks with zeros
        v64 = torch.zeros(t_, vn, dtype=dt)
        v64[:, :n_] = v
        vrow_c = torch.arange(t_, dtype=torch.int64) * vn
        v_batch = 0
    else:  # flat storages, padded at the end: the kernel reads whole vector blocks past column n
        v64 = torch.zeros(v.shape[0], v.shape[1] + vb, dtype=dt)
        v64[:, :v.shape[1]] = v
        vrow_c = vrow.contiguous()
        v_batch = v64.shape[1] if v64.shape[0] > 1 else 0
    out, orow_c, ocol_c, o_batch = _out_tables(shape, transpose_out, into, r_, n_)
    fn = getattr(native_library(), name)
    args = (s64.data_ptr(), s_batch, srow.contiguous().data_ptr(), scol.contiguous().data_ptr(), v64.data_ptr(),
            v_batch, vrow_c.data_ptr(), out.data_ptr(), o_batch, orow_c.data_ptr(), ocol_c.data_ptr(),
            int(accumulate), f1, f2)
    return out, _launch(fn, args, (t_, vn, n_, c, *extra), nb, r_)


def _out_tables(shape: tuple[int, int, int], transpose_out: bool,
                into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, r_: int,
                n_: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The kernels' output: (buffer, orow, ocol, batch stride), a new (B, R, N) or (B, N, R) tensor or ``into``."""
    if into is not None:
        return into[0], into[1].contiguous(), into[2].contiguous(), into[0].shape[1]
    ar = lambda m: torch.arange(m, dtype=torch.int64)  # noqa: E731
    orow, ocol = (ar(r_), ar(n_) * r_) if transpose_out else (ar(r_) * n_, ar(n_))
    return torch.empty(shape, dtype=torch.float32), orow, ocol, r_ * n_


def _launch(fn: object, args: tuple, tail: tuple, nb: int, r_: int) -> int:
    """Run a kernel driver over the batch on OpenMP threads (or Python threads without OpenMP); its summed count."""
    workers = max(1, torch.get_num_threads())
    if native_library().lt_has_openmp() or workers == 1 or nb == 1:  # type: ignore[union-attr]
        counts = [fn(*args, 0, nb, r_, *tail)]  # type: ignore[operator]
    else:  # no OpenMP in this build: split the batch over Python threads (ctypes releases the GIL)
        cuts = [nb * i // workers for i in range(workers + 1)]
        jobs = [_executor().submit(fn, *args, cuts[i], cuts[i + 1], r_, *tail)  # type: ignore[arg-type]
                for i in range(workers) if cuts[i] < cuts[i + 1]]
        counts = [j.result() for j in jobs]
    if min(counts) < 0:
        raise MemoryError("gathered_int_gemm: the native kernel could not allocate its row buffer")
    return int(sum(counts))


def _pair_native(s: torch.Tensor, srow: torch.Tensor, scol: torch.Tensor, v: torch.Tensor, vrow: torch.Tensor | None,
                 nb: int, r_: int, n_: int, t_: int, c: int, acc_bits: int, f1: float, f2: float,
                 shape: tuple[int, int, int], transpose_out: bool,
                 into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, accumulate: bool) -> torch.Tensor:
    """The wrapping register model (``acc_bits <= 32``, nothing counted) in the native pair kernel (``native.c``).

    The reduction is laid out in pairs, chunk by chunk: chunk ``j`` (indices ``[j c, min((j+1) c, T))``) becomes
    ``cp = ceil(c / 2)`` pairs ``(j c + 2i, j c + 2i + 1)``; a missing second index (odd chunk, short last chunk)
    gets a zero in the second operand, so it adds nothing. The second operand is packed as int16 pairs
    ``(B or 1, pairs, Vn, 2)`` (columns padded with zeros to the kernel's vector width), the gathered one as int16.
    """
    lib = native_library()
    lanes = int(lib.lt_pair_lanes())  # type: ignore[union-attr]
    vn = -(-n_ // lanes) * lanes
    if vrow is None:  # (T, N) shared by the batch
        rows = v.unsqueeze(0)
    elif t_ == 1 or bool((vrow[1:] - vrow[:-1] == vrow[1] - vrow[0]).all()) and int(vrow[1] - vrow[0]) >= n_:
        # evenly spaced rows (a convolution's output gradient, one row per channel): a strided view, no gather
        step = int(vrow[1] - vrow[0]) if t_ > 1 else n_
        rows = v.as_strided((v.shape[0], t_, n_), (v.stride(0), step, 1), v.storage_offset() + int(vrow[0]))
    else:  # V_b[t, n] = v[b, vrow[t] + n]
        rows = v[:, vrow.unsqueeze(1) + torch.arange(n_, dtype=torch.int64).unsqueeze(0)]
    if -(-t_ // c) == 1:
        c = t_ + t_ % 2  # one chunk: a zero product at the end changes nothing
    if c % 2 == 0:  # pairs (2i, 2i + 1) never straddle a chunk: strided copies, T padded with one zero if odd
        cp, npair = c // 2, (t_ + 1) // 2
        vp = torch.zeros(rows.shape[0], npair, vn, 2, dtype=torch.int16)
        vp[:, :, :n_, 0] = rows[:, 0::2]
        vp[:, :t_ // 2, :n_, 1] = rows[:, 1::2]
        sca = scol[0::2].contiguous()
        scb = torch.cat([scol[1::2], scol[-1:]]) if t_ % 2 else scol[1::2].contiguous()
    else:
        cp = (c + 1) // 2
        nch = -(-t_ // c)
        j = torch.arange(nch, dtype=torch.int64).repeat_interleave(cp)
        ta = j * c + 2 * torch.arange(cp, dtype=torch.int64).repeat(nch)
        end = torch.clamp((j + 1) * c, max=t_)
        has_a, has_b = ta < end, ta + 1 < end
        ta = torch.where(has_a, ta, 0)
        tb = torch.where(has_b, ta + 1, ta)
        vp = torch.zeros(rows.shape[0], ta.shape[0], vn, 2, dtype=torch.int16)
        vp[:, :, :n_, 0] = rows[:, ta] * has_a.unsqueeze(1)
        vp[:, :, :n_, 1] = rows[:, tb] * has_b.unsqueeze(1)
        sca, scb = scol[ta].contiguous(), scol[tb].contiguous()
    s16 = s.to(torch.int16).contiguous()
    out, orow_c, ocol_c, o_batch = _out_tables(shape, transpose_out, into, r_, n_)
    args = (s16.data_ptr(), s16.shape[1] if s16.shape[0] > 1 else 0, srow.contiguous().data_ptr(), sca.data_ptr(),
            scb.data_ptr(), vp.data_ptr(), vp[0].numel() if vp.shape[0] > 1 else 0, out.data_ptr(), o_batch,
            orow_c.data_ptr(), ocol_c.data_ptr(), int(accumulate), f1, f2)
    _launch(lib.lt_pair_gemm, args, (sca.shape[0], vn, n_, cp, 32 - acc_bits), nb, r_)  # type: ignore[union-attr]
    return out


def _torch_path(s: torch.Tensor, srow: torch.Tensor, scol: torch.Tensor, v: torch.Tensor, vrow: torch.Tensor | None,
                nb: int, n_: int, c: int, acc_bits: int, one_register: bool) -> tuple[torch.Tensor, int]:
    """The same computation with the operands gathered (like im2col) and int_matmul's tiled float64 GEMM."""
    a_t = s[:, srow.unsqueeze(0) + scol.unsqueeze(1)]  # (Bs, T, R): A_b^T
    r_ = srow.shape[0]
    if vrow is None:
        vs = v.unsqueeze(0)
    else:
        vs = v[:, vrow.unsqueeze(1) + torch.arange(n_, device=v.device).unsqueeze(0)]  # (Bv, T, N)
    if vs.shape[0] == 1:  # one V for the whole batch: a single GEMM over every (b, r)
        out, wrapped, _, _ = wrap_chunk_sums_t(a_t.transpose(0, 1), vs[0], c, acc_bits, one_register)
        out = out.reshape(a_t.shape[0], r_, n_).expand(nb, r_, n_)
    else:
        outs, wrapped = [], 0
        for b in range(nb):
            o, w, _, _ = wrap_chunk_sums_t(a_t[b if a_t.shape[0] > 1 else 0], vs[b], c, acc_bits, one_register)
            outs.append(o)
            wrapped += w
        out = torch.stack(outs)
    return out, wrapped
