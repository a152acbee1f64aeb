from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Generator", "Discriminator"]


def _check_shape(data_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in data_shape)
    if len(shape) == 1 and shape[0] >= 1:
        return shape
    if len(shape) == 3:
        c, h, w = shape
        if c >= 1 and h == w and h >= 8 and (h & (h - 1)) == 0:
            return shape
    raise ValueError("data_shape must be (features,) for vector data or (channels, size, size) with size a power "
                     f"of two >= 8 (8, 16, 32, ...), got {tuple(data_shape)}")


class Generator(nn.Module):
    """DCGAN-style generator (Radford et al. 2016) at toy scale, or an MLP for vector data.

    Images, ``data_shape=(C, S, S)`` with S = 8, 16, 32, ...: ``z -> Linear -> (4w, 4, 4)`` (the
    DCGAN "project and reshape"), then ``log2(S/4)`` blocks of
    ``ConvTranspose2d(k=4, stride=2, pad=1)`` doubling the side, BatchNorm + ReLU between blocks,
    channels halving from ``4*width``; the last block outputs C channels through ``tanh``, so
    samples lie in [-1, 1] (scale image data to that range).

    Vectors, ``data_shape=(D,)`` (e.g. a 2-D Gaussian mixture): ``Linear -> ReLU`` x ``depth`` then a
    linear output (no tanh, no BatchNorm, so any range and no batch coupling).

    Input: latent codes (batch, latent_dim), use :meth:`sample_latent`. Output: (batch, *data_shape).
    """

    def __init__(self, latent_dim: int = 16, data_shape: Sequence[int] = (1, 8, 8), width: int = 32,
                 depth: int = 3) -> None:
        super().__init__()
        if latent_dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"latent_dim, width and depth must be >= 1, got {latent_dim}, {width}, {depth}")
        self.latent_dim = latent_dim
        self.data_shape = _check_shape(data_shape)
        if len(self.data_shape) == 1:
            layers: list[nn.Module] = []
            d = latent_dim
            for _ in range(depth):
                layers += [nn.Linear(d, width), nn.ReLU()]
                d = width
            layers.append(nn.Linear(d, self.data_shape[0]))
            self.net = nn.Sequential(*layers)
            return
        c, s, _ = self.data_shape
        ups = (s // 4).bit_length() - 1
        ch = width * 2 ** (ups - 1) if ups > 1 else width
        layers = [nn.Linear(latent_dim, ch * 16), nn.Unflatten(1, (ch, 4, 4)), nn.BatchNorm2d(ch), nn.ReLU()]
        for k in range(ups):
            last = k == ups - 1
            nxt = c if last else max(ch // 2, 1)
            layers.append(nn.ConvTranspose2d(ch, nxt, 4, stride=2, padding=1, bias=last))
            layers += [nn.Tanh()] if last else [nn.BatchNorm2d(nxt), nn.ReLU()]
            ch = nxt
        self.net = nn.Sequential(*layers)

    def sample_latent(self, n: int, *, generator: torch.Generator | None = None,
                      device: str | torch.device = "cpu") -> torch.Tensor:
        """``n`` latent codes z ~ N(0, I)."""
        return torch.randn(n, self.latent_dim, generator=generator).to(device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"Generator input must be (batch, {self.latent_dim}), got shape {tuple(z.shape)}")
        return self.net(z)


class Discriminator(nn.Module):
    """DCGAN-style discriminator, or an MLP for vector data; outputs one real/fake logit per sample.

    Images ``(C, S, S)``: ``Conv2d(k=4, stride=2, pad=1)`` blocks halving the side down to 4x4,
    channels doubling from ``width``, LeakyReLU(0.2), BatchNorm on all but the first block (as in
    DCGAN), then ``Linear(4*4*ch -> 1)``. Vectors ``(D,)``: ``Linear -> LeakyReLU(0.2)`` x ``depth``
    then ``Linear -> 1``. Output: (batch,) logits; train with
    ``binary_cross_entropy_with_logits``.
    """

    def __init__(self, data_shape: Sequence[int] = (1, 8, 8), width: int = 32, depth: int = 3) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got {width}, {depth}")
        self.data_shape = _check_shape(data_shape)
        if len(self.data_shape) == 1:
            layers: list[nn.Module] = []
            d = self.data_shape[0]
            for _ in range(depth):
                layers += [nn.Linear(d, width), nn.LeakyReLU(0.2)]
                d = width
            layers.append(nn.Linear(d, 1))
            self.net = nn.Sequential(*layers)
            return
        c, s, _ = self.data_shape
        downs = (s // 4).bit_length() - 1
        layers = []
        ch_in, ch = c, width
        for k in range(downs):
            layers.append(nn.Conv2d(ch_in, ch, 4, stride=2, padding=1, bias=k == 0))
            if k > 0:
                layers.append(nn.BatchNorm2d(ch))
            layers.append(nn.LeakyReLU(0.2))
            ch_in, ch = ch, ch * 2
        layers += [nn.Flatten(), nn.Linear(ch_in * 16, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"Discriminator input must be (batch, {', '.join(map(str, self.data_shape))}), "
                             f"got shape {tuple(x.shape)}")
        return self.net(x).reshape(-1)
