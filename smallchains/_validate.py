"""Input checks shared by the public API. Kernels never validate; these wrappers do,
before anything is written, so a rejected call leaves the caller's arrays untouched."""

from __future__ import annotations

import math
import numbers
from math import prod

import numpy as np
from numba import njit

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# Without fast-math (isfinite must not be assumed true) and not through numpy: for the 50,000
# CIFAR images (51 million float32) np.isfinite(X).all() took 12 ms per call, most of it
# page faults of its 51 MB temporary, and train_batched pays it once per call (an epoch of
# network 1 at 2 threads is about 70 ms); this loop takes 5.3 ms (Zen 5) and allocates
# nothing.
@njit(nogil=True, cache=True, error_model="numpy")
def _all_finite_flat(a):
    ok = True
    for j in range(a.shape[0]):
        ok &= np.isfinite(a[j])
    return ok


#: arrays of at least this many elements are checked by the compiled loop (smaller ones
#: by numpy, which costs less than a dispatcher call there)
_COMPILED_CHECK_SIZE = 1 << 16


def all_finite(a: np.ndarray) -> bool:
    """Whether every element of the float array ``a`` is finite."""
    if a.size >= _COMPILED_CHECK_SIZE and a.dtype in FLOAT_DTYPES and a.flags.c_contiguous:
        return bool(_all_finite_flat(a.reshape(-1)))
    return bool(np.isfinite(a).all())


def check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def check_params(n_params: int, p, *, writable: bool = False, name: str = "p") -> np.ndarray:
    """``p`` must be a 1-D C-contiguous float32/float64 ndarray of length ``n_params``.
    Never copies (training updates ``p`` in place)."""
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray (from init_params), got {type(p).__name__}")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {p.dtype}")
    if p.ndim != 1 or p.shape[0] != n_params:
        raise ValueError(f"{name} must have shape ({n_params},) for this chain, got {p.shape}")
    if not p.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (it is updated in place); use np.ascontiguousarray")
    if writable and not p.flags.writeable:
        raise ValueError(f"{name} must be writeable (it is updated in place)")
    return p


def check_finite(Xf: np.ndarray, name: str = "X"):
    """Raise ``ValueError`` naming the first sample (row of ``Xf``) with a NaN or Inf."""
    if not all_finite(Xf):
        raise nonfinite_error(Xf, name)


def nonfinite_error(Xf: np.ndarray, name: str = "X") -> ValueError:
    """The ``ValueError`` for the rows ``Xf`` that hold a NaN or Inf (the first named)."""
    bad = np.argwhere(~np.isfinite(Xf))[0]
    return ValueError(f"{name} contains NaN or Inf (first at sample {bad[0]})")


def check_inputs(input_shape: tuple, X, dtype, *, allow_single: bool = True, name: str = "X",
                 finite: bool = True):
    """Validate ``X`` of shape ``(N, *input_shape)`` (or one sample ``input_shape``).
    ``finite=False``: not checked for NaN and Inf here unless it is converted to a narrower
    float (the caller's kernels check it, see :func:`smallchains.train_batched`).

    Returns ``(X2, single)``: ``X2`` is a C-contiguous ``(N, prod(input_shape))`` array of
    ``dtype`` -- a view of ``X`` when possible, else ONE copy (non-contiguous, read-only,
    or another float dtype); ``single`` tells whether a single sample was given.

    Raises
    ------
    TypeError
        Not a numeric array, or integer/bool/complex/object dtype.
    ValueError
        Wrong shape, empty batch, NaN or Inf.
    """
    if not isinstance(X, np.ndarray):
        try:
            X = np.asarray(X)
        except Exception as e:  # ragged lists etc.
            raise TypeError(f"{name} must be a numeric array, got {type(X).__name__}") from e
    if X.dtype.kind != "f":
        raise TypeError(
            f"{name} must be a float32 or float64 array, got dtype {X.dtype}"
            + ("; cast it with X.astype(np.float32)" if X.dtype.kind in "iub" else "")
        )
    in_shape = tuple(input_shape)
    single = False
    if X.shape == in_shape and allow_single:
        single = True
        X = X.reshape((1,) + in_shape)
    if X.ndim != len(in_shape) + 1 or tuple(X.shape[1:]) != in_shape:
        expected = f"(N, {', '.join(map(str, in_shape))})"
        raise ValueError(f"{name} must have shape {expected} (batch first), got {X.shape}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (N = 0); need at least one sample")
    Xf = X.reshape(X.shape[0], prod(in_shape))
    dtype = np.dtype(dtype)
    if finite or Xf.dtype.itemsize > dtype.itemsize:  # before the range check, which a NaN
        check_finite(Xf, name)  # or Inf would mislead (and the cast would make new Infs)
    if Xf.dtype.itemsize > dtype.itemsize and np.abs(Xf).max() > np.finfo(dtype).max:
        raise ValueError(f"{name} has values beyond the {dtype} range (max |x| = {np.abs(Xf).max():.3g}); "
                         f"they cannot be converted to the parameter dtype {dtype}")
    X2 = np.ascontiguousarray(Xf, dtype=dtype)
    if not X2.flags.writeable:
        # numba compiles a separate specialization for read-only arrays (e.g. the cached
        # arrays of smallchains.datasets); one copy keeps a single compiled kernel
        X2 = X2.copy()
    return X2, single


def check_count(value, name: str, minimum: int = 0) -> int:
    """``value`` as an ``int``: a Python or numpy integer (not a bool) ``>= minimum``.

    Raises
    ------
    TypeError
        Not an integer: floats (``3.0`` too: nothing is truncated), bools, strings, ...
    ValueError
        Below ``minimum``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(owner: str, name: str, value, low: float, high: float = math.inf, *,
               low_open: bool = False) -> float:
    """A hyperparameter as a ``float`` in ``[low, high)`` (``(low, high)`` if ``low_open``).
    ``high`` is always excluded, so NaN and infinities never pass.

    Raises
    ------
    TypeError
        Not a real number (bools and strings included).
    ValueError
        Outside the range; the message names ``owner``, ``name`` and the range.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not ((low < v) if low_open else (low <= v)) or not v < high:
        if high == math.inf:
            valid = f"{'>' if low_open else '>='} {low:g} and finite"
        else:
            valid = f"in {'(' if low_open else '['}{low:g}, {high:g})"
        raise ValueError(f"{owner}: {name} must be {valid}, got {value!r}")
    return v


def check_random(seed, step=0):
    """``(key, step)`` of the counter-based generator of random layers (Dropout).

    ``seed``: a Python or numpy integer in ``[0, 2**64)`` is the key itself; ``None`` draws
    a fresh key from the operating system's entropy (numpy ``SeedSequence``). ``step``: an
    integer ``>= 0`` (the optimizer step count in training).

    Raises
    ------
    TypeError
        Not an integer (floats, bools, strings).
    ValueError
        Out of range.
    """
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    seed = check_count(seed, "seed")
    if seed >= 2 ** 64:
        raise ValueError(f"seed must be < 2**64, got {seed}")
    step = check_count(step, "step")
    if step >= 2 ** 63:
        raise ValueError(f"step must be < 2**63, got {step}")
    return seed, step
