"""Low-bit inference: ternary / 4-bit / 8-bit weights with 8-bit activations, converted without retraining.

Implements fine-grained ternary quantization (FGQ, arXiv:1705.01462), filter-cluster ternary and
4-bit weights with dynamic fixed-point style activations (arXiv:1701.08978), and ternary residual
edges (arXiv:1707.04679) on one ternarizer:

- :func:`ternarize` / :func:`quantize_weights` / :func:`ternary_expansion` on a :class:`Grouping`
  (``fgq:N``, ``cluster:N``, ``channel``, ``tensor``);
- :class:`ActQuantizer`: calibrated per-tensor activation quantization;
- :class:`QuantConfig` (:class:`WeightQuant`, :class:`ActQuant`, ``keep`` selectors by data flow, role,
  name or pattern) and :func:`quantize_model(model, config, calibration=...) <quantize_model>` ->
  :class:`QuantizedModel` (any positional/keyword inputs and output type; per-layer report; fake /
  integer / float modes; ``path_agreement``); works on Hugging Face transformers and
  ``nn.TransformerEncoder`` as well as CNNs;
- :func:`add_residual_edges` with perturbation-theory sensitivity and ``set_residuals(k)``;
- :func:`finetune` (straight-through estimators, FP32 shadow weights);
- :func:`save_quantized` / :func:`load_quantized` (packed 2-/4-bit codes, whole-file CRC; any model,
  reloaded into an instance of its architecture or a zoo spec);
- :func:`to_torch_int8` (torch's per-channel int8 CPU kernels).

See docs/quant.md.
"""

from leantrain.quant.activations import ACT_METHODS, ActQuantizer
from leantrain.quant.attention import ProjectedAttention
from leantrain.quant.config import WEIGHT_KINDS, ActQuant, QuantConfig, WeightQuant
from leantrain.quant.convert import (
    Batch,
    LayerReport,
    QuantizedModel,
    calibration_batches,
    calibration_inputs,
    quantize_model,
)
from leantrain.quant.finetune import finetune
from leantrain.quant.grouping import Grouping, GroupLayout
from leantrain.quant.layers import QuantLayer
from leantrain.quant.packed import load_quantized, pack_codes, save_quantized, unpack_codes
from leantrain.quant.residual import add_residual_edges, perturbation_sensitivity
from leantrain.quant.selection import ROLES
from leantrain.quant.torch_int8 import to_torch_int8, torch_int8_available
from leantrain.quant.weights import WeightCodes, dequantize, quantize_weights, ternarize, ternary_expansion

__all__ = [
    "ACT_METHODS", "ActQuantizer", "ProjectedAttention", "WEIGHT_KINDS", "ActQuant", "QuantConfig", "WeightQuant", "Batch",
    "LayerReport", "QuantizedModel", "calibration_batches", "calibration_inputs", "quantize_model", "ROLES",
    "finetune", "Grouping", "GroupLayout", "QuantLayer", "load_quantized", "pack_codes", "save_quantized", "unpack_codes",
    "add_residual_edges", "perturbation_sensitivity", "to_torch_int8", "torch_int8_available", "WeightCodes",
    "dequantize", "quantize_weights", "ternarize", "ternary_expansion",
]
