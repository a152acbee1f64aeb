"""What a data set is (:class:`DatasetInfo`), a fixed split (:class:`Split`) and the registry of loaders.

The loader modules (bundled, synthetic, text, files) import this module to register themselves;
:mod:`leantrain.data` imports them, so there is no import cycle and a loader module that fails to
import raises at ``import leantrain.data`` instead of silently missing from the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import TensorDataset

__all__ = ["DatasetInfo", "Split", "register_dataset", "DATASETS"]


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
