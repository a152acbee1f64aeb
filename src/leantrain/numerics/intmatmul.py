"""Integer GEMM with a narrow accumulator, emulated exactly; DFP matmul on top of it.

Accumulation model (what :func:`int_matmul` emulates, bit for bit):

- ``C[m, n]`` is accumulated in a two's-complement register of ``acc_bits`` bits, range
  ``[lo, hi] = [-2^(acc_bits-1), 2^(acc_bits-1) - 1]``, starting at 0.
- The products ``p_k = a[m, k] * b[k, n]`` are exact (an INT16 x INT16 product always fits INT32) and are
  added **sequentially in increasing k** (within each chunk, see below): ``acc <- acc (+) p_k``.
- ``(+)`` on leaving the range: ``"wrap"``: modulo ``2^acc_bits`` (what integer hardware does silently);
  ``"saturate"``: clamp to ``[lo, hi]`` at that addition; ``"error"``: raise ``OverflowError``.
- An *overflow event* is one addition whose exact value ``acc + p_k`` lies outside ``[lo, hi]``;
  ``stats["overflow_events"]`` counts them, ``stats["overflowed_outputs"]`` counts accumulators (outputs
  x chunks) with at least one event.
- ``chunk=c`` splits k into consecutive chunks of ``c`` (the last may be shorter). Each chunk is accumulated
  in its own narrow register from 0; the chunk results are converted to float32 (round to nearest even)
  and summed in float32 in increasing chunk order: ``((r_0 + r_1) + r_2) + ...``. This is the INT16
  paper's remedy for INT32 overflow. Without ``chunk`` the result is the integer register itself.

Safe chunk lengths: if ``|a| <= A`` and ``|b| <= B`` every partial sum of ``c`` products is at most ``c A B``
in magnitude, so no overflow can occur when ``c * A * B <= 2^(acc_bits-1) - 1``: :func:`safe_chunk`.
For symmetric ``bits``-bit operands (``A = B = 2^(bits-1) - 1``, as DFP produces) and a 32-bit register:
INT16 -> c = 2, INT12 -> 512, INT8 -> 133144. Real data is far from this worst case; the stats show how often
overflow actually happens.

Fast path (``events=False``, ``overflow="wrap"``): a wrapping register ends at ``wrap(exact chunk sum)`` whatever
happens on the way (two's-complement addition is associative modulo ``2^acc_bits``), so only the exact chunk
sums are needed, not the sequence of partial sums. For operands with ``|a|, |b| < 2^15`` (DFP16 mantissas)
they come from one batched float64 GEMM over the chunks, exactly: every product and every partial sum, in any
summation order, is an integer below ``K max|a| max|b| < 2^53`` (checked). The GEMM is solved transposed,
``(chunks, N, c) @ (chunks, c, M)``, tile by tile over the outputs (a bounded buffer); a tile whose sums all lie in
range (one ``aminmax``) needs no remainder. The wrapped registers are then rounded to float32 and summed in
float32 in chunk order, the same float32 additions per output as the register-by-register emulation.
``stats["wrapped_outputs"]`` then counts registers whose exact sum left the range (their
result wrapped, i.e. is wrong); transient excursions that come back into range are harmless under wrap and
are not counted (``overflow_events`` is None). Otherwise (``events=True``, the default) the exact
emulation below runs.

Implementation: exact sums come from a float64 GEMM (exact while ``K A B < 2^53``). A pre-check with exact
float64 GEMMs over segments of 32 along k bounds every partial sum; only outputs with a possible overflow are
emulated: exact int64 prefix sums ``S_k`` and the wrap count ``w_k = floor((S_k - lo) / 2^acc_bits)``; the
wrapped register is ``S_k - w_k 2^acc_bits`` and step k overflows exactly when ``w_k != w_(k-1)``. Saturation
is order-dependent: outputs whose exact prefix sums leave the range are clamped step by step.
"""

from __future__ import annotations

from typing import Any

import torch

from leantrain.numerics.dfp import check_bits, from_dfp, ldexp, to_dfp

__all__ = ["int_matmul", "dfp_matmul", "safe_chunk", "OVERFLOW_MODES", "wrap_chunk_sums_t"]

OVERFLOW_MODES = ("wrap", "saturate", "error")
# Candidate outputs emulated per batch: bounds the (outputs x K) int64 prefix-sum buffer to 32 MiB.
_EMULATE_ELEMENTS = 1 << 22


def safe_chunk(a_max: int, b_max: int, acc_bits: int = 32) -> int:
    """Largest chunk length ``c`` with ``c * a_max * b_max <= 2^(acc_bits-1) - 1`` (no overflow possible).

    ``a_max``, ``b_max``: bounds on the operands' magnitudes, e.g. ``2^(bits-1) - 1`` for symmetric
    ``bits``-bit integers. Returns at least 1 (a single product must fit the register: checked).
    """
    if a_max < 0 or b_max < 0:
        raise ValueError(f"a_max and b_max must be >= 0, got {a_max}, {b_max}")
    hi = 2 ** (acc_bits - 1) - 1
    prod = a_max * b_max
    if prod > hi:
        raise ValueError(f"a single product {a_max}*{b_max} does not fit a {acc_bits}-bit accumulator")
    return hi // prod if prod else 2**62


def _check_int(t: object, arg: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{arg} must be an integer tensor, got dtype {t.dtype}")
    return t


# Segment length of the overflow pre-check: a prefix sum inside segment j is within sum_seg |p| of the
# exact boundary sum S_(j-1), so outputs with max_j |S_(j-1)| + sum_seg_j |p| <= hi cannot overflow.
_SEGMENT = 32


def _may_overflow(a64: torch.Tensor, b64: torch.Tensor, hi: int) -> torch.Tensor:
    """(M, N) bool: outputs whose partial sums might leave [-hi-1, hi] (conservative, exact float64 GEMMs)."""
    m, k = a64.shape
    n = b64.shape[1]
    nseg = -(-k // _SEGMENT)
    pad = nseg * _SEGMENT - k
    if pad:
        a64 = torch.nn.functional.pad(a64, (0, pad))
        b64 = torch.nn.functional.pad(b64, (0, 0, 0, pad))
    aseg = a64.reshape(m, nseg, _SEGMENT).transpose(0, 1)  # (nseg, M, L)
    bseg = b64.reshape(nseg, _SEGMENT, n)  # (nseg, L, N)
    seg_sum = torch.bmm(aseg, bseg)
    seg_abs = torch.bmm(aseg.abs(), bseg.abs())
    before = torch.cumsum(seg_sum, dim=0) - seg_sum  # exact boundary prefix S_(j-1)
    return ((before.abs() + seg_abs) > hi).any(dim=0)


def _accumulate(a: torch.Tensor, b: torch.Tensor, acc_bits: int, overflow: str) -> tuple[torch.Tensor, ...]:
    """One register per output over all of k: returns (register int64 (M, N), events (M, N), exact sum (M, N)).

    Outputs with a possible overflow are emulated: products (c, K), exact prefix sums S_k in int64, and the
    wrap count w_k = floor((S_k - lo) / 2^acc_bits). The wrapped register after step k is S_k - w_k 2^acc_bits,
    and step k overflows exactly when w_k != w_(k-1) (w_(-1) = 0). Saturation is order-dependent, so outputs
    whose exact prefix sums leave the range are clamped step by step.
    """
    lo, hi = -(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1) - 1
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    exact = (a64 @ b64).to(torch.int64)
    reg = exact.clone()
    events = torch.zeros_like(exact)
    cand = _may_overflow(a64, b64, hi).nonzero()
    if cand.numel() == 0:
        return reg, events, exact
    kdim = a.shape[1]
    amax = int(a.to(torch.int64).abs().max())
    bmax = int(b.to(torch.int64).abs().max())
    pdtype = torch.int32 if amax * bmax < 2**31 else torch.int64
    bt = b.t().to(pdtype)
    step = max(1, _EMULATE_ELEMENTS // max(kdim, 1))
    for s in range(0, cand.shape[0], step):
        mi, ni = cand[s:s + step, 0], cand[s:s + step, 1]
        prods = a[mi].to(pdtype) * bt[ni]  # (c, K), exact
        prefix = torch.cumsum(prods, dim=1, dtype=torch.int64)
        wraps = torch.bitwise_right_shift(prefix - lo, acc_bits)  # floor division by 2^acc_bits
        ev = (wraps[:, 1:] != wraps[:, :-1]).sum(dim=1) + (wraps[:, 0] != 0)
        if overflow == "saturate":
            reg[mi, ni] = prefix[:, -1]
            hit = (wraps != 0).any(dim=1).nonzero().squeeze(1)  # outputs whose exact partial sums leave the range
            if hit.numel():
                p = prods[hit].to(torch.int64)
                acc = torch.zeros(p.shape[0], dtype=torch.int64, device=a.device)
                cnt = torch.zeros_like(acc)
                for k in range(kdim):
                    t = acc + p[:, k]
                    cnt += (t < lo) | (t > hi)
                    acc = t.clamp_(lo, hi)
                reg[mi[hit], ni[hit]] = acc
                ev[hit] = cnt
        else:
            reg[mi, ni] = prefix[:, -1] - wraps[:, -1] * 2**acc_bits
        events[mi, ni] = ev
    return reg, events, exact


# Registers (chunk sums) computed per tile of output rows: bounds the (chunks x rows x N) float64 buffer to 16 MiB.
_TILE_ELEMENTS = 1 << 21


def wrap_chunk_sums_t(at_src: torch.Tensor, b: torch.Tensor, c: int, acc_bits: int, int_out: bool,
                       b_transposed: bool = False) -> tuple[torch.Tensor, int, int, int]:
    """Core of the ``events=False`` wrap path (module doc): registers = wrap(exact chunk sums), then the chunk
    registers rounded to float32 and summed in float32 in chunk order (``int_out=False``), or the single
    register itself (``int_out=True``, one chunk).

    ``at_src``: the integer-valued operand A **transposed**, (K, M), given as any tensor (integer or float dtype)
    whose row-major element order is that of A^T, e.g. a (K, N, L) view (callers that hold A^T save a transpose);
    ``b``: (K, N), or with ``b_transposed`` B^T (N, K) given likewise as any tensor with B^T's row-major element
    order and ``b.shape[0] == N``. Requires ``K max|a| max|b| < 2^53``. Returns ``(out (M, N), wrapped registers, max |exact
    chunk sum|, chunks)``.

    The chunk sums come from one batched float64 GEMM per tile of output rows, solved transposed:
    sums^T = (chunks, N, c) @ (chunks, c, rows), since long output rows suit the GEMM kernels far better than a
    small N. Every product and partial sum is an integer below ``2^53``, so float64 computes them exactly in any
    order. A tile is screened with one ``aminmax``: when every sum is in range nothing wrapped and no remainder is
    taken. The float32 accumulation across chunks is the same sequence of float32 additions per output as a
    register-by-register emulation.
    """
    if b_transposed:
        n_ = b.shape[0]
        k_ = b.numel() // n_ if n_ else 0
    else:
        k_, n_ = b.shape
    m_all = at_src.numel() // k_ if k_ else 0
    c = min(c, k_)  # a chunk longer than K is one chunk of K
    nch = (k_ + c - 1) // c
    kp = nch * c
    # A^T materialised once, in float64, K padded with zeros to whole chunks (zeros add nothing).
    at = (torch.zeros if kp != k_ else torch.empty)(kp, m_all, dtype=torch.float64, device=b.device)
    at[:k_].view(at_src.shape).copy_(at_src)
    if b_transposed:
        btf = torch.empty(n_, k_, dtype=torch.float64, device=b.device)
        btf.view(b.shape).copy_(b)
        if kp != k_:
            btf = torch.nn.functional.pad(btf, (0, kp - k_))
        bt = btf.reshape(n_, nch, c).transpose(0, 1)  # (nch, N, c)
    else:
        bf = b.to(torch.float64)
        if kp != k_:
            bf = torch.nn.functional.pad(bf, (0, 0, 0, kp - k_))
        bt = bf.reshape(nch, c, n_).transpose(1, 2)  # (nch, N, c)
    lo, hi = -(2 ** (acc_bits - 1)), 2 ** (acc_bits - 1) - 1
    tile = max(1, _TILE_ELEMENTS // max(nch * n_, 1))
    out = torch.empty(n_, m_all, dtype=(torch.int32 if acc_bits <= 32 else torch.int64) if int_out else torch.float32,
                      device=b.device)
    n_wrapped, max_abs = 0, 0
    for s in range(0, m_all, tile):
        t = min(tile, m_all - s)
        sums = torch.bmm(bt, at[:, s:s + t].reshape(nch, c, t))  # (nch, N, t), exact
        if sums.numel():
            mn, mx = (int(v) for v in sums.aminmax())
            max_abs = max(max_abs, -mn, mx)
            if mn < lo or mx > hi:
                n_wrapped += int(((sums < lo) | (sums > hi)).sum())
                # float64 remainder is exact for these integers (|sums| < 2^53)
                sums = torch.remainder(sums - lo, 2.0**acc_bits).add_(lo)
        if int_out:
            out[:, s:s + t] = sums[0]
        else:
            r32 = sums.to(torch.float32)
            acc = out[:, s:s + t]
            acc.copy_(r32[0])
            for r in r32[1:]:
                acc.add_(r)  # float32 accumulation across chunks, in order
    return out.t().contiguous(), n_wrapped, max_abs, nch


def _wrap_fast(a2: torch.Tensor, b: torch.Tensor, c: int, acc_bits: int, chunk: int | None, lead: torch.Size,
               m_: int, n_: int, k_: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The ``events=False`` wrap path (module doc), see :func:`wrap_chunk_sums_t`."""
    out, n_wrapped, max_abs, nch = wrap_chunk_sums_t(a2.t(), b, c, acc_bits, chunk is None)
    stats = {"overflow_events": None, "overflowed_outputs": None, "wrapped_outputs": n_wrapped,
             "accumulations": m_ * n_ * k_, "chunks": nch,
             "max_abs_exact": max_abs, "acc_bits": acc_bits, "chunk": chunk,
             "overflow_rate": None, "registers": nch * a2.shape[0] * n_}
    return out.reshape(*lead, m_, n_), stats


def int_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    acc_bits: int = 32,
    chunk: int | None = None,
    overflow: str = "wrap",
    events: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``a @ b`` for integer tensors with an ``acc_bits``-bit accumulator, emulated exactly (module doc).

    Args:
        a: integer tensor (..., M, K) (leading dimensions are batched over).
        b: integer tensor (K, N).
        acc_bits: accumulator width, 2..62.
        chunk: None (one register per output over all of K) or the chunk length along K (module doc).
        overflow: ``"wrap"``, ``"saturate"`` or ``"error"`` (raise ``OverflowError`` on the first event).
        events: count every overflow event (exact sequential emulation). ``False`` with ``overflow="wrap"`` and
            operands below ``2^15`` in magnitude takes the fast path of the module doc (same result; stats count
            ``wrapped_outputs`` and ``registers`` instead of events).

    Returns:
        ``(result, stats)``: ``result`` is the integer register (int32 if ``acc_bits <= 32`` else int64),
        shape (..., M, N), without ``chunk``; the float32 sum of the chunk registers with ``chunk``.
        ``stats``: ``overflow_events``, ``overflowed_outputs``, ``accumulations`` (= outputs x K),
        ``overflow_rate`` (events / accumulations), ``chunks``, ``max_abs_exact`` (largest |exact chunk sum|),
        ``acc_bits``, ``chunk``.

    ``K = 0`` is an empty sum: the result is all zeros (as ``torch.matmul``) with ``chunks = 0``.
    """
    _check_int(a, "a")
    _check_int(b, "b")
    if not isinstance(acc_bits, int) or not 2 <= acc_bits <= 62:
        raise ValueError(f"acc_bits must be an int in 2..62, got {acc_bits!r}")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    if a.dim() < 2 or b.dim() != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"a must be (..., M, K) and b (K, N) with matching K, got {tuple(a.shape)} and {tuple(b.shape)}")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    lead, (m_, k_), n_ = a.shape[:-2], a.shape[-2:], b.shape[1]
    if k_ == 0:  # the empty sum: every output is 0, as in torch.matmul; nothing accumulates, nothing overflows
        dtype = torch.float32 if chunk is not None else (torch.int32 if acc_bits <= 32 else torch.int64)
        stats = {"overflow_events": 0, "overflowed_outputs": 0, "accumulations": 0, "chunks": 0, "max_abs_exact": 0,
                 "acc_bits": acc_bits, "chunk": chunk, "overflow_rate": 0.0}
        return torch.zeros(*lead, m_, n_, dtype=dtype, device=a.device), stats
    a2 = a.reshape(-1, k_)
    # |min| via Python ints: abs() in the operand dtype would overflow for its most negative value
    amax = max(abs(int(v)) for v in a2.aminmax()) if a2.numel() else 0
    bmax = max(abs(int(v)) for v in b.aminmax()) if b.numel() else 0
    if k_ * amax * bmax >= 2**53:
        raise ValueError(f"operands too wide for exact emulation: K*max|a|*max|b| = {k_ * amax * bmax} >= 2^53")
    c = k_ if chunk is None else chunk
    if not events and overflow == "wrap" and amax < 2**15 and bmax < 2**15 and k_ > 0:
        return _wrap_fast(a2, b, c, acc_bits, chunk, lead, m_, n_, k_)
    starts = list(range(0, k_, c)) or [0]
    regs, total_events, outputs_hit, max_exact = [], 0, 0, 0
    for s in starts:
        reg, ev, exact = _accumulate(a2[:, s:s + c], b[s:s + c], acc_bits, overflow)
        n_ev = int(ev.sum())
        if overflow == "error" and n_ev:
            first = (ev > 0).nonzero()[0].tolist()
            raise OverflowError(f"{acc_bits}-bit accumulator overflowed {n_ev} times (first at output {first}, k-chunk "
                                f"starting at {s}); use overflow='wrap'/'saturate' or a smaller chunk")
        total_events += n_ev
        outputs_hit += int((ev > 0).sum())
        max_exact = max(max_exact, int(exact.abs().max()) if exact.numel() else 0)
        regs.append(reg)
    if chunk is None:
        result = regs[0].to(torch.int32 if acc_bits <= 32 else torch.int64)
    else:
        result = regs[0].to(torch.float32)
        for r in regs[1:]:
            result = result + r.to(torch.float32)  # float32 accumulation across chunks, in order
    stats = {"overflow_events": total_events, "overflowed_outputs": outputs_hit, "accumulations": a2.shape[0] * n_ * k_,
             "chunks": len(starts), "max_abs_exact": max_exact, "acc_bits": acc_bits, "chunk": chunk}
    stats["overflow_rate"] = total_events / max(stats["accumulations"], 1)
    return result.reshape(*lead, m_, n_), stats


def dfp_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    bits: int = 16,
    *,
    acc_bits: int = 32,
    chunk: int | None = None,
    overflow: str = "wrap",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``x @ w`` through DFP: ``(I_x, E_x) = to_dfp(x)``, ``(I_w, E_w) = to_dfp(w)`` (one exponent per tensor),
    ``R = int_matmul(I_x, I_w)``, result ``R * 2^(E_x + E_w)`` as float32.

    Args:
        x: float tensor (..., M, K); w: float tensor (K, N).
        bits: DFP mantissa width (sign included) of both operands.
        acc_bits, chunk, overflow: as in :func:`int_matmul`.
        rounding, generator: DFP rounding of both operands (:func:`~leantrain.numerics.dfp.to_dfp`).

    Returns ``(y, stats)``; stats are :func:`int_matmul`'s plus ``exponent_x``, ``exponent_w``.
    """
    check_bits(bits)
    ix, ex = to_dfp(x, bits, rounding=rounding, generator=generator)
    iw, ew = to_dfp(w, bits, rounding=rounding, generator=generator)
    r, stats = int_matmul(ix, iw, acc_bits=acc_bits, chunk=chunk, overflow=overflow)
    e = ex.to(torch.int64) + ew.to(torch.int64)
    if chunk is None:
        y = from_dfp(r, e)
    else:
        y = ldexp(r.to(torch.float64), e).to(torch.float32)  # power-of-two rescale of the float32 chunk sum
    stats.update(exponent_x=int(ex), exponent_w=int(ew))
    return y, stats
