"""Dropout: inverted dropout in training mode, the identity in inference.

Training mode keeps each unit with probability ``1 - rate`` and scales the kept ones by
``1 / (1 - rate)`` (Srivastava et al., "Dropout: a simple way to prevent neural networks
from overfitting", JMLR 15, 2014; the "inverted" scaling of ``torch.nn.Dropout``), so
inference needs no rescaling. The mask is a pure function of (seed, step, dataset row,
layer index, unit) drawn from Philox4x32-10 (:mod:`smallchains.philox`): the forward step
(:func:`dropout_apply` from the input block to the output block) and the pullback
(:func:`dropout_apply` from ``dL/dy`` to ``dL/dx``) compute it independently, nothing is
stored. The reference code (``kernels="reference"``) is :func:`dropout_apply_reference`:
one generator call per unit instead of one per four.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
from numba import njit

from .._config import INLINE_OPTIONS
from .._validate import check_real
from ..philox import keep_threshold, philox4x32_10
from .base import EmitContext, Layer

_LO = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


@njit(**INLINE_OPTIONS)
def dropout_apply(work, src, dst, n_feat, B, meta, layer, thr, scale):
    """``work[dst + f*B + s] = work[src + f*B + s] * scale`` where unit ``f`` of lane ``s``
    is kept, 0 where dropped, for the ``n_feat`` features of a block of ``B`` lanes.

    Keep test: word ``f % 4`` of ``philox4x32_10(meta[1], meta[3 + s], layer, f // 4,
    key_lo, key_hi) < thr`` with ``key = meta[0]``; one generator call gives four units."""
    key = np.uint64(meta[0])
    k0, k1 = key & _LO, key >> _S32
    t, lay = np.uint64(meta[1]), np.uint64(layer)
    zero = scale * 0
    for q in range((n_feat + 3) // 4):
        f = 4 * q
        m = min(4, n_feat - f)
        for s in range(B):
            w = philox4x32_10(t, np.uint64(meta[3 + s]), lay, np.uint64(q), k0, k1)
            for j in range(m):
                i = (f + j) * B + s
                work[dst + i] = work[src + i] * (scale if w[j] < thr else zero)


@njit(**INLINE_OPTIONS)
def dropout_apply_reference(work, src, dst, n_feat, B, meta, layer, thr, scale):
    """:func:`dropout_apply` as the plainest code: one generator call per unit."""
    for f in range(n_feat):
        for s in range(B):
            key = np.uint64(meta[0])
            w = philox4x32_10(np.uint64(meta[1]), np.uint64(meta[3 + s]), np.uint64(layer),
                              np.uint64(f // 4), key & _LO, key >> _S32)
            keep = w[f % 4] < thr
            x = work[src + f * B + s]
            work[dst + f * B + s] = x * scale if keep else x * 0


@dataclass(frozen=True, init=False)
class Dropout(Layer):
    """Inverted dropout: in training mode each unit of each sample is kept with
    probability ``1 - rate`` and scaled by ``1 / (1 - rate)``, else set to 0; in inference
    the identity. ``torch.nn.Dropout(p=rate)`` semantics.

    Any input shape; output the same shape; no parameters. The mask of a sample depends
    only on ``(seed, step, row, layer index, unit)`` (see docs/api.md, "Modes and random
    numbers"; :func:`smallchains.philox.dropout_keep` computes it in Python).

    Parameters
    ----------
    rate : float in ``[0, 1)``
        Probability of dropping a unit (torch's ``p``). ``rate = 0`` keeps everything
        (then training and inference agree).

    Raises
    ------
    TypeError, ValueError
        ``rate`` not a real number in ``[0, 1)``.
    """

    rate: float
    kernel_imports = {"smallchains.layers.dropout": ("dropout_apply", "dropout_apply_reference")}
    small_blocks = True

    def __init__(self, rate):
        object.__setattr__(self, "rate", check_real("Dropout", "rate", rate, 0.0, 1.0))

    def __repr__(self) -> str:
        return f"Dropout({self.rate!r})"

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def _emit(self, ctx: EmitContext, src, dst, fn):
        n = prod(ctx.in_shape)
        if not ctx.training or self.rate == 0.0:
            return [f"for i in range({n * ctx.B}):",
                    f"    work[{dst} + i] = work[{src} + i]"]
        scale = repr(1.0 / (1.0 - self.rate))
        return [f"{fn}(work, {src}, {dst}, {n}, {ctx.B}, meta, {ctx.layer_index}, "
                f"np.uint64({keep_threshold(self.rate)}), {ctx.dt}({scale}))"]

    def emit_forward(self, ctx):
        return self._emit(ctx, ctx.in_off, ctx.out_off, "dropout_apply")

    def emit_pullback(self, ctx):
        return self._emit(ctx, ctx.gout_off, ctx.gin_off, "dropout_apply") if ctx.need_gin else []

    def emit_forward_reference(self, ctx):
        return self._emit(ctx, ctx.in_off, ctx.out_off, "dropout_apply_reference")

    def emit_pullback_reference(self, ctx):
        return (self._emit(ctx, ctx.gout_off, ctx.gin_off, "dropout_apply_reference")
                if ctx.need_gin else [])
