"""Layers: one module per family; each holds the layer class and its numba kernels.

* :mod:`.dense` -- :class:`TurboDense` (alias :class:`Dense`): code emitted by
  ``emit_affine`` (forward) and ``emit_affine_pullback`` (pullback).
* :mod:`.conv` -- :class:`Conv`, :class:`MaxPool`, :class:`Flatten` over NCHW images.
* :mod:`.batchnorm` -- :class:`BatchNorm` (batch statistics across threads).
* :mod:`.recurrent` -- :class:`GRU`, :class:`LSTM` (sequences ``(T, F)``) and
  :class:`TimeDistributed`.
* :mod:`.dropout` -- :class:`Dropout` (training mode only; masks from :mod:`smallchains.philox`).
"""

from .base import EmitContext, Layer
from .batchnorm import BatchNorm
from .conv import Conv, Flatten, MaxPool
from .dense import Dense, TurboDense
from .dropout import Dropout
from .recurrent import GRU, LSTM, TimeDistributed

__all__ = ["BatchNorm", "Conv", "Dense", "Dropout", "EmitContext", "Flatten", "GRU", "LSTM", "Layer",
           "MaxPool", "TimeDistributed", "TurboDense"]
