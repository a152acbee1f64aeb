"""``emulate(model, policy)``: run any PyTorch model's GEMMs in emulated low precision, in place.

Every ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and ``nn.Embedding`` of the
model (and subclasses that keep the base ``forward``) is switched to an emulating class: the same
object, the same parameters and buffers (``state_dict`` keys and values unchanged, any
``torch.optim`` optimizer keeps working), whose ``forward`` calls the autograd functions of
:mod:`leantrain.precision.functions`. The recurrent GEMMs of the zoo's ``CharLSTM`` are
``nn.Linear`` modules, so they are covered; ``DCGAN`` uses ``nn.ConvTranspose2d``, ``DLRM``
``nn.Embedding``. Normalization layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm, PReLU) keep their
parameters in FP32, as the policy states.

A module that owns parameters and is none of the above (``nn.LSTM``, ``nn.GRU``,
``nn.MultiheadAttention``, a custom layer using ``F.linear`` on its own ``nn.Parameter``, a subclass
of ``nn.Linear`` with its own ``forward``, ...) cannot be emulated faithfully: :func:`emulate` raises a
ValueError that lists every such layer, unless the caller names them in ``allow_unsupported`` (then
they stay FP32 and are listed in :attr:`Emulation.fp32_layers`). Nothing is silently left in FP32.

With the ``fp32`` policy (no rounding anywhere) the wrapped layers call their original ``forward``,
so training is bit-identical to the unwrapped model. :func:`restore` undoes :func:`emulate`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leantrain.precision.functions import ConvGeometry, conv, embedding, linear
from leantrain.precision.instrument import Recorder
from leantrain.precision.operands import LayerNumerics, RandomStreams
from leantrain.precision.policy import Policy, get_policy

__all__ = ["Emulation", "emulate", "restore", "emulation_of", "unsupported_layers", "FP32_LAYERS"]

FP32_LAYERS: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None), nn.PReLU,
    ) if t is not None
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_ATTR = "_leantrain_numerics"
_ROOT_ATTR = "_leantrain_emulation"


@dataclass
class Emulation:
    """What :func:`emulate` did to a model: the policy, the wrapped layers (qualified names), the layers
    allowed to stay FP32 (``allow_unsupported``), the FP32 normalization layers, the recorder and the
    stochastic-rounding streams. Stored on the model; get it with :func:`emulation_of`."""

    policy: Policy
    layers: dict[str, LayerNumerics] = field(default_factory=dict)
    fp32_layers: list[str] = field(default_factory=list)
    norm_layers: list[str] = field(default_factory=list)
    recorder: Recorder | None = None
    streams: RandomStreams = field(default_factory=RandomStreams)

    def describe(self) -> str:
        """The policy's data-flow table plus which layers are emulated and which stay FP32."""
        lines = [self.policy.describe(), "", f"- emulated layers ({len(self.layers)}): " + ", ".join(self.layers)]
        if self.norm_layers:
            lines.append(f"- FP32 normalization layers ({len(self.norm_layers)}): " + ", ".join(self.norm_layers))
        if self.fp32_layers:
            lines.append("- left FP32 by allow_unsupported: " + ", ".join(self.fp32_layers))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- emulating forwards

def _numerics(module: nn.Module) -> LayerNumerics:
    L: LayerNumerics = module.__dict__[_ATTR]
    L.training = module.training
    return L


def _linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    L = _numerics(self)
    if not L.policy.rounds:
        return type(self)._leantrain_base.forward(self, input)  # type: ignore[attr-defined]
    return linear(input, self.weight, self.bias, L)


def _conv_geometry(m: nn.Module, padding: tuple[int, ...] | None = None, output_padding: Any = None) -> ConvGeometry:
    return ConvGeometry(tuple(m.stride), tuple(padding if padding is not None else m.padding), tuple(m.dilation),
                        bool(m.transposed), tuple(output_padding if output_padding is not None else m.output_padding),
                        int(m.groups))


def _conv_forward(self: nn.Module, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
    L = _numerics(self)
    base = type(self)._leantrain_base  # type: ignore[attr-defined]
    if not L.policy.rounds:
        return base.forward(self, input) if output_size is None else base.forward(self, input, output_size)
    nd = len(self.kernel_size)
    padding = None
    if isinstance(self.padding, str) or self.padding_mode != "zeros":
        # Pad explicitly (as nn.ConvNd does for non-zero modes and 'same'), then convolve unpadded.
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * nd
    opad = None
    if self.transposed:
        opad = self._output_padding(input, output_size, list(self.stride), list(self.padding), list(self.kernel_size),
                                    nd, list(self.dilation))
    return conv(input, self.weight, self.bias, _conv_geometry(self, padding, opad), L)


def _embedding_forward(self: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    L = _numerics(self)
    if not (L.policy.rounds and L.policy.embeddings):
        return type(self)._leantrain_base.forward(self, input)  # type: ignore[attr-defined]
    return embedding(input, self.weight, self.padding_idx, L)


_FORWARDS = {nn.Linear: _linear_forward, nn.Embedding: _embedding_forward, **{c: _conv_forward for c in _CONV}}
_CLASSES: dict[type, type] = {}


def _emulating_class(cls: type[nn.Module], base: type[nn.Module]) -> type[nn.Module]:
    """The emulating subclass of ``cls`` (cached; module-level name for the standard types)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Emulated{cls.__name__}", (cls,), {
            "forward": _FORWARDS[base], "_leantrain_base": cls, "__module__": __name__,
            "__doc__": f"{cls.__name__} whose GEMMs are emulated by leantrain.precision (same parameters)."})
    return _CLASSES[cls]


for _cls in _FORWARDS:
    globals()[f"Emulated{_cls.__name__}"] = _emulating_class(_cls, _cls)  # importable, hence picklable


# ------------------------------------------------------------------------------------- inspection

def _base_of(m: nn.Module) -> type[nn.Module] | None:
    """The supported base type whose forward ``m`` uses, or None."""
    cls = type(m)
    if hasattr(cls, "_leantrain_base"):
        cls = cls._leantrain_base  # type: ignore[attr-defined]
    for base in _FORWARDS:
        if isinstance(m, base):
            return base if cls.forward is base.forward else None
    return None


def _reason(m: nn.Module, policy: Policy) -> str | None:
    """Why ``m`` cannot be emulated under ``policy`` (None: it can, or it needs no emulation)."""
    base = _base_of(m)
    if base is None:
        for b in _FORWARDS:
            if isinstance(m, b):
                return f"subclass of {b.__name__} with its own forward (its GEMMs are unknown)"
        if isinstance(m, FP32_LAYERS) or not any(True for _ in m.parameters(recurse=False)):
            return None
        return "owns parameters used in a computation leantrain cannot see (no GEMM wrapper for this type)"
    integer = policy.forward.integer
    if base is nn.Embedding:
        if m.max_norm is not None or m.sparse or m.scale_grad_by_freq:
            return "nn.Embedding with max_norm, sparse or scale_grad_by_freq is not emulated"
    elif base in _CONV and integer:
        if len(m.kernel_size) > 2:
            return "DFP emulation supports 1-d and 2-d convolutions only"
    return None


def unsupported_layers(model: nn.Module, policy: str | Policy = "bf16") -> list[tuple[str, str, str]]:
    """``(qualified name, type name, reason)`` of every layer of ``model`` that :func:`emulate` cannot
    emulate under ``policy``. Children of such a layer are not listed (its own code uses them)."""
    pol = get_policy(policy)
    out: list[tuple[str, str, str]] = []
    skip: list[str] = []
    for name, m in model.named_modules():
        if any(s == "" or name.startswith(s + ".") for s in skip):
            continue
        why = _reason(m, pol)
        if why is not None:
            out.append((name, type(m).__name__, why))
            skip.append(name)
    return out


def emulation_of(model: nn.Module) -> Emulation | None:
    """The :class:`Emulation` of an emulated model, or None."""
    return model.__dict__.get(_ROOT_ATTR)


# ---------------------------------------------------------------------------------- emulate/restore

def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`emulate`: every wrapped layer gets its original class back. Returns ``model``."""
    for m in model.modules():
        cls = type(m)
        if hasattr(cls, "_leantrain_base") and _ATTR in m.__dict__:
            m.__class__ = cls._leantrain_base  # type: ignore[attr-defined]
            del m.__dict__[_ATTR]
    model.__dict__.pop(_ROOT_ATTR, None)
    return model


def emulate(model: nn.Module, policy: str | Policy, *, recorder: Recorder | None = None, seed: int = 0,
            allow_unsupported: Iterable[str | type] = ()) -> nn.Module:
    """Emulate ``policy`` in every GEMM of ``model``, in place, and return the same ``model``.

    Args:
        model: any ``nn.Module``; may already be emulated (its previous policy is replaced).
        policy: a :class:`Policy` or a name from :data:`leantrain.precision.POLICIES`.
        recorder: a :class:`Recorder` that receives rounding statistics (training mode only).
        seed: seed of the stochastic-rounding generators (one per device).
        allow_unsupported: qualified module names (or module types) of layers that may stay FP32;
            every unsupported layer must be named, and every name must be such a layer.

    Raises:
        ValueError: a layer cannot be emulated and is not in ``allow_unsupported`` (all are listed),
            or ``allow_unsupported`` names a layer that is not unsupported.
        TypeError: ``model`` is not an ``nn.Module`` or ``recorder`` not a :class:`Recorder`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    pol = get_policy(policy)
    if recorder is not None and not isinstance(recorder, Recorder):
        raise TypeError(f"recorder must be a leantrain.precision.Recorder or None, got {type(recorder).__name__}")
    allowed = list(allow_unsupported)
    for a in allowed:
        if not isinstance(a, str | type):
            raise TypeError(f"allow_unsupported entries must be module names or types, got {a!r}")
    restore(model)
    bad = unsupported_layers(model, pol)
    names = {n for n, _, _ in bad}
    unknown = [a for a in allowed if isinstance(a, str) and a not in names]
    if unknown:
        raise ValueError(f"allow_unsupported names layers that are not unsupported under policy {pol.name!r}: "
                         f"{unknown}; unsupported layers are {sorted(names) or 'none'}")
    modules = dict(model.named_modules())
    left = [(n, t, why) for n, t, why in bad
            if n not in allowed and not any(isinstance(a, type) and isinstance(modules[n], a) for a in allowed)]
    if left:
        listing = "\n".join(f"  - {n or '<root>'} ({t}): {why}" for n, t, why in left)
        raise ValueError(f"cannot emulate policy {pol.name!r}: {len(left)} layer(s) would silently stay FP32:\n{listing}\n"
                         "replace them by supported layers (nn.Linear, nn.ConvNd, nn.ConvTransposeNd, nn.Embedding) "
                         "or name them in allow_unsupported=[...] to keep them FP32 explicitly")
    emu = Emulation(pol, recorder=recorder, streams=RandomStreams(seed), fp32_layers=sorted(names))
    for name, m in model.named_modules():
        if any(b == "" or name == b or name.startswith(b + ".") for b in names):
            continue
        base = _base_of(m)
        if base is None:
            if isinstance(m, FP32_LAYERS):
                emu.norm_layers.append(name)
            continue
        L = LayerNumerics(name or type(m).__name__, pol, recorder, emu.streams)
        m.__dict__[_ATTR] = L
        m.__class__ = _emulating_class(type(m), base)
        emu.layers[L.name] = L
    model.__dict__[_ROOT_ATTR] = emu
    return model
