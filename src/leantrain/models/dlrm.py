from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DLRM"]


def _mlp(sizes: Sequence[int], *, last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[k], sizes[k + 1]))
        if k < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """A small DLRM-style click-through model (Naumov et al. 2019): embeddings + MLPs + dot interactions.

    Input rows are ``[dense features (dense), categorical ids (len(cardinalities))]`` as float32, the
    layout of the ``clicks`` data set (ids are exact small integers stored as floats). Then::

        b     = bottom_mlp(dense)                        (batch, d), ReLU after every layer
        e_j   = embedding_j(id_j)                        (batch, d), j = 1..k
        T     = [b, e_1, ..., e_k]                       (batch, k+1, d)
        z     = { <T_p, T_q> : p < q }                   (batch, (k+1)k/2) pairwise dot products
        logit = top_mlp([b, z])                          (batch,), no activation on the last layer

    Output: one click logit per row, shape (batch,); train with
    ``binary_cross_entropy_with_logits``. Every GEMM is an ``nn.Linear``, every lookup an
    ``nn.Embedding``. Ids outside ``[0, cardinality)`` raise ValueError.
    """

    def __init__(self, dense: int = 8, cardinalities: Sequence[int] = (50, 30, 20, 10), embed_dim: int = 8,
                 bottom: Sequence[int] = (32,), top: Sequence[int] = (32,)) -> None:
        super().__init__()
        cards = [int(c) for c in cardinalities]
        if dense < 1:
            raise ValueError(f"dense must be >= 1, got {dense}")
        if not cards or min(cards) < 1:
            raise ValueError(f"cardinalities must be a non-empty list of sizes >= 1, got {list(cardinalities)}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        self.dense = dense
        self.register_buffer("cardinalities", torch.tensor(cards, dtype=torch.long), persistent=False)
        self.embeddings = nn.ModuleList(nn.Embedding(c, embed_dim) for c in cards)
        self.bottom = _mlp([dense, *bottom, embed_dim], last_activation=True)
        n = len(cards) + 1
        p, q = torch.triu_indices(n, n, offset=1)
        self.register_buffer("pairs_p", p, persistent=False)
        self.register_buffer("pairs_q", q, persistent=False)
        self.top = _mlp([embed_dim + len(p), *top, 1], last_activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.embeddings)
        if x.dim() != 2 or x.shape[1] != self.dense + k:
            raise ValueError(f"DLRM input must be (batch, {self.dense} dense + {k} ids), got shape {tuple(x.shape)}")
        ids = x[:, self.dense:].round().long()
        if bool(((ids < 0) | (ids >= self.cardinalities)).any()):
            raise ValueError(f"DLRM categorical ids must lie in [0, cardinality) = {self.cardinalities.tolist()}")
        b = self.bottom(x[:, :self.dense])
        t = torch.stack([b, *(emb(ids[:, j]) for j, emb in enumerate(self.embeddings))], dim=1)
        z = torch.bmm(t, t.transpose(1, 2))[:, self.pairs_p, self.pairs_q]
        return self.top(torch.cat([b, z], dim=1)).reshape(-1)
