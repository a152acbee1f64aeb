"""Offline data sets with a fixed train/test split and documented preprocessing.

Every loader returns a :class:`Split`: two ``torch.utils.data.TensorDataset``s (inputs float32,
targets int64 for classification, float32 for regression/binary-probability tasks) plus a
:class:`DatasetInfo`. Splits are fixed: the same call gives the same split on any machine.
Nothing is downloaded; bundled sets come from installed packages or are generated from a seed.

Use :func:`load_dataset` by name; ``leantrain data list`` prints :func:`catalog`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

__all__ = ["DatasetInfo", "Split", "register_dataset", "load_dataset", "catalog", "DATASETS"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is: its input shape (one sample), number of classes (0 = regression),
    task (``"classification"``, ``"binary"``, ``"language"``, ``"regression"``), and how it was
    preprocessed."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    task: str
    preprocessing: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Split:
    """A fixed train/test split and its description."""

    train: TensorDataset
    test: TensorDataset
    info: DatasetInfo

    def tensors(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The (inputs, targets) tensors of ``split`` (``"train"`` or ``"test"``)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        ds = self.train if split == "train" else self.test
        return ds.tensors[0], ds.tensors[1]


@dataclass(frozen=True)
class _Entry:
    loader: Callable[..., Split]
    description: str
    bundled: bool


DATASETS: dict[str, _Entry] = {}


def register_dataset(name: str, *, description: str, bundled: bool = True):
    """Decorator registering a loader ``fn(**kwargs) -> Split`` under ``name``."""

    def deco(fn: Callable[..., Split]) -> Callable[..., Split]:
        DATASETS[name] = _Entry(fn, description, bundled)
        return fn

    return deco


def _ensure_loaded() -> None:
    # Import for their registration side effect; kept lazy so `import leantrain.data` is cheap.
    from leantrain.data import bundled, synthetic, text  # noqa: F401

    try:
        from leantrain.data import files  # noqa: F401
    except ImportError:  # files.py is optional while it is being written
        pass


def load_dataset(name: str, **kwargs: Any) -> Split:
    """Load a registered data set by name; keyword arguments go to its loader."""
    _ensure_loaded()
    if name not in DATASETS:
        if isinstance(name, str) and ("/" in name or "." in name):  # a path given where a name belongs
            state = "exists" if Path(name).is_file() else "does not exist"
            raise ValueError(f"dataset {name!r} is a path, not a data set name (the file {state}); for a LIBSVM "
                             f"file use dataset 'libsvm' with train={name} (CLI: --dataset libsvm --data-arg "
                             f"train={name}); names: {sorted(DATASETS)}")
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name].loader(**kwargs)


def catalog() -> list[dict[str, Any]]:
    """One row per bundled data set: name, shapes, classes, task, description."""
    _ensure_loaded()
    rows = []
    for name, entry in sorted(DATASETS.items()):
        row: dict[str, Any] = {"name": name, "description": entry.description, "bundled": entry.bundled}
        if entry.bundled:
            split = entry.loader()
            row.update(
                input_shape=list(split.info.input_shape),
                num_classes=split.info.num_classes,
                task=split.info.task,
                n_train=len(split.train),
                n_test=len(split.test),
            )
        rows.append(row)
    return rows
