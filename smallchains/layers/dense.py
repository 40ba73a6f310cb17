"""Dense (fully connected) layer: ``a = f(W x + b)``.

Parameters in ``p`` (chain order): ``W`` of shape ``(n_out, n_in)`` row-major (the same
layout as ``torch.nn.Linear.weight``), then ``b`` of shape ``(n_out,)`` if ``bias``.
Follows SimpleChains.jl's ``TurboDense`` (src/dense.jl); that stores ``W`` column-major
as ``(n_out, n_in)`` with the bias as an extra column, we keep ``b`` separate.

The forward code is emitted by :func:`emit_affine`, the pullback by
:func:`emit_affine_pullback` (both also used by other affine layers); which tuned variant
each part gets is :func:`dense_variants`. The plain reference (``kernels="reference"``)
is :func:`smallchains.layers.reference.dense_forward` / ``dense_pullback``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
from .._simd import lanes
from ..activations import (IDENTITY, LEAKY_RELU, RELU, Activation, emit_delta, get_activation,
                           grad_expr, needs_z, value_expr)
from . import reference
from .base import EmitContext, Layer, at


@dataclass(frozen=True, init=False)
class TurboDense(Layer):
    """Fully connected layer ``y = f(W x + b)`` over a flat feature vector.

    Input of shape ``(n_in,)`` per sample (a multi-dimensional input must be flattened
    with :class:`Flatten` first). Output ``(out,)``. Parameters ``W (out, n_in)``,
    ``b (out,)``; ``W`` is initialized Glorot-normal (std ``sqrt(2/(n_in+out))``), ``b``
    to zero, as SimpleChains.jl does.

    Parameters
    ----------
    out : int
        Number of outputs.
    activation : str or Activation, default ``"identity"``
        Elementwise activation ``f`` (see :func:`smallchains.available_activations`).
    bias : bool, default True
        Whether the layer has a bias ``b``.
    """

    out: int
    activation: Activation
    bias: bool
    small_blocks = True
    kernel_imports = {"smallchains._simd": ("vadd", "vadd_into", "vfma", "vload", "vmul", "vrelu",
                                            "vrelu_grad", "vsplat", "vstore", "vsub", "vsum", "vsum4", "vsum8")}

    def __init__(self, out: int, activation="identity", bias: bool = True):
        if not isinstance(out, (int, np.integer)) or isinstance(out, bool) or out < 1:
            raise ValueError(f"TurboDense: out must be a positive int, got {out!r}")
        object.__setattr__(self, "out", int(out))
        object.__setattr__(self, "activation", get_activation(activation))
        object.__setattr__(self, "bias", bool(bias))

    def __repr__(self) -> str:
        b = "" if self.bias else ", bias=False"
        return f"TurboDense({self.out}, {self.activation.name!r}{b})"

    def _n_in(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(
                f"TurboDense expects a 1-D feature input per sample, got shape {input_shape}; "
                "insert Flatten() before it"
            )
        return input_shape[0]

    def output_shape(self, input_shape):
        self._n_in(input_shape)
        return (self.out,)

    def param_shapes(self, input_shape):
        shapes = {"W": (self.out, self._n_in(input_shape))}
        if self.bias:
            shapes["b"] = (self.out,)
        return shapes

    def init_params(self, views, input_shape, rng):
        n_in = self._n_in(input_shape)
        std = np.sqrt(2.0 / (n_in + self.out))
        views["W"][...] = rng.standard_normal(views["W"].shape) * std
        if self.bias:
            views["b"][...] = 0

    def saved_size(self, input_shape):
        # pre-activations z, kept only when f' cannot be computed from a = f(z)
        return self.out if needs_z(self.activation) else 0

    def input_rows_stride(self, input_shape, B) -> int:
        """As the chain's first layer: the row stride (elements) at which the kernels
        should also give it the input rows sample-major (for
        :func:`emit_outer_grad_rows`), or 0 for none."""
        n_in = self._n_in(input_shape)
        return rows_stride(n_in) if rows_dw(n_in, B) else 0

    def forward_from_rows(self, registers, B) -> bool:
        """As the chain's first layer with input rows (:meth:`input_rows_stride`): whether
        its training forward reads them too (:func:`emit_affine_rows`), so that the
        training kernels need no feature-major input block. See :func:`rows_forward`."""
        return rows_forward(registers, B)

    def emit_forward(self, ctx: EmitContext) -> list:
        n_in = prod(ctx.in_shape)
        z_off = ctx.saved_off if needs_z(self.activation) else None
        if ctx.rows_in:
            return emit_affine_rows(ctx, n_in, self.out, w_off=ctx.p_off,
                                    b_off=ctx.p_off + n_in * self.out if self.bias else None,
                                    act=self.activation, z_off=z_off)
        return emit_affine(
            ctx, n_in, self.out, w_off=ctx.p_off, b_off=ctx.p_off + n_in * self.out if self.bias else None,
            act=self.activation, z_off=z_off,
        )

    def emit_pullback(self, ctx: EmitContext) -> list:
        n_in = prod(ctx.in_shape)
        z_off = ctx.saved_off if needs_z(self.activation) else ctx.out_off
        return emit_affine_pullback(
            ctx, n_in, self.out, w_off=ctx.p_off, b_off=ctx.p_off + n_in * self.out if self.bias else None,
            act=self.activation, z_off=z_off,
        )

    def emit_forward_reference(self, ctx: EmitContext) -> list:
        n_in = prod(ctx.in_shape)
        return reference.dense_forward(
            ctx, n_in, self.out, ctx.p_off, ctx.p_off + n_in * self.out if self.bias else None,
            self.activation, ctx.saved_off)

    def emit_pullback_reference(self, ctx: EmitContext) -> list:
        n_in = prod(ctx.in_shape)
        return reference.dense_pullback(
            ctx, n_in, self.out, ctx.p_off, ctx.p_off + n_in * self.out if self.bias else None,
            self.activation, ctx.saved_off if needs_z(self.activation) else ctx.out_off)


Dense = TurboDense

# --- code emission -----------------------------------------------------------------------
# Blocks are feature-major: feature i of sample s at work[off + i*B + s], so every inner
# loop runs over the block's samples (f"for s in range({B})") and vectorizes. Inputs are
# taken CHUNK at a time in one fused expression: one load/store of z per CHUNK FMAs.
CHUNK = 8


def _sum(terms):
    # pairwise sum: shorter dependency chains for the vectorized loop
    while len(terms) > 1:
        terms = [f"({terms[k]} + {terms[k + 1]})" if k + 1 < len(terms) else terms[k]
                 for k in range(0, len(terms), 2)]
    return terms[0]


def _itemsize(dt):
    return np.dtype(dt.removeprefix("np.")).itemsize


def _tiled(n, T, var, tile, pad=""):
    """Lines of a tile loop over ``n`` rows: ``for var in range(0, full, T)`` around
    ``tile(var, T, pad + "    ")``, then ``tile(full, n - full, pad)`` for the remainder
    (``full = n // T * T``; either part left out when empty)."""
    full = n // T * T
    L = []
    if full:
        L += [f"{pad}for {var} in range(0, {full}, {T}):"] + tile(var, T, pad + "    ")
    if full < n:
        L += tile(full, n - full, pad)
    return L


def vector_lanes(dt, registers):
    """Lanes of an explicit vector of the kernel dtype ``dt`` for a budget of
    ``registers`` (``"np.float32"``: 8 for 16 registers, 16 for 32; see
    :func:`smallchains._simd.vector_bytes`)."""
    return lanes(_itemsize(dt), registers)


def vector_blocks(B, dt, registers):
    """Whether blocks of ``B`` samples of ``dt`` get the explicit-vector tiles
    (:mod:`smallchains._simd`): ``B`` a multiple of two vectors. The single-sample
    (``B = 1``) kernels keep the scalar code."""
    return B % (2 * vector_lanes(dt, registers)) == 0


def gemm_vectors(B, dt, registers):
    """Vectors of samples per tile of :func:`emit_gemm_vector` for blocks of ``B`` samples of
    ``dt``: 2 for whole pairs of vectors (:func:`vector_blocks`), 1 for an odd number of
    whole vectors (a 16-sample float32 block with the 16-lane vectors of 32 registers: two
    threads' halves of a 32-sample minibatch), else 0 (no register tiles)."""
    V = vector_lanes(dt, registers)
    return 2 if B % (2 * V) == 0 else (1 if B % V == 0 else 0)


# Forward tile: GEMM_TILE_O outputs x 2 vectors of samples, accumulated over all inputs in
# registers (4 x 2 accumulators + 2 input vectors + 4 broadcast weights = 14 of AVX2's 16).
GEMM_TILE_O = 4


def emit_affine(ctx, n_in, n_out, w_off, b_off, act, z_off):
    """Lines computing ``a = f(W x + b)`` for one block (``W (n_out, n_in)`` row-major at
    ``p[w_off]``, ``b`` at ``p[b_off]`` or none). ``z`` is stored at ``z_off`` if given."""
    if dense_variants(n_in, n_out, ctx.B, ctx.dt, ctx.registers).forward.startswith("vector"):
        return emit_affine_vector(ctx, n_in, n_out, w_off, b_off, act, z_off)
    B, dt, x = ctx.B, ctx.dt, ctx.in_off
    L = [f"# dense {n_in} -> {n_out} ({act.name}): a = f(W x + b)",
         f"for o in range({n_out}):",
         f"    wo = {w_off} + o * {n_in}",
         f"    ao = {ctx.out_off} + o * {B}",
         f"    bias = p[{b_off} + o]" if b_off is not None else f"    bias = {dt}(0.0)"]
    chunks = [(i, min(CHUNK, n_in - i)) for i in range(0, n_in, CHUNK)]
    full = n_in // CHUNK
    # A costly activation (tanh: 9 coefficients) gets its own pass over the whole output
    # block: fused into the affine loop, its constants plus the weights overflow the 16
    # vector registers of AVX2 and LLVM spills them inside the loop.
    if act.code in (IDENTITY, RELU, LEAKY_RELU):  # cheap: fused into the last chunk's loop
        def act_line(zexpr):
            return ([f"            zz = {zexpr}"]
                    + ([f"            work[{z_off} + o * {B} + s] = zz"] if z_off is not None else [])
                    + [f"            work[ao + s] = {value_expr(act, 'zz', dt)}"])
        act_pass = []
    else:  # the affine loops write z into the output block, then one pass applies f
        def act_line(zexpr):
            return [f"            work[ao + s] = {zexpr}"]
        act_pass = emit_activation_pass(ctx, n_out, act, z_off)
    if len(chunks) == 1:
        i, k = chunks[0]
        L += [f"    w{j} = p[{at('wo', j)}]" for j in range(k)]
        L += ["    if True:", f"        for s in range({B}):"]
        L += act_line(_sum(["bias"] + [f"w{j} * work[{x + j * B} + s]" for j in range(k)]))
        return L + act_pass
    # first chunk initializes the running sum in the output row, middle chunks add to it,
    # the remainder (if any) and the activation come last
    L += [f"    for s in range({B}):", "        work[ao + s] = bias"]
    if full:
        L += [f"    for i in range(0, {full * CHUNK}, {CHUNK}):"]
        L += ["        wi = wo + i"] + [f"        w{j} = p[{at('wi', j)}]" for j in range(CHUNK)]
        L += [f"        xi = {x} + i * {B}", f"        for s in range({B}):"]
        L += ["            work[ao + s] += " + _sum([f"w{j} * work[{at('xi', j * B)} + s]" for j in range(CHUNK)])]
    rem = n_in - full * CHUNK
    if not rem and act_pass:  # z is complete; the activation pass follows
        return L + act_pass
    L += [f"    w{j} = p[wo + {full * CHUNK + j}]" for j in range(rem)]
    L += ["    if True:", f"        for s in range({B}):"]
    L += act_line(_sum(["work[ao + s]"] + [f"w{j} * work[{x + (full * CHUNK + j) * B} + s]" for j in range(rem)]))
    return L + act_pass


def emit_activation_pass(ctx, n, act, z_off):
    """One pass applying ``f`` over the ``n`` features of the output block (keeping ``z`` at
    ``z_off`` if given); nothing for identity. Used by dense and conv layers."""
    if act.code == IDENTITY:
        return []
    L = [f"# {act.name}, one pass over the block", f"for k in range({n * ctx.B}):",
         f"    zz = work[{ctx.out_off} + k]"]
    L += [f"    work[{z_off} + k] = zz"] if z_off is not None else []
    return L + [f"    work[{ctx.out_off} + k] = {value_expr(act, 'zz', ctx.dt)}"]


def emit_gemm_vector(B, dt, m_off, row_stride, col_stride, n_rows, n_cols, v_off, out_off,
                     b_off=None, relu=False, *, registers, more=(), b2_off=None, v_row=None,
                     out_row=None):
    """Lines overwriting ``out[r, s] = b[r] + sum_k M[r, k] v[k, s]`` for ``r < n_rows``
    (``M[r, k]`` at ``p[m_off + r * row_stride + k * col_stride]``, ``b`` at ``p[b_off]``
    or zero; ``v``, ``out`` feature-major blocks of ``B`` samples at the work offsets, ints
    or the names of offsets set by the surrounding code).
    With ``relu``, ``out = max(., 0)`` (applied in registers before the store).

    Explicit vectors (:mod:`smallchains._simd`): tiles of :data:`GEMM_TILE_O` rows by two
    vectors of samples keep their accumulators in registers over all ``n_cols`` terms (per
    term: 2 sample loads, 4 broadcasts of ``M``, 8 FMAs) and store once. Blocks of an odd
    number of vectors (:func:`gemm_vectors` 1) get tiles of ``2 * GEMM_TILE_O`` rows by one
    vector: the same 8 accumulators (per term: 1 sample load, 8 broadcasts, 8 FMAs). Measured on a Zen
    3 (matexp forward, in-process A/B against the scalar CHUNK loops, which add into
    ``out`` in memory): 32 -> 16 167.6 -> 145.7 us per epoch (tanh pass included), 16 -> 4
    16.5 -> 14.1, 4 -> 32 114.5 -> 112.3. Vectors of :func:`vector_lanes` for
    ``registers``.

    ``more``: further products summed into the same accumulators, each ``(m_off,
    row_stride, col_stride, n_cols, v_off)`` as above (an LSTM's gates: ``W_ih x_t +
    W_hh h_{t-1}``); ``b2_off``: a second bias added to ``b``; ``v_row``, ``out_row``:
    elements from one row of ``v`` (of the first product) or of ``out`` to the next, if not
    ``B``."""
    V = vector_lanes(dt, registers)
    nv = gemm_vectors(B, dt, registers)
    if not nv:
        raise ValueError(f"emit_gemm_vector: blocks of {B} samples are not whole vectors of {V}")
    TO = GEMM_TILE_O * 2 // nv
    products = [(m_off, row_stride, col_stride, n_cols, v_off, v_row or B)] + [m + (B,) for m in more]
    orow_ = out_row or B

    def tile(r, tr, pad):
        # r: the loop variable "r" or an int (the remainder rows)
        orow = f"{out_off} + r * {orow_}" if r == "r" else at(out_off, r * orow_)
        out = [f"{pad}orow = {orow}"]
        for j, (mo, rs, _, _, _, _) in enumerate(products):
            out += [f"{pad}mr{j or ''} = " + (f"{mo} + r * {rs}" if r == "r" else str(mo + r * rs))]
        if b_off is not None:
            br = f"{b_off} + r" if r == "r" else str(b_off + r)
            b2 = "" if b2_off is None else (f"{b2_off} + r" if r == "r" else str(b2_off + r))
            out += [f"{pad}b{a} = vsplat(p[{at(br, a)}]" + (f" + p[{at(b2, a)}])" if b2 else ")")
                    for a in range(tr)]
        else:
            out += [f"{pad}b{a} = vsplat({dt}(0.0))" for a in range(tr)]
        out += [f"{pad}for s in range(0, {B}, {nv * V}):"]
        out += [f"{pad}    t{a}_{h} = b{a}" for a in range(tr) for h in range(nv)]
        for j, (_, rs, cs, nc, vo, vr) in enumerate(products):
            k = "k" if cs == 1 else f"k * {cs}"
            out += [f"{pad}    for k in range({nc}):", f"{pad}        vk = {vo} + k * {vr} + s"]
            out += [f"{pad}        v{h} = vload(work, {at('vk', h * V)})" for h in range(nv)]
            out += [f"{pad}        mk = mr{j or ''} + {k}"]
            out += [f"{pad}        m{a} = vsplat(p[{at('mk', a * rs)}])" for a in range(tr)]
            out += [f"{pad}        t{a}_{h} = vfma(m{a}, v{h}, t{a}_{h})" for a in range(tr) for h in range(nv)]
        f = "vrelu({})" if relu else "{}"
        out += [f"{pad}    vstore(work, {at('orow', a * orow_ + h * V)} + s, {f.format(f't{a}_{h}')})"
                for a in range(tr) for h in range(nv)]
        return out

    return _tiled(n_rows, TO, "r", tile)


def emit_affine_vector(ctx, n_in, n_out, w_off, b_off, act, z_off):
    """:func:`emit_affine` for blocks of whole vectors: ``z = W x + b`` by
    :func:`emit_gemm_vector`, then one activation pass."""
    nv = gemm_vectors(ctx.B, ctx.dt, ctx.registers)
    L = [f"# dense {n_in} -> {n_out} ({act.name}): z = W x + b, register tiles of "
         f"{GEMM_TILE_O * 2 // nv} outputs x {nv} vector(s) of samples"]
    relu = act.code == RELU  # applied in registers; other activations get a pass
    L += emit_gemm_vector(ctx.B, ctx.dt, w_off, n_in, 1, n_out, n_in, ctx.in_off, ctx.out_off, b_off,
                          relu=relu, registers=ctx.registers)
    return L if relu else L + emit_activation_pass(ctx, n_out, act, z_off)



#: Samples by outputs per tile of :func:`emit_gemm_rows`: 4 x 6 accumulators, 6 weight
#: vectors and one row vector are 31 of 32 registers. Measured on a Zen 4 (AVX-512,
#: ``bench/step_profile.py --model cifar_dense --block 160``, network 1's 1024 -> 64 layer,
#: ms per 1,920 samples): 4 x 6 2.30, 4 x 4 2.37, 8 x 3 2.38-2.45 (8 rows of 4 KiB overflow
#: L1 while the weights stream), 8 x 2 3.23; the feature-major GEMM tiles 2.29.
ROWS_FWD_TILE_S, ROWS_FWD_TILE_O = 4, 6

#: Smallest block whose training forward reads the input rows (:func:`rows_forward`)
ROWS_FWD_MIN_BLOCK = 32


def rows_forward(registers, B) -> bool:
    """Whether a first dense layer with input rows (:func:`rows_dw`) computes its training
    forward from them (:func:`emit_affine_rows`) under a budget of ``registers`` at blocks
    of ``B``: with 32 registers and ``B >= ROWS_FWD_MIN_BLOCK``. The kernels then skip the
    feature-major (transposed) input block, but the tiles read all weights once per 4
    samples, not once per 32 (or 16). Measured on a Zen 4, in-process A/B, epochs:
    network 1 of issue 14 (1024 -> 64 sigmoid, batch 300) at 2 threads 96.7 -> 90.0 ms
    (blocks of 160), 107.1 -> 101.1 (blocks of 32), at 1 thread 170.6 -> 168.1; network 2
    (784 -> 128 relu, batch 32) at 2 threads, blocks of 16, 224.2 -> 226.3, hence the
    smallest block. With 16 registers the tile would be 4 samples by 2 outputs (6 loads
    per 8 FMAs), not measured on an AVX2 machine: the feature-major GEMM tiles stay."""
    return registers >= 32 and B >= ROWS_FWD_MIN_BLOCK


def emit_gemm_rows(B, dt, rows_off, ld, w_off, n_in, n_out, b_off, out_off, registers):
    """Lines overwriting ``out[o, s] = b[o] + sum_i W[o, i] x[s, i]`` (``W (n_out, n_in)``
    row-major at ``p[w_off]``, ``b`` at ``p[b_off]`` or zero; ``x[s, i]`` the sample-major
    input rows at ``work[rows_off + s * ld + i]`` with their count at
    ``work[rows_off + B * ld]``, see :func:`smallchains.compiler.runtime.load_block_rows`;
    ``out`` a feature-major block): dot products along the rows, so the training kernels
    need no feature-major (transposed) input block.

    ``out`` is first set to ``b`` in every lane (lanes past the filled rows keep it:
    what ``W 0 + b`` gives there). Groups of :data:`ROWS_FWD_TILE_S` samples (outer: their rows stay
    in L1 while the weights stream past) by tiles of :data:`ROWS_FWD_TILE_O` outputs
    accumulate vectors of inputs (per vector: a load of each row and each weight row,
    one FMA per pair); :func:`smallchains._simd.vsum8` then turns the accumulators of two
    outputs into their lanes of ``out`` at once (:func:`~smallchains._simd.vsum4` for a
    last odd one). Sample groups run over the filled rows rounded up to the group (the
    loaders zero the rows after them); inputs past the last whole vector are added in a
    scalar loop. Vectors of :func:`vector_lanes` for ``registers`` (8 lanes or more)."""
    V = vector_lanes(dt, registers)
    if V < 8:
        raise ValueError(f"emit_gemm_rows: needs vectors of 8 lanes or more, got {V}")
    TO, TS = ROWS_FWD_TILE_O, ROWS_FWD_TILE_S
    assert TS == 4  # the reductions below: vsum8 of two outputs' 4 accumulators
    f1 = n_in // V * V
    L = [f"# z = W x + b from the sample-major input rows: groups of {TS} samples x tiles "
         f"of {TO} outputs", f"nr = int(work[{rows_off + B * ld}])", f"ng = (nr + {TS - 1}) // {TS} * {TS}",
         f"for o in range({n_out}):",
         f"    bo = p[{b_off} + o]" if b_off is not None else f"    bo = {dt}(0.0)",
         f"    for s in range({B}):", f"        work[{out_off} + o * {B} + s] = bo",
         f"vz = vsplat({dt}(0.0))"]

    def tile(o, to, pad):
        # o: the loop variable "o" or an int (the remainder outputs); inside the sample loop
        ob = f"{w_off} + o * {n_in}" if o == "o" else str(w_off + o * n_in)
        zb = f"{out_off} + o * {B} + s" if o == "o" else f"{out_off + o * B} + s"
        out = [f"{pad}wb = {ob}", f"{pad}zb = {zb}"]
        out += [f"{pad}c{r}_{a} = vz" for r in range(TS) for a in range(to)]
        if f1:
            out += [f"{pad}for i in range(0, {f1}, {V}):"]
            out += [f"{pad}    w{a} = vload(p, wb + {a * n_in} + i)" for a in range(to)]
            for r in range(TS):
                out += [f"{pad}    x = vload(work, xs + {r * ld} + i)"]
                out += [f"{pad}    c{r}_{a} = vfma(x, w{a}, c{r}_{a})" for a in range(to)]
        for a in range(0, to - 1, 2):  # 4 lanes (TS = 4 samples) of two outputs per vsum8
            cs = ", ".join([f"c{r}_{a}" for r in range(TS)] + [f"c{r}_{a + 1}" for r in range(TS)])
            out += [f"{pad}zz = vsum8({cs})", f"{pad}vadd_into(work, {at('zb', a * B)}, zz, 0, 4)",
                    f"{pad}vadd_into(work, {at('zb', (a + 1) * B)}, zz, 4, 4)"]
        if to % 2:
            cs = ", ".join(f"c{r}_{to - 1}" for r in range(TS))
            out += [f"{pad}vadd_into(work, {at('zb', (to - 1) * B)}, vsum4({cs}), 0, 4)"]
        if f1 < n_in:  # the last inputs, scalar
            out += [f"{pad}for r in range({TS}):", f"{pad}    xr = xs + r * {ld}"]
            for a in range(to):
                out += [f"{pad}    e = {dt}(0.0)", f"{pad}    for i in range({f1}, {n_in}):",
                        f"{pad}        e += p[wb + {a * n_in} + i] * work[xr + i]",
                        f"{pad}    work[{at('zb', a * B)} + r] += e"]
        return out

    L += [f"for s in range(0, ng, {TS}):", f"    xs = {rows_off} + s * {ld}"]
    return L + _tiled(n_out, TO, "o", tile, "    ")


def emit_affine_rows(ctx, n_in, n_out, w_off, b_off, act, z_off):
    """:func:`emit_affine` from the sample-major input rows (:func:`emit_gemm_rows`), then
    the activation (relu too) in one pass."""
    L = emit_gemm_rows(ctx.B, ctx.dt, ctx.rows_off, ctx.rows_ld, w_off, n_in, n_out, b_off,
                       ctx.out_off, ctx.registers)
    return L + emit_activation_pass(ctx, n_out, act, z_off)


# dW register tile: TILE_O x TILE_I vector accumulators plus TILE_O + TILE_I loaded vectors
# must fit the register file. 4 x 4 with AVX-512's 32 registers; with 16 (AVX2), 2 x 4
# (measured on a Zen 3: the 4 x 4 tile spills and the matexp step is 16-19% slower), or
# 1 x 8 when n_in >= 8 (see dw_tile).
TILE_I = 4


def dw_tile(n_in, registers):
    """(outputs, inputs) of the dW register tile of :func:`emit_outer_grad` for a register
    budget of ``registers`` vector registers (16 or 32). With 16 and n_in >= 8, one output
    row by 8 inputs (9 loads per 8 FMAs, but fewer reductions per FMA): measured on a Zen
    3, dW of 32 -> 16 took 135 instead of 151 us per matexp epoch, equal for 16 -> 4; for
    4 -> 32 the 2 x 4 tile is faster (48 vs 53 us). With 32, 4 x 4."""
    if registers < 32 and n_in >= 8:
        return 1, 8
    return (4 if registers >= 32 else 2), TILE_I


@dataclass(frozen=True)
class DenseVariants:
    """Which tuned code a dense layer gets (see :func:`dense_variants`).

    ``forward``: ``"vector"`` (:func:`emit_gemm_vector` register tiles of two vectors of
    samples), ``"vector1"`` (its tiles of one vector, :func:`gemm_vectors`) or ``"scalar"``
    (CHUNK-input loops that LLVM vectorizes over the samples). ``dw``: ``"rows"``
    (:func:`emit_outer_grad_rows`), ``"transposed"``
    (:func:`emit_outer_grad_transposed`), ``"vector"`` (:func:`emit_outer_grad_vector`)
    or ``"tiles"`` (:func:`emit_outer_grad`, register tile ``dw_tile``). ``dx``:
    ``"vector"`` / ``"vector1"`` (:func:`emit_gemm_vector` over ``W^T``) or ``"scalar"``
    (:func:`emit_input_grad`'s passes)."""

    forward: str
    dw: str
    dw_tile: tuple
    dx: str


#: Fewest inputs of a first dense layer that takes dW from the sample-major input rows.
#: Measured on a Zen 4 (AVX-512, 32-register tiles), in-process A/B against the previous
#: variants: 784 -> 128 relu at B = 16 (the default block there), 320 rows, backward
#: 1,366-1,381 us (transposed input block) against 778-999 us; 1024 -> 64 at B = 32
#: (vector tiles before) within the run-to-run noise; no clear difference for 128 to 512
#: inputs; slower for 64 inputs (64 -> 16 tanh at B = 32: valgrad 116 -> 200 us per 1,024
#: rows), where the fused-delta vector tiles win. Tests lower it to reach the variant with
#: small layers.
ROWS_MIN_IN = 512


def rows_dw(n_in, B) -> bool:
    """Whether a first dense layer of ``n_in`` inputs with blocks of ``B`` gets its dW
    from the input rows (:func:`emit_outer_grad_rows`): ``n_in >= ROWS_MIN_IN`` and ``B``
    a multiple of 16 (whole pairs of vectors in both dtypes)."""
    return n_in >= ROWS_MIN_IN and B % 16 == 0


def rows_stride(n_in) -> int:
    """Elements from one sample-major input row to the next: ``n_in`` rounded up to 16
    (whole 64-byte lines in float32), plus 16 where that is a multiple of 128. The dW
    tile reads one line from each of the block's rows; at a stride of a multiple of 4 KiB
    (1024 floats) those lines all fall in one set of the 8-way L1 and evict each other."""
    ld = -(-n_in // 16) * 16
    return ld + 16 if ld % 128 == 0 else ld


def dense_variants(n_in, n_out, B, dt, registers, rows=False) -> DenseVariants:
    """The dispatch rule of the dense emitters: the variant of each part of a ``n_in ->
    n_out`` layer for blocks of ``B`` samples of ``dt`` (``"np.float32"`` /
    ``"np.float64"``) and a budget of ``registers`` vector registers; ``rows``: the
    kernels give the layer its input rows sample-major (the chain's first layer, if
    :func:`rows_dw`). Every input can be set, so a test can reach each variant on any CPU."""
    vec = vector_blocks(B, dt, registers)
    if rows:
        dw = "rows"
    elif B * _itemsize(dt) <= DW_TRANSPOSE_MAX_BYTES and n_in >= 8:
        dw = "transposed"
    elif vec and n_in >= 8:
        dw = "vector"
    else:
        dw = "tiles"
    gemm = {2: "vector", 1: "vector1", 0: "scalar"}[gemm_vectors(B, dt, registers)]
    return DenseVariants(gemm, dw, dw_tile(n_in, registers), gemm)


def emit_outer_grad(B, dt, d_off, x_off, n_out, n_in, w_off, delta=None, registers=16):
    """Lines adding ``sum_s d[o, s] x[i, s]`` into ``g[w_off + o * n_in + i]`` for all
    ``o < n_out``, ``i < n_in`` (``d`` and ``x`` feature-major blocks at the offsets).

    With ``delta = (act, z_off, a_off, b_off, store)``, the block at ``d_off`` holds
    ``dL/da`` and the first input tile of each row group computes ``d = dL/da * f'(z)``
    itself (adding ``d`` into ``g[b_off + o]`` unless ``b_off`` is None, and writing it
    over ``dL/da`` if ``store``): no separate pass over the block. Measured on a Zen 3
    (matexp, in-process A/B): the 4 -> 32 pullback 62.7 -> 55.0 us per epoch, 32 -> 16
    256.3 -> 253.6 us. The tile is :func:`dw_tile` for ``registers``."""
    TO, TI = dw_tile(n_in, registers)
    fo, fi = n_out // TO * TO, n_in // TI * TI

    def tile(o, i, to, ti, pad, fused):
        # o: "ot" (the row-group loop variable) or an int; i: "it" or an int
        def base(off, v, m):
            return str(off + v * m) if isinstance(v, int) else f"{off} + {v} * {m}"
        out = [f"{pad}zero = {dt}(0.0)"] + [f"{pad}c{a}_{b} = zero" for a in range(to) for b in range(ti)]
        out += [f"{pad}do = {base(d_off, o, B)}", f"{pad}xo = {base(x_off, i, B)}"]
        if fused:
            act, z_off, a_off, _, store = delta
            out += [f"{pad}gb{a} = zero" for a in range(to)]
            out += [f"{pad}zo = {base(z_off, o, B)}"] * needs_z(act)
            out += [f"{pad}ao = {base(a_off, o, B)}"] * ("aa" in grad_expr(act, "zz", "aa", dt))
        out += [f"{pad}for s in range({B}):"]
        for a in range(to):
            if fused:
                out += emit_delta(act, dt, f"{at('do', a * B)} + s", f"{at('zo', a * B)} + s",
                                  f"{at('ao', a * B)} + s", pad + "    ", k=str(a), store=store)
            else:
                out += [f"{pad}    d{a} = work[{at('do', a * B)} + s]"]
        out += [f"{pad}    x{b} = work[{at('xo', b * B)} + s]" for b in range(ti)]
        out += [f"{pad}    c{a}_{b} += d{a} * x{b}" for a in range(to) for b in range(ti)]
        gw = f"{w_off} + {o} * {n_in}" if isinstance(o, str) else str(w_off + o * n_in)
        out += [f"{pad}gw = {gw}" + ("" if i == 0 else f" + {i}")]
        out += [f"{pad}g[{at('gw', a * n_in + b)}] += c{a}_{b}" for a in range(to) for b in range(ti)]
        if fused and delta[3] is not None:
            gbo = f"{delta[3]} + {o}" if isinstance(o, str) else str(delta[3] + o)
            out += [f"{pad}g[{at(gbo, a)}] += gb{a}" for a in range(to)]
        return out

    def rows(o, to, pad):
        # every input tile of rows o .. o + to - 1; the first one computes delta if fused
        out = tile(o, 0, to, TI if fi else n_in, pad, delta is not None)
        if fi > TI:
            out += [f"{pad}for it in range({TI}, {fi}, {TI}):"] + tile(o, "it", to, TI, pad + "    ", False)
        if 0 < fi < n_in:
            out += tile(o, fi, to, n_in - fi, pad, False)
        return out

    L = [f"for ot in range(0, {fo}, {TO}):"] + rows("ot", TO, "    ") if fo else []
    for o in range(fo, n_out):
        L += rows(o, 1, "")
    return L


def needs_store(n_in, need_gin, registers):
    """Whether the fused delta of :func:`emit_outer_grad` must be written back: a later
    input tile or ``dL/dx`` reads it."""
    return need_gin is not False or n_in > dw_tile(n_in, registers)[1]


def _vector_delta(act, dt, pad, store):
    """Vector lines of ``d0 = dL/da * f'`` (from ``a`` only) at ``do + s`` / ``ao + s``, added
    to ``gb0`` and stored over ``dL/da`` if ``store``; None for activations whose ``f'``
    needs ``z`` or a branch (their delta gets a scalar pass first)."""
    one = f"vsplat({dt}(1.0))"
    g = "vload(work, do + s)"
    deriv = {"identity": None, "tanh": f"vsub({one}, vmul(aa0, aa0))",
             "sigmoid": f"vmul(aa0, vsub({one}, aa0))"}
    if act.name not in deriv:
        return None
    if deriv[act.name] is None:  # identity: delta is dL/da, already in place
        return [f"{pad}d0 = {g}", f"{pad}gb0 = vadd(gb0, d0)"]
    L = [f"{pad}aa0 = vload(work, ao + s)", f"{pad}d0 = vmul({g}, {deriv[act.name]})"]
    return L + [f"{pad}vstore(work, do + s, d0)"] * store + [f"{pad}gb0 = vadd(gb0, d0)"]


def delta_pass_variant(act, row, dt, registers):
    """Which code :func:`emit_delta_pass` emits for rows of ``row`` elements of ``dt``:
    ``"vector"`` (relu, rows of whole vectors for ``registers``) or ``"scalar"``."""
    return "vector" if act.name == "relu" and row % vector_lanes(dt, registers) == 0 else "scalar"


def emit_delta_pass(row, dt, g_off, z_off, a_off, n, b_off, act, registers):
    """One pass over ``n`` rows of ``row`` elements (a feature's ``B`` lanes; a conv
    channel's pixels x lanes): ``delta = dL/da * f'`` written over ``dL/da`` at ``g_off``
    and, unless ``b_off`` is None, each row's sum added to ``g[b_off + o]`` (the bias
    gradient). For the dW paths that cannot compute delta in their first tile.

    relu with rows of whole vectors gets explicit vectors
    (:func:`smallchains._simd.vrelu_grad`): from the scalar loop LLVM makes a masked store
    of the zeros, measured on a Zen 3 at 0.67-0.87 ns per element, in L1 or L2 alike
    (LeNet5's first conv pullback: 5-7 ms of its 12 per 2,048 images)."""
    V = vector_lanes(dt, registers)
    if delta_pass_variant(act, row, dt, registers) == "vector":
        L = [f"vz = vsplat({dt}(0.0))", f"for o in range({n}):", f"    r = o * {row}",
             "    gb = vz", f"    for s in range(0, {row}, {V}):",
             f"        d = vrelu_grad(vload(work, {g_off} + r + s), vload(work, {a_off} + r + s))",
             f"        vstore(work, {g_off} + r + s, d)", "        gb = vadd(gb, d)"]
        return L + ([f"    g[{b_off} + o] += vsum(gb)"] if b_off is not None else [])
    L = [f"for o in range({n}):", f"    r = o * {row}", f"    gb = {dt}(0.0)", f"    for s in range({row}):"]
    L += emit_delta(act, dt, f"{g_off} + r + s", f"{z_off} + r + s", f"{a_off} + r + s", " " * 8)
    return L + ([f"    g[{b_off} + o] += gb"] if b_off is not None else [])


def emit_outer_grad_vector(ctx, n_in, n_out, w_off, b_off, act, z_off):
    """The dW and db part of :func:`emit_affine_pullback` with explicit vectors
    (``n_in >= 8``): per output row, tiles of 8 inputs accumulate 8 vectors over the block,
    then :func:`smallchains._simd.vsum8` (8 or more lanes; two :func:`~smallchains._simd.vsum4`
    for float64's 4 lanes) reduces them to the 8 sums at once and they are added to ``g``
    as vectors (the scalar tiles of :func:`emit_outer_grad` end in 8 separate horizontal
    sums). The first tile computes delta for identity, tanh and
    sigmoid; other activations get a delta pass first. Inputs past the last multiple of 8
    use a scalar tile. Measured on a Zen 3 (matexp, in-process A/B): the 32 -> 16 tanh
    pullback 252.0 -> 243.1 us per epoch without the fused delta."""
    B, dt, go_, x = ctx.B, ctx.dt, ctx.gout_off, ctx.in_off
    V = vector_lanes(dt, ctx.registers)
    fi = n_in // 8 * 8
    store = ctx.need_gin is not False or n_in > 8
    fused = _vector_delta(act, dt, " " * 8, store)
    L = emit_delta_pass(B, dt, go_, z_off, ctx.out_off, n_out, b_off, act,
                        ctx.registers) if fused is None else []

    def vtile(i, first):
        pad = "    " if first else "        "
        xo = str(x + i * B) if isinstance(i, int) else f"{x} + {i} * {B}"
        out = [f"{pad}c{b} = vz" for b in range(8)] + [f"{pad}xo = {xo}"]
        out += [f"{pad}gb0 = vz"] * first
        out += [f"{pad}for s in range(0, {B}, {V}):"]
        out += fused if first else [f"{pad}    d0 = vload(work, do + s)"]
        out += [f"{pad}    c{b} = vfma(d0, vload(work, {at('xo', b * B)} + s), c{b})" for b in range(8)]
        gw = f"{w_off} + o * {n_in}{'' if i == 0 else f' + {i}'}"
        if V >= 8:  # wider vectors are folded to 8 lanes first
            out += [f"{pad}vadd_into(g, {gw}, vsum8({', '.join(f'c{b}' for b in range(8))}), 0, 8)"]
        else:
            out += [f"{pad}vadd_into(g, {gw}, vsum4(c0, c1, c2, c3), 0, 4)",
                    f"{pad}vadd_into(g, {gw} + 4, vsum4(c4, c5, c6, c7), 0, 4)"]
        if first and b_off is not None:
            out += [f"{pad}g[{b_off} + o] += vsum(gb0)"]
        return out

    # input tiles outer, output rows inner: one tile's 8 input rows stay in L1 while every
    # delta row passes (rows outer streamed the whole input block once per output row)
    L += [f"vz = vsplat({dt}(0.0))"]
    first = 0
    if fused is not None:
        L += [f"for o in range({n_out}):", f"    do = {go_} + o * {B}", f"    ao = {ctx.out_off} + o * {B}"]
        L += vtile(0, True)
        first = 8
    if first < fi:
        L += [f"for it in range({first}, {fi}, 8):", f"    for o in range({n_out}):",
              f"        do = {go_} + o * {B}"]
        L += vtile("it", False)
    if fi < n_in:  # the last inputs: a scalar 1-row tile (delta is stored)
        L += [f"for o in range({n_out}):", f"    do = {go_} + o * {B}"]
        L += ["    zero = " + f"{dt}(0.0)"] + [f"    e{b} = zero" for b in range(n_in - fi)]
        L += [f"    for s in range({B}):", "        dd = work[do + s]"]
        L += [f"        e{b} += dd * work[{x + (fi + b) * B} + s]" for b in range(n_in - fi)]
        L += [f"    g[{w_off} + o * {n_in} + {fi + b}] += e{b}" for b in range(n_in - fi)]
    return L


# Blocks of at most this many bytes per feature get dW from a transposed input block (see
# emit_outer_grad_transposed); larger blocks use the register tiles of emit_outer_grad.
# Measured on a Zen 3 (in-process A/B): LeNet5 (float32, B = 16, 64 bytes) valgrad 5-17%
# faster transposed; the neural-ODE net (float64, B = 32, 256 bytes) 3% slower.
DW_TRANSPOSE_MAX_BYTES = 64


def emit_outer_grad_transposed(B, dt, d_off, x_off, n_out, n_in, w_off, scratch):
    """Lines adding ``dW[o, i] += sum_s d[o, s] x[i, s]`` for small blocks, vectorized over
    ``i`` instead of ``s``: ``x`` is first transposed into ``scratch`` (``B * n_in``
    elements, sample-major), then each row of ``dW`` gets CHUNK samples per fused
    expression. With ``B`` = 16 (two 8-float vectors) the per-tile horizontal sums of
    :func:`emit_outer_grad` cost more than its FMAs."""
    L = ["# dW += delta x^T, vectorized over inputs: x transposed into the dL/dx area first",
         f"for i in range({n_in}):",
         f"    for s in range({B}):",
         f"        work[{scratch} + s * {n_in} + i] = work[{x_off} + i * {B} + s]",
         f"for o in range({n_out}):",
         f"    wo = {w_off} + o * {n_in}",
         f"    do = {d_off} + o * {B}"]
    for s0 in range(0, B, CHUNK):
        k = min(CHUNK, B - s0)
        L += [f"    d{j} = work[do + {s0 + j}]" for j in range(k)]
        L += [f"    for i in range({n_in}):",
              "        g[wo + i] += " + _sum([f"d{j} * work[{scratch + (s0 + j) * n_in} + i]"
                                           for j in range(k)])]
    return L


#: Vectors of inputs per tile of :func:`emit_outer_grad_rows` for a budget of 16 / 32
#: registers (by 4 outputs: 8 / 16 accumulators). Measured on a Zen 4
#: (``bench/step_profile.py --model cifar_dense --block 160 --samples 9600``, network 1's
#: first-layer pullback): 4 vectors 11.10 ms, 2 vectors 12.21 (8 outputs x 2: 11.46;
#: 5 or 6 outputs x 4: 11.18, 11.16; 3 x 4: 12.73), the dW's floor 10.7 ms; its epochs
#: (in-process A/B, either variant built first) 114.9-117.7 against 119.6-124.8 ms at 2
#: threads, 158.2-164.1 against 167.0 at 1.
ROWS_DW_VECTORS = {16: 2, 32: 4}


def emit_outer_grad_rows(B, dt, d_off, rows_off, ld, n_out, n_in, w_off, registers):
    """Lines adding ``dW[o, i] += sum_s d[o, s] x[s, i]`` from the input rows sample-major
    (``x[s, i]`` at ``work[rows_off + s * ld + i]``, see
    :func:`smallchains.compiler.runtime.load_block_rows`; ``d`` feature-major at
    ``d_off``): a matrix product with no horizontal sums. Register tiles of
    :data:`GEMM_TILE_O` outputs x :data:`ROWS_DW_VECTORS` vectors of inputs accumulate
    over the block's ``nr`` filled rows (the count the loaders write at
    ``work[rows_off + B * ld]``; padding rows are skipped, which network 1 of issue 14,
    150 rows in a 160-sample block, spends 6% of its dW on otherwise) (per sample: a
    load of each row vector, a broadcast of ``d`` per output, one FMA per pair), then
    add into ``g`` once; input tiles outer, so each tile's columns of the rows stay in
    L1 while all outputs pass. Remainders: one 2-vector and one 1-vector input tile,
    scalar inputs, fewer outputs. The feature-major tiles reduce each of their
    ``n_in * n_out`` sums horizontally per block. Vectors of :func:`vector_lanes` for
    ``registers``."""
    V = vector_lanes(dt, registers)
    TO = GEMM_TILE_O
    NV = ROWS_DW_VECTORS[16 if registers < 32 else 32]

    def tile(o, to, i, nv, pad):
        # o, i: loop variables ("o", "i") or ints; nv: vectors of inputs (1, 2 or NV)
        ob = f"{d_off} + o * {B}" if o == "o" else str(d_off + o * B)
        gb = (f"{w_off} + o * {n_in}" if o == "o" else str(w_off + o * n_in)) + \
            (f" + {i}" if i == "i" else (f" + {i}" if i else ""))
        xb = f"{rows_off} + {i}" if i == "i" else str(rows_off + i)
        out = [f"{pad}db = {ob}", f"{pad}gw = {gb}", f"{pad}xb = {xb}"]
        out += [f"{pad}c{a}_{h} = vz" for a in range(to) for h in range(nv)]
        out += [f"{pad}for s in range(nr):", f"{pad}    xs = xb + s * {ld}"]
        out += [f"{pad}    x{h} = vload(work, {at('xs', h * V)})" for h in range(nv)]
        for a in range(to):
            out += [f"{pad}    d{a} = vsplat(work[{at('db', a * B)} + s])"]
            out += [f"{pad}    c{a}_{h} = vfma(d{a}, x{h}, c{a}_{h})" for h in range(nv)]
        out += [f"{pad}vadd_into(g, {at('gw', a * n_in + h * V)}, c{a}_{h}, 0, {V})"
                for a in range(to) for h in range(nv)]
        return out

    def outputs(i, nv, pad):
        return _tiled(n_out, TO, "o", lambda o, to, pd: tile(o, to, i, nv, pd), pad)

    fw = n_in // (NV * V) * NV * V  # whole NV-vector tiles, then at most one of 2 and one of 1
    f2 = fw + (n_in - fw) // (2 * V) * 2 * V
    f1 = n_in // V * V
    L = [f"# dW += delta x^T from the sample-major input rows, tiles of {TO} outputs x "
         f"{NV} vectors of inputs, over the block's nr filled rows (not its padding rows)",
         f"vz = vsplat({dt}(0.0))", f"nr = int(work[{rows_off + B * ld}])"]
    if fw:
        L += [f"for i in range(0, {fw}, {NV * V}):"] + outputs("i", NV, "    ")
    for i in range(fw, f2, 2 * V):  # (NV = 2: none)
        L += outputs(i, 2, "")
    if f2 < f1:
        L += outputs(f2, 1, "")
    if f1 < n_in:  # the last inputs, scalar
        L += [f"for o in range({n_out}):", f"    db = {d_off} + o * {B}",
              f"    gw = {w_off} + o * {n_in}", f"    for i in range({f1}, {n_in}):",
              f"        e = {dt}(0.0)", f"        for s in range(nr):",
              f"            e += work[db + s] * work[{rows_off} + s * {ld} + i]",
              "        g[gw + i] += e"]
    return L


def emit_affine_pullback(ctx, n_in, n_out, w_off, b_off, act, z_off):
    """Lines of the pullback of :func:`emit_affine` for one block.

    Reads ``dL/da`` at ``ctx.gout_off`` (and may overwrite it with ``delta = dL/dz``:
    only where a later dW tile or ``dL/dx`` reads delta back); adds ``dL/dW``, ``dL/db``
    into ``g``; overwrites ``dL/dx = W^T delta`` at ``ctx.gin_off`` if ``ctx.need_gin`` (a
    literal bool, or the name of a runtime flag). dW comes from
    :func:`emit_outer_grad_transposed` for blocks of at most 64 bytes per feature, from
    :func:`emit_outer_grad_vector` for other float32 blocks of whole vectors with
    ``n_in >= 8``, else from :func:`emit_outer_grad`.
    """
    B, dt, x, go_, gi_ = ctx.B, ctx.dt, ctx.in_off, ctx.gout_off, ctx.gin_off
    a_off = ctx.out_off
    L = [f"# pullback of dense {n_in} -> {n_out} ({act.name})"]
    # dW[o, i] = sum_s delta[o, s] x[i, s]: small blocks vectorized over i (transposed x,
    # after a delta pass), others in register tiles vectorized over the samples, whose first
    # input tile computes delta
    dw = dense_variants(n_in, n_out, B, dt, ctx.registers, rows=ctx.rows_off >= 0).dw
    if dw == "rows":
        L += emit_delta_pass(B, dt, go_, z_off, a_off, n_out, b_off, act, ctx.registers)
        L += emit_outer_grad_rows(B, dt, go_, ctx.rows_off, ctx.rows_ld, n_out, n_in, w_off, ctx.registers)
    elif dw == "transposed":
        L += emit_delta_pass(B, dt, go_, z_off, a_off, n_out, b_off, act, ctx.registers)
        L += emit_outer_grad_transposed(B, dt, go_, x, n_out, n_in, w_off, gi_)
    elif dw == "vector":
        L += emit_outer_grad_vector(ctx, n_in, n_out, w_off, b_off, act, z_off)
    else:
        delta = (act, z_off, a_off, b_off, needs_store(n_in, ctx.need_gin, ctx.registers))
        L += emit_outer_grad(B, dt, go_, x, n_out, n_in, w_off, delta, ctx.registers)
    if ctx.need_gin is False:
        return L
    vector_dx = dense_variants(n_in, n_out, B, dt, ctx.registers).dx != "scalar"
    return L + [f"if {ctx.need_gin}:"] + ["    " + l for l in emit_input_grad(B, dt, go_, gi_, w_off, n_in, n_out,
                                                                               vector_dx, ctx.registers)]


# dL/dx tile: GX_IN inputs share each loaded delta vector, GX_OUT outputs per pass (their
# GX_IN * GX_OUT weights stay in registers). Measured on a Zen 3 against one input by 8
# outputs with a separate zeroing pass: 32 -> 16 at B = 128 134 -> 107 us per matexp
# epoch, 256 -> 120 at B = 16 29.5 -> 21.8 ms per 10,000 samples (passes unrolled; the loop
# form below measured as fast or faster); no shape tried was slower.
GX_IN, GX_OUT = 2, 4


def emit_input_grad(B, dt, d_off, gx_off, w_off, n_in, n_out, vector, registers):
    """Lines overwriting ``gx[i, s] = sum_o W[o, i] d[o, s]`` (``W (n_out, n_in)`` at
    ``p[w_off]``; ``d``, ``gx`` feature-major blocks at ``d_off``, ``gx_off``). With
    ``vector`` (blocks of whole vectors: :func:`dense_variants`) :func:`emit_gemm_vector`
    (``W`` read transposed); otherwise the first pass over the outputs stores and later
    passes (a loop, so wide layers stay short source) add."""
    if vector:
        nv = gemm_vectors(B, dt, registers)
        return [f"# dL/dx = W^T delta, register tiles of {GEMM_TILE_O * 2 // nv} inputs x {nv} "
                "vector(s) of samples"] + \
            emit_gemm_vector(B, dt, w_off, 1, n_in, n_in, n_out, d_off, gx_off, registers=registers)
    ti = GX_IN if n_in % GX_IN == 0 else 1

    def one_pass(o, to, op, pad):
        # o: an int (the pass's first output, folded into the indices) or "o" (the loop
        # variable, whose bases are set first)
        if o == "o":
            out = [f"{pad}wo = wi + o * {n_in}", f"{pad}do = {d_off} + o * {B}"]
            w_base, w0, d_base = "wo", 0, "do"
        else:
            out, w_base, w0, d_base = [], "wi", o * n_in, d_off + o * B
        out += [f"{pad}w{a}_{b} = p[{at(w_base, w0 + b * n_in + a)}]"
                for a in range(ti) for b in range(to)]
        out += [f"{pad}for s in range({B}):"]
        out += [f"{pad}    d{b} = work[{at(d_base, b * B)} + s]" for b in range(to)]
        out += [f"{pad}    work[{at('gi', a * B)} + s] {op} "
                + _sum([f"w{a}_{b} * d{b}" for b in range(to)]) for a in range(ti)]
        return out

    first = min(GX_OUT, n_out)
    full = n_out // GX_OUT * GX_OUT
    L = [f"# dL/dx = W^T delta, {ti} input(s) x {GX_OUT} outputs per pass",
         f"for i in range(0, {n_in}, {ti}):",
         f"    wi = {w_off} + i", f"    gi = {gx_off} + i * {B}"]
    L += one_pass(0, first, "=", "    ")
    if full > GX_OUT:
        L += [f"    for o in range({GX_OUT}, {full}, {GX_OUT}):"] + one_pass("o", GX_OUT, "+=", "        ")
    if 0 < full < n_out:  # remainder outputs (fewer than GX_OUT in all: the first pass)
        L += one_pass(full, n_out - full, "+=", "    ")
    return L
