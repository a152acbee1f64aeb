"""Exact low-precision number formats and rounding (pure functions on tensors; imports nothing else of leantrain).

See docs/numerics.md for the rounding, NaN, inf, subnormal and overflow rules.
"""

from leantrain.numerics.autograd import Quantizer, quantize_ste
from leantrain.numerics.dfp import dfp_exponent, dfp_round, from_dfp, mantissa_dtype, to_dfp
from leantrain.numerics.formats import BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, PRESETS, TF32, FloatFormat
from leantrain.numerics.gathered_gemm import gathered_int_gemm
from leantrain.numerics.intmatmul import OVERFLOW_MODES, dfp_matmul, int_matmul, safe_chunk
from leantrain.numerics.rounding import (
    BACKENDS,
    ROUNDING_MODES,
    check_rounding,
    quantize,
    round_low_bits,
    round_to_integer,
    stochastic_round_up,
)

__all__ = [
    "FloatFormat", "FP32", "TF32", "BF16", "FP16", "FP8_E5M2", "FP8_E4M3", "PRESETS",
    "ROUNDING_MODES", "BACKENDS", "check_rounding", "quantize", "round_to_integer", "round_low_bits", "stochastic_round_up",
    "Quantizer", "quantize_ste",
    "to_dfp", "from_dfp", "dfp_round", "dfp_exponent", "mantissa_dtype",
    "int_matmul", "dfp_matmul", "safe_chunk", "OVERFLOW_MODES", "gathered_int_gemm",
]
