"""Seeded synthetic data sets: learnable structure, any size, no download.

Each generator draws from ``numpy.random.default_rng(seed)``; train and test come from the same
distribution (test drawn after train from the same stream), so the split is fixed by the seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from leantrain.data.split import DatasetInfo, Split, register_dataset
from leantrain.validation import check_int, check_range, check_seed

__all__ = ["gaussian_mixture", "synthetic_images", "clicks"]


@register_dataset("gmm", description="Gaussian mixture classification, k classes in d dims (seeded)")
def gaussian_mixture(n_train: int = 2000, n_test: int = 1000, dim: int = 2, classes: int = 4,
                     separation: float = 3.0, seed: int = 0) -> Split:
    """Class c ~ N(mu_c, I); means drawn N(0, separation^2 I / dim ... ) once from the seed.

    Means are ``separation * m_c`` with ``m_c`` uniformly on the unit sphere, so the separation is
    the distance scale between class centres regardless of ``dim``.
    """
    for name, v in (("n_train", n_train), ("n_test", n_test), ("dim", dim)):
        check_int(name, v, 1)
    check_int("classes", classes, 2)
    check_range("separation", separation, 0)
    check_seed("seed", seed)
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(classes, dim))
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    means = separation * m

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, classes, size=n)
        x = means[y] + rng.normal(size=(n, dim))
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    info = DatasetInfo("gmm", (dim,), classes, "classification",
                       f"unit-variance Gaussians, centres at distance {separation} from 0, seed {seed}")
    return Split(TensorDataset(*draw(n_train)), TensorDataset(*draw(n_test)), info)


@register_dataset("synthimages", description="synthetic 32x32x3 images, 10 classes of oriented textures+colour")
def synthetic_images(n_train: int = 5000, n_test: int = 1000, size: int = 32, classes: int = 10,
                     noise: float = 0.5, seed: int = 0) -> Split:
    """Images with learnable, convolution-friendly structure.

    Class c has a fixed orientation ``theta_c = pi c / classes`` and colour vector; an image is
    ``colour_c[:, None, None] * sin(2 pi f (x cos theta + y sin theta) + phase)`` with random
    frequency ``f`` in [2, 5] cycles per image and random phase, plus N(0, noise^2) pixel noise.
    Orientation is the label, so a CNN must learn oriented filters; the noise keeps it from being
    trivially separable. Inputs are (3, size, size) float32, roughly zero-mean, unit-scale.
    """
    if size < 4 or classes < 2 or n_train < 1 or n_test < 1:
        raise ValueError("size must be >= 4, classes >= 2, n_train/n_test >= 1")
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.3, 1.0, size=(classes, 3)).astype(np.float32)
    grid = np.linspace(0.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, classes, size=n)
        theta = np.pi * y / classes + rng.normal(scale=0.05, size=n)
        f = rng.uniform(2.0, 5.0, size=n)
        phase = rng.uniform(0, 2 * np.pi, size=n)
        proj = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]
        wave = np.sin(2 * np.pi * f[:, None, None] * proj + phase[:, None, None]).astype(np.float32)
        img = colours[y][:, :, None, None] * wave[:, None]
        img = img + noise * rng.normal(size=img.shape).astype(np.float32)
        return torch.from_numpy(img.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    info = DatasetInfo("synthimages", (3, size, size), classes, "classification",
                       f"oriented coloured gratings, pixel noise sd {noise}, seed {seed}")
    return Split(TensorDataset(*draw(n_train)), TensorDataset(*draw(n_test)), info)


@register_dataset("clicks", description="synthetic click-through data: dense + categorical features, binary")
def clicks(n_train: int = 20000, n_test: int = 5000, dense: int = 8, cardinalities: tuple[int, ...] = (50, 30, 20, 10),
           embed_dim: int = 4, seed: int = 0) -> Split:
    """Click-through data for DLRM-style models.

    Inputs are float32 rows ``[dense features (dense), categorical ids (len(cardinalities))]``;
    ids are stored as exact small floats and split off by the model (see ``info.extra``). The
    label is Bernoulli(sigmoid(logit)) where the logit is a fixed random linear function of the
    dense features plus pairwise dot products of hidden per-category embeddings (the interaction
    structure DLRM's dot-product layer is built to capture), centred to a ~25% click rate.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.5, size=dense)
    tables = [rng.normal(scale=0.7, size=(c, embed_dim)) for c in cardinalities]

    def logits(xd: np.ndarray, ids: np.ndarray) -> np.ndarray:
        z = xd @ w
        embs = [tables[j][ids[:, j]] for j in range(len(tables))]
        for a in range(len(embs)):
            for b in range(a + 1, len(embs)):
                z = z + (embs[a] * embs[b]).sum(1)
        return z

    probe_d = rng.normal(size=(4000, dense))
    probe_i = np.stack([rng.integers(0, c, 4000) for c in cardinalities], 1)
    offset = np.quantile(logits(probe_d, probe_i), 0.75)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xd = rng.normal(size=(n, dense))
        ids = np.stack([rng.integers(0, c, n) for c in cardinalities], 1)
        p = 1.0 / (1.0 + np.exp(-(logits(xd, ids) - offset)))
        y = (rng.uniform(size=n) < p).astype(np.int64)
        x = np.concatenate([xd, ids], 1).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)

    info = DatasetInfo("clicks", (dense + len(cardinalities),), 2, "binary",
                       f"dense N(0,1) features; categorical ids as floats; seed {seed}",
                       extra={"dense": dense, "cardinalities": list(cardinalities)})
    return Split(TensorDataset(*draw(n_train)), TensorDataset(*draw(n_test)), info)
