"""Data sets shipped by installed packages: scikit-learn's digits and breast cancer, mnist1d."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from leantrain.data.split import DatasetInfo, Split, register_dataset
from leantrain.storage import write_bytes

__all__ = ["digits", "breast_cancer", "mnist1d", "cache_dir", "stratified_split"]


def cache_dir() -> Path:
    """``$LEANTRAIN_CACHE`` or ``$XDG_CACHE_HOME/leantrain`` or ``~/.cache/leantrain``."""
    env = os.environ.get("LEANTRAIN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "leantrain"


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with ``test_fraction`` of each class in test, from a seeded permutation."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@register_dataset("digits", description="scikit-learn 8x8 handwritten digits, 10 classes (1797 images)")
def digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn digits: images (1, 8, 8) scaled from 0..16 to [0, 1]; stratified split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, test_fraction, seed)
    info = DatasetInfo("digits", (1, 8, 8), 10, "classification",
                       f"pixels / 16 -> [0, 1]; stratified {1 - test_fraction:.0%}/{test_fraction:.0%} split, seed {seed}")
    return Split(TensorDataset(torch.from_numpy(x[tr]), torch.from_numpy(y[tr])),
                 TensorDataset(torch.from_numpy(x[te]), torch.from_numpy(y[te])), info)


@register_dataset("breast_cancer", description="scikit-learn Wisconsin breast cancer, binary, 30 features (569)")
def breast_cancer(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Breast cancer: 30 features standardized with the *training* mean and std; labels 0/1."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = d.data.astype(np.float64)
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, test_fraction, seed)
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd[sd == 0] = 1.0
    x = ((x - mu) / sd).astype(np.float32)
    info = DatasetInfo("breast_cancer", (30,), 2, "binary",
                       "features standardized by training-set mean/std; stratified split, seed "
                       f"{seed}; label 1 = benign")
    return Split(TensorDataset(torch.from_numpy(x[tr]), torch.from_numpy(y[tr])),
                 TensorDataset(torch.from_numpy(x[te]), torch.from_numpy(y[te])), info)


@register_dataset("mnist1d", description="MNIST-1D (Greydanus 2020), generated locally, 40-long signals, 10 classes")
def mnist1d(num_samples: int = 5000, seed: int = 42) -> Split:
    """MNIST-1D generated with the ``mnist1d`` package's own generator (its default arguments,
    ``num_samples`` and ``seed`` aside; 80/20 split as the package makes it), cached as a pickle
    under :func:`cache_dir`. Inputs have shape (1, 40) so 1-D convolutions apply directly."""
    import mnist1d.data as m1d

    path = cache_dir() / f"mnist1d_n{num_samples}_s{seed}.pkl"
    data = None
    if path.is_file():
        try:
            data = pickle.loads(path.read_bytes())
        except Exception:
            data = None  # a corrupt cache is regenerated
    if data is None:
        args = m1d.get_dataset_args()
        args.num_samples = num_samples
        args.seed = seed
        full = m1d.make_dataset(args)
        data = {k: np.asarray(full[k]) for k in ("x", "y", "x_test", "y_test")}
        write_bytes(path, pickle.dumps(data))
    tx = torch.from_numpy(data["x"].astype(np.float32))[:, None, :]
    vx = torch.from_numpy(data["x_test"].astype(np.float32))[:, None, :]
    info = DatasetInfo("mnist1d", (1, 40), 10, "classification",
                       f"mnist1d.make_dataset defaults, num_samples={num_samples}, seed={seed}; no rescaling")
    return Split(TensorDataset(tx, torch.from_numpy(data["y"].astype(np.int64))),
                 TensorDataset(vx, torch.from_numpy(data["y_test"].astype(np.int64))), info)
