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
from numba import njit, prange, types
from numba.extending import overload

_OPTS = dict(nogil=True, error_model="numpy", cache=True)
_INLINE = dict(_OPTS, inline="always")

_f64, _vec, _mat = types.float64, types.float64[::1], types.float64[:, ::1]
_i64, _ivec = types.int64, types.int64[::1]


def rhs_signatures(dtype):
    """``(rhs signature, rhs_vjp signature)`` for states and parameters of ``dtype``
    (float64 or float32; the time is float64 either way)."""
    v = types.Array(types.float64 if np.dtype(dtype) == np.float64 else types.float32, 1, "C")
    return (types.void(_f64, v, v, v, v), types.void(_f64, v, v, v, v, v, v, v))


#: ``rhs(t, u, p, du, work)`` (float64; float32: :func:`rhs_signatures`)
#: ``rhs_vjp(t, u, p, a, du, ubar, pbar, work)``
RHS_SIG, RHS_VJP_SIG = rhs_signatures(np.float64)
RHS_SIG32, RHS_VJP_SIG32 = rhs_signatures(np.float32)
_RHS, _VJP = types.FunctionType(RHS_SIG), types.FunctionType(RHS_VJP_SIG)
_VJP32 = types.FunctionType(RHS_VJP_SIG32)

MAX_STEPS_EXCEEDED = -1
NOT_FINITE = -2
STEP_UNDERFLOW = -3
#: :func:`dopri5_record`: more accepted steps than its record arrays hold
STORAGE_FULL = -4

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
    if f == _VJP or f == _VJP32:
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


@njit(**_INLINE)
def _record(rec, t, dt, y):
    """Record accepted step ``s = info[0]`` (start time ``t``, size ``dt``, start state
    ``y``) for :func:`dopri5_vjp`. ``rec = (rec_t, rec_dt, ckpt, info, out_step)``;
    ``info = [steps, stride, checkpoints kept]``. The state is kept at every ``stride``-th
    step in the rows of ``ckpt``; when they are full, every other one is dropped and the
    stride doubles (so at most ``len(ckpt)`` states, evenly spaced). With one row, only
    the initial state is kept. Returns False if ``rec_t`` is full."""
    rec_t, rec_dt, ckpt, info = rec[0], rec[1], rec[2], rec[3]
    s = info[0]
    if s >= rec_t.shape[0]:
        return False
    rec_t[s] = t
    rec_dt[s] = dt
    C = ckpt.shape[0]
    stride = info[1]
    if s == 0 or (C > 1 and s % stride == 0):
        slot = s // stride
        if slot >= C:  # thin out: keep steps 0, 2 stride, 4 stride, ...
            kept = (C + 1) // 2
            for k in range(1, kept):
                for i in range(y.shape[0]):
                    ckpt[k, i] = ckpt[2 * k, i]
            stride *= 2
            info[1] = stride
            info[2] = kept
            slot = s // stride if s % stride == 0 else -1
        if slot >= 0:
            for i in range(y.shape[0]):
                ckpt[slot, i] = y[i]
            info[2] = slot + 1
    info[0] = s + 1
    return True


@njit(**_OPTS)
def _integrate(adjoint, rhs, rhs_vjp, n, ts, z0, p, work, rtol, atol, bounds, Z, S, max_steps, stats,
               rec=None):
    """Integrate ``dz/dt = f`` (or the adjoint system, see :func:`_eval`) from ``ts[0]``
    through the monotone ``ts``; write
    ``Z[i] = z(ts[i])`` (``Z[0] = z0``; ``z0`` may alias ``Z[0]``). ``stats`` (int64[3]) is
    incremented by (function evaluations, accepted steps, rejected steps). With ``rec``
    (see :func:`_record`) every accepted step is recorded and ``out_step[i]`` is set to the
    step whose interval holds ``ts[i]`` (-1 for ``ts[0]``)."""
    m = z0.shape[0]
    # rotating rows: state and slope at the start (a) and end (b) of the last accepted
    # step, the candidate state (c) and the slope there (fc)
    ya, yb, yc, fa, fb, fc = 0, 1, 2, 3, 4, 5
    K2, K3, K4, K5, K6, YM = S[6], S[7], S[8], S[9], S[10], S[11]
    for i in range(m):
        S[yb, i] = z0[i]
    for i in range(m):
        Z[0, i] = z0[i]
    if rec is not None:
        rec[3][0] = 0
        rec[3][1] = 1
        rec[3][2] = 0
        rec[4][0] = -1
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
            # error estimate, in the row of the midpoint (free until this step is accepted:
            # the dense output after an exit of this loop always follows an acceptance)
            for i in range(m):
                YM[i] = (E1 * k1[i] + E3 * K3[i] + E4 * K4[i] + E5 * K5[i] + E6 * K6[i]
                         + E7 * k7[i])
            ratio = _group_norm(YM, y, yn, rtol, atol, bounds, dt)
            if not np.isfinite(ratio):
                return NOT_FINITE
            if ratio <= 1.0:
                stats[1] += 1
                if rec is not None:
                    if not _record(rec, t_b, dt, y):
                        return STORAGE_FULL
                    K = rec[5]
                    if K.shape[0] > 0:  # the slopes too ("all" checkpoints)
                        srow = rec[3][0] - 1
                        for i in range(m):
                            K[srow, 0, i] = k1[i]
                            K[srow, 1, i] = K2[i]
                            K[srow, 2, i] = K3[i]
                            K[srow, 3, i] = K4[i]
                            K[srow, 4, i] = K5[i]
                            K[srow, 5, i] = K6[i]
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
        if rec is not None:
            rec[4][j] = rec[3][0] - 1
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


# --- discretise-then-optimise adjoint --------------------------------------------------
#: rows of the scratch array ``V`` of :func:`dopri5_vjp` (shape ``(N_VJP_ROWS, n)``)
N_VJP_ROWS = 27
_Y, _K1, _Y2, _YN, _YBAR, _K7BAR, _Y0BAR, _KB1, _TMP, _YMBAR, _DU, _PREV = (
    0, 1, 8, 13, 14, 15, 16, 17, 23, 24, 25, 26)


@njit(**_INLINE)
def _stages_from(Ks, t, dt, V):
    """:func:`_stages` from the recorded slopes ``Ks (6, n)`` of the step: no ``rhs``
    calls, the same stage states bitwise."""
    y, k1, K2, K3, K4, K5, K6 = V[_Y], V[_K1], V[_K1 + 1], V[_K1 + 2], V[_K1 + 3], V[_K1 + 4], V[_K1 + 5]
    Y2, Y3, Y4, Y5, Y6, yn = V[_Y2], V[_Y2 + 1], V[_Y2 + 2], V[_Y2 + 3], V[_Y2 + 4], V[_YN]
    for i in range(y.shape[0]):
        k1[i], K2[i], K3[i], K4[i], K5[i], K6[i] = Ks[0, i], Ks[1, i], Ks[2, i], Ks[3, i], Ks[4, i], Ks[5, i]
        Y2[i] = y[i] + dt * (A21 * k1[i])
        Y3[i] = y[i] + dt * (A31 * k1[i] + A32 * K2[i])
        Y4[i] = y[i] + dt * (A41 * k1[i] + A42 * K2[i] + A43 * K3[i])
        Y5[i] = y[i] + dt * (A51 * k1[i] + A52 * K2[i] + A53 * K3[i] + A54 * K4[i])
        Y6[i] = y[i] + dt * (A61 * k1[i] + A62 * K2[i] + A63 * K3[i] + A64 * K4[i]
                             + A65 * K5[i])
        yn[i] = y[i] + dt * (B1 * k1[i] + B3 * K3[i] + B4 * K4[i] + B5 * K5[i] + B6 * K6[i])


@njit(**_INLINE)
def _stages(rhs, t, dt, V, p, work):
    """One Dormand-Prince step from ``V[_Y]`` at ``t``: the slopes ``k1..k6`` into
    ``V[_K1 .. _K1+5]``, the stage states ``Y2..Y6`` into ``V[_Y2 .. _Y2+4]`` and the new
    state into ``V[_YN]``. The same arithmetic, in the same order, as :func:`_integrate`'s
    step, so the states are bitwise those of the forward solve."""
    y, k1, K2, K3, K4, K5, K6 = V[_Y], V[_K1], V[_K1 + 1], V[_K1 + 2], V[_K1 + 3], V[_K1 + 4], V[_K1 + 5]
    Y2, Y3, Y4, Y5, Y6, yn = V[_Y2], V[_Y2 + 1], V[_Y2 + 2], V[_Y2 + 3], V[_Y2 + 4], V[_YN]
    m = y.shape[0]
    rhs(t, y, p, k1, work)
    for i in range(m):
        Y2[i] = y[i] + dt * (A21 * k1[i])
    rhs(t + C2 * dt, Y2, p, K2, work)
    for i in range(m):
        Y3[i] = y[i] + dt * (A31 * k1[i] + A32 * K2[i])
    rhs(t + C3 * dt, Y3, p, K3, work)
    for i in range(m):
        Y4[i] = y[i] + dt * (A41 * k1[i] + A42 * K2[i] + A43 * K3[i])
    rhs(t + C4 * dt, Y4, p, K4, work)
    for i in range(m):
        Y5[i] = y[i] + dt * (A51 * k1[i] + A52 * K2[i] + A53 * K3[i] + A54 * K4[i])
    rhs(t + C5 * dt, Y5, p, K5, work)
    for i in range(m):
        Y6[i] = y[i] + dt * (A61 * k1[i] + A62 * K2[i] + A63 * K3[i] + A64 * K4[i]
                             + A65 * K5[i])
    rhs(t + dt, Y6, p, K6, work)
    for i in range(m):
        yn[i] = y[i] + dt * (B1 * k1[i] + B3 * K3[i] + B4 * K4[i] + B5 * K5[i] + B6 * K6[i])


@njit(**_INLINE)
def _vjp_add(rhs_vjp, t, u, p, a, V, work, ptmp, into, pbar):
    """``into += a^T df/du`` and ``pbar += a^T df/dp`` at ``(t, u)``."""
    tmp = V[_TMP]
    rhs_vjp(t, u, p, a, V[_DU], tmp, ptmp, work)
    for i in range(tmp.shape[0]):
        into[i] += tmp[i]
    for i in range(pbar.shape[0]):
        pbar[i] += ptmp[i]


_ten = types.float64[:, :, ::1]


@njit(_i64(_RHS, _VJP, _vec, _mat, _vec, _vec, _vec, _vec, _mat, _ten, _ivec, _ivec, _mat, _vec,
           _vec, _vec, _ivec), **_OPTS)
def dopri5_vjp(rhs, rhs_vjp, ts, Ubar, p, work, rec_t, rec_dt, ckpt, rec_k, info, out_step, V,
               ptmp, u0bar, pbar, stats):
    """Discretise-then-optimise adjoint of :func:`dopri5_record`: the exact pullback of
    its discrete solution ``U`` (the accepted steps and the dense output at ``ts``) at
    ``Ubar = dL/dU (len(ts), n)``, with the step sizes held fixed (they are not
    differentiated, as in diffrax and torchode).

    Walks the recorded steps backwards; for each, recomputes its state from the nearest
    checkpoint (:func:`_record`; none with a checkpoint per step), its stages (from the
    recorded slopes ``rec_k (steps, 6, n)`` if they were kept, else by six ``rhs``
    calls; an empty ``rec_k`` means not kept), and pulls
    ``Ubar`` back through the dense output, the step's update and its six stages: six
    ``rhs_vjp`` calls and six or seven ``rhs`` calls per accepted step. Writes ``u0bar``
    (``n``) and ``pbar`` (``n_params``); ``V (N_VJP_ROWS, n)`` and ``ptmp (n_params,)`` are
    scratch; ``stats[0]`` counts ``rhs`` calls, ``stats[1]`` ``rhs_vjp`` calls. Returns 0.
    """
    n = Ubar.shape[1]
    S, stride, kept = info[0], info[1], info[2]
    for i in range(pbar.shape[0]):
        pbar[i] = 0.0
    for r in range(_YBAR, _PREV + 1):
        for i in range(n):
            V[r, i] = 0.0
    ybar, k7bar, y0bar, ymbar = V[_YBAR], V[_K7BAR], V[_Y0BAR], V[_YMBAR]
    nout = ts.shape[0]
    j = nout - 1
    for s in range(S - 1, -1, -1):
        t, dt = rec_t[s], rec_dt[s]
        # the state at the start of step s, from the nearest checkpoint at or before it
        c = 0 if ckpt.shape[0] == 1 else min(s // stride, kept - 1)
        for i in range(n):
            V[_Y, i] = ckpt[c, i]
        for q in range(c * stride if ckpt.shape[0] > 1 else 0, s):
            _stages(rhs, rec_t[q], rec_dt[q], V, p, work)
            stats[0] += 6
            for i in range(n):
                V[_Y, i] = V[_YN, i]
        if rec_k.shape[0] > s:
            _stages_from(rec_k[s], t, dt, V)
        else:
            _stages(rhs, t, dt, V, p, work)
            stats[0] += 6
        tb = t + dt
        k7 = V[_K1 + 6]
        if s == S - 1:
            rhs(tb, V[_YN], p, k7, work)
            stats[0] += 1
        else:
            for i in range(n):
                k7[i] = V[_PREV, i]
        for i in range(n):
            V[_PREV, i] = V[_K1, i]
        # outputs in this step: the 4th-order dense output through y0, y1, f0, f1, ymid
        h = tb - t
        for i in range(n):
            y0bar[i] = 0.0
            ymbar[i] = 0.0
        for r in range(6):
            for i in range(n):
                V[_KB1 + r, i] = 0.0
        kb1 = V[_KB1]
        while j >= 1 and out_step[j] == s:
            x = (ts[j] - t) / h
            x2, x3, x4 = x * x, x * x * x, x * x * x * x
            cy0 = 1.0 - 11.0 * x2 + 18.0 * x3 - 8.0 * x4
            cy1 = -5.0 * x2 + 14.0 * x3 - 8.0 * x4
            cym = 16.0 * x2 - 32.0 * x3 + 16.0 * x4
            cf0 = h * (x - 4.0 * x2 + 5.0 * x3 - 2.0 * x4)
            cf1 = h * (x2 - 3.0 * x3 + 2.0 * x4)
            for i in range(n):
                u = Ubar[j, i]
                y0bar[i] += cy0 * u
                ybar[i] += cy1 * u
                ymbar[i] += cym * u
                kb1[i] += cf0 * u
                k7bar[i] += cf1 * u
            j -= 1
        # ymid = y + dt (M1 k1 + M3 k3 + M4 k4 + M5 k5 + M6 k6 + M7 k7)
        for i in range(n):
            g = ymbar[i]
            y0bar[i] += g
            kb1[i] += dt * M1 * g
            V[_KB1 + 2, i] += dt * M3 * g
            V[_KB1 + 3, i] += dt * M4 * g
            V[_KB1 + 4, i] += dt * M5 * g
            V[_KB1 + 5, i] += dt * M6 * g
            k7bar[i] += dt * M7 * g
        # k7 = f(t + dt, y_{s+1}) (also the next step's k1): into dL/dy_{s+1}
        _vjp_add(rhs_vjp, tb, V[_YN], p, k7bar, V, work, ptmp, ybar, pbar)
        stats[1] += 1
        # y_{s+1} = y + dt (B1 k1 + B3 k3 + B4 k4 + B5 k5 + B6 k6)
        for i in range(n):
            g = ybar[i]
            y0bar[i] += g
            kb1[i] += dt * B1 * g
            V[_KB1 + 2, i] += dt * B3 * g
            V[_KB1 + 3, i] += dt * B4 * g
            V[_KB1 + 4, i] += dt * B5 * g
            V[_KB1 + 5, i] += dt * B6 * g
        # the stages, last first: k_r = f(t + c_r dt, Y_r), Y_r = y + dt sum_q a_rq k_q
        ybr = V[_YMBAR]  # free now: dL/dY_r of the stage being pulled back
        for r in range(5, 0, -1):
            for i in range(ybr.shape[0]):
                ybr[i] = 0.0
            cr = C2 if r == 1 else (C3 if r == 2 else (C4 if r == 3 else (C5 if r == 4 else 1.0)))
            _vjp_add(rhs_vjp, t + cr * dt, V[_Y2 + r - 1], p, V[_KB1 + r], V, work, ptmp, ybr, pbar)
            stats[1] += 1
            for i in range(n):
                g = ybr[i]
                y0bar[i] += g
                if r == 1:
                    kb1[i] += dt * A21 * g
                elif r == 2:
                    kb1[i] += dt * A31 * g
                    V[_KB1 + 1, i] += dt * A32 * g
                elif r == 3:
                    kb1[i] += dt * A41 * g
                    V[_KB1 + 1, i] += dt * A42 * g
                    V[_KB1 + 2, i] += dt * A43 * g
                elif r == 4:
                    kb1[i] += dt * A51 * g
                    V[_KB1 + 1, i] += dt * A52 * g
                    V[_KB1 + 2, i] += dt * A53 * g
                    V[_KB1 + 3, i] += dt * A54 * g
                else:
                    kb1[i] += dt * A61 * g
                    V[_KB1 + 1, i] += dt * A62 * g
                    V[_KB1 + 2, i] += dt * A63 * g
                    V[_KB1 + 3, i] += dt * A64 * g
                    V[_KB1 + 4, i] += dt * A65 * g
        # k1 of this step is k7 of the previous one: carried; y_s's adjoint goes on
        for i in range(n):
            k7bar[i] = kb1[i]
            ybar[i] = y0bar[i]
    # u0: the first output, the first slope f(ts[0], u0), and the steps' adjoint
    for i in range(n):
        V[_Y, i] = ckpt[0, i]
    if S > 0:
        _vjp_add(rhs_vjp, rec_t[0], V[_Y], p, k7bar, V, work, ptmp, ybar, pbar)
        stats[1] += 1
    for i in range(n):
        u0bar[i] = ybar[i] + Ubar[0, i]
    return 0


@njit(_i64(_RHS, _vec, _vec, _vec, _vec, _f64, _f64, _ivec, _mat, _mat, _i64, _ivec, _vec, _vec,
           _mat, _ten, _ivec, _ivec), **_OPTS)
def dopri5_record(rhs, ts, u0, p, work, rtol, atol, bounds, U, S, max_steps, stats, rec_t, rec_dt,
                  ckpt, rec_k, info, out_step):
    """:func:`dopri5` that also records what :func:`dopri5_vjp` needs: the start time and
    size of every accepted step (``rec_t``, ``rec_dt``: capacity = most steps), states at
    checkpoints (``ckpt (C, n)``: a state every ``info[1]``-th step, at most ``C``; see
    :func:`_record`), ``info = [steps, stride, checkpoints]``, ``out_step
    (len(ts),)`` and, if ``rec_k`` has rows (``(capacity, 6, n)``; give ``(0, 6, n)``
    not to keep them), each step's slopes ``k1..k6``. Returns 0, a negative error code,
    or :data:`STORAGE_FULL` (more accepted steps than ``rec_t`` holds: enlarge it and
    solve again)."""
    return _integrate(False, rhs, rhs, u0.shape[0], ts, u0, p, work, rtol, atol,
                      bounds, U, S, max_steps, stats, (rec_t, rec_dt, ckpt, info, out_step, rec_k))


def _sigs(dtype):
    """The signatures of the solver functions for states of ``dtype`` (times float64)."""
    d = types.float64 if np.dtype(dtype) == np.float64 else types.float32
    v, m, t3 = types.Array(d, 1, "C"), types.Array(d, 2, "C"), types.Array(d, 3, "C")
    R, J = (types.FunctionType(s) for s in rhs_signatures(dtype))
    return {
        dopri5: _i64(R, _vec, v, v, v, _f64, _f64, _ivec, m, m, _i64, _ivec),
        backsolve: _i64(R, J, _vec, m, m, v, v, _f64, _f64, _ivec, m, m, _vec, _i64, _ivec, v, v),
        dopri5_vjp: _i64(R, J, _vec, m, v, v, _vec, _vec, m, t3, _ivec, _ivec, m, v, v, v, _ivec),
        dopri5_record: _i64(R, _vec, v, v, v, _f64, _f64, _ivec, m, m, _i64, _ivec, _vec, _vec, m,
                            t3, _ivec, _ivec),
    }


def ensure_dtype(dtype) -> None:
    """Compile (or load from numba's cache) :func:`dopri5`, :func:`backsolve`,
    :func:`dopri5_record` and :func:`dopri5_vjp` for states of ``dtype``: float64 is
    compiled on import; float32 (float64 times and solver arithmetic, float32 states,
    parameters and right-hand side) on first use."""
    for fn, sig in _sigs(dtype).items():
        if tuple(sig.args) not in fn.overloads:
            fn._can_compile = True
            try:
                fn.compile(sig)
            finally:
                fn._can_compile = False


# --- many trajectories, each its own adaptive solve -------------------------------------


def _solve_many(rhs, ts, U0, p, works, rtol, atol, bounds, U, Ut, S, max_steps, stats, rec_t,
                rec_dt, ckpt, rec_k, info, out_step, codes):
    """:func:`dopri5_record` for each row ``i`` of ``U0 (k, n)``, an independent trajectory
    with its own steps, ``U[:, i] = its solution``; the trajectories are spread over the
    threads (``works.shape[0]`` of them, round robin; thread ``th`` uses row ``th`` of
    ``works``, ``Ut``, ``S``). Per trajectory ``i``: ``stats[i]``, the records
    ``rec_t[i] ... out_step[i]`` and the return code ``codes[i]``. Each trajectory's result
    does not depend on the thread count."""
    nt = works.shape[0]
    k = U0.shape[0]
    for th in prange(nt):
        for i in range(th, k, nt):
            codes[i] = dopri5_record(rhs, ts, U0[i], p, works[th], rtol, atol, bounds, Ut[th], S[th],
                                     max_steps, stats[i], rec_t[i], rec_dt[i], ckpt[i], rec_k[i],
                                     info[i], out_step[i])
            for j in range(ts.shape[0]):
                for q in range(U0.shape[1]):
                    U[j, i, q] = Ut[th, j, q]


def _vjp_many(rhs, rhs_vjp, ts, Ubar, p, works, rec_t, rec_dt, ckpt, rec_k, info, out_step, V,
              ptmp, Ubt, U0bar, Pbar, stats):
    """:func:`dopri5_vjp` of each trajectory of :func:`_solve_many`: ``U0bar[i]`` and its
    own ``Pbar[i]`` (summed by the caller in trajectory order, so the total does not depend
    on the thread count)."""
    nt = works.shape[0]
    k = U0bar.shape[0]
    for th in prange(nt):
        for i in range(th, k, nt):
            for j in range(ts.shape[0]):
                for q in range(U0bar.shape[1]):
                    Ubt[th, j, q] = Ubar[j, i, q]
            dopri5_vjp(rhs, rhs_vjp, ts, Ubt[th], p, works[th], rec_t[i], rec_dt[i], ckpt[i],
                       rec_k[i], info[i], out_step[i], V[th], ptmp[th], U0bar[i], Pbar[i], stats[i])


solve_many = njit(parallel=True, **_OPTS)(_solve_many)
vjp_many = njit(parallel=True, **_OPTS)(_vjp_many)


def _many_sigs(dtype):
    d = types.float64 if np.dtype(dtype) == np.float64 else types.float32
    arr = [types.Array(d, nd, "C") for nd in range(5)]
    R, J = (types.FunctionType(s) for s in rhs_signatures(dtype))
    f2, i2 = types.float64[:, ::1], types.int64[:, ::1]
    return {
        solve_many: types.void(R, _vec, arr[2], arr[1], arr[2], _f64, _f64, _ivec, arr[3], arr[3],
                               arr[3], _i64, i2, f2, f2, arr[3], arr[4], i2, i2, _ivec),
        vjp_many: types.void(R, J, _vec, arr[3], arr[1], arr[2], f2, f2, arr[3], arr[4], i2, i2,
                             arr[3], arr[2], arr[3], arr[2], arr[2], i2),
    }


def ensure_many(dtype) -> None:
    """Compile (or load) :data:`solve_many` / :data:`vjp_many` for ``dtype`` (parallel code:
    compiled only when independent trajectories are used)."""
    ensure_dtype(dtype)
    for fn, sig in _many_sigs(dtype).items():
        if tuple(sig.args) not in fn.overloads:
            fn.compile(sig)
