"""Dynamic fixed point (DFP): integer mantissas sharing one power-of-two exponent per tensor or per block.

A DFP tensor is a pair ``(I, E)``: ``x ~= I * 2^E`` with ``I`` integers of ``bits`` bits including the sign,
``|I| <= L = 2^(bits-1) - 1`` (symmetric range: the most negative code ``-2^(bits-1)`` is never produced, so
negation and ``|I|`` stay in range).

Exponent rule (one exponent per tensor, or per block of ``block`` elements along the last dimension):

    E = min { e integer : max|x| <= L * 2^e } = ceil(log2(max|x| / L))

computed exactly: with ``max|x| = f * 2^k`` (``frexp``, ``1/2 <= f < 1``), ``E = k - (bits-1)`` and one more
if ``max|x| > L * 2^(k - bits + 1)`` (a float64 comparison, exact). Every ``|x| / 2^E <= L``, so rounding
to an integer never leaves the range (no clamp, nothing overflows), and the largest mantissa is
``>= 2^(bits-2)`` (the scale is as fine as possible). This equals the rule ``E = floor(log2 max|x|) - (bits-2)``
recalled from the INT16 paper (arXiv:1802.00930, unconfirmed) except when ``max|x| / 2^E`` lies in
``(L, 2^(bits-1))``, where that rule clamps and we take the next exponent instead.

Rounding: ``I = round_to_integer(x * 2^-E, rounding)`` (the shared primitive; scaling by ``2^-E`` is exact),
so ``|I * 2^E - x| <= 2^(E-1)`` for ``"nearest"`` and ``< 2^E`` for ``"stochastic"``/``"truncate"``.
An all-zero tensor (block) gets ``E = 0`` and zero mantissas. NaN or inf in ``x`` raise ValueError (DFP
has no encoding for them).
"""

from __future__ import annotations

import torch

from leantrain.numerics.rounding import check_float, check_generator, check_rounding, round_to_integer

__all__ = ["to_dfp", "from_dfp", "dfp_round", "dfp_exponent", "mantissa_dtype", "check_bits", "ldexp"]


def check_bits(bits: object) -> int:
    """``bits`` if it is an int in 2..32 (a signed integer width, sign included), else TypeError/ValueError."""
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 2 <= bits <= 32:
        raise ValueError(f"bits must be in 2..32 (sign included), got {bits}")
    return bits


def mantissa_dtype(bits: int) -> torch.dtype:
    """Smallest signed integer dtype holding ``bits``-bit mantissas: int8, int16 or int32."""
    check_bits(bits)
    return torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32


def _blocked(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """View x as (..., n_blocks, block); per-tensor: (1, numel)."""
    if block is None:
        return x.reshape(1, -1)
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be a positive int or None, got {block!r}")
    if x.dim() == 0 or x.shape[-1] % block:
        raise ValueError(f"block={block} must divide the last dimension of x (shape {tuple(x.shape)})")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def ldexp(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``x * 2^e`` in two power-of-two steps, so that neither factor over/underflows (exact for normal results)."""
    e = e.to(x.dtype)
    half = torch.floor(e / 2)
    return torch.ldexp(torch.ldexp(x, half), e - half)


def dfp_exponent(amax: torch.Tensor, bits: int = 16) -> torch.Tensor:
    """Shared exponents ``E = ceil(log2(amax / (2^(bits-1)-1)))`` (exactly, via frexp); ``E = 0`` where ``amax == 0``.

    ``amax``: non-negative finite maxima (any float dtype). Returns int32 of the same shape.
    """
    check_bits(bits)
    m = amax.to(torch.float64)
    top = float(2 ** (bits - 1) - 1)
    _, k = torch.frexp(m)
    e = k.to(torch.int64) - (bits - 1)
    e = e + (ldexp(m, -e) > top).to(torch.int64)  # exact: power-of-two scaling in float64
    return torch.where(m > 0, e, torch.zeros_like(e)).to(torch.int32)


def to_dfp(
    x: torch.Tensor,
    bits: int = 16,
    *,
    block: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a float tensor to DFP: ``(mantissas, exponent)`` with ``x ~= mantissas * 2^exponent``.

    Args:
        x: finite floating-point tensor.
        bits: mantissa width including the sign, 2..32 (16 = the INT16 paper's DFP16).
        block: None for one exponent per tensor; else one exponent per ``block`` consecutive elements of the
            last dimension (``block`` must divide it).
        rounding: ``"nearest"`` (ties to even), ``"stochastic"`` or ``"truncate"``.
        generator: random source for ``"stochastic"``.

    Returns:
        ``mantissas``: same shape as ``x``, dtype :func:`mantissa_dtype` (int8/int16/int32), ``|m| <= 2^(bits-1)-1``.
        ``exponent``: int32, shape ``()`` per tensor or ``x.shape[:-1] + (x.shape[-1] // block,)`` per block.
        See the module doc for the exponent rule and the error bound.
    """
    check_float(x)
    check_bits(bits)
    check_rounding(rounding)
    check_generator(generator)
    xb = _blocked(x, block)
    amax = xb.abs().amax(dim=-1) if xb.numel() else torch.zeros(xb.shape[:-1], dtype=x.dtype, device=x.device)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("x contains NaN or inf: dynamic fixed point has no encoding for them")
    exp = dfp_exponent(amax, bits)
    # 2^-E as a float32 factor when it is a normal float32 (the usual case), else scale in float64 (exact).
    work = torch.float32 if x.dtype != torch.float64 and int(exp.min()) > -126 and int(exp.max()) < 126 else torch.float64
    if block is None:  # one exponent: ldexp's two power-of-two products, by scalars (no pow passes)
        neg = -int(exp)
        scaled = xb.to(work) * 2.0 ** (neg // 2) * 2.0 ** (neg - neg // 2)
    else:
        scaled = ldexp(xb.to(work), -exp.unsqueeze(-1))
    mant = round_to_integer(scaled, rounding, generator=generator)
    mant = mant.to(mantissa_dtype(bits)).reshape(x.shape)
    return mant, (exp.reshape(()) if block is None else exp)


def from_dfp(mantissas: torch.Tensor, exponent: torch.Tensor | int, *, dtype: torch.dtype = torch.float32,
             overflow: str = "inf") -> torch.Tensor:
    """``mantissas * 2^exponent`` as ``dtype`` (computed exactly in float64, then rounded once to ``dtype``).

    ``exponent``: a scalar (per tensor) or a tensor of shape ``mantissas.shape[:-1] + (n_blocks,)`` with
    ``n_blocks`` dividing ``mantissas.shape[-1]`` (per block, as returned by :func:`to_dfp`).

    Overflow follows the numerics rule for round-to-nearest (docs/numerics.md): a value whose
    magnitude rounds above ``dtype``'s largest finite value becomes ``+-inf`` (``overflow="inf"``,
    the IEEE result, what ``tensor.to(dtype)`` gives); ``overflow="saturate"`` gives ``+-max``
    instead; ``overflow="error"`` raises ``OverflowError`` saying how many values overflowed and
    the largest magnitude. (A DFP value produced by :func:`to_dfp` from a ``dtype`` tensor never overflows.)
    """
    if overflow not in ("inf", "saturate", "error"):
        raise ValueError(f"overflow must be 'inf', 'saturate' or 'error', got {overflow!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"dtype must be a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
    exact = _from_dfp_exact(mantissas, exponent)
    out = exact.to(dtype)
    if overflow != "inf" and dtype != torch.float64:
        over = torch.isinf(out) & torch.isfinite(exact)
        if bool(over.any()):
            if overflow == "error":
                raise OverflowError(f"{int(over.sum())} value(s) overflow {dtype} (largest magnitude "
                                    f"{float(exact[over].abs().max()):.6g} > {torch.finfo(dtype).max:.6g}); "
                                    "use overflow='saturate' or a wider dtype")
            out = torch.where(over, torch.finfo(dtype).max * torch.sign(exact).to(dtype), out)
    return out


def _from_dfp_exact(mantissas: torch.Tensor, exponent: torch.Tensor | int) -> torch.Tensor:
    """``mantissas * 2^exponent`` in float64 (exact while it fits float64's range)."""
    if not isinstance(mantissas, torch.Tensor) or mantissas.is_floating_point() or mantissas.is_complex():
        raise TypeError(f"mantissas must be an integer tensor, got {getattr(mantissas, 'dtype', type(mantissas).__name__)}")
    exp = torch.as_tensor(exponent, device=mantissas.device)
    if exp.is_floating_point():
        raise TypeError(f"exponent must be an integer tensor or int, got dtype {exp.dtype}")
    m = mantissas.to(torch.float64)
    if exp.dim() == 0:
        return ldexp(m, exp)
    nb = exp.shape[-1]
    if m.dim() == 0 or exp.shape[:-1] != m.shape[:-1] or nb == 0 or m.shape[-1] % nb:
        raise ValueError(f"exponent shape {tuple(exp.shape)} does not match mantissas shape {tuple(m.shape)} in blocks")
    mb = m.reshape(*m.shape[:-1], nb, m.shape[-1] // nb)
    return ldexp(mb, exp.unsqueeze(-1)).reshape(m.shape)


def dfp_round(
    x: torch.Tensor,
    bits: int = 16,
    *,
    block: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``from_dfp(*to_dfp(x, ...))``: ``x`` rounded onto its DFP grid, as float32 (float64 input stays float64).

    The values a DFP kernel would see, for emulation in float arithmetic (e.g. a float GEMM on DFP-rounded
    operands equals the integer GEMM with an unbounded accumulator, up to float summation order).
    """
    m, e = to_dfp(x, bits, block=block, rounding=rounding, generator=generator)
    return from_dfp(m, e, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
