"""Low-bit inference: ternary / 4-bit / 8-bit weights with 8-bit activations, converted without retraining.

Implements fine-grained ternary quantization (FGQ, arXiv:1705.01462), filter-cluster ternary and
4-bit weights with dynamic fixed-point style activations (arXiv:1701.08978), and ternary residual
edges (arXiv:1707.04679) on one ternarizer:

- :func:`ternarize` / :func:`quantize_weights` / :func:`ternary_expansion` on a :class:`Grouping`
  (``fgq:N``, ``cluster:N``, ``channel``, ``tensor``);
- :class:`ActQuantizer`: calibrated per-tensor activation quantization;
- :func:`quantize_model` -> :class:`QuantizedModel` (per-layer report, fake / integer / float modes);
- :func:`add_residual_edges` with perturbation-theory sensitivity and ``set_residuals(k)``;
- :func:`finetune` (straight-through estimators, FP32 shadow weights);
- :func:`save_quantized` / :func:`load_quantized` (packed 2-/4-bit codes);
- :func:`to_torch_int8` (torch's per-channel int8 CPU kernels).

See docs/quant.md.
"""

from leantrain.quant.activations import ACT_METHODS, ActQuantizer
from leantrain.quant.convert import WEIGHT_KINDS, LayerReport, QuantizedModel, calibration_inputs, quantize_model
from leantrain.quant.finetune import finetune
from leantrain.quant.grouping import Grouping, GroupLayout
from leantrain.quant.layers import QuantLayer
from leantrain.quant.packed import load_quantized, pack_codes, save_quantized, unpack_codes
from leantrain.quant.residual import add_residual_edges, perturbation_sensitivity
from leantrain.quant.torch_int8 import to_torch_int8, torch_int8_available
from leantrain.quant.weights import WeightCodes, dequantize, quantize_weights, ternarize, ternary_expansion

__all__ = [
    "ACT_METHODS", "ActQuantizer", "WEIGHT_KINDS", "LayerReport", "QuantizedModel", "calibration_inputs", "quantize_model",
    "finetune", "Grouping", "GroupLayout", "QuantLayer", "load_quantized", "pack_codes", "save_quantized", "unpack_codes",
    "add_residual_edges", "perturbation_sensitivity", "to_torch_int8", "torch_int8_available", "WeightCodes",
    "dequantize", "quantize_weights", "ternarize", "ternary_expansion",
]
