"""Losses attached to a chain with :func:`smallchains.add_loss`.

Every loss is a mean over the samples of a batch (``N`` samples):

* :class:`SquaredLoss`: ``(1/N) * sum_{n,j} (yhat[n,j] - y[n,j])**2``. Equal to
  ``n_out * torch.nn.MSELoss()(yhat, y)`` (torch averages over outputs too), and to
  ``torch.nn.MSELoss(reduction="sum")(yhat, y) / N``. SimpleChains.jl's ``SquaredLoss``
  sums the squares; its training divides by the batch size, which is what we return.
* :class:`AbsoluteLoss`: ``(1/N) * sum_{n,j} |yhat[n,j] - y[n,j]|``.
* :class:`MSELoss`: ``(1/(N n_out)) * sum (yhat - y)**2``, torch's ``nn.MSELoss()``.
* :class:`BinaryLogitCrossEntropyLoss`: the mean over all outputs of the binary
  cross-entropy of ``sigmoid(yhat)``, torch's ``nn.BCEWithLogitsLoss()``.
* :class:`LogitCrossEntropyLoss`: ``(1/N) * sum_n -log softmax(yhat[n])[label[n]]`` with
  0-based integer labels (SimpleChains.jl uses 1-based ``UInt32``); equal to
  ``torch.nn.functional.cross_entropy(yhat, labels)``.

Each loss's block kernel writes ``dL/dyhat`` (already divided by ``N``) into the workspace
and returns the *unscaled* sum for the block.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._config import INLINE_OPTIONS
from ._numba_utils import like
from .compiler.runtime import load_block


def _writeable(a):
    # read-only arrays would make numba compile a second specialization of every kernel
    return a if a.flags.writeable else a.copy()


class Loss:
    """Base class. ``targets`` holds ``y`` (or labels) for all samples, batch-first."""

    #: key into :data:`LOSS_KERNELS`; custom losses need a block kernel registered there.
    kind: str = ""
    #: True if targets are class labels (integers), False if they are float arrays.
    labels: bool = False

    def __init__(self, targets):
        self._raw = targets
        self.targets = targets

    def __repr__(self) -> str:
        shape = getattr(self.targets, "shape", None)
        return f"{type(self).__name__}(<targets {shape}>)"

    def with_targets(self, targets) -> "Loss":
        """The same loss with other targets (for example a test set)."""
        return type(self)(targets)

    def prepare_targets(self, out_shape: tuple, n: int, dtype, targets=None) -> np.ndarray:
        """Validate targets against the chain output and return a kernel-ready array.

        Never modifies the caller's array: a dtype conversion makes a copy.

        Raises
        ------
        ValueError, TypeError
            Wrong shape, length ``!= n``, non-numeric dtype, non-finite values.
        """
        y = self.targets if targets is None else targets
        y = np.asarray(y)
        if y.dtype.kind not in "fiu" or y.dtype.kind == "b":
            raise TypeError(f"{type(self).__name__}: targets must be a float array, got dtype {y.dtype}")
        n_out = int(np.prod(out_shape))
        if y.ndim == 1 and n_out == 1:
            y = y.reshape(-1, 1)
        if y.ndim < 1 or y.shape[0] != n:
            raise ValueError(
                f"{type(self).__name__}: targets have {y.shape[0] if y.ndim else 0} samples "
                f"but X has {n}; expected shape ({n}, {', '.join(map(str, out_shape))})"
            )
        if tuple(y.shape[1:]) != tuple(out_shape) and not (y.ndim == 2 and y.shape[1] == n_out):
            raise ValueError(
                f"{type(self).__name__}: targets must have shape (N, {', '.join(map(str, out_shape))}) "
                f"to match the chain output, got {y.shape}"
            )
        y = y.reshape(n, n_out)
        if not np.isfinite(y).all():
            raise ValueError(f"{type(self).__name__}: targets contain NaN or Inf")
        if y.dtype.itemsize > np.dtype(dtype).itemsize and np.abs(y).max() > np.finfo(dtype).max:
            raise ValueError(f"{type(self).__name__}: targets exceed the {np.dtype(dtype)} range")
        return _writeable(np.ascontiguousarray(y, dtype=dtype))


class SquaredLoss(Loss):
    """Mean over samples of the summed squared error, ``(1/N) sum (yhat - y)^2``.

    Parameters
    ----------
    targets : array_like, shape ``(N, *output_shape)``, float
        Targets ``y``; converted (copied) to the parameter dtype when used.
    """

    kind = "squared"


class AbsoluteLoss(Loss):
    """Mean over samples of the summed absolute error, ``(1/N) sum |yhat - y|``.

    The derivative at ``yhat == y`` is taken as 0.
    """

    kind = "absolute"


class MSELoss(Loss):
    """Mean squared error over every output of every sample, torch's ``nn.MSELoss()``:
    ``(1/(N * n_out)) sum (yhat - y)^2`` (``SquaredLoss`` divided by the output size).

    Parameters
    ----------
    targets : array_like, shape ``(N, *output_shape)``, float
    """

    kind = "mse"


class BinaryLogitCrossEntropyLoss(Loss):
    """Binary cross-entropy on logits, torch's ``nn.BCEWithLogitsLoss()``: the mean over
    every output of every sample of ``max(z, 0) - z y + log(1 + exp(-|z|))`` (the stable
    form of ``-y log sigmoid(z) - (1 - y) log(1 - sigmoid(z))``); gradient
    ``(sigmoid(z) - y) / (N * n_out)``.

    Parameters
    ----------
    targets : array_like, shape ``(N, *output_shape)``, float
        Probabilities in ``[0, 1]`` (0/1 labels, or soft targets); others raise ValueError.
    """

    kind = "bce_logits"

    def prepare_targets(self, out_shape, n, dtype, targets=None):
        y = super().prepare_targets(out_shape, n, dtype, targets)
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(f"BinaryLogitCrossEntropyLoss: targets must lie in [0, 1], got range "
                             f"[{y.min()}, {y.max()}]")
        return y


class LogitCrossEntropyLoss(Loss):
    """Softmax cross-entropy on logits with 0-based integer class labels.

    Parameters
    ----------
    labels : array_like of int, shape ``(N,)``
        Class of each sample, in ``[0, n_classes)`` where ``n_classes`` is the chain's
        output width. Float labels raise ``TypeError``; out-of-range labels ``ValueError``.
    """

    kind = "logitce"
    labels = True

    def prepare_targets(self, out_shape, n, dtype, targets=None):
        y = np.asarray(self.targets if targets is None else targets)
        if y.dtype.kind not in "iu":
            raise TypeError(f"LogitCrossEntropyLoss: labels must be integers, got dtype {y.dtype}")
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"LogitCrossEntropyLoss: labels must have shape ({n},), got {y.shape}")
        if len(out_shape) != 1:
            raise ValueError(f"LogitCrossEntropyLoss: chain output must be 1-D logits, got {out_shape}")
        k = out_shape[0]
        if n and (y.min() < 0 or y.max() >= k):
            raise ValueError(
                f"LogitCrossEntropyLoss: labels must lie in [0, {k}) (0-based), "
                f"got range [{y.min()}, {y.max()}]"
            )
        return _writeable(np.ascontiguousarray(y, dtype=np.int64))


#: loss kind -> block kernel name; every generated chain module has valgrad and training
#: kernels for each kind (compiled lazily, on first use).
LOSS_KERNELS = {
    "squared": "squared_loss_block",
    "absolute": "absolute_loss_block",
    "logitce": "logit_crossentropy_block",
    "mse": "mse_loss_block",
    "bce_logits": "bce_logits_block",
}


# --- block kernels ----------------------------------------------------------------------
# Inlined into the generated kernels (numba IR inlining): the kernels pass literal offsets,
# so separately compiled copies were per chain anyway (docs/internals.md).
# Signature: (work, y_off, gy_off, T, idx, s0, n_out, B, nb, scale, need_grad) -> sum
# yhat for sample s of the block (global row idx[s0 + s]) is work[y_off + j * B + s].
# Lanes nb..B-1 of a partial block are padding: their gradient is set to zero.
# The gradient area gy_off.. is scratch for these kernels: it is overwritten even when
# need_grad is False (squared and absolute loss gather the targets there first).


@njit(**INLINE_OPTIONS)
def _zero_padding(work, gy_off, n_out, B, nb):
    for j in range(n_out):
        for s in range(nb, B):
            work[gy_off + j * B + s] = 0


# Squared and absolute loss first gather the block's targets into the gradient area with
# load_block (feature-major like yhat; padding lanes zeroed), so the per-output loops run
# over contiguous lanes and vectorize. Gathering T[idx[s0 + s], j] inside them did not:
# matexp's loss took 51 us per epoch of 10,000 samples (Zen 3, 1 thread).


@njit(**INLINE_OPTIONS)
def squared_loss_block(work, y_off, gy_off, T, idx, s0, n_out, B, nb, scale, need_grad):
    load_block(T, idx, s0, nb, work, gy_off, n_out, B)
    total = like(scale, 0.0)
    two_scale = like(scale, 2.0) * scale
    for j in range(n_out):
        yj, gj = y_off + j * B, gy_off + j * B
        for s in range(nb):
            d = work[yj + s] - work[gj + s]
            total += d * d
            if need_grad:
                work[gj + s] = two_scale * d
    return total


@njit(**INLINE_OPTIONS)
def absolute_loss_block(work, y_off, gy_off, T, idx, s0, n_out, B, nb, scale, need_grad):
    load_block(T, idx, s0, nb, work, gy_off, n_out, B)
    total = like(scale, 0.0)
    zero = like(scale, 0.0)
    for j in range(n_out):
        yj, gj = y_off + j * B, gy_off + j * B
        for s in range(nb):
            d = work[yj + s] - work[gj + s]
            total += abs(d)
            work[gj + s] = scale if d > zero else (-scale if d < zero else zero)
    return total


@njit(**INLINE_OPTIONS)
def mse_loss_block(work, y_off, gy_off, T, idx, s0, n_out, B, nb, scale, need_grad):
    per_out = like(scale, 1.0 / n_out)  # SquaredLoss divided by the output size
    return squared_loss_block(work, y_off, gy_off, T, idx, s0, n_out, B, nb, scale * per_out,
                              need_grad) * per_out


@njit(**INLINE_OPTIONS)
def bce_logits_block(work, y_off, gy_off, T, idx, s0, n_out, B, nb, scale, need_grad):
    load_block(T, idx, s0, nb, work, gy_off, n_out, B)
    total = like(scale, 0.0)
    zero, one = like(scale, 0.0), like(scale, 1.0)
    per_out = like(scale, 1.0 / n_out)
    g_scale = scale * per_out
    for j in range(n_out):
        yj, gj = y_off + j * B, gy_off + j * B
        for s in range(nb):
            z, y = work[yj + s], work[gj + s]
            e = math.exp(-abs(z))
            total += max(z, zero) - z * y + math.log1p(e)
            if need_grad:
                # sigmoid(z) from e = exp(-|z|), without overflow for either sign
                sig = one / (one + e) if z >= zero else e / (one + e)
                work[gj + s] = g_scale * (sig - y)
    return total * per_out


@njit(**INLINE_OPTIONS)
def logit_crossentropy_block(work, y_off, gy_off, T, idx, s0, n_out, B, nb, scale, need_grad):
    total = like(scale, 0.0)
    for s in range(nb):
        label = T[idx[s0 + s]]
        m = work[y_off + s]
        for j in range(1, n_out):
            m = max(m, work[y_off + j * B + s])
        z = like(scale, 0.0)
        for j in range(n_out):
            z += math.exp(work[y_off + j * B + s] - m)
        lse = m + math.log(z)
        total += lse - work[y_off + label * B + s]
        if need_grad:
            for j in range(n_out):
                q = math.exp(work[y_off + j * B + s] - lse)
                work[gy_off + j * B + s] = scale * (q - (like(scale, 1.0) if j == label else like(scale, 0.0)))
    if need_grad and nb < B:
        _zero_padding(work, gy_off, n_out, B, nb)
    return total
