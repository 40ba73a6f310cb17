"""Convolution, max pooling and flattening over NCHW images.

Per sample, an image block is stored feature-major in CHW order: element ``(c, y, x)`` of
lane ``s`` is at ``work[off + ((c * H + y) * W + x) * B + s]``. One image row of all lanes,
``(x, s)`` for ``x < W``, is therefore a contiguous run of ``W * B`` numbers, and a
convolution is a sum of shifted contiguous runs: every inner loop is long, unit-stride and
vectorized, whatever the image width.

* :class:`Conv` -- forward by :func:`emit_correlate_vector` (explicit-vector register
  tiles, relu applied in registers; :func:`emit_correlate` for blocks that are not whole
  vectors), input gradient by :func:`emit_correlate`, weight gradient by
  :func:`emit_conv_weight_grad` (SimpleChains.jl: ``Conv``, src/conv.jl).
* :class:`MaxPool` -- :func:`MaxPool.emit_forward` / :func:`MaxPool.emit_pullback`
  (SimpleChains.jl: ``MaxPool``).
* :class:`Flatten` -- no code: its output is its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from .._cpu import vector_registers
from ..activations import Activation, get_activation, needs_z
from .base import EmitContext, Layer, at
from .dense import _sum, emit_activation_pass, emit_delta_pass, vector_blocks, vector_lanes


def _pos_int(name, v):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _image(layer, shape):
    if len(shape) != 3:
        raise ValueError(f"{type(layer).__name__} expects a (C, H, W) image per sample, got shape {shape}")
    return shape


@dataclass(frozen=True, init=False)
class Conv(Layer):
    """2-D convolution (cross-correlation, as torch ``Conv2d``), stride 1, NCHW.

    Parameters
    ----------
    out_channels : int
    kernel_size : int
        Square ``K x K`` kernel.
    activation : str or Activation, default ``"identity"``
    padding : int or ``"valid"`` or ``"same"``, default ``"valid"`` (0)
        Zero padding on each side; ``"same"`` is ``(K - 1) // 2`` (odd ``K`` only) and keeps
        ``H, W``.
    bias : bool, default True

    Input ``(C, H, W)`` per sample; output ``(out_channels, H + 2P - K + 1, W + 2P - K + 1)``.
    Parameters: ``W (out_channels, C, K, K)`` (torch ``Conv2d.weight`` layout), then
    ``b (out_channels,)``; Glorot-normal weights with fan_in ``C K^2`` and fan_out
    ``out_channels K^2``, zero bias.
    """

    out_channels: int
    kernel_size: int
    activation: Activation
    padding: int
    bias: bool
    kernel_imports = {"smallchains._simd": ("vfma", "vload", "vrelu", "vsplat", "vstore", "vsum")}

    def __init__(self, out_channels, kernel_size, activation="identity", padding="valid", bias=True):
        object.__setattr__(self, "out_channels", _pos_int("Conv: out_channels", out_channels))
        k = _pos_int("Conv: kernel_size", kernel_size)
        object.__setattr__(self, "kernel_size", k)
        object.__setattr__(self, "activation", get_activation(activation))
        if padding == "valid":
            padding = 0
        elif padding == "same":
            if k % 2 == 0:
                raise ValueError(f"Conv: padding='same' needs an odd kernel_size, got {k}")
            padding = (k - 1) // 2
        elif not isinstance(padding, (int, np.integer)) or isinstance(padding, bool) or padding < 0:
            raise ValueError(f"Conv: padding must be 'valid', 'same' or an int >= 0, got {padding!r}")
        object.__setattr__(self, "padding", int(padding))
        object.__setattr__(self, "bias", bool(bias))

    def __repr__(self):
        extra = f", padding={self.padding}" if self.padding else ""
        extra += "" if self.bias else ", bias=False"
        return f"Conv({self.out_channels}, {self.kernel_size}, {self.activation.name!r}{extra})"

    def _dims(self, shape):
        C, H, W = _image(self, shape)
        K, P = self.kernel_size, self.padding
        Hp, Wp = H + 2 * P, W + 2 * P
        if Hp < K or Wp < K:
            raise ValueError(f"Conv: kernel {K}x{K} larger than the padded input {Hp}x{Wp}")
        return C, H, W, K, P, Hp, Wp, Hp - K + 1, Wp - K + 1

    def output_shape(self, shape):
        C, H, W, K, P, Hp, Wp, Ho, Wo = self._dims(shape)
        return (self.out_channels, Ho, Wo)

    def param_shapes(self, shape):
        C, K = shape[0], self.kernel_size
        d = {"W": (self.out_channels, C, K, K)}
        if self.bias:
            d["b"] = (self.out_channels,)
        return d

    def init_params(self, views, shape, rng):
        C, K = shape[0], self.kernel_size
        std = np.sqrt(2.0 / (C * K * K + self.out_channels * K * K))
        views["W"][...] = rng.standard_normal(views["W"].shape) * std
        if self.bias:
            views["b"][...] = 0

    def _scratch(self, shape):
        """Per-sample sizes of: padded input, padded-input gradient, padded delta, z."""
        C, H, W, K, P, Hp, Wp, Ho, Wo = self._dims(shape)
        Co = self.out_channels
        pad_in = C * Hp * Wp if P else 0
        dpad = Co * (Ho + 2 * (K - 1)) * (Wo + 2 * (K - 1))
        z = Co * Ho * Wo if needs_z(self.activation) else 0
        return pad_in, pad_in, dpad, z

    def saved_size(self, shape):
        return sum(self._scratch(shape))

    def _offsets(self, ctx):
        a, b, c, d = self._scratch(ctx.in_shape)
        o = ctx.saved_off
        return o, o + a * ctx.B, o + (a + b) * ctx.B, o + (a + b + c) * ctx.B

    def emit_forward(self, ctx: EmitContext) -> list:
        C, H, W, K, P, Hp, Wp, Ho, Wo = self._dims(ctx.in_shape)
        Co, B, dt = self.out_channels, ctx.B, ctx.dt
        pin, _, _, z_off = self._offsets(ctx)
        L = [f"# conv {C}x{H}x{W} -> {Co}x{Ho}x{Wo}, {K}x{K}, padding {P} ({self.activation.name})"]
        src = ctx.in_off
        if P:
            L += emit_pad_copy(B, ctx.in_off, pin, C, H, W, P, P)
            src = pin
        w = ctx.p_off
        b_expr = f"p[{w + Co * C * K * K} + cd]" if self.bias else f"{dt}(0.0)"
        act = self.activation
        args = (B, dt, src, C, Hp, Wp, ctx.out_off, Co, Ho, Wo, K, b_expr,
                f"{w} + (cd * {C} + cs) * {K * K}", lambda ky, kx: ky * K + kx)
        rows = (P, P + H) if P else None
        if vector_blocks(B, dt) and act.name == "relu":  # relu applied in registers
            return L + emit_correlate_vector(*args, src_rows=rows, relu=True)
        corr = emit_correlate_vector if vector_blocks(B, dt) else emit_correlate
        L += corr(*args, src_rows=rows)
        return L + emit_activation_pass(ctx, Co * Ho * Wo, act, z_off if needs_z(act) else None)

    def emit_pullback(self, ctx: EmitContext) -> list:
        C, H, W, K, P, Hp, Wp, Ho, Wo = self._dims(ctx.in_shape)
        Co, B, dt = self.out_channels, ctx.B, ctx.dt
        pin, gpin, dpad, z_off = self._offsets(ctx)
        act = self.activation
        src = pin if P else ctx.in_off
        go, w = ctx.gout_off, ctx.p_off
        zo = z_off if needs_z(act) else ctx.out_off
        L = [f"# pullback of conv {C}x{H}x{W} -> {Co}x{Ho}x{Wo}, {K}x{K}, padding {P}"]
        L += emit_delta_pass(Ho * Wo * B, dt, go, zo, ctx.out_off, Co,
                             w + Co * C * K * K if self.bias else None, act)
        L += emit_conv_weight_grad(B, dt, go, Co, Ho, Wo, src, C, Hp, Wp, K, w, vector=vector_blocks(B, dt))
        if ctx.need_gin is False:
            return L
        # dL/d(input): full correlation of the zero-padded delta with the flipped kernel
        Hd, Wd = Ho + 2 * (K - 1), Wo + 2 * (K - 1)
        body = emit_pad_copy(B, go, dpad, Co, Ho, Wo, K - 1, K - 1)
        dst = gpin if P else ctx.gin_off
        # (the scalar form here: emit_correlate_vector measured 21.2 -> 24.8 ms for LeNet5's
        # 16 -> 6 channel input gradient per 2,048 images)
        body += emit_correlate(
            B, dt, dpad, Co, Hd, Wd, dst, C, Hp, Wp, K, f"{dt}(0.0)",
            f"{w} + (cs * {C} + cd) * {K * K}", lambda ky, kx: (K - 1 - ky) * K + K - 1 - kx,
            src_rows=(K - 1, K - 1 + Ho))
        if P:  # crop the padded-input gradient
            body += [f"for c in range({C}):", f"    for y in range({H}):",
                     f"        for j in range({W * B}):",
                     f"            work[{ctx.gin_off} + (c * {H} + y) * {W * B} + j] = "
                     f"work[{gpin} + (c * {Hp} + y + {P}) * {Wp * B} + {P * B} + j]"]
        L += [f"if {ctx.need_gin}:"] + ["    " + ln for ln in body]
        return L


def emit_pad_copy(B, src, dst, C, H, W, py, px):
    """Copy a ``(C, H, W)`` block into the interior of a ``(C, H+2py, W+2px)`` block.

    The border is never written, so it keeps the zeros the workspace was allocated with
    (the padded buffer is private to its layer)."""
    Wp = W + 2 * px
    return [f"for c in range({C}):", f"    for y in range({H}):",
            f"        for j in range({W * B}):",
            f"            work[{dst} + (c * {H + 2 * py} + y + {py}) * {Wp * B} + {px * B} + j] = "
            f"work[{src} + (c * {H} + y) * {W * B} + j]"]


def emit_correlate(B, dt, src, Cs, Hs, Ws, dst, Cd, Hd, Wd, K, init_expr, w_base, w_tap,
                   src_rows=None):
    """Lines for ``dst[cd, y, x] = init + sum_{cs,ky,kx} w(cd,cs,ky,kx) src[cs, y+ky, x+kx]``
    over all lanes (a 'valid' cross-correlation). The weight's index in ``p`` is ``w_base``
    (an expression in ``cd`` and ``cs``) plus the int ``w_tap(ky, kx)``; ``init_expr`` may
    use ``cd``. The taps of
    one (cd, cs) pair are fused into expressions of about ``CORR_TAPS`` taps (whole kernel
    rows): one load/store of the output row per that many FMAs, with the weights held in
    registers across rows. ``src_rows = (lo, hi)``: only source rows ``lo <= r < hi`` can be
    nonzero (a zero-padded source), so output rows that would read only zero rows through a
    group's taps are skipped."""
    taps = [(ky, kx) for ky in range(K) for kx in range(K)]
    L = [f"for cd in range({Cd}):",
         f"    init = {init_expr}",
         f"    for j in range({Hd * Wd * B}):",
         f"        work[{dst} + cd * {Hd * Wd * B} + j] = init",
         f"    for cs in range({Cs}):",
         f"        wb = {w_base}"]
    rows = max(1, CORR_TAPS // K)
    for g0 in range(0, K, rows):
        group = [(t, ky, kx) for t, (ky, kx) in enumerate(taps) if g0 <= ky < g0 + rows]
        y0, y1 = 0, Hd
        if src_rows is not None:  # rows y with some y + ky in [lo, hi) for ky in the group
            ky1 = min(g0 + rows, K) - 1
            y0, y1 = max(0, src_rows[0] - ky1), min(Hd, src_rows[1] - g0)
            if y0 >= y1:
                continue
        L += [f"        w{t} = p[{at('wb', w_tap(ky, kx))}]" for t, ky, kx in group]
        L += [f"        for y in range({y0}, {y1}):",
              f"            drow = {dst} + (cd * {Hd} + y) * {Wd * B}",
              f"            srow = {src} + (cs * {Hs} + y) * {Ws * B}",
              f"            for j in range({Wd * B}):",
              "                work[drow + j] += " + _sum(
                  [f"w{t} * work[{at('srow', ky * Ws * B + kx * B)} + j]" for t, ky, kx in group])]
    return L


def emit_correlate_vector(B, dt, src, Cs, Hs, Ws, dst, Cd, Hd, Wd, K, init_expr, w_base, w_tap,
                          src_rows=None, relu=False):
    """:func:`emit_correlate` with explicit vectors (:mod:`smallchains._simd`), for blocks of
    whole vectors: tiles of :data:`CORR_TILE_O` output channels by two vectors of the lanes
    of one output pixel keep their accumulators in registers over all ``Cs * K * K`` taps
    (per tap: 2 source loads, 4 weight broadcasts, 8 FMAs) and store once; the scalar code
    adds every group of taps into the output in memory. With ``src_rows = (lo, hi)`` each
    output row runs only the kernel rows that read source rows in ``[lo, hi)``. With
    ``relu``, ``max(., 0)`` is applied before the store (no activation pass). Falls back to
    :func:`emit_correlate` (then ``relu`` must be False) if ``w_tap`` is not linear in
    ``ky`` (both callers' are)."""
    V = vector_lanes(dt)
    slope = w_tap(1, 0) - w_tap(0, 0) if K > 1 else 0
    base = [w_tap(0, kx) for kx in range(K)]
    if B % (2 * V) or any(w_tap(ky, kx) != base[kx] + ky * slope for ky in range(K) for kx in range(K)):
        assert not relu
        return emit_correlate(B, dt, src, Cs, Hs, Ws, dst, Cd, Hd, Wd, K, init_expr, w_base, w_tap,
                              src_rows)
    kys = (f"range(max(0, {src_rows[0]} - y), min({K}, {src_rows[1]} - y))"
           if src_rows is not None else f"range({K})")

    def tile(c0, tc, pad):
        out = []
        for a in range(tc):
            out += [f"{pad}cd = {c0} + {a}", f"{pad}i{a} = vsplat({init_expr})"]
        out += [f"{pad}for q in range({Hd * Wd}):", f"{pad}    y = q // {Wd}", f"{pad}    x = q - y * {Wd}",
                f"{pad}    for h in range(0, {B}, {2 * V}):"]
        out += [f"{pad}        t{a}_{hh} = i{a}" for a in range(tc) for hh in range(2)]
        out += [f"{pad}        for cs in range({Cs}):"]
        for a in range(tc):
            out += [f"{pad}            cd = {c0} + {a}", f"{pad}            wb{a} = {w_base}"]
        out += [f"{pad}            for ky in {kys}:",
                f"{pad}                sr = {src} + ((cs * {Hs} + y + ky) * {Ws} + x) * {B} + h"]
        out += [f"{pad}                wk{a} = wb{a} + ky * {slope}" for a in range(tc)]
        for kx in range(K):
            out += [f"{pad}                v0 = vload(work, {at('sr', kx * B)})",
                    f"{pad}                v1 = vload(work, {at('sr', kx * B + V)})"]
            out += [f"{pad}                m{a} = vsplat(p[{at(f'wk{a}', base[kx])}])" for a in range(tc)]
            out += [f"{pad}                t{a}_{hh} = vfma(m{a}, v{hh}, t{a}_{hh})"
                    for a in range(tc) for hh in range(2)]
        orow = f"{dst} + {c0} * {Hd * Wd * B}" if c0 == "c0" else str(dst + c0 * Hd * Wd * B)
        out += [f"{pad}        ob = {orow} + q * {B} + h"]
        f = "vrelu({})" if relu else "{}"
        out += [f"{pad}        vstore(work, {at('ob', a * Hd * Wd * B + hh * V)}, {f.format(f't{a}_{hh}')})"
                for a in range(tc) for hh in range(2)]
        return out

    # balanced tiles (6 channels as 3 + 3, not 4 + 2: a 2-channel tile loads as many
    # vectors as it does FMAs)
    ts = -(-Cd // -(-Cd // CORR_TILE_O))
    full = Cd // ts * ts
    L = [f"for c0 in range(0, {full}, {ts}):"] + tile("c0", ts, "    ")
    if full < Cd:
        L += tile(full, Cd - full, "")
    return L


# Output channels per register tile of emit_correlate_vector (4 x 2 accumulators, 2 source
# vectors and 4 weights: 14 of AVX2's 16 registers).
CORR_TILE_O = 4


# Output channels per weight-gradient register tile (CO_TILE * K accumulators): 4 with
# AVX-512's 32 vector registers, 2 with 16 (measured on a Zen 3: LeNet5's step 6% faster
# than with 4, whose 20 accumulators spill).
WGRAD_CO_TILE = 4 if vector_registers() >= 32 else 2
# Kernel taps per fused correlation expression (whole kernel rows): their weights stay in
# registers across the output rows. All taps with 32 vector registers; with 16, about 10
# (two rows of a 5x5 kernel; measured on a Zen 3: LeNet5's step 15% faster than with all
# 25, whose weights no longer fit).
CORR_TAPS = 1024 if vector_registers() >= 32 else 10


def emit_conv_weight_grad(B, dt, d_off, Co, Ho, Wo, src, Ci, Hs, Ws, K, w_off, vector=False):
    """Lines adding ``dW[co, ci, ky, kx] = sum_{y, x, s} delta[co, y, x, s] src[ci, y+ky, x+kx, s]``.

    Tiles of ``CO_TILE`` output channels x ``K`` horizontal taps share each loaded delta
    and source vector (``CO_TILE + K`` loads per ``CO_TILE * K`` FMAs). With ``vector``
    (blocks of whole vectors) the accumulators are explicit vectors (:mod:`smallchains._simd`)
    reduced once per tile, instead of scalar sums that LLVM vectorizes. Measured on LeNet5
    (per 2,048 images, in-process): the 6 -> 16 pullback 21.7 -> 19.7 ms, the 1 -> 6 one
    6.24 -> 5.26 ms."""
    L = []
    nrow = Wo * B
    CO_TILE = WGRAD_CO_TILE
    full = Co // CO_TILE * CO_TILE
    step, zero = (vector_lanes(dt), "vz") if vector else (1, "zero")

    def tile(c0, tc, pad):
        acc = [f"a{a}_{kx}" for a in range(tc) for kx in range(K)]
        out = [f"vz = vsplat({dt}(0.0))"] if vector else []
        out += [f"for ci in range({Ci}):", f"    for ky in range({K}):"]
        out += ([] if vector else [f"        zero = {dt}(0.0)"]) + [f"        {v} = {zero}" for v in acc]
        out += [f"        for y in range({Ho}):",
                f"            srow = {src} + (ci * {Hs} + y + ky) * {Ws * B}",
                f"            drow = {d_off} + ({c0} * {Ho} + y) * {nrow}",
                f"            for j in range(0, {nrow}, {step}):"]
        if vector:
            out += [f"                d{a} = vload(work, {at('drow', a * Ho * nrow)} + j)" for a in range(tc)]
            for kx in range(K):
                out += [f"                xx = vload(work, {at('srow', kx * B)} + j)"]
                out += [f"                a{a}_{kx} = vfma(d{a}, xx, a{a}_{kx})" for a in range(tc)]
        else:
            out += [f"                d{a} = work[{at('drow', a * Ho * nrow)} + j]" for a in range(tc)]
            out += [f"                x{kx} = work[{at('srow', kx * B)} + j]" for kx in range(K)]
            out += [f"                a{a}_{kx} += d{a} * x{kx}" for a in range(tc) for kx in range(K)]
        total = "vsum({})" if vector else "{}"
        out += [f"        gw = {w_off} + ({c0} * {Ci} + ci) * {K * K} + ky * {K}"]
        out += [f"        g[{at('gw', a * Ci * K * K + kx)}] += {total.format(f'a{a}_{kx}')}"
                for a in range(tc) for kx in range(K)]
        return [pad + ln for ln in out]

    if full:
        L += [f"for c0 in range(0, {full}, {CO_TILE}):"] + tile("c0", CO_TILE, "    ")
    if full < Co:
        L += tile(str(full), Co - full, "")
    return L


@dataclass(frozen=True, init=False)
class MaxPool(Layer):
    """Max pooling over ``k x k`` windows with stride ``k`` (no padding), NCHW.

    Input ``(C, H, W)``; output ``(C, H // k, W // k)`` (trailing rows/columns that do not
    fill a window are dropped, as torch ``MaxPool2d``). The gradient goes to the first
    maximal element of each window in row-major order (as torch). No parameters.
    """

    k: int

    def __init__(self, kernel_size=2):
        object.__setattr__(self, "k", _pos_int("MaxPool: kernel_size", kernel_size))

    def __repr__(self):
        return f"MaxPool({self.k})"

    def output_shape(self, shape):
        C, H, W = _image(self, shape)
        if H < self.k or W < self.k:
            raise ValueError(f"MaxPool({self.k}) needs an image of at least {self.k}x{self.k}, got {H}x{W}")
        return (C, H // self.k, W // self.k)

    def _win(self, ctx):
        C, H, W = ctx.in_shape
        k, B = self.k, ctx.B
        return C, H, W, H // k, W // k, k, B

    def emit_forward(self, ctx):
        C, H, W, Ho, Wo, k, B = self._win(ctx)
        i, o = ctx.in_off, ctx.out_off
        L = [f"# maxpool {k}x{k}: {C}x{H}x{W} -> {C}x{Ho}x{Wo}"] + self._window_loop(ctx) + [
             f"    ib = {i} + ib",
             f"    for s in range({B}):",
             "        m = work[ib + s]"]
        for dy in range(k):
            for dx in range(k):
                if dy or dx:
                    L += [f"        m = max(m, work[ib + {(dy * W + dx) * B} + s])"]
        L += [f"        work[{o} + q * {B} + s] = m"]
        return L

    def _window_loop(self, ctx):
        """ONE loop over all output pixels ``q = (c * Ho + oy) * Wo + ox``, setting ``ib``,
        the relative offset of the window's first input element. Nested (c, oy, ox) loops
        with short constant trip counts get fully unrolled around the vectorized sample
        loop, and LLVM's loop-load elimination then takes seconds (measured: 4-18 s for
        one 16x8x8 pooling at B = 16, 0.1 s as one flat loop)."""
        C, H, W, Ho, Wo, k, B = self._win(ctx)
        return [f"for q in range({C * Ho * Wo}):",
                f"    c = q // {Ho * Wo}",
                f"    oy = q // {Wo} - c * {Ho}",
                f"    ox = q - (q // {Wo}) * {Wo}",
                f"    ib = ((c * {H} + oy * {k}) * {W} + ox * {k}) * {B}"]

    def emit_pullback(self, ctx):
        if ctx.need_gin is False:
            return []
        C, H, W, Ho, Wo, k, B = self._win(ctx)
        i, o, go, gi, dt = ctx.in_off, ctx.out_off, ctx.gout_off, ctx.gin_off, ctx.dt
        L = [f"# pullback of maxpool {k}x{k}: the first maximum of each window gets the gradient",
             f"if {ctx.need_gin}:"]
        if H % k or W % k:  # elements outside every window get zero
            L += [f"    for j in range({C * H * W * B}):", f"        work[{gi} + j] = {dt}(0.0)"]
        L += ["    " + ln for ln in self._window_loop(ctx)]
        L += [f"        ob = q * {B}", f"        xb = {i} + ib", f"        gb = {gi} + ib",
              f"        one = {dt}(1.0)", f"        zero = {dt}(0.0)",
              f"        for s in range({B}):",
              f"            m = work[{o} + ob + s]",
              f"            gv = work[{go} + ob + s]",
              "            free = one"]
        for dy in range(k):
            for dx in range(k):
                off = (dy * W + dx) * B
                L += [f"            e = one if work[{at('xb', off)} + s] == m else zero",
                      f"            work[{at('gb', off)} + s] = gv * e * free",
                      "            free = free * (one - e)"]
        return L


@dataclass(frozen=True)
class Flatten(Layer):
    """Flatten a per-sample array to a vector in C order (``(C, H, W) -> (C*H*W,)``), like
    ``torch.flatten(x, 1)`` on NCHW and SimpleChains.jl's ``Flatten``. Costs nothing: the
    block layout is already flat, so the output shares the input's workspace."""

    aliases_input = True

    def __repr__(self):
        return "Flatten()"

    def output_shape(self, shape):
        return (prod(shape),)

    def emit_forward(self, ctx):
        return []

    def emit_pullback(self, ctx):
        return []
