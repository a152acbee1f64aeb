"""Model zoo: small standard ``nn.Module``s for the workloads the papers cover, at CPU scale.

No custom autograd here: the precision, quantization and distributed layers wrap these models
from outside. :func:`build` makes a model by name (used by the CLI and checkpoints).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from leantrain.models.dcgan import Discriminator, Generator
from leantrain.models.dlrm import DLRM
from leantrain.models.lenet import LeNet
from leantrain.models.lstm import CharLSTM, LSTMLayer
from leantrain.models.mlp import MLP
from leantrain.models.resnet import ResNet, resnet20
from leantrain.validation import UsageError, check_choice, check_int, check_range

__all__ = ["MLP", "LeNet", "ResNet", "resnet20", "CharLSTM", "LSTMLayer", "Generator", "Discriminator", "DLRM",
           "build", "MODELS", "model_spec", "load_model", "checkpoint_extra", "dataset_kwargs"]

MODELS: dict[str, Any] = {
    "mlp": MLP,
    "lenet": LeNet,
    "resnet20": resnet20,
    "charlstm": CharLSTM,
    "dcgan_generator": Generator,
    "dcgan_discriminator": Discriminator,
    "dlrm": DLRM,
}


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name with keyword arguments of its constructor.

    Every integer argument of the zoo's constructors is a size (width, depth, classes, hidden
    widths, cardinalities): each must be >= 1; ``dropout`` must lie in [0, 1). A value the
    constructor still refuses is a ValueError naming the model and its arguments.
    """
    check_choice("model", name, sorted(MODELS))
    for key, value in kwargs.items():
        where = f"model {name!r} argument {key}"
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if key == "dropout":
            check_range(where, value, 0.0, 1.0, high_open=True)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                check_int(f"{where}[{i}]", v, 1)
        else:
            check_int(where, value, 1)
    try:
        return MODELS[name](**kwargs)
    except TypeError as exc:  # an unknown or missing keyword
        raise TypeError(f"model {name!r} does not take {kwargs}: {exc}") from exc
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"model {name!r} cannot be built with {kwargs}: {exc}") from exc


def dataset_kwargs(name: str, info: Any) -> dict[str, Any]:
    """The constructor arguments that fit model ``name`` to a data set's :class:`~leantrain.data.DatasetInfo`.

    ``mlp``: ``in_features`` = product of the input shape, ``num_classes`` (1 logit for binary tasks);
    ``lenet``/``resnet20``: ``in_channels`` (input must be (C, H, W)) and ``num_classes``;
    ``charlstm``: ``vocab_size`` (language data sets); ``dlrm``: ``dense`` and ``cardinalities``
    from ``info.extra``; ``dcgan_*``: ``data_shape``. Raises ValueError when the model cannot
    consume the data set.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    shape = tuple(info.input_shape)
    outputs = 1 if info.task == "binary" else info.num_classes
    if name == "charlstm":
        if info.task != "language":
            raise ValueError(f"model 'charlstm' needs a language data set, {info.name!r} is {info.task!r}")
        return {"vocab_size": info.num_classes}
    if info.task == "language":
        raise ValueError(f"data set {info.name!r} is a language data set; use model 'charlstm'")
    if name == "dlrm":
        if "cardinalities" not in info.extra or "dense" not in info.extra:
            raise ValueError(f"model 'dlrm' needs dense features and categorical ids (e.g. 'clicks'), not {info.name!r}")
        return {"dense": int(info.extra["dense"]), "cardinalities": tuple(info.extra["cardinalities"])}
    if name in ("dcgan_generator", "dcgan_discriminator"):
        return {"data_shape": shape}
    if name in ("lenet", "resnet20"):
        if len(shape) != 3:
            raise ValueError(f"model {name!r} needs (channels, height, width) inputs; {info.name!r} has shape {shape}")
        return {"in_channels": shape[0], "num_classes": outputs}
    in_features = 1
    for s in shape:
        in_features *= s
    return {"in_features": in_features, "num_classes": outputs}


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


def checkpoint_extra(path: Any) -> dict[str, Any]:
    """The ``extra`` dict a checkpoint was saved with (``fit(..., extra=...)``); empty when none.

    ``leantrain train`` stores ``{"dataset": name, "data_args": {...}, "loss": task, ...}`` there,
    so that tools taking a checkpoint (quantize, sharpness) can reload the data it was trained on.
    """
    from leantrain.storage import load_torch

    state = load_torch(path)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {str(path)!r} was not written by leantrain.train.fit")
    return dict(state.get("extra") or {})
