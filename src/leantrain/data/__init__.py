"""Offline data sets with a fixed train/test split and documented preprocessing.

Every loader returns a :class:`Split`: two ``torch.utils.data.TensorDataset``s (inputs float32,
targets int64 for classification, float32 for regression/binary-probability tasks) plus a
:class:`DatasetInfo`. Splits are fixed: the same call gives the same split on any machine.
Nothing is downloaded; bundled sets come from installed packages or are generated from a seed.

Use :func:`load_dataset` by name; ``leantrain data list`` prints :func:`catalog`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leantrain.data import bundled, files, synthetic, text  # noqa: F401  (each registers its loaders)
from leantrain.data.split import DATASETS, DatasetInfo, Split, register_dataset

__all__ = ["DatasetInfo", "Split", "register_dataset", "load_dataset", "catalog", "DATASETS"]


def load_dataset(name: str, **kwargs: Any) -> Split:
    """Load a registered data set by name; keyword arguments go to its loader."""
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
