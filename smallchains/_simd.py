"""Explicit short vectors for generated kernels: a numba type for ``lanes`` packed floats
(an LLVM ``<lanes x float>`` value, kept in one vector register) and the few operations
the dense register tiles need.

LLVM's loop vectorizer decides by itself how a scalar loop maps to vector registers. For
a matrix-product tile that leaves two costs we cannot remove from scalar source: every
accumulator of a reduction over the samples ends in its own horizontal sum (7 shuffles and
adds each), and the forward sum cannot keep several outputs' accumulators in registers
across all inputs. With these functions an emitter writes the tile itself: vectors of
``lanes`` consecutive samples (``vload``), weights broadcast to all lanes (``vsplat``),
fused multiply-adds (``vfma``, LLVM's ``fmuladd``: one FMA where the CPU has one), and one
transposing reduction of 8 accumulators at a time (``vsum8``).

All functions are numba intrinsics: they exist only inside ``@njit`` / ``@cfunc`` code.
Indices are not bounds-checked (like numba's own indexing); emitters only generate
in-range ones.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic, models, register_model

from . import _cpu

__all__ = ["VECTOR_BYTES", "Vec", "lanes", "vload", "vstore", "vsplat", "vfma", "vadd", "vsub",
           "vmul", "vrelu", "vrelu_grad", "vsum", "vsum4", "vsum8", "vadd_into", "transpose8"]

#: bytes per vector of the functions here: 32 (AVX2 ymm registers). The 64-byte (AVX-512
#: zmm) versions of the two functions that choose a width, ``vload`` and ``vsplat``, are
#: in :mod:`smallchains._simd64`; every other function takes its width from its arguments.
VECTOR_BYTES = 32


def vector_bytes(registers: int) -> int:
    """Bytes per vector of the kernels tuned for a budget of ``registers`` vector
    registers: 64 (AVX-512 zmm) for 32 registers, else 32 (AVX2 ymm). The tile shapes
    count registers, the vectors fill them: an AVX-512 core that runs two 512-bit FMAs
    per cycle doubles its multiply-add rate over ymm (measured on an Emerald Rapids Xeon,
    ``bench/limits.py``: 95.4 GFLOP/s float32 per core with ymm, 182.6 with zmm)."""
    return 64 if registers >= 32 else 32


class Vec(types.Type):
    """``lanes`` floats of ``dtype`` (float32 or float64) in one vector value."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Vec({dtype}, {lanes})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        elt = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(elt, fe_type.lanes))


def lanes(itemsize: int, registers: int = 16) -> int:
    """Lanes of a vector of ``itemsize``-byte floats for a budget of ``registers`` (16: 8
    float32 or 4 float64; 32: 16 or 8), see :func:`vector_bytes`."""
    return vector_bytes(registers) // itemsize


def _vec_ptr(context, builder, arrty, arr, idx, idxty, vt):
    ary = context.make_array(arrty)(context, builder, arr)
    i = context.cast(builder, idx, idxty, types.intp)
    ptr = builder.gep(ary.data, [i])
    return builder.bitcast(ptr, context.get_value_type(vt).as_pointer())


def _check_array(arr, idx, write=False):
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"
            and arr.dtype in (types.float32, types.float64)):
        raise errors.TypingError(f"expected a C-contiguous 1-D float32 or float64 array, got {arr}")
    if write and not arr.mutable:
        raise errors.TypingError(f"expected a writeable array, got {arr}")
    if not isinstance(idx, types.Integer):
        raise errors.TypingError(f"expected an integer index, got {idx}")


def width_functions(nbytes: int):
    """``(vload, vsplat)`` for vectors of ``nbytes`` bytes (32 or 64): the two functions
    whose result width is not given by a vector argument."""

    @intrinsic
    def vload(typingctx, arr, idx):
        """``arr[idx : idx + lanes]`` as a vector (no alignment needed)."""
        _check_array(arr, idx)
        vt = Vec(arr.dtype, nbytes * 8 // arr.dtype.bitwidth)

        def codegen(context, builder, sig, args):
            vptr = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], vt)
            return builder.load(vptr, align=arr.dtype.bitwidth // 8)
        return vt(arr, idx), codegen

    @intrinsic
    def vsplat(typingctx, x):
        """A vector with ``x`` (a float32 or float64 scalar) in every lane."""
        if x not in (types.float32, types.float64):
            raise errors.TypingError(f"vsplat: expected a float32 or float64 scalar, got {x}")
        vt = Vec(x, nbytes * 8 // x.bitwidth)

        def codegen(context, builder, sig, args):
            llty = context.get_value_type(vt)
            one = builder.insert_element(ir.Constant(llty, ir.Undefined), args[0], ir.IntType(32)(0))
            mask = ir.Constant(ir.VectorType(ir.IntType(32), vt.lanes), [0] * vt.lanes)
            return builder.shuffle_vector(one, ir.Constant(llty, ir.Undefined), mask)
        return vt(x), codegen

    return vload, vsplat


vload, vsplat = width_functions(VECTOR_BYTES)


@intrinsic
def vstore(typingctx, arr, idx, v):
    """``arr[idx : idx + lanes] = v``."""
    _check_array(arr, idx, write=True)
    if not (isinstance(v, Vec) and v.dtype == arr.dtype):
        raise errors.TypingError(f"vstore: expected a Vec of {arr.dtype}, got {v}")

    def codegen(context, builder, sig, args):
        vptr = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], v)
        builder.store(args[2], vptr, align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.void(arr, idx, v), codegen


def _same_vecs(*vs):
    if not (isinstance(vs[0], Vec) and all(v == vs[0] for v in vs)):
        raise errors.TypingError(f"expected vectors of one type, got {vs}")


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` lane by lane (LLVM ``fmuladd``: fused where the CPU has FMA)."""
    _same_vecs(a, b, c)

    def codegen(context, builder, sig, args):
        llty = context.get_value_type(a)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(llty, [llty] * 3), f"llvm.fmuladd.{_suffix(a)}")
        return builder.call(fn, args)
    return a(a, b, c), codegen


def _binary(op, doc):
    def impl(typingctx, a, b):
        _same_vecs(a, b)

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])
        return a(a, b), codegen
    impl.__doc__ = doc
    return intrinsic(impl)


vadd = _binary("fadd", "``a + b`` lane by lane.")
vsub = _binary("fsub", "``a - b`` lane by lane.")
vmul = _binary("fmul", "``a * b`` lane by lane.")


@intrinsic
def vrelu(typingctx, v):
    """``max(v, 0)`` lane by lane with numba's scalar ``max(z, 0.0)`` semantics: NaN and
    -0.0 pass through (``0 if v < 0 else v``)."""
    if not isinstance(v, Vec):
        raise errors.TypingError(f"vrelu: expected a Vec, got {v}")

    def codegen(context, builder, sig, args):
        zero = ir.Constant(context.get_value_type(v), None)
        return builder.select(builder.fcmp_ordered("<", args[0], zero), zero, args[0])
    return v(v), codegen


@intrinsic
def vrelu_grad(typingctx, g, a):
    """``g`` in the lanes where ``a > 0``, else 0: relu's delta ``dL/dz = dL/da relu'(z)``
    from its output ``a`` (``z > 0`` exactly where ``a > 0``), as one compare and blend.

    Written back over ``g``, a plain select (or the scalar ``g * (1.0 if a > 0 else
    0.0)``) is what LLVM turns into a masked store of the zeros (``vmaskmovps``), which a
    Zen 3 runs at 0.6-0.9 ns per element; this one stays a compare, a blend and a store."""
    if not (isinstance(g, Vec) and g == a):
        raise errors.TypingError(f"vrelu_grad: expected two Vecs of one type, got {g}, {a}")

    def codegen(context, builder, sig, args):
        vt = context.get_value_type(g)
        zero = ir.Constant(vt, None)
        # an empty inline asm hides that the kept value was loaded from the address the
        # result is stored to: LLVM's DAG combine of store(select(c, load p, 0), p) into a
        # masked store (LLVM PR 145176) cannot match; it costs no instruction. A register
        # operand must be a legal vector type of the target: 512-bit ones only where LLVM
        # uses zmm (smallchains._cpu), otherwise the value passes in 256-bit halves.
        bits = g.lanes * g.dtype.bitwidth
        if bits <= 256 or _cpu.PREFER_512:
            kept = builder.asm(ir.FunctionType(vt, [vt]), "", "=v,0" if bits > 256 else "=x,0",
                               [args[0]], False)
        else:
            n = 256 // g.dtype.bitwidth
            parts = []
            for k in range(0, g.lanes, n):
                half = _shuffle(builder, args[0], args[0], list(range(k, k + n)))
                ht = half.type
                parts.append(builder.asm(ir.FunctionType(ht, [ht]), "", "=x,0", [half], False))
            while len(parts) > 1:
                m = parts[0].type.count
                parts = [_shuffle(builder, parts[i], parts[i + 1], list(range(2 * m)))
                         for i in range(0, len(parts), 2)]
            kept = parts[0]
        return builder.select(builder.fcmp_ordered(">", args[1], zero), kept, zero)
    return g(g, a), codegen


@intrinsic
def vsum(typingctx, v):
    """The sum of the lanes of ``v`` (a scalar), by halving: log2(lanes) shuffle + add."""
    if not isinstance(v, Vec):
        raise errors.TypingError(f"vsum: expected a Vec, got {v}")

    def codegen(context, builder, sig, args):
        x, n = args[0], v.lanes
        while n > 1:
            n //= 2
            x = builder.fadd(_shuffle(builder, x, x, list(range(n))),
                             _shuffle(builder, x, x, list(range(n, 2 * n))))
        return builder.extract_element(x, ir.IntType(32)(0))
    return v.dtype(v), codegen


def _suffix(v):
    return f"v{v.lanes}f{v.dtype.bitwidth}"


def _shuffle(builder, a, b, idx):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), len(idx)), idx))


@intrinsic
def vsum8(typingctx, c0, c1, c2, c3, c4, c5, c6, c7):
    """The 8-lane vector whose lane ``k`` is the sum of the lanes of ``ck`` (vectors of 8 or
    more lanes; wider ones are first folded to 8 by adding halves): 8 horizontal sums in
    one transposing tree of 7 adds and 14 shuffles, 3 levels deep (8 separate horizontal
    sums take 7 instructions each)."""
    _same_vecs(c0, c1, c2, c3, c4, c5, c6, c7)
    if c0.lanes < 8 or c0.lanes & (c0.lanes - 1):
        raise errors.TypingError(f"vsum8 needs vectors of 8, 16, ... lanes, got {c0}")
    out = Vec(c0.dtype, 8)

    def codegen(context, builder, sig, args):
        def hadd(a, b):
            # [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7] (vhaddps' order)
            return builder.fadd(_shuffle(builder, a, b, [0, 2, 8, 10, 4, 6, 12, 14]),
                                _shuffle(builder, a, b, [1, 3, 9, 11, 5, 7, 13, 15]))
        c = _fold(builder, args, 8)
        h0 = hadd(hadd(c[0], c[1]), hadd(c[2], c[3]))  # c0..c3 halves
        h1 = hadd(hadd(c[4], c[5]), hadd(c[6], c[7]))  # c4..c7 halves
        lo = _shuffle(builder, h0, h1, [0, 1, 2, 3, 8, 9, 10, 11])
        hi = _shuffle(builder, h0, h1, [4, 5, 6, 7, 12, 13, 14, 15])
        return builder.fadd(lo, hi)
    return out(c0, c1, c2, c3, c4, c5, c6, c7), codegen


def _fold(builder, vs, n):
    """Each vector of ``vs`` folded to ``n`` lanes by adding its halves (one shuffle pair and
    add per halving: 16 -> 8 lanes is one ``vextractf64x4`` and one add)."""
    out = []
    for v in vs:
        m = v.type.count
        while m > n:
            m //= 2
            v = builder.fadd(_shuffle(builder, v, v, list(range(m))),
                             _shuffle(builder, v, v, list(range(m, 2 * m))))
        out.append(v)
    return out


@intrinsic
def vsum4(typingctx, c0, c1, c2, c3):
    """The 4-lane vector whose lane ``k`` is the sum of the lanes of ``ck`` (vectors of 4 or
    more lanes, wider ones first folded to 4): one transposing tree of 3 adds and 6
    shuffles."""
    _same_vecs(c0, c1, c2, c3)
    if c0.lanes < 4 or c0.lanes & (c0.lanes - 1):
        raise errors.TypingError(f"vsum4 needs vectors of 4, 8, ... lanes, got {c0}")
    out = Vec(c0.dtype, 4)

    def codegen(context, builder, sig, args):
        def hadd(a, b):
            # [a0+a1, b0+b1, a2+a3, b2+b3] (vhaddpd's order)
            return builder.fadd(_shuffle(builder, a, b, [0, 4, 2, 6]),
                                _shuffle(builder, a, b, [1, 5, 3, 7]))
        c = _fold(builder, args, 4)
        h0, h1 = hadd(c[0], c[1]), hadd(c[2], c[3])
        return builder.fadd(_shuffle(builder, h0, h1, [0, 1, 4, 5]),
                            _shuffle(builder, h0, h1, [2, 3, 6, 7]))
    return out(c0, c1, c2, c3), codegen


@intrinsic(prefer_literal=True)
def vadd_into(typingctx, arr, idx, v, first, count):
    """``arr[idx + k] += v[first + k]`` for ``k < count`` (``first``, ``count`` literal
    ints), as one vector load, add and store of ``count`` lanes."""
    _check_array(arr, idx, write=True)
    if not (isinstance(v, Vec) and v.dtype == arr.dtype):
        raise errors.TypingError(f"vadd_into: expected a Vec of {arr.dtype}, got {v}")
    if not (isinstance(first, types.IntegerLiteral) and isinstance(count, types.IntegerLiteral)):
        raise errors.TypingError("vadd_into: first and count must be literal ints")
    f, n = first.literal_value, count.literal_value
    if not (0 <= f and 0 < n and f + n <= v.lanes):
        raise errors.TypingError(f"vadd_into: lanes {f}..{f + n - 1} not in a {v.lanes}-lane vector")

    def codegen(context, builder, sig, args):
        part = Vec(arr.dtype, n)
        vptr = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], part)
        piece = _shuffle(builder, args[2], args[2], list(range(f, f + n)))
        old = builder.load(vptr, align=arr.dtype.bitwidth // 8)
        builder.store(builder.fadd(old, piece), vptr, align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.void(arr, idx, v, first, count), codegen


@intrinsic
def transpose8(typingctx, arr, src, src_stride, dst, dst_stride):
    """``arr[dst + j * dst_stride + i] = arr[src + i * src_stride + j]`` for ``i, j < 8``
    (the ranges must not overlap): an 8 x 8 block transposed in registers, 8 vector loads
    of 8 lanes, the three-level shuffle network of ``unpcklps`` / ``shufps`` /
    ``vperm2f128`` (24 shuffles) and 8 vector stores, where a scalar copy takes 64 loads
    and 64 stores."""
    _check_array(arr, src, write=True)
    for name, t in (("src_stride", src_stride), ("dst", dst), ("dst_stride", dst_stride)):
        if not isinstance(t, types.Integer):
            raise errors.TypingError(f"transpose8: {name} must be an integer, got {t}")
    vt = Vec(arr.dtype, 8)

    def codegen(context, builder, sig, args):
        a, s0, ss, d0, ds = args
        aty = sig.args[0]

        def at(base, bty, stride, sty, k):
            i = builder.add(context.cast(builder, base, bty, types.intp),
                            builder.mul(context.cast(builder, stride, sty, types.intp),
                                        context.get_constant(types.intp, k)))
            return _vec_ptr(context, builder, aty, a, i, types.intp, vt)

        align = aty.dtype.bitwidth // 8
        r = [builder.load(at(s0, sig.args[1], ss, sig.args[2], k), align=align) for k in range(8)]
        t = []
        for k in range(0, 8, 2):  # rows 2k, 2k+1 interleaved (within 128-bit halves)
            t += [_shuffle(builder, r[k], r[k + 1], [0, 8, 1, 9, 4, 12, 5, 13]),
                  _shuffle(builder, r[k], r[k + 1], [2, 10, 3, 11, 6, 14, 7, 15])]
        u = []
        for k in (0, 4):  # pairs of 64 bits: columns j, j + 4 of 4 rows
            for a_, b_ in ((t[k], t[k + 2]), (t[k + 1], t[k + 3])):
                u += [_shuffle(builder, a_, b_, [0, 1, 8, 9, 4, 5, 12, 13]),
                      _shuffle(builder, a_, b_, [2, 3, 10, 11, 6, 7, 14, 15])]
        # u[0..3]: columns 0..3 (and 4..7) of rows 0-3; u[4..7]: the same of rows 4-7
        for j in range(4):
            lo = _shuffle(builder, u[j], u[j + 4], [0, 1, 2, 3, 8, 9, 10, 11])
            hi = _shuffle(builder, u[j], u[j + 4], [4, 5, 6, 7, 12, 13, 14, 15])
            builder.store(lo, at(d0, sig.args[3], ds, sig.args[4], j), align=align)
            builder.store(hi, at(d0, sig.args[3], ds, sig.args[4], j + 4), align=align)
        return context.get_dummy_value()
    return types.void(arr, src, src_stride, dst, dst_stride), codegen
