"""The explicit vectors of :mod:`smallchains._simd` at 64 bytes (AVX-512 zmm registers:
16 float32 or 8 float64 lanes), under the same names.

The kernels tuned for 32 vector registers import their vector functions from here
instead of :mod:`smallchains._simd` (see :func:`smallchains._simd.vector_bytes`); the
emitted code is the same. Only ``vload`` and ``vsplat`` differ: every other function takes
its width from its vector arguments.
"""
from __future__ import annotations

from ._simd import (Vec, vadd, vadd_into, vfma, vmul, vrelu, vrelu_grad, vstore, vsub, vsum,  # noqa: F401
                    vsum4, vsum8, width_functions)

VECTOR_BYTES = 64

vload, vsplat = width_functions(VECTOR_BYTES)

__all__ = ["VECTOR_BYTES", "Vec", "vload", "vstore", "vsplat", "vfma", "vadd", "vsub", "vmul",
           "vrelu", "vrelu_grad", "vsum", "vsum4", "vsum8", "vadd_into"]
