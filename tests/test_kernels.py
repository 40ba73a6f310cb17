"""Kernels for embedding (chain.kernels): single-sample and batched VJPs vs finite
differences, calls from a user's own @njit function, no aliasing between calls."""

import numpy as np
import pytest
from numba import njit

import smallchains as sc
from conftest import assert_close, central_fd

CHAIN = sc.SimpleChain(2, sc.TurboDense(7, "tanh"), sc.TurboDense(5, "softplus"), sc.TurboDense(2))
K = CHAIN.kernels(np.float64)
_fwd = K.forward
_vjp = K.vjp


@njit
def user_step(x, p, ybar, y, xbar, pbar, work):
    # what an ODE right-hand side / adjoint would do: evaluate, then pull back
    _fwd(x, p, y, work)
    _vjp(x, p, ybar, xbar, pbar, work)
    return y.sum()


def _params():
    return sc.init_params(CHAIN, seed=3, dtype=np.float64) + 0.1


def test_sizes_and_forward_matches_chain():
    assert (K.n_in, K.n_out, K.n_params) == (2, 2, CHAIN.n_params)
    p = _params()
    x = np.array([0.3, -1.2])
    y = np.empty(2)
    K.forward(x, p, y, K.alloc_work())
    assert_close(y, CHAIN(x, p), np.float64)


def test_vjp_matches_finite_differences():
    p = _params()
    x = np.array([0.7, 0.4])
    ybar = np.array([1.3, -0.6])
    xbar, pbar = np.empty(2), np.empty(p.size)
    K.vjp(x, p, ybar, xbar, pbar, K.alloc_work())
    f_p = lambda q: float(ybar @ CHAIN(x, q))  # noqa: E731
    f_x = lambda z: float(ybar @ CHAIN(z, p))  # noqa: E731
    assert_close(pbar, central_fd(f_p, p), "fd")
    assert_close(xbar, central_fd(f_x, x), "fd")


def test_user_njit_function_and_no_aliasing():
    p = _params()
    work = K.alloc_work()
    outs = []
    for x in (np.array([0.1, 0.2]), np.array([-2.0, 1.0])):
        y, xbar, pbar = np.empty(2), np.empty(2), np.empty(p.size)
        user_step(x, p, np.array([1.0, 0.0]), y, xbar, pbar, work)
        outs.append((x, y, xbar, pbar))
    # the first call's results are not disturbed by the second call
    x0, y0, xbar0, pbar0 = outs[0]
    assert_close(y0, CHAIN(x0, p), np.float64)
    xb, pb = np.empty(2), np.empty(p.size)
    K.vjp(x0, p, np.array([1.0, 0.0]), xb, pb, K.alloc_work())
    assert np.array_equal(xb, xbar0) and np.array_equal(pb, pbar0)
    assert not np.array_equal(outs[0][3], outs[1][3])


# --- batched kernels ---------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [24, 32])
@pytest.mark.parametrize("n", [1, 20, 33, 70])
def test_batched_kernels_match_chain_and_single(block_size, n):
    kb = CHAIN.kernels(np.float64, block_size=block_size)
    p = _params()
    rng = np.random.default_rng(n)
    X, Ybar = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    work = kb.alloc_work()
    Y, Y2, Xbar, pbar = np.empty((n, 2)), np.empty((n, 2)), np.empty((n, 2)), np.empty(p.size)
    kb.forward_batch(X, p, Y, work)
    assert_close(Y, CHAIN(X, p), np.float64)
    kb.valvjp_batch(X, p, Ybar, Y2, Xbar, pbar, work)
    assert_close(Y2, Y, np.float64)
    # pbar is the sum of the per-sample VJPs, Xbar their rows
    xb, pb, pb_sum = np.empty(2), np.empty(p.size), np.zeros(p.size)
    for i in range(n):
        K.vjp(X[i], p, Ybar[i], xb, pb, K.alloc_work())
        assert_close(Xbar[i], xb, np.float64)
        pb_sum += pb
    assert_close(pbar, pb_sum, np.float64)
    Xbar2, pbar2 = np.full((n, 2), np.nan), np.full(p.size, np.nan)  # overwritten, not accumulated
    kb.vjp_batch(X, p, Ybar, Xbar2, pbar2, work)
    assert np.array_equal(Xbar2, Xbar) and np.array_equal(pbar2, pbar)


def test_batched_vjp_matches_finite_differences():
    kb = CHAIN.kernels(np.float64)
    p = _params()
    rng = np.random.default_rng(5)
    X, Ybar = rng.standard_normal((9, 2)), rng.standard_normal((9, 2))
    Xbar, pbar = np.empty((9, 2)), np.empty(p.size)
    kb.vjp_batch(X, p, Ybar, Xbar, pbar, kb.alloc_work())
    assert_close(pbar, central_fd(lambda q: float((Ybar * CHAIN(X, q)).sum()), p), "fd")
    assert_close(Xbar.ravel(), central_fd(
        lambda z: float((Ybar * CHAIN(z.reshape(9, 2), p)).sum()), X.ravel()), "fd")


def test_single_valvjp_returns_value():
    p = _params()
    x, ybar = np.array([0.2, -0.9]), np.array([0.5, 2.0])
    y, xbar, pbar = np.empty(2), np.empty(2), np.empty(p.size)
    K.valvjp(x, p, ybar, y, xbar, pbar, K.alloc_work())
    assert_close(y, CHAIN(x, p), np.float64)
    xb, pb = np.empty(2), np.empty(p.size)
    K.vjp(x, p, ybar, xb, pb, K.alloc_work())
    assert np.array_equal(xb, xbar) and np.array_equal(pb, pbar)


def test_kernels_bad_block_size():
    for bad in (0, -3, 2.5, "8"):
        with pytest.raises(ValueError, match="block_size"):
            CHAIN.kernels(np.float64, block_size=bad)


# --- aligned workspaces ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", [7, (3, 5), [2, 16], (0,)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aligned_zeros(shape, dtype):
    from smallchains.compiler.runtime import ALIGN_BYTES, aligned_zeros
    a = aligned_zeros(shape, dtype)
    assert a.shape == np.zeros(shape).shape and a.dtype == dtype
    assert a.flags.c_contiguous and a.flags.writeable
    assert not a.any()
    if a.size:
        assert a.ctypes.data % ALIGN_BYTES == 0


def test_aligned_zeros_rejects_negative_sizes():
    from smallchains.compiler.runtime import aligned_zeros
    with pytest.raises(ValueError, match="negative"):
        aligned_zeros((2, -3), np.float32)


def test_training_workspaces_and_gradients_are_aligned():
    # every thread's row of the workspace starts on a cache line (work_size is padded)
    chain = sc.SimpleChain(3, sc.TurboDense(5, "tanh"), sc.TurboDense(2))
    X = np.random.default_rng(0).standard_normal((300, 3)).astype(np.float32)
    p = sc.init_params(chain, seed=0)
    model = sc.add_loss(chain, sc.SquaredLoss(np.zeros((300, 2), np.float32)))
    G = sc.alloc_threaded_grad(chain, n_threads=2)
    assert G.ctypes.data % 64 == 0
    sc.train_unbatched(G, p, model, X, sc.Adam(1e-3), 1)
    works = [w for w, _, _ in chain._tls.works.values()]
    assert works
    for w in works:
        assert w.shape[1] % 16 == 0
        for row in w:
            assert row.ctypes.data % 64 == 0


# --------------------------------------------------------------------------------------
# one workspace for every kernel; sizes checked

PADDED = sc.SimpleChain((2, 6, 5), sc.Conv(3, 3, "tanh", padding=1), sc.MaxPool(2),
                        sc.Conv(2, (2, 3), padding=(1, 2)), sc.Flatten(), sc.TurboDense(3))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_single_and_batch_kernels_share_one_workspace(dtype):
    """A batch call leaves other data where the single-sample kernel's padded copies have
    their borders; the single-sample result must not depend on it (before: it read the
    batch call's values as padding)."""
    k = PADDED.kernels(dtype, block_size=16)
    rng = np.random.default_rng(0)
    p = sc.init_params(PADDED, seed=0, dtype=dtype)
    X = rng.standard_normal((40, k.n_in)).astype(dtype)
    x, ybar = X[3].copy(), rng.standard_normal(k.n_out).astype(dtype)

    def single(work):
        y, xbar, pbar = np.empty(k.n_out, dtype), np.empty(k.n_in, dtype), np.empty_like(p)
        k.valvjp(x, p, ybar, y, xbar, pbar, work)
        return y, xbar, pbar

    fresh = single(k.alloc_work())
    work = k.alloc_work()
    Yb = rng.standard_normal((40, k.n_out)).astype(dtype)
    k.valvjp_batch(X, p, Yb, np.empty((40, k.n_out), dtype), np.empty_like(X), np.empty_like(p), work)
    for a, b in zip(single(work), fresh):
        np.testing.assert_array_equal(a, b)
    work[:] = np.nan  # nothing may be read before it is written
    for a, b in zip(single(work), fresh):
        np.testing.assert_array_equal(a, b)
    Y1 = np.empty((40, k.n_out), dtype)
    k.forward_batch(X, p, Y1, work)
    np.testing.assert_allclose(Y1, PADDED(X.reshape((40,) + PADDED.input_shape), p).reshape(40, -1),
                               rtol=1e-5 if dtype == np.float32 else 1e-12)


def _bad_calls(k, dtype):
    """(name, kernel, args) with exactly one array of a wrong size."""
    z = lambda *s: np.full(s, 7.0, dtype)  # noqa: E731  (not zeros: a write of 0 must show)
    n, ni, no, npar, ws = 5, k.n_in, k.n_out, k.n_params, k.work_size
    good = dict(x=z(ni), p=z(npar), y=z(no), ybar=z(no), xbar=z(ni), pbar=z(npar), work=z(ws),
                X=z(n, ni), Y=z(n, no), Ybar=z(n, no), Xbar=z(n, ni))
    sigs = {"forward": "x p y work", "vjp": "x p ybar xbar pbar work",
            "valvjp": "x p ybar y xbar pbar work", "forward_batch": "X p Y work",
            "vjp_batch": "X p Ybar Xbar pbar work", "valvjp_batch": "X p Ybar Y Xbar pbar work"}
    for name, sig in sigs.items():
        names = sig.split()
        for bad in names:
            a = good[bad]
            wrong = z(1) if bad == "work" else z(*((a.shape[0] + 1,) if a.ndim == 1 else (a.shape[0], a.shape[1] + 1)))
            args = [wrong if nm == bad else good[nm].copy() for nm in names]
            yield f"{name}({bad} wrong)", getattr(k, name), args
        if name.endswith("_batch"):  # rows of the outputs must match X
            args = [z(n + 1, *good[nm].shape[1:]) if nm in ("Y", "Ybar", "Xbar") and nm == names[2]
                    else good[nm].copy() for nm in names]
            yield f"{name}(rows wrong)", getattr(k, name), args


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_kernels_check_sizes(dtype):
    k = CHAIN.kernels(dtype)
    count = 0
    for what, kernel, args in _bad_calls(k, dtype):
        before = [a.copy() for a in args]
        with pytest.raises(ValueError, match="expect"):
            kernel(*args)
        for a, b in zip(args, before):  # nothing written
            np.testing.assert_array_equal(a, b, err_msg=what)
        count += 1
    assert count == (4 + 6 + 7) + (4 + 6 + 7) + 3  # every array of every kernel, a row mismatch per batch kernel


@njit
def _user_bad_call(x, p, y, work):
    _fwd(x, p, y, work)


def test_size_check_raises_from_numba_code_too():
    p = _params()
    with pytest.raises(ValueError, match="forward"):
        _user_bad_call(np.zeros(3), p, np.zeros(2), K.alloc_work())
