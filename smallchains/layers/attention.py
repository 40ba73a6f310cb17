"""Temporal pattern attention (Shih, Sun and Lee, "Temporal Pattern Attention for
Multivariate Time Series Forecasting", Machine Learning 108, 2019), the attention of
TPA-LSTM.

Input: the hidden states of a recurrent layer, a sequence ``(T, m)``; write ``H`` for
the first ``T - 1`` states (``H[l, i]``: step ``l``, feature ``i``) and ``h`` for the last.
With ``k`` filters ``C (k, T - 1)`` spanning the whole history (the paper's ``w = T - 1``)::

    HC[i, j] = sum_l H[l, i] C[j, l] + c[j]      temporal patterns, (m, k)
    s[i]     = HC[i, :] . (W_a h)                 score of row i, W_a (k, m)
    alpha[i] = sigmoid(s[i])
    v[j]     = sum_i alpha[i] HC[i, j]            context, (k,)
    out      = W_h h + W_v v                      the paper's h'_t, (m,)

(the paper's filters have no bias ``c``; FluxArchitectures' ``TPALSTM`` convolution has
one, and so do we). The forward step (:func:`tpa_forward`) keeps ``HC``, ``W_a h``,
``alpha`` and ``v`` per lane; :func:`tpa_pullback` is the hand-derived reverse pass.
Like the recurrent kernels, the loop nests are plain code compiled for the chain's
literal sizes and offsets (see :mod:`smallchains.layers.recurrent`); they are the
reference. The tuned code (:meth:`TemporalPatternAttention.emit_forward` /
``emit_pullback``, blocks of whole vector pairs) keeps the per-lane attention
(:func:`_tpa_attend`, :func:`_tpa_attend_pullback`) and puts the products ``HC``,
``W_a h``, ``W_h h + W_v v``, ``dL/dx`` and every weight gradient in register tiles.
Measured on an AVX-512 Xeon (the FluxBench TPA-LSTM's attention, 32 filters over 9 states
of 10 features, ``bench/step_profile.py --model tpa_lstm``): forward 0.70 -> 0.27 ms,
pullback 1.6 -> 0.70 ms per 2,048 samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .._config import INLINE_OPTIONS, JIT_OPTIONS
from .base import EmitContext, Layer
from .dense import emit_gemm_vector
from .recurrent import (_cst, _positive_int, _tanh, emit_outer_grad_steps, emit_row_sums_steps,
                        sequence_variant)


@njit(**INLINE_OPTIONS)
def _layout(x, T, m, k, B, w, sv):
    """History length, parameter offsets ``C, c, W_a, W_h, W_v``, saved blocks ``HC, a,
    alpha, v`` and the last state ``h`` (in the input)."""
    L = T - 1
    C, c = w, w + k * L
    Wa = c + k
    Wh = Wa + k * m
    Wv = Wh + m * m
    hc, a, al, v = sv, sv + m * k * B, sv + (m * k + k) * B, sv + (m * k + k + m) * B
    return L, C, c, Wa, Wh, Wv, hc, a, al, v, x + L * m * B


@njit(**INLINE_OPTIONS)
def _tpa_attend(work, hc, a, al, v, m, k, B):
    """Per lane: ``alpha[i] = sigmoid(HC[i, :] . a)``, ``v[j] = sum_i alpha[i] HC[i, j]``."""
    half = _cst(work, 0.5)
    for j in range(k):
        for s in range(B):
            work[v + j * B + s] = 0
    for i in range(m):
        for s in range(B):
            work[al + i * B + s] = 0
        for j in range(k):
            for s in range(B):
                work[al + i * B + s] += work[hc + (i * k + j) * B + s] * work[a + j * B + s]
        for s in range(B):
            work[al + i * B + s] = half + half * _tanh(half * work[al + i * B + s])
        for j in range(k):
            for s in range(B):
                work[v + j * B + s] += work[al + i * B + s] * work[hc + (i * k + j) * B + s]


@njit(**INLINE_OPTIONS)
def _tpa_attend_pullback(work, hc, a, al, dv, da, ds, dhc, m, k, B):
    """Reverse of :func:`_tpa_attend` per lane: from ``dv`` writes ``da`` ``(k)``, ``ds``
    ``(m)`` and ``dHC`` ``(m, k)`` (the part through the scores and the context)."""
    one = _cst(work, 1.0)
    # v = sum_i alpha_i HC_i; alpha = sigmoid(s); s_i = HC_i . a
    for j in range(k):
        for s in range(B):
            work[da + j * B + s] = 0
    for i in range(m):
        for s in range(B):
            work[ds + i * B + s] = 0
        for j in range(k):
            for s in range(B):
                work[ds + i * B + s] += work[hc + (i * k + j) * B + s] * work[dv + j * B + s]
        for s in range(B):
            q = work[al + i * B + s]
            work[ds + i * B + s] *= q * (one - q)
        for j in range(k):
            o = (i * k + j) * B
            for s in range(B):
                d = work[ds + i * B + s]
                work[dhc + o + s] = work[al + i * B + s] * work[dv + j * B + s] + d * work[a + j * B + s]
                work[da + j * B + s] += d * work[hc + o + s]


@njit(**JIT_OPTIONS)
def tpa_forward(p, work, x, T, m, k, B, w, y, sv):
    """Temporal pattern attention of a block. ``x``: input ``(T, m)``; ``y``: output
    ``(m,)``; ``sv``: saved ``HC (m, k)``, ``a = W_a h (k)``, ``alpha (m)``, ``v (k)``.
    Parameters at ``p[w:]``: ``C (k, T-1)``, ``c (k)``, ``W_a (k, m)``, ``W_h (m, m)``,
    ``W_v (m, k)``."""
    L, C, c, Wa, Wh, Wv, hc, a, al, v, h = _layout(x, T, m, k, B, w, sv)
    for i in range(m):
        for j in range(k):
            o = hc + (i * k + j) * B
            cj = p[c + j]
            for s in range(B):
                work[o + s] = cj
            for l in range(L):
                cw = p[C + j * L + l]
                xl = x + (l * m + i) * B
                for s in range(B):
                    work[o + s] += cw * work[xl + s]
    for j in range(k):
        for s in range(B):
            work[a + j * B + s] = 0
        for i in range(m):
            wa = p[Wa + j * m + i]
            for s in range(B):
                work[a + j * B + s] += wa * work[h + i * B + s]
    _tpa_attend(work, hc, a, al, v, m, k, B)
    for o in range(m):
        for s in range(B):
            work[y + o * B + s] = 0
        for i in range(m):
            wh = p[Wh + o * m + i]
            for s in range(B):
                work[y + o * B + s] += wh * work[h + i * B + s]
        for j in range(k):
            wv = p[Wv + o * k + j]
            for s in range(B):
                work[y + o * B + s] += wv * work[v + j * B + s]


@njit(**JIT_OPTIONS)
def tpa_pullback(p, g, work, x, T, m, k, B, w, sv, gout, gin, scr, need_gin):
    """Reverse pass of :func:`tpa_forward`: adds ``dL/dW`` into ``g[w:]`` and, if
    ``need_gin``, writes ``dL/dx`` ``(T, m)`` at ``gin``. ``gout``: ``dL/dy`` ``(m)``;
    ``scr``: scratch ``dv (k)``, ``da (k)``, ``ds (m)``, ``dHC (m, k)``, ``dh (m)``."""
    L, C, c, Wa, Wh, Wv, hc, a, al, v, h = _layout(x, T, m, k, B, w, sv)
    dv, da, ds = scr, scr + k * B, scr + 2 * k * B
    dhc = ds + m * B
    dh = dhc + m * k * B
    zero = _cst(p, 0.0)
    # out = W_h h + W_v v
    for i in range(m):
        for s in range(B):
            work[dh + i * B + s] = 0
    for j in range(k):
        for s in range(B):
            work[dv + j * B + s] = 0
    for o in range(m):
        go = gout + o * B
        for i in range(m):
            acc = zero
            for s in range(B):
                acc += work[go + s] * work[h + i * B + s]
            g[Wh + o * m + i] += acc
            wh = p[Wh + o * m + i]
            for s in range(B):
                work[dh + i * B + s] += wh * work[go + s]
        for j in range(k):
            acc = zero
            for s in range(B):
                acc += work[go + s] * work[v + j * B + s]
            g[Wv + o * k + j] += acc
            wv = p[Wv + o * k + j]
            for s in range(B):
                work[dv + j * B + s] += wv * work[go + s]
    # v = sum_i alpha_i HC_i; alpha = sigmoid(s); s_i = HC_i . a
    _tpa_attend_pullback(work, hc, a, al, dv, da, ds, dhc, m, k, B)
    # a = W_a h
    for j in range(k):
        for i in range(m):
            acc = zero
            for s in range(B):
                acc += work[da + j * B + s] * work[h + i * B + s]
            g[Wa + j * m + i] += acc
            wa = p[Wa + j * m + i]
            for s in range(B):
                work[dh + i * B + s] += wa * work[da + j * B + s]
    # HC[i, j] = sum_l H[l, i] C[j, l] + c[j]
    for j in range(k):
        acc = zero
        for i in range(m):
            for s in range(B):
                acc += work[dhc + (i * k + j) * B + s]
        g[c + j] += acc
        for l in range(L):
            acc = zero
            for i in range(m):
                xl = x + (l * m + i) * B
                o = dhc + (i * k + j) * B
                for s in range(B):
                    acc += work[o + s] * work[xl + s]
            g[C + j * L + l] += acc
    if need_gin:
        for l in range(L):
            for i in range(m):
                gl = gin + (l * m + i) * B
                for s in range(B):
                    work[gl + s] = 0
                for j in range(k):
                    cw = p[C + j * L + l]
                    o = dhc + (i * k + j) * B
                    for s in range(B):
                        work[gl + s] += cw * work[o + s]
        for i in range(m):
            for s in range(B):
                work[gin + (L * m + i) * B + s] = work[dh + i * B + s]


@dataclass(frozen=True, init=False, repr=False)
class TemporalPatternAttention(Layer):
    """Temporal pattern attention over a sequence of hidden states (TPA-LSTM's attention):
    input ``(T, m)`` (an LSTM with ``return_sequences=True``, ``T >= 2``), output ``(m,)``,
    the attended state ``W_h h_T + W_v v`` (equations: :mod:`smallchains.layers.attention`).

    Parameters in ``p``: ``C (k, T-1)``, ``c (k,)`` (filter bias), ``W_a (k, m)``,
    ``W_h (m, m)``, ``W_v (m, k)``; Glorot-normal matrices, zero bias.

    Parameters
    ----------
    filters : int
        Number ``k`` of temporal filters, each spanning the ``T - 1`` earlier states.

    Raises
    ------
    ValueError
        ``filters`` not a positive int; an input that is not ``(T, m)`` with ``T >= 2``.

    References
    ----------
    Source: Shih, Sun and Lee, Machine Learning 108 (2019), section 4; FluxArchitectures.jl's
    ``TPALSTM``.
    """

    filters: int
    kernel_imports = {"smallchains.layers.attention": ("tpa_forward", "tpa_pullback", "_tpa_attend",
                                                       "_tpa_attend_pullback"),
                      "smallchains._simd": ("vadd", "vadd_into", "vfma", "vload", "vsplat", "vstore", "vsum",
                                            "vsum4")}

    def __init__(self, filters):
        object.__setattr__(self, "filters", _positive_int("TemporalPatternAttention", "filters", filters))

    def __repr__(self):
        return f"TemporalPatternAttention({self.filters})"

    def _tm(self, input_shape):
        if len(input_shape) != 2 or input_shape[0] < 2:
            raise ValueError(f"TemporalPatternAttention expects a sequence of hidden states (T, m) "
                             f"with T >= 2, got per-sample shape {tuple(input_shape)}")
        return input_shape

    def output_shape(self, input_shape):
        return (self._tm(input_shape)[1],)

    def param_shapes(self, input_shape):
        T, m = self._tm(input_shape)
        k = self.filters
        return {"C": (k, T - 1), "c": (k,), "W_a": (k, m), "W_h": (m, m), "W_v": (m, k)}

    def init_params(self, views, input_shape, rng):
        for name, v in views.items():
            if name == "c":
                v[...] = 0
            else:
                v[...] = rng.standard_normal(v.shape) * np.sqrt(2.0 / sum(v.shape))

    def saved_size(self, input_shape):
        _, m = self._tm(input_shape)
        k = self.filters
        # saved HC, a, alpha, v; scratch dv, da, ds, dHC, dh
        return (m * k + k + m + k) + (2 * k + m + m * k + m)

    def _args(self, ctx):
        T, m = self._tm(ctx.in_shape)
        return T, m, self.filters, ctx.B

    def _offsets(self, ctx):
        """Sizes, parameter offsets ``C, c, W_a, W_h, W_v`` and absolute work offsets of
        the saved ``HC, a, alpha, v``, the last state ``h`` and the pullback's scratch
        ``dv, da, ds, dHC`` (as :func:`_layout` and :func:`tpa_pullback`)."""
        T, m, k, B = self._args(ctx)
        L, C, c, Wa, Wh, Wv, hc, a, al, v, h = _layout.py_func(ctx.in_off, T, m, k, B, ctx.p_off,
                                                               ctx.saved_off)
        dv = v + k * B
        da, ds = dv + k * B, dv + 2 * k * B
        return (T, m, k, B, L), (C, c, Wa, Wh, Wv), (hc, a, al, v, h), (dv, da, ds, ds + m * B)

    def emit_forward_reference(self, ctx: EmitContext):
        T, m, k, B = self._args(ctx)
        return [f"tpa_forward(p, work, {ctx.in_off}, {T}, {m}, {k}, {B}, {ctx.p_off}, {ctx.out_off}, "
                f"{ctx.saved_off})"]

    def emit_pullback_reference(self, ctx: EmitContext):
        T, m, k, B = self._args(ctx)
        scr = ctx.saved_off + (m * k + k + m + k) * B
        return [f"tpa_pullback(p, g, work, {ctx.in_off}, {T}, {m}, {k}, {B}, {ctx.p_off}, {ctx.saved_off}, "
                f"{ctx.gout_off}, {ctx.gin_off}, {scr}, {ctx.need_gin})"]

    def emit_forward(self, ctx: EmitContext):
        """The products (``HC`` per feature, ``W_a h``, ``W_h h + W_v v``) in register
        tiles (:func:`~smallchains.layers.dense.emit_gemm_vector`), the attention per
        lane (:func:`_tpa_attend`). Blocks that are not whole vector pairs: the reference."""
        if sequence_variant(ctx.B, ctx.dt, ctx.registers) != "vector":
            return self.emit_forward_reference(ctx)
        (T, m, k, B, L), (C, c, Wa, Wh, Wv), (hc, a, al, v, h), _ = self._offsets(ctx)
        dt, regs = ctx.dt, ctx.registers
        L_ = [f"# temporal pattern attention ({k} filters): products in register tiles",
              f"for ia in range({m}):", f"    xa = {ctx.in_off} + ia * {B}", f"    ha = {hc} + ia * {k * B}"]
        L_ += ["    " + l for l in emit_gemm_vector(B, dt, C, L, 1, k, L, "xa", "ha", c, registers=regs,
                                                    v_row=m * B)]
        L_ += emit_gemm_vector(B, dt, Wa, m, 1, k, m, h, a, registers=regs)
        L_ += [f"_tpa_attend(work, {hc}, {a}, {al}, {v}, {m}, {k}, {B})"]
        L_ += emit_gemm_vector(B, dt, Wh, m, 1, m, m, h, ctx.out_off, registers=regs, more=[(Wv, k, 1, k, v)])
        return L_

    def emit_pullback(self, ctx: EmitContext):
        """Reverse of :meth:`emit_forward`: weight gradients in the register tiles of
        :func:`~smallchains.layers.recurrent.emit_outer_grad_steps` (``dC`` summed over the
        features), ``dL/dx`` and ``dv`` in those of ``emit_gemm_vector``."""
        if sequence_variant(ctx.B, ctx.dt, ctx.registers) != "vector":
            return self.emit_pullback_reference(ctx)
        (T, m, k, B, L), (C, c, Wa, Wh, Wv), (hc, a, al, v, h), (dv, da, ds, dhc) = self._offsets(ctx)
        dt, regs, go = ctx.dt, ctx.registers, ctx.gout_off
        L_ = [f"# pullback of temporal pattern attention ({k} filters)"]
        L_ += emit_outer_grad_steps(B, dt, regs, Wh, m, m, m, 1, go, B, 0, h, B, 0)
        L_ += emit_outer_grad_steps(B, dt, regs, Wv, k, m, k, 1, go, B, 0, v, B, 0)
        L_ += emit_gemm_vector(B, dt, Wv, 1, k, k, m, go, dv, registers=regs)
        L_ += [f"_tpa_attend_pullback(work, {hc}, {a}, {al}, {dv}, {da}, {ds}, {dhc}, {m}, {k}, {B})"]
        L_ += emit_outer_grad_steps(B, dt, regs, Wa, m, k, m, 1, da, B, 0, h, B, 0)
        L_ += emit_row_sums_steps(B, dt, regs, (c,), k, m, dhc, B, k * B)
        L_ += emit_outer_grad_steps(B, dt, regs, C, L, k, L, m, dhc, B, k * B, ctx.in_off, m * B, B)
        if not ctx.need_gin:
            return L_
        # dL/dh = W_h^T dL/dy + W_a^T da straight into the last step of dL/dx
        L_ += emit_gemm_vector(B, dt, Wh, 1, m, m, m, go, ctx.gin_off + L * m * B, registers=regs,
                               more=[(Wa, 1, m, k, da)])
        L_ += [f"for ia in range({m}):", f"    dxa = {dhc} + ia * {k * B}", f"    gxa = {ctx.gin_off} + ia * {B}"]
        L_ += ["    " + l for l in emit_gemm_vector(B, dt, C, 1, L, L, k, "dxa", "gxa", registers=regs,
                                                    out_row=m * B)]
        return L_
