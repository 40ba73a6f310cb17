"""Convolution, max pooling and flattening over NCHW images.

Per sample, an image block is stored feature-major in CHW order: element ``(c, y, x)`` of
lane ``s`` is at ``work[off + ((c * H + y) * W + x) * B + s]``. One image row of all lanes,
``(x, s)`` for ``x < W``, is therefore a contiguous run of ``W * B`` numbers, and a
convolution is a sum of shifted contiguous runs: every inner loop is long, unit-stride and
vectorized, whatever the image width.

* :class:`Conv` -- forward by :func:`emit_correlate_vector` (explicit-vector register
  tiles, relu applied in registers; :func:`emit_correlate` for blocks that are not whole
  vectors), input gradient by :func:`emit_conv_input_grad_vector` (:func:`emit_correlate`
  over the padded delta for other blocks), weight gradient by
  :func:`emit_conv_weight_grad`; which one runs is :func:`conv_variants` (SimpleChains.jl:
  ``Conv``, src/conv.jl). Rectangular kernels and paddings, as torch's ``Conv2d``.
* :class:`MaxPool` -- :func:`MaxPool.emit_forward` / :func:`MaxPool.emit_pullback`
  (SimpleChains.jl: ``MaxPool``).

The plain reference of each (``kernels="reference"``) is in :mod:`.reference`.
* :class:`Flatten` -- no code: its output is its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from ..activations import Activation, get_activation, needs_z
from . import reference
from .base import EmitContext, Layer, at
from .dense import _sum, emit_activation_pass, emit_delta_pass, vector_blocks, vector_lanes


def _pos_int(name, v):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _pair(name, v, check):
    """``v`` (an int or a 2-tuple of ints) as a tuple ``(height, width)``, each checked by
    ``check(name, value)``."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a (height, width) pair, got {v!r}")
        return tuple(check(name, x) for x in v)
    x = check(name, v)
    return (x, x)


def _nonneg_int(name, v):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{name} must be 'valid', 'same', an int >= 0 or a pair of them, got {v!r}")
    return int(v)


def _image(layer, shape):
    if len(shape) != 3:
        raise ValueError(f"{type(layer).__name__} expects a (C, H, W) image per sample, got shape {shape}")
    return shape


def _size_repr(v):
    return str(v[0]) if v[0] == v[1] else str(tuple(v))


@dataclass(frozen=True, init=False)
class Conv(Layer):
    """2-D convolution (cross-correlation, as torch ``Conv2d``), stride 1, NCHW.

    Input ``(C, H, W)`` per sample; output
    ``(out_channels, H + 2 PH - KH + 1, W + 2 PW - KW + 1)``. Parameters:
    ``W (out_channels, C, KH, KW)`` (torch ``Conv2d.weight`` layout), then
    ``b (out_channels,)``; Glorot-normal weights with fan_in ``C KH KW`` and fan_out
    ``out_channels KH KW``, zero bias. ``kernel_size`` and ``padding`` are stored as
    ``(height, width)`` tuples.

    Parameters
    ----------
    out_channels : int
    kernel_size : int or (int, int)
        ``K`` for a square ``K x K`` kernel, or ``(KH, KW)``.
    activation : str or Activation, default ``"identity"``
    padding : ``"valid"``, ``"same"``, int or (int, int), default ``"valid"`` (0)
        Zero padding on each side, the same for both dimensions (int) or ``(PH, PW)``.
        ``"same"`` is ``((KH - 1) // 2, (KW - 1) // 2)`` and keeps ``H, W`` (odd kernel
        sizes only; torch's asymmetric padding of even kernels is not supported).
    bias : bool, default True

    Raises
    ------
    ValueError
        Non-positive sizes, a bad padding, ``"same"`` with an even kernel size.
    """

    small_blocks = True

    out_channels: int
    kernel_size: tuple
    activation: Activation
    padding: tuple
    bias: bool
    kernel_imports = {"smallchains._simd": ("vadd", "vfma", "vload", "vrelu", "vrelu_grad", "vsplat",
                                            "vstore", "vsum")}

    def __init__(self, out_channels, kernel_size, activation="identity", padding="valid", bias=True):
        object.__setattr__(self, "out_channels", _pos_int("Conv: out_channels", out_channels))
        kh, kw = _pair("Conv: kernel_size", kernel_size, _pos_int)
        object.__setattr__(self, "kernel_size", (kh, kw))
        object.__setattr__(self, "activation", get_activation(activation))
        if isinstance(padding, str) and padding == "valid":
            padding = (0, 0)
        elif isinstance(padding, str) and padding == "same":
            if kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(f"Conv: padding='same' needs odd kernel sizes, got {(kh, kw)}")
            padding = ((kh - 1) // 2, (kw - 1) // 2)
        elif isinstance(padding, str):
            raise ValueError(f"Conv: padding must be 'valid', 'same', an int >= 0 or a pair of them, "
                             f"got {padding!r}")
        object.__setattr__(self, "padding", _pair("Conv: padding", padding, _nonneg_int))
        object.__setattr__(self, "bias", bool(bias))

    def __repr__(self):
        extra = f", padding={_size_repr(self.padding)}" if any(self.padding) else ""
        extra += "" if self.bias else ", bias=False"
        return f"Conv({self.out_channels}, {_size_repr(self.kernel_size)}, {self.activation.name!r}{extra})"

    def _dims(self, shape):
        """``C, H, W, (KH, KW), (PH, PW), Hp, Wp, Ho, Wo`` (``Hp, Wp``: padded input)."""
        C, H, W = _image(self, shape)
        (KH, KW), (PH, PW) = self.kernel_size, self.padding
        Hp, Wp = H + 2 * PH, W + 2 * PW
        if Hp < KH or Wp < KW:
            raise ValueError(f"Conv: kernel {KH}x{KW} larger than the padded input {Hp}x{Wp}")
        return C, H, W, (KH, KW), (PH, PW), Hp, Wp, Hp - KH + 1, Wp - KW + 1

    def output_shape(self, shape):
        *_, Ho, Wo = self._dims(shape)
        return (self.out_channels, Ho, Wo)

    def param_shapes(self, shape):
        C, (KH, KW) = shape[0], self.kernel_size
        d = {"W": (self.out_channels, C, KH, KW)}
        if self.bias:
            d["b"] = (self.out_channels,)
        return d

    def init_params(self, views, shape, rng):
        C, (KH, KW) = shape[0], self.kernel_size
        std = np.sqrt(2.0 / (C * KH * KW + self.out_channels * KH * KW))
        views["W"][...] = rng.standard_normal(views["W"].shape) * std
        if self.bias:
            views["b"][...] = 0

    def _scratch(self, shape):
        """Per-sample sizes of: padded input, padded-input gradient, padded delta, z."""
        C, H, W, (KH, KW), P, Hp, Wp, Ho, Wo = self._dims(shape)
        Co = self.out_channels
        pad_in = C * Hp * Wp if any(P) else 0
        dpad = Co * (Ho + 2 * (KH - 1)) * (Wo + 2 * (KW - 1))
        z = Co * Ho * Wo if needs_z(self.activation) else 0
        return pad_in, pad_in, dpad, z

    def saved_size(self, shape):
        return sum(self._scratch(shape))

    def _offsets(self, ctx):
        a, b, c, d = self._scratch(ctx.in_shape)
        o = ctx.saved_off
        return o, o + a * ctx.B, o + (a + b) * ctx.B, o + (a + b + c) * ctx.B

    def emit_forward(self, ctx: EmitContext) -> list:
        C, H, W, (KH, KW), (PH, PW), Hp, Wp, Ho, Wo = self._dims(ctx.in_shape)
        Co, B, dt = self.out_channels, ctx.B, ctx.dt
        pin, _, _, z_off = self._offsets(ctx)
        L = [f"# conv {C}x{H}x{W} -> {Co}x{Ho}x{Wo}, {KH}x{KW}, padding {PH}x{PW} ({self.activation.name})"]
        src = ctx.in_off
        if PH or PW:
            L += emit_pad_copy(B, dt, ctx.in_off, pin, C, H, W, PH, PW)
            src = pin
        w = ctx.p_off
        b_expr = f"p[{w + Co * C * KH * KW} + cd]" if self.bias else f"{dt}(0.0)"
        act = self.activation
        args = (B, dt, src, C, Hp, Wp, ctx.out_off, Co, Ho, Wo, (KH, KW), b_expr,
                f"{w} + (cd * {C} + cs) * {KH * KW}", lambda ky, kx: ky * KW + kx)
        rows = (PH, PH + H) if PH else None
        v = conv_variants(B, dt, ctx.registers, act)
        if v.forward == "vector" and v.relu_in_registers:
            return L + emit_correlate_vector(*args, src_rows=rows, relu=True, registers=ctx.registers)
        if v.forward == "vector":
            L += emit_correlate_vector(*args, src_rows=rows, registers=ctx.registers)
        else:
            L += emit_correlate(*args, src_rows=rows, registers=ctx.registers)
        return L + emit_activation_pass(ctx, Co * Ho * Wo, act, z_off if needs_z(act) else None)

    def emit_pullback(self, ctx: EmitContext) -> list:
        C, H, W, (KH, KW), (PH, PW), Hp, Wp, Ho, Wo = self._dims(ctx.in_shape)
        Co, B, dt = self.out_channels, ctx.B, ctx.dt
        pin, gpin, dpad, z_off = self._offsets(ctx)
        act = self.activation
        padded = bool(PH or PW)
        src = pin if padded else ctx.in_off
        go, w = ctx.gout_off, ctx.p_off
        zo = z_off if needs_z(act) else ctx.out_off
        v = conv_variants(B, dt, ctx.registers, act)
        L = [f"# pullback of conv {C}x{H}x{W} -> {Co}x{Ho}x{Wo}, {KH}x{KW}, padding {PH}x{PW}"]
        L += emit_delta_pass(Ho * Wo * B, dt, go, zo, ctx.out_off, Co,
                             w + Co * C * KH * KW if self.bias else None, act, ctx.registers)
        L += emit_conv_weight_grad(B, dt, go, Co, Ho, Wo, src, C, Hp, Wp, (KH, KW), w,
                                   vector=v.weight_grad == "vector", registers=ctx.registers)
        if ctx.need_gin is False:
            return L
        if v.input_grad == "vector":  # straight into the unpadded input gradient
            body = emit_conv_input_grad_vector(B, dt, go, Co, Ho, Wo, ctx.gin_off, C, H, W,
                                               (PH, PW), (KH, KW), w, v.input_grad_tile,
                                               registers=ctx.registers)
            return L + [f"if {ctx.need_gin}:"] + ["    " + ln for ln in body]
        # dL/d(input): full correlation of the zero-padded delta with the flipped kernel
        Hd, Wd = Ho + 2 * (KH - 1), Wo + 2 * (KW - 1)
        body = emit_pad_copy(B, dt, go, dpad, Co, Ho, Wo, KH - 1, KW - 1)
        dst = gpin if padded else ctx.gin_off
        body += emit_correlate(
            B, dt, dpad, Co, Hd, Wd, dst, C, Hp, Wp, (KH, KW), f"{dt}(0.0)",
            f"{w} + (cs * {C} + cd) * {KH * KW}", lambda ky, kx: (KH - 1 - ky) * KW + KW - 1 - kx,
            src_rows=(KH - 1, KH - 1 + Ho), registers=ctx.registers)
        if padded:  # crop the padded-input gradient
            body += [f"for c in range({C}):", f"    for y in range({H}):",
                     f"        for j in range({W * B}):",
                     f"            work[{ctx.gin_off} + (c * {H} + y) * {W * B} + j] = "
                     f"work[{gpin} + (c * {Hp} + y + {PH}) * {Wp * B} + {PW * B} + j]"]
        L += [f"if {ctx.need_gin}:"] + ["    " + ln for ln in body]
        return L

    def emit_forward_reference(self, ctx: EmitContext) -> list:
        C, H, W, K, P, *_ = self._dims(ctx.in_shape)
        return reference.conv_forward(ctx, C, H, W, self.out_channels, K, P, self.bias,
                                      self.activation, self._offsets(ctx)[3])

    def emit_pullback_reference(self, ctx: EmitContext) -> list:
        C, H, W, K, P, *_ = self._dims(ctx.in_shape)
        return reference.conv_pullback(ctx, C, H, W, self.out_channels, K, P, self.bias,
                                       self.activation, self._offsets(ctx)[3])


@dataclass(frozen=True)
class ConvVariants:
    """Which tuned code a convolution gets (see :func:`conv_variants`). ``forward`` and
    ``weight_grad``: ``"vector"`` (explicit-vector register tiles) or ``"scalar"``;
    ``relu_in_registers``: relu applied before the forward tile's store (no pass);
    ``wgrad_co_tile``: output channels per weight-gradient tile; ``input_grad``:
    ``"vector"`` (:func:`emit_conv_input_grad_vector`, tiles of ``input_grad_tile`` =
    (input channels, pixels)) or ``"scalar"`` (:func:`emit_correlate` over the padded
    delta); ``corr_taps``: taps per fused expression of the scalar correlation (the forward
    and input gradient of blocks that are not whole vectors)."""

    forward: str
    relu_in_registers: bool
    weight_grad: str
    wgrad_co_tile: int
    input_grad: str
    input_grad_tile: tuple
    corr_taps: int


def conv_variants(B, dt, registers, act) -> ConvVariants:
    """The dispatch rule of the conv emitters for blocks of ``B`` samples of ``dt``, a
    budget of ``registers`` vector registers (16 or 32) and activation ``act``."""
    vec = vector_blocks(B, dt, registers)
    kind = "vector" if vec else "scalar"
    return ConvVariants(kind, vec and act.name == "relu", kind, wgrad_co_tile(registers),
                        kind, input_grad_tile(registers), corr_taps(registers))


def emit_pad_copy(B, dt, src, dst, C, H, W, py, px):
    """Copy a ``(C, H, W)`` block into the interior of a ``(C, H+2py, W+2px)`` block and
    zero its border.

    The border is written on every call: the workspace is shared by kernels of other
    layouts (``chain.kernels()``'s single-sample and batch kernels, a user's own reuse of
    ``work``), so zeros left from its allocation cannot be relied on."""
    Hp, Wp = H + 2 * py, W + 2 * px
    zero = f"{dt}(0.0)"
    L = [f"for c in range({C}):", f"    cb = {dst} + c * {Hp * Wp * B}"]
    if py:
        L += [f"    for j in range({py * Wp * B}):", f"        work[cb + j] = {zero}",
              f"        work[cb + {(py + H) * Wp * B} + j] = {zero}"]
    L += [f"    for y in range({H}):", f"        r = cb + (y + {py}) * {Wp * B}"]
    if px:
        L += [f"        for j in range({px * B}):", f"            work[r + j] = {zero}",
              f"            work[r + {(px + W) * B} + j] = {zero}"]
    L += [f"        for j in range({W * B}):",
          f"            work[r + {px * B} + j] = work[{src} + (c * {H} + y) * {W * B} + j]"]
    return L


def emit_correlate(B, dt, src, Cs, Hs, Ws, dst, Cd, Hd, Wd, K, init_expr, w_base, w_tap,
                   src_rows=None, registers=16):
    """Lines for ``dst[cd, y, x] = init + sum_{cs,ky,kx} w(cd,cs,ky,kx) src[cs, y+ky, x+kx]``
    over all lanes (a 'valid' cross-correlation with a ``K = (KH, KW)`` kernel). The
    weight's index in ``p`` is ``w_base`` (an expression in ``cd`` and ``cs``) plus the int
    ``w_tap(ky, kx)``; ``init_expr`` may use ``cd``. The taps of one (cd, cs) pair are
    fused into expressions of about :func:`corr_taps` taps (whole kernel rows): one
    load/store of the output row per that many FMAs, with the weights held in registers
    across rows. ``src_rows = (lo, hi)``: only source rows ``lo <= r < hi`` can be nonzero
    (a zero-padded source), so output rows that would read only zero rows through a
    group's taps are skipped."""
    KH, KW = K
    taps = [(ky, kx) for ky in range(KH) for kx in range(KW)]
    L = [f"for cd in range({Cd}):",
         f"    init = {init_expr}",
         f"    for j in range({Hd * Wd * B}):",
         f"        work[{dst} + cd * {Hd * Wd * B} + j] = init",
         f"    for cs in range({Cs}):",
         f"        wb = {w_base}"]
    rows = max(1, corr_taps(registers) // KW)
    for g0 in range(0, KH, rows):
        group = [(t, ky, kx) for t, (ky, kx) in enumerate(taps) if g0 <= ky < g0 + rows]
        y0, y1 = 0, Hd
        if src_rows is not None:  # rows y with some y + ky in [lo, hi) for ky in the group
            ky1 = min(g0 + rows, KH) - 1
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
                          src_rows=None, relu=False, *, registers):
    """:func:`emit_correlate` with explicit vectors (:mod:`smallchains._simd`), for blocks of
    whole vectors: tiles of :data:`CORR_TILE_O` output channels by two vectors of the lanes
    of one output pixel keep their accumulators in registers over all ``Cs * KH * KW``
    taps (per tap: 2 source loads, 4 weight broadcasts, 8 FMAs) and store once; the scalar
    code adds every group of taps into the output in memory. With ``src_rows = (lo, hi)``
    each output row runs only the kernel rows that read source rows in ``[lo, hi)``. With
    ``relu``, ``max(., 0)`` is applied before the store (no activation pass). Needs ``B`` a
    multiple of two vectors (:func:`~smallchains.layers.dense.vector_lanes` for
    ``registers``) and ``w_tap`` linear in ``ky``."""
    KH, KW = K
    V = vector_lanes(dt, registers)
    slope = w_tap(1, 0) - w_tap(0, 0) if KH > 1 else 0
    base = [w_tap(0, kx) for kx in range(KW)]
    if B % (2 * V) or any(w_tap(ky, kx) != base[kx] + ky * slope for ky in range(KH) for kx in range(KW)):
        raise ValueError("emit_correlate_vector needs blocks of whole vector pairs and a tap "
                         "index linear in ky")
    kys = (f"range(max(0, {src_rows[0]} - y), min({KH}, {src_rows[1]} - y))"
           if src_rows is not None else f"range({KH})")

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
        for kx in range(KW):
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


def input_grad_tile(registers):
    """``(input channels, pixels)`` per register tile of
    :func:`emit_conv_input_grad_vector`, two vectors of lanes each: 1 x 4 with 16 vector
    registers (8 accumulators; each loaded delta vector serves up to 4 FMAs, one per
    pixel it reaches), 2 x 4 with 32 (16 accumulators; each delta vector also serves two
    channels). Measured on a Zen 3 (AVX2), LeNet5's 16 -> 6 channel gradient of a 12 x 12
    input, float32, per 2,048 samples standalone: 1 x 4 10.0-10.2 ms (61-63 GFLOP/s of
    useful FMAs, peak 89.7), 1 x 3 11.2, 1 x 6 10.6, 2 x 2 10.8, 3 x 1 10.3; the tiles
    with 12 or more accumulators spill there (3 x 2 16.2 ms, 2 x 3 42.1, 2 x 4 13.9).
    The 32-register tile is not measured (no AVX-512 machine at hand when it was chosen)."""
    return (2, 4) if registers >= 32 else (1, 4)


def emit_conv_input_grad_vector(B, dt, d_off, Co, Ho, Wo, dst, C, H, W, P, K, w_off, tile, *,
                                registers):
    """Lines for the input gradient of a convolution, for blocks of whole vector pairs:
    ``dst[ci, y, x] = sum w[co, ci, ky, kx] delta[co, y + PH - ky, x + PW - kx]`` over the
    taps whose delta pixel exists (``0 <= y + PH - ky < Ho``, ``0 <= x + PW - kx < Wo``),
    for the ``(C, H, W)`` unpadded input; ``delta`` is ``(Co, Ho, Wo)`` at ``d_off``, the
    weight ``(Co, C, KH, KW)`` at ``p[w_off]``, ``P = (PH, PW)`` the forward's padding.

    Only the taps that meet a delta pixel are computed: the rows by the ``ky`` range of
    each input row, the columns at generation time (each tile of ``tile[1]`` adjacent
    pixels is its own straight-line code with the ``kx`` that exist for it). The scalar
    form (:func:`emit_correlate` over the zero-padded delta) also multiplies the padding:
    2.25 times the arithmetic for LeNet5's 16 -> 6 channel gradient of a 12 x 12 input.
    Tiles of ``tile[0]`` input channels x ``tile[1]`` pixels x two vectors of lanes keep
    their accumulators in registers over all ``Co * KH * KW`` taps and store once (see
    :func:`input_grad_tile`; vectors of :func:`~smallchains.layers.dense.vector_lanes` for
    ``registers``)."""
    KH, KW = K
    PH, PW = P
    V = vector_lanes(dt, registers)
    if B % (2 * V):
        raise ValueError("emit_conv_input_grad_vector needs blocks of whole vector pairs")
    tc, R = tile
    row = W * B

    def pixels(c0, nc, pad):
        out = [f"{pad}for h in range(0, {B}, {2 * V}):"]
        pad += "    "
        for x0 in range(0, W, R):
            xs = range(x0, min(W, x0 + R))
            acc = {(a, x, hh): f"a{a}_{x - x0}_{hh}" for a in range(nc) for x in xs for hh in range(2)}
            out += [f"{pad}{v} = vz" for v in acc.values()]
            out += [f"{pad}for co in range({Co}):",
                    f"{pad}    for ky in range(ky0, ky1):",
                    f"{pad}        dr = {d_off + PH * Wo * B} + (co * {Ho} + y - ky) * {Wo * B} + h",
                    f"{pad}        wb = {w_off} + ((co * {C} + {c0}) * {KH} + ky) * {KW}"]
            for kx in range(KW):
                cols = [(x, x + PW - kx) for x in xs if 0 <= x + PW - kx < Wo]
                if not cols:
                    continue
                out += [f"{pad}        m{a} = vsplat(p[{at('wb', a * KH * KW + kx)}])" for a in range(nc)]
                for x, col in cols:
                    out += [f"{pad}        v{hh} = vload(work, {at('dr', col * B + hh * V)})" for hh in range(2)]
                    out += [f"{pad}        {acc[a, x, hh]} = vfma(m{a}, v{hh}, {acc[a, x, hh]})"
                            for a in range(nc) for hh in range(2)]
            out += [f"{pad}ob = {dst} + ({c0} * {H} + y) * {row} + h"]
            out += [f"{pad}vstore(work, {at('ob', a * H * row + x * B + hh * V)}, {v})"
                    for (a, x, hh), v in acc.items()]
        return out

    def channels(c0, nc, pad):
        return [f"{pad}for y in range({H}):",
                f"{pad}    ky0 = max(0, y + {PH - Ho + 1})",  # delta row y + PH - ky < Ho
                f"{pad}    ky1 = min({KH}, y + {PH + 1})"] + pixels(c0, nc, pad + "    ")

    # balanced channel tiles, as emit_correlate_vector's
    ts = -(-C // -(-C // tc))
    full = C // ts * ts
    L = [f"vz = vsplat({dt}(0.0))", f"for c0 in range(0, {full}, {ts}):"] + channels("c0", ts, "    ")
    if full < C:
        L += channels(full, C - full, "")
    return L


def wgrad_co_tile(registers):
    """Output channels per weight-gradient register tile (``CO_TILE * KW`` accumulators): 4
    with AVX-512's 32 vector registers, 2 with 16 (measured on a Zen 3: LeNet5's step 6%
    faster than with 4, whose 20 accumulators spill)."""
    return 4 if registers >= 32 else 2


def corr_taps(registers):
    """Kernel taps per fused correlation expression (whole kernel rows): their weights stay
    in registers across the output rows. All taps with 32 vector registers; with 16, about
    10 (two rows of a 5x5 kernel; measured on a Zen 3: LeNet5's step 15% faster than with
    all 25, whose weights no longer fit)."""
    return 1024 if registers >= 32 else 10


def emit_conv_weight_grad(B, dt, d_off, Co, Ho, Wo, src, Ci, Hs, Ws, K, w_off, vector=False,
                          registers=16):
    """Lines adding ``dW[co, ci, ky, kx] = sum_{y, x, s} delta[co, y, x, s] src[ci, y+ky, x+kx, s]``
    for a ``K = (KH, KW)`` kernel.

    Tiles of :func:`wgrad_co_tile` output channels x ``KW`` horizontal taps share each
    loaded delta and source vector (``CO_TILE + KW`` loads per ``CO_TILE * KW`` FMAs). With
    ``vector`` (blocks of whole vectors) the accumulators are explicit vectors
    (:mod:`smallchains._simd`) reduced once per tile, instead of scalar sums that LLVM
    vectorizes. Measured on LeNet5 (per 2,048 images, in-process): the 6 -> 16 pullback
    21.7 -> 19.7 ms, the 1 -> 6 one 6.24 -> 5.26 ms."""
    KH, KW = K
    L = []
    nrow = Wo * B
    CO_TILE = wgrad_co_tile(registers)
    full = Co // CO_TILE * CO_TILE
    step, zero = (vector_lanes(dt, registers), "vz") if vector else (1, "zero")

    def tile(c0, tc, pad):
        acc = [f"a{a}_{kx}" for a in range(tc) for kx in range(KW)]
        out = [f"vz = vsplat({dt}(0.0))"] if vector else []
        out += [f"for ci in range({Ci}):", f"    for ky in range({KH}):"]
        out += ([] if vector else [f"        zero = {dt}(0.0)"]) + [f"        {v} = {zero}" for v in acc]
        out += [f"        for y in range({Ho}):",
                f"            srow = {src} + (ci * {Hs} + y + ky) * {Ws * B}",
                f"            drow = {d_off} + ({c0} * {Ho} + y) * {nrow}",
                f"            for j in range(0, {nrow}, {step}):"]
        if vector:
            out += [f"                d{a} = vload(work, {at('drow', a * Ho * nrow)} + j)" for a in range(tc)]
            for kx in range(KW):
                out += [f"                xx = vload(work, {at('srow', kx * B)} + j)"]
                out += [f"                a{a}_{kx} = vfma(d{a}, xx, a{a}_{kx})" for a in range(tc)]
        else:
            out += [f"                d{a} = work[{at('drow', a * Ho * nrow)} + j]" for a in range(tc)]
            out += [f"                x{kx} = work[{at('srow', kx * B)} + j]" for kx in range(KW)]
            out += [f"                a{a}_{kx} += d{a} * x{kx}" for a in range(tc) for kx in range(KW)]
        total = "vsum({})" if vector else "{}"
        out += [f"        gw = {w_off} + ({c0} * {Ci} + ci) * {KH * KW} + ky * {KW}"]
        out += [f"        g[{at('gw', a * Ci * KH * KW + kx)}] += {total.format(f'a{a}_{kx}')}"
                for a in range(tc) for kx in range(KW)]
        return [pad + ln for ln in out]

    if full:
        L += [f"for c0 in range(0, {full}, {CO_TILE}):"] + tile("c0", CO_TILE, "    ")
    if full < Co:
        L += tile(str(full), Co - full, "")
    return L


@dataclass(frozen=True, init=False)
class MaxPool(Layer):
    """Max pooling over ``KH x KW`` windows with stride equal to the window (no padding),
    NCHW, as torch ``MaxPool2d(kernel_size)``.

    Input ``(C, H, W)``; output ``(C, H // KH, W // KW)`` (trailing rows/columns that do
    not fill a window are dropped, as torch). The gradient goes to the first maximal
    element of each window in row-major order (as torch). No parameters.

    Parameters
    ----------
    kernel_size : int or (int, int), default 2
        ``k`` for ``k x k`` windows, or ``(KH, KW)``. Stored as a tuple in ``k``.
    """

    small_blocks = True

    k: tuple

    def __init__(self, kernel_size=2):
        object.__setattr__(self, "k", _pair("MaxPool: kernel_size", kernel_size, _pos_int))

    def __repr__(self):
        return f"MaxPool({_size_repr(self.k)})"

    def output_shape(self, shape):
        C, H, W = _image(self, shape)
        KH, KW = self.k
        if H < KH or W < KW:
            raise ValueError(f"{self!r} needs an image of at least {KH}x{KW}, got {H}x{W}")
        return (C, H // KH, W // KW)

    def _win(self, ctx):
        C, H, W = ctx.in_shape
        KH, KW = self.k
        return C, H, W, H // KH, W // KW, KH, KW, ctx.B

    def emit_forward(self, ctx):
        C, H, W, Ho, Wo, KH, KW, B = self._win(ctx)
        i, o = ctx.in_off, ctx.out_off
        L = [f"# maxpool {KH}x{KW}: {C}x{H}x{W} -> {C}x{Ho}x{Wo}"] + self._window_loop(ctx) + [
             f"    ib = {i} + ib",
             f"    for s in range({B}):",
             "        m = work[ib + s]"]
        for dy in range(KH):
            for dx in range(KW):
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
        C, H, W, Ho, Wo, KH, KW, B = self._win(ctx)
        return [f"for q in range({C * Ho * Wo}):",
                f"    c = q // {Ho * Wo}",
                f"    oy = q // {Wo} - c * {Ho}",
                f"    ox = q - (q // {Wo}) * {Wo}",
                f"    ib = ((c * {H} + oy * {KH}) * {W} + ox * {KW}) * {B}"]

    def emit_pullback(self, ctx):
        if ctx.need_gin is False:
            return []
        C, H, W, Ho, Wo, KH, KW, B = self._win(ctx)
        i, o, go, gi, dt = ctx.in_off, ctx.out_off, ctx.gout_off, ctx.gin_off, ctx.dt
        L = [f"# pullback of maxpool {KH}x{KW}: the first maximum of each window gets the gradient",
             f"if {ctx.need_gin}:"]
        if H % KH or W % KW:  # elements outside every window get zero
            L += [f"    for j in range({C * H * W * B}):", f"        work[{gi} + j] = {dt}(0.0)"]
        L += ["    " + ln for ln in self._window_loop(ctx)]
        L += [f"        ob = q * {B}", f"        xb = {i} + ib", f"        gb = {gi} + ib",
              f"        one = {dt}(1.0)", f"        zero = {dt}(0.0)",
              f"        for s in range({B}):",
              f"            m = work[{o} + ob + s]",
              f"            gv = work[{go} + ob + s]",
              "            free = one"]
        for dy in range(KH):
            for dx in range(KW):
                off = (dy * W + dx) * B
                L += [f"            e = one if work[{at('xb', off)} + s] == m else zero",
                      f"            work[{at('gb', off)} + s] = gv * e * free",
                      "            free = free * (one - e)"]
        return L

    def emit_forward_reference(self, ctx):
        C, H, W, Ho, Wo, KH, KW, B = self._win(ctx)
        return reference.maxpool_forward(ctx, C, H, W, KH, KW)

    def emit_pullback_reference(self, ctx):
        C, H, W, Ho, Wo, KH, KW, B = self._win(ctx)
        return reference.maxpool_pullback(ctx, C, H, W, KH, KW)


@dataclass(frozen=True)
class Flatten(Layer):
    """Flatten a per-sample array to a vector in C order (``(C, H, W) -> (C*H*W,)``), like
    ``torch.flatten(x, 1)`` on NCHW and SimpleChains.jl's ``Flatten``. Costs nothing: the
    block layout is already flat, so the output shares the input's workspace."""

    aliases_input = True
    small_blocks = True

    def __repr__(self):
        return "Flatten()"

    def output_shape(self, shape):
        return (prod(shape),)

    def emit_forward(self, ctx):
        return []

    def emit_pullback(self, ctx):
        return []

    emit_forward_reference = emit_forward
    emit_pullback_reference = emit_pullback
