"""BatchNorm: batch normalization over the whole minibatch, torch semantics.

Training mode normalizes each channel with the mean and the biased variance of the
*whole minibatch* (every thread's rows; per channel over samples and, after a
convolution, over H x W), ``y = weight * (x - mean) / sqrt(var + eps) + bias``, and
updates the running statistics in the layer state, ``running = (1 - momentum) *
running + momentum * batch`` with the unbiased variance (``n / (n - 1)``). Inference
normalizes with the running statistics. Ioffe and Szegedy, "Batch normalization" (ICML
2015); ``torch.nn.BatchNorm1d`` / ``BatchNorm2d``.

How the batch statistics cross threads (the staged training step of
:mod:`smallchains.compiler.codegen`, :func:`smallchains.compiler.loops._stages`): a
forward stage per BatchNorm layer runs every thread's blocks up to the layer's input and
accumulates per-channel (count, mean, M2) in the thread's workspace
(:func:`bn_stats`, blocks merged with Chan, Golub and LeVeque's formula); a serial
:func:`bn_combine_stats` merges the threads in fixed order into the batch statistics
(and the running ones). Backward, a stage per layer (last layer first) accumulates
``sum(dy)`` and ``sum(dy * xhat)`` (:func:`bn_grad_stats`, :func:`bn_combine_grads`),
which the input gradient needs. Padding lanes of partial blocks (row -1 in ``meta``) are
left out of every sum and get zero input gradient.

One implementation only (plain loops over channel, position, lane): it is also the
``kernels="reference"`` code.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
from numba import njit

from .._config import INLINE_OPTIONS
from .._validate import check_real
from .base import EmitContext, Layer


@njit(**INLINE_OPTIONS)
def valid_lanes(meta, B):
    """Number of lanes of the block that hold a sample: the range kernels fill lanes
    ``0 .. nb-1`` and mark the rest with row -1 (``set_lane_rows``)."""
    nv = 0
    for s in range(B):
        if meta[3 + s] >= 0:
            nv = s + 1
    return nv


@njit(**INLINE_OPTIONS)
def bn_stats(work, x_off, red, C, S, B, meta):
    """Merge this block's per-channel (count, mean, M2) of the valid lanes into the
    thread's accumulators ``work[red + c]``, ``work[red + C + c]``, ``work[red + 2C + c]``."""
    nv = valid_lanes(meta, B)
    if nv == 0:
        return
    nb = nv * S
    for c in range(C):
        sm = work[red] * 0
        for j in range(S):
            base = x_off + (c * S + j) * B
            for s in range(nv):
                sm += work[base + s]
        mb = sm / nb
        m2 = sm * 0
        for j in range(S):
            base = x_off + (c * S + j) * B
            for s in range(nv):
                d = work[base + s] - mb
                m2 += d * d
        na = work[red + c]
        n = na + nb
        d = mb - work[red + C + c]
        work[red + C + c] += d * nb / n
        work[red + 2 * C + c] += m2 + d * d * na * nb / n
        work[red + c] = n


@njit(**INLINE_OPTIONS)
def bn_combine_stats(works, wsize, red, C, state, scr, rs, momentum, eps, update_running):
    """Merge the threads' (count, mean, M2) in thread order (and, within a thread, of its
    block workspaces of ``wsize`` elements, in block order): the batch mean, 1/std and
    count go to ``state[scr + c]``, ``state[scr + C + c]``, ``state[scr + 4C + c]``; with
    ``update_running`` the running mean and variance at ``state[rs + c]``,
    ``state[rs + C + c]`` move by ``momentum`` toward the batch's (unbiased variance)."""
    for c in range(C):
        n = works[0, red] * 0
        mean = n * 0
        m2 = n * 0
        for k in range(works.shape[0]):
            for o in range(0, works.shape[1] - wsize + 1, wsize):
                nb = works[k, o + red + c]
                if nb == 0:
                    continue
                tot = n + nb
                d = works[k, o + red + C + c] - mean
                mean += d * nb / tot
                m2 += works[k, o + red + 2 * C + c] + d * d * n * nb / tot
                n = tot
        var = m2 / n
        state[scr + c] = mean
        state[scr + C + c] = 1 / np.sqrt(var + eps)
        state[scr + 4 * C + c] = n
        if update_running:
            state[rs + c] = (1 - momentum) * state[rs + c] + momentum * mean
            state[rs + C + c] = ((1 - momentum) * state[rs + C + c]
                                 + momentum * m2 / (n - 1))


@njit(**INLINE_OPTIONS)
def bn_forward(work, x_off, y_off, C, S, B, p, w_off, b_off, state, mean_off, inv_off, eps):
    """``y = weight * (x - mean) * inv + bias`` per channel; ``inv = state[inv_off + c]``
    (training: the batch's 1/std) or, if ``eps >= 0``, ``1 / sqrt(state[inv_off + c] +
    eps)`` (inference: from the running variance)."""
    for c in range(C):
        mean = state[mean_off + c]
        inv = state[inv_off + c] if eps < 0 else 1 / np.sqrt(state[inv_off + c] + eps)
        a = p[w_off + c] * inv
        b = p[b_off + c] - a * mean
        for i in range(S * B):
            work[y_off + c * S * B + i] = a * work[x_off + c * S * B + i] + b


@njit(**INLINE_OPTIONS)
def bn_grad_stats(work, x_off, dy_off, red, C, S, B, state, scr, meta):
    """Add this block's per-channel ``sum(dy)`` and ``sum(dy * xhat)`` (valid lanes) to
    ``work[red + c]`` and ``work[red + C + c]``."""
    nv = valid_lanes(meta, B)
    for c in range(C):
        mean, inv = state[scr + c], state[scr + C + c]
        sd = work[red] * 0
        sdx = sd * 0
        for j in range(S):
            base = (c * S + j) * B
            for s in range(nv):
                dy = work[dy_off + base + s]
                sd += dy
                sdx += dy * (work[x_off + base + s] - mean)  # centred: no cancellation
        work[red + c] += sd
        work[red + C + c] += sdx * inv


@njit(**INLINE_OPTIONS)
def bn_combine_grads(works, wsize, red, C, state, scr):
    """Sum the threads' ``sum(dy)``, ``sum(dy * xhat)`` in thread order; their means over
    the batch go to ``state[scr + 2C + c]``, ``state[scr + 3C + c]``."""
    for c in range(C):
        sd = works[0, red] * 0
        sdx = sd * 0
        for k in range(works.shape[0]):
            for o in range(0, works.shape[1] - wsize + 1, wsize):
                sd += works[k, o + red + c]
                sdx += works[k, o + red + C + c]
        n = state[scr + 4 * C + c]
        state[scr + 2 * C + c] = sd / n
        state[scr + 3 * C + c] = sdx / n


@njit(**INLINE_OPTIONS)
def bn_pullback(work, x_off, dy_off, dx_off, C, S, B, p, g, w_off, b_off, state, mean_off,
                inv_off, eps, scr, meta, need_gin):
    """Add dL/dweight, dL/dbias of the block to ``g``; if ``need_gin`` write dL/dx. Training
    (``eps < 0``): ``dx = weight * inv * (dy - mean(dy) - xhat * mean(dy * xhat))`` with
    the batch means from ``state[scr + 2C + c]``, ``state[scr + 3C + c]``, zero on padding
    lanes; inference: ``dx = weight * inv * dy`` with the running statistics."""
    nv = valid_lanes(meta, B) if eps < 0 else B
    for c in range(C):
        mean = state[mean_off + c]
        inv = state[inv_off + c] if eps < 0 else 1 / np.sqrt(state[inv_off + c] + eps)
        w = p[w_off + c]
        sd = w * 0
        sdx = w * 0
        if eps < 0:
            md, mdx = state[scr + 2 * C + c], state[scr + 3 * C + c]
        else:
            md, mdx = w * 0, w * 0
        a = w * inv
        # dx = a * (dy - md - (x - mean) * inv * mdx) = a * dy + (k0 + k1 * x)
        k1 = -a * inv * mdx
        k0 = -a * md - k1 * mean
        for j in range(S):
            base = (c * S + j) * B
            for s in range(nv):
                dy = work[dy_off + base + s]
                x = work[x_off + base + s]
                sd += dy
                sdx += dy * (x - mean)
                if need_gin:
                    work[dx_off + base + s] = a * dy + k0 + k1 * x
            if need_gin:
                for s in range(nv, B):
                    work[dx_off + base + s] = 0
        g[w_off + c] += sdx * inv
        g[b_off + c] += sd


@dataclass(frozen=True, init=False)
class BatchNorm(Layer):
    """Batch normalization per channel (after :class:`Conv`, input ``(C, H, W)``) or per
    feature (after :class:`TurboDense`, input ``(C,)``): ``torch.nn.BatchNorm2d`` /
    ``BatchNorm1d`` with ``affine=True, track_running_stats=True``.

    Parameters in ``p``: ``weight (C,)`` (initialized 1), ``bias (C,)`` (0). Layer state
    (``sc.init_state``): ``running_mean (C,)`` (0), ``running_var (C,)`` (1), updated
    by ``train_*`` in training mode, read in inference.

    Parameters
    ----------
    momentum : float in ``(0, 1]``, default 0.1
        Weight of the batch statistics in the running estimates (torch's convention).
    eps : float ``> 0``, default 1e-5

    Raises
    ------
    ValueError
        ``momentum`` or ``eps`` out of range; an input that is not ``(C,)`` or ``(C, H, W)``.
    """

    small_blocks = True

    momentum: float
    eps: float
    reduces_batch = True
    kernel_imports = {"smallchains.layers.batchnorm": (
        "bn_forward", "bn_grad_stats", "bn_pullback", "bn_stats")}
    combine_imports = ("bn_combine_grads", "bn_combine_stats")

    def __init__(self, momentum=0.1, eps=1e-5):
        m = check_real("BatchNorm", "momentum", momentum, 0.0, 1.0 + 1e-12, low_open=True)
        object.__setattr__(self, "momentum", min(m, 1.0))
        object.__setattr__(self, "eps", check_real("BatchNorm", "eps", eps, 0.0, low_open=True))

    def __repr__(self) -> str:
        return f"BatchNorm(momentum={self.momentum!r}, eps={self.eps!r})"

    @staticmethod
    def _cs(shape):
        if len(shape) not in (1, 3):
            raise ValueError(f"BatchNorm expects an input of shape (C,) or (C, H, W), got {shape}")
        return shape[0], prod(shape[1:])

    def output_shape(self, input_shape):
        self._cs(input_shape)
        return tuple(input_shape)

    def param_shapes(self, input_shape):
        C, _ = self._cs(input_shape)
        return {"weight": (C,), "bias": (C,)}

    def init_params(self, views, input_shape, rng):
        views["weight"][:] = 1
        views["bias"][:] = 0

    def state_shapes(self, input_shape):
        C, _ = self._cs(input_shape)
        return {"running_mean": (C,), "running_var": (C,)}

    def init_state(self, views, input_shape):
        views["running_mean"][:] = 0
        views["running_var"][:] = 1

    def scratch_size(self, input_shape):
        """State elements for one step's batch statistics (mean, 1/std, mean dy, mean
        dy*xhat, count per channel)."""
        return 5 * input_shape[0]

    def reduce_size(self, input_shape):
        """Per-thread workspace of the partial sums."""
        return 3 * input_shape[0]

    # --- emitted code ----------------------------------------------------------------
    def _where(self, ctx):
        C, S = self._cs(ctx.in_shape)
        if ctx.training:
            return C, S, ctx.scratch_off, ctx.scratch_off + C, "-1.0"
        return C, S, ctx.state_off, ctx.state_off + C, repr(self.eps)

    def emit_forward(self, ctx: EmitContext):
        C, S, mean_off, inv_off, eps = self._where(ctx)
        return [f"bn_forward(work, {ctx.in_off}, {ctx.out_off}, {C}, {S}, {ctx.B}, p, {ctx.p_off}, "
                f"{ctx.p_off + C}, state, {mean_off}, {inv_off}, {eps})"]

    def emit_pullback(self, ctx: EmitContext):
        C, S, mean_off, inv_off, eps = self._where(ctx)
        return [f"bn_pullback(work, {ctx.in_off}, {ctx.gout_off}, {ctx.gin_off}, {C}, {S}, "
                f"{ctx.B}, p, g, {ctx.p_off}, {ctx.p_off + C}, state, {mean_off}, {inv_off}, "
                f"{eps}, {ctx.scratch_off}, meta, {ctx.need_gin})"]

    emit_forward_reference = emit_forward
    emit_pullback_reference = emit_pullback

    def emit_batch_stats(self, ctx: EmitContext):
        C, S = self._cs(ctx.in_shape)
        return [f"bn_stats(work, {ctx.in_off}, {ctx.red_off}, {C}, {S}, {ctx.B}, meta)"]

    def emit_grad_stats(self, ctx: EmitContext):
        C, S = self._cs(ctx.in_shape)
        return [f"bn_grad_stats(work, {ctx.in_off}, {ctx.gout_off}, {ctx.red_off}, {C}, {S}, "
                f"{ctx.B}, state, {ctx.scratch_off}, meta)"]

    def emit_combine_stats(self, ctx: EmitContext):
        C, _ = self._cs(ctx.in_shape)
        return (f"bn_combine_stats(works, {ctx.red_off}, {C}, state, {ctx.scratch_off}, "
                f"{ctx.state_off}, {ctx.dt}({self.momentum!r}), {ctx.dt}({self.eps!r}), "
                "update_running)")

    def emit_combine_grads(self, ctx: EmitContext):
        C, _ = self._cs(ctx.in_shape)
        return f"bn_combine_grads(works, {ctx.red_off}, {C}, state, {ctx.scratch_off})"
