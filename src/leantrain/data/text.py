"""``pydocs``: a character-level language-modelling corpus built offline from Python's own docstrings.

The corpus is the cleaned docstrings (:func:`inspect.getdoc`) of a fixed list of standard-library
modules (:data:`STDLIB_MODULES`): for each module in that order, its own docstring, then every
class and Python function defined in it (sorted by name), and for each class the functions in
its ``__dict__`` (sorted by name, static/class methods included). A docstring already collected
is not repeated (``getdoc`` inherits docstrings, so duplicates are common). Documents are joined
with a blank line.

Vocabulary (fixed, 97 symbols, independent of the text): id 0 = unknown, id 1 = newline,
ids 2..96 = the printable ASCII characters ``' '`` (32) to ``'~'`` (126). Tabs become four spaces;
any other character maps to the unknown id.

Split: a document goes to the test set when ``zlib.crc32(document) % 10 == 0`` (about 10%), so
the split depends on the text alone, not on the order of collection. Each side is one character
stream cut into non-overlapping windows of ``seq_len + 1`` characters: the input is the first
``seq_len``, the target the last ``seq_len`` (next-character prediction); a tail shorter than a
window is dropped.

The text depends on the Python version that runs it (docstrings change between releases);
``info.extra`` records the version, the number of characters and a SHA-256 of the corpus, so a
result can be matched to its text. Running under ``python -OO`` (docstrings stripped) is an error.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import platform
import sys
import warnings
import zlib

import torch
from torch.utils.data import TensorDataset

from leantrain.data.split import DatasetInfo, Split, register_dataset

__all__ = ["STDLIB_MODULES", "VOCAB", "encode", "decode", "pydocs_documents", "pydocs"]

STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "enum", "fractions", "functools", "getopt", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html.parser", "http.client", "inspect", "io", "ipaddress", "itertools",
    "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os",
    "pathlib", "pickle", "platform", "pprint", "queue", "random", "re", "sched", "secrets", "selectors",
    "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile",
)

UNKNOWN = 0
#: The fixed vocabulary: ``VOCAB[i]`` is the character of id ``i`` (id 0, unknown, shown as U+FFFD).
VOCAB: str = "\ufffd\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(VOCAB) if i != UNKNOWN}


def encode(text: str) -> torch.Tensor:
    """Ids (int64) of ``text`` in :data:`VOCAB`; tabs become four spaces, unknown characters id 0."""
    text = text.replace("\t", "    ")
    return torch.tensor([_INDEX.get(ch, UNKNOWN) for ch in text], dtype=torch.long)


def decode(ids: torch.Tensor | list[int]) -> str:
    """The text of ``ids`` (unknown id 0 shown as U+FFFD)."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    bad = [v for v in values if not 0 <= v < len(VOCAB)]
    if bad:
        raise ValueError(f"ids must lie in [0, {len(VOCAB)}), got e.g. {bad[0]}")
    return "".join(VOCAB[v] for v in values)


def pydocs_documents(modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """The docstrings of ``modules`` in collection order (see the module docstring), without repeats."""
    if sys.flags.optimize >= 2:
        raise ValueError("pydocs needs docstrings, but Python runs with -OO (sys.flags.optimize >= 2)")
    docs: list[str] = []
    seen: set[str] = set()

    def add(obj: object) -> None:
        with warnings.catch_warnings():  # touching deprecated aliases (typing.re, ...) warns
            warnings.simplefilter("ignore", DeprecationWarning)
            doc = inspect.getdoc(obj)
        if doc and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                mod = importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"pydocs: standard-library module {name!r} cannot be imported here: {exc}") from exc
        add(mod)
        members = vars(mod)
        for key in sorted(members):
            obj = members[key]
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != name:
                continue
            add(obj)
            if inspect.isclass(obj):
                for attr in sorted(vars(obj)):
                    fn = vars(obj)[attr]
                    if isinstance(fn, (staticmethod, classmethod)):
                        fn = fn.__func__
                    if inspect.isfunction(fn):
                        add(fn)
    return docs


def _windows(ids: torch.Tensor, seq_len: int) -> TensorDataset:
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"text of {len(ids)} characters is shorter than one window of seq_len + 1 = {seq_len + 1}")
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1: n * seq_len + 1].reshape(n, seq_len)
    return TensorDataset(x.clone(), y.clone())


@register_dataset("pydocs", description="character-level text: Python standard-library docstrings (offline)")
def pydocs(seq_len: int = 64, max_train_chars: int | None = None, max_test_chars: int | None = None) -> Split:
    """Windows of ``seq_len`` characters (inputs) and the same windows shifted by one (targets).

    ``max_train_chars`` / ``max_test_chars`` keep only the first that many characters of each
    stream (for quick runs); ``None`` keeps everything (about 0.5M train characters on Python 3.11).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    for arg, v in (("max_train_chars", max_train_chars), ("max_test_chars", max_test_chars)):
        if v is not None and v <= seq_len:
            raise ValueError(f"{arg} must be None or > seq_len ({seq_len}), got {v}")
    docs = pydocs_documents()
    train_text = "\n\n".join(d for d in docs if zlib.crc32(d.encode("utf-8")) % 10 != 0)
    test_text = "\n\n".join(d for d in docs if zlib.crc32(d.encode("utf-8")) % 10 == 0)
    digest = hashlib.sha256((train_text + "\x00" + test_text).encode("utf-8")).hexdigest()
    train_ids, test_ids = encode(train_text), encode(test_text)
    if max_train_chars is not None:
        train_ids = train_ids[:max_train_chars]
    if max_test_chars is not None:
        test_ids = test_ids[:max_test_chars]
    info = DatasetInfo(
        "pydocs", (seq_len,), len(VOCAB), "language",
        f"docstrings of {len(STDLIB_MODULES)} stdlib modules, {len(docs)} documents; fixed 97-symbol vocabulary "
        f"(unknown, newline, ASCII 32-126); ~10% of documents (crc32 % 10 == 0) held out; windows of {seq_len}",
        extra={"vocab": VOCAB, "python": platform.python_version(), "sha256": digest, "documents": len(docs),
               "train_chars": len(train_ids), "test_chars": len(test_ids),
               "unknown_fraction": float((train_ids == UNKNOWN).float().mean())},
    )
    return Split(_windows(train_ids, seq_len), _windows(test_ids, seq_len), info)
