"""Loaders for standard data files on disk: MNIST / Fashion-MNIST IDX, CIFAR-10 python batches, LIBSVM.

Nothing is downloaded: point a loader at files you already have. Each loader returns a
:class:`~leantrain.data.Split`; the registered names (``mnist``, ``fashion_mnist``, ``cifar10``,
``libsvm``) take the location as a keyword, e.g. ``load_dataset("mnist", root="~/data/mnist")``.
A missing, truncated or malformed file raises ``ValueError`` naming the file and what is wrong.

Formats:

- **IDX** (LeCun's MNIST format): a 4-byte magic number ``00 00 TT RR`` (``TT`` the element
  type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64; ``RR`` the
  rank), then ``RR`` big-endian uint32 dimensions, then the elements big-endian in C order. The
  file may be gzip-compressed (detected from its first bytes, not its name).
- **CIFAR-10 python batches**: pickled dicts with ``data`` (N x 3072 uint8, the 1024 red, then
  green, then blue values of each 32x32 image, row-major) and ``labels`` (N ints in 0..9). They
  are read with an unpickler that only admits the numpy types these files use, so a batch file
  cannot run arbitrary code.
- **LIBSVM / svmlight** text, ``<label> <index>:<value> ...`` per line, read by scikit-learn's
  :func:`sklearn.datasets.load_svmlight_file` (the reference parser); features may be listed
  sparsely or all of them (dense); both become dense float32 tensors here
  (:func:`libsvm_arrays` keeps the scipy sparse matrix).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from leantrain.data.split import DatasetInfo, Split, register_dataset

__all__ = ["read_idx", "mnist_idx", "mnist", "fashion_mnist", "read_cifar10_batch", "cifar10",
           "libsvm_arrays", "libsvm", "data_root"]

_IDX_TYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = "test_batch"


def data_root(name: str, root: str | os.PathLike | None) -> Path:
    """``root`` if given, else ``$LEANTRAIN_DATA/<name>``; the folder must exist."""
    if root is None:
        base = os.environ.get("LEANTRAIN_DATA")
        if not base:
            raise ValueError(f"data set {name!r} reads files from disk: pass root=DIR (CLI: --data-arg root=DIR) "
                             f"or set LEANTRAIN_DATA to a folder holding a '{name}' sub-folder")
        root = Path(base) / name
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} for {name!r} does not exist")
    return root


def _read_maybe_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ValueError(f"file {str(path)!r} is a damaged or truncated gzip stream: {exc}") from exc
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in IDX file ``path`` (gzip or raw), in native byte order.

    Raises ValueError naming the file when it is missing, its magic number is not IDX, or its
    length disagrees with the header (truncated or with trailing bytes).
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise ValueError(f"IDX file {str(path)!r} is too short ({len(raw)} bytes) for a 4-byte magic number")
    zero, dtype_code, rank = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_TYPES or rank < 1:
        raise ValueError(f"IDX file {str(path)!r} has bad magic number 0x{raw[:4].hex()}: expected 00 00, a type "
                         f"code in {{{', '.join(f'0x{c:02x}' for c in _IDX_TYPES)}}} and a rank >= 1")
    header = 4 + 4 * rank
    if len(raw) < header:
        raise ValueError(f"IDX file {str(path)!r} is truncated inside its header ({len(raw)} < {header} bytes)")
    dims = struct.unpack(f">{rank}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[dtype_code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(f"IDX file {str(path)!r} is {what}: header {dims} of {dtype} needs {expected} bytes, "
                         f"file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ValueError(f"IDX file {str(images)!r} must hold uint8 images (n, rows, cols), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise ValueError(f"IDX file {str(labels)!r} must hold uint8 labels (n,), got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"IDX files {str(images)!r} and {str(labels)!r} disagree: {len(x)} images, {len(y)} labels")
    return x, y


def mnist_idx(train_images: str | os.PathLike, train_labels: str | os.PathLike, test_images: str | os.PathLike,
              test_labels: str | os.PathLike, *, name: str = "mnist", num_classes: int = 10) -> Split:
    """A split from four IDX files: images (1, rows, cols) as float32 pixel / 255 in [0, 1], labels int64.

    Labels must lie in ``[0, num_classes)``.
    """
    parts = []
    for img, lab in ((train_images, train_labels), (test_images, test_labels)):
        x, y = _idx_pair(Path(img), Path(lab))
        if len(y) and int(y.max()) >= num_classes:
            raise ValueError(f"IDX file {str(lab)!r} has label {int(y.max())}, outside [0, {num_classes})")
        parts.append(TensorDataset(torch.from_numpy(x.astype(np.float32) / 255.0)[:, None],
                                   torch.from_numpy(y.astype(np.int64))))
    shape = tuple(parts[0].tensors[0].shape[1:])
    if tuple(parts[1].tensors[0].shape[1:]) != shape:
        raise ValueError(f"train images {shape} and test images {tuple(parts[1].tensors[0].shape[1:])} differ in size")
    info = DatasetInfo(name, shape, num_classes, "classification", "IDX files; pixels / 255 -> [0, 1]; "
                       "the files' own train/test split", extra={"files": [str(p) for p in (
                           train_images, train_labels, test_images, test_labels)]})
    return Split(parts[0], parts[1], info)


def _idx_folder(name: str, root: str | os.PathLike | None) -> Split:
    folder = data_root(name, root)
    paths = {}
    for key, stem in MNIST_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                paths[key] = candidate
                break
        else:
            raise ValueError(f"{name}: file {str(folder / stem)!r} (or .gz) does not exist; the folder must hold "
                             f"{', '.join(MNIST_FILES.values())} (each raw or .gz)")
    return mnist_idx(**paths, name=name)


@register_dataset("mnist", description="MNIST from its IDX files on disk (root=DIR), 28x28, 10 classes", bundled=False)
def mnist(root: str | os.PathLike | None = None) -> Split:
    """MNIST from ``root`` holding the four standard IDX files (raw or .gz); see :func:`mnist_idx`."""
    return _idx_folder("mnist", root)


@register_dataset("fashion_mnist", description="Fashion-MNIST from its IDX files on disk (root=DIR), 28x28, 10 classes",
                  bundled=False)
def fashion_mnist(root: str | os.PathLike | None = None) -> Split:
    """Fashion-MNIST (same file names and format as MNIST) from ``root``; see :func:`mnist_idx`."""
    return _idx_folder("fashion_mnist", root)


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch contains: dicts, lists, bytes/str and numpy arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")


def read_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 3, 32, 32) uint8 and labels (n,) int64 of one CIFAR-10 python batch file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"CIFAR-10 batch file {str(path)!r} does not exist")
    try:
        obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:  # truncated pickles raise EOFError, UnpicklingError, ValueError, ...
        raise ValueError(f"CIFAR-10 batch file {str(path)!r} is not a readable python batch: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR-10 batch file {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    for key in ("data", "labels"):
        if key not in d:
            raise ValueError(f"CIFAR-10 batch file {str(path)!r} has no {key!r} entry (keys: {sorted(map(str, d))})")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR-10 batch file {str(path)!r}: 'data' must be uint8 (n, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(d["labels"])
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"CIFAR-10 batch file {str(path)!r}: 'labels' must be {len(data)} integers, got "
                         f"{labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 batch file {str(path)!r}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


@register_dataset("cifar10", description="CIFAR-10 python batches on disk (root=DIR), 3x32x32, 10 classes", bundled=False)
def cifar10(root: str | os.PathLike | None = None, standardize: bool = True) -> Split:
    """CIFAR-10 from ``root`` (the extracted ``cifar-10-batches-py`` folder, or a folder containing it).

    Train = ``data_batch_1..5``, test = ``test_batch``. Pixels / 255 -> [0, 1]; with
    ``standardize`` each channel is then shifted and scaled by the *training* set's per-channel
    mean and standard deviation.
    """
    folder = data_root("cifar10", root)
    if not (folder / CIFAR10_TEST).exists() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    train = [read_cifar10_batch(folder / f) for f in CIFAR10_TRAIN]
    x_tr = np.concatenate([b[0] for b in train]).astype(np.float32) / 255.0
    y_tr = np.concatenate([b[1] for b in train])
    x_te, y_te = read_cifar10_batch(folder / CIFAR10_TEST)
    x_te = x_te.astype(np.float32) / 255.0
    prep = "pixels / 255 -> [0, 1]"
    if standardize:
        mu = x_tr.mean(axis=(0, 2, 3), keepdims=True)
        sd = x_tr.std(axis=(0, 2, 3), keepdims=True)
        sd[sd == 0] = 1.0
        x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
        prep += "; per-channel standardization by training mean/std"
    info = DatasetInfo("cifar10", (3, 32, 32), 10, "classification", prep + "; the files' own train/test split",
                       extra={"root": str(folder)})
    return Split(TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
                 TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te)), info)


def libsvm_arrays(paths: list[str | os.PathLike], *, n_features: int | None = None,
                  zero_based: bool | str = "auto") -> list[tuple[Any, np.ndarray]]:
    """``(X, y)`` per LIBSVM file, X a scipy CSR matrix (float64), all with the same number of columns.

    Indices are 1-based by LIBSVM convention (``zero_based=False``); ``zero_based=True`` reads them
    as 0-based; ``"auto"`` decides for all files together, as scikit-learn's
    ``load_svmlight_files`` does: 0-based if any file uses index 0, else 1-based. The width is
    ``n_features`` when given (an index beyond it is an error), else the largest index over all
    files plus one. Each file is parsed by :func:`sklearn.datasets.load_svmlight_file`; errors
    name the file.
    """
    import scipy.sparse as sp
    from sklearn.datasets import load_svmlight_file

    if zero_based not in (True, False, "auto"):
        raise ValueError(f"zero_based must be True, False or 'auto', got {zero_based!r}")
    if n_features is not None and n_features < 1:
        raise ValueError(f"n_features must be None or >= 1, got {n_features}")
    raw = []
    for p in paths:
        if not Path(p).is_file():
            raise ValueError(f"LIBSVM file {str(p)!r} does not exist")
        try:
            x, y = load_svmlight_file(str(p), zero_based=True)  # raw indices; the shift is decided below
        except (ValueError, IndexError, OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"LIBSVM file {str(p)!r} is malformed: {exc}") from exc
        if x.shape[0] == 0:
            raise ValueError(f"LIBSVM file {str(p)!r} has no samples")
        bad = np.flatnonzero(~np.isfinite(y))
        if len(bad):
            raise ValueError(f"LIBSVM file {str(p)!r}: the label of sample {int(bad[0]) + 1} (line order) is "
                             f"{y[bad[0]]}; labels must be finite numbers")
        x = x.tocsr()
        if not np.all(np.isfinite(x.data)):
            row = int(np.searchsorted(x.indptr, int(np.flatnonzero(~np.isfinite(x.data))[0]), side="right"))
            raise ValueError(f"LIBSVM file {str(p)!r}: sample {row} (line order) has a non-finite feature value "
                             "(nan or inf); features must be finite numbers")
        raw.append((p, x, y))
    uses_zero = [str(p) for p, x, _ in raw if x.nnz and x.indices.min() == 0]
    if zero_based is False and uses_zero:
        raise ValueError(f"LIBSVM file {uses_zero[0]!r} uses feature index 0, but zero_based=False (1-based indices)")
    shift = 0 if (zero_based is True or (zero_based == "auto" and uses_zero)) else 1
    width = n_features if n_features is not None else max(
        (int(x.indices.max()) + 1 - shift if x.nnz else 0) for _, x, _ in raw)
    arrays = []
    for p, x, y in raw:
        if x.nnz and int(x.indices.max()) - shift >= width:
            raise ValueError(f"LIBSVM file {str(p)!r} has feature index {int(x.indices.max())}, beyond "
                             f"n_features={width}")
        arrays.append((sp.csr_matrix((x.data, x.indices - shift, x.indptr), shape=(x.shape[0], max(width, 1))), y))
    return arrays


_MAX_DENSE = 200_000_000


@register_dataset("libsvm", description="LIBSVM/svmlight text files on disk (train=FILE [test=FILE])", bundled=False)
def libsvm(train: str | os.PathLike | None = None, test: str | os.PathLike | None = None, *,
           n_features: int | None = None, zero_based: bool | str = "auto", task: str = "auto",
           test_fraction: float = 0.2, seed: int = 0) -> Split:
    """A split from LIBSVM files: features as dense float32, targets by ``task``.

    ``task="auto"``: two distinct labels -> ``binary`` (the larger one becomes 1, so ``-1/+1`` and
    ``0/1`` both map to ``0/1``); more, all integers -> ``classification`` (sorted labels mapped to
    ``0..k-1``); otherwise ``regression`` (float32 targets). Refused (ValueError naming the file):
    a non-finite label or feature value, and files whose samples all carry one label. Without a ``test`` file, a seeded
    split holds out ``test_fraction`` (stratified for classification). No feature scaling.
    """
    from leantrain.data.bundled import stratified_split

    if train is None:
        raise ValueError("data set 'libsvm' needs train=FILE (CLI: --data-arg train=FILE [--data-arg test=FILE])")
    if task not in ("auto", "binary", "classification", "regression"):
        raise ValueError(f"task must be 'auto', 'binary', 'classification' or 'regression', got {task!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    paths = [train] if test is None else [train, test]
    arrays = libsvm_arrays(paths, n_features=n_features, zero_based=zero_based)
    rows = sum(x.shape[0] for x, _ in arrays)
    if rows * arrays[0][0].shape[1] > _MAX_DENSE:
        raise ValueError(f"LIBSVM file {str(train)!r}: {rows} x {arrays[0][0].shape[1]} is too large to densify; "
                         "use leantrain.data.files.libsvm_arrays for the sparse matrices")
    y_all = np.concatenate([y for _, y in arrays])
    labels = np.unique(y_all)
    if len(labels) < 2:
        raise ValueError(f"LIBSVM file {str(train)!r}: every sample has the label {labels[0]:g}; a data set needs "
                         "at least 2 distinct label values")
    integral = bool(np.all(labels == np.round(labels)))
    if task == "auto":
        task = "binary" if len(labels) == 2 else ("classification" if integral and len(labels) <= 1000 else "regression")
    if task in ("binary", "classification"):
        if not integral and task == "classification":
            raise ValueError(f"LIBSVM file {str(train)!r}: task 'classification' needs integer labels")
        if task == "binary" and len(labels) != 2:
            raise ValueError(f"LIBSVM file {str(train)!r}: task 'binary' needs exactly 2 label values, got {len(labels)}")
        convert = lambda y: np.searchsorted(labels, y).astype(np.int64)
        num_classes = len(labels)
    else:
        convert = lambda y: y.astype(np.float32)
        num_classes = 0
    xs = [np.asarray(x.todense(), dtype=np.float32) for x, _ in arrays]
    ys = [convert(y) for _, y in arrays]
    if test is None:
        if task == "regression":
            perm = np.random.default_rng(seed).permutation(len(ys[0]))
            k = int(round(test_fraction * len(perm)))
            te, tr = np.sort(perm[:k]), np.sort(perm[k:])
        else:
            tr, te = stratified_split(ys[0], test_fraction, seed)
        if len(tr) == 0 or len(te) == 0:
            raise ValueError(f"LIBSVM file {str(train)!r}: {len(ys[0])} samples are too few to split off "
                             f"test_fraction={test_fraction}")
        xs, ys = [xs[0][tr], xs[0][te]], [ys[0][tr], ys[0][te]]
    split = "the files' own train/test split" if test is not None else f"seeded {1 - test_fraction:.0%}/" \
        f"{test_fraction:.0%} split (seed {seed})"
    info = DatasetInfo(Path(train).stem, (xs[0].shape[1],), num_classes, task,
                       f"LIBSVM text via sklearn.datasets.load_svmlight_file; features dense float32, unscaled; {split}",
                       extra={"labels": labels.tolist(), "files": [str(p) for p in paths]})
    return Split(TensorDataset(torch.from_numpy(xs[0]), torch.from_numpy(ys[0])),
                 TensorDataset(torch.from_numpy(xs[1]), torch.from_numpy(ys[1])), info)
