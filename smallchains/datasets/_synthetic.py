"""Synthetic regression workloads."""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["matrix_exponential", "expm2x2"]


def expm2x2(a: np.ndarray) -> np.ndarray:
    """Matrix exponential of a stack of 2x2 real matrices, closed form.

    Parameters
    ----------
    a : array_like, shape (..., 2, 2)
        Real matrices.

    Returns
    -------
    numpy.ndarray, float64, shape (..., 2, 2)

    Notes
    -----
    With ``m = trace/2`` and ``s = sqrt(m**2 - det)`` (complex if negative),
    ``exp(A) = e**m * (cosh(s) I + sinh(s)/s (A - m I))``. ``m**2 - det`` is
    computed as ``((a00 - a11)/2)**2 + a01*a10`` to avoid cancellation, and
    ``sinh(s)/s`` uses its Taylor series near ``s = 0``.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.shape[-2:] != (2, 2):
        raise ValueError(f"expected shape (..., 2, 2), got {a.shape}")
    a00, a01, a10, a11 = a[..., 0, 0], a[..., 0, 1], a[..., 1, 0], a[..., 1, 1]
    m = 0.5 * (a00 + a11)
    h = 0.5 * (a00 - a11)
    q = h * h + a01 * a10  # = m**2 - det
    s = np.sqrt(q.astype(np.complex128))
    s2 = s * s
    small = np.abs(s) < 1e-3
    s_safe = np.where(small, 1.0, s)
    sinhc = np.where(small, 1.0 + s2 / 6.0 * (1.0 + s2 / 20.0 * (1.0 + s2 / 42.0)),
                     np.sinh(s_safe) / s_safe).real
    cosh = np.cosh(s).real
    e = np.exp(m)
    out = np.empty(a.shape, dtype=np.float64)
    out[..., 0, 0] = e * (cosh + sinhc * h)
    out[..., 1, 1] = e * (cosh - sinhc * h)
    out[..., 0, 1] = e * sinhc * a01
    out[..., 1, 0] = e * sinhc * a10
    return out


def matrix_exponential(
    n: int, seed=None, dtype=np.float32
) -> Tuple[np.ndarray, np.ndarray]:
    """Random 2x2 matrices and their matrix exponentials (regression task).

    The workload of the SimpleChains.jl announcement blog post: learn the map
    from a 2x2 matrix to its matrix exponential.

    Parameters
    ----------
    n : int
        Number of samples, ``n >= 0``.
    seed : None, int, or numpy.random.Generator
        Passed to :func:`numpy.random.default_rng`; the same integer seed
        gives the same arrays.
    dtype : {numpy.float32, numpy.float64}
        Output dtype.

    Returns
    -------
    X : numpy.ndarray, shape (n, 4), ``dtype``
        Entries i.i.d. standard normal; row ``i`` is the 2x2 matrix
        ``A_i`` flattened row-major (``[a00, a01, a10, a11]``).
    Y : numpy.ndarray, shape (n, 4), ``dtype``
        ``expm(A_i)`` flattened row-major, computed in float64 from the
        values of ``X`` as returned (after the cast to ``dtype``), then cast.
        Unbounded above (entries grow like ``e**(trace/2 + |s|)``).

    Raises
    ------
    ValueError
        ``n`` is negative or ``dtype`` is not float32/float64.
    TypeError
        ``n`` is not an integer.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(n), 4)).astype(dtype)
    y = expm2x2(x.astype(np.float64).reshape(-1, 2, 2)).reshape(-1, 4)
    return x, y.astype(dtype)
