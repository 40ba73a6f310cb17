"""Fit the rational / polynomial coefficients used in ``smallchains._fastmath``.

Run:  python tools/fit_tanh.py            (prints float32-ready constants)

tanh
----
``tanh(x) ~= x * P(x^2) / Q(x^2)`` on ``[0, B]`` with ``Q(0) = 1``; ``|x|`` is
clamped to ``B = 9`` (``tanh(9) = 1 - 3.0e-8``, i.e. 1.0 in float32) so the
odd rational covers the whole real line.  The fit minimises the *absolute*
error with Loeb's iteration: each step solves the linear minimax problem

    min_e  max_i  w_i * | x_i P(s_i) - tanh(x_i) Q(s_i) |,   w_i = 1 / Q_prev(s_i)

as a linear program (scipy HiGHS) on a dense Chebyshev+uniform grid.  The LP
is solved in "correction form" around a least-squares start and rescaled,
because HiGHS' absolute tolerances (~1e-7) would otherwise cap the error at
~1e-7.  Converges in a handful of iterations to the equioscillating minimax.

exp (inner polynomial)
----------------------
``exp_f32`` evaluates ``exp(x) = exp(x / 2^8) ** (2^8)`` in float64; the inner
``exp(y)`` for ``y in [-104/256, 89/256]`` is a degree-7 polynomial fitted for
minimax *relative* error by the same LP (linear, no iteration needed).
"""
import numpy as np
from scipy.optimize import linprog


def _minimax_lp(M, b):
    """Solve min_c max_i |M c - b|_i (correction form, rescaled)."""
    n = M.shape[1]
    colsc = np.max(np.abs(M), axis=0)
    Ms0 = M / colsc
    c0 = np.linalg.lstsq(Ms0, b, rcond=None)[0]
    obj = np.zeros(n + 1)
    obj[-1] = 1.0
    ones = np.ones((M.shape[0], 1))
    for _ in range(3):
        r0 = Ms0 @ c0 - b
        sc = np.max(np.abs(r0))
        Ms = Ms0 / sc
        A_ub = np.vstack([np.hstack([Ms, -ones]), np.hstack([-Ms, -ones])])
        b_ub = np.concatenate([-r0 / sc, r0 / sc])
        res = linprog(obj, A_ub=A_ub, b_ub=b_ub,
                      bounds=[(None, None)] * (n + 1), method="highs")
        if not res.success:
            raise RuntimeError(res.message)
        c0 = c0 + res.x[:n]
    return c0 / colsc


def _grid(lo, hi, n):
    u = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))
    return np.unique(np.concatenate([lo + (hi - lo) * u, np.linspace(lo, hi, n)]))


def fit_tanh(np_=4, nq=4, bound=9.0, npts=3000, iters=10):
    """Return (max_abs_err, p, q): tanh(x) ~ x*sum(p_i s^i)/sum(q_j s^j), s=x^2."""
    x = _grid(0.0, bound, npts)
    f = np.tanh(x)
    t = (x / bound) ** 2                      # scaled variable in [0, 1]
    A_P = x[:, None] * t[:, None] ** np.arange(np_ + 1)
    A_Q = f[:, None] * t[:, None] ** np.arange(1, nq + 1)
    w = np.ones_like(x)
    best = None
    for _ in range(iters):
        coef = _minimax_lp(np.hstack([A_P, -A_Q]) * w[:, None], f * w)
        p = coef[:np_ + 1]
        q = np.concatenate([[1.0], coef[np_ + 1:]])
        Q = (t[:, None] ** np.arange(nq + 1)) @ q
        err = np.max(np.abs(A_P @ p / Q - f))
        if best is None or err < best[0]:
            best = (err, p, q)
        w = 1.0 / Q
    err, p, q = best
    sc = float(bound) ** (-2.0 * np.arange(max(np_, nq) + 1))   # t -> s = x^2
    return err, p * sc[:np_ + 1], q * sc[:nq + 1]


def fit_exp_inner(deg=7, lo=-104.0 / 256, hi=89.0 / 256, npts=3000):
    """Return (max_rel_err, c): exp(y) ~ sum(c_i y^i) on [lo, hi]."""
    y = _grid(lo, hi, npts)
    f = np.exp(y)
    # relative error: (sum c_i y^i)/f - 1
    M = (y[:, None] ** np.arange(deg + 1)) / f[:, None]
    c = _minimax_lp(M, np.ones_like(y))
    err = np.max(np.abs((y[:, None] ** np.arange(deg + 1)) @ c / f - 1.0))
    return err, c


def _f32_tanh_err(p, q, bound=9.0, n=2_000_001):
    """Max abs error of the rational evaluated in float32 (numpy, Horner)."""
    p32 = p.astype(np.float32)
    q32 = q.astype(np.float32)
    x = np.linspace(0.0, bound, n).astype(np.float32)
    s = x * x
    P = np.full_like(x, p32[-1])
    for c in p32[-2::-1]:
        P = P * s + c
    Q = np.full_like(x, q32[-1])
    for c in q32[-2::-1]:
        Q = Q * s + c
    r = np.minimum(x * P / Q, np.float32(1))
    return np.max(np.abs(r.astype(np.float64) - np.tanh(x.astype(np.float64))))


if __name__ == "__main__":
    print("tanh degree scan (P deg in s, Q deg in s): fit err / float32 err")
    for a, b in [(4, 3), (5, 3), (4, 4), (6, 3), (5, 4)]:
        e, p, q = fit_tanh(a, b)
        print(f"  ({a},{b}) {e:.3e} / {_f32_tanh_err(p, q):.3e}")
    e, p, q = fit_tanh(4, 4)
    print(f"\nchosen tanh (4,4): max abs err (exact arithmetic) = {e:.3e}")
    for i, c in enumerate(p):
        print(f"_TP{i} = np.float32({float(np.float32(c))!r})")
    for i, c in enumerate(q):
        print(f"_TQ{i} = np.float32({float(np.float32(c))!r})")
    print()
    e, c = fit_exp_inner()
    print(f"exp inner deg 7: max rel err = {e:.3e} (x256 after squarings: {e * 256:.3e})")
    for i, v in enumerate(c):
        print(f"_EC{i} = {float(v)!r}")
