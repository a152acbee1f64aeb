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

__all__ = ["MLP", "LeNet", "ResNet", "resnet20", "build", "MODELS", "model_spec", "load_model"]

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


def model_spec(name: str, **kwargs: Any) -> dict[str, Any]:
    """The JSON-able description ``{"name", "kwargs"}`` that :func:`build` turns back into a model.

    Pass it to :func:`leantrain.train.fit` (``model_spec=``) so that its checkpoints can be
    reloaded by :func:`load_model` without the code that made the model.
    """
    build(name, **kwargs)  # fail early on a bad spec
    return {"name": name, "kwargs": dict(kwargs)}


def load_model(path: Any, *, map_location: str = "cpu") -> nn.Module:
    """Rebuild the model of a checkpoint written by :func:`leantrain.train.fit` with a ``model_spec``.

    Raises ValueError naming the file when it is missing, unreadable, or has no model spec.
    """
    from leantrain.storage import load_torch

    state = load_torch(path, map_location=map_location)
    if not isinstance(state, dict) or "model" not in state or not state.get("model_spec"):
        raise ValueError(f"checkpoint {str(path)!r} has no model_spec: save it with fit(..., model_spec=...)")
    spec = state["model_spec"]
    model = build(spec["name"], **spec.get("kwargs", {}))
    model.load_state_dict(state["model"])
    return model
