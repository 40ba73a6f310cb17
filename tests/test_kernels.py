"""Single-sample kernels for embedding (chain.kernels): VJP vs finite differences, calls
from a user's own @njit function, no aliasing between calls."""

import numpy as np
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
