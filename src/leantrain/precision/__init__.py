"""Mixed-precision training emulation: BF16 (arXiv:1905.12322), FP16, FP8 and INT16 dynamic fixed point
(arXiv:1802.00930), for any PyTorch model, on CPU or CUDA.

- :class:`Policy` (and :data:`POLICIES`: ``fp32``, ``bf16``, ``bf16-sr``, ``bf16-trunc``, ``fp16``,
  ``fp16-scaled``, ``fp8``, ``dfp16``) says which input of which GEMM is rounded to what;
- :func:`emulate` wraps a model's linear, convolution and embedding layers in place;
- :class:`LossScaler` does dynamic loss scaling; :class:`PrecisionHooks` plugs all of it into
  :func:`leantrain.train.fit`;
- :class:`Recorder` counts underflow / overflow / saturation per layer, tensor and step, the DFP
  exponents and integer-accumulator overflows.

Example::

    from leantrain.precision import PrecisionHooks, Recorder
    rec = Recorder()
    history = fit(model, opt, loss_fn, data.train, epochs=5, batch_size=64, hooks=PrecisionHooks("bf16", recorder=rec))
    print(rec.summary()["dy"]["underflow_frac"])
"""

from leantrain.precision.emulate import FP32_LAYERS, Emulation, emulate, emulation_of, restore, unsupported_layers
from leantrain.precision.hooks import PrecisionHooks, round_optimizer_state, round_parameters
from leantrain.precision.instrument import Recorder
from leantrain.precision.operands import LayerNumerics, RandomStreams
from leantrain.precision.policy import (
    POLICIES,
    DFPSpec,
    DynamicLossScaling,
    FloatSpec,
    Gemm,
    IntAccumulator,
    Policy,
    get_policy,
    policy_names,
)
from leantrain.precision.scaling import LossScaler

__all__ = [
    "Policy", "Gemm", "FloatSpec", "DFPSpec", "IntAccumulator", "DynamicLossScaling", "POLICIES", "get_policy",
    "policy_names", "emulate", "restore", "emulation_of", "unsupported_layers", "Emulation", "FP32_LAYERS",
    "LossScaler", "PrecisionHooks", "round_parameters", "round_optimizer_state", "Recorder", "LayerNumerics",
    "RandomStreams",
]
