"""Which layers a conversion touches: candidates, roles, and the ``keep`` selectors.

**Candidates** are the modules with a weight matrix used as a matrix product:
``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (``nn.Conv3d`` is listed and kept FP32 with the reason),
Hugging Face's ``Conv1D`` (GPT-2's projections, ``y = x W + b`` with ``W`` stored ``(in, out)``),
and the projections of ``nn.MultiheadAttention`` once :func:`~leantrain.quant.attention.prepare_for_quantization`
has made them modules. ``nn.Embedding`` is a table lookup (no multiplication) and always stays FP32.

**Blocks.** A *block container* is an ``nn.ModuleList``/``nn.Sequential`` of at least two children
of one class, each holding a candidate (``encoder.layer`` of BERT, ``h`` of GPT-2, ``layers`` of
``nn.TransformerEncoder``, the stages of a ResNet); its children are *blocks*. Only outermost
containers count. **Roles** (``"role:<name>"`` selectors, and the ``role`` column of the report):

- ``embedding``: a candidate before the first block (module order) or with ``embed`` in its name
  (patch embeddings, a CNN stem);
- ``attention``: inside a block, under a module whose class name or attribute name contains
  ``attention``/``attn`` (query/key/value/output projections, fused ``c_attn``/``in_proj``);
- ``mlp``: any other linear layer inside a block; ``conv``: any other convolution inside a block;
- ``head``: a candidate after the last block (pooler, classifier, language-model head);
- ``other``: no block structure found (a plain MLP or CNN).

**``first`` and ``last``** are defined by data flow on the first calibration batch, not by names:
``first`` is the first candidate *executed* together with every candidate that reads the very same
input tensor (its siblings); ``last`` is the last executed candidate with its siblings. So on BERT
``first`` is layer 0's ``query``, ``key`` and ``value`` (they all read the embedding output; the
embeddings themselves are lookups and stay FP32 anyway), on GPT-2 layer 0's fused ``c_attn``, on
``nn.TransformerEncoder`` layer 0's ``self_attn.in_proj``, on a ViT the patch-embedding convolution,
on a CNN the stem convolution; ``last`` is the classifier / LM head (BERT with a pooler and a
classifier: the classifier; a bare ``BertModel``: the pooler).

Other selectors: an exact module name, or an ``fnmatch`` pattern (``*``, ``?``, ``[``) over module
names. A selector that matches nothing raises ValueError listing the candidates, so a typo is never
silently ignored.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ROLES", "candidates", "is_hf_conv1d", "roles", "resolve_keep", "dataflow_groups"]

ROLES: tuple[str, ...] = ("embedding", "attention", "mlp", "conv", "head", "other")
_MATMUL_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a linear layer with its weight stored ``(in, out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def candidates(model: nn.Module) -> list[str]:
    """Names of the candidate layers (module docstring), in module order."""
    from leantrain.quant.layers import QuantLayer

    return [n for n, m in model.named_modules()
            if n and (isinstance(m, (*_MATMUL_TYPES, QuantLayer)) or is_hf_conv1d(m))]


def _blocks(model: nn.Module, cands: list[str]) -> list[str]:
    found: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        if any(name.startswith(b + ".") for b in found):
            continue
        kids = list(mod.named_children())
        if len({type(c) for _, c in kids}) != 1:
            continue
        prefix = f"{name}." if name else ""
        names = [f"{prefix}{k}" for k, _ in kids]
        if all(any(c == n or c.startswith(n + ".") for c in cands) for n in names):
            found.extend(names)
    return found


def _is_attention(model: nn.Module, block: str, name: str) -> bool:
    path = name[len(block) + 1:].split(".")
    mod: nn.Module = model.get_submodule(block)
    for part in path[:-1]:
        mod = getattr(mod, part)
        key = (type(mod).__name__ + " " + part).lower()
        if "attention" in key or "attn" in key:
            return True
    return False


def roles(model: nn.Module, cands: list[str]) -> dict[str, str]:
    """The role of each candidate (module docstring)."""
    blocks = _blocks(model, cands)
    order = {n: i for i, n in enumerate(cands)}
    in_blocks = [order[c] for c in cands if any(c == b or c.startswith(b + ".") for b in blocks)]
    out: dict[str, str] = {}
    for name in cands:
        block = next((b for b in blocks if name.startswith(b + ".") or name == b), None)
        mod = model.get_submodule(name)
        if block is not None and name != block:
            if _is_attention(model, block, name):
                out[name] = "attention"
            else:
                out[name] = "conv" if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else "mlp"
        elif any("embed" in part.lower() for part in name.split(".")):
            out[name] = "embedding"
        elif not blocks:
            out[name] = "other"
        else:
            out[name] = "embedding" if order[name] < min(in_blocks) else "head" if order[name] > max(in_blocks) else "other"
    return out


def dataflow_groups(model: nn.Module, cands: Sequence[str], call: Callable[[], Any], *,
                    batch_size: int) -> tuple[list[str], list[str], dict[str, int]]:
    """``first`` group, ``last`` group and output positions per sample, from one forward pass ``call()``.

    Candidates that read the same input tensor (same storage, offset, shape and strides) are siblings.
    Positions per sample ``L`` of a layer are ``numel(output) / (K * batch_size)`` for linear layers
    and the output's spatial size for convolutions.
    """
    seen: list[tuple[str, tuple]] = []
    alive: list[Any] = []  # inputs held until the end, so that no storage is freed and reused by a later tensor
    positions: dict[str, int] = {}
    handles = []
    batch = max(int(batch_size), 1)

    def key(t: Any) -> tuple:
        if not isinstance(t, torch.Tensor):
            return (id(t),)
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())

    for name in cands:
        mod = model.get_submodule(name)

        def hook(m: nn.Module, inp: Any, out: Any, name: str = name) -> None:
            if name not in positions:
                alive.append(inp[0] if inp else None)
                seen.append((name, key(alive[-1])))
            if isinstance(out, torch.Tensor):
                conv = isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or \
                    getattr(m, "spec", {}).get("kind", "linear") != "linear"
                k = out.shape[1] if conv else out.shape[-1]
                positions[name] = int(torch.Size(out.shape[2:]).numel()) if conv else max(out.numel() // max(k * batch, 1), 1)

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return [], [], positions

    def group(name: str, k: tuple) -> list[str]:
        return sorted({n for n, kk in seen if kk == k} | {name}, key=list(cands).index)

    return group(*seen[0]), group(*seen[-1]), positions


def resolve_keep(cands: list[str], keep: Sequence[str], role_of: dict[str, str], first: list[str],
                 last: list[str]) -> dict[str, str]:
    """``{layer: reason}`` of the candidates selected by ``keep`` (module docstring)."""
    out: dict[str, str] = {}
    for sel in keep:
        if sel == "first":
            hits = {n: "first layer" for n in first}
        elif sel == "last":
            hits = {n: "last layer" for n in last}
        elif sel.startswith("role:"):
            role = sel[5:]
            if role not in ROLES:
                raise ValueError(f"keep selector {sel!r}: role must be one of {ROLES}")
            hits = {n: f"role {role}" for n in cands if role_of.get(n) == role}
        elif sel in cands:
            hits = {sel: "kept by request"}
        elif any(ch in sel for ch in "*?["):
            hits = {n: f"matches {sel!r}" for n in cands if fnmatch.fnmatchcase(n, sel)}
        else:
            hits = {}
        if not hits and sel not in ("first", "last") and not sel.startswith("role:"):
            raise ValueError(f"keep entry {sel!r} is not 'first', 'last', 'role:<{'|'.join(ROLES)}>', a layer name or a "
                             f"pattern matching a layer; layers are {cands}")
        for n, r in hits.items():
            out.setdefault(n, r)
    return out
