"""smallchains._simd and _simd64: the explicit-vector intrinsics of the register tiles
(32- and 64-byte vectors), checked against numpy in float32 and float64, plus the typing
errors they raise. The 64-byte ones run on every CPU (LLVM splits them where there is no
AVX-512)."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit
from numba.core.errors import TypingError

from smallchains import _simd, _simd64
from smallchains._simd import (lanes, vadd, vadd_into, vfma, vload, vmul, vrelu, vrelu_grad, vsplat, vstore,
                               vsub, vsum, vsum4, vsum8, transpose8)


@njit
def _arith(a, b, c, out):
    x, y, z = vload(a, 1), vload(b, 0), vload(c, 2)
    vstore(out, 0, vfma(x, y, z))
    vstore(out, 8, vadd(x, y))
    vstore(out, 16, vsub(x, y))
    vstore(out, 24, vmul(x, vsplat(a[0])))
    return vsum(z)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elementwise_ops_and_vsum(dtype):
    V = lanes(np.dtype(dtype).itemsize)
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(V + 3).astype(dtype) for _ in range(3))
    out = np.full(32, -7.0, dtype)
    total = _arith(a, b, c, out)
    x, y, z = a[1:1 + V], b[:V], c[2:2 + V]
    tol = dict(rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6 if dtype == np.float32 else 1e-14)
    np.testing.assert_allclose(out[0:V], x * y + z, **tol)
    np.testing.assert_allclose(out[8:8 + V], x + y, **tol)
    np.testing.assert_allclose(out[16:16 + V], x - y, **tol)
    np.testing.assert_allclose(out[24:24 + V], x * a[0], **tol)
    np.testing.assert_allclose(total, z.sum(), **tol)
    # lanes past the vector are untouched
    assert np.all(out[V:8] == -7.0) and np.all(out[24 + V:] == -7.0)


@njit
def _sum8_into(x, g):
    r = vsum8(vload(x, 0), vload(x, 8), vload(x, 16), vload(x, 24),
              vload(x, 32), vload(x, 40), vload(x, 48), vload(x, 56))
    vadd_into(g, 1, r, 0, 8)
    vadd_into(g, 12, r, 2, 3)
    vadd_into(g, 20, r, 7, 1)


def test_vsum8_and_vadd_into():
    x = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    g = np.arange(24, dtype=np.float32)
    before = g.copy()
    _sum8_into(x, g)
    sums = x.reshape(8, 8).sum(axis=1)
    expect = before.copy()
    expect[1:9] += sums
    expect[12:15] += sums[2:5]
    expect[20] += sums[7]
    np.testing.assert_allclose(g, expect, rtol=1e-6, atol=1e-6)


@njit
def _sum4_into(x, g):
    r = vsum4(vload(x, 0), vload(x, 4), vload(x, 8), vload(x, 12))
    vadd_into(g, 2, r, 0, 4)


def test_vsum4_float64():
    x = np.random.default_rng(2).standard_normal(16)
    g = np.ones(8)
    _sum4_into(x, g)
    expect = np.ones(8)
    expect[2:6] += x.reshape(4, 4).sum(axis=1)
    np.testing.assert_allclose(g, expect, rtol=1e-14, atol=1e-14)


@njit
def _relu(a, out):
    vstore(out, 0, vrelu(vload(a, 0)))


@njit
def _relu_scalar(a, out):
    for i in range(a.size):
        out[i] = max(a[i], a.dtype.type(0.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vrelu_matches_scalar_max_including_nan_and_signed_zero(dtype):
    V = lanes(np.dtype(dtype).itemsize)
    a = np.array([np.nan, -0.0, 0.0, -1.5, 2.0, np.inf, -np.inf, 3.0][:V], dtype)
    got, ref = np.empty_like(a), np.empty_like(a)
    _relu(a, got)
    _relu_scalar(a, ref)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))


@njit
def _relu_grad(g, a, out, V):
    for i in range(0, g.size, V):
        vstore(out, i, vrelu_grad(vload(g, i), vload(a, i)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vrelu_grad_passes_g_exactly_where_the_output_is_positive(dtype):
    """Lane by lane ``g if a > 0 else 0``: a NaN, zero (of either sign) or negative output
    gives 0 whatever g is; a positive one passes g bit for bit (NaN, inf, -0.0 too)."""
    a = np.array([np.nan, -0.0, 0.0, -1.5, 2.0, np.inf, -np.inf, 1e-30], dtype)
    g = np.array([1.0, np.nan, np.inf, 4.0, -0.0, np.nan, 7.0, -3.25], dtype)
    got = np.full_like(g, 99.0)
    _relu_grad(g, a, got, lanes(np.dtype(dtype).itemsize))
    expect = np.where(a > 0, g, dtype(0.0))
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(expect))


def test_typing_errors_name_what_was_expected():
    @njit
    def int_array(a):
        return vsum(vload(a, 0))

    with pytest.raises(TypingError, match="C-contiguous 1-D float32 or float64 array"):
        int_array(np.zeros(8, np.int64))

    @njit
    def mixed(a, b):
        return vsum(vadd(vload(a, 0), vload(b, 0)))

    with pytest.raises(TypingError, match="vectors of one type"):
        mixed(np.zeros(8, np.float32), np.zeros(8, np.float64))

    @njit
    def sum8_f64(a):
        v = vload(a, 0)
        return vsum(vsum8(v, v, v, v, v, v, v, v))

    with pytest.raises(TypingError, match="vsum8 needs vectors of 8, 16"):
        sum8_f64(np.zeros(8, np.float64))

    @njit
    def lanes_out_of_range(a):
        vadd_into(a, 0, vload(a, 0), 6, 4)

    with pytest.raises(TypingError, match="not in a 8-lane vector"):
        lanes_out_of_range(np.zeros(16, np.float32))


def test_layout_writeability_and_index_are_checked():
    @njit
    def load_sum(a, i):
        return vsum(vload(a, i))

    a = np.arange(16, dtype=np.float32)
    with pytest.raises(TypingError, match="C-contiguous"):
        load_sum(a[::2], 0)
    with pytest.raises(TypingError, match="integer index"):
        load_sum(a, 1.5)

    @njit
    def store(a):
        vstore(a, 0, vsplat(np.float32(1.0)))

    ro = np.zeros(8, np.float32)
    ro.flags.writeable = False
    with pytest.raises(TypingError, match="writeable"):
        store(ro)
    assert np.all(ro == 0)


# --------------------------------------------------------------------------------------
# 64-byte vectors (the kernels of a 32-register budget)

@njit
def _wide(a, b, g, out):
    load, splat = _simd64.vload, _simd64.vsplat
    x, y = load(a, 0), load(b, 1)
    vstore(out, 0, vfma(x, y, splat(a[3])))
    vstore(out, 16, vrelu_grad(y, x))
    return vsum(x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_64_byte_vectors(dtype):
    V = lanes(np.dtype(dtype).itemsize, 32)
    assert V == 64 // np.dtype(dtype).itemsize
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(V + 1).astype(dtype), rng.standard_normal(V + 1).astype(dtype)
    a[:4] = [np.nan, -0.0, 0.0, -1.0]  # relu' masks
    out = np.full(32, -7.0, dtype)
    total = _wide(a, b, None, out)
    x, y = a[:V], b[1:1 + V]
    tol = dict(rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6 if dtype == np.float32 else 1e-14)
    np.testing.assert_allclose(out[:V], x * y + a[3], **tol)
    np.testing.assert_array_equal(out[16:16 + V], np.where(x > 0, y, dtype(0.0)))
    assert np.isnan(total)  # a[0] is NaN: every lane summed
    assert np.all(out[V:16] == -7.0) and np.all(out[16 + V:] == -7.0)


@njit
def _wide_sums(x, g):
    load = _simd64.vload
    r8 = vsum8(load(x, 0), load(x, 16), load(x, 32), load(x, 48),
               load(x, 64), load(x, 80), load(x, 96), load(x, 112))
    vadd_into(g, 0, r8, 0, 8)
    r4 = vsum4(load(x, 0), load(x, 16), load(x, 32), load(x, 48))
    vadd_into(g, 8, r4, 0, 4)


def test_vsum8_and_vsum4_fold_wider_vectors():
    x = np.random.default_rng(4).standard_normal(128).astype(np.float32)
    g = np.zeros(12, np.float32)
    _wide_sums(x, g)
    sums = x.reshape(8, 16).sum(axis=1)
    np.testing.assert_allclose(g, np.concatenate([sums, sums[:4]]), rtol=1e-5, atol=1e-5)


def test_vrelu_grad_in_256_bit_halves(monkeypatch):
    """Where LLVM has no legal 512-bit type (no AVX-512, or numba imported before
    smallchains), vrelu_grad passes a 64-byte vector through its inline asm in 256-bit
    halves; forced here, the result is the same."""
    monkeypatch.setattr(_simd._cpu, "PREFER_512", False)

    @njit
    def halves(g, a, out):
        vstore(out, 0, vrelu_grad(_simd64.vload(g, 0), _simd64.vload(a, 0)))

    for dtype in (np.float32, np.float64):
        V = lanes(np.dtype(dtype).itemsize, 32)
        rng = np.random.default_rng(5)
        g, a = rng.standard_normal(V).astype(dtype), rng.standard_normal(V).astype(dtype)
        out = np.empty(V, dtype)
        halves(g, a, out)
        np.testing.assert_array_equal(out, np.where(a > 0, g, dtype(0.0)))


@njit
def _transpose8(a, src, ss, dst, ds):
    transpose8(a, src, ss, dst, ds)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose8_moves_exactly_the_8x8_block(dtype):
    a = np.random.default_rng(0).standard_normal(400).astype(dtype)
    before = a.copy()
    _transpose8(a, 3, 11, 150, 13)  # odd offsets and strides: unaligned rows
    expected = before.copy()
    for i in range(8):
        for j in range(8):
            expected[150 + j * 13 + i] = before[3 + i * 11 + j]
    np.testing.assert_array_equal(a, expected)  # and nothing else written


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_block_rows_finds_a_nonfinite_value_in_every_row_slot(dtype):
    """load_block_rows' finite flag (the training kernels' check of X) sees a NaN or Inf
    in any row of the block, whichever of its four interleaved rows or the rows after
    them holds it, at any feature, and is True for finite rows."""
    from smallchains.compiler.runtime import load_block_rows
    rng = np.random.default_rng(2)
    n_feat, B = 21, 16
    X = rng.standard_normal((40, n_feat)).astype(dtype)
    idx = rng.permutation(40)
    ld = 32
    work = np.zeros(B * ld + 16, dtype)
    for nb in (3, 8, 11, 16):
        assert load_block_rows(X, idx, 5, nb, work, 0, ld, n_feat, B)
        for j in range(nb):
            for value, f in ((np.nan, j % n_feat), (np.inf, n_feat - 1), (-np.inf, 0)):
                Xb = X.copy()
                Xb[idx[5 + j], f] = value
                assert not load_block_rows(Xb, idx, 5, nb, work, 0, ld, n_feat, B), (nb, j, value)
        # a value outside the block's rows is not its business
        Xb = X.copy()
        Xb[idx[5 + nb], 3] = np.nan
        assert load_block_rows(Xb, idx, 5, nb, work, 0, ld, n_feat, B)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_feat, B, nb", [(8, 16, 16), (13, 16, 11), (13, 16, 14), (523, 32, 32),
                                           (520, 32, 5), (520, 32, 2), (1024, 16, 16), (1024, 16, 7)])
def test_load_block_and_rows_equals_both_gathers(dtype, n_feat, B, nb):
    """The training kernels' one gather (rows, then the block transposed from them) gives
    the feature-major block of load_block and the rows of load_block_rows, bit for bit,
    padding lanes and gaps zero; the rows are X's (load_block_rows copies four at a time:
    row counts with every remainder mod 4)."""
    from smallchains.compiler.runtime import load_block, load_block_and_rows, load_block_rows
    from smallchains.layers.dense import rows_stride

    @njit
    def both(X, idx, s0, nb, work, rows_off, ld, n_feat, B):
        load_block(X, idx, s0, nb, work, 0, n_feat, B)
        load_block_rows(X, idx, s0, nb, work, rows_off, ld, n_feat, B)

    @njit
    def one(X, idx, s0, nb, work, rows_off, ld, n_feat, B):
        load_block_and_rows(X, idx, s0, nb, work, 0, rows_off, ld, n_feat, B)

    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, n_feat)).astype(dtype)
    idx = rng.permutation(50)
    ld = rows_stride(n_feat)
    rows_off = n_feat * B + 16
    out = []
    for f in (both, one):
        work = np.full(rows_off + B * ld + 16, np.nan, dtype)
        f(X, idx, 7, nb, work, rows_off, ld, n_feat, B)
        out.append(work)
    np.testing.assert_array_equal(out[0], out[1])
    assert out[1][rows_off + B * ld] == nb  # the row count after the rows
    block = out[1][:n_feat * B].reshape(n_feat, B)
    np.testing.assert_array_equal(block[:, :nb], X[idx[7:7 + nb]].T)
    assert (block[:, nb:] == 0).all()
    rows = out[1][rows_off:rows_off + B * ld].reshape(B, ld)
    np.testing.assert_array_equal(rows[:nb, :n_feat], X[idx[7:7 + nb]])
    assert (rows[:, n_feat:] == 0).all() and (rows[nb:] == 0).all()
