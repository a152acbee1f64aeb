"""``emulate(model, policy)`` and ``emulating(policy)``: run every GEMM of any PyTorch model in emulated low
precision.

The GEMMs themselves are intercepted, not module classes (:mod:`leantrain.precision.intercept`): ``F.linear``,
matrix products of every spelling, ``einsum``, convolutions, scaled-dot-product attention (decomposed into its two
GEMMs), ``nn.MultiheadAttention``, LSTM/GRU/RNN layers (decomposed into their GEMMs) and embeddings, whichever
module or function issues them: HF transformers' attention and ``Conv1D`` (``torch.addmm``), a timm-style ViT whose
root module owns parameters, a custom layer doing ``x @ self.w``. Each routed GEMM rounds its operands as the
policy says for its kind (parameter or activation GEMM), in the forward pass and in both backward GEMMs.

:func:`emulate` changes no class and no parameter: it registers a forward pre-hook and an always-called forward
hook on the model's modules, which keep the name of the running module (for the :class:`Recorder` and the audit)
and activate the interception while the model (or any of its modules) runs forward; the backward pass is emulated
by the autograd functions the forward recorded. ``state_dict`` keys and values are unchanged, any
``torch.optim`` optimizer keeps working, the model pickles and deep-copies. With the ``fp32`` policy (no rounding
anywhere) nothing is intercepted, so training is bit-identical to the plain model. :func:`restore` undoes it.
:func:`emulating` is the same for functional code (a context manager).

Only float32 models are emulated (the policies accumulate in FP32): a float64 or float16 parameter or operand is a
TypeError. Layers that cannot be emulated are listed by :func:`unsupported_layers` and refused unless named in
``allow_unsupported`` (then every GEMM they issue runs FP32, as :meth:`Emulation.describe` lists).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from leantrain.precision.instrument import Recorder
from leantrain.precision.intercept import GemmInterceptor, GemmNumerics
from leantrain.precision.operands import LayerNumerics, OperandBuffers, RandomStreams, RoundedInputs
from leantrain.precision.policy import Policy, get_policy

__all__ = ["Emulation", "emulate", "emulating", "restore", "emulation_of", "unsupported_layers", "FP32_LAYERS",
           "INTERCEPTED"]

FP32_LAYERS: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None), nn.PReLU,
    ) if t is not None
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_GEMM_MODULES = (nn.Linear, nn.Bilinear, nn.Embedding, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention, *_CONV)
_ROOT_ATTR = "_leantrain_emulation"
INTERCEPTED = (
    "F.linear; torch.matmul / @ / mm / bmm / mv / dot / inner / vdot / linalg.multi_dot / chain_matmul; "
    "addmm / baddbmm / addbmm / addmv (transformers' Conv1D); einsum and tensordot (pairwise batched GEMMs); "
    "F.bilinear",
    "F.conv1d/2d/3d, F.conv_transpose1d/2d/3d (any stride, padding, dilation, groups)",
    "F.scaled_dot_product_attention, decomposed: Q K^T and P V emulated, scale, mask, softmax FP32",
    "nn.MultiheadAttention (F.multi_head_attention_forward runs with the interception active)",
    "nn.LSTM / nn.GRU / nn.RNN and their cells, decomposed: input and recurrent GEMMs emulated, gates FP32",
    "F.embedding (table rows rounded like W, gradient rows like dY) when the policy rounds embeddings",
)


@dataclass
class Emulation:
    """What :func:`emulate` (or :func:`emulating`) does: the policy, the numerics of every GEMM site met so far
    (``layers``: qualified module name, ``":activation"`` appended for activation GEMMs; modules that hold GEMM
    parameters are listed from the start), the modules left FP32 by ``allow_unsupported`` (``fp32_layers``), the
    FP32 normalization layers, the recorder and the stochastic-rounding streams. Stored on the model; get it with
    :func:`emulation_of`. It is also the routing state of :class:`GemmInterceptor`: the stack of running
    modules and the per-kind policies."""

    policy: Policy
    layers: dict[str, LayerNumerics] = field(default_factory=dict)
    fp32_layers: list[str] = field(default_factory=list)
    norm_layers: list[str] = field(default_factory=list)
    recorder: Recorder | None = None
    streams: RandomStreams = field(default_factory=RandomStreams)
    root: str = "functional"
    training: bool = True

    def __post_init__(self) -> None:
        self._kinds = {"parameter": self.policy, "embedding": self.policy,
                       "activation": self.policy.for_kind("activation")}
        self._sites: dict[tuple[str | None, str], GemmNumerics] = {}
        self._stack: list[tuple[str, nn.Module, bool]] = []
        self._mode: GemmInterceptor | None = None
        self._inputs = RoundedInputs()
        self._buffers = OperandBuffers()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stack"], state["_mode"] = [], None  # run-time only
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_inputs", RoundedInputs())  # pickled before these two existed
        state.setdefault("_buffers", OperandBuffers())
        self.__dict__.update(state)

    # -------------------------------------------------------------- routing (called by GemmInterceptor)

    def numerics(self, kind: str) -> GemmNumerics:
        """The numerics of the GEMMs of ``kind`` issued by the innermost running module."""
        if self._stack:
            name, module, _ = self._stack[-1]
            training = module.training
        else:
            name, training = None, self.training
        L = self._sites.get((name, kind))
        if L is None:
            L = self._site(name, kind)
        L.training = training
        return L

    def _site(self, name: str | None, kind: str) -> GemmNumerics:
        label = name or self.root
        if kind == "activation":
            label += ":activation"
        L = GemmNumerics(label, self._kinds[kind], self.recorder, self.streams, inputs=self._inputs,
                         buffers=self._buffers, kind=kind)
        self._sites[(name, kind)] = L
        self.layers[label] = L
        return L

    def passthrough(self) -> bool:
        """Whether the running module is (inside) one left FP32 by ``allow_unsupported``."""
        return bool(self._stack) and self._stack[-1][2]

    def enter(self, name: str, module: nn.Module) -> None:
        """A module's forward starts (forward pre-hook): the outermost one activates the interception."""
        allowed = name in self.fp32_layers or (bool(self._stack) and self._stack[-1][2])
        self._stack.append((name, module, allowed))
        if len(self._stack) == 1 and self._mode is None and self.policy.rounds:
            self._mode = GemmInterceptor(self)
            self._mode.__enter__()

    def exit(self) -> None:
        """A module's forward ended, normally or by an exception (always-called forward hook)."""
        if self._stack:
            self._stack.pop()
        if not self._stack and self._mode is not None:
            mode, self._mode = self._mode, None
            self._inputs.clear()
            mode.__exit__(None, None, None)

    # ---------------------------------------------------------------------------------- description

    def describe(self) -> str:
        """The policy's data-flow table, what is intercepted, and everything that stays FP32."""
        lines = [self.policy.describe(), "", "- intercepted GEMMs (forward and both backward GEMMs):"]
        lines += [f"  - {s}" for s in INTERCEPTED]
        sites = [n for n, L in self.layers.items()]
        lines.append(f"- GEMM sites ({len(sites)}; more are added as the model runs): " + (", ".join(sites) or "none"))
        fp32 = []
        if not self.policy.rounds:
            fp32.append("every GEMM (the policy rounds nothing: the model runs its plain FP32 code)")
        else:
            for kind in ("parameter", "activation"):
                if not any(g.rounds for g in self._kinds[kind].gemms().values()):
                    fp32.append(f"{kind} GEMMs (the policy rounds none of their inputs)")
            if not self.policy.embeddings:
                fp32.append("embedding lookups (policy embeddings=False)")
        if self.norm_layers:
            fp32.append(f"normalization layers ({len(self.norm_layers)}): " + ", ".join(self.norm_layers))
        if self.fp32_layers:
            fp32.append("every GEMM inside the modules named in allow_unsupported: " + ", ".join(self.fp32_layers))
        fp32.append("GEMMs inside C++ operators leantrain does not route (e.g. torch.cdist, conv_tbc, custom "
                    "extensions): leantrain.precision.audit(model, inputs) counts them; it finds none in the "
                    "tested models")
        lines.append("- FP32:")
        lines += [f"  - {s}" for s in fp32]
        return "\n".join(lines)


class _Enter:
    """Forward pre-hook: the module ``name`` starts running (a class, not a closure, so the model pickles)."""

    def __init__(self, emulation: Emulation, name: str) -> None:
        self.emulation, self.name = emulation, name

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.emulation.enter(self.name, module)


class _Exit:
    """Forward hook, called also when the forward raised."""

    def __init__(self, emulation: Emulation) -> None:
        self.emulation = emulation

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.emulation.exit()


# ------------------------------------------------------------------------------------- inspection

def _reason(m: nn.Module, policy: Policy) -> str | None:
    """Why ``m`` cannot be emulated under ``policy`` (None: it can, or it needs no emulation)."""
    if not policy.rounds:
        return None
    if isinstance(m, nn.Embedding) and policy.embeddings and (m.max_norm is not None or m.sparse
                                                              or m.scale_grad_by_freq):
        return "nn.Embedding with max_norm, sparse or scale_grad_by_freq is not emulated"
    if isinstance(m, nn.EmbeddingBag) and policy.embeddings:
        return "nn.EmbeddingBag (F.embedding_bag) is not emulated"
    if isinstance(m, _CONV) and policy.forward.integer:
        if len(m.kernel_size) > 2:
            return "DFP emulation supports 1-d and 2-d convolutions only"
    return None


def unsupported_layers(model: nn.Module, policy: str | Policy = "bf16") -> list[tuple[str, str, str]]:
    """``(qualified name, type name, reason)`` of every layer of ``model`` that :func:`emulate` cannot emulate
    under ``policy``. Children of such a layer are not listed (its own code uses them). GEMMs issued anywhere
    else are intercepted; :func:`leantrain.precision.audit` checks that on real inputs."""
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
    """Undo :func:`emulate`: remove its hooks and its :class:`Emulation`. Returns ``model``."""
    for m in model.modules():
        for key, hook in list(m._forward_pre_hooks.items()):
            if isinstance(hook, _Enter):
                del m._forward_pre_hooks[key]
        for key, hook in list(m._forward_hooks.items()):
            if isinstance(hook, _Exit):
                del m._forward_hooks[key]
                m._forward_hooks_always_called.pop(key, None)
        m.__dict__.pop(_ROOT_ATTR, None)  # also an emulation of a submodule, whose hooks just went
    return model


def _check_float32(model: nn.Module) -> None:
    bad = [(n, p.dtype) for n, p in model.named_parameters() if p.is_floating_point() and p.dtype.itemsize != 4]
    if bad:
        listing = ", ".join(f"{n} ({str(d).replace('torch.', '')})" for n, d in bad[:5])
        raise TypeError(f"emulate needs a float32 model (the emulated GEMMs accumulate in FP32); {len(bad)} "
                        f"parameter(s) are not float32: {listing}{' ...' if len(bad) > 5 else ''}; "
                        "convert it with model.float()")


def emulate(model: nn.Module, policy: str | Policy, *, recorder: Recorder | None = None, seed: int = 0,
            allow_unsupported: Iterable[str | type] = ()) -> nn.Module:
    """Emulate ``policy`` in every GEMM of ``model``, in place, and return the same ``model``.

    Args:
        model: any float32 ``nn.Module``; may already be emulated (its previous policy is replaced).
        policy: a :class:`Policy` or a name from :data:`leantrain.precision.POLICIES`.
        recorder: a :class:`Recorder` that receives rounding statistics (training mode only).
        seed: seed of the stochastic-rounding generators (one per device).
        allow_unsupported: qualified module names (or module types) of layers that may stay FP32;
            every unsupported layer must be named, and every name must be such a layer.

    Raises:
        ValueError: a layer cannot be emulated and is not in ``allow_unsupported`` (all are listed),
            or ``allow_unsupported`` names a layer that is not unsupported.
        TypeError: ``model`` is not an ``nn.Module``, has parameters that are not float32, or ``recorder`` is
            not a :class:`Recorder`.
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
    _check_float32(model)
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
                         "name them in allow_unsupported=[...] to keep them FP32 explicitly")
    emu = Emulation(pol, recorder=recorder, streams=RandomStreams(seed), fp32_layers=sorted(names),
                    root=type(model).__name__)
    # nn.MultiheadAttention runs its out_proj weight itself (F.linear in its own GEMM site): no site for out_proj
    mha = [n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, m in model.named_modules():
        inside = any(b == "" or name == b or name.startswith(b + ".") for b in names) or name.startswith(tuple(mha))
        if isinstance(m, FP32_LAYERS):
            emu.norm_layers.append(name)
        elif isinstance(m, _GEMM_MODULES) and not inside:
            emu._site(name, "embedding" if isinstance(m, nn.Embedding) else "parameter")
        # Leaves without parameters or buffers (activations, dropout, pooling) issue no GEMM of their own: no
        # hooks there, which keeps the per-module cost off the many small modules of a transformer.
        if m is model or any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False)) \
                or any(True for _ in m.buffers(recurse=False)):
            m.register_forward_pre_hook(_Enter(emu, name), prepend=True)
            m.register_forward_hook(_Exit(emu), always_call=True)
    model.__dict__[_ROOT_ATTR] = emu
    return model


@contextmanager
def emulating(policy: str | Policy, *, recorder: Recorder | None = None, seed: int = 0,
              name: str = "functional") -> Iterator[Emulation]:
    """Emulate ``policy`` in every GEMM run inside the ``with`` block (functional code), forward and backward::

        with emulating("bf16") as emu:
            y = torch.softmax(q @ k.mT, -1) @ v
        y.sum().backward()            # the backward GEMMs are emulated too (recorded by the forward)

    GEMMs are attributed to ``name`` (and to the module running, for modules called inside the block). An
    emulated model called inside keeps its own policy. Yields the :class:`Emulation` (its ``layers``,
    ``describe()``)."""
    emu = Emulation(get_policy(policy), recorder=recorder, streams=RandomStreams(seed), root=name)
    if not emu.policy.rounds:
        yield emu
        return
    try:
        with GemmInterceptor(emu):
            yield emu
    finally:
        emu._inputs.clear()
