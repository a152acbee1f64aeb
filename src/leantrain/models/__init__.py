"""Model zoo: small standard ``nn.Module``s for the workloads the papers cover, at CPU scale.

No custom autograd here: the precision, quantization and distributed layers wrap these models
from outside. :func:`build` makes a model by name (used by the CLI and checkpoints).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from leantrain.models.lenet import LeNet
from leantrain.models.mlp import MLP
from leantrain.models.resnet import ResNet, resnet20

__all__ = ["MLP", "LeNet", "ResNet", "resnet20", "build", "MODELS"]

MODELS: dict[str, Any] = {
    "mlp": MLP,
    "lenet": LeNet,
    "resnet20": resnet20,
}


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name with keyword arguments of its constructor."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)
