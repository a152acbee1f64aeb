"""Mixed-precision training emulation: BF16 (arXiv:1905.12322), FP16, FP8 and INT16 dynamic fixed point
(arXiv:1802.00930), for any PyTorch model, on CPU or CUDA.

- :class:`Policy` (and :data:`POLICIES`: ``fp32``, ``bf16``, ``bf16-sr``, ``bf16-trunc``, ``fp16``,
  ``fp16-scaled``, ``fp8``, ``dfp16``) says which input of which GEMM is rounded to what;
- :func:`emulate` (a model, in place) and :func:`emulating` (a ``with`` block) intercept every GEMM: linear,
  matmul/einsum, convolution, attention, recurrent layers, embeddings; :func:`audit` counts them per kind and
  reports any that ran unrounded;
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

from leantrain.precision.audit import GemmAudit, audit
from leantrain.precision.emulate import (
    FP32_LAYERS,
    Emulation,
    emulate,
    emulating,
    emulation_of,
    restore,
    unsupported_layers,
)
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
    "policy_names", "emulate", "emulating", "restore", "emulation_of", "unsupported_layers", "Emulation", "FP32_LAYERS",
    "audit", "GemmAudit",
    "LossScaler", "PrecisionHooks", "round_parameters", "round_optimizer_state", "Recorder", "LayerNumerics",
    "RandomStreams",
]
