"""Gradients and training loops: validate and allocate in Python, loop in numba.

SimpleChains.jl counterparts: ``valgrad!``, ``alloc_threaded_grad``, ``train_unbatched!``,
``train_batched!`` (src/optimize.jl). Per-thread gradient rows ``G[t, :]`` are summed in
fixed order, so results are deterministic for a fixed thread count.
"""

from __future__ import annotations

import numba
import numpy as np

from .compiler import loops
from .compiler.linking import Deferred
from .compiler.runtime import aligned_zeros
from ._validate import check_dtype, check_inputs, check_params
from .chain import SimpleChainWithLoss, remove_loss
from .optim import Optimizer


def _prepare(model, X, p, targets=None):
    chain, loss = model.chain, model.loss
    X2, _ = check_inputs(chain.input_shape, X, p.dtype, allow_single=False)
    T = loss.prepare_targets(chain.output_shape, X2.shape[0], p.dtype, targets)
    mod, plan = chain._kernels(p.dtype)
    return X2, T, mod, plan


def _check_model(model):
    if not isinstance(model, SimpleChainWithLoss):
        raise TypeError(
            f"expected a model with a loss (sc.add_loss(chain, loss)), got {type(model).__name__}")


def _check_out(out, p, name="out"):
    if out is None:
        return np.empty_like(p)
    if not isinstance(out, np.ndarray) or out.shape != p.shape or out.dtype != p.dtype \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{name} must be a writeable C-contiguous {p.dtype} array of shape {p.shape}")
    return out


def _train_kernels(model, mod, opt, X2, T, idx, p, gx, state, hyper):
    """The chain's valgrad kernel and the optimizer's update, with their signatures."""
    return [(Deferred(mod, f"valgrad_range_{model.loss.kind}"), loops.valgrad_sig(X2, T, idx, p, gx)),
            (opt.update_kernel(), loops.update_sig(p, state, hyper))]


def alloc_threaded_grad(chain, n_threads=None, dtype=np.float32) -> np.ndarray:
    """Per-thread gradient buffers for :func:`train_unbatched` / :func:`train_batched`.

    Returns
    -------
    ndarray, shape ``(n_threads, n_params)``, ``dtype``, zeros. ``n_threads`` defaults to
    ``numba.get_num_threads()``. Row ``t`` is thread ``t``'s gradient; training overwrites
    all rows every step. Use the dtype of ``p``.
    """
    chain = remove_loss(chain)
    dtype = check_dtype(dtype)
    n = numba.get_num_threads() if n_threads is None else int(n_threads)
    if n < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return aligned_zeros((n, chain.n_params), dtype)


def _check_G(G, p):
    if not isinstance(G, np.ndarray) or G.ndim != 2 or G.shape[1] != p.shape[0]:
        raise ValueError(f"G must have shape (n_threads, {p.shape[0]}) (alloc_threaded_grad), "
                         f"got {getattr(G, 'shape', type(G).__name__)}")
    if G.dtype != p.dtype:
        raise TypeError(f"G has dtype {G.dtype} but p has {p.dtype}; they must match")
    if not G.flags.c_contiguous or not G.flags.writeable:
        raise ValueError("G must be writeable and C-contiguous")
    return G


def _valgrad(model, X, p, out, x_out, want_x):
    _check_model(model)
    p = check_params(model.chain.n_params, p)
    out = _check_out(out, p)
    X2, T, mod, plan = _prepare(model, X, p)
    n = X2.shape[0]
    nt = max(1, min(numba.get_num_threads(), -(-n // plan.B)))
    G = np.empty((nt, p.shape[0]), dtype=p.dtype)
    losses = np.empty(nt, dtype=p.dtype)
    if want_x:
        shape = (n,) + model.chain.input_shape
        if x_out is None:
            x_out = np.empty(shape, dtype=p.dtype)
        elif (not isinstance(x_out, np.ndarray) or x_out.shape != shape or x_out.dtype != p.dtype
              or not x_out.flags.c_contiguous or not x_out.flags.writeable):
            raise ValueError(f"x_out must be a writeable C-contiguous {p.dtype} array of shape {shape}")
        gx = x_out.reshape(n, -1)
    else:
        gx = np.empty((0, plan.n_in), dtype=p.dtype)
    works = model.chain._works(plan, nt, p.dtype)
    kernel = Deferred(mod, f"valgrad_{'x_' if want_x else ''}range_{model.loss.kind}")
    idx = np.arange(n)
    loops.call(loops.valgrad_threads, [(kernel, loops.valgrad_sig(X2, T, idx, p, gx))],
               (X2, T, idx, 0, n, p, G, works, losses, p.dtype.type(1.0 / n), gx))
    from .compiler.runtime import sum_rows

    sum_rows(G, out)
    return float(losses.sum()), out, x_out


def valgrad(model, X, p, *, out=None):
    """Loss and its gradient with respect to the parameters.

    Parameters
    ----------
    model : SimpleChainWithLoss
        From :func:`add_loss`; its targets must have ``N`` rows.
    X : ndarray, shape ``(N, *input_shape)``, float
    p : ndarray, shape ``(n_params,)``, float32 or float64
    out : ndarray like ``p``, optional
        Overwritten with the gradient and returned. (Each call still allocates small
        per-thread scratch, ``n_threads x n_params``; the training loops allocate nothing
        per step.)

    Returns
    -------
    (float, ndarray)
        The mean loss and ``dL/dp`` (same shape and dtype as ``p``).

    Raises
    ------
    TypeError, ValueError
        Bad shapes, dtypes, lengths, NaN/Inf in ``X`` or targets; nothing is written then.

    SimpleChains.jl: ``valgrad!(g, model, x, p)``.
    """
    loss, g, _ = _valgrad(model, X, p, out, None, False)
    return loss, g


def valgrad_with_input(model, X, p, *, out=None, x_out=None):
    """Loss and its gradients with respect to ``p`` and to the input ``X``.

    Like :func:`valgrad`, plus ``dL/dX`` of shape ``(N, *input_shape)`` (written into
    ``x_out`` if given). SimpleChains.jl: ``valgrad!((gx, gp), model, x, p)``.

    Returns
    -------
    (float, ndarray, ndarray)
        loss, ``dL/dp``, ``dL/dX``.
    """
    return _valgrad(model, X, p, out, x_out, True)


class _Progress:
    def __init__(self, total, enabled, desc):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc)
            except ImportError:  # optional dependency
                self.bar = None

    def update(self, n, loss):
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.6g}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _train_setup(G, p, model, X, opt):
    _check_model(model)
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be a smallchains optimizer (e.g. sc.Adam(1e-3)), got {type(opt).__name__}")
    p = check_params(model.chain.n_params, p, writable=True)
    G = _check_G(G, p)
    X2, T, mod, plan = _prepare(model, X, p)
    state, hyper = opt.prepare(p)
    works = model.chain._works(plan, G.shape[0], p.dtype)
    gx = np.empty((0, plan.n_in), dtype=p.dtype)
    losses = np.zeros(G.shape[0], dtype=p.dtype)
    g = np.zeros_like(p)
    return p, G, X2, T, mod, plan, state, hyper, works, gx, losses, g


def train_unbatched(G, p, model, X, opt, iters, *, callback=None, report_every=None,
                    progress=False):
    """Full-batch training: ``iters`` optimizer steps on all of ``X``, ``p`` in place.

    Each step computes the loss and gradient on every sample (split over ``G.shape[0]``
    threads, one gradient row each), sums the rows in fixed order and applies ``opt``.
    The loop runs in compiled code; with ``callback`` or ``progress`` it returns to Python
    every ``report_every`` steps (default ``max(1, iters // 100)``).

    Parameters
    ----------
    G : ndarray, shape ``(n_threads, n_params)``, dtype of ``p`` -- scratch, overwritten.
    p : ndarray, shape ``(n_params,)`` -- updated in place.
    model : SimpleChainWithLoss
    X : ndarray, shape ``(N, *input_shape)`` -- copied once if not C-contiguous or of
        another float dtype than ``p``.
    opt : Optimizer -- its state advances.
    iters : int
    callback : callable ``(step, loss, p) -> None``, optional
    progress : bool -- show a tqdm bar.

    Returns
    -------
    ndarray, shape ``(iters,)``, dtype of ``p``
        Loss before each step.

    Raises
    ------
    FloatingPointError
        The loss became NaN or Inf; the message names the iteration. ``p`` holds the
        parameters of that iteration (the non-finite step is not applied).
    TypeError, ValueError
        Bad input, raised before anything is modified.

    SimpleChains.jl: ``train_unbatched!(G, p, model, X, opt, iters)``.
    """
    iters = int(iters)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    p, G, X2, T, mod, plan, state, hyper, works, gx, losses, g = _train_setup(G, p, model, X, opt)
    hist = np.zeros(iters, dtype=p.dtype)
    idx = np.arange(X2.shape[0])
    kernels = _train_kernels(model, mod, opt, X2, T, idx, p, gx, state, hyper)
    chunk = iters if (callback is None and not progress) else (report_every or max(1, iters // 100))
    bar = _Progress(iters, progress, "train_unbatched")
    try:
        done = 0
        while done < iters:
            k = min(chunk, iters - done)
            bad = loops.call(loops.train_unbatched_loop, kernels,
                             (X2, T, idx, p, G, works, losses, g, state, hyper, opt.t, k,
                              hist[done:done + k], gx))
            if bad >= 0:
                opt.t += bad
                raise FloatingPointError(
                    f"loss is {hist[done + bad]} at iteration {done + bad} (0-based) of train_unbatched; "
                    "p holds the parameters of that iteration. Lower the learning rate or check the data.")
            opt.t += k
            done += k
            bar.update(k, float(hist[done - 1]))
            if callback is not None:
                callback(done, float(hist[done - 1]), p)
    finally:
        bar.close()
    return hist


def default_batch_size(block: int, n_threads: int, n: int) -> int:
    """Default minibatch size: four blocks per thread, at least 64, at most ``n``."""
    return max(1, min(n, max(64, 4 * block * n_threads)))


def accuracy_and_loss(model, X, *args):
    """Classification accuracy and mean loss: ``accuracy_and_loss(model, X, labels, p)``
    or ``accuracy_and_loss(model, X, p)`` (the model's own labels).

    Parameters
    ----------
    model : SimpleChainWithLoss with a :class:`~smallchains.LogitCrossEntropyLoss`
    X : ndarray, shape ``(N, *input_shape)``
    labels : array of int, shape ``(N,)``, optional -- 0-based classes.
    p : ndarray, shape ``(n_params,)``

    Returns
    -------
    (float, float)
        Fraction of samples whose largest logit is the label, and the mean loss.

    SimpleChains.jl: ``accuracy_and_loss(model, X, Y, p)``.
    """
    _check_model(model)
    if len(args) == 1:
        labels, p = None, args[0]
    elif len(args) == 2:
        labels, p = args
    else:
        raise TypeError("use accuracy_and_loss(model, X, labels, p) or accuracy_and_loss(model, X, p)")
    if not getattr(model.loss, "labels", False):
        raise TypeError(f"accuracy needs a classification loss, got {type(model.loss).__name__}")
    loss = model(X, p, labels)  # validates everything
    T = np.asarray(model.loss.targets if labels is None else labels)
    logits = model.chain(X, p)
    return float(np.mean(np.argmax(logits, axis=1) == T)), loss


def train_batched(G, p, model, X, opt, epochs, *, batch_size=None, shuffle=True, seed=None,
                  callback=None, progress=False):
    """Minibatch training for ``epochs`` passes over ``X``, ``p`` in place.

    Every epoch visits the samples in a new random order (``shuffle=True``, from
    ``numpy.random.default_rng(seed)``) in minibatches of ``batch_size``; each minibatch is
    split over the ``G.shape[0]`` threads. When ``N`` is not a multiple of ``batch_size``
    the last minibatch of each epoch is smaller and still taken (its loss is its own mean).

    Parameters
    ----------
    G : ndarray, shape ``(n_threads, n_params)``, dtype of ``p`` -- scratch, overwritten.
    p : ndarray, shape ``(n_params,)`` -- updated in place.
    model : SimpleChainWithLoss
    X : ndarray, shape ``(N, *input_shape)`` -- copied once if not C-contiguous or of
        another float dtype than ``p``; never modified.
    opt : Optimizer -- its state advances by one step per minibatch.
    epochs : int
    batch_size : int, optional
        Default :func:`default_batch_size`: ``min(N, max(64, 4 * B * n_threads))`` where
        ``B`` is the chain's block size (16 for LeNet5, so 128 at 2 threads).
    shuffle : bool, default True
    seed : int, optional -- seed of the shuffling generator.
    callback : callable ``(epoch, mean_loss, p) -> None``, optional
        Called after every epoch (1-based epoch number).
    progress : bool
        A tqdm bar over epochs.

    Returns
    -------
    ndarray, shape ``(epochs,)``
        Mean minibatch loss of each epoch (losses at the parameters before each step).

    Raises
    ------
    FloatingPointError
        NaN/Inf loss; the message names the epoch and minibatch.
    TypeError, ValueError
        Bad input, raised before anything is modified.

    SimpleChains.jl: ``train_batched!(G, p, model, X, opt, iters; batchsize)``.
    """
    epochs = int(epochs)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    p, G, X2, T, mod, plan, state, hyper, works, gx, losses, g = _train_setup(G, p, model, X, opt)
    n = X2.shape[0]
    if batch_size is None:
        batch_size = default_batch_size(plan.B, G.shape[0], n)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    kernels = _train_kernels(model, mod, opt, X2, T, perm, p, gx, state, hyper)
    nbatch = -(-n // batch_size)
    hist = np.zeros(nbatch, dtype=p.dtype)
    out = np.zeros(epochs, dtype=p.dtype)
    bar = _Progress(epochs, progress, "train_batched")
    try:
        for e in range(epochs):
            if shuffle:
                rng.shuffle(perm)
            bad = loops.call(loops.train_batched_loop, kernels,
                             (X2, T, perm, batch_size, p, G, works, losses, g, state, hyper,
                              opt.t, hist, gx))
            if bad >= 0:
                opt.t += bad
                raise FloatingPointError(
                    f"loss is {hist[bad]} in epoch {e + 1}, minibatch {bad} (0-based) of train_batched; "
                    "p holds the parameters before that step.")
            opt.t += nbatch
            out[e] = hist.mean()
            bar.update(1, float(out[e]))
            if callback is not None:
                callback(e + 1, float(out[e]), p)
    finally:
        bar.close()
    return out
