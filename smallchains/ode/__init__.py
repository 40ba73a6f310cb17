"""Neural ODEs: an adaptive Dormand-Prince 5(4) solver and its adjoint, in numba, plus a
scipy adapter. See ``docs/ode.md``.

* :class:`Dopri5` -- ``solve(u0, t, p)`` and ``vjp(t, U, Ubar, p) -> (dL/du0, dL/dp)`` for
  ``du/dt = f(t, u, p)`` given a jitted right-hand side and its VJP; buffers allocated
  once per solver object.
* :func:`chain_rhs` -- the right-hand side ``du/dt = chain(u)`` over a batch of states,
  built on :meth:`SimpleChain.kernels`.
* :mod:`smallchains.ode.dopri5` -- the numba functions themselves (``dopri5``,
  ``backsolve``), for training loops written entirely in numba.
* :class:`ScipyAdapter` -- the same right-hand side and its adjoint system as plain
  callables for :func:`scipy.integrate.solve_ivp`.
"""

from __future__ import annotations

from collections import namedtuple
from math import prod

import numpy as np
from numba import njit

from .._validate import check_dtype
from ..compiler.runtime import aligned_zeros
from . import dopri5 as _d5
from .dopri5 import (MAX_STEPS_EXCEEDED, N_SCRATCH_ROWS, N_VJP_ROWS, NOT_FINITE, RHS_SIG,
                     RHS_VJP_SIG, STEP_UNDERFLOW, STORAGE_FULL, backsolve, dopri5, dopri5_record,
                     dopri5_vjp)

__all__ = ["Dopri5", "ODEFunction", "ScipyAdapter", "chain_rhs", "compile_rhs", "dopri5", "backsolve",
           "dopri5_record", "dopri5_vjp", "param_groups", "RHS_SIG", "RHS_VJP_SIG"]

ODEFunction = namedtuple("ODEFunction", "rhs rhs_vjp n_state n_params work_size dtype")
ODEFunction.__doc__ = """A right-hand side for :class:`Dopri5` / :class:`ScipyAdapter`.

``rhs(t, u, p, du, work)`` and ``rhs_vjp(t, u, p, a, du, ubar, pbar, work)``: ``@njit``
functions compilable for :data:`RHS_SIG` / :data:`RHS_VJP_SIG` (float64 ``t``, 1-D
C-contiguous arrays of ``dtype``; float32: ``dopri5.rhs_signatures(np.float32)``; see
:mod:`smallchains.ode.dopri5`); state size ``n_state``, ``n_params``, scratch
``work_size``, ``dtype`` (float64, or float32 for :class:`Dopri5`)."""


def compile_rhs(f: ODEFunction) -> ODEFunction:
    """Compile ``f.rhs`` / ``f.rhs_vjp`` for the signatures of ``f.dtype``
    (:data:`RHS_SIG` / :data:`RHS_VJP_SIG` for float64; no-op if already compiled), as the
    numba-level solvers need, and the solvers for that dtype; returns ``f``. Raises
    TypeError if ``f.dtype`` is not float32 or float64, or a function is not ``@njit`` or
    does not compile for its signature."""
    dtype = np.dtype(f.dtype)
    if dtype not in (np.float64, np.float32):
        raise TypeError(f"smallchains.ode solves in float64 or float32, got an ODEFunction of {f.dtype}")
    _d5.ensure_dtype(dtype)
    sig, vjp_sig = _d5.rhs_signatures(dtype)
    for fn, sig, name in ((f.rhs, sig, "rhs"), (f.rhs_vjp, vjp_sig, "rhs_vjp")):
        if fn is None:
            continue
        if not hasattr(fn, "compile"):
            raise TypeError(f"{name} must be a numba @njit function, got {type(fn).__name__}")
        if tuple(sig.args) in fn.overloads:
            continue
        try:
            fn.compile(sig)
        except Exception as e:
            raise TypeError(f"{name} does not compile for the signature {sig}: {e}") from e
    return f


def chain_rhs(chain, n_samples: int, dtype=np.float64, input_map=None) -> ODEFunction:
    """``du/dt = chain(g(u))`` for a state of ``n_samples`` independent samples.

    The state is ``u`` flattened from ``(n_samples, n_in)`` (rows are samples); the chain
    must map ``n_in`` features to ``n_in`` features. The functions call the chain's batched
    kernels (:meth:`SimpleChain.kernels`) on the whole state at once.

    Parameters
    ----------
    chain : SimpleChain with ``n_out == n_in``
    n_samples : int >= 1
    dtype : np.float64 or np.float32
        Of the state, the parameters and the chain's kernels. float32: the solver still
        keeps times and its step arithmetic in float64; use ``rtol >= 1e-5``
        (:class:`Dopri5`).
    input_map : pair, optional
        Elementwise map ``g`` applied to the state before the chain, and its derivative:
        either two expression strings in ``u`` (may use ``math`` and ``np``), e.g.
        ``("u**3", "3*u**2")`` for torchdiffeq's spiral demo -- generated into a module
        that numba caches on disk, so later processes load it in milliseconds -- or two
        ``@njit`` scalar functions ``(g, dg)`` (compiled as closures in every process,
        about 2-3 s). Default: identity (also disk-cached).

    Returns
    -------
    ODEFunction
        Its ``work_size`` covers the kernels' scratch and, with ``input_map``, ``g(u)``.

    Raises
    ------
    ValueError
        If ``n_out != n_in``, ``n_samples < 1`` or an expression is not a plain expression
        in ``u``.
    """
    from ..compiler.codegen import _import_generated, get_kernels
    from ._rhs_codegen import generate

    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float64, np.float32):
        raise TypeError(f"smallchains.ode solves in float64 or float32, got dtype {dtype}")
    n_in, n_out = prod(chain.input_shape), prod(chain.output_shape)
    if n_in != n_out:
        raise ValueError(f"du/dt = chain(u) needs n_out == n_in, got {n_in} -> {n_out}")
    # one block for small batches (zero-padded lanes are wasted work); >= 24 lanes so the
    # block loops vectorize (see SimpleChain.kernels)
    block = int(n_samples) if int(n_samples) < 8 else min(128, max(24, -(-int(n_samples) // 8) * 8))
    kmod, plan = get_kernels(chain.input_shape, chain.layers, dtype, B=block,
                             options=chain.options)
    n, kw = int(n_samples) * n_in, plan.work_size
    extra = 0 if input_map is None else n
    if input_map is None or all(isinstance(e, str) for e in input_map):
        g, dg = (None, None) if input_map is None else input_map
        mod = _import_generated(generate(kmod.__name__, g, dg, dtype.name))
        return ODEFunction(mod.rhs, mod.rhs_vjp, n, chain.n_params, kw + extra, dtype)
    return _closure_rhs(kmod, input_map, (int(n_samples), n_in), kw, chain.n_params, dtype)


def _closure_rhs(kmod, input_map, shape, kw, n_params, dtype) -> ODEFunction:
    """:func:`chain_rhs` with ``g``, ``dg`` given as jitted functions (not disk-cacheable)."""
    g, dg = input_map
    forward, valvjp = kmod.forward_batch, kmod.valvjp_batch
    n = prod(shape)
    rhs_sig, vjp_sig = _d5.rhs_signatures(dtype)

    @njit(rhs_sig, nogil=True)
    def rhs(t, u, p, du, work):
        x = work[kw:kw + n]
        for i in range(n):
            x[i] = g(u[i])
        forward(x.reshape(shape), p, du.reshape(shape), work[:kw])

    @njit(vjp_sig, nogil=True)
    def rhs_vjp(t, u, p, a, du, ubar, pbar, work):
        x = work[kw:kw + n]
        for i in range(n):
            x[i] = g(u[i])
        valvjp(x.reshape(shape), p, a.reshape(shape), du.reshape(shape), ubar.reshape(shape),
               pbar, work[:kw])
        for i in range(n):  # chain rule through g
            ubar[i] *= dg(u[i])

    return ODEFunction(rhs, rhs_vjp, n, n_params, kw + n, np.dtype(dtype))


def _addresses(f):
    """``(rhs, rhs_vjp)`` of ``f`` as :class:`smallchains.compiler.loops._Address` objects
    (first-class functions by machine-code address), or the dispatchers themselves under
    ``NUMBA_BOUNDSCHECK`` (whose index errors must reach Python)."""
    import numba

    from ..compiler.loops import _Address

    sig, vjp_sig = _d5.rhs_signatures(f.dtype)
    if numba.config.BOUNDSCHECK:
        return f.rhs, f.rhs_vjp
    return (_Address(f.rhs, sig),
            None if f.rhs_vjp is None else _Address(f.rhs_vjp, vjp_sig))


def param_groups(chain) -> list:
    """Sizes of the chain's parameter tensors (weights and biases per layer, in ``p``
    order): the groups of torchdiffeq's default adjoint error norm."""
    return _tensor_sizes(chain)


def _tensor_sizes(chain) -> list:
    views = chain.param_views(np.zeros(chain.n_params))
    return [v.size for layer in views for v in layer.values()]


def _raise_for(code: int, what: str, max_steps: int):
    if code == MAX_STEPS_EXCEEDED:
        raise RuntimeError(f"{what}: more than max_steps={max_steps} steps in one interval "
                           "(stiff or diverging problem? raise max_steps or loosen rtol/atol)")
    if code == NOT_FINITE:
        raise FloatingPointError(f"{what}: NaN or Inf in the solution or its error estimate")
    if code == STEP_UNDERFLOW:
        raise RuntimeError(f"{what}: step size underflow (t + dt == t)")


class Dopri5:
    """Adaptive Dormand-Prince 5(4) solver for ``du/dt = f(t, u, p)`` with two adjoints.

    Step-size control, initial step and dense output follow torchdiffeq's ``dopri5``.
    Buffers are allocated once here (the discrete adjoint's records grow on demand and are
    then kept), so :meth:`solve` and :meth:`vjp` allocate only their outputs (or nothing,
    with ``out=``). The object owns its scratch buffers: use one per thread (the solves
    release the GIL).

    Adjoints (``adjoint=``):

    * ``"discrete"`` (default; discretise-then-optimise): the exact gradient of the
      discrete solution :meth:`solve` computed, its accepted steps and dense output, with
      the step sizes held fixed (as diffrax's ``RecursiveCheckpointAdjoint``). :meth:`solve`
      records the steps; :meth:`vjp` walks them backwards, six VJPs of ``f`` per accepted
      step. Memory: with ``checkpoints="all"`` (default) every accepted step's start state
      and six slopes, ``7 n_state + 2`` floats per step, and the backward pass calls
      ``f`` once in all; with ``checkpoints=C``, two floats per step plus at most ``C``
      evenly spaced states of ``n_state`` floats, and each step's state and slopes are
      recomputed from the nearest one (six ``f`` calls per step plus about
      ``steps^2 / (2 C)`` extra steps; ``C = 1``: only ``u0``).
    * ``"backsolve"`` (Chen et al., "Neural Ordinary Differential Equations", NeurIPS
      2018; torchdiffeq's ``odeint_adjoint``): solves the adjoint ODE backwards with the
      state, O(1) memory in the number of steps; the gradient is that of the exact ODE
      solution only up to the backward solve's tolerance, and can be poor for dissipative
      or chaotic dynamics, whose backward reconstruction of ``u`` is unstable.

    Parameters
    ----------
    f : ODEFunction
        From :func:`chain_rhs`, or your own ``ODEFunction(rhs, rhs_vjp, n_state, n_params,
        work_size, dtype)`` with jitted functions of the signatures in
        :mod:`smallchains.ode.dopri5`.
    rtol, atol : float
        Tolerances of the forward solve (torchdiffeq's defaults 1e-7, 1e-9). With a
        float32 ``f`` the states carry about 7 digits: keep ``rtol >= 1e-5`` (tighter
        tolerances chase rounding noise: many more steps, no better solution).
    adjoint_rtol, adjoint_atol : float, optional
        Tolerances of the backward solve (default: the forward ones, as torchdiffeq).
    adjoint_norm : "mixed" or "seminorm"
        Error norm of the augmented state ``[u, a, dL/dp]``: "mixed" (torchdiffeq's default)
        is the max of the RMS norms of ``u``, ``a`` and each parameter group; "seminorm"
        leaves ``dL/dp`` out of step-size control (fewer steps; Kidger et al. 2021).
    param_groups : list of int or SimpleChain, optional
        Sizes of the parameter groups for "mixed" (a chain: one per weight/bias tensor, see
        :func:`param_groups`). Default: all parameters in one group.
    max_steps : int
        Steps allowed per output interval before giving up (RuntimeError).
    adjoint : "discrete" or "backsolve", default "discrete"
    checkpoints : "all" or int >= 1, default "all"
        States kept for the discrete adjoint (see above).
    trajectories : int, optional
        Solve this many independent trajectories, each with its own adaptive steps (as
        torchode does), instead of one solve of the whole state: ``f`` is then the
        right-hand side of ONE trajectory (e.g. ``chain_rhs(net, 1)``), ``u0`` has
        ``trajectories`` rows of ``f.n_state`` elements, and :meth:`solve` returns ``U``
        of shape ``(len(t), trajectories, ...)``. The trajectories run on numba's
        threads (``n_threads``, default all); results do not depend on the thread
        count (``dL/dp`` is summed over the trajectories in order). Discrete adjoint only.
    n_threads : int, optional -- threads for ``trajectories`` (default
        ``numba.get_num_threads()``).

    Notes
    -----
    The backsolve options (``adjoint_rtol``, ``adjoint_atol``, ``adjoint_norm``,
    ``param_groups``) do not affect the discrete adjoint, which solves nothing.
    """

    def __init__(self, f: ODEFunction, rtol=1e-7, atol=1e-9, adjoint_rtol=None,
                 adjoint_atol=None, adjoint_norm="mixed", param_groups=None, max_steps=100_000,
                 adjoint="discrete", checkpoints="all", trajectories=None, n_threads=None):
        compile_rhs(f)
        self.f = f
        self.dtype = check_dtype(f.dtype)
        # the right-hand sides as function addresses: numba would look a dispatcher
        # argument's machine code up on every call (measured ~40 us per solve or vjp call
        # on the spiral demo, a third of the work); numba.config.BOUNDSCHECK: dispatchers
        self._rhs, self._rhs_vjp = _addresses(f)
        n, n_p = int(f.n_state), int(f.n_params)
        self.n_state, self.n_params = n, n_p
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if rtol == 0 and atol == 0:
            raise ValueError("rtol and atol cannot both be zero")
        self.rtol, self.atol = float(rtol), float(atol)
        self.adjoint_rtol = self.rtol if adjoint_rtol is None else float(adjoint_rtol)
        self.adjoint_atol = self.atol if adjoint_atol is None else float(adjoint_atol)
        self.max_steps = int(max_steps)
        if adjoint_norm not in ("mixed", "seminorm"):
            raise ValueError(f'adjoint_norm must be "mixed" or "seminorm", got {adjoint_norm!r}')
        if param_groups is None:
            groups = [n_p]
        elif hasattr(param_groups, "param_views"):
            groups = _tensor_sizes(param_groups)
        else:
            groups = [int(g) for g in param_groups]
        if sum(groups) != n_p or any(g < 0 for g in groups):
            raise ValueError(f"param_groups must be sizes >= 0 summing to n_params={n_p}, got {groups}")
        bounds = [0, n, 2 * n]
        if adjoint_norm == "mixed":
            for g in groups:
                bounds.append(bounds[-1] + g)
        self.forward_bounds = np.array([0, n], dtype=np.int64)
        self.adjoint_bounds = np.array(bounds, dtype=np.int64)
        m = 2 * n + n_p
        dt = self.dtype
        self.work = aligned_zeros(max(1, int(f.work_size)), dt)
        self._S = np.zeros((N_SCRATCH_ROWS, n), dtype=dt)
        self._S_adj = np.zeros((N_SCRATCH_ROWS, m), dtype=dt)
        self._Z2 = np.zeros((2, m), dtype=dt)
        self._t2 = np.zeros(2, dtype=np.float64)
        self._stats = np.zeros(3, dtype=np.int64)
        self.stats = {}
        if adjoint not in ("discrete", "backsolve"):
            raise ValueError(f'adjoint must be "discrete" or "backsolve", got {adjoint!r}')
        self.adjoint = adjoint
        if checkpoints != "all" and (isinstance(checkpoints, bool) or not isinstance(
                checkpoints, (int, np.integer)) or checkpoints < 1):
            raise ValueError(f'checkpoints must be "all" or an int >= 1, got {checkpoints!r}')
        self.checkpoints = checkpoints
        self._recorded = None  # (t, u0, p) of the solve the records belong to
        self._out_step = None
        self.trajectories = None
        lead = ()
        if trajectories is not None:
            import numba

            if isinstance(trajectories, bool) or not isinstance(trajectories, (int, np.integer)) \
                    or trajectories < 1:
                raise ValueError(f"trajectories must be an int >= 1, got {trajectories!r}")
            if adjoint != "discrete":
                raise ValueError("trajectories= needs the discrete adjoint")
            self.trajectories = int(trajectories)
            nt = numba.get_num_threads() if n_threads is None else int(n_threads)
            if not 1 <= nt <= numba.config.NUMBA_NUM_THREADS:
                raise ValueError(f"n_threads must be in [1, {numba.config.NUMBA_NUM_THREADS}], "
                                 f"got {n_threads!r}")
            self.n_threads = min(nt, self.trajectories)
            lead = (self.trajectories,)
            _d5.ensure_many(dt)
            self._works = aligned_zeros((self.n_threads, max(1, int(f.work_size))), dt)
            self._Sm = np.zeros((self.n_threads, N_SCRATCH_ROWS, n), dtype=dt)
            self._Vm = np.zeros((self.n_threads, N_VJP_ROWS, n), dtype=dt)
            self._ptm = np.zeros((self.n_threads, n_p), dtype=dt)
            self._Pbar = np.zeros((self.trajectories, n_p), dtype=dt)
            self._statm = np.zeros((self.trajectories, 3), dtype=np.int64)
            self._codes = np.zeros(self.trajectories, dtype=np.int64)
        self._lead = lead
        if adjoint == "discrete":
            self._grow(64)
            self._V = np.zeros((N_VJP_ROWS, n), dtype=dt)
            self._ptmp = np.zeros(n_p, dtype=dt)
            self._info = np.zeros(lead + (3,), dtype=np.int64)

    def _grow(self, steps):
        """Record arrays for ``steps`` accepted steps (the states too with "all"), per
        trajectory with ``trajectories``."""
        lead = self._lead
        self._rec_t = np.zeros(lead + (steps,), dtype=np.float64)
        self._rec_dt = np.zeros(lead + (steps,), dtype=np.float64)
        rows = steps if self.checkpoints == "all" else int(self.checkpoints)
        self._ckpt = np.zeros(lead + (rows, self.n_state), dtype=self.dtype)
        # with "all", each step's six slopes too: the backward pass then calls f only once
        self._rec_k = np.zeros(lead + (steps if self.checkpoints == "all" else 0, 6, self.n_state),
                               dtype=self.dtype)

    # --- validation ----------------------------------------------------------------------
    def _times(self, t):
        t = np.ascontiguousarray(t, dtype=np.float64)  # times are float64 for every dtype
        if t.ndim != 1 or t.shape[0] < 1:
            raise ValueError(f"t must be a 1-D array of at least one time, got shape {t.shape}")
        if not np.all(np.isfinite(t)):
            raise ValueError("t must be finite")
        d = np.diff(t)
        if t.shape[0] > 1 and not (np.all(d > 0) or np.all(d < 0)):
            raise ValueError("t must be strictly increasing or strictly decreasing")
        return t

    def _params(self, p):
        if not isinstance(p, np.ndarray) or p.dtype != self.dtype or p.shape != (self.n_params,):
            raise ValueError(f"p must be a ({self.n_params},) {self.dtype} ndarray, got "
                             f"{getattr(p, 'shape', type(p).__name__)} {getattr(p, 'dtype', '')}")
        return np.ascontiguousarray(p)

    def _state(self, x, name, lead=()):
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
        if x.shape[:len(lead)] != lead or prod(x.shape[len(lead):]) != self.n_state:
            raise ValueError(f"{name} must have shape {lead} + (a shape of {self.n_state} "
                             f"elements), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} must be finite")
        return np.ascontiguousarray(x, dtype=self.dtype).reshape(lead + (self.n_state,))

    @property
    def accepted_steps(self):
        """``(t_start, dt)`` of the accepted steps of the last :meth:`solve` with the
        discrete adjoint (new arrays; ``t_start[0] = t[0]``): the steps whose discrete
        solution :meth:`vjp` differentiates. None before a successful solve, or with the
        backsolve adjoint."""
        if self._recorded is None:
            return None
        if self.trajectories:  # one pair per trajectory
            return [(self._rec_t[i, :m].copy(), self._rec_dt[i, :m].copy())
                    for i, m in enumerate(self._info[:, 0])]
        k = int(self._info[0])
        return self._rec_t[:k].copy(), self._rec_dt[:k].copy()

    def _set_stats(self):
        nfe, acc, rej = (int(v) for v in self._stats)
        self.stats = {"nfe": nfe, "accepted": acc, "rejected": rej}

    # --- public --------------------------------------------------------------------------
    def solve(self, u0, t, p, out=None):
        """Solve from ``u(t[0]) = u0`` and return the solution at the times ``t``.

        Parameters
        ----------
        u0 : array of ``n_state`` elements, any shape (e.g. ``(n_samples, n_in)``)
        t : 1-D array, strictly monotone (increasing or decreasing), finite
        p : ``(n_params,)`` ndarray of the solver's dtype
        out : ndarray ``(len(t), *u0.shape)``, optional, C-contiguous, overwritten

        Returns
        -------
        U : ``(len(t), *u0.shape)`` with ``U[0] = u0``. ``self.stats`` then holds the
        function evaluations and accepted/rejected steps of this solve.

        Raises
        ------
        ValueError / TypeError for bad shapes, dtypes, non-finite or non-monotone input;
        RuntimeError (too many steps, step underflow) and FloatingPointError (NaN/Inf) from
        the solve.
        """
        u0 = np.asarray(u0)
        shape = u0.shape
        u0f = self._state(u0, "u0", self._lead)
        t = self._times(t)
        p = self._params(p)
        if self.trajectories:
            return self._solve_many(u0f, shape, t, p, out)
        if out is None:
            out = np.empty((t.shape[0],) + shape, dtype=self.dtype)
        elif (out.shape != (t.shape[0],) + shape or out.dtype != self.dtype
              or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous {(t.shape[0],) + shape} {self.dtype} array")
        U = out.reshape(t.shape[0], self.n_state)
        if self.adjoint == "discrete":
            self._recorded = None
            if self._out_step is None or self._out_step.shape[0] != t.shape[0]:
                self._out_step = np.zeros(t.shape[0], dtype=np.int64)
            while True:
                self._stats[:] = 0
                code = dopri5_record(self._rhs, t, u0f, p, self.work, self.rtol, self.atol,
                                     self.forward_bounds, U, self._S, self.max_steps,
                                     self._stats, self._rec_t, self._rec_dt, self._ckpt,
                                     self._rec_k, self._info, self._out_step)
                if code != STORAGE_FULL:
                    break
                self._grow(2 * self._rec_t.shape[0])
            if code == 0:
                self._recorded = (t.copy(), u0f.copy(), p.copy())
        else:
            self._stats[:] = 0
            code = dopri5(self._rhs, t, u0f, p, self.work, self.rtol, self.atol,
                          self.forward_bounds, U, self._S, self.max_steps, self._stats)
        self._set_stats()
        _raise_for(code, "dopri5 forward solve", self.max_steps)
        return out

    def _solve_many(self, u0f, shape, t, p, out):
        k, T = self.trajectories, t.shape[0]
        if out is None:
            out = np.empty((T,) + shape, dtype=self.dtype)
        elif out.shape != (T,) + shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {(T,) + shape} {self.dtype} array")
        U = out.reshape(T, k, self.n_state)
        if self._out_step is None or self._out_step.shape[1] != T:
            self._out_step = np.zeros((k, T), dtype=np.int64)
            self._Ut = np.zeros((self.n_threads, T, self.n_state), dtype=self.dtype)
        self._recorded = None
        while True:
            self._statm[:] = 0
            _d5.solve_many(self._rhs, t, u0f, p, self._works, self.rtol, self.atol,
                           self.forward_bounds, U, self._Ut, self._Sm, self.max_steps, self._statm,
                           self._rec_t, self._rec_dt, self._ckpt, self._rec_k, self._info,
                           self._out_step, self._codes)
            if not (self._codes == STORAGE_FULL).any():
                break
            self._grow(2 * self._rec_t.shape[1])
        tot = self._statm.sum(axis=0)
        self.stats = {"nfe": int(tot[0]), "accepted": int(tot[1]), "rejected": int(tot[2]),
                      "steps_per_trajectory": self._statm[:, 1].copy()}
        bad = np.flatnonzero(self._codes)
        if bad.size:
            _raise_for(int(self._codes[bad[0]]), f"dopri5 forward solve of trajectory {bad[0]}",
                       self.max_steps)
        self._recorded = (t.copy(), u0f.copy(), p.copy())
        return out

    def _vjp_many(self, t, U2, Ub2, p, shape):
        k = self.trajectories
        u0bar = np.empty((k, self.n_state), dtype=self.dtype)
        self._statm[:] = 0
        _d5.vjp_many(self._rhs, self._rhs_vjp, t, Ub2, p, self._works, self._rec_t, self._rec_dt,
                     self._ckpt, self._rec_k, self._info, self._out_step, self._Vm, self._ptm,
                     self._Ut, u0bar, self._Pbar, self._statm)
        tot = self._statm.sum(axis=0)
        self.stats = {"nfe": int(tot[0]), "vjp": int(tot[1]), "steps": int(self._info[:, 0].sum())}
        return u0bar.reshape(shape), self._Pbar.sum(axis=0)

    def vjp(self, t, U, Ubar, p):
        """Pullback of the solution map: gradients of a loss ``L(U)`` given ``dL/dU``.

        Parameters
        ----------
        t : the times of the forward :meth:`solve`
        U : ``(len(t), ...)`` the forward solution (backsolve: its values reset the
            backward state at every output time, as torchdiffeq does; discrete: ``U[0]``
            must be the ``u0`` of the last :meth:`solve`)
        Ubar : same shape as ``U``: ``dL/dU``
        p : ``(n_params,)``

        Returns
        -------
        (u0bar, pbar): ``dL/du0`` shaped like ``U[0]``, ``dL/dp (n_params,)``; new arrays.
        ``self.stats`` holds the backward pass's counts (discrete: ``nfe`` the ``f`` and
        ``vjp`` the VJP evaluations).

        Raises
        ------
        ValueError
            Bad shapes; for the discrete adjoint, ``t``, ``U[0]`` or ``p`` other than those
            of the last successful :meth:`solve` (it differentiates that solve).
        """
        if self.f.rhs_vjp is None:
            raise ValueError("this ODEFunction has no rhs_vjp: the adjoint needs one")
        t = self._times(t)
        lead = (t.shape[0],) + self._lead
        U2 = self._state(U, "U", lead)
        Ub2 = self._state(Ubar, "Ubar", lead)
        p = self._params(p)
        u0bar = np.empty(self.n_state, dtype=self.dtype)
        pbar = np.empty(self.n_params, dtype=self.dtype)
        if self.adjoint == "discrete":
            rec = self._recorded
            if (rec is None or not np.array_equal(rec[0], t) or not np.array_equal(rec[1], U2[0])
                    or not np.array_equal(rec[2], p)):
                raise ValueError("the discrete adjoint differentiates the last solve: call "
                                 "solve(u0, t, p) first, then vjp with the same t, p and "
                                 "U[0] = u0")
            if self.trajectories:
                return self._vjp_many(t, U2, Ub2, p, np.shape(U)[1:])
            self._stats[:] = 0
            dopri5_vjp(self._rhs, self._rhs_vjp, t, Ub2, p, self.work, self._rec_t,
                       self._rec_dt, self._ckpt, self._rec_k, self._info, self._out_step,
                       self._V, self._ptmp, u0bar, pbar, self._stats)
            self.stats = {"nfe": int(self._stats[0]), "vjp": int(self._stats[1]),
                          "steps": int(self._info[0])}
            return u0bar.reshape(np.shape(U)[1:]), pbar
        self._stats[:] = 0
        code = backsolve(self._rhs, self._rhs_vjp, t, U2, Ub2, p, self.work, self.adjoint_rtol,
                         self.adjoint_atol, self.adjoint_bounds, self._S_adj, self._Z2, self._t2,
                         self.max_steps, self._stats, u0bar, pbar)
        self._set_stats()
        _raise_for(code, "adjoint backsolve", self.max_steps)
        return u0bar.reshape(np.shape(U)[1:]), pbar


class ScipyAdapter:
    """The right-hand side and its adjoint system as callables for
    :func:`scipy.integrate.solve_ivp` (which allocates per call; use :class:`Dopri5` for
    speed). ``fun(t, u, p)`` returns ``f(t, u, p)``; ``adjoint_fun(t, z, p)`` returns the
    backsolve system for ``z = [u, a, g]`` (see :func:`smallchains.ode.dopri5.adjoint_system`):
    pass either with ``args=(p,)``. :meth:`vjp` runs the backsolve adjoint with solve_ivp.
    """

    def __init__(self, f: ODEFunction):
        if np.dtype(f.dtype) != np.float64:
            raise TypeError(f"ScipyAdapter works in float64 (scipy's solvers), got {np.dtype(f.dtype)}")
        compile_rhs(f)
        if not _d5.adjoint_system.signatures:  # compile once for first-class functions,
            _d5.adjoint_system.compile(_d5.ADJOINT_SYSTEM_SIG)  # then never per rhs
            _d5.adjoint_system.disable_compile()
        self.f = f
        self.dtype = check_dtype(f.dtype)
        self.work = aligned_zeros(max(1, int(f.work_size)), self.dtype)

    def fun(self, t, u, p):
        du = np.empty(self.f.n_state, dtype=self.dtype)
        self.f.rhs(float(t), np.ascontiguousarray(u, dtype=self.dtype), p, du, self.work)
        return du

    def adjoint_fun(self, t, z, p):
        z = np.ascontiguousarray(z, dtype=self.dtype)
        dz = np.empty_like(z)
        _d5.adjoint_system(float(t), self.f.rhs, self.f.rhs_vjp, self.f.n_state, z, p, dz, self.work)
        return dz

    def vjp(self, t, U, Ubar, p, method="DOP853", rtol=1e-10, atol=1e-12):
        """Backsolve adjoint with ``solve_ivp`` over each output interval (as
        :meth:`Dopri5.vjp`). ``U, Ubar (len(t), n_state)``. Returns ``(u0bar, pbar)``."""
        from scipy.integrate import solve_ivp

        n = self.f.n_state
        shape = np.shape(Ubar)[1:]
        U = np.asarray(U, dtype=self.dtype).reshape(len(t), n)
        Ubar = np.asarray(Ubar, dtype=self.dtype).reshape(len(t), n)
        z = np.concatenate([U[-1], Ubar[-1], np.zeros(self.f.n_params, dtype=self.dtype)])
        for j in range(len(t) - 1, 0, -1):
            sol = solve_ivp(self.adjoint_fun, (t[j], t[j - 1]), z, method=method, rtol=rtol,
                            atol=atol, args=(p,))
            if not sol.success:
                raise RuntimeError(f"solve_ivp failed on [{t[j - 1]}, {t[j]}]: {sol.message}")
            z = sol.y[:, -1].copy()
            z[:n] = U[j - 1]
            z[n:2 * n] += Ubar[j - 1]
        return z[n:2 * n].reshape(shape), z[2 * n:].copy()
