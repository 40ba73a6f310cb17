"""Layers: one module per family; each holds the layer class and its numba kernels.

* :mod:`.dense` -- :class:`TurboDense` (alias :class:`Dense`): code emitted by
  ``emit_affine`` (forward) and ``emit_affine_pullback`` (pullback).
* :mod:`.conv` -- :class:`Conv`, :class:`MaxPool`, :class:`Flatten` over NCHW images.
* :mod:`.batchnorm` -- :class:`BatchNorm` (batch statistics across threads).
* :mod:`.recurrent` -- :class:`GRU`, :class:`LSTM` (sequences ``(T, F)``),
  :class:`TimeDistributed` and :class:`Conv1D`.
* :mod:`.attention` -- :class:`TemporalPatternAttention` (TPA-LSTM's attention).
* :mod:`.branches` -- :class:`Parallel`, :class:`SkipConnection` (containers of branches).
* :mod:`.shape` -- :class:`Reshape`, :class:`Permute`, :class:`Slice` (no parameters).
* :mod:`.dropout` -- :class:`Dropout` (training mode only; masks from :mod:`smallchains.philox`).
"""

from .attention import TemporalPatternAttention
from .base import EmitContext, Layer
from .batchnorm import BatchNorm
from .branches import Parallel, SkipConnection
from .conv import Conv, Flatten, MaxPool
from .dense import Dense, TurboDense
from .dropout import Dropout
from .recurrent import GRU, LSTM, Conv1D, TimeDistributed
from .shape import Permute, Reshape, Slice

__all__ = ["BatchNorm", "Conv", "Conv1D", "Dense", "Dropout", "EmitContext", "Flatten", "GRU", "LSTM", "Layer",
           "MaxPool", "Parallel", "Permute", "Reshape", "SkipConnection", "Slice", "TemporalPatternAttention", "TimeDistributed",
           "TurboDense"]
