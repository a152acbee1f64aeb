"""File loaders: each test writes small files in the real formats itself, loads them back, and breaks them."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from leantrain.data import load_dataset
from leantrain.data.files import MNIST_FILES, libsvm_arrays, read_cifar10_batch, read_idx


def write_idx(path, array: np.ndarray, code: int, *, gz: bool = False) -> None:
    """IDX as LeCun documents it: 00 00 <type> <rank>, big-endian uint32 dims, big-endian data."""
    big = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    blob = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob += np.ascontiguousarray(array, dtype=np.dtype(big)).tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)


def make_mnist_folder(root, rng, n_train=12, n_test=5, gz=True):
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, arr in arrays.items():
        write_idx(root / (MNIST_FILES[key] + (".gz" if gz else "")), arr, 0x08, gz=gz)
    return arrays


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                                        (0x0D, np.float32), (0x0E, np.float64)])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_every_type(tmp_path, code, dtype, gz):
    rng = np.random.default_rng(code)
    arr = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    write_idx(tmp_path / "a.idx", arr, code, gz=gz)
    back = read_idx(tmp_path / "a.idx")
    assert back.dtype == np.dtype(dtype).newbyteorder("=") and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_folder_loads(tmp_path, name, gz):
    arrays = make_mnist_folder(tmp_path / name, np.random.default_rng(0), gz=gz)
    s = load_dataset(name, root=tmp_path / name)
    x, y = s.tensors("train")
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_allclose(x[:, 0].numpy(), arrays["train_images"] / 255.0, rtol=1e-6)
    assert y.tolist() == arrays["train_labels"].tolist()
    assert s.test.tensors[1].tolist() == arrays["test_labels"].tolist()
    assert s.info.name == name and s.info.input_shape == (1, 28, 28)


def test_mnist_root_from_environment(tmp_path, monkeypatch):
    make_mnist_folder(tmp_path / "mnist", np.random.default_rng(1))
    monkeypatch.setenv("LEANTRAIN_DATA", str(tmp_path))
    assert len(load_dataset("mnist").train) == 12
    monkeypatch.delenv("LEANTRAIN_DATA")
    with pytest.raises(ValueError, match="root=DIR"):
        load_dataset("mnist")


def _bytes_of(path):
    return path.read_bytes()


@pytest.mark.parametrize("damage,message", [
    (lambda b: b"\x08\x03" + b[2:], "bad magic number"),
    (lambda b: b[:2] + b"\x07" + b[3:], "bad magic number"),
    (lambda b: b[:-10], "truncated"),
    (lambda b: b + b"\x00\x00", "longer than its header"),
    (lambda b: b[:6], "truncated inside its header"),
    (lambda b: b[:3], "too short"),
])
def test_idx_bad_files_name_the_file(tmp_path, damage, message):
    path = tmp_path / "x.idx"
    write_idx(path, np.zeros((4, 3), np.uint8), 0x08)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_truncated_gzip_and_missing_files(tmp_path):
    path = tmp_path / "x.idx.gz"
    write_idx(path, np.zeros((40, 30), np.uint8), 0x08, gz=True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        read_idx(tmp_path / "nope.idx")
    root = tmp_path / "mnist"
    make_mnist_folder(root, np.random.default_rng(2))
    os.remove(root / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=root)
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset("mnist", root=tmp_path / "missing-folder")


def test_mnist_inconsistent_files(tmp_path):
    root = tmp_path / "mnist"
    rng = np.random.default_rng(3)
    make_mnist_folder(root, rng)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8), 0x08, gz=True)
    with pytest.raises(ValueError, match="12 images, 11 labels"):
        load_dataset("mnist", root=root)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.full(12, 10, np.uint8), 0x08, gz=True)
    with pytest.raises(ValueError, match="label 10"):
        load_dataset("mnist", root=root)
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((12, 28, 28), np.int32), 0x0C, gz=True)
    with pytest.raises(ValueError, match="uint8 images"):
        load_dataset("mnist", root=root)


# ---------------------------------------------------------------- CIFAR-10

def write_cifar_batch(path, images: np.ndarray, labels: list[int]) -> None:
    """The python-pickle batch layout: bytes keys, data (n, 3072) uint8 in R, G, B planes."""
    obj = {b"batch_label": b"test batch", b"labels": list(labels),
           b"data": images.reshape(len(images), -1), b"filenames": [b"f%d.png" % i for i in range(len(images))]}
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar_folder(root, rng, per_batch=3):
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        write_cifar_batch(root / name, imgs, labels)
        made[name] = (imgs, labels)
    return made


def test_cifar10_folder_loads_with_and_without_standardization(tmp_path):
    made = make_cifar_folder(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    raw = load_dataset("cifar10", root=tmp_path, standardize=False)  # parent folder is accepted
    x, y = raw.tensors("train")
    assert x.shape == (15, 3, 32, 32) and y.tolist() == sum((made[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    np.testing.assert_allclose(x[:3].numpy(), made["data_batch_1"][0] / 255.0, rtol=1e-6)
    # the channel planes are R, G, B in that order: pixel (c, i, j) is data[c * 1024 + i * 32 + j]
    flat = made["data_batch_1"][0].reshape(3, -1)
    assert x[0, 1, 2, 5].item() == pytest.approx(flat[0, 1024 + 2 * 32 + 5] / 255.0)
    std = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py")
    xs = std.tensors("train")[0].double()
    assert torch.allclose(xs.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(xs.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)
    assert std.test.tensors[1].tolist() == made["test_batch"][1]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("content,message", [
    (b"not a pickle at all", "not a readable python batch"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:-40], "not a readable python batch"),
    (pickle.dumps([1, 2, 3]), "expected a dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "no 'labels' entry"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"\(n, 3072\)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "'labels' must be 2 integers"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "0..9"),
    (pickle.dumps(_Evil()), "refusing to load"),
])
def test_cifar_bad_batches_name_the_file(tmp_path, content, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_cifar10_batch(path)
    assert str(path) in str(info.value)


def test_cifar_missing_batch(tmp_path):
    make_cifar_folder(tmp_path / "c", np.random.default_rng(1))
    os.remove(tmp_path / "c" / "data_batch_4")
    with pytest.raises(ValueError, match="data_batch_4.*does not exist"):
        load_dataset("cifar10", root=tmp_path / "c")


# ---------------------------------------------------------------- LIBSVM

def test_libsvm_sparse_text_one_based(tmp_path):
    path = tmp_path / "tiny.svm"
    path.write_text("+1 1:0.5 3:2\n-1 2:-1.25\n+1 3:1 # a comment\n-1 1:4 2:1 3:-3\n")
    arrays = libsvm_arrays([path])
    dense = np.asarray(arrays[0][0].todense())
    np.testing.assert_array_equal(dense, [[0.5, 0, 2], [0, -1.25, 0], [0, 0, 1], [4, 1, -3]])
    s = load_dataset("libsvm", train=path, test=path)
    assert s.info.task == "binary" and s.info.input_shape == (3,)
    assert s.train.tensors[1].tolist() == [1, 0, 1, 0]  # -1 -> 0, +1 -> 1
    np.testing.assert_array_equal(s.train.tensors[0].numpy(), dense.astype(np.float32))


def test_libsvm_dense_text_against_sklearn_writer(tmp_path):
    from sklearn.datasets import dump_svmlight_file

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).round(3)
    y = rng.integers(0, 3, 60)
    dump_svmlight_file(x, y, str(tmp_path / "train.txt"), zero_based=False)  # every feature listed: dense rows
    x2 = rng.normal(size=(9, 5)).round(3)
    y2 = rng.integers(0, 3, 9)
    dump_svmlight_file(x2, y2, str(tmp_path / "test.txt"), zero_based=False)
    s = load_dataset("libsvm", train=tmp_path / "train.txt", test=tmp_path / "test.txt")
    assert s.info.task == "classification" and s.info.num_classes == 3
    np.testing.assert_allclose(s.train.tensors[0].numpy(), x, rtol=1e-6)
    np.testing.assert_allclose(s.test.tensors[0].numpy(), x2, rtol=1e-6)
    assert s.test.tensors[1].tolist() == y2.tolist()
    held = load_dataset("libsvm", train=tmp_path / "train.txt", test_fraction=0.25, seed=3)
    assert len(held.train) + len(held.test) == 60 and len(held.test) == pytest.approx(15, abs=2)


def test_libsvm_zero_based_regression_and_width(tmp_path):
    a = tmp_path / "a.svm"
    a.write_text("0.5 0:1 2:2\n1.75 1:3\n")
    b = tmp_path / "b.svm"
    b.write_text("2.5 4:1\n")
    xa, xb = (np.asarray(m.todense()) for m, _ in libsvm_arrays([a, b]))
    assert xa.shape == (2, 5) and xb.shape == (1, 5)  # index 0 in a.svm: both read 0-based
    np.testing.assert_array_equal(xa[0], [1, 0, 2, 0, 0])
    s = load_dataset("libsvm", train=a, test=b)
    assert s.info.task == "regression" and s.train.tensors[1].dtype == torch.float32
    assert s.train.tensors[1].tolist() == [0.5, 1.75]
    wide = libsvm_arrays([b], n_features=8, zero_based=False)[0][0]
    assert wide.shape == (1, 8) and wide[0, 3] == 1.0


@pytest.mark.parametrize("text,kwargs,message", [
    ("1 1:a\n", {}, "malformed"),
    ("1 3:1 2:1\n", {}, "malformed"),
    ("", {}, "no samples"),
    ("1 9:1\n", {"n_features": 4}, "beyond n_features=4"),
    ("1 0:1\n", {"zero_based": False}, "uses feature index 0"),
])
def test_libsvm_bad_files_name_the_file(tmp_path, text, kwargs, message):
    path = tmp_path / "bad.svm"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        libsvm_arrays([path], **kwargs)
    assert str(path) in str(info.value)


def test_libsvm_missing_file_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as info:
        load_dataset("libsvm", train=tmp_path / "none.svm")
    assert "none.svm" in str(info.value)
    with pytest.raises(ValueError, match="train=FILE"):
        load_dataset("libsvm")
    path = tmp_path / "ok.svm"
    path.write_text("1 1:1\n2 1:2\n3 1:3\n")
    with pytest.raises(ValueError, match="exactly 2"):
        load_dataset("libsvm", train=path, test=path, task="binary")
    with pytest.raises(ValueError, match="task must be"):
        load_dataset("libsvm", train=path, task="ranking")
