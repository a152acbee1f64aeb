"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` modules, so they can be quantized.

``nn.MultiheadAttention`` keeps its query/key/value projection as a bare parameter
(``in_proj_weight``) consumed inside ``F.multi_head_attention_forward``, and torch's fused
transformer fast path (``torch._transformer_encoder_layer_fwd``, taken by ``nn.TransformerEncoderLayer``
in eval mode) reads ``linear1.weight`` & co. directly. A quantized layer swapped in by module
replacement would be bypassed silently by both. :func:`prepare_for_quantization` therefore

- replaces every ``nn.MultiheadAttention`` (equal query/key/value widths, no ``bias_k``/``add_zero_attn``)
  by a :class:`ProjectedAttention` with the same parameters as ``in_proj`` (``nn.Linear(E, 3E)``,
  rows ``[W_q; W_k; W_v]``) and ``out_proj`` (``nn.Linear(E, E)``), computing the same function
  (scaled dot-product attention, same mask conventions, same dropout); others stay as they are and
  are reported as kept FP32;
- turns off ``use_nested_tensor`` on every ``nn.TransformerEncoder`` (the nested-tensor fast path);
- attaches :func:`no_fused_fast_path` as a forward pre-hook to every module it creates; torch's
  encoder-layer fast path is documented to be skipped when a submodule has forward hooks, so the
  layers run through their Python ``forward``, i.e. through the quantized modules.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ProjectedAttention", "prepare_for_quantization", "no_fused_fast_path"]


def no_fused_fast_path(module: nn.Module, args: Any) -> None:
    """Forward pre-hook that does nothing; its presence disables torch's fused transformer fast path."""
    return None


class ProjectedAttention(nn.Module):
    """Multi-head attention equal to ``nn.MultiheadAttention`` with ``in_proj``/``out_proj`` as modules.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` follows ``nn.MultiheadAttention``: inputs
    ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``) or unbatched ``(L, E)``; boolean masks are True
    where attention is *not* allowed, float masks are added to the scores; ``is_causal`` without an
    ``attn_mask`` applies the causal mask. Returns ``(output, weights or None)``.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        E = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = E, mha.num_heads, E // mha.num_heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self._qkv_same_embed_dim = True
        has_bias = mha.in_proj_bias is not None
        dev, dt = mha.in_proj_weight.device, mha.in_proj_weight.dtype
        self.in_proj = nn.Linear(E, 3 * E, bias=has_bias, device=dev, dtype=dt)
        self.out_proj = nn.Linear(E, E, bias=mha.out_proj.bias is not None, device=dev, dtype=dt)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            if has_bias:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.register_forward_pre_hook(no_fused_fast_path)

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return getattr(self.in_proj, "bias", None)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        L, N, E = query.shape
        S, H, hd = key.shape[0], self.num_heads, self.head_dim
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:  # cross attention: each input through the same projection, its own third kept
            q = self.in_proj(query)[..., :E]
            k = self.in_proj(key)[..., E:2 * E]
            v = self.in_proj(value)[..., 2 * E:]
        q = q.reshape(L, N * H, hd).transpose(0, 1)
        k = k.reshape(S, N * H, hd).transpose(0, 1)
        v = v.reshape(S, N * H, hd).transpose(0, 1)
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(hd)  # (N*H, L, S)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            add = _additive(attn_mask, scores.dtype)
            scores = scores + (add.unsqueeze(0) if add.dim() == 2 else add)
        if key_padding_mask is not None:
            add = _additive(key_padding_mask, scores.dtype)  # (N, S)
            scores = (scores.view(N, H, L, S) + add[:, None, None, :]).view(N * H, L, S)
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(L, N, E)
        out = self.out_proj(out)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        elif not batched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        w = weights.view(N, H, L, S)
        w = w.mean(dim=1) if average_attn_weights else w
        return out, (w if batched else w.squeeze(0))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _supported(mha: nn.MultiheadAttention) -> str | None:
    if not mha._qkv_same_embed_dim:
        return "nn.MultiheadAttention with kdim/vdim != embed_dim"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv/add_zero_attn"
    return None


def prepare_for_quantization(model: nn.Module) -> dict[str, str]:
    """Rewrite ``model`` in place (module docstring); returns ``{module name: reason}`` of attention left as is."""
    unsupported: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.TransformerEncoder):
            mod.use_nested_tensor = False
        if isinstance(mod, nn.MultiheadAttention):
            reason = _supported(mod)
            if reason:
                unsupported[name] = reason
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not parent_name and not child:
                raise ValueError("the model itself is an nn.MultiheadAttention; wrap it in a module to quantize it")
            setattr(parent, child, ProjectedAttention(mod))
    return unsupported
