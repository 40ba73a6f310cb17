"""Many independent small fits: ensembles, hyperparameter sweeps, one model per subject.

:func:`fit_many` trains many parameter vectors, each from its own configuration (seed,
optimizer hyperparameters, rows of a shared dataset or a dataset of its own, even another
model), on all local cores or on a Dask cluster.

In process (``backend="threads"``) every thread runs the compiled loop
:func:`smallchains.compiler.loops.fit_worker` without the GIL: a thread takes the next fit
from a shared atomic counter and runs it from its first step to its last, alone, so fits
never wait for each other and the threads stay busy until the last fit is taken. Each fit
computes bitwise what :func:`~smallchains.train_unbatched` or
:func:`~smallchains.train_batched` compute at one thread, whatever the thread count.

With Dask (``backend=client`` or ``"dask"``) the fits are cut into tasks; each task runs the
in-process backend on one thread of its worker, so a worker runs as many fits at once as it
has Dask threads and never more (numba's own thread pool is not used). The chain's kernels
compile once per worker process (or load from ``$SMALLCHAINS_CACHE_DIR``), never per fit or
task. See docs/many-fits.md.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import sys
import threading
from dataclasses import dataclass, field

import numba
import numpy as np

from ._validate import check_count, check_dtype, check_inputs, check_random
from .chain import SimpleChainWithLoss, init_params, init_state, kernel_for, stage_kernels
from .compiler import loops
from .compiler.runtime import aligned_zeros
from .optim import Adam, Optimizer

__all__ = ["FitResult", "fit_many"]

#: keys a configuration may hold besides the optimizer's hyperparameters
CONFIG_KEYS = ("seed", "p", "state", "rows", "data", "model")


@dataclass
class FitResult:
    """The outcome of one fit of :func:`fit_many`.

    Attributes
    ----------
    p : ndarray, shape ``(n_params,)``
        The trained parameters (after the last step applied; the initial ones if none was).
    history : ndarray
        ``iters``: the loss before each step applied, shape ``(steps,)``. ``epochs``: the
        mean minibatch loss of each completed epoch.
    status : str
        ``"ok"``; ``"loss not finite"`` / ``"gradient not finite"`` (the fit stopped before
        applying that step); ``"interrupted"`` (Ctrl-C); ``"error"`` (its Dask task failed).
    steps : int
        Optimizer steps applied.
    config : dict
        The configuration the fit was given (the caller's dict).
    state : ndarray or None
        The layer state after training (BatchNorm running statistics), if the chain has one.
    message : str
        Why the fit did not end ``"ok"`` (empty otherwise).
    """

    p: np.ndarray
    history: np.ndarray
    status: str
    steps: int
    config: dict = field(repr=False)
    state: np.ndarray | None = field(default=None, repr=False)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def final_loss(self) -> float:
        """The last entry of :attr:`history` (NaN if it is empty)."""
        return float(self.history[-1]) if len(self.history) else math.nan


# ------------------------------------------------------------------------------------------
# validation: everything is checked before any work starts


def _hyper_names(opt):
    return _init_params_of(type(opt))


@functools.lru_cache(maxsize=None)
def _init_params_of(cls):
    return tuple(k for k in inspect.signature(cls.__init__).parameters if k != "self")


def _configs(configs):
    if isinstance(configs, (int, np.integer)) and not isinstance(configs, (bool, np.bool_)):
        return [{"seed": i} for i in range(check_count(configs, "configs", 1))]
    if isinstance(configs, (dict, str, bytes)) or not hasattr(configs, "__iter__"):
        raise TypeError("configs must be a number of fits or a sequence of dicts, one per fit "
                        f"(keys {', '.join(CONFIG_KEYS)} or optimizer hyperparameters), got "
                        f"{type(configs).__name__}")
    configs = list(configs)
    if not configs:
        raise ValueError("configs is empty: give at least one fit")
    for i, c in enumerate(configs):
        if not isinstance(c, dict):
            raise TypeError(f"configs[{i}] must be a dict, got {type(c).__name__}")
    return configs


def _check_model(model, what):
    if not isinstance(model, SimpleChainWithLoss):
        raise TypeError(f"{what} must be a model with a loss (sc.add_loss(chain, loss)), got "
                        f"{type(model).__name__}")
    return model


class _Fit:
    """One validated fit: its model, seed, initial arrays, hyperparameters and rows."""

    def __init__(self, i, config, model, opt, X, dtype, training):
        where = f"configs[{i}]"
        allowed = set(CONFIG_KEYS) | set(_hyper_names(opt))
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        self.index, self.config = i, config
        self.model = _check_model(config.get("model", model), f"{where}['model']")
        chain = self.model.chain
        self.seed, _ = check_random(config.get("seed", i))
        # the optimizer: a fresh copy of the template with this fit's hyperparameters
        o = copy.copy(opt)
        o.reset()
        for k in _hyper_names(opt):
            if k in config:
                setattr(o, k, config[k])
        try:
            self.hyper = np.asarray(o._hyper(), dtype=dtype)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
        self.opt = o
        if "p" in config:
            p = config["p"]
            if not isinstance(p, np.ndarray) or p.shape != (chain.n_params,) or p.dtype != dtype:
                raise ValueError(f"{where}['p'] must be a {dtype} array of shape ({chain.n_params},), "
                                 f"got {getattr(p, 'dtype', type(p).__name__)} {getattr(p, 'shape', '')}")
            if not np.isfinite(p).all():
                raise ValueError(f"{where}['p'] contains NaN or Inf")
            self._p0 = p.copy()
        else:
            self._p0 = None  # init_params(chain, seed), drawn when first needed (see p0)
        self.dtype = dtype
        if "state" in config:
            self.state0 = chain._check_state(np.asarray(config["state"]), dtype).copy()
        else:
            self.state0 = init_state(chain, dtype) if chain.n_state else None
        self.rows = None
        if "data" in config and "rows" in config:
            raise ValueError(f"{where}: give 'rows' (of the shared X) or 'data' (its own), not both")
        if "data" in config:
            d = config["data"]
            if not isinstance(d, (tuple, list)) or len(d) != 2:
                raise TypeError(f"{where}['data'] must be a pair (X, Y) of the fit's inputs and targets")
            try:
                self.X, _ = check_inputs(chain.input_shape, d[0], dtype, allow_single=False)
                self.T = self.model.loss.prepare_targets(chain.output_shape, self.X.shape[0], dtype, d[1])
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}['data']: {e}") from None
            self.block = ("own", i)
        else:
            if X is None:
                raise ValueError(f"{where} has no 'data' of its own and no shared X was given")
            self.X, self.T = X.arrays(self.model, dtype, where)
            if "rows" in config:
                rows = np.asarray(config["rows"])
                if rows.dtype.kind not in "iu" or rows.ndim != 1 or not len(rows):
                    raise ValueError(f"{where}['rows'] must be a non-empty 1-D integer array of "
                                     f"rows of X, got {rows.dtype} shape {rows.shape}")
                if rows.min() < 0 or rows.max() >= self.X.shape[0]:
                    raise ValueError(f"{where}['rows'] must lie in [0, {self.X.shape[0]}), got "
                                     f"[{rows.min()}, {rows.max()}]")
                self.rows = rows.astype(np.int64)
            self.block = ("shared", id(self.model.loss))
        self.n = self.X.shape[0] if self.rows is None else self.rows.shape[0]
        if training:
            chain._check_batch_stats(self.n, f"{where}: the data")


    @property
    def p0(self):
        """The initial parameters (with Dask, drawn in the worker; here only if needed)."""
        if self._p0 is None:
            self._p0 = init_params(self.model.chain, seed=self.seed, dtype=self.dtype)
        return self._p0


class _Shared:
    """The shared X, converted once per dtype, with each model's targets."""

    def __init__(self, X):
        self.raw, self._x, self._t = X, {}, {}

    def arrays(self, model, dtype, where):
        chain = model.chain
        key = (chain.input_shape, np.dtype(dtype).name)
        try:
            if key not in self._x:
                self._x[key] = check_inputs(chain.input_shape, self.raw, dtype, allow_single=False)[0]
            X2 = self._x[key]
            tk = (id(model.loss), chain.output_shape, np.dtype(dtype).name)
            if tk not in self._t:
                self._t[tk] = model.loss.prepare_targets(chain.output_shape, X2.shape[0], dtype)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: shared X / the model's targets: {e}") from None
        return X2, self._t[tk]


def _prepare(model, X, configs, optimizer, iters, epochs, batch_size, dtype, training):
    _check_model(model, "model")
    dtype = check_dtype(dtype)
    if optimizer is None:
        optimizer = Adam()
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a smallchains optimizer (e.g. sc.Adam(1e-3)), got "
                        f"{type(optimizer).__name__}")
    if (iters is None) == (epochs is None):
        raise TypeError("give exactly one of iters (full-batch steps) and epochs (minibatch passes)")
    if iters is not None:
        iters = check_count(iters, "iters")
        if batch_size is not None:
            raise TypeError("batch_size goes with epochs (minibatch training), not iters")
    else:
        epochs = check_count(epochs, "epochs")
        if batch_size is not None:
            batch_size = check_count(batch_size, "batch_size", 1)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False, got {training!r}")
    shared = None if X is None else _Shared(X)
    fits = [_Fit(i, c, model, optimizer, shared, dtype, bool(training))
            for i, c in enumerate(_configs(configs))]
    if batch_size is not None:
        for f in fits:
            if training:
                f.model.chain._check_batch_stats(min(batch_size, f.n), f"configs[{f.index}]: a minibatch")
                if f.n % batch_size:
                    f.model.chain._check_batch_stats(f.n % batch_size, f"configs[{f.index}]: "
                                                     "the last minibatch of each epoch")
    return fits, optimizer, iters, epochs, batch_size, dtype


def _groups(fits):
    """Fits by chain and loss kind (one compiled kernel set each), in first-seen order."""
    out = {}
    for f in fits:
        out.setdefault((id(f.model.chain), f.model.loss.kernel_kind), []).append(f)
    return list(out.values())


# ------------------------------------------------------------------------------------------
# the in-process backend


def _run_group(fits, iters, epochs, batch_size, shuffle, dtype, training, n_threads, bar, stop,
               control=(None, None)):
    """Train one group of fits (same chain and loss) on ``n_threads`` Python threads that
    each run :func:`loops.fit_worker`; returns their results in order."""
    from .train import default_batch_size

    model = fits[0].model
    chain = model.chain
    batched = epochs is not None
    # each fit runs on one thread: the block train_batched(batch_size=...) picks at one thread
    B = chain._train_block(batch_size, 1, dtype) if batched and batch_size else None
    mod, plan = chain._kernels(np.dtype(dtype), model.loss, B)
    nf = len(fits)
    # the data blocks of all fits in one X / T, each block once (the shared X is one block;
    # fits on "rows" of it index it, without copies)
    blocks, table = {}, np.zeros((nf, 8), np.int64)
    X_parts, T_parts, row = [], [], 0
    for k, f in enumerate(fits):
        if f.block not in blocks:
            blocks[f.block] = row
            X_parts.append(f.X)
            T_parts.append(f.T)
            row += f.X.shape[0]
        table[k, loops.FIT_ROW], table[k, loops.FIT_BLOCK] = blocks[f.block], f.X.shape[0]
        table[k, loops.FIT_ROWS] = f.n
    Xa = X_parts[0] if len(X_parts) == 1 else np.ascontiguousarray(np.concatenate(X_parts))
    Ta = T_parts[0] if len(T_parts) == 1 else np.ascontiguousarray(np.concatenate(T_parts))
    bs = np.array([f.n if not batched else (batch_size or default_batch_size(plan.B, 1, f.n))
                   for f in fits], np.int64)
    nb = -(-np.array([f.n for f in fits]) // bs)
    table[:, loops.FIT_ORDER] = np.concatenate([[0], np.cumsum([f.n for f in fits])[:-1]])
    table[:, loops.FIT_KEY] = [np.uint64(f.seed).astype(np.int64) for f in fits]
    table[:, loops.FIT_BATCH] = bs
    order = np.concatenate([np.arange(f.n) if f.rows is None else f.rows for f in fits]).astype(np.int64)
    P = np.stack([f.p0 for f in fits])
    LS = (np.stack([f.state0 for f in fits]) if chain.n_state
          else np.zeros((nf, 0), dtype))
    opt = fits[0].opt
    OS = np.zeros((nf, opt.n_state, chain.n_params), dtype)
    H = np.stack([f.hyper for f in fits])
    hist = np.zeros((nf, iters if not batched else int(nb.max())), dtype)
    epoch_hist = np.zeros((nf, epochs or 0), dtype)
    info = np.zeros((nf, 2), np.int64)
    counter = np.zeros(1, np.int64)
    nt = max(1, min(n_threads, nf))
    stage_blocks = chain._stage_blocks(plan, int(bs.max()), 1, dtype, training)
    bufs = [(_own_lines((1, chain.n_params), dtype),
             _own_lines(max(plan.n_state + plan.n_scratch, 1), dtype),
             _own_lines((1, stage_blocks * plan.work_size), dtype),
             _own_lines((1, plan.meta_size), np.int64), _own_lines(1, dtype),
             _own_lines(chain.n_params, dtype)) for _ in range(nt)]
    gx = np.empty((0, plan.n_in), dtype)
    valgrad = kernel_for(mod, plan, f"valgrad_range_{model.loss.kernel_kind}", training, default=True)
    combine, nstages = stage_kernels(mod, plan, P[0], bufs[0][2], training, backward=True)
    kernels = [(valgrad, loops.valgrad_sig(Xa, Ta, order, P[0], gx)), combine,
               (opt.update_kernel(), loops.update_sig(P[0], OS[0], H[0]))]

    from .train import frozen_indices

    reg = (model._reg(dtype, control[0]), frozen_indices(chain, control[1]))

    def args(k):
        G, kstate, works, metas, losses, g = bufs[k]
        return (nstages, Xa, Ta, order, table, batched, P, LS, OS, H, hist, info, G, kstate,
                works, metas, losses, g, gx, counter, stop, *reg)

    funcs = loops.prepare(loops.fit_worker, kernels, args(0))
    rngs = [np.random.default_rng(f.seed) for f in fits] if batched else None
    for e in range(epochs if batched else 1):
        if batched:
            live = info[:, 1] == loops.OK
            for k, f in enumerate(fits):
                if shuffle and live[k]:
                    q = table[k, loops.FIT_ORDER]
                    rngs[k].shuffle(order[q:q + f.n])
            table[:, loops.FIT_END] = np.where(live, (e + 1) * nb, info[:, 0])
        else:
            table[:, loops.FIT_END] = iters
        counter[0] = 0
        _run_threads(loops.fit_worker, funcs, [args(k) for k in range(nt)], info, bar, stop)
        if batched:
            for k in range(nf):
                if info[k, 1] == loops.OK and info[k, 0] == (e + 1) * nb[k]:
                    epoch_hist[k, e] = hist[k, :nb[k]].mean()
        if stop[0]:
            break
    results = []
    for k, f in enumerate(fits):
        done, status = int(info[k, 0]), int(info[k, 1])
        if batched:
            history = epoch_hist[k, :done // nb[k]].copy()
            total = epochs * nb[k]
        else:
            history = hist[k, :done].copy()
            total = iters
        if status == loops.LOSS_NOT_FINITE:
            st, msg = "loss not finite", f"loss is {hist[k, done % nb[k] if batched else done]} at step {done} (0-based)"
        elif status == loops.GRAD_NOT_FINITE:
            st, msg = "gradient not finite", f"the gradient is not finite at step {done} (0-based)"
        elif done < total:
            st, msg = "interrupted", f"stopped after {done} of {total} steps"
        else:
            st, msg = "ok", ""
        results.append(FitResult(P[k].copy(), history, st, done, f.config,
                                 LS[k].copy() if chain.n_state else None, msg))
    return results


def _own_lines(shape, dtype):
    """Zeros on cache lines of their own: a thread's scratch must not share a line with
    another thread's (each write would move the line between the cores)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    pad = -(-n * dtype.itemsize // 64) * 64 // dtype.itemsize
    return aligned_zeros(pad, dtype)[:n].reshape(shape)


def _run_threads(loop, funcs, per_thread_args, info, bar, stop):
    """Run ``loop(*funcs, *args)`` on one Python thread per entry of ``per_thread_args``
    (the loop releases the GIL), updating ``bar`` from the steps done (``info[:, 0]``) until
    all return. Ctrl-C sets ``stop[0]``: the threads end after their current step (the
    caller raises KeyboardInterrupt once it has the results)."""
    errors = []

    def run(args):
        try:
            loop(*funcs, *args)
        except BaseException as e:  # pragma: no cover - the compiled loop raises nothing
            errors.append(e)
            stop[0] = 1

    threads = [threading.Thread(target=run, args=(a,), daemon=True) for a in per_thread_args]
    for t in threads:
        t.start()
    while True:
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.1)
                    bar.set(int(info[:, 0].sum()))
            break
        except KeyboardInterrupt:
            stop[0] = 1  # wait for the threads: they still write the caller's arrays
    bar.set(int(info[:, 0].sum()))
    if errors:
        raise errors[0]


class _Bar:
    """A tqdm bar that is set to absolute counts (or nothing, without ``progress``)."""

    def __init__(self, total, enabled, unit):
        self.bar, self.n, self.base = None, 0, 0
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                import warnings

                warnings.warn("progress=True needs tqdm (pip install tqdm); no progress bar shown",
                              stacklevel=3)
            else:
                self.bar = tqdm(total=total, desc="fit_many", unit=unit)

    def set(self, n):
        n += self.base
        if self.bar is not None and n > self.n:
            self.bar.update(n - self.n)
        self.n = max(self.n, n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------
# the Dask backend


def _dask_task(model, X, configs, kw):
    """One Dask task: the in-process backend on one thread of the worker."""
    return fit_many(model, X, configs, backend="threads", n_threads=1, progress=False, **kw)


def _run_dask(client, X, fits, kw, fits_per_task, progress):
    import pickle

    from distributed import as_completed

    import cloudpickle

    checked = set()
    for f in fits:  # everything a task carries must pickle: check before submitting any
        for what, obj in (("model", f.model), ("optimizer", f.opt)):
            key = (what, id(obj) if what == "model" else type(obj))
            if key in checked:
                continue
            try:
                cloudpickle.dumps(obj)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                raise TypeError(f"backend=dask ships the {what} to the workers, but configs[{f.index}]'s "
                                f"{what} cannot be pickled: {e}") from None
            checked.add(key)
    nthreads = sum(client.nthreads().values()) or 1
    if fits_per_task is None:
        fits_per_task = max(1, -(-len(fits) // (4 * nthreads)))
    fits_per_task = check_count(fits_per_task, "fits_per_task", 1)
    # hash=False: a key of its own. With the default content hash, a call right after another
    # on the same X reuses the key that the first call is releasing, and Dask can lose it
    Xf = None if X is None else client.scatter(X, broadcast=True, hash=False)
    groups = [g[i:i + fits_per_task] for g in _groups(fits) for i in range(0, len(g), fits_per_task)]
    futures = {}
    for chunk in groups:
        configs = [dict(f.config, seed=f.seed) for f in chunk]
        fut = client.submit(_dask_task, chunk[0].model, Xf, configs, kw, pure=False)
        futures[fut] = chunk
    results = [None] * len(fits)
    bar = _Bar(len(fits), progress, "fit")
    try:
        for fut in as_completed(futures):
            chunk = futures[fut]
            try:
                out = fut.result()
            except Exception as e:  # the task failed (after Dask's retries): report, go on
                msg = f"{type(e).__name__}: {e}"
                for f in chunk:
                    results[f.index] = FitResult(f.p0.copy(), np.zeros(0, f.p0.dtype), "error", 0,
                                                 f.config, f.state0, msg)
            else:
                for f, r in zip(chunk, out):
                    r.config = f.config
                    results[f.index] = r
            bar.set(sum(r is not None for r in results))
    except KeyboardInterrupt:
        client.cancel(list(futures))
        raise
    finally:
        bar.close()
    return results


# ------------------------------------------------------------------------------------------


def fit_many(model, X, configs, *, optimizer=None, iters=None, epochs=None, batch_size=None,
             shuffle=True, dtype=np.float32, training=True, backend="threads", n_threads=None,
             fits_per_task=None, progress=False, clip_norm=None, frozen=None):
    """Train many independent fits of ``model``, each from its own configuration.

    Each fit is what this would compute, at one thread::

        p = config.get("p", sc.init_params(chain, seed=seed, dtype=dtype))
        opt = <a fresh copy of optimizer with the config's hyperparameters>
        sc.train_unbatched(G, p, model, X_fit, opt, iters, seed=seed)     # iters
        sc.train_batched(G, p, model, X_fit, opt, epochs, batch_size=..., seed=seed)  # epochs

    and its result is bitwise that, for any ``n_threads`` and any backend.

    Parameters
    ----------
    model : SimpleChainWithLoss
        The chain and loss (:func:`~smallchains.add_loss`); its loss's targets belong to ``X``.
    X : ndarray, shape ``(N, *input_shape)``, or None
        Inputs shared by the fits that have no ``"data"`` of their own (not copied unless a
        fit takes ``"rows"`` of it or its dtype differs). None if every fit has ``"data"``.
    configs : int or sequence of dict
        One dict per fit (``n``: ``n`` fits with seeds ``0 .. n-1``). Keys, all optional:

        * ``"seed"``: int in ``[0, 2**64)``, default the fit's position. Seeds
          :func:`~smallchains.init_params`, the shuffling and the Dropout key.
        * the optimizer's hyperparameters by name (``"lr"``, ``"betas"``, ``"eps"`` for
          :class:`~smallchains.Adam`): they replace the template's.
        * ``"p"``: initial parameters, ``(n_params,)`` of ``dtype`` (copied; default
          ``init_params(chain, seed)``); ``"state"``: initial layer state.
        * ``"rows"``: 1-D integer indices of ``X`` the fit trains on (a data subset, a
          bootstrap resample; repeats allowed), read from ``X`` in place, never copied: the
          fit equals one on ``X[rows]``, except that a Dropout mask is keyed by the row's
          number in ``X``. Or ``"data"``: its own ``(X, Y)`` (targets as the loss takes them).
        * ``"model"``: another model (a sweep over widths); fits are grouped by chain so
          each chain compiles once.
    optimizer : Optimizer, default ``Adam()``
        The template: each fit gets a fresh copy (its state is neither used nor modified).
    iters : int, or epochs : int
        Exactly one: full-batch steps, or minibatch epochs (``batch_size`` as
        :func:`~smallchains.train_batched`, default its default at one thread).
    shuffle : bool -- reshuffle every epoch (from ``default_rng(seed)``).
    dtype : np.float32 or np.float64
    training : bool -- training mode (Dropout active) or inference.
    backend : ``"threads"``, ``"dask"`` or a ``dask.distributed.Client``
        ``"threads"``: this process, ``n_threads`` threads (default
        ``numba.get_num_threads()``, at most one per fit). ``"dask"``: a ``LocalCluster``
        with one single-threaded worker process per core, closed at the end. A ``Client``:
        its cluster; each task runs ``fits_per_task`` fits (default: about four tasks per
        worker thread) on one thread.
    progress : bool -- a tqdm bar (steps in process, fits with Dask).
    clip_norm, frozen : optional -- gradient clipping and frozen parameters of every fit,
        as for :func:`~smallchains.train_unbatched`. A penalized model
        (:class:`~smallchains.L2Penalty` ...) trains with its penalty.

    Returns
    -------
    list of FitResult, in the order of ``configs``.

    Raises
    ------
    TypeError, ValueError
        Before any work starts: configs of the wrong type or with unknown keys, bad
        hyperparameters, data or initial arrays that do not match the chain, both or
        neither of ``iters`` / ``epochs``, an unpicklable model for Dask.
    KeyboardInterrupt
        Ctrl-C (in process) ends every fit after its current step; the exception's
        ``results`` attribute holds the results (status ``"interrupted"`` for fits not
        finished).

    A fit whose loss or gradient becomes NaN or Inf stops there (status says which) and the
    others go on. With Dask, a fit whose task fails has status ``"error"``; a worker that
    dies has its tasks rerun elsewhere by Dask (same results).
    """
    fits, optimizer, iters, epochs, batch_size, dtype = _prepare(
        model, X, configs, optimizer, iters, epochs, batch_size, dtype, training)
    from .train import _check_clip, frozen_indices

    clip_norm = _check_clip(clip_norm)
    for chain in {id(f.model.chain): f.model.chain for f in fits}.values():
        frozen_indices(chain, frozen)  # raises on a bad mask or layer index
    kw = dict(optimizer=optimizer, iters=iters, epochs=epochs, batch_size=batch_size,
              shuffle=shuffle, dtype=dtype, training=training, clip_norm=clip_norm, frozen=frozen)
    if backend == "threads":
        n_threads = numba.get_num_threads() if n_threads is None else check_count(n_threads, "n_threads", 1)
        return _fit_threads(fits, iters, epochs, batch_size, shuffle, dtype, training, n_threads,
                            progress, (clip_norm, frozen))
    if n_threads is not None:
        raise TypeError("n_threads is for backend='threads'; a Dask worker runs as many fits at "
                        "once as it has threads")
    if backend == "dask":
        from distributed import Client, LocalCluster

        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        with LocalCluster(n_workers=cores, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            return _run_dask(client, X, fits, kw, fits_per_task, progress)
    distributed = sys.modules.get("distributed")  # a Client exists only if it is imported
    if distributed is not None and isinstance(backend, distributed.Client):
        return _run_dask(backend, X, fits, kw, fits_per_task, progress)
    raise ValueError(f"backend must be 'threads', 'dask' or a dask.distributed.Client, got {backend!r}")


def _fit_threads(fits, iters, epochs, batch_size, shuffle, dtype, training, n_threads, progress,
                 control=(None, None)):
    if iters is not None:
        total = iters * len(fits)
    else:
        total = None  # steps per epoch depend on the batch sizes: count fits' steps as they go
    bar = _Bar(total, progress, "step")
    stop = np.zeros(1, np.int64)  # set by Ctrl-C: the compiled loops end after a step
    results = [None] * len(fits)
    try:
        for group in _groups(fits):
            if not stop[0]:
                for f, r in zip(group, _run_group(group, iters, epochs, batch_size, shuffle, dtype,
                                                  training, n_threads, bar, stop, control)):
                    results[f.index] = r
                bar.base = bar.n
    finally:
        bar.close()
    if stop[0]:
        for f in fits:
            if results[f.index] is None:
                results[f.index] = FitResult(f.p0.copy(), np.zeros(0, dtype), "interrupted", 0,
                                             f.config, f.state0, "not started")
        e = KeyboardInterrupt()
        e.results = results
        raise e
    return results
