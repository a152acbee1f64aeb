"""gathered_int_gemm: the native kernel and the torch path against int64 references, and against each other."""

from __future__ import annotations

import logging

import pytest
import torch

import leantrain.numerics.native as native_mod
from leantrain.numerics.gathered_gemm import gathered_int_gemm, native_available

NATIVE = native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="no working C compiler for the native kernel")
BACKENDS = [pytest.param(True, marks=needs_native, id="native"), pytest.param(False, id="torch")]


def _reference(a: torch.Tensor, v: torch.Tensor, chunk: int | None, acc_bits: int) -> tuple[torch.Tensor, int]:
    """The module doc's formula in int64 and float32: exact chunk sums, two's-complement wrap, float32 chain."""
    t = a.shape[-1]
    c = t if chunk is None else chunk
    half, mod = 2 ** (acc_bits - 1), 2**acc_bits
    out, wrapped = None, 0
    for j in range(0, t, c):
        exact = a[..., j:j + c].long() @ v[j:j + c].long()
        wrapped += int(((exact < -half) | (exact >= half)).sum())
        reg = ((exact + half) % mod - half).to(torch.float32)  # int64 -> float32 rounds to nearest even
        out = reg if out is None else out + reg
    return out, wrapped  # type: ignore[return-value]


def _case(g: torch.Generator, big: bool) -> tuple[torch.Tensor, ...]:
    b, r, t, n = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 4), (1, 30), (1, 300), (1, 40)))
    mx = 2**15 - 1 if big else 300
    s = torch.randint(-mx, mx + 1, (b, r + t + 5), generator=g).float()
    srow = torch.randperm(r + 5, generator=g)[:r]
    scol = torch.randint(0, t, (t,), generator=g)
    v = torch.randint(-mx, mx + 1, (t, n), generator=g).float()
    return s, srow, scol, v


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize("chunk,acc_bits", [(None, 32), (1, 32), (2, 32), (3, 32), (8, 32), (256, 32), (8, 24), (2, 20),
                                            (5, 24), (None, 20)])
def test_equals_the_int64_reference(native: bool, chunk: int | None, acc_bits: int) -> None:
    g = torch.Generator().manual_seed(chunk or 0)
    for trial in range(6):
        s, srow, scol, v = _case(g, big=trial % 2 == 0)
        a = s[:, srow[:, None] + scol[None, :]]
        ref, ref_wrapped = _reference(a, v, chunk, acc_bits)
        out, wrapped = gathered_int_gemm(s, srow, scol, v, chunk=chunk, acc_bits=acc_bits, native=native)
        assert torch.equal(out, ref)
        assert wrapped == ref_wrapped
        fast, none = gathered_int_gemm(s, srow, scol, v, chunk=chunk, acc_bits=acc_bits, count_wraps=False,
                                       native=native)
        assert none is None and torch.equal(fast, ref)
        tr, _ = gathered_int_gemm(s, srow, scol, v, chunk=chunk, acc_bits=acc_bits, transpose_out=True, native=native)
        assert torch.equal(tr, ref.transpose(1, 2))


def test_wide_operands_do_wrap_and_are_counted() -> None:
    """16-bit operands in a 32-bit register: sums of 8 products wrap, and the count says how often."""
    g = torch.Generator().manual_seed(3)
    s = torch.full((1, 64), 2.0**15 - 1)
    v = torch.randint(2**14, 2**15, (64, 16), generator=g).float()
    srow, scol = torch.arange(1), torch.arange(64)
    ref, ref_wrapped = _reference(s[:, :64].unsqueeze(1), v, 8, 32)
    assert ref_wrapped > 0
    for native in ([True, False] if NATIVE else [False]):
        out, wrapped = gathered_int_gemm(s, srow, scol, v, chunk=8, native=native)
        assert torch.equal(out, ref) and wrapped == ref_wrapped


@pytest.mark.parametrize("native", BACKENDS)
def test_row_offsets_into_per_batch_storage(native: bool) -> None:
    g = torch.Generator().manual_seed(5)
    for chunk, evenly in ((None, False), (1, False), (8, False), (2, True), (3, True), (None, True)):
        b, r, t, n = 3, 7, 21, 19
        s = torch.randint(-3000, 3000, (1, r * t), generator=g).float()
        v = torch.randint(-3000, 3000, (b, t * (n + 2) + 4), generator=g).float()
        # evenly spaced rows (a convolution's output gradient) take a strided view instead of a gather
        vrow = torch.arange(t) * (n + 2) + 3 if evenly else torch.randperm(t, generator=g) * n
        out, _ = gathered_int_gemm(s, torch.arange(r), torch.arange(t) * r, v, vrow=vrow, n=n, chunk=chunk, native=native)
        a = s[0].reshape(t, r).t()
        for i in range(b):
            vb = v[i][vrow[:, None] + torch.arange(n)]
            assert torch.equal(out[i], _reference(a, vb, chunk, 32)[0])


@pytest.mark.parametrize("native", BACKENDS)
def test_rescale_is_two_float32_power_of_two_products(native: bool) -> None:
    g = torch.Generator().manual_seed(7)
    s, srow, scol, v = _case(g, big=True)
    plain, _ = gathered_int_gemm(s, srow, scol, v, chunk=8, native=False)
    for e in (-200, -160, -40, 0, 13, 100, 160):  # subnormal, zero and inf results included
        h = e // 2
        out, _ = gathered_int_gemm(s, srow, scol, v, chunk=8, scale_exp=e, native=native)
        assert torch.equal(out, plain * 2.0**h * 2.0 ** (e - h))


@pytest.mark.parametrize("native", BACKENDS)
def test_scatter_add_sums_rows_in_order(native: bool) -> None:
    """``into`` with ``accumulate``: element ``k`` receives rows ``r`` with ``r + n = k`` in increasing ``r``,
    added in float32 to what was there (the col2im of a convolution)."""
    g = torch.Generator().manual_seed(11)
    b, r, t, n = 2, 9, 13, 11
    s = torch.randint(-3000, 3000, (b, r * t), generator=g).float()
    v = torch.randint(-3000, 3000, (t, n), generator=g).float()
    srow, scol = torch.arange(r) * t, torch.arange(t)
    rows, _ = gathered_int_gemm(s, srow, scol, v, chunk=4, scale_exp=-30, native=False)
    buf = torch.full((b, r + n + 2), 0.1)
    gathered_int_gemm(s, srow, scol, v, chunk=4, scale_exp=-30, into=(buf, torch.arange(r), torch.arange(n)),
                      accumulate=True, native=native)
    ref = torch.full((b, r + n + 2), 0.1)
    for i in range(r):
        ref[:, i:i + n] = ref[:, i:i + n] + rows[:, i]
    assert torch.equal(buf, ref)
    put = torch.zeros(b, r * n)
    gathered_int_gemm(s, srow, scol, v, chunk=4, scale_exp=-30, into=(put, torch.arange(r), torch.arange(n) * r),
                      native=native)
    assert torch.equal(put.reshape(b, n, r), rows.transpose(1, 2))


def test_bad_arguments_raise_clear_errors() -> None:
    s, v = torch.zeros(1, 10), torch.zeros(3, 2)
    srow, scol = torch.arange(2), torch.arange(3)
    with pytest.raises(TypeError, match="srow"):
        gathered_int_gemm(s, srow.int(), scol, v, chunk=1)
    with pytest.raises(TypeError, match="s must be"):
        gathered_int_gemm(s.long(), srow, scol, v, chunk=1)
    with pytest.raises(ValueError, match="v must be"):
        gathered_int_gemm(s, srow, scol, torch.zeros(4, 2), chunk=1)
    with pytest.raises(ValueError, match="chunk"):
        gathered_int_gemm(s, srow, scol, v, chunk=0)
    with pytest.raises(ValueError, match="acc_bits"):
        gathered_int_gemm(s, srow, scol, v, chunk=1, acc_bits=1)
    with pytest.raises(ValueError, match="n "):
        gathered_int_gemm(s, srow, scol, torch.zeros(1, 9), vrow=scol, chunk=1)
    with pytest.raises(ValueError, match="into"):
        gathered_int_gemm(s, srow, scol, v, chunk=1, into=(torch.zeros(1, 9, dtype=torch.float64), srow, srow))


def test_without_a_compiler_the_torch_path_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    monkeypatch.setattr(native_mod, "_lib", None)
    monkeypatch.setattr(native_mod, "_lib_error", None)
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("LEANTRAIN_KERNEL_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="leantrain.numerics.native"):
        assert not native_available()
    assert "torch paths" in caplog.text
    assert not any(p.name.endswith(".so") for p in tmp_path.iterdir())  # nothing half-written left behind
    s, v = torch.ones(1, 10), torch.ones(3, 2)
    out, _ = gathered_int_gemm(s, torch.arange(2), torch.arange(3), v, chunk=2)
    assert torch.equal(out, torch.full((1, 2, 2), 3.0))
    with pytest.raises(ValueError, match="native=True"):
        gathered_int_gemm(s, torch.arange(2), torch.arange(3), v, chunk=2, native=True)
    monkeypatch.setenv("LEANTRAIN_NATIVE", "0")
    assert not native_available()


@needs_native
def test_native_stochastic_rounding_equals_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """round_to_integer's native pass: the same rule and the same generator draws, so the same bits."""
    from leantrain.numerics import round_to_integer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g) * torch.exp2(torch.randint(-30, 30, (50_000,), generator=g).float())
    x[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45])
    x[6:12] = torch.tensor([2.0**23, -(2.0**24 + 2), 0.5, -0.5, 1.0, -1.5])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xs = x.to(dtype)
        native = round_to_integer(xs, "stochastic", generator=torch.Generator().manual_seed(7))
        with monkeypatch.context() as m:
            m.setenv("LEANTRAIN_NATIVE", "0")
            ref = round_to_integer(xs, "stochastic", generator=torch.Generator().manual_seed(7))
        assert native.dtype == ref.dtype == dtype
        assert torch.equal(native.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           ref.view(torch.int16 if dtype != torch.float32 else torch.int32))
        assert not torch.equal(native[12:], torch.round(xs[12:]))  # it really rounded stochastically


@needs_native
def test_an_unusable_cache_directory_falls_back_to_a_temporary_one(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # a cache path below a file cannot be created, even by root
    monkeypatch.setattr(native_mod, "_lib", None)
    monkeypatch.setattr(native_mod, "_lib_error", None)
    monkeypatch.setenv("LEANTRAIN_KERNEL_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(native_mod.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert native_available()
    assert any(p.suffix == ".so" for p in (tmp_path / "tmp").rglob("*"))
