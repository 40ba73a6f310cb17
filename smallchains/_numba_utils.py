"""Small numba helpers shared by kernels."""

from __future__ import annotations

from numba import types
from numba.extending import overload


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
