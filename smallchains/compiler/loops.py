"""Training loops shared by every chain: compiled once per argument types, cached on disk.

The chain's generated ``valgrad_range_<loss>`` kernel and the optimizer's update kernel
are passed to the loops as numba first-class functions (called through a pointer, once
per thread per step). So a loop is never recompiled for a new chain, and compiling it
never re-optimizes the chain's kernels: when the loops were generated per chain, their
parallel (``prange``) compile cost 4-8 s per chain, about a third of a cold start.

Each loop dispatcher is compiled only through :func:`run`, which compiles
(or loads from numba's cache) the exact signature needed, with the kernels' types as
``types.FunctionType``; numba then passes jitted functions as pointers instead of
specializing on them.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange, typeof, types

from .._config import JIT_OPTIONS
from .._numba_utils import like
from .runtime import sum_rows


def _step(valgrad, update, X, T, idx, lo, m, p, G, works, losses, g, state, hyper, t, gx):
    """One optimizer step on rows ``idx[lo:lo+m]``, split over the ``G.shape[0]`` threads
    (thread ``k`` overwrites ``G[k]`` and ``losses[k]``); returns the loss. A non-finite
    loss is returned without updating ``p``."""
    nt = G.shape[0]
    scale = like(p[0], 1.0 / m)
    for k in prange(nt):
        losses[k] = valgrad(X, T, idx, lo + m * k // nt, lo + m * (k + 1) // nt, p, G[k],
                            works[k], scale, gx)
    total = like(p[0], 0.0)
    for k in range(nt):
        total += losses[k]
    if np.isfinite(total):
        sum_rows(G, g)
        update(p, g, state, hyper, t)
    return total


def _train_unbatched(valgrad, update, X, T, idx, p, G, works, losses, g, state, hyper, step0,
                     iters, hist, gx):
    """Full-batch steps; returns -1, or the first iteration whose loss was not finite."""
    n = idx.shape[0]
    for it in range(iters):
        hist[it] = _step_p(valgrad, update, X, T, idx, 0, n, p, G, works, losses, g, state, hyper,
                           step0 + it + 1, gx)
        if not np.isfinite(hist[it]):
            return it
    return -1


def _train_batched(valgrad, update, X, T, perm, batch_size, p, G, works, losses, g, state, hyper,
                   step0, hist, gx):
    """One epoch of minibatch steps over ``perm``; a last partial batch is a (smaller) step.
    Returns -1, or the first batch whose loss was not finite."""
    n = perm.shape[0]
    for b in range((n + batch_size - 1) // batch_size):
        lo = b * batch_size
        hist[b] = _step_p(valgrad, update, X, T, perm, lo, min(n, lo + batch_size) - lo, p, G,
                          works, losses, g, state, hyper, step0 + b + 1, gx)
        if not np.isfinite(hist[b]):
            return b
    return -1


_step_p = njit(parallel=True, **JIT_OPTIONS)(_step)
# compiled only through run(), which disables further compilation after each signature
train_unbatched_loop = njit(**JIT_OPTIONS)(_train_unbatched)
train_batched_loop = njit(**JIT_OPTIONS)(_train_batched)

_lock = threading.Lock()


def _compile(dispatcher, sig, always_enabled=True):
    """Compile ``dispatcher`` for ``sig`` (or load it from numba's cache) if needed."""
    if tuple(sig.args) in dispatcher.overloads:
        return
    with _lock:
        if tuple(sig.args) in dispatcher.overloads:
            return
        if not always_enabled:
            dispatcher.disable_compile(False)
        try:
            dispatcher.compile(sig)
        finally:
            if not always_enabled:
                dispatcher.disable_compile(True)


def run(loop, valgrad, update, args, p, state, hyper):
    """``loop(valgrad, update, *args)`` for :data:`train_unbatched_loop` or
    :data:`train_batched_loop`, after compiling (or loading) the exact signatures:
    ``args`` are the loop's arguments after ``update``; ``p``, ``state``, ``hyper`` (also in
    ``args``) give the kernels' signatures."""
    X, T, idx, gx = args[0], args[1], args[2], args[-1]
    dt = typeof(p).dtype
    row = types.Array(dt, 1, "C")
    vg_sig = dt(typeof(X), typeof(T), typeof(idx), types.int64, types.int64, typeof(p), row, row,
                dt, typeof(gx))
    up_sig = types.void(typeof(p), typeof(p), typeof(state), typeof(hyper), types.int64)
    _compile(valgrad, vg_sig)
    _compile(update, up_sig)
    loop_sig = types.int64(types.FunctionType(vg_sig), types.FunctionType(up_sig),
                           *[typeof(a) for a in args])
    _compile(loop, loop_sig, always_enabled=False)
    return loop(valgrad, update, *args)
