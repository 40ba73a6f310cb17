"""Adaptive Dormand-Prince 5(4) integration and its backsolve adjoint, in numba.

Everything here is an ``@njit`` function over caller-owned buffers; nothing allocates per
call, so a training loop written in numba can call :func:`dopri5` and :func:`backsolve`
directly. The right-hand side is a jitted function passed as an argument:

``rhs(t, u, p, du, work)``
    writes ``du = f(t, u, p)``; ``u, du (n,)``, ``p (n_params,)``, ``work`` scratch.
``rhs_vjp(t, u, p, a, du, ubar, pbar, work)``
    writes ``du = f(t, u, p)``, ``ubar = a^T df/du``, ``pbar = a^T df/dp`` (overwritten).

The solver functions have explicit signatures in which the right-hand sides are numba
first-class function types (:data:`RHS_SIG`, :data:`RHS_VJP_SIG`: float64 time and
C-contiguous float64 arrays): they are compiled once, cached on disk, and shared by every
right-hand side; calls go through a function pointer. A plain ``@njit`` function works as
``rhs`` once compiled for the signature (``rhs.compile(RHS_SIG)``; :class:`Dopri5` does
that), and can be passed from Python or from other jitted code.

Step-size control follows torchdiffeq's ``dopri5`` (Chen et al., 2018, which follows
Hairer, Norsett & Wanner, "Solving ODEs I", II.4): error ratio = a norm of
``err / (atol + rtol * max(|y0|, |y1|))``, accept if <= 1, next step
``dt * min(10, max(0.9 * ratio^(-1/5), 0.2 if rejected else 1))``, the same initial-step
heuristic, FSAL, and output at requested times by the 4th-order dense output of
Shampine (1986) (the solver steps past an output time and interpolates back; output
times are not step stops). The norm is the maximum over *groups* of entries of the
root-mean-square of each group (torchdiffeq's ``_mixed_norm``): ``bounds`` holds group
boundaries ``[0, b1, ..., m]``; entries past ``bounds[-1]`` are not error-controlled
(a "seminorm", Kidger et al. 2021).

Return codes of :func:`dopri5` and :func:`backsolve`: 0 success, ``MAX_STEPS_EXCEEDED``,
``NOT_FINITE`` (NaN/Inf in the error estimate), ``STEP_UNDERFLOW``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

_OPTS = dict(nogil=True, error_model="numpy", cache=True)
_INLINE = dict(_OPTS, inline="always")

_f64, _vec, _mat = types.float64, types.float64[::1], types.float64[:, ::1]
_i64, _ivec = types.int64, types.int64[::1]
#: ``rhs(t, u, p, du, work)``
RHS_SIG = types.void(_f64, _vec, _vec, _vec, _vec)
#: ``rhs_vjp(t, u, p, a, du, ubar, pbar, work)``
RHS_VJP_SIG = types.void(_f64, _vec, _vec, _vec, _vec, _vec, _vec, _vec)
_RHS, _VJP = types.FunctionType(RHS_SIG), types.FunctionType(RHS_VJP_SIG)

MAX_STEPS_EXCEEDED = -1
NOT_FINITE = -2
STEP_UNDERFLOW = -3

#: rows of the solver scratch array ``S`` (shape ``(N_SCRATCH_ROWS, m)``)
N_SCRATCH_ROWS = 12

# Dormand & Prince (1980) tableau
C2, C3, C4, C5 = 1 / 5, 3 / 10, 4 / 5, 8 / 9
A21 = 1 / 5
A31, A32 = 3 / 40, 9 / 40
A41, A42, A43 = 44 / 45, -56 / 15, 32 / 9
A51, A52, A53, A54 = 19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729
A61, A62, A63, A64, A65 = 9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656
B1, B3, B4, B5, B6 = 35 / 384, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84
# error weights: 5th-order minus embedded 4th-order weights. The 4th-order weights are
# those of torchdiffeq's Dormand-Prince-Shampine tableau (1951/21600, 0, 22642/50085,
# 451/720, -12231/42400, 649/6300, 1/60), not Hairer's DOPRI5 ones (5179/57600, ...), so
# that step sequences match torchdiffeq's dopri5 step for step.
E1 = 35 / 384 - 1951 / 21600
E3 = 500 / 1113 - 22642 / 50085
E4 = 125 / 192 - 451 / 720
E5 = -2187 / 6784 + 12231 / 42400
E6 = 11 / 84 - 649 / 6300
E7 = -1 / 60
# y(t0 + dt/2) = y0 + dt * sum(M_i k_i): Shampine's (1986) midpoint for dense output
M1 = 6025192743 / 30085553152 / 2
M3 = 51252292925 / 65400821598 / 2
M4 = -2691868925 / 45128329728 / 2
M5 = 187940372067 / 1594534317056 / 2
M6 = -1776094331 / 19743644256 / 2
M7 = 11237099 / 235043384 / 2

SAFETY, IFACTOR, DFACTOR, ORDER = 0.9, 10.0, 0.2, 5


@njit(**_OPTS)
def _group_norm(num, y0, y1, rtol, atol, bounds, h):
    """max over groups of rms(h * num_i / (atol + rtol * max(|y0_i|, |y1_i|)))."""
    worst = 0.0
    for g in range(bounds.shape[0] - 1):
        lo, hi = bounds[g], bounds[g + 1]
        if hi <= lo:
            continue
        acc = 0.0
        for i in range(lo, hi):
            r = h * num[i] / (atol + rtol * max(abs(y0[i]), abs(y1[i])))
            acc += r * r
        v = np.sqrt(acc / (hi - lo))
        if not v <= worst:  # also propagates NaN
            worst = v
    return worst


def _call_vjp(f, t, u, p, a, du, ubar, pbar, work):
    """``f(t, u, p, a, du, ubar, pbar, work)`` in jitted code; a no-op when ``f`` is a plain
    right-hand side (forward solves pass ``rhs`` in the ``rhs_vjp`` slot: the adjoint
    branch of :func:`_eval` must still type-check, and referencing a placeholder function
    as a value would make the solver uncacheable)."""


@overload(_call_vjp, jit_options=dict(_INLINE))
def _call_vjp_impl(f, t, u, p, a, du, ubar, pbar, work):
    if f == _VJP:
        def impl(f, t, u, p, a, du, ubar, pbar, work):
            f(t, u, p, a, du, ubar, pbar, work)
    else:
        def impl(f, t, u, p, a, du, ubar, pbar, work):
            pass
    return impl


@njit(**_OPTS)
def _eval(adjoint, rhs, rhs_vjp, n, t, z, p, dz, work):
    """``dz = f(t, z)``, or for ``adjoint`` the augmented backsolve system of
    ``z = [u, a, g]`` (Chen et al. 2018, eq. 4): ``du/dt = f``, ``da/dt = -a^T df/du``,
    ``dg/dt = -a^T df/dp``."""
    if adjoint:
        _call_vjp(rhs_vjp, t, z[:n], p, z[n:2 * n], dz[:n], dz[n:2 * n], dz[2 * n:], work)
        for i in range(n, dz.shape[0]):
            dz[i] = -dz[i]
    else:
        rhs(t, z, p, dz, work)


ADJOINT_SYSTEM_SIG = types.void(_f64, _RHS, _VJP, _i64, _vec, _vec, _vec, _vec)


@njit(**_OPTS)
def adjoint_system(t, rhs, rhs_vjp, n, z, p, dz, work):
    """The augmented backsolve system alone (e.g. for scipy): writes ``dz``. Compiled on
    first use for :data:`ADJOINT_SYSTEM_SIG` (see :func:`smallchains.ode.ScipyAdapter`)."""
    _eval(True, rhs, rhs_vjp, n, t, z, p, dz, work)


@njit(**_OPTS)
def _initial_step(adjoint, rhs, rhs_vjp, n, t0, y0, f0, p, work, rtol, atol, bounds, direction, y1, f1):
    """torchdiffeq's ``_select_initial_step`` (Hairer et al. II.4) for a 5th-order method."""
    d0 = _group_norm(y0, y0, y0, rtol, atol, bounds, 1.0)
    d1 = _group_norm(f0, y0, y0, rtol, atol, bounds, 1.0)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    for i in range(y0.shape[0]):
        y1[i] = y0[i] + direction * h0 * f0[i]
    _eval(adjoint, rhs, rhs_vjp, n, t0 + direction * h0, y1, p, f1, work)
    for i in range(y0.shape[0]):
        f1[i] -= f0[i]
    d2 = _group_norm(f1, y0, y0, rtol, atol, bounds, 1.0) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / ORDER)
    return min(100 * h0, h1)


@njit(**_OPTS)
def _integrate(adjoint, rhs, rhs_vjp, n, ts, z0, p, work, rtol, atol, bounds, Z, S, max_steps, stats):
    """Integrate ``dz/dt = f`` (or the adjoint system, see :func:`_eval`) from ``ts[0]``
    through the monotone ``ts``; write
    ``Z[i] = z(ts[i])`` (``Z[0] = z0``; ``z0`` may alias ``Z[0]``). ``stats`` (int64[3]) is
    incremented by (function evaluations, accepted steps, rejected steps)."""
    m = z0.shape[0]
    # rotating rows: state and slope at the start (a) and end (b) of the last accepted
    # step, the candidate state (c) and the slope there (fc)
    ya, yb, yc, fa, fb, fc = 0, 1, 2, 3, 4, 5
    K2, K3, K4, K5, K6, YM = S[6], S[7], S[8], S[9], S[10], S[11]
    for i in range(m):
        S[yb, i] = z0[i]
    for i in range(m):
        Z[0, i] = z0[i]
    t_a = t_b = ts[0]
    direction = 1.0 if ts[ts.shape[0] - 1] >= ts[0] else -1.0
    _eval(adjoint, rhs, rhs_vjp, n, t_b, S[yb], p, S[fb], work)
    dt = direction * _initial_step(adjoint, rhs, rhs_vjp, n, t_b, S[yb], S[fb], p, work,
                                   rtol, atol, bounds, direction, S[yc], S[fc])
    stats[0] += 2
    steps = 0
    for j in range(1, ts.shape[0]):
        target = ts[j]
        while direction * (target - t_b) > 0:
            if steps >= max_steps:
                return MAX_STEPS_EXCEEDED
            if t_b + dt == t_b:
                return STEP_UNDERFLOW
            steps += 1
            y, k1, yn, k7 = S[yb], S[fb], S[yc], S[fc]
            for i in range(m):
                yn[i] = y[i] + dt * (A21 * k1[i])
            _eval(adjoint, rhs, rhs_vjp, n, t_b + C2 * dt, yn, p, K2, work)
            for i in range(m):
                yn[i] = y[i] + dt * (A31 * k1[i] + A32 * K2[i])
            _eval(adjoint, rhs, rhs_vjp, n, t_b + C3 * dt, yn, p, K3, work)
            for i in range(m):
                yn[i] = y[i] + dt * (A41 * k1[i] + A42 * K2[i] + A43 * K3[i])
            _eval(adjoint, rhs, rhs_vjp, n, t_b + C4 * dt, yn, p, K4, work)
            for i in range(m):
                yn[i] = y[i] + dt * (A51 * k1[i] + A52 * K2[i] + A53 * K3[i] + A54 * K4[i])
            _eval(adjoint, rhs, rhs_vjp, n, t_b + C5 * dt, yn, p, K5, work)
            for i in range(m):
                yn[i] = y[i] + dt * (A61 * k1[i] + A62 * K2[i] + A63 * K3[i] + A64 * K4[i]
                                     + A65 * K5[i])
            _eval(adjoint, rhs, rhs_vjp, n, t_b + dt, yn, p, K6, work)
            for i in range(m):
                yn[i] = y[i] + dt * (B1 * k1[i] + B3 * K3[i] + B4 * K4[i] + B5 * K5[i]
                                     + B6 * K6[i])
            _eval(adjoint, rhs, rhs_vjp, n, t_b + dt, yn, p, k7, work)
            stats[0] += 6
            # error estimate, reusing K2 (not needed any more) as its storage
            for i in range(m):
                K2[i] = (E1 * k1[i] + E3 * K3[i] + E4 * K4[i] + E5 * K5[i] + E6 * K6[i]
                         + E7 * k7[i])
            ratio = _group_norm(K2, y, yn, rtol, atol, bounds, dt)
            if not np.isfinite(ratio):
                return NOT_FINITE
            if ratio <= 1.0:
                stats[1] += 1
                for i in range(m):
                    YM[i] = y[i] + dt * (M1 * k1[i] + M3 * K3[i] + M4 * K4[i] + M5 * K5[i]
                                         + M6 * K6[i] + M7 * k7[i])
                t_a, t_b = t_b, t_b + dt
                ya, yb, yc = yb, yc, ya
                fa, fb, fc = fb, fc, fa
            else:
                stats[2] += 1
            if ratio == 0.0:
                dt = dt * IFACTOR
            else:
                lower = 1.0 if ratio < 1.0 else DFACTOR
                dt = dt * min(IFACTOR, max(SAFETY / ratio ** (1.0 / ORDER), lower))
        # 4th-order dense output on [t_a, t_b] (torchdiffeq's _interp_fit / _interp_evaluate)
        h = t_b - t_a
        x = (target - t_a) / h
        y0, y1, f0, f1 = S[ya], S[yb], S[fa], S[fb]
        for i in range(m):
            a = 2 * h * (f1[i] - f0[i]) - 8 * (y1[i] + y0[i]) + 16 * YM[i]
            b = h * (5 * f0[i] - 3 * f1[i]) + 18 * y0[i] + 14 * y1[i] - 32 * YM[i]
            c = h * (f1[i] - 4 * f0[i]) - 11 * y0[i] - 5 * y1[i] + 16 * YM[i]
            Z[j, i] = y0[i] + x * (h * f0[i] + x * (c + x * (b + x * a)))
    return 0


@njit(_i64(_RHS, _vec, _vec, _vec, _vec, _f64, _f64, _ivec, _mat, _mat, _i64, _ivec), **_OPTS)
def dopri5(rhs, ts, u0, p, work, rtol, atol, bounds, U, S, max_steps, stats):
    """Solve ``du/dt = rhs(t, u, p)``, ``u(ts[0]) = u0``; write ``U[i] = u(ts[i])``.

    ``ts`` strictly monotone (increasing or decreasing), ``u0 (n,)``, ``U (len(ts), n)``,
    ``S (N_SCRATCH_ROWS, n)`` scratch, ``bounds`` int64 norm groups (``[0, n]`` for one
    RMS norm), ``stats`` int64[3] incremented. Returns 0 or a negative error code.
    """
    return _integrate(False, rhs, rhs, u0.shape[0], ts, u0, p, work, rtol, atol,
                      bounds, U, S, max_steps, stats)


@njit(_i64(_RHS, _VJP, _vec, _mat, _mat, _vec, _vec, _f64, _f64, _ivec, _mat, _mat, _vec, _i64,
           _ivec, _vec, _vec), **_OPTS)
def backsolve(rhs, rhs_vjp, ts, U, Ubar, p, work, rtol, atol, bounds, S, Z2, t2, max_steps,
              stats, u0bar, pbar):
    """Backsolve adjoint of :func:`dopri5` (Chen et al. 2018; torchdiffeq's
    ``odeint_adjoint``): the pullback of ``U = solve(u0, p)`` at ``Ubar``.

    Integrates ``z = [u, a, g]`` (:func:`_eval`) backwards over each interval
    ``[ts[i-1], ts[i]]`` with a fresh initial step, resetting ``u`` to ``U[i-1]`` and adding
    ``Ubar[i-1]`` to ``a`` at every output time. Writes ``u0bar = dL/du0 (n,)`` and
    ``pbar = dL/dp (n_params,)`` for ``L`` with ``dL/dU = Ubar (len(ts), n)``.

    Scratch: ``S (N_SCRATCH_ROWS, m)``, ``Z2 (2, m)``, ``t2 (2,)`` with
    ``m = 2 n + n_params``; ``bounds`` groups over the ``m`` entries (torchdiffeq's
    default: ``[0, n, 2n, 2n + |p_1|, ...]`` per parameter tensor). Returns 0 or a negative
    error code.
    """
    n = U.shape[1]
    z = Z2[0]
    for i in range(n):
        z[i] = U[U.shape[0] - 1, i]
        z[n + i] = Ubar[U.shape[0] - 1, i]
    for i in range(2 * n, z.shape[0]):
        z[i] = 0.0
    for j in range(ts.shape[0] - 1, 0, -1):
        t2[0] = ts[j]
        t2[1] = ts[j - 1]
        code = _integrate(True, rhs, rhs_vjp, n, t2, z, p, work, rtol, atol, bounds,
                          Z2, S, max_steps, stats)
        if code != 0:
            return code
        for i in range(z.shape[0]):
            z[i] = Z2[1, i]
        for i in range(n):
            z[i] = U[j - 1, i]
            z[n + i] += Ubar[j - 1, i]
    for i in range(n):
        u0bar[i] = z[n + i]
    for i in range(pbar.shape[0]):
        pbar[i] = z[2 * n + i]
    return 0
