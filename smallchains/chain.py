"""SimpleChain: a fixed sequence of layers over a fixed per-sample input shape.

Shape inference runs at construction; parameters live in ONE flat vector ``p`` in which
each layer owns a contiguous slice in chain order (:meth:`SimpleChain.param_views`).
Follows SimpleChains.jl's ``SimpleChain`` (src/simple_chain.jl).
"""

from __future__ import annotations

import threading
from math import prod

import numba
import numpy as np

from ._validate import check_dtype, check_inputs, check_params, check_random
from .compiler import get_kernels, loops
from .compiler.codegen import choose_block_size, takes_input_rows
from .compiler.linking import Deferred
from .compiler.options import default_registers, kernel_options
from .compiler.runtime import aligned_zeros
from .layers.base import Layer
from .losses import Loss

#: Largest training block :meth:`SimpleChain._train_block` picks for a chain whose first
#: layer takes dW from the input rows. Measured on a Zen 4 (32-register tiles), network 1
#: of issue 14 (1024 -> 64 -> 32 -> 10, float32), in-process epochs alternated: batch 300
#: on 1 thread 199 ms at the default 32-sample blocks, 195 at 160, 185 at 304; batch 1024
#: on 2 threads 141 at 32, 104 at 256, 111 at 512.
WIDE_TRAIN_BLOCK_MAX = 320


class SimpleChain:
    """A chain of layers with static shapes.

    Parameters
    ----------
    input_shape : int or tuple of int
        Shape of ONE sample: ``4`` for 4 features, ``(1, 28, 28)`` for a 1-channel image
        (channels first, NCHW batches).
    *layers : Layer
        Layers in order, e.g. ``TurboDense(32, "tanh")``.
    kernels : ``"tuned"`` or ``"reference"``, keyword-only, default ``"tuned"``
        ``"reference"`` compiles every layer from its plain reference code (one scalar loop
        nest per layer and pass, :mod:`smallchains.layers.reference`): the same results to
        rounding, several times slower. The debugging fallback when a tuned kernel is
        suspected; the tests use it as the oracle of every tuned variant.
    registers : 16, 32 or None, keyword-only
        Vector register budget the tuned tiles are sized for. Default
        ``$SMALLCHAINS_VECTOR_REGISTERS`` if set, else the host's (32 with AVX-512, else
        16). Only tile shapes change, so either budget is correct on any CPU (a budget
        above the CPU's spills registers and runs slower); for tests and tuning.
    block_size : int or None, keyword-only
        Samples per block of the compiled kernels (a multiple of 16 in ``[16, 1024]``).
        Default: chosen so one block's workspace is about 64 KB, a multiple of two
        vectors. The explicit-vector tiles need that multiple: 32 float32 (16 float64)
        samples with the 64-byte vectors of a 32-register budget, 16 otherwise; a block
        size that is not one runs the scalar tiles of most layers (dense layers have
        tiles of one vector too). Default in :func:`~smallchains.train_batched` for a
        chain without recurrent layers: if each thread's share of a minibatch
        fills at most half a default block, blocks of that share rounded up to 16 (the
        784-128-10 MLP of ``bench/mnist_mlp.py``, batch 32 on two threads: 16-sample
        blocks, on an AVX-512 Xeon 409 -> 316 ms per epoch); that compiles the kernels
        once more for that block size. Chains of
        many tiny layers (recurrent models) spend most of a small block in per-block
        overhead and run faster with larger blocks: on a Zen 3, LSTNet's training step
        (``smallchains.models.lstnet``, batch 500) took 804 us at the default 16 and 297
        to 417 us at 80 to 160. Results are the same for any block size, to rounding.

    Raises
    ------
    TypeError
        A layer is not a smallchains layer.
    ValueError
        A layer cannot take the shape produced by the previous one (the message names it);
        an unknown ``kernels`` or ``registers``; a bad ``block_size``.

    Examples
    --------
    >>> chain = SimpleChain(4, TurboDense(32, "tanh"), TurboDense(16, "tanh"), TurboDense(4))
    >>> p = init_params(chain, seed=0)
    >>> Yhat = chain(X, p)        # X (N, 4) -> (N, 4)
    """

    def __init__(self, input_shape, *layers, kernels="tuned", registers=None, block_size=None):
        self.options = kernel_options(kernels, registers)
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                       or not 16 <= block_size <= 1024 or block_size % 16):
            raise ValueError(f"block_size must be None or a multiple of 16 in [16, 1024], got {block_size!r}")
        self.block_size = None if block_size is None else int(block_size)
        if isinstance(input_shape, (int, np.integer)):
            input_shape = (int(input_shape),)
        input_shape = tuple(int(d) for d in input_shape)
        if not input_shape or any(d < 1 for d in input_shape):
            raise ValueError(f"input_shape must be positive ints, got {input_shape}")
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("SimpleChain needs at least one layer")
        shapes, n_params, shape = [], 0, input_shape
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} must be a smallchains layer, got {type(layer).__name__}")
            try:
                out = tuple(layer.output_shape(shape))
            except ValueError as e:
                raise ValueError(f"layer {i} ({layer!r}) with input shape {shape}: {e}") from None
            shapes.append((shape, out))
            n_params += layer.n_params(shape)
            shape = out
        self.input_shape = input_shape
        self.layers = tuple(layers)
        self.output_shape = shape
        self.n_params = n_params
        self._shapes = shapes
        self.n_state = sum(layer.n_state(ins) for layer, (ins, _) in zip(self.layers, shapes))
        #: minimum samples per channel of the batch-statistics layers (BatchNorm) in training
        self._stat_sizes = [prod(ins[1:]) for layer, (ins, _) in zip(self.layers, shapes)
                            if getattr(layer, "reduces_batch", False)]
        self._tls = threading.local()  # per-thread workspace cache (thread safety)
        self._kernel_memo = {}  # dtype -> (module, plan)

    # --- pickling (fit_many's Dask backend ships chains to worker processes) -------------
    def __getstate__(self):
        # the per-thread workspaces and the compiled kernels stay in this process; the
        # receiving process compiles (or loads from the kernel cache) its own
        state = dict(self.__dict__)
        del state["_tls"], state["_kernel_memo"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tls = threading.local()
        self._kernel_memo = {}

    # --- description -----------------------------------------------------------------
    def __repr__(self) -> str:
        inner = ", ".join(repr(l) for l in self.layers)
        shape = self.input_shape[0] if len(self.input_shape) == 1 else self.input_shape
        extra = "" if self.options.kernels == "tuned" else f", kernels={self.options.kernels!r}"
        if self.options.kernels == "tuned" and self.options.registers != default_registers():
            extra += f", registers={self.options.registers}"
        if self.block_size is not None:
            extra += f", block_size={self.block_size}"
        return f"SimpleChain({shape}, {inner}{extra})"

    def summary(self) -> str:
        """A table of layers, output shapes and parameter counts."""
        rows = [("layer", "output shape", "params"), ("input", str(self.input_shape), "0")]
        for layer, (ins, outs) in zip(self.layers, self._shapes):
            rows.append((repr(layer), str(outs), str(layer.n_params(ins))))
        rows.append(("total", "", str(self.n_params)))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}" for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(-1, "-" * len(lines[0]))
        return "\n".join(lines)

    def param_views(self, p) -> list:
        """Per-layer dicts of named views into ``p``.

        Returns a list with one dict per layer (empty for layers without parameters),
        mapping names such as ``"W"`` (shape ``(out, in)``) and ``"b"`` to views that share
        memory with ``p``: writing to a view writes ``p``. Works for gradients too.
        """
        return self._views(check_params(self.n_params, p), "param_shapes")

    def state_views(self, state) -> list:
        """Per-layer dicts of named views into the layer state ``state`` (from
        :func:`init_state`), e.g. ``{"running_mean": (C,), "running_var": (C,)}`` for a
        BatchNorm layer, ``{}`` for layers without state. Writing a view writes ``state``."""
        state = self._check_state(state, np.asarray(state).dtype if state is not None else None)
        return self._views(state, "state_shapes")

    def _views(self, flat, shapes_method):
        """Per-layer ``{name: view}`` of the flat vector laid out by each layer's
        ``shapes_method`` (``param_shapes`` or ``state_shapes``), in chain order."""
        out, off = [], 0
        for layer, (ins, _) in zip(self.layers, self._shapes):
            views = {}
            for name, shape in getattr(layer, shapes_method)(ins).items():
                n = prod(shape)
                views[name] = flat[off:off + n].reshape(shape)
                off += n
            out.append(views)
        return out

    def _check_state(self, state, dtype, required=True):
        """``state`` checked against the chain (shape ``(n_state,)``, ``dtype``,
        C-contiguous, writeable); None is allowed for chains without state or if not
        ``required``."""
        if state is None:
            if self.n_state and required:
                raise ValueError(
                    f"this chain has layer state ({self.n_state} elements: BatchNorm running "
                    "statistics): pass state=sc.init_state(chain) (trained with the parameters)")
            return None
        if (not isinstance(state, np.ndarray) or state.shape != (self.n_state,)
                or (dtype is not None and state.dtype != dtype) or not state.flags.c_contiguous
                or not state.flags.writeable):
            raise ValueError(f"state must be a writeable C-contiguous {dtype} array of shape "
                             f"({self.n_state},) (sc.init_state(chain, dtype)), got "
                             f"{getattr(state, 'dtype', type(state).__name__)} "
                             f"{getattr(state, 'shape', '')}")
        return state

    def _check_batch_stats(self, rows, what):
        """Training with batch statistics needs more than one value per channel (torch
        raises the same)."""
        for per_sample in self._stat_sizes:
            if rows * per_sample < 2:
                raise ValueError(f"BatchNorm in training mode needs more than one value per "
                                 f"channel, but {what} has {rows} sample(s) of "
                                 f"{per_sample} value(s) per channel")

    # --- compiled kernels ----------------------------------------------------------------
    def _kernels(self, dtype, loss=None, block_size=None):
        """``(module, plan)`` of the chain's kernels; with ``loss`` a loss whose block kernel
        is generated (weighted, Huber, custom), the module that has its kernels too;
        ``block_size`` overrides the chain's (:meth:`_train_block`)."""
        extra = loss.kernel_source() if loss is not None else None
        B = self.block_size if block_size is None else block_size
        # memoized per chain (get_kernels' own key hashes every layer's spec on each call)
        memo_key = (dtype, extra[0] if extra else None, B)
        hit = self._kernel_memo.get(memo_key)
        if hit is None:
            hit = self._kernel_memo[memo_key] = get_kernels(
                self.input_shape, self.layers, dtype, B=B, options=self.options,
                losses=(extra,) if extra else ())
        return hit

    def _train_block(self, rows, n_threads, dtype):
        """Block size for training steps of ``rows`` rows split over ``n_threads``, or None
        for the chain's own. Only without a given ``block_size`` and when every layer keeps
        its tiles at small blocks (``small_blocks``: all but the recurrent layers); then,
        with ``share = ceil(rows / n_threads)``:

        * ``share`` rounded up to 16, if that is at most half the default block (a 32-row
          minibatch on two threads: 16-sample blocks, not half-empty 32-sample ones);
        * for a chain whose first layer takes its weight gradient from the input rows
          (a wide first dense layer, whose weight traffic each block repeats), the fewest
          blocks of at most :data:`WIDE_TRAIN_BLOCK_MAX` that hold ``share``, each
          ``share / blocks`` rounded up to 16 (network 1 of issue 14, 300 rows on 2
          threads: one 160-sample block per thread, not five of 32)."""
        if self.block_size is not None or not all(getattr(l, "small_blocks", False) for l in self.layers):
            return None
        share = -(-rows // n_threads)
        B = max(16, -(-share // 16) * 16)
        default = choose_block_size(self.input_shape, self.layers, np.dtype(dtype).itemsize,
                                    self.options.registers)
        if 2 * B <= default:
            return B
        if takes_input_rows(self.input_shape, self.layers, default):
            blocks = -(-share // WIDE_TRAIN_BLOCK_MAX)
            per_block = -(-share // blocks)
            B = -(-per_block // 16) * 16
            return None if B == default else B
        return None

    def kernels(self, dtype=np.float32, block_size=None) -> "ChainKernels":
        """Numba kernels for embedding: callable from Python and from users' ``@njit`` code
        (for example an ODE right-hand side, see ``docs/ode.md`` and :mod:`smallchains.ode`).

        Returns a :class:`ChainKernels` with sizes ``n_in``, ``n_out``, ``n_params``,
        ``work_size`` and the jitted functions

        one sample (``x (n_in,)``, ``y, ybar (n_out,)``):

        * ``forward(x, p, y, work)``: ``y = chain(x; p)``;
        * ``vjp(x, p, ybar, xbar, pbar, work)``: ``xbar = ybar^T dy/dx``,
          ``pbar = ybar^T dy/dp`` (plain v^T J);
        * ``valvjp(x, p, ybar, y, xbar, pbar, work)``: both at once (one forward pass);

        a batch of ``n`` samples (``X (n, n_in)``, ``Y, Ybar (n, n_out)``, rows are samples):

        * ``forward_batch(X, p, Y, work)``;
        * ``vjp_batch(X, p, Ybar, Xbar, pbar, work)``: ``Xbar`` row-wise,
          ``pbar = sum over rows of Ybar[i]^T dY[i]/dp``;
        * ``valvjp_batch(X, p, Ybar, Y, Xbar, pbar, work)``.

        Outputs are overwritten, never accumulated. ``p, pbar (n_params,)``; ``work
        (work_size,)`` is caller-owned scratch, reusable by every kernel (one per thread).
        All arrays are C-contiguous of ``dtype``. Outputs never alias ``work``; nothing is
        allocated per call; ``p`` is an argument, so new parameters never recompile. Every
        kernel checks, at a few comparisons per call, that ``p``, ``pbar`` and ``work`` are
        C-contiguous (the layer code reads them through raw pointers) and that every array
        has the sizes above (``work`` at least ``work_size``), and raises ValueError naming
        the expected shapes otherwise, from Python and from numba code alike; dtypes are
        checked when a kernel is compiled for the arguments' types (a numba TypingError).
        The kernels rely on nothing left in ``work`` by an earlier call: one ``work`` serves
        the single-sample and the batch kernels.

        The kernels compute in inference mode (Dropout is the identity, BatchNorm uses its
        running statistics). A chain with layer state (``n_state > 0``: BatchNorm) reads
        that state from the **last** ``n_state`` elements of ``work``, which are included in
        ``work_size`` and never written: put it there with
        ``work = k.alloc_work(state)`` or ``k.set_state(work, state)`` (again after training
        changes ``state``). To call from your own ``@njit`` function, bind the
        functions to module-level names first (``fwd = k.forward``) and call those globals.

        Parameters
        ----------
        dtype : np.float32 or np.float64
        block_size : int, optional
            Samples per block in the batched kernels (every layer computes whole blocks;
            a partial block is zero-padded, so a block near the typical batch size wastes
            least). Default 32. Blocks under 24 samples are not vectorized by LLVM
            (measured 4-5x slower for a tanh layer), so prefer 24 or more.
        """
        dtype = check_dtype(dtype)
        if block_size is None:
            block_size = 32
        if not isinstance(block_size, (int, np.integer)) or not 1 <= block_size <= 1024:
            raise ValueError(f"block_size must be an int in [1, 1024], got {block_size!r}")
        single, plan1 = get_kernels(self.input_shape, self.layers, dtype, B=1, options=self.options)
        batch, planb = get_kernels(self.input_shape, self.layers, dtype, B=int(block_size),
                                   options=self.options)
        return ChainKernels(
            prod(self.input_shape), prod(self.output_shape), self.n_params,
            max(plan1.work_size, planb.work_size) + self.n_state, np.dtype(dtype), int(block_size),
            self.n_state,
            forward=single.forward_single, vjp=single.vjp_single, valvjp=single.valvjp_single,
            forward_batch=batch.forward_batch, vjp_batch=batch.vjp_batch,
            valvjp_batch=batch.valvjp_batch)

    #: Most bytes of per-thread block workspaces kept across the reduction stages of a
    #: training step with batch statistics (more rows per thread recompute instead)
    STAGE_WORKSPACE_BYTES = 256 * 2 ** 20

    def _stage_blocks(self, plan, rows, n_threads, dtype, training=True) -> int:
        """Block workspaces per thread for a training step on ``rows`` rows: one per block
        of a thread's share if the chain has batch statistics (each reduction stage then
        resumes instead of recomputing, see codegen._staged_prelude) and it fits in
        :attr:`STAGE_WORKSPACE_BYTES`; else 1."""
        if not (training and plan.reducing):
            return 1
        k = -(-(-(-rows // n_threads)) // plan.B)
        if k * plan.work_size * np.dtype(dtype).itemsize > self.STAGE_WORKSPACE_BYTES:
            return 1
        return max(k, 1)

    def _workspace(self, plan, n_threads: int, dtype, key=0, step=0, state=None, blocks=1):
        """``(works, metas, kstate)``: per-thread workspaces ``(n_threads, work_size)``,
        step metadata ``(n_threads, meta_size)`` int64 with ``metas[:, 0] = key``,
        ``metas[:, 1] = step`` and ``metas[:, -1] = 0``, and the kernels' state (the layer
        state ``state``, copied in, then one step's batch statistics), allocated once per
        (Python thread, dtype, block, count, ``blocks``: workspaces per thread, see
        :meth:`_stage_blocks`)."""
        cache = getattr(self._tls, "works", None)
        if cache is None:
            cache = self._tls.works = {}
        ck = (np.dtype(dtype).name, plan.B, plan.work_size, n_threads, blocks)
        hit = cache.get(ck)
        if hit is None:
            hit = cache[ck] = (aligned_zeros((n_threads, blocks * plan.work_size), dtype),
                               np.zeros((n_threads, plan.meta_size), np.int64),
                               np.zeros(max(plan.n_state + plan.n_scratch, 1), dtype))
        hit[1][:, 0] = np.uint64(key).astype(np.int64)
        hit[1][:, 1] = step
        hit[1][:, -1] = 0  # the range kernels zero g themselves (loops._zero_grad_rows)
        if state is not None:
            hit[2][:plan.n_state] = state
        return hit

    def __call__(self, X, p, *, state=None, training=False, seed=0, step=0):
        """Evaluate the chain.

        Parameters
        ----------
        X : ndarray, shape ``(N, *input_shape)`` or ``input_shape``, float32/float64
            Batch-first inputs (or one sample). Converted to ``p.dtype`` (a copy) if needed.
        p : ndarray, shape ``(n_params,)``, float32 or float64
        state : ndarray, shape ``(n_state,)``, dtype of ``p``, keyword-only
            The layer state (:func:`init_state`): required if the chain has one
            (BatchNorm's running statistics, read in inference). Not modified.
        training : bool, keyword-only, default False
            Inference (Dropout is the identity, BatchNorm uses the running statistics) or
            training mode (Dropout draws its mask from ``seed``, ``step`` and the row's
            index in ``X``; BatchNorm normalizes with the statistics of the whole ``X``
            and does not update ``state``; see docs/api.md, "Modes and random numbers").
            ValueError in training if BatchNorm would see one value per channel.
        seed, step : int, keyword-only
            The random key and the step counter of training mode (unused in inference).

        Returns
        -------
        ndarray, shape ``(N, *output_shape)`` (or ``output_shape`` for one sample), ``p.dtype``.
        A new array every call.
        """
        p = check_params(self.n_params, p)
        key, step = check_random(seed, step)
        state = self._check_state(state, p.dtype)
        X2, single = check_inputs(self.input_shape, X, p.dtype)
        if training:
            self._check_batch_stats(X2.shape[0], "X")
        mod, plan = self._kernels(p.dtype)
        n = X2.shape[0]
        nt = max(1, min(numba.get_num_threads(), -(-n // plan.B)))
        Y = np.empty((n, plan.n_out), dtype=p.dtype)
        idx = np.arange(n)
        kernel = kernel_for(mod, plan, "forward_range", training, default=False)
        works, metas, kstate = self._workspace(plan, nt, p.dtype, key, step, state)
        combine, nstages = stage_kernels(mod, plan, p, works, training)
        loops.call(loops.forward_threads, [(kernel, loops.forward_sig(X2, idx, p, Y)), combine],
                   (nstages, X2, idx, p, kstate, works, metas, Y))
        Y = Y.reshape((n,) + self.output_shape)
        return Y[0] if single else Y


def stage_kernels(mod, plan, p, works, training, backward=False):
    """``((combine kernel, its signature), nstages)`` of the batch-statistics stages of a
    pass in training mode: one per BatchNorm for a forward (or loss) pass, two with
    ``backward`` (a gradient step, :attr:`ChainPlan.n_stages`); none in inference or
    without BatchNorm."""
    if training and plan.reducing:
        n = plan.n_stages if backward else len(plan.reducing)
        return (Deferred(mod, "combine"), loops.combine_sig(p, works)), n
    return (loops.no_combine, loops.combine_sig(p, works)), 0


def kernel_for(mod, plan, name, training, default):
    """The range kernel ``name`` of a chain module in the requested mode: ``name`` itself
    if ``training`` is its default mode or the chain computes the same in both, else its
    other-mode variant (``_train`` / ``_infer`` suffix, see
    :mod:`smallchains.compiler.codegen`)."""
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be True or False, got {training!r}")
    if bool(training) != default and plan.mode_dependent:
        name += "_train" if training else "_infer"
    return Deferred(mod, name)


class ChainKernels:
    """Sizes and numba kernels of a chain (see :meth:`SimpleChain.kernels`)."""

    def __init__(self, n_in, n_out, n_params, work_size, dtype, block_size, n_state=0, **kernels):
        self.n_in, self.n_out, self.n_params, self.work_size = n_in, n_out, n_params, work_size
        self.dtype, self.block_size, self.n_state = dtype, block_size, n_state
        self.forward, self.vjp, self.valvjp = kernels["forward"], kernels["vjp"], kernels["valvjp"]
        self.forward_batch = kernels["forward_batch"]
        self.vjp_batch, self.valvjp_batch = kernels["vjp_batch"], kernels["valvjp_batch"]

    def __repr__(self):
        return (f"ChainKernels(n_in={self.n_in}, n_out={self.n_out}, n_params={self.n_params}, "
                f"work_size={self.work_size}, dtype={self.dtype}, block_size={self.block_size}, "
                f"n_state={self.n_state})")

    def alloc_work(self, state=None) -> np.ndarray:
        """A zeroed workspace of ``work_size`` elements, 64-byte aligned (an unaligned one
        works too, but vector loads that straddle cache lines make the kernels slower).

        ``state``: the layer state, shape ``(n_state,)`` of ``dtype``
        (:func:`~smallchains.init_state`, updated by training), copied into the last
        ``n_state`` elements; required (ValueError otherwise) if ``n_state > 0``, and then
        the only way the kernels see it."""
        work = aligned_zeros(self.work_size, self.dtype)
        if self.n_state or state is not None:
            self.set_state(work, state)
        return work

    def set_state(self, work, state) -> None:
        """Copy the layer ``state`` (``(n_state,)``, ``dtype``) into the last ``n_state``
        elements of ``work`` (``(>= work_size,)``, ``dtype``, C-contiguous), where the
        kernels read it. Raises ValueError naming the expected shapes and dtype; on an
        error nothing is written."""
        if self.n_state == 0:
            if state is None or np.size(state) == 0:
                return
            raise ValueError("this chain has no layer state: pass state=None")
        if state is None:
            raise ValueError(f"this chain has layer state ({self.n_state} elements: BatchNorm "
                             "running statistics): pass state=sc.init_state(chain) as trained")
        for name, a, shape in (("state", state, (self.n_state,)), ("work", work, None)):
            if (not isinstance(a, np.ndarray) or a.dtype != self.dtype or a.ndim != 1
                    or (shape is not None and a.shape != shape) or not a.flags.c_contiguous):
                want = f"({self.n_state},)" if shape else f"(>= {self.work_size},)"
                raise ValueError(f"{name} must be a C-contiguous {self.dtype} array of shape "
                                 f"{want}, got {getattr(a, 'dtype', type(a).__name__)} "
                                 f"{getattr(a, 'shape', '')}")
        if work.shape[0] < self.work_size or not work.flags.writeable:
            raise ValueError(f"work must be writeable with at least {self.work_size} elements, "
                             f"got {work.shape[0]}")
        work[work.shape[0] - self.n_state:] = state


class SimpleChainWithLoss:
    """A chain with a loss attached (see :func:`add_loss`). ``model(X, p)`` is the loss
    (plus the penalty of an :class:`~smallchains.L1Penalty` / :class:`~smallchains.L2Penalty`
    model)."""

    #: penalty weights ``l1 * sum |p| + l2 * sum p^2`` added to the loss (see
    #: :mod:`smallchains.penalties`); 0 for a plain model
    l1 = 0.0
    l2 = 0.0

    def __init__(self, chain: SimpleChain, loss: Loss):
        if not isinstance(chain, SimpleChain):
            raise TypeError(f"add_loss expects a SimpleChain, got {type(chain).__name__}")
        if not isinstance(loss, Loss):
            raise TypeError(f"add_loss expects a smallchains Loss, got {type(loss).__name__}")
        self.chain = chain
        self.loss = loss

    def __repr__(self) -> str:
        return f"add_loss({self.chain!r}, {self.loss!r})"

    @property
    def n_params(self) -> int:
        return self.chain.n_params

    def __call__(self, X, p, targets=None, *, state=None, training=False, seed=0, step=0) -> float:
        """Mean loss over the samples of ``X`` (``targets`` defaults to the loss's own).
        ``state``, ``training``, ``seed``, ``step``: as for :meth:`SimpleChain.__call__`
        (default inference)."""
        from .train import _prepare

        p = check_params(self.chain.n_params, p)
        key, step = check_random(seed, step)
        state = self.chain._check_state(state, p.dtype)
        X2, T, mod, plan = _prepare(self, X, p, targets)
        n = X2.shape[0]
        if training:
            self.chain._check_batch_stats(n, "X")
        nt = max(1, min(numba.get_num_threads(), -(-n // plan.B)))
        losses = np.zeros(nt, dtype=p.dtype)
        idx = np.arange(n)
        kernel = kernel_for(mod, plan, f"loss_range_{self.loss.kernel_kind}", training, default=False)
        works, metas, kstate = self.chain._workspace(plan, nt, p.dtype, key, step, state)
        combine, nstages = stage_kernels(mod, plan, p, works, training)
        loops.call(loops.loss_threads, [(kernel, loops.loss_sig(X2, T, idx, p)), combine],
                   (nstages, X2, T, idx, p, kstate, works, metas, losses, p.dtype.type(1.0 / n)))
        return float(losses.sum()) + self.penalty_value(p)

    def penalty_value(self, p) -> float:
        """``l1 * sum |p| + l2 * sum p^2`` (0.0 without a penalty), in float64."""
        if not (self.l1 or self.l2):
            return 0.0
        q = np.asarray(p, dtype=np.float64)
        return float(self.l1 * np.abs(q).sum() + self.l2 * (q * q).sum())

    def _reg(self, dtype, clip_norm=None):
        """The ``reg`` array of the training loops: ``[l1, l2, clip_norm or 0]``."""
        return np.array([self.l1, self.l2, clip_norm or 0.0], dtype=dtype)


def add_loss(chain: SimpleChain, loss: Loss) -> SimpleChainWithLoss:
    """Attach a loss (with its targets) to a chain: the object to train and differentiate.

    SimpleChains.jl: ``add_loss(chain, loss)``.
    """
    return SimpleChainWithLoss(chain, loss)


def remove_loss(model) -> SimpleChain:
    """The chain of a model (the chain itself if it has no loss)."""
    return model.chain if isinstance(model, SimpleChainWithLoss) else model


def init_params(chain, seed=None, dtype=np.float32, rng=None) -> np.ndarray:
    """A new parameter vector for ``chain`` (or a model), initialized layer by layer.

    Dense and convolution weights are Glorot (Xavier) normal, biases zero, as in
    SimpleChains.jl's ``init_params``. Values are drawn in float64 from
    ``numpy.random.default_rng(seed)`` (or ``rng``) and cast, so float32 and float64
    vectors from one seed agree to float32 rounding.

    Returns
    -------
    ndarray, shape ``(chain.n_params,)``, ``dtype`` (float32 default, or float64).
    """
    chain = remove_loss(chain)
    dtype = check_dtype(dtype)
    if rng is None:
        rng = np.random.default_rng(seed)
    p64 = np.zeros(chain.n_params, dtype=np.float64)
    for layer, (ins, _), views in zip(chain.layers, chain._shapes, chain.param_views(p64)):
        layer.init_params(views, ins, rng)
    return p64.astype(dtype)


def init_state(chain, dtype=np.float32) -> np.ndarray:
    """A new layer-state vector for ``chain`` (or a model): the state outside ``p`` of
    layers that have one, in chain order (BatchNorm: ``running_mean`` zeros,
    ``running_var`` ones, as torch). Pass it to inference (read) and to ``train_*``
    (updated in place in training mode); the optimizer never sees it. Named views:
    :meth:`SimpleChain.state_views`.

    Returns
    -------
    ndarray, shape ``(chain.n_state,)`` (``(0,)`` for a chain without state), ``dtype``.
    """
    chain = remove_loss(chain)
    dtype = check_dtype(dtype)
    state = np.zeros(chain.n_state, dtype=dtype)
    for layer, (ins, _), views in zip(chain.layers, chain._shapes, chain.state_views(state)):
        if views:
            layer.init_state(views, ins)
    return state


def numparam(chain) -> int:
    """Number of parameters (SimpleChains.jl: ``numparam``)."""
    return remove_loss(chain).n_params
