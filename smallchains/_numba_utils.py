"""Small numba helpers shared by kernels."""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload


def like(z, v):
    """Return the Python number ``v`` cast to the floating type of ``z``.

    Inside numba kernels a bare float literal is float64 and would promote float32
    arithmetic to float64 (halving SIMD width); ``like(z, 0.5)`` keeps it float32.
    """
    return type(z)(v)


@overload(like, inline="always")
def _like_impl(z, v):
    if isinstance(z, types.Float):
        ty = z
        return lambda z, v: ty(v)
    return None


@intrinsic
def fetch_add(typingctx, counter, i, v):
    """``old = counter[i]; counter[i] += v; return old`` as one atomic (sequentially
    consistent) operation on a C-contiguous int64 array: threads taking work items from a
    shared counter each get a different one. No bounds check."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64
            and counter.layout == "C" and isinstance(i, types.Integer)
            and isinstance(v, types.Integer)):
        return None
    sig = types.int64(counter, i, v)

    def codegen(context, builder, sig, args):
        aryty, ity, vty = sig.args
        ary = context.make_array(aryty)(context, builder, args[0])
        index = context.cast(builder, args[1], ity, types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [index])
        value = context.cast(builder, args[2], vty, types.int64)
        return builder.atomic_rmw("add", ptr, value, "seq_cst")

    return sig, codegen
