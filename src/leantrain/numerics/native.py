"""The native kernels of ``leantrain.numerics``: one C file (``native.c``) compiled on first use, loaded with ctypes.

Build: the system C compiler (``$CC``, default ``cc``) with ``-O3 -march=native`` and without ``-ffast-math`` (the
kernels' float32 arithmetic must not be reassociated), with OpenMP when it works. The library goes to
``$LEANTRAIN_KERNEL_CACHE`` (else ``$XDG_CACHE_HOME/leantrain`` or ``~/.cache/leantrain``; a per-user temporary
directory where that is not writable), named by a hash of the
source, the flags and the CPU, written to a temporary file and renamed (a concurrent or interrupted build never
leaves a partial library). With OpenMP it links ``libgomp.so.1``: a torch that ships its own libgomp has it loaded
already under that name, so the kernels run on torch's own thread pool (no second pool spinning against it).

``LEANTRAIN_NATIVE=0`` turns the kernels off. Without a working compiler every caller falls back to its torch path
(the same numbers, more slowly) and one warning says so. Each kernel is tested bit for bit against that torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["native_available", "native_library", "dfp_gemm_path"]

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("native.c")
# No -ffast-math: float32 chains must not be reassociated; contraction only touches exact float64 integer sums.
_FLAGS = ["-O3", "-march=native", "-fno-fast-math", "-ffp-contract=fast", "-fPIC", "-shared", "-std=c11"]
# The GEMM kernels' register blocks: (rows, columns); V is padded to a multiple of the columns.
GEMM_BLOCKS = {"lt_gathered_gemm_n8": (12, 8), "lt_gathered_gemm_n16": (6, 16)}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


def _cache_dir() -> Path:
    env = os.environ.get("LEANTRAIN_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "leantrain"


def _cpu_key() -> str:
    """What -march=native depends on: the machine and its CPU flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return os.access(directory, os.W_OK)
    except OSError:
        return False


def _build(cc: str, flags: list[str], lib_path: Path) -> None:
    """Compile the kernel to ``lib_path`` through a temporary file and a rename (atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=".leantrain-native-", suffix=".so", dir=lib_path.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, lib_path)  # a concurrent or interrupted build never leaves a partial library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile() -> ctypes.CDLL:
    """Build (once per source, flags and CPU) and load the kernel. With OpenMP it links ``libgomp.so.1``: a torch
    that ships its own libgomp has it loaded already under that name, so the kernel's threads are torch's own
    thread pool (no second pool spinning against it); without OpenMP the caller splits the batch over threads."""
    src = _SOURCE.read_bytes()
    cc = os.environ.get("CC", "cc")
    out_dir = _cache_dir()
    if not _writable(out_dir):  # e.g. a read-only home: a per-user temporary directory instead
        out_dir = Path(tempfile.gettempdir()) / f"leantrain-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
        out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (["-fopenmp"], []):
        flags = [*_FLAGS, *extra]
        key = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _cpu_key().encode()).hexdigest()[:16]
        lib_path = out_dir / f"native-{key}.so"
        try:
            if not lib_path.exists():
                _build(cc, flags, lib_path)
            lib = ctypes.CDLL(str(lib_path))  # CDLL calls release the GIL
            break
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(err)
    else:
        raise errors[-1]
    i64, ptr, f32, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_double
    for name in GEMM_BLOCKS:
        fn = getattr(lib, name)
        fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ctypes.c_int, f32, f32,
                       i64, i64, i64, i64, i64, i64, i64, f64, f64, f64]
        fn.restype = i64
    # the pair kernel: S, s_batch, srow, sca, scb, VP, v_batch, out, o_batch, orow, ocol, accumulate, scale1, scale2,
    # b0, b1, R, pairs, Vn, N, pairs per chunk, shift
    lib.lt_pair_gemm.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, ctypes.c_int, f32, f32,
                                 i64, i64, i64, i64, i64, i64, i64, ctypes.c_int]
    lib.lt_pair_gemm.restype = i64
    lib.lt_pair_lanes.restype = ctypes.c_int
    lib.lt_pair_isa.restype = ctypes.c_char_p
    lib.lt_has_openmp.restype = ctypes.c_int
    lib.lt_round_stochastic_f32.argtypes = [ptr, i64, ptr, ptr, ptr]
    lib.lt_round_stochastic_f32.restype = None
    lib.lt_count_below_one_f32.argtypes = [ptr, i64]
    lib.lt_count_below_one_f32.restype = i64
    return lib


def native_available() -> bool:
    """Whether the native kernels are usable (compiled and loaded; ``LEANTRAIN_NATIVE=0`` turns them off)."""
    global _lib, _lib_error
    if os.environ.get("LEANTRAIN_NATIVE", "1") == "0":
        return False
    if _lib is not None:
        return True
    if _lib_error is not None:
        return False
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                _lib = _compile()
            except (OSError, subprocess.SubprocessError) as err:
                detail = getattr(err, "stderr", b"") or b""
                _lib_error = f"{err} {detail.decode(errors='replace')[:500]}"
                _log.warning("leantrain: native kernels unavailable, using the torch paths: %s",
                             _lib_error)
    return _lib is not None




def dfp_gemm_path() -> str:
    """Which implementation runs the integer (DFP) GEMMs on CPU tensors here, in words (for benchmarks and reports)."""
    lib = native_library()
    if lib is None:
        return "torch fallback (no working C compiler, or LEANTRAIN_NATIVE=0)"
    return f"native C kernel, {lib.lt_pair_isa().decode()}"


def native_library() -> ctypes.CDLL | None:
    """The loaded library, or None where :func:`native_available` is False."""
    return _lib if native_available() else None
