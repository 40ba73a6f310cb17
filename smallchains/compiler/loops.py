"""Loops shared by every chain: compiled once per argument types, cached on disk.

The chain's generated block kernels (``forward_range``, ``loss_range_<loss>``,
``valgrad_range_<loss>``) and the optimizer's update kernel are passed to these loops as
numba first-class functions (called through a pointer, once per thread per step). So a
loop is never recompiled for a new chain, and compiling it never re-optimizes the chain's
kernels: when the loops were generated per chain, their parallel (``prange``) compile
cost 4-8 s per chain, about a third of a cold start.

* :data:`forward_threads`, :data:`loss_threads`, :data:`valgrad_threads`: one call of a
  range kernel per thread over contiguous slices of the rows (``chain(X, p)``,
  ``model(X, p)``, :func:`smallchains.valgrad`);
* :data:`train_unbatched_loop`, :data:`train_batched_loop`: a number of training steps
  (the drivers in :mod:`smallchains.train` call them in chunks of about 0.15 s, so that
  Ctrl-C is handled between chunks). Each step checks that the loss and the summed
  gradient are finite before it updates ``p`` and the optimizer state;
* :data:`fit_worker`: many independent fits (:func:`smallchains.fit_many`), each on one
  thread from start to end; not parallel itself, several Python threads run it at once
  and share the fits through an atomic counter.

Each dispatcher is compiled only through :func:`call`, which compiles (or loads from
numba's cache) the exact signature needed, with the kernels' types as
``types.FunctionType``; numba then passes jitted functions as pointers instead of
specializing on them.

Thread safety: :func:`call` serializes launches with a process-wide lock
(:data:`launch_lock`) unless numba's threading layer allows concurrent launches (``omp``,
``tbb``); the ``workqueue`` layer would abort the process.
"""

from __future__ import annotations

import threading
import warnings

import numba
import numpy as np
from numba import njit, prange, typeof, types
from numba.core.caching import NullCache
from numba.experimental.function_type import WrapperAddressProtocol
from numba.extending import typeof_impl

from .._config import EXACT_OPTIONS, INLINE_OPTIONS, JIT_OPTIONS
from .._numba_utils import fetch_add, like
from .linking import Deferred
from .runtime import sum_rows


def _forward_threads(forward, combine, nstages, X, idx, p, state, works, metas, Y):
    """Rows ``idx`` of ``X`` -> the same rows of ``Y``, split over ``works.shape[0]`` threads.
    ``state``: the layer state; ``metas[k]``: thread ``k``'s step metadata (key and step
    set by the caller, lane rows and stage written here and by the kernel). A training
    forward pass of a chain with batch statistics first runs ``nstages`` stages (one per
    BatchNorm), each followed by ``combine`` in thread order; the running statistics are
    not updated. Otherwise ``nstages`` is 0."""
    nt = works.shape[0]
    n = idx.shape[0]
    for stage in range(nstages + 1):
        for k in range(nt):
            metas[k, 2] = stage
        for k in prange(nt):
            forward(X, idx, n * k // nt, n * (k + 1) // nt, p, state, works[k], metas[k], Y)
        if stage < nstages:
            combine(stage, works, state, False)


def _loss_threads(loss, combine, nstages, X, T, idx, p, state, works, metas, losses, scale):
    """Thread ``k`` overwrites ``losses[k]`` with ``scale *`` the loss sum of its rows
    (after ``nstages`` batch-statistics stages, as :func:`_forward_threads`)."""
    nt = works.shape[0]
    n = idx.shape[0]
    for stage in range(nstages + 1):
        for k in range(nt):
            metas[k, 2] = stage
        for k in prange(nt):
            losses[k] = loss(X, T, idx, n * k // nt, n * (k + 1) // nt, p, state, works[k],
                             metas[k], scale)
        if stage < nstages:
            combine(stage, works, state, False)


def _valgrad_threads(valgrad, combine, nstages, X, T, idx, lo, m, p, G, state, works, metas,
                     losses, scale, gx):
    """Rows ``idx[lo:lo+m]`` split over the ``G.shape[0]`` threads: thread ``k`` overwrites
    ``G[k]`` with ``scale * dL/dp`` of its rows and ``losses[k]`` with their scaled loss.
    Chains with batch statistics (BatchNorm in training) first run ``nstages`` reduction
    stages (see :func:`_stages`); the running statistics are not updated."""
    _stages(valgrad, combine, nstages, X, T, idx, lo, m, p, G, state, works, metas, losses,
            scale, gx, False)


@njit(**INLINE_OPTIONS)
def _stages(valgrad, combine, nstages, X, T, idx, lo, m, p, G, state, works, metas, losses,
            scale, gx, update_running):
    """Every thread ``k`` runs ``valgrad`` on its rows with ``metas[k, 2] = stage`` for
    ``stage = 0 .. nstages``. Stages before ``nstages`` are the reduction stages of a chain
    with batch statistics: each stops where its per-thread partial sums are complete (see
    :mod:`smallchains.compiler.codegen`), then ``combine(stage, works, state, update)``
    merges them in thread order into ``state``. Stage ``nstages`` is the gradient pass
    (the only one for ``nstages = 0``): ``G[k]`` and ``losses[k]`` are its results."""
    nt = G.shape[0]
    for stage in range(nstages + 1):
        for k in range(nt):
            metas[k, 2] = stage
        for k in prange(nt):
            losses[k] = valgrad(X, T, idx, lo + m * k // nt, lo + m * (k + 1) // nt, p, G[k],
                                state, works[k], metas[k], scale, gx)
        if stage < nstages:
            combine(stage, works, state, update_running)


@njit(**INLINE_OPTIONS)
def _all_finite(g):
    """Whether every element of the 1-D array ``g`` is finite (no early exit: vectorizes)."""
    ok = True
    for j in range(g.shape[0]):
        ok &= np.isfinite(g[j])
    return ok


# Without fast-math, and compiled on its own (not ``inline="always"``): numba inlines at
# the level of its own IR, so an inlined callee's operations take the CALLER's fast-math
# flags whatever its own options say (tests/test_regularization.py checks this). Inlined
# with fast-math into each training loop, LLVM fused ``g + 2 l2 p`` and ordered the norm's
# sum differently per loop (measured on a Zen 4 with 512-bit vectors: fit_many and
# train_unbatched 1-30 ulp apart after 5 AdamW steps with an L2 penalty). A separate
# function keeps plain IEEE operations even where LLVM inlines it, so every loop gets the
# same bits; it runs once per step, so the call costs nothing measurable.
@njit(**EXACT_OPTIONS)
def _regularize(p, g, reg, frozen):
    """Between the summed gradient ``g`` of a step and its update: add the penalty
    ``reg[0] * sum |p| + reg[1] * sum p^2`` to ``g`` (its gradient; ``sign(0) = 0``) and
    return its value; zero the entries ``frozen`` of ``g``; then, if ``reg[2] > 0``, scale
    ``g`` by ``reg[2] / (||g|| + 1e-6)`` when that is below 1 (torch's
    ``clip_grad_norm_``, over the parameters that are not frozen)."""
    l1, l2, max_norm = reg[0], reg[1], reg[2]
    zero = like(p[0], 0.0)
    pen = zero
    if l1 != zero or l2 != zero:
        two_l2 = like(p[0], 2.0) * l2
        for j in range(p.shape[0]):
            pj = p[j]
            pen += l1 * abs(pj) + l2 * pj * pj
            g[j] += two_l2 * pj + (l1 if pj > zero else (-l1 if pj < zero else zero))
    for i in range(frozen.shape[0]):
        g[frozen[i]] = zero
    if max_norm > zero:
        ss = zero
        for j in range(g.shape[0]):
            ss += g[j] * g[j]
        coef = max_norm / (np.sqrt(ss) + like(p[0], 1e-6))
        if coef < like(p[0], 1.0):
            for j in range(g.shape[0]):
                g[j] *= coef
    return pen


@njit(**INLINE_OPTIONS)
def _apply_update(update, p, g, state, hyper, t, frozen, stash):
    """``update`` of all of ``p`` on one thread, with the entries ``frozen`` of ``p`` kept
    as they were (``stash`` holds them meanwhile: a gradient row, free after the sum)."""
    for i in range(frozen.shape[0]):
        stash[i] = p[frozen[i]]
    update(p, g, state, hyper, t, 0, p.shape[0])
    for i in range(frozen.shape[0]):
        p[frozen[i]] = stash[i]


@njit(**INLINE_OPTIONS)
def _sum_finite(G, g, lo, hi):
    """``g[j] = G[0, j] + G[1, j] + ...`` (fixed row order, as :func:`sum_rows`) for ``lo <=
    j < hi``, then ``G[:, lo:hi] = 0`` for the next step; returns whether all ``g[lo:hi]``
    are finite. Zeroing the slice here, where this thread has just read it, instead of each
    thread zeroing its whole row at the start of its ``valgrad`` (whose lines the other
    threads then hold): measured on a Zen 4, network 2 of issue 14 (bench/mnist_mlp.py) at 2
    threads, 277-287 -> 233-245 ms per epoch."""
    out = g[lo:hi]  # a view: see the note above smallchains.optim.adam_update
    n = out.shape[0]
    first = G[0, lo:hi]
    for j in range(n):
        out[j] = first[j]
    for t in range(1, G.shape[0]):
        row = G[t, lo:hi]
        for j in range(n):
            out[j] += row[j]
    for t in range(G.shape[0]):
        row = G[t, lo:hi]
        for j in range(n):
            row[j] = 0
    return _all_finite(out)


@njit(**INLINE_OPTIONS)
def _zero_grad_rows(G, metas, slices):
    """Before the first step of a training loop: with ``slices`` (the split sum, which
    leaves ``G`` zero for the next step, see :func:`_sum_finite`), zero ``G`` and tell the
    ``valgrad`` range kernels not to (the last element of each ``metas`` row, which
    :meth:`smallchains.SimpleChain._workspace` hands out as 0); without, they zero their
    row themselves."""
    if slices is not None:
        for k in range(G.shape[0]):
            metas[k, metas.shape[1] - 1] = 1
            for j in range(G.shape[1]):
                G[k, j] = 0


#: status codes of :func:`_step` and of ``info[1]`` of the training loops
OK, LOSS_NOT_FINITE, GRAD_NOT_FINITE = 0, 1, 2


def _step(valgrad, combine, update, nstages, X, T, idx, lo, m, scale, p, G, lstate, works,
          metas, losses, g, state, hyper, t, gx, reg, frozen, slices):
    """One optimizer step on rows ``idx[lo:lo+m]``, split over the ``G.shape[0]`` threads
    (thread ``k`` overwrites ``G[k]`` and ``losses[k]``; unless the loss is not finite,
    ``g`` is overwritten with their sum). ``lstate`` is the layer state, ``state`` the
    optimizer's; ``metas[:, 1]`` is set to the step count ``t`` (random layers' masks
    depend on it). Returns ``(loss, status)``: ``status`` is :data:`OK` after the update,
    else :data:`LOSS_NOT_FINITE` or :data:`GRAD_NOT_FINITE`, and then ``p`` and ``state``
    are not touched. ``nstages``, ``combine``: the batch-statistics stages, see
    :func:`_stages` (they update the running statistics in ``lstate``). ``reg``,
    ``frozen``: penalties, gradient clipping and frozen parameters, see
    :func:`_regularize`; the returned loss includes the penalty. ``slices``: None (the
    sum of the gradient rows and the update run on one thread) or ``G.shape[0] + 1``
    bounds: thread ``k`` sums and updates entries ``slices[k]:slices[k+1]``
    (:func:`smallchains.train.update_slices`) and zeroes them in every row of ``G`` after
    the sum; ``G`` must then be zero when the step starts and the ``metas`` rows say so
    (:func:`_zero_grad_rows`), and the range kernels add their gradients into it.
    ``scale`` is ``1 / m`` in ``p``'s dtype, computed by the caller: computed here
    (``like(p[0], 1.0 / m)``), or with ``lo`` the literal 0, numba's specialization of this parallel function ran its region
    at half speed with 2 threads (measured on a Zen 3, a 16/32-channel conv chain, batch
    128: 17-19 against 8.3 ms per step; the cause inside numba is not known)."""
    nt = G.shape[0]
    for k in range(nt):
        metas[k, 1] = t
    # inlined parallel loops (not a call of valgrad_threads): saves a parallel compile (~0.7 s)
    _stages(valgrad, combine, nstages, X, T, idx, lo, m, p, G, lstate, works, metas, losses,
            scale, gx, True)
    total = like(p[0], 0.0)
    for k in range(nt):
        total += losses[k]
    if not np.isfinite(total):
        return total, LOSS_NOT_FINITE
    if slices is None:  # decided when compiled (numba prunes the other branch): no more
        # parallel regions, whose compile cost about 0.7 s each
        sum_rows(G, g)
        if not _all_finite(g):
            return total, GRAD_NOT_FINITE
        total += _regularize(p, g, reg, frozen)
        _apply_update(update, p, g, state, hyper, t, frozen, G[0])
        return total, OK
    else:
        # each thread sums and updates its slice of the parameters: the serial sum read
        # every other thread's gradient row across the cores, and each thread then read
        # all of the updated p back
        for k in prange(nt):  # losses[k]: free after the total; the slice's finite flag
            losses[k] = like(p[0], 1.0 if _sum_finite(G, g, slices[k], slices[k + 1]) else 0.0)
        ok = True
        for k in range(nt):
            ok &= losses[k] != like(p[0], 0.0)
        if not ok:
            return total, GRAD_NOT_FINITE
        total += _regularize(p, g, reg, frozen)
        stash = G[0]  # the frozen entries of p, as in _apply_update
        for i in range(frozen.shape[0]):
            stash[i] = p[frozen[i]]
        for k in prange(nt):
            update(p, g, state, hyper, t, slices[k], slices[k + 1])
        for i in range(frozen.shape[0]):
            p[frozen[i]] = stash[i]
            stash[i] = 0  # G stays zero for the next step
        return total, OK


def _train_unbatched(valgrad, combine, update, nstages, X, T, idx, p, G, lstate, works, metas,
                     losses, g, state, hyper, step0, iters, hist, gx, info, lrs, reg, frozen,
                     slices):
    """Up to ``iters`` full-batch steps, continuing after the ``info[0]`` steps done so far.

    Step ``i = info[0]`` (0-based within the run) writes its loss to ``hist[i]``, uses
    optimizer step count ``step0 + i + 1`` and learning rate ``lrs[i]`` (``hyper[0]``; an
    empty ``lrs`` leaves ``hyper`` alone) and, once applied, sets ``info[0] = i + 1``. A
    non-finite loss or gradient stops the loop before the update with ``info[1]`` set to
    the status (:data:`LOSS_NOT_FINITE`, :data:`GRAD_NOT_FINITE`). The counter lives in
    ``info`` (not a return value) so the caller knows the steps done whenever it is
    interrupted."""
    n = idx.shape[0]
    lo = n - n  # a run-time zero, not the literal 0 (see _step)
    scale = like(p[0], 1.0 / n)
    _zero_grad_rows(G, metas, slices)
    for _ in range(iters):
        i = info[0]
        if lrs.shape[0] > 0:
            hyper[0] = lrs[i]
        loss, status = _step(valgrad, combine, update, nstages, X, T, idx, lo, n, scale, p, G,
                             lstate, works, metas, losses, g, state, hyper, step0 + i + 1, gx,
                             reg, frozen, slices)
        hist[i] = loss
        if status != OK:
            info[1] = status
            return
        info[0] = i + 1


def _train_batched(valgrad, combine, update, nstages, X, T, perm, batch_size, nsteps, p, G,
                   lstate, works, metas, losses, g, state, hyper, step0, hist, gx, info, reg,
                   frozen, slices):
    """Up to ``nsteps`` minibatch steps over ``perm`` (``b = info[0] % nbatch`` is the next
    minibatch of the epoch; a last partial batch is a smaller step), stopping at the end of
    the epoch. Step ``i = info[0]`` writes its loss to ``hist[b]``, uses optimizer step
    count ``step0 + i + 1`` and sets ``info[0] = i + 1``; non-finite loss or gradient: as
    in :func:`_train_unbatched`."""
    n = perm.shape[0]
    nbatch = (n + batch_size - 1) // batch_size
    _zero_grad_rows(G, metas, slices)
    for _ in range(nsteps):
        i = info[0]
        b = i % nbatch
        lo = b * batch_size
        m = min(n, lo + batch_size) - lo
        loss, status = _step(valgrad, combine, update, nstages, X, T, perm, lo, m,
                             like(p[0], 1.0 / m), p, G, lstate, works, metas, losses, g, state,
                             hyper, step0 + i + 1, gx, reg, frozen, slices)
        hist[b] = loss
        if status != OK:
            info[1] = status
            return
        info[0] = i + 1
        if b == nbatch - 1:
            return


#: columns of the ``fits`` table of :func:`_fit_worker`
FIT_ROW, FIT_BLOCK, FIT_ROWS, FIT_ORDER, FIT_STEP0, FIT_KEY, FIT_END, FIT_BATCH = range(8)


def _fit_worker(valgrad, combine, update, nstages, X, T, order, fits, batched, P, LS,
                OS, H, hist, info, G, kstate, works, metas, losses, g, gx, counter, stop, reg,
                frozen):
    """Independent training runs ("fits"), each on this thread from its first step to its
    last: takes fit ``f = counter[0]++`` (atomically, so threads running this loop share
    the fits dynamically) until none is left or ``stop[0] != 0``.

    Fit ``f`` trains ``P[f]`` (its optimizer state ``OS[f]``, hyperparameters ``H[f]``,
    layer state ``LS[f]``) on ``n`` rows of its data block ``X[o:o+L]``, ``T[o:o+L]``: rows
    ``order[q:q+n]`` of the block (row numbers within it, in training order), where ``o, L,
    n, q, t0, key, end, bs = fits[f]`` (columns :data:`FIT_ROW` ...). It continues after its ``info[f, 0]`` steps done up to
    step ``end``; step ``i`` takes minibatch ``b = i % nb`` of ``bs`` rows (the last one
    smaller; ``bs >= n``: full batch) with optimizer step count
    ``t0 + i + 1`` and random key ``key``, and writes its loss to ``hist[f, b if batched
    else i]``. Each step is :func:`_step` on one thread (``G``, ``works``, ``metas``
    have one row, ``kstate`` is this thread's), so a fit computes bitwise what
    ``train_unbatched`` / ``train_batched`` compute at one thread. A non-finite loss or
    gradient ends the fit before its update with ``info[f, 1]`` set to the status.
    ``reg``, ``frozen``: as for :func:`_step`, the same for every fit."""
    nf = fits.shape[0]
    ns = LS.shape[1]
    while stop[0] == 0:
        f = fetch_add(counter, 0, 1)
        if f >= nf:
            return
        o, L = fits[f, FIT_ROW], fits[f, FIT_BLOCK]
        n, q = fits[f, FIT_ROWS], fits[f, FIT_ORDER]
        Xf, Tf, idx = X[o:o + L], T[o:o + L], order[q:q + n]
        p, state, hyper = P[f], OS[f], H[f]
        bs = min(fits[f, FIT_BATCH], n)
        nb = (n + bs - 1) // bs
        metas[0, 0] = fits[f, FIT_KEY]
        for j in range(ns):
            kstate[j] = LS[f, j]
        for _ in range(fits[f, FIT_END] - info[f, 0]):
            i = info[f, 0]
            b = i % nb
            lo = b * bs
            m = min(n, lo + bs) - lo
            t = fits[f, FIT_STEP0] + i + 1
            metas[0, 1] = t
            _stages(valgrad, combine, nstages, Xf, Tf, idx, lo, m, p, G, kstate, works, metas,
                    losses, like(p[0], 1.0 / m), gx, True)
            loss = like(p[0], 0.0) + losses[0]
            if not np.isfinite(loss):
                hist[f, b if batched else i] = loss
                info[f, 1] = LOSS_NOT_FINITE
                break
            sum_rows(G, g)
            if not _all_finite(g):
                hist[f, b if batched else i] = loss
                info[f, 1] = GRAD_NOT_FINITE
                break
            hist[f, b if batched else i] = loss + _regularize(p, g, reg, frozen)
            _apply_update(update, p, g, state, hyper, t, frozen, G[0])
            info[f, 0] = i + 1
            if stop[0] != 0:
                break
        for j in range(ns):
            LS[f, j] = kstate[j]


#: :func:`_regularize` callable from Python (valgrad of a penalized model)
regularize = _regularize
forward_threads = njit(parallel=True, **JIT_OPTIONS)(_forward_threads)
loss_threads = njit(parallel=True, **JIT_OPTIONS)(_loss_threads)
valgrad_threads = njit(parallel=True, **JIT_OPTIONS)(_valgrad_threads)
_step = njit(parallel=True, **JIT_OPTIONS)(_step)
train_unbatched_loop = njit(**JIT_OPTIONS)(_train_unbatched)
train_batched_loop = njit(**JIT_OPTIONS)(_train_batched)
#: not parallel and without the GIL: several Python threads run it at once (smallchains.many)
fit_worker = njit(**JIT_OPTIONS)(_fit_worker)
# Compiled only through call(), for exact signatures: called directly with jitted kernels,
# numba would specialize on each kernel instead of taking a pointer. So _compile disables
# further compilation of these after each signature.
_LOCKED = (forward_threads, loss_threads, valgrad_threads, train_unbatched_loop,
           train_batched_loop, fit_worker)

_lock = threading.Lock()


def _compile(dispatcher, sig):
    """Compile ``dispatcher`` for ``sig`` (a signature, or a tuple of argument types), or
    load it from numba's cache, if needed.

    numba's threading layer is started first. The training loops are not parallel
    themselves but contain the parallel :func:`_step`; numba 0.68 records "start the
    threading layer on load" in a cache entry only when the parallel callee was compiled in
    that process, not when it was itself loaded from the cache. A training loop compiled
    after :func:`_step` was loaded therefore left an entry whose loading, in a process that
    had not started the layer yet, aborted in LLVM ("Symbol not found: allocate_sched")."""
    key = tuple(sig.args) if hasattr(sig, "args") else tuple(sig)
    if key in dispatcher.overloads:
        return
    numba.get_num_threads()  # starts the threading layer once per process
    with _lock:
        if key in dispatcher.overloads:
            return
        locked = dispatcher in _LOCKED
        if locked:
            dispatcher.disable_compile(False)
        try:
            try:
                dispatcher.compile(sig)
            except ImportError as e:
                if isinstance(dispatcher._cache, NullCache):
                    raise
                # A disk-cache entry whose code calls a function of a module this process
                # cannot import (numba pickles the module's name): compile here instead,
                # without the disk cache for this kernel in this process.
                warnings.warn(f"smallchains: a cached kernel ({dispatcher.py_func.__name__}) "
                              f"could not be loaded ({e}); compiling it again, not cached",
                              RuntimeWarning, stacklevel=2)
                dispatcher._cache = NullCache()
                dispatcher.compile(sig)
        finally:
            if locked:
                dispatcher.disable_compile(True)


def _row(dt):
    return types.Array(dt, 1, "C")


def _argkey(a):
    """What numba's type of ``a`` depends on, cheap to compute and hash."""
    if isinstance(a, np.ndarray):
        f = a.flags
        return (a.dtype, a.ndim, f.c_contiguous, f.f_contiguous, f.writeable, f.aligned)
    if isinstance(a, np.generic) or type(a) is float:
        return type(a)
    if type(a) is int:  # int64, or uint64 past its range
        return (int, a < 2 ** 63)
    return (type(a), typeof(a))


_typeofs: dict = {}


def _typeof(a):
    """``numba.typeof(a)``, memoized on :func:`_argkey`: numba's Python-level typeof of an
    array costs several microseconds, and one call of a loop needs about 15 of them."""
    key = _argkey(a)
    t = _typeofs.get(key)
    if t is None:
        t = _typeofs[key] = typeof(a)
    return t


def _memo_sig(fn):
    """Memoize a signature builder on the :func:`_argkey` of its arguments."""
    cache = {}

    def wrapper(*args):
        key = tuple(_argkey(a) for a in args)
        sig = cache.get(key)
        if sig is None:
            sig = cache[key] = fn(*args)
        return sig
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


_META = types.Array(types.int64, 1, "C")


@_memo_sig
def forward_sig(X, idx, p, Y):
    """Signature of a chain's ``forward_range(X, idx, lo, hi, p, state, work, meta, Y)``."""
    dt = _typeof(p).dtype
    return types.void(_typeof(X), _typeof(idx), types.int64, types.int64, _typeof(p), _row(dt),
                      _row(dt), _META, _typeof(Y))


@_memo_sig
def loss_sig(X, T, idx, p):
    """Signature of ``loss_range_<loss>(X, T, idx, lo, hi, p, state, work, meta, scale)``."""
    dt = _typeof(p).dtype
    return dt(_typeof(X), _typeof(T), _typeof(idx), types.int64, types.int64, _typeof(p), _row(dt),
              _row(dt), _META, dt)


@_memo_sig
def valgrad_sig(X, T, idx, p, gx):
    """Signature of ``valgrad_range_<loss>(X, T, idx, lo, hi, p, g, state, work, meta, scale,
    gx)``."""
    dt = _typeof(p).dtype
    return dt(_typeof(X), _typeof(T), _typeof(idx), types.int64, types.int64, _typeof(p), _row(dt),
              _row(dt), _row(dt), _META, dt, _typeof(gx))


@_memo_sig
def combine_sig(p, works):
    """Signature of a chain's ``combine(stage, works, state, update_running)``."""
    return types.void(types.int64, _typeof(works), _row(_typeof(p).dtype), types.boolean)


@njit(**JIT_OPTIONS)
def no_combine(stage, works, state, update_running):
    """The ``combine`` of chains without batch statistics (never called: ``nstages = 0``)."""


@_memo_sig
def update_sig(p, state, hyper):
    """Signature of an optimizer's ``update(p, g, state, hyper, t, lo, hi)``."""
    return types.void(_typeof(p), _typeof(p), _typeof(state), _typeof(hyper), types.int64,
                      types.int64, types.int64)


class _Address(WrapperAddressProtocol):
    """A compiled kernel passed to a loop as a first-class function by its address. numba
    unboxes a jitted dispatcher argument by looking up its compile result and machine
    code address on every call (tens of microseconds); this object keeps both.

    The loop then calls the kernel's C wrapper, which cannot pass an exception on (it
    would print "Exception ignored" and return garbage). The kernels passed here (the
    generated range kernels, the optimizer updates) have no raise statements and no
    checks; with ``NUMBA_BOUNDSCHECK=1`` they would have index checks, so :func:`call`
    passes the dispatchers themselves then."""

    def __init__(self, dispatcher, sig):
        cres = dispatcher.get_compile_result(sig)
        self._addr = cres.library.get_pointer_to_function(cres.fndesc.llvm_cfunc_wrapper_name)
        self._sig = sig
        self.numba_type = types.FunctionType(sig)
        self._keep = dispatcher  # the machine code lives as long as the dispatcher

    def __wrapper_address__(self):
        return self._addr

    def signature(self):
        return self._sig


@typeof_impl.register(_Address)
def _typeof_address(val, c):
    return val.numba_type


def _kernel_key(kernel):
    if isinstance(kernel, Deferred):
        return (kernel.module.__name__, kernel.name)
    return id(kernel)


# (loop, kernels, argument keys) -> the kernels as _Address objects: a repeated call with
# arguments of the same types skips compilation checks and typing in Python
_resolved: dict = {}


def prepare(loop, kernels, args):
    """Compile (or load) what ``call(loop, kernels, args)`` runs, without running it;
    returns the kernels as passed to ``loop``. A later :func:`call` with arguments of the
    same types compiles nothing."""
    key = (loop, tuple(_kernel_key(k) for k, _ in kernels), tuple(_argkey(a) for a in args))
    funcs = _resolved.get(key)
    if funcs is None:
        funcs = _resolve(loop, kernels, args)
        with _lock:
            _resolved[key] = funcs
    return funcs


def call(loop, kernels, args):
    """``loop(*kernels, *args)`` after compiling (or loading) the exact signatures.

    ``kernels`` is a sequence of ``(kernel, its signature)``: each kernel is compiled for
    its signature and passed as a first-class function of that type. A kernel may be a
    :class:`~smallchains.compiler.linking.Deferred` generated kernel: a helper process then
    compiles its layer steps while this one compiles the loop and the kernel; the steps
    are bound (the rest compiled here, the helper's loaded) before anything runs.

    The first call for given loop, kernels and argument types compiles; later ones reuse
    the result (about 10 us of Python per call instead of a few hundred).

    Thread safety: every loop here launches numba parallel regions. The ``tbb`` and ``omp``
    threading layers accept launches from several Python threads at once; ``workqueue``
    does not (it aborts the process). So unless :func:`numba.threading_layer` is one of
    :data:`THREADSAFE_LAYERS`, launches are serialized by a process-wide lock
    (:data:`launch_lock`): concurrent calls are then correct, but run one at a time. The
    layer is only known after the first parallel launch, which therefore takes the lock
    too."""
    funcs = prepare(loop, kernels, args)
    if _serialize is False:
        return loop(*funcs, *args)
    return _call_serialized(loop, funcs, args)


#: numba threading layers that allow parallel launches from several Python threads
THREADSAFE_LAYERS = frozenset({"tbb", "omp"})
#: held around every launch when the threading layer is not in THREADSAFE_LAYERS
launch_lock = threading.RLock()
_serialize = None  # whether launches take launch_lock; None until the layer is known


def _call_serialized(loop, funcs, args):
    global _serialize
    with launch_lock:
        result = loop(*funcs, *args)
        if _serialize is None:
            try:
                _serialize = numba.threading_layer() not in THREADSAFE_LAYERS
            except ValueError:  # nothing launched yet (e.g. a loop of zero steps)
                pass
    return result


def _resolve(loop, kernels, args):
    deferred = [kernel for kernel, _ in kernels if isinstance(kernel, Deferred)]
    for kernel in deferred:
        kernel.start()
    try:
        _compile(loop, (*[types.FunctionType(sig) for _, sig in kernels],
                        *[_typeof(a) for a in args]))
        for kernel, sig in kernels:
            _compile(kernel.unbound() if isinstance(kernel, Deferred) else kernel, sig)
        funcs = [kernel.get() if isinstance(kernel, Deferred) else kernel for kernel, _ in kernels]
    except BaseException:
        for kernel in deferred:
            kernel.cancel()
        raise
    if numba.config.BOUNDSCHECK:  # index errors must propagate: see _Address
        return funcs
    return [_Address(f, sig) for f, (_, sig) in zip(funcs, kernels)]
