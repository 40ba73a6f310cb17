"""Class probabilities from logits: :func:`softmax` and :func:`predict_proba`.

Plain numpy on the output of a chain's forward pass; nothing here is compiled. The
chain itself is evaluated by :meth:`SimpleChain.__call__` (its compiled forward kernel).
"""

from __future__ import annotations

import numpy as np

from .chain import SimpleChain, remove_loss

__all__ = ["log_softmax", "softmax", "predict_proba"]


def _float_array(x, name, fn):
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"{fn}: {name} must be a float array, got dtype {x.dtype}"
                        + ("; cast it with .astype(np.float64)" if x.dtype.kind in "iub" else ""))
    return x


def _axis_of(x, axis, fn):
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{fn}: axis must be an int, got {type(axis).__name__} {axis!r}")
    if x.ndim == 0:
        raise ValueError(f"{fn}: logits must have at least one dimension, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{fn}: axis {axis} is out of range for an array of {x.ndim} dimension(s)")
    axis = int(axis) % x.ndim
    if x.shape[axis] == 0:
        raise ValueError(f"{fn}: axis {axis} of logits has length 0 (no classes)")
    return axis


def log_softmax(logits, axis=-1) -> np.ndarray:
    """``logits - logsumexp(logits)`` along ``axis``, computed stably (the maximum is
    subtracted first), in the dtype of ``logits``.

    Same arguments, errors and non-finite behaviour as :func:`softmax`.
    """
    x = _float_array(logits, "logits", "log_softmax")
    axis = _axis_of(x, axis, "log_softmax")
    m = np.max(x, axis=axis, keepdims=True)
    shifted = x - m  # its maximum is 0, so the sum below is >= 1: log never sees 0
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(logits, axis=-1) -> np.ndarray:
    """Softmax of ``logits`` along ``axis``: ``exp(x - max) / sum(exp(x - max))``.

    Numerically stable: the maximum along ``axis`` is subtracted before ``exp``, so large
    logits (``1e4`` in float32 too) neither overflow nor lose the result.

    Parameters
    ----------
    logits : array_like, any float dtype (float16, float32, float64, longdouble), any shape
        with at least one dimension.
    axis : int, default -1
        The class axis (negative counts from the end).

    Returns
    -------
    ndarray, the shape and dtype of ``logits`` (a new array)
        Non-negative; sums to 1 along ``axis`` up to rounding. ``-inf`` logits get
        probability 0. A slice containing NaN or ``+inf``, or holding only ``-inf``,
        comes out NaN.

    Raises
    ------
    TypeError
        ``logits`` is not a float array (integers, bools, complex, objects), or ``axis``
        is not an int.
    ValueError
        ``logits`` is a scalar, ``axis`` is out of range, or the axis has length 0.
    """
    x = _float_array(logits, "logits", "softmax")
    axis = _axis_of(x, axis, "softmax")
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def predict_proba(chain_or_model, X, p, *, state=None) -> np.ndarray:
    """Class probabilities of a classifier: the softmax of the chain's logits.

    Parameters
    ----------
    chain_or_model : SimpleChain or SimpleChainWithLoss
        A chain whose output is 1-D: ``n_classes >= 2`` logits per sample (the chain
        of a model is used; its loss and targets are ignored).
    X : ndarray, shape ``(N, *input_shape)`` (or one sample ``input_shape``), float
        Converted to ``p.dtype`` (one copy) if needed.
    p : ndarray, shape ``(n_params,)``, float32 or float64
    state : ndarray, keyword-only -- the layer state (:func:`~smallchains.init_state`),
        required by chains with BatchNorm.

    Returns
    -------
    ndarray, shape ``(N, n_classes)`` (``(n_classes,)`` for a single sample), ``p.dtype``
        Each row sums to 1 up to rounding; ``argmax`` of a row is the predicted class (the
        largest logit, as in :func:`~smallchains.accuracy_and_loss`).

    Raises
    ------
    TypeError
        ``chain_or_model`` is neither a chain nor a model; bad dtypes of ``X`` or ``p``.
    ValueError
        The chain's output is not 1-D logits (e.g. ``(C, H, W)`` feature maps: end the
        chain with ``Flatten()`` and a ``TurboDense(n_classes)``), or it has a single
        output (its softmax is always 1); bad shapes, NaN or Inf in ``X``.
    """
    chain = remove_loss(chain_or_model)
    if not isinstance(chain, SimpleChain):
        raise TypeError(f"predict_proba: expected a SimpleChain or a model from add_loss, got "
                        f"{type(chain_or_model).__name__}")
    shape = chain.output_shape
    if len(shape) != 1:
        raise ValueError(f"predict_proba needs a chain whose output is 1-D logits per sample, "
                         f"got output shape {shape}; end the chain with Flatten() and "
                         "TurboDense(n_classes)")
    if shape[0] < 2:
        raise ValueError("predict_proba needs at least 2 classes: the chain has 1 output, whose "
                         "softmax is always 1 (for one binary logit use a sigmoid)")
    return softmax(chain(X, p, state=state), axis=-1)
