"""torch's own quantized CPU engine for the one grouping it has real int8 kernels for: per channel.

:func:`to_torch_int8` runs PyTorch's post-training static quantization (FX graph mode,
``torch.ao.quantization.quantize_fx``) with the x86/fbgemm configuration: int8 weights with one
symmetric scale per output channel, uint8 activations with per-tensor affine scales from
histogram observers, batch norm folded into the preceding convolution, and real int8 kernels
(``quantized::conv2d``, ``quantized::linear``, quantized add) on CPU. It is the deployable
8-8 counterpart of ``quantize_model(weights="int8", grouping="channel")``, whose fake-quantized
numbers it does not reproduce bit for bit (it folds BN, requantizes every layer's output and
quantizes the residual additions). torch marks ``torch.ao.quantization`` as deprecated (moving to
torchao); when it is unavailable :func:`torch_int8_available` is False and :func:`to_torch_int8`
raises RuntimeError. CPU only.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from leantrain.quant.convert import calibration_inputs

__all__ = ["to_torch_int8", "torch_int8_available"]


def torch_int8_available() -> bool:
    """True when torch's FX post-training quantization and an x86/fbgemm engine are present."""
    try:
        from torch.ao.quantization import quantize_fx  # noqa: F401
    except ImportError:
        return False
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def to_torch_int8(model: nn.Module, calibration: Any, *, calibration_batches: int = 8) -> nn.Module:
    """An int8 copy of the FP32 ``model`` (per-channel weights) that runs on torch's quantized CPU kernels."""
    if not torch_int8_available():
        raise RuntimeError("torch's quantized engine (torch.ao.quantization FX, x86/fbgemm) is not available in this torch build")
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx

    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    batches = calibration_inputs(calibration, batches=calibration_batches)
    net = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao on every call; the API still works.
        warnings.simplefilter("ignore")
        prepared = quantize_fx.prepare_fx(net, get_default_qconfig_mapping(engine), (batches[0].cpu(),))
        with torch.no_grad():
            for x in batches:
                prepared(x.cpu())
        return quantize_fx.convert_fx(prepared)
