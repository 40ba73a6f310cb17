"""Layers over a time axis: :class:`GRU`, :class:`LSTM`, :class:`TimeDistributed`, :class:`Conv1D`.

Sequences are per-sample arrays ``(T, F)`` (a chain input ``(N, T, F)``, torch's
``batch_first=True``). In a block they are flattened in C order like every other shape:
feature ``f`` of time step ``t`` of lane ``s`` sits at ``work[off + (t * F + f) * B + s]``,
so each time step is an ordinary feature-major block of ``F`` rows, a ``Flatten`` after a
sequence gives torch's ``x.reshape(N, -1)`` order, and ``Conv`` output ``(C, T, 1)`` is
the same memory as ``(C, T)``.

Both cells follow torch's equations, gate order and parameter layout (``torch.nn.GRU`` /
``torch.nn.LSTM``, one layer, ``batch_first=True``, zero initial state), so the four arrays
``weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0`` copied from torch give the same
outputs. Parameters in ``p``, in this order:

* ``weight_ih (G * H, F)``, ``weight_hh (G * H, H)``, ``bias_ih (G * H,)``, ``bias_hh (G * H,)``
  with ``G = 3`` gates ``(r, z, n)`` for the GRU and ``G = 4`` gates ``(i, f, g, o)`` for the
  LSTM, each gate's ``H`` rows consecutive.

GRU (Cho et al. 2014, torch's variant with the reset gate applied after ``W_hn h``)::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

LSTM (Hochreiter & Schmidhuber 1997, with forget gate; no peepholes, no projection)::

    i, f, o = sigmoid(.), g = tanh(.)  of  W_i* x + b_i* + W_h* h + b_h*
    c' = f * c + i * g
    h' = o * tanh(c')

The forward step (:func:`gru_forward`, :func:`lstm_forward`) runs the time steps in order
and keeps every ``h_t`` and the gates in the layer's saved area; the pullback
(:func:`gru_pullback`, :func:`lstm_pullback`) is backpropagation through time: the steps
in reverse, ``dW`` accumulated over all time steps and lanes, ``dL/dx_t`` written per step.
Nothing is allocated. These loop nests are plain code (every inner loop runs over the
block's lanes, which LLVM vectorizes): the GRU's only kernels, and the LSTM's reference,
checked against torch autograd and finite differences in tests/test_recurrent.py.

The LSTM's tuned code (:meth:`LSTM.emit_forward`, :meth:`LSTM.emit_pullback`, for blocks
of whole vector pairs: :func:`sequence_variant`) keeps the per-lane cell of the loop nests
(:func:`_lstm_cell`, :func:`_lstm_cell_pullback`) and moves every product into explicit
vector register tiles: each step's gates ``W_ih x_t + W_hh h_{t-1} + b`` and the
recurrence's ``W_hh^T da_t`` (:func:`~smallchains.layers.dense.emit_gemm_vector`), and
after the recurrence ``dL/dx`` of all steps and the weight gradients summed over all steps
and samples (:func:`emit_outer_grad_steps`). Measured on an AVX-512 Xeon (the FluxBench
TPA-LSTM's LSTM(10) over 10 steps, blocks of 64, ``bench/step_profile.py --model
tpa_lstm``): forward 0.88 -> 0.73 ms and pullback 5.2 -> 0.78 ms per 2,048 samples.
tests/test_variants.py checks the tuned code against the loop nests at every tile
remainder, both dtypes and both register budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from math import prod

import numpy as np
from numba import njit, types
from numba.extending import overload

from .._config import INLINE_OPTIONS, JIT_OPTIONS
from .._fastmath import tanh_f32, tanh_f64
from ..activations import get_activation, needs_z
from . import reference
from .base import STEP_BREAK, EmitContext, Layer, at
from .dense import TurboDense, emit_affine, emit_affine_pullback, emit_gemm_vector, vector_blocks, vector_lanes


def _tanh(x):  # pragma: no cover - replaced by the overload inside numba code
    return math.tanh(x)


@overload(_tanh, inline="always", jit_options=dict(fastmath=JIT_OPTIONS["fastmath"]))
def _tanh_impl(x):
    """tanh of the kernel dtype: the float32 rational approximation or the float64 one of
    :mod:`smallchains._fastmath` (the same functions as the ``tanh`` activation)."""
    if x == types.float32:
        return lambda x: tanh_f32(x)
    return lambda x: tanh_f64(x)


def _cst(arr, v):  # pragma: no cover - replaced by the overload inside numba code
    return arr.dtype.type(v)


@overload(_cst, inline="always")
def _cst_impl(arr, v):
    """The number ``v`` in the dtype of ``arr``. (In numba, float32 combined with an int
    constant gives float64: ``x * 0`` or ``x / 2`` would move a float32 kernel's arithmetic
    to float64, half the lanes per vector.)"""
    if arr.dtype == types.float32:
        return lambda arr, v: np.float32(v)
    return lambda arr, v: np.float64(v)


# --- shared loop nests (blocks feature-major: row k of lane s at work[off + k * B + s]) ---

@njit(**INLINE_OPTIONS)
def _gemm(p, w, ld, n_rows, n_cols, work, x, y, B, accumulate):
    """``y[o] (+)= sum_k W[o, k] x[k]`` over a block, ``W[o, k] = p[w + o * ld + k]``.
    The sum over ``k`` is inside the lane loop: with the sizes literal, LLVM unrolls it
    and vectorizes the lane loop with the sum in registers (one store per output row)."""
    for o in range(n_rows):
        yo = y + o * B
        wo = w + o * ld
        for s in range(B):
            acc = work[yo + s] if accumulate else _cst(work, 0.0)
            for k in range(n_cols):
                acc += p[wo + k] * work[x + k * B + s]
            work[yo + s] = acc


@njit(**INLINE_OPTIONS)
def _gemm_t(p, w, ld, n_rows, n_cols, work, d, y, B, accumulate):
    """``y[k] (+)= sum_o W[o, k] d[o]`` (the transposed product) for ``k < n_cols``."""
    for k in range(n_cols):
        yk = y + k * B
        for s in range(B):
            acc = work[yk + s] if accumulate else _cst(work, 0.0)
            for o in range(n_rows):
                acc += p[w + o * ld + k] * work[d + o * B + s]
            work[yk + s] = acc


@njit(**INLINE_OPTIONS)
def _outer_seq(g, w, ld, n_rows, n_cols, work, d, d_step, x, x_step, n_steps, B):
    """``g[w + o * ld + k] += sum_t sum_s d_t[o, s] x_t[k, s]`` over ``n_steps`` pairs of
    blocks (``d_t`` at ``d + t * d_step``, ``x_t`` at ``x + t * x_step``): the weight
    gradient of all time steps at once, one reduction per entry."""
    for o in range(n_rows):
        for k in range(n_cols):
            acc = _cst(work, 0.0)
            for t in range(n_steps):
                do = d + t * d_step + o * B
                xk = x + t * x_step + k * B
                for s in range(B):
                    acc += work[do + s] * work[xk + s]
            g[w + o * ld + k] += acc


@njit(**INLINE_OPTIONS)
def _row_sums_seq(g, b, n_rows, work, d, d_step, n_steps, B):
    """``g[b + o] += sum_t sum_s d_t[o, s]``, ``d_t`` at ``d + t * d_step``."""
    for o in range(n_rows):
        acc = _cst(work, 0.0)
        for t in range(n_steps):
            for s in range(B):
                acc += work[d + t * d_step + o * B + s]
        g[b + o] += acc


@njit(**INLINE_OPTIONS)
def _bias_rows(p, b, n_rows, work, y, B):
    """``y[o] = b[o]`` over the block."""
    for o in range(n_rows):
        bo = p[b + o]
        for s in range(B):
            work[y + o * B + s] = bo


# --- GRU ------------------------------------------------------------------------------

@njit(**JIT_OPTIONS)
def gru_forward(p, work, x, sv, F, T, H, B, w, hist, gates, gi, gh):
    """GRU over ``T`` steps of a block. ``x``: input ``(T, F)``; ``sv``: the layer's saved
    area, which the next four offsets are relative to; ``hist``: out ``h_t``
    ``(T, H)``; ``gates``: out ``(r, z, n, W_hn h + b_hn)`` per step ``(T, 4H)``; ``gi``,
    ``gh``: scratch ``(3H)`` each. Parameters at ``p[w:]`` (see the module docstring)."""
    hist, gates, gi, gh = sv + hist, sv + gates, sv + gi, sv + gh
    G = 3 * H
    whh = w + G * F
    bih = whh + G * H
    bhh = bih + G
    one, half, zero = _cst(p, 1.0), _cst(p, 0.5), _cst(p, 0.0)
    for t in range(T):
        xt = x + t * F * B
        _bias_rows(p, bih, G, work, gi, B)
        _gemm(p, w, F, G, F, work, xt, gi, B, True)
        _bias_rows(p, bhh, G, work, gh, B)
        # h_{t-1}, or for t = 0 any finite block (gh) times 0: no branch in the lane loop
        hp, h_on = (hist + (t - 1) * H * B, one) if t > 0 else (gh, zero)
        if t > 0:
            _gemm(p, whh, H, G, H, work, hp, gh, B, True)
        ht = hist + t * H * B
        gt = gates + t * 4 * H * B
        for j in range(H):
            for s in range(B):
                r = half + half * _tanh(half * (work[gi + j * B + s] + work[gh + j * B + s]))
                z = half + half * _tanh(half * (work[gi + (H + j) * B + s] + work[gh + (H + j) * B + s]))
                hn = work[gh + (2 * H + j) * B + s]
                n = _tanh(work[gi + (2 * H + j) * B + s] + r * hn)
                h0 = work[hp + j * B + s] * h_on
                work[ht + j * B + s] = (one - z) * n + z * h0
                work[gt + j * B + s] = r
                work[gt + (H + j) * B + s] = z
                work[gt + (2 * H + j) * B + s] = n
                work[gt + (3 * H + j) * B + s] = hn


@njit(**JIT_OPTIONS)
def gru_pullback(p, g, work, x, sv, F, T, H, B, w, hist, gates, dgi, dgh, dh, gout, seq, gin, need_gin):
    """Backpropagation through time for :func:`gru_forward` (``hist`` ... ``dh`` relative to
    ``sv``). ``gout``: ``dL/dh`` of every
    step ``(T, H)`` if ``seq`` else of the last ``(H)`` (read only); adds ``dL/dW`` into
    ``g[w:]`` and, if ``need_gin``, writes ``dL/dx`` ``(T, F)`` at ``gin``. ``dgi``,
    ``dgh`` ``(T, 3H)`` and ``dh`` ``(H)``: scratch."""
    hist, gates, dgi, dgh, dh = sv + hist, sv + gates, sv + dgi, sv + dgh, sv + dh
    G = 3 * H
    whh = w + G * F
    bih = whh + G * H
    bhh = bih + G
    one, half, zero = _cst(p, 1.0), _cst(p, 0.5), _cst(p, 0.0)
    for k in range(H * B):
        work[dh + k] = work[gout + (T - 1) * H * B + k] if seq else work[gout + k]
    for t in range(T - 1, -1, -1):
        if seq and t < T - 1:
            for k in range(H * B):
                work[dh + k] += work[gout + t * H * B + k]
        hp = hist + (t - 1) * H * B
        gt = gates + t * 4 * H * B
        dgi_t, dgh_t = dgi + t * G * B, dgh + t * G * B
        for j in range(H):
            for s in range(B):
                r = work[gt + j * B + s]
                z = work[gt + (H + j) * B + s]
                n = work[gt + (2 * H + j) * B + s]
                hn = work[gt + (3 * H + j) * B + s]
                h0 = work[hp + j * B + s] if t > 0 else zero
                d = work[dh + j * B + s]
                an = d * (one - z) * (one - n * n)        # d/d(pre-activation of n)
                az = d * (h0 - n) * z * (one - z)
                ar = an * hn * r * (one - r)
                work[dgi_t + j * B + s] = ar
                work[dgi_t + (H + j) * B + s] = az
                work[dgi_t + (2 * H + j) * B + s] = an
                work[dgh_t + j * B + s] = ar
                work[dgh_t + (H + j) * B + s] = az
                work[dgh_t + (2 * H + j) * B + s] = an * r
                work[dh + j * B + s] = d * z               # direct path h' <- z * h
        if t > 0:
            _gemm_t(p, whh, H, G, H, work, dgh_t, dh, B, True)
    if need_gin:  # dL/dx_t = W_ih^T dgi_t (after the recurrence, as the LSTM's)
        for t in range(T):
            _gemm_t(p, w, F, G, F, work, dgi + t * G * B, gin + t * F * B, B, False)
    # weight and bias gradients of all steps at once (dgi, dgh kept for every step)
    _row_sums_seq(g, bih, G, work, dgi, G * B, T, B)
    _row_sums_seq(g, bhh, G, work, dgh, G * B, T, B)
    _outer_seq(g, w, F, G, F, work, dgi, G * B, x, F * B, T, B)
    _outer_seq(g, whh, H, G, H, work, dgh + G * B, G * B, hist, H * B, T - 1, B)


# --- LSTM -----------------------------------------------------------------------------

@njit(**INLINE_OPTIONS)
def _lstm_cell(work, ga, cp, ht, gt, H, B, first):
    """One LSTM step after the gate products: ``ga`` holds the pre-activations ``(4H)``;
    writes ``h_t`` at ``ht`` and ``(i, f, g, o, c)`` at ``gt`` ``(5H)``; ``cp``: the previous
    ``c`` (unread if ``first``: zero initial state). Absolute offsets."""
    half, zero = _cst(work, 0.5), _cst(work, 0.0)
    for j in range(H):
        for s in range(B):
            i = half + half * _tanh(half * work[ga + j * B + s])
            f = half + half * _tanh(half * work[ga + (H + j) * B + s])
            gg = _tanh(work[ga + (2 * H + j) * B + s])
            o = half + half * _tanh(half * work[ga + (3 * H + j) * B + s])
            c0 = zero if first else work[cp + j * B + s]
            c = f * c0 + i * gg
            work[ht + j * B + s] = o * _tanh(c)
            work[gt + j * B + s] = i
            work[gt + (H + j) * B + s] = f
            work[gt + (2 * H + j) * B + s] = gg
            work[gt + (3 * H + j) * B + s] = o
            work[gt + (4 * H + j) * B + s] = c


@njit(**JIT_OPTIONS)
def lstm_forward(p, work, x, sv, F, T, H, B, w, hist, gates, ga):
    """LSTM over ``T`` steps of a block. ``x``: input ``(T, F)``; ``sv``: the saved area
    (``hist``, ``gates``, ``ga`` are relative to it); ``hist``: out ``h_t``
    ``(T, H)``; ``gates``: out ``(i, f, g, o, c)`` per step ``(T, 5H)``; ``ga``: scratch
    ``(4H)``. Parameters at ``p[w:]`` (see the module docstring). The reference forward
    (plain loop nests)."""
    hist, gates, ga = sv + hist, sv + gates, sv + ga
    G = 4 * H
    whh = w + G * F
    bih = whh + G * H
    bhh = bih + G
    for t in range(T):
        xt = x + t * F * B
        for o in range(G):
            bo = p[bih + o] + p[bhh + o]
            for s in range(B):
                work[ga + o * B + s] = bo
        _gemm(p, w, F, G, F, work, xt, ga, B, True)
        if t > 0:
            _gemm(p, whh, H, G, H, work, hist + (t - 1) * H * B, ga, B, True)
        _lstm_cell(work, ga, gates + ((t - 1) * 5 + 4) * H * B, hist + t * H * B,
                   gates + t * 5 * H * B, H, B, t == 0)


@njit(**INLINE_OPTIONS)
def _lstm_cell_pullback(work, gt, cp, dh, dc, da_t, H, B, first):
    """Reverse of :func:`_lstm_cell` for one step: from ``dh = dL/dh_t`` and ``dc`` (the
    part of ``dL/dc_t`` from later steps) writes ``da_t``, ``dL/d(gate
    pre-activations)`` ``(4H)``, and ``dc <- dL/dc_{t-1}``. ``gt``: the step's saved
    ``(i, f, g, o, c)``; ``cp``: the previous ``c`` (unread if ``first``)."""
    one, zero = _cst(work, 1.0), _cst(work, 0.0)
    for j in range(H):
        for s in range(B):
            i = work[gt + j * B + s]
            f = work[gt + (H + j) * B + s]
            gg = work[gt + (2 * H + j) * B + s]
            o = work[gt + (3 * H + j) * B + s]
            tc = _tanh(work[gt + (4 * H + j) * B + s])
            c0 = zero if first else work[cp + j * B + s]
            d = work[dh + j * B + s]
            dcc = work[dc + j * B + s] + d * o * (one - tc * tc)
            work[da_t + j * B + s] = dcc * gg * i * (one - i)
            work[da_t + (H + j) * B + s] = dcc * c0 * f * (one - f)
            work[da_t + (2 * H + j) * B + s] = dcc * i * (one - gg * gg)
            work[da_t + (3 * H + j) * B + s] = d * tc * o * (one - o)
            work[dc + j * B + s] = dcc * f


@njit(**INLINE_OPTIONS)
def _lstm_bptt_start(work, dh, dc, gout, seq, T, H, B):
    """``dh = dL/dh_{T-1}``, ``dc = 0``: the start of backpropagation through time."""
    zero = _cst(work, 0.0)
    for k in range(H * B):
        work[dh + k] = work[gout + (T - 1) * H * B + k] if seq else work[gout + k]
        work[dc + k] = zero


@njit(**INLINE_OPTIONS)
def _lstm_bptt(p, work, T, H, B, w, gates, da, dh, dc, gout, seq, F):
    """The recurrence of :func:`lstm_pullback`: the steps in reverse, ``dL/d(gate
    pre-activations)`` of every step into ``da`` ``(T, 4H)`` (all offsets absolute)."""
    G = 4 * H
    whh = w + G * F
    _lstm_bptt_start(work, dh, dc, gout, seq, T, H, B)
    for t in range(T - 1, -1, -1):
        if seq and t < T - 1:
            for k in range(H * B):
                work[dh + k] += work[gout + t * H * B + k]
        da_t = da + t * G * B
        _lstm_cell_pullback(work, gates + t * 5 * H * B, gates + ((t - 1) * 5 + 4) * H * B,
                            dh, dc, da_t, H, B, t == 0)
        if t > 0:
            _gemm_t(p, whh, H, G, H, work, da_t, dh, B, False)


@njit(**JIT_OPTIONS)
def lstm_pullback(p, g, work, x, sv, F, T, H, B, w, hist, gates, da, dh, dc, gout, seq, gin, need_gin):
    """Backpropagation through time for :func:`lstm_forward` (arguments as
    :func:`gru_pullback`; ``da`` ``(T, 4H)``, ``dh`` and ``dc`` ``(H)``: scratch). The
    reference pullback (plain loop nests)."""
    hist, gates, da, dh, dc = sv + hist, sv + gates, sv + da, sv + dh, sv + dc
    G = 4 * H
    whh = w + G * F
    bih = whh + G * H
    bhh = bih + G
    _lstm_bptt(p, work, T, H, B, w, gates, da, dh, dc, gout, seq, F)
    if need_gin:  # dL/dx_t = W_ih^T da_t (after the recurrence: measured 2x faster than in it)
        for t in range(T):
            _gemm_t(p, w, F, G, F, work, da + t * G * B, gin + t * F * B, B, False)
    # weight and bias gradients of all steps at once (da kept for every step)
    _row_sums_seq(g, bih, G, work, da, G * B, T, B)
    _row_sums_seq(g, bhh, G, work, da, G * B, T, B)
    _outer_seq(g, w, F, G, F, work, da, G * B, x, F * B, T, B)
    _outer_seq(g, whh, H, G, H, work, da + G * B, G * B, hist, H * B, T - 1, B)


# --- register tiles of the tuned pullbacks (blocks of whole vector pairs) -------------

def sequence_variant(B, dt, registers):
    """The code of the LSTM and the temporal pattern attention for blocks of ``B`` samples
    of ``dt`` (``"np.float32"``) and a budget of ``registers``: ``"vector"`` (their
    products in register tiles around plain per-lane loops) for blocks of whole vector
    pairs, else ``"reference"`` (the plain loop nests). The GRU has only the latter."""
    return "vector" if vector_blocks(B, dt, registers) else "reference"


def dw_steps_tile(registers):
    """(rows, columns) of the register tile of :func:`emit_outer_grad_steps`: rows x
    columns vector accumulators plus rows + columns loaded vectors fit the budget
    (4 x 4: 24 of AVX-512's 32; 2 x 4: 14 of AVX2's 16)."""
    return (4, 4) if registers >= 32 else (2, 4)


def emit_outer_grad_steps(B, dt, registers, g_off, g_ld, n_rows, n_cols, n_steps,
                          d_off, d_row, d_step, x_off, x_row, x_step):
    """Lines adding ``sum_t sum_s d[t, o, s] x[t, k, s]`` into ``g[g_off + o * g_ld + k]``
    for ``o < n_rows``, ``k < n_cols``, ``t < n_steps``, ``s < B``: the weight gradient of
    a product applied at every step of a sequence (``d[t, o, s]`` at ``work[d_off + t *
    d_step + o * d_row + s]``, ``x`` likewise).

    Register tiles of :func:`dw_steps_tile` accumulate vectors over all steps and samples
    and reduce once per tile (:func:`~smallchains._simd.vsum4`); the plain loop nest
    (:func:`_outer_seq`) reduces each entry horizontally at every step, which measured
    1.6 of the 2.4 ms per 2,048 samples of the LSTM(10) pullback over 10 steps (Xeon,
    AVX-512). Remainder rows and columns get smaller tiles. Blocks of whole vectors of
    :func:`~smallchains.layers.dense.vector_lanes` only."""
    if n_steps == 0 or n_rows == 0 or n_cols == 0:
        return []
    V = vector_lanes(dt, registers)
    TO, TI = dw_steps_tile(registers)

    def tile(o, to, k, tk, pad):
        do = f"{d_off} + o * {d_row}" if o == "o" else str(d_off + o * d_row)
        xo = f"{x_off} + k * {x_row}" if k == "k" else str(x_off + k * x_row)
        gw = (f"{g_off} + o * {g_ld}" if o == "o" else str(g_off + o * g_ld)) + \
            (" + k" if k == "k" else (f" + {k}" if k else ""))
        out = [f"{pad}c{a}_{b} = vz" for a in range(to) for b in range(tk)]
        out += [f"{pad}for ts in range({n_steps}):",
                f"{pad}    dts = {do} + ts * {d_step}", f"{pad}    xts = {xo} + ts * {x_step}",
                f"{pad}    for s in range(0, {B}, {V}):"]
        out += [f"{pad}        d{a} = vload(work, {at('dts', a * d_row)} + s)" for a in range(to)]
        out += [f"{pad}        x{b} = vload(work, {at('xts', b * x_row)} + s)" for b in range(tk)]
        out += [f"{pad}        c{a}_{b} = vfma(d{a}, x{b}, c{a}_{b})" for a in range(to) for b in range(tk)]
        out += [f"{pad}gw = {gw}"]
        for a in range(to):
            if tk == 4:
                out += [f"{pad}vadd_into(g, {at('gw', a * g_ld)}, vsum4({', '.join(f'c{a}_{b}' for b in range(4))}), 0, 4)"]
            else:
                out += [f"{pad}g[{at('gw', a * g_ld + b)}] += vsum(c{a}_{b})" for b in range(tk)]
        return out

    def cols(o, to, pad):
        fk = n_cols // TI * TI
        out = []
        if fk:
            out += [f"{pad}for k in range(0, {fk}, {TI}):"] + tile(o, to, "k", TI, pad + "    ")
        if fk < n_cols:
            out += tile(o, to, fk, n_cols - fk, pad)
        return out

    fo = n_rows // TO * TO
    L = [f"# dW += sum over {n_steps} steps of delta x^T, register tiles of {TO} x {TI}",
         f"vz = vsplat({dt}(0.0))"]
    if fo:
        L += [f"for o in range(0, {fo}, {TO}):"] + cols("o", TO, "    ")
    if fo < n_rows:
        L += cols(fo, n_rows - fo, "")
    return L


def emit_row_sums_steps(B, dt, registers, b_offs, n_rows, n_steps, d_off, d_row, d_step):
    """Lines adding ``sum_t sum_s d[t, o, s]`` (layout as :func:`emit_outer_grad_steps`)
    into ``g[b + o]`` for each offset ``b`` of ``b_offs``: bias gradients, in vectors."""
    if n_steps == 0:
        return []
    V = vector_lanes(dt, registers)
    L = [f"vz = vsplat({dt}(0.0))", f"for o in range({n_rows}):", "    acc = vz",
         f"    for ts in range({n_steps}):", f"        dts = {d_off} + o * {d_row} + ts * {d_step}",
         f"        for s in range(0, {B}, {V}):", "            acc = vadd(acc, vload(work, dts + s))",
         "    tot = vsum(acc)"]
    return L + [f"    g[{b} + o] += tot" for b in b_offs]


# --- layers ---------------------------------------------------------------------------

def _call(fn, arrays, *args):
    """Source of a call of the kernel ``fn`` with every int argument a bare constant:
    numba types each as a literal and compiles the kernel for the chain's exact sizes and
    offsets (see :meth:`_Recurrent._offsets`)."""
    return f"{fn}({arrays}, " + ", ".join(map(repr, args)) + ")"


def _positive_int(owner, what, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {what} must be a positive int, got {value!r}")
    return int(value)


class _Recurrent(Layer):
    """Shared shape logic and emission of :class:`GRU` and :class:`LSTM`."""

    GATES = 0
    kernel_imports = {"smallchains.layers.recurrent": (
        "gru_forward", "gru_pullback", "lstm_forward", "lstm_pullback", "_lstm_cell", "_lstm_cell_pullback",
        "_lstm_bptt_start"),
        "smallchains._simd": ("vadd", "vadd_into", "vfma", "vload", "vsplat", "vstore", "vsum", "vsum4")}

    def __init__(self, hidden, return_sequences=False):
        name = type(self).__name__
        object.__setattr__(self, "hidden", _positive_int(name, "hidden", hidden))
        if not isinstance(return_sequences, (bool, np.bool_)):
            raise TypeError(f"{name}: return_sequences must be a bool, got {return_sequences!r}")
        object.__setattr__(self, "return_sequences", bool(return_sequences))

    def __repr__(self) -> str:
        seq = ", return_sequences=True" if self.return_sequences else ""
        return f"{type(self).__name__}({self.hidden}{seq})"

    def _tf(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"{type(self).__name__} expects a sequence input (T, F) per sample (a chain "
                f"input of shape (N, T, F)), got per-sample shape {tuple(input_shape)}")
        return input_shape

    def output_shape(self, input_shape):
        T, _ = self._tf(input_shape)
        return (T, self.hidden) if self.return_sequences else (self.hidden,)

    def param_shapes(self, input_shape):
        _, F = self._tf(input_shape)
        G = self.GATES * self.hidden
        return {"weight_ih": (G, F), "weight_hh": (G, self.hidden), "bias_ih": (G,), "bias_hh": (G,)}

    def init_params(self, views, input_shape, rng):
        # torch's default: every array uniform in (-1/sqrt(H), 1/sqrt(H))
        k = 1.0 / np.sqrt(self.hidden)
        for v in views.values():
            v[...] = rng.uniform(-k, k, v.shape)

    def _saved(self, T):
        """(history, gates, scratch) per lane, in elements."""
        raise NotImplementedError

    def saved_size(self, input_shape):
        T, _ = self._tf(input_shape)
        return sum(self._saved(T))

    def _offsets(self, ctx):
        """Sizes, and the history, gates and scratch offsets relative to the saved area.

        Every size and offset reaches the kernels as a literal (:func:`_call`): numba
        compiles one kernel per chain layout, LLVM unrolls the small loops and sees that
        the blocks cannot overlap. Measured on a Zen 3, GRU(3) over 8 steps of 2
        features, batch 500, training step: 1,526 us with sizes and offsets at run time,
        146 us with literals (helpers inlined); passing only the input, saved-area and
        gradient bases at run time measured 6x slower on LSTNet."""
        T, F = self._tf(ctx.in_shape)
        hist_n, gates_n, _ = self._saved(T)
        B = ctx.B
        return T, F, B, 0, hist_n * B, (hist_n + gates_n) * B

    def _emit_out(self, ctx, T):
        """Copy the history (``return_sequences``) or its last step to the output block."""
        n = self.hidden * ctx.B
        src, m = (ctx.saved_off, T * n) if self.return_sequences else (ctx.saved_off + (T - 1) * n, n)
        return [f"for k in range({m}):", f"    work[{ctx.out_off} + k] = work[{src} + k]"]

    # the loop nests are plain code: they are their own reference
    def emit_forward_reference(self, ctx):
        return self.emit_forward(ctx)

    def emit_pullback_reference(self, ctx):
        return self.emit_pullback(ctx)


@dataclass(frozen=True, init=False, repr=False)
class GRU(_Recurrent):
    """Gated recurrent unit over a sequence, ``torch.nn.GRU(F, hidden, batch_first=True)``.

    Input ``(T, F)`` per sample (chain input ``(N, T, F)``, float32 or float64). Zero initial
    state. Parameters ``weight_ih (3H, F)``, ``weight_hh (3H, H)``, ``bias_ih (3H,)``,
    ``bias_hh (3H,)``, gate rows in torch's order ``(r, z, n)``; initialized uniform in
    ``(-1/sqrt(H), 1/sqrt(H))`` as torch. Equations: :mod:`smallchains.layers.recurrent`.

    Parameters
    ----------
    hidden : int
        Size ``H`` of the hidden state.
    return_sequences : bool, default False
        Output every step's ``h_t``, shape ``(T, H)``, instead of the last one, ``(H,)``.

    Raises
    ------
    ValueError
        ``hidden`` not a positive int; an input that is not ``(T, F)``.
    """

    hidden: int
    return_sequences: bool
    GATES = 3

    def _saved(self, T):
        # history, gates (r, z, n, W_hn h + b_hn), scratch: forward gi, gh (3H each);
        # pullback dgi, dgh of every step (3TH each) and dh (H)
        H = self.hidden
        return T * H, T * 4 * H, 6 * T * H + H

    def emit_forward(self, ctx: EmitContext):
        T, F, B, hist, gates, scr = self._offsets(ctx)
        H = self.hidden
        return [_call("gru_forward", "p, work", ctx.in_off, ctx.saved_off, F, T, H,
                      B, ctx.p_off, hist, gates, scr, scr + 3 * H * B)] + self._emit_out(ctx, T)

    def emit_pullback(self, ctx: EmitContext):
        T, F, B, hist, gates, scr = self._offsets(ctx)
        H = self.hidden
        return [_call("gru_pullback", "p, g, work", ctx.in_off, ctx.saved_off, F, T,
                      H, B, ctx.p_off, hist, gates, scr, scr + 3 * T * H * B, scr + 6 * T * H * B,
                      ctx.gout_off, self.return_sequences, ctx.gin_off,
                      ctx.need_gin)]


@dataclass(frozen=True, init=False, repr=False)
class LSTM(_Recurrent):
    """Long short-term memory over a sequence, ``torch.nn.LSTM(F, hidden, batch_first=True)``.

    Input ``(T, F)`` per sample (chain input ``(N, T, F)``). Zero initial ``h`` and ``c``.
    Parameters ``weight_ih (4H, F)``, ``weight_hh (4H, H)``, ``bias_ih (4H,)``,
    ``bias_hh (4H,)``, gate rows in torch's order ``(i, f, g, o)``; initialized uniform in
    ``(-1/sqrt(H), 1/sqrt(H))`` as torch. Equations: :mod:`smallchains.layers.recurrent`.

    Parameters
    ----------
    hidden : int
        Size ``H`` of the hidden and cell states.
    return_sequences : bool, default False
        Output every step's ``h_t``, shape ``(T, H)``, instead of the last one, ``(H,)``
        (stack LSTMs with ``return_sequences=True`` on all but the last).

    Raises
    ------
    ValueError
        ``hidden`` not a positive int; an input that is not ``(T, F)``.
    """

    hidden: int
    return_sequences: bool
    GATES = 4

    def _saved(self, T):
        # history, gates (i, f, g, o, c), scratch: forward ga (4H); pullback da of every
        # step (4TH), dh and dc (H each)
        H = self.hidden
        return T * H, T * 5 * H, 4 * T * H + 2 * H

    def emit_forward_reference(self, ctx: EmitContext):
        T, F, B, hist, gates, scr = self._offsets(ctx)
        return [_call("lstm_forward", "p, work", ctx.in_off, ctx.saved_off, F, T,
                      self.hidden, B, ctx.p_off, hist, gates, scr)] + self._emit_out(ctx, T)

    def emit_forward(self, ctx: EmitContext):
        """Per step, the gate pre-activations ``b_ih + b_hh + W_ih x_t + W_hh h_{t-1}`` in
        register tiles (:func:`~smallchains.layers.dense.emit_gemm_vector`, both products
        in the same accumulators), then the cell (:func:`_lstm_cell`, inlined). Blocks that are not
        whole vector pairs get the reference."""
        if sequence_variant(ctx.B, ctx.dt, ctx.registers) != "vector":
            return self.emit_forward_reference(ctx)
        T, F, B, hist, gates, scr = self._offsets(ctx)
        H, G, sv, regs = self.hidden, 4 * self.hidden, ctx.saved_off, ctx.registers
        w = ctx.p_off
        whh, bih = w + G * F, w + G * F + G * H
        ga = sv + scr
        L = [f"# LSTM({H}) over {T} steps: gate products in register tiles, then the cell"]
        L += emit_gemm_vector(B, ctx.dt, w, F, 1, G, F, ctx.in_off, ga, bih, registers=regs, b2_off=bih + G)
        L += [_call("_lstm_cell", "work", ga, 0, sv + hist, sv + gates, H, B, True)]
        if T > 1:
            L += [f"for tf in range(1, {T}):", f"    xf = {ctx.in_off} + tf * {F * B}",
                  f"    hf = {sv + hist} + (tf - 1) * {H * B}"]
            L += ["    " + l for l in emit_gemm_vector(
                B, ctx.dt, w, F, 1, G, F, "xf", ga, bih, registers=regs, b2_off=bih + G,
                more=[(whh, H, 1, H, "hf")])]
            L += [f"    _lstm_cell(work, {ga}, {sv + gates + 4 * H * B} + (tf - 1) * {5 * H * B}, "
                  f"{sv + hist} + tf * {H * B}, {sv + gates} + tf * {5 * H * B}, {H}, {B}, False)"]
        return L + self._emit_out(ctx, T)

    def emit_pullback_reference(self, ctx: EmitContext):
        T, F, B, hist, gates, scr = self._offsets(ctx)
        H = self.hidden
        return [_call("lstm_pullback", "p, g, work", ctx.in_off, ctx.saved_off, F,
                      T, H, B, ctx.p_off, hist, gates, scr, scr + 4 * T * H * B, scr + (4 * T + 1) * H * B,
                      ctx.gout_off, self.return_sequences, ctx.gin_off,
                      ctx.need_gin)]

    def emit_pullback(self, ctx: EmitContext):
        """The recurrence (:func:`_lstm_cell_pullback` per step, ``dL/dh_{t-1} = W_hh^T
        da_t`` in register tiles) keeps ``da`` of every step; then ``dL/dx``
        of all steps (:func:`~smallchains.layers.dense.emit_gemm_vector` over
        ``W_ih^T``), ``dW_ih``, ``dW_hh`` (:func:`emit_outer_grad_steps`) and the biases
        in register tiles. Blocks that are not whole vector pairs get the reference."""
        if sequence_variant(ctx.B, ctx.dt, ctx.registers) != "vector":
            return self.emit_pullback_reference(ctx)
        T, F, B, hist, gates, scr = self._offsets(ctx)
        H, G, sv, dt, regs = self.hidden, 4 * self.hidden, ctx.saved_off, ctx.dt, ctx.registers
        w = ctx.p_off
        whh, bih = w + G * F, w + G * F + G * H
        da = sv + scr
        dh, dc, go, gates = da + 4 * T * H * B, da + (4 * T + 1) * H * B, ctx.gout_off, sv + gates
        L = [f"# pullback of LSTM({H}) over {T} steps: the recurrence with dL/dh_(t-1) = "
             "W_hh^T da_t in register tiles, then all steps' products",
             _call("_lstm_bptt_start", "work", dh, dc, go, self.return_sequences, T, H, B),
             f"for tb in range({T - 1}, -1, -1):"]
        if self.return_sequences:
            L += [f"    if tb < {T - 1}:", f"        go_t = {go} + tb * {H * B}",
                  f"        for k in range({H * B}):", f"            work[{dh} + k] += work[go_t + k]"]
        L += [f"    dab = {da} + tb * {G * B}",
              f"    _lstm_cell_pullback(work, {gates} + tb * {5 * H * B}, {gates + 4 * H * B} + (tb - 1) * "
              f"{5 * H * B}, {dh}, {dc}, dab, {H}, {B}, tb == 0)",
              "    if tb > 0:"]
        L += ["        " + l for l in emit_gemm_vector(B, dt, whh, 1, H, H, G, "dab", dh, registers=regs)]
        if ctx.need_gin:
            L += [f"for tg in range({T}):", f"    dag = {da} + tg * {G * B}",
                  f"    gxg = {ctx.gin_off} + tg * {F * B}"]
            L += ["    " + l for l in emit_gemm_vector(B, dt, w, 1, F, F, G, "dag", "gxg", registers=regs)]
        L += emit_row_sums_steps(B, dt, regs, (bih, bih + G), G, T, da, B, G * B)
        L += emit_outer_grad_steps(B, dt, regs, w, F, G, F, T, da, B, G * B, ctx.in_off, B, F * B)
        L += emit_outer_grad_steps(B, dt, regs, whh, H, G, H, T - 1, da + G * B, B, G * B,
                                   sv + hist, B, H * B)
        return L


@dataclass(frozen=True, init=False, repr=False)
class TimeDistributed(Layer):
    """Apply ``layer`` to every time step of a sequence with shared parameters:
    ``(T, *S) -> (T, *layer.output_shape(S))``, like Keras' ``TimeDistributed`` and torch's
    ``nn.Linear`` on a ``(N, T, F)`` tensor.

    Parameters
    ----------
    layer : Layer
        A layer without batch statistics, state or randomness: ``Dense`` typically, or a
        ``GRU``/``LSTM`` over an inner time axis (``(P, T, F)`` input: ``P`` sequences
        with shared weights, as LSTNet's skip-GRU). Its parameters (named as the layer
        names them) are shared by all steps.

    Raises
    ------
    TypeError
        ``layer`` is not a layer, or is a Dropout, BatchNorm or other layer with state.
    ValueError
        An input with no time axis.

    Notes
    -----
    The compiled step runs the layer's own tuned code once per time step (``T`` copies in
    the generated source, so compile time grows with ``T``).
    """

    layer: Layer

    def __init__(self, layer):
        from .batchnorm import BatchNorm
        from .dropout import Dropout
        if not isinstance(layer, Layer):
            raise TypeError(f"TimeDistributed: expected a Layer, got {layer!r}")
        if isinstance(layer, (Dropout, BatchNorm)) or getattr(layer, "reduces_batch", False):
            raise TypeError(f"TimeDistributed does not support {layer!r} (only layers without "
                            "state, batch statistics or randomness, such as Dense or GRU)")
        object.__setattr__(self, "layer", layer)

    def __repr__(self) -> str:
        return f"TimeDistributed({self.layer!r})"

    @property
    def kernel_imports(self):
        return self.layer.kernel_imports

    def _split(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"TimeDistributed expects a sequence input (T, ...) per sample, "
                             f"got per-sample shape {tuple(input_shape)}")
        return input_shape[0], tuple(input_shape[1:])

    def output_shape(self, input_shape):
        T, S = self._split(input_shape)
        return (T,) + tuple(self.layer.output_shape(S))

    def param_shapes(self, input_shape):
        return self.layer.param_shapes(self._split(input_shape)[1])

    def init_params(self, views, input_shape, rng):
        self.layer.init_params(views, self._split(input_shape)[1], rng)

    def saved_size(self, input_shape):
        T, S = self._split(input_shape)
        return T * self.layer.saved_size(S)

    def _steps(self, ctx, pullback, reference):
        T, S = self._split(ctx.in_shape)
        out = tuple(self.layer.output_shape(S))
        n_in, n_out, n_sv = prod(S) * ctx.B, prod(out) * ctx.B, self.layer.saved_size(S) * ctx.B
        L = []
        for t in range(T):
            c = replace(ctx, in_shape=S, out_shape=out, in_off=ctx.in_off + t * n_in,
                        out_off=ctx.out_off + t * n_out, saved_off=ctx.saved_off + t * n_sv,
                        gout_off=ctx.gout_off + t * n_out, gin_off=ctx.gin_off + t * n_in)
            if pullback:
                L += (self.layer.emit_pullback_reference(c) if reference else self.layer.emit_pullback(c))
            else:
                L += (self.layer.emit_forward_reference(c) if reference else self.layer.emit_forward(c))
        return L

    def emit_forward(self, ctx):
        return self._steps(ctx, False, False)

    def emit_pullback(self, ctx):
        return self._steps(ctx, True, False)

    def emit_forward_reference(self, ctx):
        return self._steps(ctx, False, True)

    def emit_pullback_reference(self, ctx):
        return self._steps(ctx, True, True)

    def spec(self) -> str:
        return f"TimeDistributed({self.layer.spec()})"


@dataclass(frozen=True, init=False, repr=False)
class Conv1D(Layer):
    """1-D convolution over time (cross-correlation, stride 1, no padding) of a
    ``(T, F)`` sequence: ``y[t, c] = f(b[c] + sum_{d < K, i < F} W[c, d, i] x[t + d, i])``,
    output ``(T - K + 1, out_channels)``, again a sequence. LSTNet's convolution over the
    whole window of series is this layer with ``F`` the series.

    Parameters in ``p``: ``W (out_channels, K, F)``, ``b (out_channels,)``; Glorot-normal
    ``W`` (fan in ``K F``), zero ``b``. torch: ``nn.Conv1d(F, out_channels, K)`` on
    ``x.transpose(1, 2)`` with ``weight = W.transpose(0, 2, 1)``, or ``nn.Conv2d(1,
    out_channels, (K, F))`` on ``x[:, None]`` with ``weight = W[:, None]``.

    Parameters
    ----------
    out_channels : int
    kernel_size : int
        ``K`` time steps per window.
    activation : str or Activation, default ``"identity"``
    bias : bool, default True

    Raises
    ------
    ValueError
        Non-positive sizes; an input that is not ``(T, F)`` with ``T >= K``.

    Notes
    -----
    Why not ``Conv`` on a ``(1, T, F)`` image: in the C-order block layout the window
    ``x[t:t+K, :]`` is ``K F`` consecutive rows, so each output step is the tuned dense
    layer's code (forward, dW, dL/dx) applied at a shifted offset, and the output is
    already time-major for a recurrent layer. The 2-D convolution's tiles run along output
    rows, of width 1 here. Measured on a Zen 3 (LSTNet's 10 x 20 window, 2 filters of
    width 3, batch 500, training step of conv -> Dense(1)): see docs/api.md.
    """

    out_channels: int
    kernel_size: int
    activation: object
    bias: bool

    def __init__(self, out_channels, kernel_size, activation="identity", bias=True):
        object.__setattr__(self, "out_channels", _positive_int("Conv1D", "out_channels", out_channels))
        object.__setattr__(self, "kernel_size", _positive_int("Conv1D", "kernel_size", kernel_size))
        object.__setattr__(self, "activation", get_activation(activation))
        object.__setattr__(self, "bias", bool(bias))

    def __repr__(self):
        b = "" if self.bias else ", bias=False"
        return f"Conv1D({self.out_channels}, {self.kernel_size}, {self.activation.name!r}{b})"

    kernel_imports = TurboDense.kernel_imports

    def _tf(self, input_shape):
        if len(input_shape) != 2 or input_shape[0] < self.kernel_size:
            raise ValueError(f"Conv1D expects a sequence input (T, F) with T >= kernel_size "
                             f"{self.kernel_size}, got per-sample shape {tuple(input_shape)}")
        return input_shape

    def output_shape(self, input_shape):
        T, _ = self._tf(input_shape)
        return (T - self.kernel_size + 1, self.out_channels)

    def param_shapes(self, input_shape):
        _, F = self._tf(input_shape)
        shapes = {"W": (self.out_channels, self.kernel_size, F)}
        if self.bias:
            shapes["b"] = (self.out_channels,)
        return shapes

    def init_params(self, views, input_shape, rng):
        _, F = self._tf(input_shape)
        n_in = self.kernel_size * F
        views["W"][...] = rng.standard_normal(views["W"].shape) * np.sqrt(2.0 / (n_in + self.out_channels))
        if self.bias:
            views["b"][...] = 0

    def _z(self):
        return needs_z(self.activation)

    def saved_size(self, input_shape):
        T, F = self._tf(input_shape)
        Tc = T - self.kernel_size + 1
        # pre-activations if needed, and one window of dL/dx (windows overlap: each step's
        # input gradient is added into dL/dx from there)
        return (Tc * self.out_channels if self._z() else 0) + self.kernel_size * F

    def _steps(self, ctx, pullback, reference):
        T, F = self._tf(ctx.in_shape)
        K, C, B = self.kernel_size, self.out_channels, ctx.B
        Tc, n_in = T - K + 1, K * F
        w = ctx.p_off
        b = w + C * n_in if self.bias else None
        zs = ctx.saved_off if self._z() else None
        gwin = ctx.saved_off + (Tc * C * B if self._z() else 0)
        L = []
        if pullback and ctx.need_gin:
            L += [f"for i in range({T * F * B}):", f"    work[{ctx.gin_off} + i] = 0"]
        for t in range(Tc):
            c = replace(ctx, in_shape=(n_in,), out_shape=(C,), in_off=ctx.in_off + t * F * B,
                        out_off=ctx.out_off + t * C * B, gout_off=ctx.gout_off + t * C * B,
                        gin_off=gwin)
            z = None if zs is None else zs + t * C * B
            L.append(STEP_BREAK)
            if not pullback:
                fn = reference.dense_forward if reference else emit_affine
                L += fn(c, n_in, C, w, b, self.activation, z)
                continue
            fn = reference.dense_pullback if reference else emit_affine_pullback
            L += fn(c, n_in, C, w, b, self.activation, c.out_off if z is None else z)
            if ctx.need_gin:
                L += [f"for i in range({n_in * B}):",
                      f"    work[{ctx.gin_off + t * F * B} + i] += work[{gwin} + i]"]
        return L

    def emit_forward(self, ctx):
        return self._steps(ctx, False, False)

    def emit_pullback(self, ctx):
        return self._steps(ctx, True, False)

    def emit_forward_reference(self, ctx):
        return self._steps(ctx, False, True)

    def emit_pullback_reference(self, ctx):
        return self._steps(ctx, True, True)
