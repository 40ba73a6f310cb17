"""Layers: one module per family; each holds the layer class and its numba kernels.

* :mod:`.dense` -- :class:`TurboDense` (alias :class:`Dense`): ``dense_forward``, ``dense_pullback``.
"""

from .base import EmitContext, Layer
from .dense import Dense, TurboDense

__all__ = ["Dense", "EmitContext", "Layer", "TurboDense"]
