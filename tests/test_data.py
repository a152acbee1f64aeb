import zlib

import numpy as np
import pytest
import torch

from leantrain.data import catalog, load_dataset
from leantrain.data.text import VOCAB, decode, encode, pydocs_documents


@pytest.fixture(scope="module")
def pydocs_split():
    return load_dataset("pydocs", seq_len=32)


def test_pydocs_windows_are_next_character_targets(pydocs_split):
    x, y = pydocs_split.tensors("train")
    assert x.dtype == torch.long and x.shape[1] == 32 and x.shape == y.shape
    assert torch.equal(x[:, 1:], y[:, :-1])          # target = input shifted by one
    assert torch.equal(y[:-1, -1], x[1:, 0])         # windows are consecutive, non-overlapping
    assert int(x.max()) < len(VOCAB) and int(x.min()) >= 0
    info = pydocs_split.info
    assert info.task == "language" and info.num_classes == len(VOCAB) == 97
    assert info.extra["train_chars"] // 32 == len(pydocs_split.train) or (info.extra["train_chars"] - 1) // 32 == len(
        pydocs_split.train)


def test_pydocs_text_is_the_stdlib_docstrings(pydocs_split):
    import json

    docs = pydocs_documents()
    assert json.__doc__.strip()[:40] in "\n\n".join(docs)
    train_text = "\n\n".join(d for d in docs if zlib.crc32(d.encode()) % 10 != 0)
    x, _ = pydocs_split.tensors("train")
    assert decode(x[0]) == train_text.replace("\t", "    ")[:32]
    # the held-out documents are not in the training stream
    test_docs = [d for d in docs if zlib.crc32(d.encode()) % 10 == 0 and len(d) > 200]
    assert test_docs and all(d not in train_text for d in test_docs[:20])
    assert 0.05 < pydocs_split.info.extra["test_chars"] / pydocs_split.info.extra["train_chars"] < 0.2


def test_pydocs_is_deterministic_and_limits_apply(pydocs_split):
    small = load_dataset("pydocs", seq_len=32, max_train_chars=1000, max_test_chars=200)
    assert len(small.train) == (1000 - 1) // 32 and len(small.test) == (200 - 1) // 32
    assert torch.equal(small.train.tensors[0], pydocs_split.train.tensors[0][: len(small.train)])
    assert small.info.extra["sha256"] == pydocs_split.info.extra["sha256"]
    with pytest.raises(ValueError, match="seq_len"):
        load_dataset("pydocs", seq_len=0)
    with pytest.raises(ValueError, match="max_train_chars"):
        load_dataset("pydocs", seq_len=32, max_train_chars=10)


def test_vocabulary_round_trip_and_unknowns():
    text = "def f(x):\n\treturn x ~ 1"
    assert decode(encode(text)) == text.replace("\t", "    ")
    assert encode("é").tolist() == [0]
    with pytest.raises(ValueError, match="ids"):
        decode([97])


def test_pydocs_refuses_stripped_docstrings(monkeypatch):
    from types import SimpleNamespace

    import leantrain.data.text as text

    monkeypatch.setattr(text, "sys", SimpleNamespace(flags=SimpleNamespace(optimize=2)))  # as under python -OO
    with pytest.raises(ValueError, match="-OO"):
        pydocs_documents()


@pytest.mark.parametrize("name,shape,classes,task", [
    ("digits", (1, 8, 8), 10, "classification"),
    ("breast_cancer", (30,), 2, "binary"),
    ("gmm", (2,), 4, "classification"),
    ("clicks", (12,), 2, "binary"),
])
def test_bundled_loaders(name, shape, classes, task):
    s = load_dataset(name)
    assert s.info.input_shape == shape and s.info.num_classes == classes and s.info.task == task
    for split in ("train", "test"):
        x, y = s.tensors(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == shape and len(x) == len(y) > 0
        assert torch.isfinite(x).all()
        assert set(np.unique(y.numpy())) <= set(range(classes))
    again = load_dataset(name)
    assert torch.equal(again.train.tensors[0], s.train.tensors[0])  # fixed split


def test_digits_split_is_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    s = load_dataset("digits")
    x_tr, y_tr = s.tensors("train")
    x_te, y_te = s.tensors("test")
    assert len(x_tr) + len(x_te) == len(load_digits().target) == 1797
    assert float(x_tr.max()) <= 1.0 and float(x_tr.min()) >= 0.0
    counts = np.bincount(y_te.numpy(), minlength=10) / np.bincount(np.r_[y_tr.numpy(), y_te.numpy()], minlength=10)
    assert np.allclose(counts, 0.2, atol=0.02)
    rows_tr = {r.tobytes() for r in x_tr.numpy().reshape(len(x_tr), -1)}
    overlap = sum(r.tobytes() in rows_tr for r in x_te.numpy().reshape(len(x_te), -1))
    assert overlap <= 2  # digits has a couple of exact duplicate images, nothing more


def test_breast_cancer_standardized_by_training_statistics():
    x, _ = load_dataset("breast_cancer").tensors("train")
    assert torch.allclose(x.mean(0), torch.zeros(30), atol=1e-4)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(30), atol=1e-3)


def test_synthimages_and_mnist1d(tmp_path, monkeypatch):
    s = load_dataset("synthimages", n_train=20, n_test=10, size=16)
    assert s.train.tensors[0].shape == (20, 3, 16, 16)
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path))
    m = load_dataset("mnist1d", num_samples=200)
    assert m.info.input_shape == (1, 40) and m.train.tensors[0].shape[1:] == (1, 40)
    assert len(m.train) + len(m.test) == 200
    assert list(tmp_path.glob("mnist1d_*.pkl"))
    cached = load_dataset("mnist1d", num_samples=200)  # read back from the cache
    assert torch.equal(cached.train.tensors[0], m.train.tensors[0])


def test_clicks_ids_fit_cardinalities():
    s = load_dataset("clicks", n_train=500, n_test=100)
    x, y = s.tensors("train")
    d, cards = s.info.extra["dense"], s.info.extra["cardinalities"]
    ids = x[:, d:]
    assert torch.equal(ids, ids.round())
    assert all(int(ids[:, j].max()) < c and int(ids[:, j].min()) >= 0 for j, c in enumerate(cards))
    assert 0.1 < float(y.float().mean()) < 0.45


def test_unknown_dataset_and_catalog():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("no-such-data")
    names = {r["name"]: r for r in catalog()}
    assert {"digits", "breast_cancer", "mnist1d", "gmm", "synthimages", "clicks", "pydocs"} <= set(names)
    assert names["pydocs"]["input_shape"] == [64]
