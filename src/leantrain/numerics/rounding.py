"""The one rounding routine of leantrain: integers, float formats, fixed point, all on exact bit arithmetic.

Every rounding in the project is "round a magnitude to a multiple of a power of two 2^g":

- :func:`round_low_bits` rounds non-negative integers to multiples of ``2^shift``. Applied to the
  bit pattern of a positive float32 it rounds the significand, and a carry out of the mantissa bumps the
  exponent, so it is exact across binade boundaries. This is the core that all modes share:
  nearest-even adds ``2^(shift-1) - 1 + lsb``, stochastic adds a uniform integer in ``[0, 2^shift)``,
  truncate adds nothing; then the low ``shift`` bits are cleared.
- :func:`round_to_integer` rounds float tensors to integers (grid ``2^0``); DFP, integer quantizers and
  gradient compression call it after scaling by a power of two (an exact operation).
- :func:`quantize` rounds float tensors to a :class:`~leantrain.numerics.formats.FloatFormat`, i.e. to the
  grid ``2^(max(E_x, emin) - m)`` that depends on each element's binade.
- :func:`stochastic_round_up` is the Bernoulli draw used where the grid is coarser than the value itself
  (magnitude below one grid step), shared by :func:`round_to_integer` and :func:`quantize`.

Rounding modes (``rounding=``):

- ``"nearest"``: round to nearest, ties to even (IEEE 754 roundTiesToEven).
- ``"stochastic"``: round away from zero (to the next grid point in magnitude) with probability
  ``(|x| - lo) / (hi - lo)``, else toward zero, where ``lo <= |x| < hi`` are the neighbouring grid points.
  So ``E[round(x)] = x``. Where the grid step is at most the value's own binade (``|x| >=`` one step) the
  probability is exact (a uniform integer of exactly the dropped bits is added). Below one step the draw is
  a float64 uniform compared with ``|x| / step``: exact when ``|x| / step >= 2^-30`` and otherwise off by less
  than ``2^-53``. Reproducible with a ``torch.Generator`` (same generator state, same tensor size and
  device -> same result).
- ``"truncate"``: round toward zero (clear the low bits), what cheap hardware does.

Backends (``backend=`` of :func:`quantize` and :func:`round_to_integer`): one rule, one reference
implementation, and faster implementations of the same rule that must agree with it bit for bit (given the
same generator state; the tests check each against the reference, and the reference against ml_dtypes).

- ``"reference"``: the general bit-level routine, for every format and mode: :func:`round_low_bits` on the
  magnitude bits with a per-element shift, the fixed subnormal step below ``min_normal``, then the overflow,
  saturation and special-value rules. For :func:`round_to_integer`: ``torch.round`` / ``torch.trunc`` (IEEE
  operations) and, for stochastic, :func:`round_low_bits` below the binary point plus :func:`stochastic_round_up`.
- ``"bits"``: torch bit-level fast paths where one applies, else the reference. 8-bit-exponent formats with
  subnormals and no saturation round the raw float32 pattern with one constant shift (a carry into the
  exponent is exact, overflow carries into inf); nearest-even in other formats rounds normals with a constant
  shift and the subnormal range with the FPU's own round-to-nearest-even, ``(|x| + C) - C`` with
  ``ulp(C)`` = the subnormal step (exact by construction).
- ``"native"``: the machine's own implementation: torch's dtype cast for BF16/FP16 nearest-even (IEEE
  specials, subnormals kept, no saturation), used only on a device where a probe (every special class,
  subnormal boundaries, ties, random patterns) agreed bit for bit with the reference, and never while torch
  flushes denormals; and the compiled kernel of :mod:`leantrain.numerics.native` for stochastic
  :func:`round_to_integer` of float32 CPU tensors (fed with the same generator draws as the reference, so the
  same bits). ValueError where no native implementation exists for the arguments.
- ``"auto"`` (default): ``"native"`` where it exists and passed its probe, else ``"bits"``: the fastest.

CPU tensors are processed in blocks of 64K elements so that the few integer passes stay in cache (every
backend draws its random bits per block, which is why they agree given one generator state).
"""

from __future__ import annotations

import torch

from leantrain.numerics.formats import FloatFormat, float32_bits
from leantrain.numerics.native import native_library

__all__ = ["ROUNDING_MODES", "BACKENDS", "check_rounding", "check_backend", "check_float", "check_generator",
           "round_low_bits", "round_to_integer", "stochastic_round_up", "quantize", "native_cast_dtype"]

ROUNDING_MODES = ("nearest", "stochastic", "truncate")
BACKENDS = ("auto", "reference", "bits", "native")

_INF = 0x7F800000
_NAN = 0x7FC00000
_ABS = 0x7FFFFFFF
_SIGN = -0x80000000
_HIDDEN = 0x00800000
# CPU: elements per block, so the handful of intermediates stays in cache (one pass over memory, not ten).
_BLOCK = 1 << 16


def check_rounding(rounding: str, arg: str = "rounding") -> str:
    """Return ``rounding`` if it is a known mode, else raise ValueError naming the argument ``arg``."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"{arg} must be one of {ROUNDING_MODES}, got {rounding!r}")
    return rounding


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise ValueError naming the argument."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_float(x: object, arg: str = "x") -> torch.Tensor:
    """``x`` if it is a floating-point tensor, else TypeError naming the argument ``arg``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{arg} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_generator(generator: object) -> None:
    """TypeError unless ``generator`` is a ``torch.Generator`` or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def round_low_bits(
    a: torch.Tensor,
    shift: int | torch.Tensor,
    rounding: str,
    *,
    out: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    implicit_bit: int = 0,
) -> torch.Tensor:
    """Round non-negative integers ``a`` (int32 or int64) to multiples of ``2^shift``; returns ``out``.

    ``r = (a + bias) & ~(2^shift - 1)`` with ``bias = 2^(shift-1) - 1 + bit_shift(a | implicit_bit)`` for
    ``"nearest"`` (ties to even), ``bias ~ U{0, ..., 2^shift - 1}`` for ``"stochastic"`` (so
    ``P(round up) = (a mod 2^shift) / 2^shift`` exactly) and ``bias = 0`` for ``"truncate"``.
    The arithmetic is modular, so a sign bit above every carry (a float32 bit pattern) rides along unchanged.

    Args:
        a: non-negative integers; the caller guarantees that ``a + 2^shift`` does not overflow the dtype.
        shift: number of low bits to drop, an int or an integer tensor broadcastable to ``a``,
            ``0 <= shift <= 30`` (int32) / ``62`` (int64).
        out: where to write (may be ``a`` itself: rounding in place); default a new tensor.
        generator: random source for ``"stochastic"``.
        implicit_bit: OR-ed into ``a`` only where the parity (the lowest kept bit) is read; a float
            significand passes its hidden bit ``2^23`` so that ties at ``shift = 23`` go to even.
    """
    check_rounding(rounding)
    if isinstance(shift, int):
        mask = (1 << shift) - 1
    else:
        mask = torch.bitwise_left_shift(torch.ones((), dtype=a.dtype, device=a.device), shift.to(a.dtype)) - 1
    if isinstance(shift, int) and shift == 0:
        return a.clone() if out is None else out.copy_(a)
    if rounding == "truncate":
        return torch.bitwise_and(a, ~mask, out=out)
    t = torch.empty_like(a) if out is None or out is a else out
    if rounding == "nearest":
        torch.bitwise_right_shift(a if implicit_bit == 0 else a | implicit_bit, shift, out=t)
        t &= 1
        if not isinstance(mask, int):
            t &= mask  # no parity bias where shift == 0
        t += mask >> 1
    else:
        if not _uniform_bits(t, shift if isinstance(shift, int) else 31, generator):
            t &= mask
    res = torch.add(a, t, out=a if out is a else t)
    res &= ~mask
    return res


def _uniform_bits(t: torch.Tensor, nbits: int, generator: torch.Generator | None) -> bool:
    """Fill int32/int64 ``t`` so that its low ``nbits`` bits are uniform and independent.

    Returns True when every value is already in ``[0, 2^nbits)`` (no masking needed).
    """
    if t.dtype == torch.int32 and nbits <= 16:
        # One 64-bit draw serves four (or eight) elements: the generator's cost dominates stochastic rounding.
        narrow, per, width = (torch.uint8, 8, 8) if nbits <= 8 else (torch.uint16, 4, 16)
        n = t.numel()
        raw = torch.empty((n + per - 1) // per, dtype=torch.int64, device=t.device).random_(-(2**63), None, generator=generator)
        t.view(-1).copy_(raw.view(narrow)[:n])  # zero-extended: uniform on [0, 2^8) or [0, 2^16)
        return nbits == width
    t.random_(generator=generator)  # uniform on [0, 2^31) (int32) or [0, 2^63) (int64)
    return False


def stochastic_round_up(y: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli(``y``) draws for ``0 <= y < 1`` (bool tensor): ``U < y`` with ``U`` a float64 uniform on ``[0, 1)``.

    ``P = ceil(y 2^53) / 2^53``: exactly ``y`` when ``y`` is a multiple of ``2^-53`` (every float32 ``y >= 2^-30``).
    """
    u = torch.rand(y.shape, dtype=torch.float64, device=y.device, generator=generator)
    return u < y.to(torch.float64)


def round_to_integer(x: torch.Tensor, rounding: str = "nearest", *, generator: torch.Generator | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Round a float tensor to integer values (same dtype, new tensor).

    ``"nearest"``: ties to even (``torch.round``); ``"truncate"``: toward zero; ``"stochastic"``:
    ``sign(x) * (floor(|x|) + B)`` with ``B ~ Bernoulli(|x| - floor(|x|))``, unbiased. For float32 (and
    narrower floats, which are promoted to float32 and cast back exactly) the stochastic draw for
    ``|x| >= 1`` adds uniform random bits below the binary point of the bit pattern (exact probability);
    for ``|x| < 1`` and for float64 it is :func:`stochastic_round_up` (exact to ``2^-53``).
    NaN and +-inf pass through; the sign of zero is kept. Not differentiable (the result is detached).
    ``backend`` as in the module doc: only stochastic rounding of float32 (or narrower) CPU tensors has a
    native kernel besides the reference.
    """
    check_float(x)
    check_rounding(rounding)
    check_generator(generator)
    check_backend(backend)
    x = x.detach()
    if rounding == "nearest":
        return torch.round(x)
    if rounding == "truncate":
        return torch.trunc(x)
    if x.dtype == torch.float64:
        if backend == "native":
            raise ValueError("backend='native': no native stochastic round_to_integer for float64; "
                             "use backend='auto' or 'reference'")
        mag = x.abs()
        low = torch.floor(mag)
        up = stochastic_round_up(mag - low, generator=generator)
        return torch.copysign(low + up.to(x.dtype), x)
    xf = x.to(torch.float32).contiguous()
    lib = native_library() if backend in ("auto", "native") and xf.device.type == "cpu" else None
    if backend == "native" and lib is None:
        raise ValueError(f"backend='native': no native stochastic round_to_integer for a {xf.device.type} tensor "
                         "here (CPU tensors and a C compiler are needed); use backend='auto' or 'reference'")
    if lib is not None and not xf.numel():
        return xf.to(x.dtype)
    if lib is not None:  # the same rule and the same draws in one native pass (leantrain.numerics.native)
        rbits = torch.empty(xf.shape, dtype=torch.int32)
        _uniform_bits(rbits, 31, generator)
        n_small = lib.lt_count_below_one_f32(xf.data_ptr(), xf.numel())
        u = torch.rand(n_small, dtype=torch.float64, generator=generator)
        out = torch.empty_like(xf)
        lib.lt_round_stochastic_f32(xf.data_ptr(), xf.numel(), rbits.data_ptr(), u.data_ptr(), out.data_ptr())
        return out.to(x.dtype)
    bits = xf.view(torch.int32)
    a = bits & _ABS
    exp_field = a >> 23
    # Grid 2^0 relative to the binade 2^(E-127): drop 150 - E low bits (E in 127..149: 1 <= |x| < 2^23).
    big = exp_field >= 150
    small = exp_field < 127
    shift = (150 - exp_field).clamp_(0, 23)
    round_low_bits(a, shift, "stochastic", out=a, generator=generator)
    below = stochastic_round_up(xf.abs()[small], generator=generator)
    out = a.view(torch.float32)
    out[small] = below.to(torch.float32)
    out[big] = xf.abs()[big]  # integers already, and inf/NaN unchanged
    out = torch.copysign(out, xf)
    return out.to(x.dtype)


def _blocks(n: int, device: torch.device):
    step = _BLOCK if device.type == "cpu" else max(n, 1)
    for start in range(0, n, step):
        yield start, min(start + step, n)


def quantize(
    x: torch.Tensor,
    fmt: FloatFormat,
    rounding: str = "nearest",
    *,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Round ``x`` to the values of ``fmt``; returns a new float32 tensor (same shape and device).

    Rules (``m = fmt.man_bits``, ``emin = fmt.emin``, ``max = fmt.max_normal``):

    - Finite ``x`` is rounded (``rounding`` as in the module doc) to the grid ``2^(max(E_x, emin) - m)`` where
      ``2^E_x <= |x| < 2^(E_x+1)``: m fraction bits for normals, the fixed subnormal step ``2^(emin - m)``
      below ``min_normal``. A carry into the next binade is exact. "Even" in ties-to-even is the parity of
      the integer significand ``|result| / step`` (for ``m = 0`` every normal significand is 1, so ties
      between two powers of two go up).
    - Signed zero: the sign is kept, also when a non-zero value rounds to zero.
    - Subnormals: kept (``fmt.subnormals=True``, as in ml_dtypes and numpy); with ``subnormals=False`` every
      input with ``|x| < min_normal`` becomes a zero of the same sign *before* rounding (flush-to-zero).
    - Overflow: a result with magnitude above ``max`` (this includes rounding up past ``max``, and in "fn"
      formats the all-ones NaN pattern) becomes ``+-inf`` for ``special="ieee"`` and NaN for ``"fn"``;
      with ``saturate=True`` it becomes ``+-max``. ``"truncate"`` (round toward zero) never creates an
      infinity: finite inputs beyond ``max`` become ``+-max`` (IEEE 754 overflow rule for toward-zero).
    - ``+-inf`` input: stays ``+-inf`` ("ieee"), becomes NaN ("fn"), or ``+-max`` with ``saturate=True``.
      ``special="finite"`` formats always saturate (overflow and inf to ``+-max``).
    - NaN input: becomes the canonical float32 quiet NaN (any payload, any sign), also for "finite" formats
      that cannot encode it (ml_dtypes turns NaN into -0 there; we refuse to hide a NaN).
    - Not differentiable: the result is detached (use :class:`~leantrain.numerics.autograd.Quantizer` in autograd).
    - Input dtype: float32 is used as is; float16/bfloat16 are widened exactly; float64 is first rounded
      to float32: toward zero for ``"truncate"`` (so truncation stays exact and a finite float64 beyond
      float32's range becomes ``+-max``, never inf), nearest-even otherwise (which can double-round).

    Args:
        x: floating-point tensor.
        fmt: target format.
        rounding: ``"nearest"``, ``"stochastic"`` or ``"truncate"``.
        generator: random source for ``"stochastic"`` (default: torch's global generator).
        backend: ``"auto"`` (default, the fastest that applies), ``"reference"``, ``"bits"`` or ``"native"``
            (module doc). All compute the same bits; ``"native"`` (torch's cast, BF16/FP16 nearest only)
            raises ValueError where it does not apply or its probe failed on this device.
    """
    check_float(x)
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"fmt must be a FloatFormat, got {type(fmt).__name__}")
    check_rounding(rounding)
    check_generator(generator)
    check_backend(backend)
    xf = x.detach().to(torch.float32)
    if rounding == "truncate" and x.dtype == torch.float64:
        # Truncation must not round away from zero on the way to float32 (which would also turn a finite
        # value beyond float32's range into inf): where the nearest conversion did, step back one float32 ulp.
        away = xf.abs() > x.detach().abs()
        xf = torch.where(away, torch.nextafter(xf, torch.zeros_like(xf)), xf)
    xf = xf.contiguous()
    if backend in ("auto", "native"):
        dtype = _native_dtype(fmt, xf.device) if rounding == "nearest" else None
        if dtype is not None:
            return xf.to(dtype).to(torch.float32)
        if backend == "native":
            raise ValueError(f"backend='native': torch has no verified cast for {fmt} {rounding} on {xf.device} "
                             "(only BF16/FP16 nearest, IEEE specials, subnormals, no saturation, denormals not "
                             "flushed); use backend='auto', 'bits' or 'reference'")
    return _quantize_bits(xf, fmt, rounding, generator, reference=backend == "reference")


def _quantize_bits(xf: torch.Tensor, fmt: FloatFormat, rounding: str, generator: torch.Generator | None, *,
                   reference: bool = False) -> torch.Tensor:
    """The bit-level routines on a contiguous float32 tensor (arguments already checked): the general
    reference block, or (``reference=False``) a fast block where one applies."""
    out = torch.empty_like(xf)
    n = xf.numel()
    if n == 0:
        return out
    src = xf.view(-1).view(torch.int32)
    dst = out.view(-1).view(torch.int32)
    xflat = xf.view(-1)
    # m = 0 excluded: the tie parity is then the hidden bit, which the raw pattern does not hold.
    fast = fmt.exp_bits == 8 and fmt.man_bits > 0 and fmt.subnormals and not fmt.saturating
    if reference:
        block = _quantize_block
    elif fast:
        block = _quantize_block_e8
    elif rounding == "nearest" and not (fmt.exp_bits == 8 and fmt.man_bits == 0 and fmt.subnormals):
        # (e=8, m=0 with subnormals would need fp32-subnormal arithmetic in the FPU trick: general block.)
        block = _NearestBlock(fmt)
    else:
        block = _quantize_block
    fix_nan = not getattr(block, "handles_nan", False)
    for start, stop in _blocks(n, xf.device):
        block(src[start:stop], dst[start:stop], fmt, rounding, generator)
        if fix_nan:
            dst[start:stop].masked_fill_(torch.isnan(xflat[start:stop]), _NAN)
    return out



_NATIVE_TYPES = {(8, 7): torch.bfloat16, (5, 10): torch.float16}
_native_ok: dict[tuple[torch.dtype, str], bool] = {}


_SMALLEST_DOUBLE = 5e-324


def _denormals_flushed(device: torch.device) -> bool:
    # torch.set_flush_denormal(True) (CPU only) sets the thread's FTZ/DAZ flags, which would make the native
    # conversion flush subnormal inputs; Python's own float arithmetic in this thread sees the same flags.
    return device.type == "cpu" and _SMALLEST_DOUBLE * 2.0 == 0.0


def _native_probe(dtype: torch.dtype, fmt: FloatFormat, device: torch.device) -> bool:
    """Does torch's cast to ``dtype`` agree bit for bit with the reference routine on this device?"""
    gen = torch.Generator().manual_seed(12345)
    rand = torch.randint(-(2**31), 2**31, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = [0, _INF, _NAN, 0x7F800001, 0x7FFFFFFF, 0x7F7FFFFF, 1, 0x007FFFFF, 0x00800000]
    for v in (fmt.max_normal, fmt.min_normal, fmt.min_subnormal, 1.0):
        for scale in (0.25, 0.5, 0.75, 1.0, 1.5, 1.0 + fmt.epsilon / 2, 1.0 + 1.5 * fmt.epsilon):
            special.append(float32_bits(min(v * scale, 3.4028234663852886e38)))
    base = torch.tensor(special, dtype=torch.int64)
    near = torch.cat([base - 1, base, base + 1]).clamp_(0, _ABS).to(torch.int32)
    step = torch.arange(0, 1 << 24, 1 << 24 >> 12, dtype=torch.int32)  # low bits sweep: ties in every subnormal binade
    bits = torch.cat([rand, near, step, step + 0x00400000])
    bits = torch.cat([bits, bits | _SIGN]).to(device)
    x = bits.view(torch.float32)
    a = x.to(dtype).to(torch.float32)
    b = _quantize_bits(x, fmt, "nearest", None, reference=True)
    same = (a.view(torch.int32) == b.view(torch.int32)) | (torch.isnan(a) & torch.isnan(b))
    return bool(same.all())


def _native_dtype(fmt: FloatFormat, device: torch.device) -> torch.dtype | None:
    """torch's dtype for ``fmt`` if its nearest-even cast can stand in for the reference here, else None."""
    dtype = _NATIVE_TYPES.get((fmt.exp_bits, fmt.man_bits))
    if dtype is None or not fmt.subnormals or fmt.saturating or fmt.special != "ieee":
        return None
    if _denormals_flushed(device):
        return None
    key = (dtype, str(device))
    if key not in _native_ok:
        _native_ok[key] = _native_probe(dtype, fmt, device)
    return dtype if _native_ok[key] else None


def native_cast_dtype(fmt: FloatFormat, device: torch.device) -> torch.dtype | None:
    """The torch dtype whose cast ``x.to(dtype).to(torch.float32)`` of a contiguous float32 ``x`` on ``device``
    is, right now, exactly what :func:`quantize` ``(x, fmt, "nearest")`` computes (the path it takes itself), or
    None: no such dtype for ``fmt``, the device's cast failed the bit-for-bit probe, or torch flushes denormals on
    this thread. For callers that round many tensors and skip :func:`quantize`'s argument checks."""
    return _native_dtype(fmt, device)


def _quantize_block_e8(u: torch.Tensor, o: torch.Tensor, fmt: FloatFormat, rounding: str, gen) -> None:
    """8 exponent bits, subnormals kept, no saturation: one rounding of the raw pattern is exact everywhere.

    FP32 subnormals are a linear grid in the raw bits, the format's subnormal step divides it, overflow
    carries into exponent 255 = inf and inf stays inf; the sign bit is above every carry. NaN is fixed by the caller.
    """
    round_low_bits(u, 23 - fmt.man_bits, rounding, out=o, generator=gen)


class _NearestBlock:
    """Round to nearest even for any format, with fewer passes than the general block (the common case).

    Normals: one constant-shift rounding of the magnitude bits (parity from the pattern; for m = 0 the
    significand is always odd). Below min_normal the step is the constant q = 2^(emin - m), and the FPU's
    own round-to-nearest-even does it exactly: ``(|x| + C) - C`` with ``C = 2^(emin - m + 23)`` (ulp(C) = q,
    and |x| + C stays in C's binade). Overflow is decided on the input: a magnitude rounds above max iff
    it is >= ``threshold`` (max + half a step, or one more when that tie goes down to an even max).
    """

    def __init__(self, fmt: FloatFormat) -> None:
        m = fmt.man_bits
        self.d = d = 23 - m
        self.mask = (1 << d) - 1
        max_bits = float32_bits(fmt.max_normal)
        if d == 0:
            self.threshold = max_bits + 1
        else:
            tie_up = m == 0 or (max_bits >> d) & 1
            self.threshold = max_bits + (1 << (d - 1)) + (0 if tie_up else 1)
        self.min_normal_bits = float32_bits(fmt.min_normal)
        self.magic = 2.0 ** (fmt.emin - m + 23)
        # e = 8 with m >= 1: the raw pattern already rounds fp32 subnormals right (see _quantize_block_e8).
        self.sub = fmt.subnormals and (fmt.exp_bits < 8 or m == 0)
        self.flush = not fmt.subnormals
        self.over_value = max_bits if fmt.saturating else _INF if fmt.special == "ieee" else _NAN
        self.m0 = m == 0
        # NaN inputs lie above the overflow threshold: in non-saturating "fn" formats they already become NaN.
        self.handles_nan = fmt.special == "fn" and not fmt.saturating

    def __call__(self, u: torch.Tensor, o: torch.Tensor, fmt: FloatFormat, rounding: str, gen) -> None:
        a = torch.bitwise_and(u, _ABS)
        if self.d:
            if self.m0:
                torch.add(a, 1 << (self.d - 1), out=o)
            else:
                torch.bitwise_right_shift(a, self.d, out=o)
                o &= 1
                o += a
                o += self.mask >> 1
            o &= ~self.mask
        else:
            o.copy_(a)
        if self.sub or self.flush:
            small = a < self.min_normal_bits
            if self.sub:
                # fp32 subnormal inputs round to 0 here (q/2 is a normal float32); lifting them to 2^-126 keeps
                # the same result and spares the FPU its slow denormal-operand path.
                f = torch.clamp(a, min=_HIDDEN).view(torch.float32) + self.magic
                f -= self.magic
                torch.where(small, f.view(torch.int32), o, out=o)
            else:
                o.masked_fill_(small, 0)
        o.masked_fill_(a >= self.threshold, self.over_value)
        o.view(torch.float32).copysign_(u.view(torch.float32))


def _quantize_block(u: torch.Tensor, o: torch.Tensor, fmt: FloatFormat, rounding: str, gen) -> None:
    """The reference: every format, every mode (module doc, ``backend="reference"``)."""
    m = fmt.man_bits
    d = 23 - m
    max_bits = float32_bits(fmt.max_normal)
    a = torch.bitwise_and(u, _ABS, out=o)
    isinf = a == _INF
    tiny = None if fmt.subnormals else a < float32_bits(fmt.min_normal)
    below = below_up = None
    if fmt.exp_bits < 8 or m == 0:
        # Below min_normal the step is fixed at q = 2^(emin - m): drop d + (emin - E_x) bits; below q itself
        # the result is 0 or q, decided by a comparison (nearest) or a Bernoulli draw (stochastic).
        emin_field = fmt.emin + 127
        q = float32_bits(2.0 ** (fmt.emin - m))
        shift = (emin_field + d) - (a >> 23)
        shift.clamp_(d, 23)
        below = a < q
        if rounding == "nearest":
            below_up = a > float32_bits(2.0 ** (fmt.emin - m - 1))
        elif rounding == "stochastic":
            ratio = a.view(torch.float32) * 2.0 ** (m - fmt.emin)  # |x| / q, exact (power of two)
            below_up = stochastic_round_up(ratio, generator=gen)
        round_low_bits(a, shift, rounding, out=a, generator=gen, implicit_bit=_HIDDEN)
        a.masked_fill_(below, 0)
        if below_up is not None:
            a.masked_fill_(below & below_up, q)
    else:
        round_low_bits(a, d, rounding, out=a, generator=gen)
    over = a > max_bits
    nan_extra = None
    if fmt.saturating:
        a.masked_fill_(over, max_bits)
    elif rounding == "truncate":
        a.masked_fill_(over, max_bits)
        if fmt.special == "ieee":
            a.masked_fill_(isinf, _INF)
        else:
            nan_extra = isinf
    elif fmt.special == "ieee":
        a.masked_fill_(over, _INF)
    else:
        nan_extra = over
    if tiny is not None:
        a.masked_fill_(tiny, 0)
    a |= u & _SIGN
    if nan_extra is not None:
        a.masked_fill_(nan_extra, _NAN)
