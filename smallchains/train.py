"""Gradients and training loops: validate and allocate in Python, loop in numba.

SimpleChains.jl counterparts: ``valgrad!``, ``alloc_threaded_grad``, ``train_unbatched!``,
``train_batched!`` (src/optimize.jl). Per-thread gradient rows ``G[t, :]`` are summed in
fixed order, so results are deterministic for a fixed thread count.
"""

from __future__ import annotations

import threading
import time

import numba
import numpy as np

from .compiler import loops
from .compiler.runtime import ALIGN_BYTES, aligned_zeros
from ._validate import (check_count, check_dtype, check_inputs, check_params, check_random,
                        nonfinite_error)
from .chain import SimpleChainWithLoss, kernel_for, remove_loss, stage_kernels
from .optim import Optimizer


def _prepare(model, X, p, targets=None, step_rows=None, n_threads=1, kernel_checks=False):
    """Validated inputs and targets, and the kernels; ``step_rows``: the rows of each
    training step over ``n_threads``, which may choose a smaller block
    (:meth:`SimpleChain._train_block`). ``kernel_checks``: X is not scanned for NaN and Inf
    here, the training kernels check it as they load it (see :func:`_kernels_check_X`)."""
    chain, loss = model.chain, model.loss
    X2, _ = check_inputs(chain.input_shape, X, p.dtype, allow_single=False,
                         finite=not kernel_checks)
    T = loss.prepare_targets(chain.output_shape, X2.shape[0], p.dtype, targets)
    # from the batch size alone (not the data's rows), so fit_many's fits pick the same block
    B = None if step_rows is None else chain._train_block(step_rows, n_threads, p.dtype)
    mod, plan = chain._kernels(p.dtype, loss, B)
    return X2, T, mod, plan


def _kernels_check_X(chain) -> bool:
    """Whether the training valgrad kernels of ``chain`` see every input value as they
    load it and return a NaN loss for a block with a NaN or Inf (the generated
    ``valgrad_range`` kernels, through :func:`~smallchains.compiler.runtime.load_block_rows`
    or :func:`~smallchains.compiler.runtime.load_block_checked`): all chains but those with
    batch statistics (``plan.reducing`` not empty), whose staged kernels load blocks in
    their own loop. train_batched then skips its up-front scan of X (network 1 of issue 14
    on a Zen 4: 6 ms per call on one thread for the 205 MB of CIFAR, of an epoch of about
    100 ms at 2 threads) and reads each value once, in the minibatch gather."""
    return not any(getattr(layer, "reduces_batch", False) for layer in chain.layers)


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


def _train_kernels(model, mod, plan, opt, X2, T, idx, p, gx, state, hyper, training, works):
    """The chain's valgrad kernel, its combine kernel and the optimizer's update, with
    their signatures; and the number of reduction stages."""
    valgrad = kernel_for(mod, plan, f"valgrad_range_{model.loss.kernel_kind}", training, default=True)
    combine, nstages = stage_kernels(mod, plan, p, works, training, backward=True)
    return [(valgrad, loops.valgrad_sig(X2, T, idx, p, gx)), combine,
            (opt.update_kernel(), loops.update_sig(p, state, hyper))], nstages


def alloc_threaded_grad(chain, n_threads=None, dtype=np.float32) -> np.ndarray:
    """Per-thread gradient buffers for :func:`train_unbatched` / :func:`train_batched`.

    Returns
    -------
    ndarray, shape ``(n_threads, n_params)``, ``dtype``, zeros. ``n_threads`` defaults to
    ``numba.get_num_threads()``. Row ``t`` is thread ``t``'s gradient; training overwrites
    all rows every step. Use the dtype of ``p``.

    Raises
    ------
    TypeError
        ``n_threads`` is not an int (Python or numpy integer), or ``dtype`` not a float dtype.
    ValueError
        ``n_threads < 1``.
    """
    chain = remove_loss(chain)
    dtype = check_dtype(dtype)
    n = numba.get_num_threads() if n_threads is None else check_count(n_threads, "n_threads", 1)
    return aligned_zeros((n, chain.n_params), dtype)


def _check_G(G, p):
    if not isinstance(G, np.ndarray) or G.ndim != 2 or G.shape[1] != p.shape[0] or G.shape[0] < 1:
        raise ValueError(f"G must have shape (n_threads, {p.shape[0]}) with n_threads >= 1 "
                         f"(alloc_threaded_grad), got {getattr(G, 'shape', type(G).__name__)}")
    if G.dtype != p.dtype:
        raise TypeError(f"G has dtype {G.dtype} but p has {p.dtype}; they must match")
    if not G.flags.c_contiguous or not G.flags.writeable:
        raise ValueError("G must be writeable and C-contiguous")
    return G


_grad_rows_tls = threading.local()


def _aligned_grad_rows(G):
    """The per-thread gradient rows a training loop accumulates into: ``G`` itself when
    every row starts on a 64-byte line (``ALIGN_BYTES``), else a zeroed ``(n_threads,
    stride)`` array whose rows do (``stride``: ``n_params`` rounded up to a line; cached per
    Python thread, dtype and size; the loops zero what they use, so it carries nothing
    from one call to the next). ``alloc_threaded_grad`` aligns only the first row unless
    ``n_params`` is a multiple of a line. Measured on a Zen 4 at 2 threads, network 1 of
    issue 14 (68,970 float32 parameters, ``python bench/jit_profile.py cifar_dense``):
    thread 1's first-layer pullback, which adds into its row with vector loads and
    stores that then all straddle two lines, took 49 ms of CPU per epoch against thread
    0's 39 (with 10 logits replaced by 16, which aligns the rows: 40 and 39), and thread 0
    waited for it."""
    isz = G.dtype.itemsize
    if G.ctypes.data % ALIGN_BYTES == 0 and G.shape[1] * isz % ALIGN_BYTES == 0:
        return G
    stride = -(-G.shape[1] * isz // ALIGN_BYTES) * ALIGN_BYTES // isz  # see _copy_rows_back
    cache = getattr(_grad_rows_tls, "rows", None)
    if cache is None:
        cache = _grad_rows_tls.rows = {}
    key = (G.dtype.str, G.shape[0], stride)
    if key not in cache:
        cache[key] = aligned_zeros((G.shape[0], stride), G.dtype)
    return cache[key]


def _copy_rows_back(rows, G):
    """End of a training call: ``G`` gets what the loops left in ``rows`` (its rows
    hold what they would have held had the loops used ``G``)."""
    if rows is not G:
        G[:] = rows[:, :G.shape[1]]


def _valgrad(model, X, p, out, x_out, want_x, training, seed, step, state):
    _check_model(model)
    p = check_params(model.chain.n_params, p)
    key, step = check_random(seed, step)
    # training mode normalizes with batch statistics: the running ones are not needed
    state = model.chain._check_state(state, p.dtype, required=not training)
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
    if training:
        model.chain._check_batch_stats(n, "X")
    blocks = model.chain._stage_blocks(plan, n, nt, p.dtype, training)
    works, metas, kstate = model.chain._workspace(plan, nt, p.dtype, key, step, state, blocks)
    kernel = kernel_for(mod, plan, f"valgrad_{'x_' if want_x else ''}range_{model.loss.kernel_kind}",
                        training, default=True)
    combine, nstages = stage_kernels(mod, plan, p, works, training, backward=True)
    idx = np.arange(n)
    loops.call(loops.valgrad_threads, [(kernel, loops.valgrad_sig(X2, T, idx, p, gx)), combine],
               (nstages, X2, T, idx, 0, n, p, G, kstate, works, metas, losses,
                p.dtype.type(1.0 / n), gx))
    from .compiler.runtime import sum_rows

    sum_rows(G, out)
    pen = 0.0
    if model.l1 or model.l2:  # the penalty's value and gradient, as in the training step
        pen = float(loops.regularize(p, out, model._reg(p.dtype), NO_FROZEN))
    return float(losses.sum()) + pen, out, x_out


def valgrad(model, X, p, *, out=None, state=None, training=True, seed=0, step=0):
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
    state : ndarray, optional
        The layer state (:func:`~smallchains.init_state`); needed in inference mode by
        chains with BatchNorm (training mode normalizes with the batch's statistics and
        neither reads nor updates it). Not modified.
    training : bool, default True
        Training mode (Dropout active, BatchNorm with batch statistics) or inference
        (Dropout is the identity); see docs/api.md, "Modes and random numbers".
    seed, step : int, default 0
        Key and step counter of the random layers in training mode: the Dropout mask of
        row ``i`` of ``X`` is a function of ``(seed, step, i)``; :func:`train_batched` at
        optimizer step ``t`` uses ``step = t``.

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
    loss, g, _ = _valgrad(model, X, p, out, None, False, training, seed, step, state)
    return loss, g


def valgrad_with_input(model, X, p, *, out=None, x_out=None, state=None, training=True, seed=0,
                       step=0):
    """Loss and its gradients with respect to ``p`` and to the input ``X``.

    Like :func:`valgrad` (same ``state``, ``training``, ``seed``, ``step``), plus ``dL/dX`` of shape
    ``(N, *input_shape)`` (written into ``x_out`` if given). SimpleChains.jl:
    ``valgrad!((gx, gp), model, x, p)``.

    Returns
    -------
    (float, ndarray, ndarray)
        loss, ``dL/dp``, ``dL/dX``.
    """
    return _valgrad(model, X, p, out, x_out, True, training, seed, step, state)


class _Progress:
    def __init__(self, total, enabled, desc):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # optional dependency: say so instead of showing nothing
                import warnings

                warnings.warn("progress=True needs tqdm (pip install tqdm or "
                              "smallchains[progress]); training runs without a progress bar",
                              stacklevel=3)
            else:
                self.bar = tqdm(total=total, desc=desc)

    def update(self, n, loss):
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.6g}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


NO_FROZEN = np.zeros(0, dtype=np.int64)


def frozen_indices(chain, frozen) -> np.ndarray:
    """The ``frozen`` argument of the training functions as sorted int64 indices into ``p``.

    ``frozen`` is None (nothing frozen), a boolean mask of shape ``(n_params,)`` (True:
    frozen), or a sequence of layer indices (ints, negative ones count from the end) whose
    parameters are all frozen.

    Raises
    ------
    TypeError, ValueError
        A mask of another length or dtype, a layer index out of range.
    """
    if frozen is None:
        return NO_FROZEN
    n = chain.n_params
    a = np.asarray(frozen)
    if a.dtype == np.bool_:
        if a.shape != (n,):
            raise ValueError(f"frozen: a boolean mask must have shape ({n},) (n_params), got {a.shape}")
        return np.flatnonzero(a).astype(np.int64)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise TypeError("frozen must be a boolean mask of shape (n_params,) or a sequence of "
                        f"layer indices, got {a.dtype} of shape {a.shape}")
    offsets = np.cumsum([0] + [layer.n_params(ins) for layer, (ins, _) in
                               zip(chain.layers, chain._shapes)])
    idx = []
    for i in a.tolist():
        if not -len(chain.layers) <= i < len(chain.layers):
            raise ValueError(f"frozen: layer index {i} out of range for a chain of "
                             f"{len(chain.layers)} layers")
        i %= len(chain.layers)
        idx.append(np.arange(offsets[i], offsets[i + 1]))
    return np.unique(np.concatenate(idx or [NO_FROZEN])).astype(np.int64)


def _check_clip(clip_norm):
    if clip_norm is None:
        return None
    from ._validate import check_real

    return check_real("training", "clip_norm", clip_norm, 0.0, low_open=True)


def _train_setup(G, p, model, X, opt, seed, state, training, batch_size=None, batched=False,
                 clip_norm=None, frozen=None, kernel_checks=False):
    """Validated arrays, kernels, optimizer state and workspaces of a training run; a
    batched run gets its minibatch size (``batch_size`` or :func:`default_batch_size`).
    The last item is ``(reg, frozen, slices)`` of the compiled step (see
    :func:`smallchains.compiler.loops._regularize` and :func:`update_slices`)."""
    _check_model(model)
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be a smallchains optimizer (e.g. sc.Adam(1e-3)), got {type(opt).__name__}")
    p = check_params(model.chain.n_params, p, writable=True)
    G = _check_G(G, p)
    X2, T, mod, plan = _prepare(model, X, p, step_rows=batch_size if batched else None,
                                n_threads=G.shape[0], kernel_checks=kernel_checks)
    key, _ = check_random(seed)
    user_state = model.chain._check_state(state, p.dtype)
    state, hyper = opt.prepare(p)
    if batched and batch_size is None:
        batch_size = default_batch_size(plan.B, G.shape[0], X2.shape[0])
    rows = min(batch_size, X2.shape[0]) if batched else X2.shape[0]  # per step
    blocks = model.chain._stage_blocks(plan, rows, G.shape[0], p.dtype, training)
    works, metas, lstate = model.chain._workspace(plan, G.shape[0], p.dtype, key, 0, user_state,
                                                  blocks)
    gx = np.empty((0, plan.n_in), dtype=p.dtype)
    losses = np.zeros(G.shape[0], dtype=p.dtype)
    g = np.zeros_like(p)
    reg = (model._reg(p.dtype, _check_clip(clip_norm)), frozen_indices(model.chain, frozen),
           update_slices(p.shape[0], G.shape[0]))
    return (p, G, X2, T, mod, plan, state, hyper, (lstate, works, metas), gx, losses, g, user_state,
            batch_size, reg)


#: Parameter count from which a training step on several threads sums the gradient rows
#: and updates the parameters in parallel, each thread its slice (below it, one thread
#: does both: the split gains nothing there and its two parallel regions would cost about
#: 1.3 s more cold compile, as for the matrix exponential's 756 parameters). Measured on
#: the MNIST MLP (101,770 parameters, batch 32 on 2 threads): in-process epoch on an
#: AVX-512 Xeon (model 167) 511 -> 409 ms at 32-sample blocks, on a Zen 5 168 -> 136-145 ms
#: at 16-sample blocks.
PARALLEL_UPDATE_PARAMS = 16384


def update_slices(n_params, n_threads):
    """None, or the ``n_threads + 1`` bounds of each thread's slice of the parameters in
    the parallel sum and update of a training step (:data:`PARALLEL_UPDATE_PARAMS`). The
    bounds are multiples of 16 (whole 64-byte lines of float32: no cache line is written by
    two threads)."""
    if n_threads == 1 or n_params < PARALLEL_UPDATE_PARAMS:
        return None
    b = np.arange(n_threads + 1, dtype=np.int64) * n_params // n_threads // 16 * 16
    b[-1] = n_params
    return b


def _save_state(user_state, ws, plan):
    """Copy the running statistics the kernels updated back into the caller's state."""
    if user_state is not None and plan.n_state:
        user_state[:] = ws[0][:plan.n_state]


#: Target duration, in seconds, of one call of a compiled training loop. The drivers run
#: a training in calls ("chunks") of as many steps as take about this long, measured as
#: they go, and Python handles Ctrl-C (KeyboardInterrupt) between two calls, so this is
#: about how long training takes to stop. ``None``: one call for the whole run.
CHUNK_SECONDS = 0.15

# (loop, chain module, loss, optimizer, rows per step, threads) -> seconds per step, last
# measured: a later run with the same key sizes its first chunk from it
_step_seconds: dict = {}


class _Chunks:
    """Step counts for successive calls of a compiled training loop (see CHUNK_SECONDS).
    Without an earlier measurement the first call is one step; each call's duration
    then sizes the next."""

    def __init__(self, key):
        self.key = key
        seconds = _step_seconds.get(key)
        self.size = 1 if seconds is None and CHUNK_SECONDS is not None else self._fit(seconds)

    @staticmethod
    def _fit(seconds_per_step):
        if CHUNK_SECONDS is None:
            return 2 ** 62
        return max(1, int(CHUNK_SECONDS / max(seconds_per_step, 1e-9)))

    def run(self, fn, steps_before, info):
        """``fn()`` (one call of the loop), timed; ``info[0]`` counts the steps done."""
        start = time.perf_counter()
        fn()
        steps = int(info[0]) - steps_before
        if steps > 0:
            seconds = (time.perf_counter() - start) / steps
            _step_seconds[self.key] = seconds
            self.size = self._fit(seconds)


def _nonfinite_error(info, loss, where, state_note, history, **extra):
    """The FloatingPointError of a training loop stopped by a non-finite loss or gradient
    (``info[1]``); ``history`` (and ``extra``) become attributes."""
    if info[1] == loops.GRAD_NOT_FINITE:
        kind, what = "gradient", f"the gradient is not finite (the loss is {loss})"
    else:
        kind, what = "loss", f"loss is {loss}"
    err = FloatingPointError(f"{what} {where}; {state_note}. Lower the learning rate or "
                             "check the data.")
    err.history, err.nonfinite = history, kind
    for k, v in extra.items():
        setattr(err, k, v)
    return err


def _schedule(lr_schedule, n, dtype, what):
    """``lr_schedule(k)`` for ``k = 0 .. n-1`` as an array of ``dtype`` (empty if None),
    each checked to be a finite positive number."""
    if lr_schedule is None:
        return np.zeros(0, dtype)
    if not callable(lr_schedule):
        raise TypeError(f"lr_schedule must be a function of the {what} (see smallchains.schedules), "
                        f"got {type(lr_schedule).__name__}")
    lrs = np.empty(n, dtype)
    for k in range(n):
        v = lr_schedule(k)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not np.isfinite(v) or v <= 0:
            raise ValueError(f"lr_schedule({k}) must be a finite number > 0, got {v!r}")
        lrs[k] = v
    return lrs


def train_unbatched(G, p, model, X, opt, iters, *, state=None, callback=None, report_every=None,
                    progress=False, training=True, seed=None, lr_schedule=None, clip_norm=None,
                    frozen=None):
    """Full-batch training: ``iters`` optimizer steps on all of ``X``, ``p`` in place.

    Each step computes the loss and gradient on every sample (split over ``G.shape[0]``
    threads, one gradient row each), sums the rows in fixed order and applies ``opt``.
    The steps run in compiled code, in calls of about :data:`CHUNK_SECONDS` each (the step
    count per call is measured and adapted as training goes); the result is bitwise the
    same as one call for all steps. With ``callback`` or ``progress`` a call also ends
    every ``report_every`` steps (default ``max(1, iters // 100)``).

    Parameters
    ----------
    G : ndarray, shape ``(n_threads, n_params)``, ``n_threads >= 1``, dtype of ``p``
        Scratch, overwritten.
    p : ndarray, shape ``(n_params,)`` -- updated in place.
    model : SimpleChainWithLoss
    X : ndarray, shape ``(N, *input_shape)`` -- copied once if not C-contiguous or of
        another float dtype than ``p``; never modified.
    opt : Optimizer -- its state (``opt.state``, ``opt.t``) advances by one per step.
    iters : int (Python or numpy integer; floats are rejected, not truncated), ``>= 0``
    callback : callable ``(step, loss, p) -> bool or None``, optional
        Called every ``report_every`` steps and after the last, with the number of steps
        done and the loss before the last of them. Returning True stops training there:
        the history then has the ``step`` losses of the steps done.
    report_every : int, optional
    progress : bool -- show a tqdm bar.
    training : bool, default True -- training mode (Dropout active) or inference.
    state : ndarray, optional -- the layer state (:func:`~smallchains.init_state`),
        required by chains with BatchNorm; its running statistics are updated in place
        (also when training stops early).
    seed : int, optional -- key of the random layers (Dropout masks of step ``t`` depend
        on ``(seed, t, row)``, see docs/api.md); default a fresh key.
    lr_schedule : callable ``k -> lr``, optional
        The learning rate of step ``k = 0 .. iters-1`` of this call (for example
        ``smallchains.schedules.cosine(1e-3, iters)``), evaluated for every step before
        training starts and applied inside the compiled loop; ``opt.lr`` is not changed.
    clip_norm : float, optional -- clip the gradient of every step to this global
        (Euclidean) norm, as ``torch.nn.utils.clip_grad_norm_(params, clip_norm)`` before
        ``opt.step()``: scaled by ``clip_norm / (norm + 1e-6)`` when that is below 1.
    frozen : optional -- parameters left unchanged: a boolean mask of shape
        ``(n_params,)`` (True: frozen) or a sequence of layer indices (see
        :func:`frozen_indices`). Their gradient is zeroed before the clipping and the
        update, and the update (AdamW's decay included) is undone for them, as torch's
        ``requires_grad_(False)``; their optimizer moments decay as with zero gradients.

    Returns
    -------
    ndarray, shape ``(iters,)`` (fewer if ``callback`` stopped training), dtype of ``p``
        Loss before each step (with the penalty of an L1/L2-penalized model).

    Raises
    ------
    FloatingPointError
        The loss or the gradient of a step is NaN or Inf; the message says which and names
        the iteration. That step is not applied: ``p``, ``opt.state`` and ``opt.t`` hold
        the values after the last good step. Attributes: ``history`` (losses of the steps
        applied, shape ``(k,)``), ``nonfinite`` (``"loss"`` or ``"gradient"``).
    KeyboardInterrupt
        Ctrl-C stops training within about :data:`CHUNK_SECONDS`: ``p``, ``opt.state``
        and ``opt.t`` hold the values after the last completed step, and the exception's
        ``history`` attribute holds the losses of the completed steps (``opt.t`` grew by
        ``len(history)``).
    TypeError, ValueError
        Bad input (e.g. ``G`` with zero rows, a float ``iters``), raised before anything
        is modified.

    Notes
    -----
    Calls from several Python threads at once are safe if they share no ``G``, ``p`` or
    ``opt`` (see :func:`smallchains.compiler.loops.call` for the threading layers).

    SimpleChains.jl: ``train_unbatched!(G, p, model, X, opt, iters)``.
    """
    iters = check_count(iters, "iters")
    if report_every is not None:
        report_every = check_count(report_every, "report_every", 1)
    (p, G, X2, T, mod, plan, state, hyper, ws, gx, losses, g,
     user_state, _, reg) = _train_setup(G, p, model, X, opt, seed, state, training,
                                        clip_norm=clip_norm, frozen=frozen)
    if training:
        model.chain._check_batch_stats(X2.shape[0], "X")
    lrs = _schedule(lr_schedule, iters, p.dtype, "step")
    hist = np.zeros(iters, dtype=p.dtype)
    idx = np.arange(X2.shape[0])
    kernels, nstages = _train_kernels(model, mod, plan, opt, X2, T, idx, p, gx, state, hyper,
                                      training, ws[1])
    every = iters if (callback is None and not progress) else (report_every or max(1, iters // 100))
    info = np.zeros(2, dtype=np.int64)  # steps applied, status (set by the compiled loop)
    t0 = opt.t
    loop = loops.train_unbatched_loop

    rows = _aligned_grad_rows(G)

    def args(k):
        return (nstages, X2, T, idx, p, rows, *ws, losses, g, state, hyper, t0, k, hist, gx, info, lrs,
                *reg)

    if iters:
        loops.prepare(loop, kernels, args(1))  # compile first: chunks are timed
    chunks = _Chunks((loop, mod.__name__, model.loss.kernel_kind, opt.kind, X2.shape[0], G.shape[0]))
    bar = _Progress(iters, progress, "train_unbatched")
    shown = 0
    try:
        while info[0] < iters:
            done = int(info[0])
            k = min(chunks.size, iters - done, every - done % every)
            chunks.run(lambda: loops.call(loop, kernels, args(k)), done, info)
            opt.t = t0 + int(info[0])
            done = int(info[0])
            if info[1] != loops.OK:
                raise _nonfinite_error(
                    info, hist[done], f"at iteration {done} (0-based) of train_unbatched",
                    "p and the optimizer state hold the values of that iteration (the step is "
                    "not applied)", hist[:done].copy())
            if done % every == 0 or done == iters:
                bar.update(done - shown, float(hist[done - 1]))
                shown = done
                if callback is not None and callback(done, float(hist[done - 1]), p) is True:
                    return hist[:done].copy()
    except KeyboardInterrupt as e:
        e.history = hist[:int(info[0])].copy()
        raise
    finally:
        opt.t = t0 + int(info[0])
        _save_state(user_state, ws, plan)
        _copy_rows_back(rows, G)
        bar.close()
    return hist


def default_batch_size(block: int, n_threads: int, n: int) -> int:
    """Default minibatch size: four blocks per thread, at least 64, at most ``n``."""
    return max(1, min(n, max(64, 4 * block * n_threads)))


def accuracy_and_loss(model, X, *args, state=None):
    """Classification accuracy and mean loss: ``accuracy_and_loss(model, X, labels, p)``
    or ``accuracy_and_loss(model, X, p)`` (the model's own labels).

    One forward pass: the chain's logits are computed once (compiled, threaded) and both
    numbers come from them in numpy, in the dtype of ``p``: the loss is the mean of
    ``logsumexp(logits[n]) - logits[n, label[n]]`` (stable log-softmax), which is the
    model's compiled :class:`~smallchains.LogitCrossEntropyLoss` (``model(X, p, labels)``)
    and ``torch.nn.functional.cross_entropy`` to rounding.

    The positional arguments after ``X`` are ``labels, p`` or ``p``: ``labels`` an int
    array of shape ``(N,)`` of 0-based classes in ``[0, n_classes)`` (default the
    model's own labels), ``p`` the parameters, shape ``(n_params,)``, float32 or float64.
    Sample weights of the model's loss are ignored: both numbers are plain means.

    Parameters
    ----------
    model : SimpleChainWithLoss with a :class:`~smallchains.LogitCrossEntropyLoss`
    X : ndarray, shape ``(N, *input_shape)``, float (a single sample is rejected)
    *args : ``(labels, p)`` or ``(p,)``, see above
    state : ndarray, keyword-only -- the layer state (:func:`~smallchains.init_state`),
        required by chains with BatchNorm (inference mode: running statistics).

    Returns
    -------
    (float, float)
        Fraction of samples whose largest logit (the first, on ties) is the label, and
        the mean loss.

    Raises
    ------
    TypeError
        ``model`` has no loss or a regression loss; a wrong number of arguments; float
        labels; bad dtypes of ``X`` or ``p``.
    ValueError
        Labels of the wrong shape or out of range; bad shapes, NaN or Inf in ``X``; a
        chain output that is not 1-D logits. Checked before the forward pass.

    SimpleChains.jl: ``accuracy_and_loss(model, X, Y, p)``.
    """
    from .predict import log_softmax

    _check_model(model)
    if len(args) == 1:
        labels, p = None, args[0]
    elif len(args) == 2:
        labels, p = args
    else:
        raise TypeError("use accuracy_and_loss(model, X, labels, p) or accuracy_and_loss(model, X, p)")
    if not getattr(model.loss, "labels", False):
        raise TypeError(f"accuracy needs a classification loss, got {type(model.loss).__name__}")
    chain = model.chain
    p = check_params(chain.n_params, p)
    if model.loss.weights is not None:  # accuracy and loss over the samples, unweighted
        model = SimpleChainWithLoss(chain, model.loss.with_targets(model.loss.targets))
    X2, T, _, _ = _prepare(model, X, p, labels)  # validates X, the labels and the output shape
    n = X2.shape[0]
    logits = chain(X2.reshape((n,) + chain.input_shape), p, state=state)  # (N, n_classes)
    rows = np.arange(n)
    per_sample = -log_softmax(logits, axis=1)[rows, T]
    loss = per_sample.sum(dtype=p.dtype) * p.dtype.type(1.0 / n)
    acc = np.count_nonzero(np.argmax(logits, axis=1) == T) / n
    return float(acc), float(loss)


def _epoch_history(out, hist, done, nbatch):
    """Mean losses of the epochs completed after ``done`` steps (``out[e]`` may not be
    written yet for the last of them; ``hist`` then still holds its minibatch losses)."""
    ne = done // nbatch
    if ne and done % nbatch == 0:
        out[ne - 1] = hist.mean()
    return out[:ne].copy()


class _Validation:
    """The ``validation``, ``restore_best`` and ``patience`` options of train_batched."""

    def __init__(self, model, validation, restore_best, patience):
        self.on = validation is not None
        self.history, self.best, self.best_p, self.best_state, self.since = [], np.inf, None, None, 0
        self.restore = bool(restore_best)
        self.patience = None if patience is None else check_count(patience, "patience", 1)
        if not self.on:
            if restore_best or patience is not None:
                raise ValueError("restore_best and patience need validation=(X_val, targets_val)")
            return
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError("validation must be a pair (X_val, targets_val)")
        self.X, targets = validation
        self.model = SimpleChainWithLoss(model.chain, model.loss.with_targets(targets))

    def check(self, p):
        """Validate the data now (before training changes anything)."""
        if self.on:
            try:
                X2, _ = check_inputs(self.model.chain.input_shape, self.X, p.dtype, allow_single=False)
                self.model.loss.prepare_targets(self.model.chain.output_shape, X2.shape[0], p.dtype)
            except (TypeError, ValueError) as e:
                raise type(e)(f"validation: {e}") from None
            self.X = X2

    def after_epoch(self, e, p, lstate) -> bool:
        """Evaluate; keep the best parameters; True if patience ran out."""
        if not self.on:
            return False
        v = self.model(self.X, p, state=None if lstate is None else lstate.copy())
        self.history.append(v)
        if v < self.best:
            self.best, self.since = v, 0
            if self.restore:
                self.best_p = p.copy()
                self.best_state = None if lstate is None else lstate.copy()
        else:
            self.since += 1
        return self.patience is not None and self.since >= self.patience

    def result(self, out, p, lstate, plan):
        if not self.on:
            return out
        if self.restore and self.best_p is not None:
            p[:] = self.best_p
            if self.best_state is not None:
                lstate[:plan.n_state] = self.best_state
        return out, np.asarray(self.history, dtype=p.dtype)


def train_batched(G, p, model, X, opt, epochs, *, batch_size=None, shuffle=True, seed=None,
                  state=None, callback=None, progress=False, training=True, lr_schedule=None,
                  clip_norm=None, frozen=None, validation=None, restore_best=False,
                  patience=None):
    """Minibatch training for ``epochs`` passes over ``X``, ``p`` in place.

    Every epoch visits the samples in a new random order (``shuffle=True``, from
    ``numpy.random.default_rng(seed)``) in minibatches of ``batch_size``; each minibatch is
    split over the ``G.shape[0]`` threads. When ``N`` is not a multiple of ``batch_size``
    the last minibatch of each epoch is smaller and still taken (its loss is its own mean).
    The steps run in compiled code, in calls of about :data:`CHUNK_SECONDS` each (never
    across an epoch's end); the result is bitwise the same as one call per epoch.

    Parameters
    ----------
    G : ndarray, shape ``(n_threads, n_params)``, ``n_threads >= 1``, dtype of ``p``
        Scratch, overwritten.
    p : ndarray, shape ``(n_params,)`` -- updated in place.
    model : SimpleChainWithLoss
    X : ndarray, shape ``(N, *input_shape)`` -- copied once if not C-contiguous or of
        another float dtype than ``p``; never modified.
    opt : Optimizer -- its state advances by one step per minibatch.
    epochs : int (Python or numpy integer; floats are rejected, not truncated), ``>= 0``
    batch_size : int, optional, ``>= 1``
        Default :func:`default_batch_size`: ``min(N, max(64, 4 * B * n_threads))`` where
        ``B`` is the chain's block size (16 for LeNet5, so 128 at 2 threads).
    shuffle : bool, default True
    state : ndarray, optional
        The layer state (:func:`~smallchains.init_state`), required by chains with
        BatchNorm; its running statistics are updated in place, once per minibatch.
    seed : int, optional
        Seed of the shuffling generator and key of the random layers (the Dropout mask
        of a row at optimizer step ``t`` depends only on ``(seed, t, row)``, see
        docs/api.md); default fresh entropy for both.
    callback : callable ``(epoch, mean_loss, p) -> bool or None``, optional
        Called after every epoch (1-based epoch number). Returning True stops training
        after that epoch: the history then has its ``epoch`` means.
    progress : bool
        A tqdm bar over epochs.
    training : bool, default True -- training mode (Dropout active) or inference.
    lr_schedule : callable ``e -> lr``, optional
        The learning rate of epoch ``e = 0 .. epochs-1`` of this call (all its
        minibatches), evaluated before training starts; ``opt.lr`` is not changed.
    clip_norm, frozen : optional -- gradient clipping and frozen parameters, as for
        :func:`train_unbatched`.
    validation : pair ``(X_val, targets_val)``, optional
        Data evaluated after every epoch, in inference mode (Dropout off, BatchNorm with
        its running statistics): the loss of ``model.loss.with_targets(targets_val)``
        (unweighted, without the penalty). Checked before training starts.
    restore_best : bool, default False
        With ``validation``: at the end (also when ``callback`` or ``patience`` stopped
        training) ``p`` and ``state`` are set to their values after the epoch of lowest
        validation loss (the first such epoch). The optimizer state is not restored.
    patience : int, optional
        With ``validation``: stop after this many epochs in a row without a new lowest
        validation loss (early stopping).

    Returns
    -------
    ndarray, shape ``(epochs,)`` (fewer if ``callback`` or ``patience`` stopped training)
        Mean minibatch loss of each epoch (losses at the parameters before each step).
        With ``validation``: a pair ``(train_history, validation_history)`` of two such
        arrays (the validation loss after each epoch).

    Raises
    ------
    FloatingPointError
        The loss or the gradient of a minibatch is NaN or Inf; the message says which and
        names the epoch and minibatch. That step is not applied: ``p``, ``opt.state`` and
        ``opt.t`` hold the values after the last good step. Attributes: ``history`` (mean
        losses of the completed epochs), ``batch_losses`` (losses of the minibatches
        applied in the failing epoch), ``nonfinite`` (``"loss"`` or ``"gradient"``).
    KeyboardInterrupt
        Ctrl-C stops training within about :data:`CHUNK_SECONDS`; ``p``, ``opt.state``
        and ``opt.t`` hold the values after the last completed step. Attributes
        ``history`` and ``batch_losses`` as above.
    TypeError, ValueError
        Bad input (e.g. ``G`` with zero rows, a float ``epochs`` or ``batch_size``),
        raised before anything is modified. A NaN or Inf in ``X`` gives the same
        ``ValueError`` as everywhere (naming the first such sample) and leaves everything
        as it was too, but for chains without BatchNorm it is found by the training
        kernels as they gather its minibatch (no pass over all of ``X`` before training):
        the steps before it are then undone (``p``, ``opt.state``, ``opt.t`` and ``G``
        restored from copies taken at the start; see docs/api.md).

    Notes
    -----
    Calls from several Python threads at once are safe if they share no ``G``, ``p`` or
    ``opt`` (see :func:`smallchains.compiler.loops.call` for the threading layers).

    SimpleChains.jl: ``train_batched!(G, p, model, X, opt, iters; batchsize)``.
    """
    epochs = check_count(epochs, "epochs")
    if batch_size is not None:
        batch_size = check_count(batch_size, "batch_size", 1)
    val = _Validation(model, validation, restore_best, patience)
    opt_state = getattr(opt, "state", None)  # None until the optimizer's first run (opt checked below)
    # X not scanned for NaN and Inf up front: the kernels find one in the gather of its
    # minibatch, and the run is then undone (the copies `undo`) before the ValueError
    _check_model(model)
    kernel_checks = epochs > 0 and _kernels_check_X(model.chain)
    (p, G, X2, T, mod, plan, state, hyper, ws, gx, losses, g, user_state,
     batch_size, reg) = _train_setup(G, p, model, X, opt, seed, state, training, batch_size, True,
                                     clip_norm, frozen, kernel_checks=kernel_checks)
    val.check(p)
    undo = (p.copy(), None if opt_state is None else state.copy(), G.copy()) \
        if kernel_checks else None
    bad_X = None
    n = X2.shape[0]
    if training:
        model.chain._check_batch_stats(min(batch_size, n), "a minibatch")
        if n % batch_size:
            model.chain._check_batch_stats(n % batch_size, "the last minibatch of each epoch")
    lrs = _schedule(lr_schedule, epochs, p.dtype, "epoch")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    kernels, nstages = _train_kernels(model, mod, plan, opt, X2, T, perm, p, gx, state, hyper,
                                      training, ws[1])
    nbatch = -(-n // batch_size)
    hist = np.zeros(nbatch, dtype=p.dtype)  # minibatch losses of the current epoch
    out = np.zeros(epochs, dtype=p.dtype)
    info = np.zeros(2, dtype=np.int64)  # steps applied, status (set by the compiled loop)
    t0 = opt.t
    loop = loops.train_batched_loop

    rows = _aligned_grad_rows(G)

    def args(k):
        return (nstages, X2, T, perm, batch_size, k, p, rows, *ws, losses, g, state, hyper, t0, hist,
                gx, info, *reg)

    if epochs:
        loops.prepare(loop, kernels, args(1))  # compile first: chunks are timed
    chunks = _Chunks((loop, mod.__name__, model.loss.kernel_kind, opt.kind, batch_size, G.shape[0]))
    bar = _Progress(epochs, progress, "train_batched")
    try:
        for e in range(epochs):
            if lrs.shape[0]:
                hyper[0] = lrs[e]
            if shuffle:
                rng.shuffle(perm)
            while info[0] < (e + 1) * nbatch:
                done = int(info[0])
                k = min(chunks.size, (e + 1) * nbatch - done)
                chunks.run(lambda: loops.call(loop, kernels, args(k)), done, info)
                opt.t = t0 + int(info[0])
                if info[1] != loops.OK:
                    b = int(info[0]) - e * nbatch
                    # the first epoch visits every row: a value not finite from the start is
                    # found there (one written into X later, by a callback say, is not undone)
                    if undo is not None and e == 0 and info[1] == loops.LOSS_NOT_FINITE and \
                            not np.isfinite(X2[perm[b * batch_size:(b + 1) * batch_size]]).all():
                        bad_X = nonfinite_error(X2)
                        info[0] = 0  # nothing applied: opt.t as before
                        raise bad_X
                    raise _nonfinite_error(
                        info, hist[b], f"in epoch {e + 1}, minibatch {b} (0-based) of train_batched",
                        "p and the optimizer state hold the values before that step", out[:e].copy(),
                        batch_losses=hist[:b].copy())
            out[e] = hist.mean()
            bar.update(1, float(out[e]))
            stop = val.after_epoch(e, p, ws[0][:plan.n_state] if plan.n_state else None)
            if callback is not None and callback(e + 1, float(out[e]), p) is True or stop:
                return val.result(out[:e + 1].copy(), p, ws[0], plan)
    except KeyboardInterrupt as exc:
        done = int(info[0])
        exc.history = _epoch_history(out, hist, done, nbatch)
        exc.batch_losses = hist[:done % nbatch].copy()
        if validation is not None:
            exc.validation_history = np.asarray(val.history, dtype=p.dtype)
        raise
    except FloatingPointError as exc:
        if validation is not None:
            exc.validation_history = np.asarray(val.history, dtype=p.dtype)
        raise
    finally:
        opt.t = t0 + int(info[0])
        _save_state(user_state, ws, plan)
        _copy_rows_back(rows, G)
        bar.close()
        if bad_X is not None:  # as if rejected up front: p, the optimizer and G restored
            p[:], G[:] = undo[0], undo[2]
            if opt_state is None:
                opt.state = None
            else:
                state[:] = undo[1]
    return val.result(out, p, ws[0], plan)
