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
* :class:`HuberLoss`: torch's ``nn.HuberLoss(delta=delta)``, the mean over all outputs.
* :class:`CustomLoss`: a user's numba function of one sample, compiled into the fused
  kernels like the built-ins.

Every loss takes ``weights=`` (one non-negative number per sample): the loss becomes
``(1/N) sum_n w[n] * loss_n``, torch's ``(w * loss(reduction="none")...).mean()``.

Each loss's block kernel writes ``dL/dyhat`` (already divided by ``N``) into the workspace
and returns the *unscaled* sum for the block. The built-ins without weights have block
kernels of their own (below, in :data:`LOSS_KERNELS`); a weighted loss, a Huber loss and a
custom loss are per-sample functions ``f(yhat, y, grad) -> loss of the sample`` which the
chain's kernel module wraps into a generated block kernel (:meth:`Loss.kernel_source`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.machinery
import inspect
import marshal
import math
import sys

import numpy as np
from numba import njit
from numba.core.dispatcher import Dispatcher
from numba.core.errors import NumbaError

from ._config import INLINE_OPTIONS, UNCACHED_MARK
from ._fastmath import exp_like
from ._numba_utils import like
from .compiler.runtime import load_block


def _writeable(a):
    # read-only arrays would make numba compile a second specialization of every kernel
    return a if a.flags.writeable else a.copy()


class Loss:
    """Base class. ``targets`` holds ``y`` (or labels) for all samples, batch-first.

    Parameters
    ----------
    targets : array_like, shape ``(N, ...)``
        See each loss.
    weights : array_like, shape ``(N,)``, optional
        One finite, non-negative weight per sample: the loss becomes
        ``(1/N) sum_n weights[n] * loss_n`` (not divided by the sum of the weights; scale
        them to taste), its gradient likewise. Kept when the loss is given other targets
        of the same length; :meth:`with_targets` drops them. A weighted loss runs through
        the per-sample kernel path (a little slower than the unweighted built-ins).
    """

    #: key into :data:`LOSS_KERNELS`: the block kernel of the unweighted built-in.
    kind: str = ""
    #: True if targets are class labels (integers), False if they are float arrays.
    labels: bool = False
    #: the per-sample function ``f(yhat, y, grad) -> float`` of the weighted path
    #: (a name in this module), see :meth:`kernel_source`.
    sample_function: str = ""

    def __init__(self, targets, weights=None):
        self._raw = targets
        self.targets = targets
        self.weights = None if weights is None else self._check_weights(weights)

    def __repr__(self) -> str:
        shape = getattr(self.targets, "shape", None)
        w = "" if self.weights is None else ", weights=<(%d,)>" % self.weights.shape[0]
        return f"{type(self).__name__}(<targets {shape}>{w})"

    def with_targets(self, targets, weights=None) -> "Loss":
        """The same loss (hyperparameters kept) with other targets, for example a test set;
        unweighted unless ``weights`` are given."""
        new = copy.copy(self)
        new._raw = new.targets = targets
        new.weights = None if weights is None else self._check_weights(weights)
        return new

    def _check_weights(self, weights):
        w = np.asarray(weights)
        name = type(self).__name__
        if w.dtype.kind not in "fiu" or w.dtype.kind == "b":
            raise TypeError(f"{name}: weights must be a real array, got dtype {w.dtype}")
        if w.ndim != 1:
            raise ValueError(f"{name}: weights must have shape (N,), one per sample, got {w.shape}")
        if not np.isfinite(w).all() or (w.size and w.min() < 0):
            raise ValueError(f"{name}: weights must be finite and >= 0")
        return w.astype(np.float64)  # a copy: the caller's array is never read again

    # --- kernels --------------------------------------------------------------------------
    @property
    def kernel_kind(self) -> str:
        """Name of this loss's kernels in the chain's kernel module (``valgrad_range_<kind>``)."""
        return self.kind if self.weights is None else "w_" + self.kind

    def kernel_source(self):
        """``(kernel_kind, source)`` for a loss whose block kernel is generated into the
        chain's kernel module, or None for an unweighted built-in (its block kernel is in
        :data:`LOSS_KERNELS`). ``source`` defines ``_loss_block_<kernel_kind>`` (see
        :func:`per_sample_block_source`)."""
        if self.weights is None:
            return None
        return self.kernel_kind, per_sample_block_source(
            self.kernel_kind, f"from smallchains.losses import {self.sample_function}\n",
            self.sample_function, weighted=True)

    def _target_width(self, out_shape) -> int:
        return 1 if self.labels else int(np.prod(out_shape))

    def prepare_targets(self, out_shape: tuple, n: int, dtype, targets=None) -> np.ndarray:
        """Validate targets against the chain output and return a kernel-ready array:
        ``(n, n_out)`` of ``dtype`` (labels: ``(n,)`` int64); with weights, ``(n, width + 1)``
        of ``dtype`` whose last column holds the weights (labels as floats in column 0).

        Never modifies the caller's array: a dtype conversion makes a copy.

        Raises
        ------
        ValueError, TypeError
            Wrong shape, length ``!= n``, non-numeric dtype, non-finite values; weights of
            another length than ``n``.
        """
        T = self._prepare(out_shape, n, dtype, targets)
        if self.weights is None:
            return T
        if self.weights.shape[0] != n:
            raise ValueError(f"{type(self).__name__}: the loss has {self.weights.shape[0]} weights "
                             f"but {n} samples; give other data its own loss (loss.with_targets(y, "
                             "weights))")
        k = self._target_width(out_shape)
        Tw = np.empty((n, k + 1), dtype=dtype)
        Tw[:, :k] = T.reshape(n, k)
        Tw[:, k] = self.weights
        return Tw

    def _prepare(self, out_shape, n, dtype, targets):
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
    weights : array_like, shape ``(N,)``, optional -- see :class:`Loss`.
    """

    kind = "squared"
    sample_function = "squared_sample"


class AbsoluteLoss(Loss):
    """Mean over samples of the summed absolute error, ``(1/N) sum |yhat - y|``.

    The derivative at ``yhat == y`` is taken as 0.

    Parameters
    ----------
    targets : array_like, shape ``(N, *output_shape)``, float
    weights : array_like, shape ``(N,)``, optional -- see :class:`Loss`.
    """

    kind = "absolute"
    sample_function = "absolute_sample"


class MSELoss(Loss):
    """Mean squared error over every output of every sample, torch's ``nn.MSELoss()``:
    ``(1/(N * n_out)) sum (yhat - y)^2`` (``SquaredLoss`` divided by the output size).

    Parameters
    ----------
    targets : array_like, shape ``(N, *output_shape)``, float
    weights : array_like, shape ``(N,)``, optional -- see :class:`Loss`.
    """

    kind = "mse"
    sample_function = "mse_sample"


class BinaryLogitCrossEntropyLoss(Loss):
    """Binary cross-entropy on logits, torch's ``nn.BCEWithLogitsLoss()``: the mean over
    every output of every sample of ``max(z, 0) - z y + log(1 + exp(-|z|))`` (the stable
    form of ``-y log sigmoid(z) - (1 - y) log(1 - sigmoid(z))``); gradient
    ``(sigmoid(z) - y) / (N * n_out)``.

    Parameters
    ----------
    targets : array_like, shape ``(N, *output_shape)``, float
        Probabilities in ``[0, 1]`` (0/1 labels, or soft targets); others raise ValueError.
    weights : array_like, shape ``(N,)``, optional -- see :class:`Loss`.
    """

    kind = "bce_logits"
    sample_function = "bce_logits_sample"

    def _prepare(self, out_shape, n, dtype, targets):
        y = super()._prepare(out_shape, n, dtype, targets)
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(f"BinaryLogitCrossEntropyLoss: targets must lie in [0, 1], got range "
                             f"[{y.min()}, {y.max()}]")
        return y


class LogitCrossEntropyLoss(Loss):
    """Softmax cross-entropy on logits with 0-based integer class labels.

    Parameters
    ----------
    targets : array_like of int, shape ``(N,)``
        The class labels: class of each sample, in ``[0, n_classes)`` where
        ``n_classes`` is the chain's output width. Float labels raise ``TypeError``;
        out-of-range labels ``ValueError``.
    weights : array_like, shape ``(N,)``, optional -- see :class:`Loss`. (Per-sample
        weights, not torch's per-class ``weight=``.)
    """

    kind = "logitce"
    sample_function = "logitce_sample"
    labels = True

    def _prepare(self, out_shape, n, dtype, targets):
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


class HuberLoss(Loss):
    """Huber loss, torch's ``nn.HuberLoss(delta=delta)``: the mean over every output of
    every sample of ``0.5 d^2`` if ``|d| <= delta`` else ``delta (|d| - 0.5 delta)``, with
    ``d = yhat - y``; gradient ``clip(d, -delta, delta) / (N n_out)``.

    Parameters
    ----------
    targets : array_like, shape ``(N, *output_shape)``, float
    delta : float, default 1.0 -- finite, > 0. Part of the compiled kernel (each value
        compiles once, then comes from the on-disk cache).
    weights : array_like, shape ``(N,)``, optional -- see :class:`Loss`.
    """

    kind = "huber"

    def __init__(self, targets, delta: float = 1.0, weights=None):
        from ._validate import check_real

        super().__init__(targets, weights)
        self.delta = check_real("HuberLoss", "delta", delta, 0.0, low_open=True)

    def __repr__(self):
        return super().__repr__()[:-1] + f", delta={self.delta!r})"

    @property
    def kernel_kind(self):
        tag = hashlib.sha256(repr(self.delta).encode()).hexdigest()[:12]
        return ("w_" if self.weights is not None else "") + f"huber_{tag}"

    def kernel_source(self):
        kind = self.kernel_kind
        head = (f"from smallchains.losses import huber_sample\n\n\n@njit(**_JI)\n"
                f"def _sample_{kind}(yhat, y, grad):\n"
                f"    return huber_sample(yhat, y, grad, {self.delta!r})\n")
        return kind, per_sample_block_source(kind, head, f"_sample_{kind}",
                                             weighted=self.weights is not None)


_USER_LOSSES: dict = {}  # CustomLoss key -> the user's dispatcher (this process)


def user_loss(key: str):
    """The function of a :class:`CustomLoss` by its key (None if no such loss was made in
    this process). Generated chain modules look their custom losses up here."""
    return _USER_LOSSES.get(key)


def _code_key(h, fn, modules, depth=0):
    """Feed into ``h`` what decides the compiled code of ``fn``: its bytecode, constants,
    and the numbers, arrays and jitted functions it reads from globals or its closure.
    Adds to ``modules`` the module name of ``fn`` and of every function it reaches."""
    py = getattr(fn, "py_func", fn)
    code = getattr(py, "__code__", None)
    if code is None or depth > 4:
        h.update(repr(fn).encode())
        return
    modules.add(py.__module__)
    h.update(f"{py.__module__}.{py.__qualname__}".encode())
    h.update(marshal.dumps(code))
    values = [(n, py.__globals__[n]) for n in code.co_names if n in py.__globals__]
    values += list(zip(code.co_freevars, [c.cell_contents for c in (py.__closure__ or ())]))
    for name, v in values:
        h.update(name.encode())
        if isinstance(v, np.ndarray):
            h.update(str(v.dtype).encode() + repr(v.shape).encode() + v.tobytes())
        elif isinstance(v, (bool, int, float, complex, str, bytes, tuple, np.generic)):
            h.update(repr(v).encode())
        elif isinstance(v, Dispatcher) or callable(v) and hasattr(v, "__code__"):
            _code_key(h, v, modules, depth + 1)
        else:  # modules, classes: by name (a change inside them is not seen)
            h.update(getattr(v, "__name__", type(v).__name__).encode())


def _importable(modname) -> bool:
    """Whether a later process can import the module ``modname`` by its name, as numba's
    disk cache does to rebuild a cached function's globals: ``__main__``, or a module in
    ``sys.modules`` that the path finders locate. A module executed from a file without
    being registered (``importlib.util.spec_from_file_location`` + ``exec_module``, as
    pytest plugins and notebook tools do) is not: numba records it as ``'<dynamic>'``, and
    loading such a cache entry in another process fails with ``ModuleNotFoundError``."""
    if modname == "__main__":
        return True
    if not isinstance(modname, str) or modname not in sys.modules:
        return False
    try:
        return importlib.machinery.PathFinder.find_spec(modname.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _fingerprint(fn):
    """``(key, disk_cached)`` of a :class:`CustomLoss` function: the cache key of its
    compiled code (:func:`_code_key`), and False when ``fn`` or a function it calls lives
    in a module another process could not import (:func:`_importable`): its kernels are
    then compiled in every process, never written to numba's disk cache."""
    h, modules = hashlib.sha256(), set()
    _code_key(h, fn, modules)
    return h.hexdigest()[:20], all(_importable(m) for m in modules)


class CustomLoss(Loss):
    """A loss given by a numba function of one sample, compiled into the chain's fused
    kernels like the built-ins (SimpleChains.jl issue #143).

    The loss of a batch is ``(1/N) sum_n fn(yhat[n], y[n], grad_n)`` (with ``weights``:
    ``(1/N) sum_n w[n] fn(...)``); its gradient is built from the ``grad_n`` the function
    writes.

    Parameters
    ----------
    fn : numba ``@njit`` function ``fn(yhat, y, grad) -> float``
        ``yhat``: the chain output of one sample, 1-D of ``n_out`` elements (a strided
        view: index it, do not assume contiguity); ``y``: its target row, 1-D of the
        target width; ``grad``: 1-D of ``n_out`` elements, zeroed before the call, to
        receive ``d fn / d yhat``. Returns the sample's loss. All three have the
        parameter dtype (float32 or float64); keep constants in that dtype
        (``yhat.dtype.type(0.5)``) to stay in float32. Must not allocate (no new arrays)
        to keep training allocation-free, and must not keep references to its arguments.
    targets : array_like, shape ``(N, ...)``, float
        The target rows, flattened per sample; their width must equal the chain's output
        size unless ``target_width`` says otherwise.
    weights : array_like, shape ``(N,)``, optional -- see :class:`Loss`.
    target_width : int, optional
        Width of a target row when it differs from the output size (for example a
        loss that reads a per-sample scale beside each target).

    Raises
    ------
    TypeError
        ``fn`` is not a numba dispatcher (decorate it with ``@numba.njit``), does not take
        three positional arguments, cannot be compiled for the arrays above (numba's
        error is quoted), or returns something other than a real scalar. Checked when the
        loss is first used with a chain and a dtype, before any kernel is compiled.

    Notes
    -----
    The kernels are cached on disk under a key of ``fn``'s bytecode and of the numbers,
    arrays and jitted functions it reads from globals or its closure; a change elsewhere
    (inside a module it imports) is not seen: clear the cache directory then
    (:func:`smallchains.clear_cache`). If ``fn``, or a function it calls, lives in a module
    another process could not import by name (one executed from a file without being put
    in ``sys.modules``), the chain's loss kernels are compiled in each process and not
    written to disk (``disk_cached`` is False): numba's cache entry would name the module
    ``'<dynamic>'`` and fail to load elsewhere. The loss pickles (for Dask) if ``fn`` does.
    """

    kind = "user"

    def __init__(self, fn, targets, weights=None, *, target_width=None):
        if not isinstance(fn, Dispatcher):
            raise TypeError(f"CustomLoss: fn must be a numba @njit function fn(yhat, y, grad) "
                            f"-> float, got {type(fn).__name__} {fn!r}; decorate it with "
                            "@numba.njit")
        try:
            inspect.signature(fn.py_func).bind(0, 0, 0)
        except TypeError:
            raise TypeError(f"CustomLoss: {fn.__name__} must take three positional arguments "
                            f"(yhat, y, grad), its signature is "
                            f"{inspect.signature(fn.py_func)}") from None
        if target_width is not None and (not isinstance(target_width, (int, np.integer))
                                         or isinstance(target_width, bool) or target_width < 1):
            raise ValueError(f"CustomLoss: target_width must be a positive int, got {target_width!r}")
        super().__init__(targets, weights)
        self.fn, self.target_width = fn, target_width
        self.key, self.disk_cached = _fingerprint(fn)
        _USER_LOSSES[self.key] = fn
        self._checked = set()

    def __repr__(self):
        return super().__repr__()[:-1] + f", fn={self.fn.__name__})"

    def __setstate__(self, d):  # unpickled (a Dask worker): register the function here too
        self.__dict__.update(d)
        _USER_LOSSES[self.key] = self.fn
        self.disk_cached = _fingerprint(self.fn)[1]  # fn may come by value, its module absent

    @property
    def kernel_kind(self):
        return ("w_" if self.weights is not None else "") + "user_" + self.key

    def kernel_source(self):
        kind = self.kernel_kind
        head = (f"from smallchains.losses import user_loss as _user_loss\n"
                f"_sample_{kind} = _user_loss({self.key!r})  # None outside the process\n")
        if not self.disk_cached:
            head = UNCACHED_MARK + "\n" + head
        return kind, per_sample_block_source(kind, head, f"_sample_{kind}",
                                             weighted=self.weights is not None)

    def _target_width(self, out_shape):
        return int(np.prod(out_shape)) if self.target_width is None else int(self.target_width)

    def _prepare(self, out_shape, n, dtype, targets):
        name = f"CustomLoss({self.fn.__name__})"
        y = np.asarray(self.targets if targets is None else targets)
        if y.dtype.kind not in "fiu" or y.dtype.kind == "b":
            raise TypeError(f"{name}: targets must be a float array, got dtype {y.dtype}")
        if y.ndim == 0 or y.shape[0] != n:
            raise ValueError(f"{name}: targets have {y.shape[0] if y.ndim else 0} samples but X "
                             f"has {n}")
        k = self._target_width(out_shape)
        y = y.reshape(n, -1) if y.ndim != 1 else y.reshape(n, 1)
        if y.shape[1] != k:
            raise ValueError(f"{name}: target rows must have {k} elements "
                             + ("(the chain's output size; pass target_width= for another "
                                "width)" if self.target_width is None else "(target_width)")
                             + f", got {y.shape[1]}")
        if not np.isfinite(y).all():
            raise ValueError(f"{name}: targets contain NaN or Inf")
        T = _writeable(np.ascontiguousarray(y, dtype=dtype))
        self._check_fn(int(np.prod(out_shape)), k, np.dtype(dtype))
        return T

    def _check_fn(self, n_out, k, dtype):
        """Compile ``fn`` for the argument types the kernels pass, once per dtype, and check
        what it returns; a clear TypeError instead of an error deep in kernel compilation."""
        if (n_out, k, dtype) in self._checked:
            return
        yhat = np.zeros(2 * n_out, dtype)[::2]  # strided, as in the kernels
        grad = np.zeros(2 * n_out, dtype)[::2]
        y = np.zeros((2, k), dtype)[0]
        name = self.fn.__name__
        try:
            v = self.fn(yhat, y, grad)
        except NumbaError as e:
            msg = str(e).strip().splitlines()
            raise TypeError(f"CustomLoss: numba could not compile {name}(yhat, y, grad) for "
                            f"yhat, grad: {dtype}[{n_out}] (strided) and y: {dtype}[{k}]: "
                            + " / ".join(msg[:6])) from None
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"CustomLoss: {name}(yhat, y, grad) must return the sample's loss as "
                            f"a real scalar, got {type(v).__name__}")
        self._checked.add((n_out, k, dtype))


def per_sample_block_source(kind: str, head: str, fn: str, weighted: bool) -> str:
    """Source of the block kernel ``_loss_block_<kind>`` (same signature as the built-in
    block kernels) that calls the per-sample function ``fn(yhat, y, grad) -> float`` for
    every sample of the block. ``head`` (imports, a wrapper) goes first. Generated into a
    chain's kernel module, which has ``njit``, ``like`` and ``_JI`` (the inline options).
    ``weighted``: the last column of the targets is the sample weight."""
    row = "row[:row.shape[0] - 1]" if weighted else "row"
    w = "row[row.shape[0] - 1]" if weighted else "like(scale, 1.0)"
    return f"""
{head}

@njit(**_JI)
def _loss_block_{kind}(work, y_off, gy_off, T, idx, s0, n_out, B, nb, scale, need_grad):
    total = like(scale, 0.0)
    end = n_out * B
    for s in range(nb):
        row = T[idx[s0 + s]]
        w = {w}
        gy = work[gy_off + s:gy_off + end:B]
        for j in range(n_out):
            gy[j] = 0
        total += w * like(scale, {fn}(work[y_off + s:y_off + end:B], {row}, gy))
        ws = w * scale
        for j in range(n_out):
            gy[j] *= ws
    for j in range(n_out):
        for s in range(nb, B):
            work[gy_off + j * B + s] = 0
    return total
"""


# --- per-sample functions (weighted losses, Huber) ---------------------------------------
# f(yhat, y, grad) -> loss of one sample; grad (zeroed by the caller) gets d loss / d yhat.


@njit(**INLINE_OPTIONS)
def squared_sample(yhat, y, grad):
    total = like(yhat[0], 0.0)
    two = like(yhat[0], 2.0)
    for j in range(yhat.shape[0]):
        d = yhat[j] - y[j]
        total += d * d
        grad[j] = two * d
    return total


@njit(**INLINE_OPTIONS)
def absolute_sample(yhat, y, grad):
    total = like(yhat[0], 0.0)
    zero, one = like(yhat[0], 0.0), like(yhat[0], 1.0)
    for j in range(yhat.shape[0]):
        d = yhat[j] - y[j]
        total += abs(d)
        grad[j] = one if d > zero else (-one if d < zero else zero)
    return total


@njit(**INLINE_OPTIONS)
def mse_sample(yhat, y, grad):
    per_out = like(yhat[0], 1.0 / yhat.shape[0])
    total = squared_sample(yhat, y, grad)
    for j in range(yhat.shape[0]):
        grad[j] *= per_out
    return total * per_out


@njit(**INLINE_OPTIONS)
def bce_logits_sample(yhat, y, grad):
    zero, one = like(yhat[0], 0.0), like(yhat[0], 1.0)
    per_out = like(yhat[0], 1.0 / yhat.shape[0])
    total = like(yhat[0], 0.0)
    for j in range(yhat.shape[0]):
        z = yhat[j]
        e = math.exp(-abs(z))
        total += max(z, zero) - z * y[j] + math.log1p(e)
        sig = one / (one + e) if z >= zero else e / (one + e)
        grad[j] = per_out * (sig - y[j])
    return total * per_out


@njit(**INLINE_OPTIONS)
def logitce_sample(yhat, y, grad):
    label = int(y[0])
    n = yhat.shape[0]
    m = yhat[0]
    for j in range(1, n):
        m = max(m, yhat[j])
    z = like(yhat[0], 0.0)
    for j in range(n):
        z += math.exp(yhat[j] - m)
    lse = m + math.log(z)
    for j in range(n):
        grad[j] = math.exp(yhat[j] - lse)
    grad[label] -= like(yhat[0], 1.0)
    return lse - yhat[label]


@njit(**INLINE_OPTIONS)
def huber_sample(yhat, y, grad, delta):
    dl = like(yhat[0], delta)
    half = like(yhat[0], 0.5)
    per_out = like(yhat[0], 1.0 / yhat.shape[0])
    total = like(yhat[0], 0.0)
    for j in range(yhat.shape[0]):
        d = yhat[j] - y[j]
        if abs(d) <= dl:
            total += half * d * d
            grad[j] = per_out * d
        else:
            total += dl * (abs(d) - half * dl)
            grad[j] = per_out * (dl if d > 0 else -dl)
    return total * per_out


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
    """Logit cross-entropy of a block (``log sum_j exp(y_j) - y_label`` per sample, by the
    max-shifted log-sum-exp) and, if ``need_grad``, its gradient ``scale (softmax(y) -
    onehot(label))``. Lane-major passes over the block's samples, which LLVM vectorizes:
    each sample's max and then its sum of exps are kept in the first two rows of the
    gradient area (scratch, see above), the log-sum-exp in the first; the gradient rows are
    written last to first, the first (which held the log-sum-exp) last, in place; then the
    label's entries get ``- scale``. float32 exps are :func:`smallchains._fastmath.exp_f32`.
    Measured on a Zen 4 (AVX-512), 150 samples of 10 logits in a 160-sample block, one
    thread, in cache: 10.5 µs per block with the former per-sample loops (libm exps, the
    logits read at a stride of ``B``), 4.2 with these (of which 2.4 are the 3,000 exps)."""
    zero = like(scale, 0.0)
    total = zero
    if n_out == 1:  # one class: loss and gradient are 0 (NaN for a NaN logit)
        for s in range(nb):
            d = work[y_off + s] - work[y_off + s]
            total += d
            work[gy_off + s] = scale * d
    else:
        # views indexed by the loop counter: see load_block_rows
        mx, zs = work[gy_off:gy_off + nb], work[gy_off + B:gy_off + B + nb]
        y0 = work[y_off:y_off + nb]
        for s in range(nb):
            mx[s] = y0[s]
            zs[s] = zero
        for j in range(1, n_out):
            yj = work[y_off + j * B:y_off + j * B + nb]
            for s in range(nb):
                mx[s] = max(mx[s], yj[s])
        for j in range(n_out):
            yj = work[y_off + j * B:y_off + j * B + nb]
            for s in range(nb):
                zs[s] += exp_like(yj[s] - mx[s])
        for s in range(nb):  # mx becomes the log-sum-exp
            lse = mx[s] + math.log(zs[s])
            mx[s] = lse
            total += lse - work[y_off + T[idx[s0 + s]] * B + s]
        if need_grad:
            for j in range(n_out - 1, -1, -1):
                yj = work[y_off + j * B:y_off + j * B + nb]
                gj = work[gy_off + j * B:gy_off + j * B + nb]
                for s in range(nb):
                    gj[s] = scale * exp_like(yj[s] - mx[s])
            for s in range(nb):
                work[gy_off + T[idx[s0 + s]] * B + s] -= scale
    if need_grad and nb < B:
        _zero_padding(work, gy_off, n_out, B, nb)
    return total
