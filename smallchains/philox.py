"""Philox4x32-10: the counter-based random number generator of random layers (Dropout).

A counter-based generator is a keyed bijection: ``philox4x32(counter, key)`` maps a
128-bit counter (four 32-bit words) and a 64-bit key (two words) to four 32-bit words
that pass the BigCrush statistical tests, with no state carried from one call to the
next. So any random number is a pure function of where it is used: smallchains' Dropout
keeps unit ``u`` of dataset row ``r`` at optimizer step ``t`` in layer ``l`` iff word
``u % 4`` of ``philox4x32((t, r, l, u // 4), (seed_lo, seed_hi))`` is below
``(1 - rate) * 2**32`` (:func:`dropout_keep`). The mask therefore does not depend on the
thread count, the block size, how the minibatch is split or the order of evaluation, and
the pullback recomputes it instead of storing it.

Source: J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel random numbers: as
easy as 1, 2, 3", SC'11 (2011); constants and round structure as in the paper's
Random123 library (``philox4x32_R`` with R = 10), checked against its published
known-answer vectors in ``tests/test_dropout.py``. (torch uses the same generator on
CUDA; numpy's ``Philox`` bit generator is the 4x64 variant.)
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._config import INLINE_OPTIONS, JIT_OPTIONS

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


@njit(**INLINE_OPTIONS)
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter ``(c0, c1, c2, c3)`` and key ``(k0, k1)``: four words.

    All arguments and results are ``np.uint64`` holding 32-bit values (arguments are
    reduced modulo ``2**32``); uint64 arithmetic throughout, so numba never mixes signed
    and unsigned types (which would give floats)."""
    c0 &= _LO
    c1 &= _LO
    c2 &= _LO
    c3 &= _LO
    k0 &= _LO
    k1 &= _LO
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _S32) ^ c1 ^ k0, p1 & _LO, (p0 >> _S32) ^ c3 ^ k1, p0 & _LO)
        k0 = (k0 + _W0) & _LO
        k1 = (k1 + _W1) & _LO
    return c0, c1, c2, c3


def philox4x32(counter, key) -> np.ndarray:
    """Philox4x32-10 from Python: ``counter`` four ints, ``key`` two ints (each taken
    modulo ``2**32``); returns the four output words as a ``uint32`` array."""
    c = [np.uint64(int(v) % 2 ** 32) for v in counter]
    k = [np.uint64(int(v) % 2 ** 32) for v in key]
    if len(c) != 4 or len(k) != 2:
        raise ValueError("philox4x32 expects a counter of 4 words and a key of 2")
    return np.array(_philox_py(c[0], c[1], c[2], c[3], k[0], k[1]), dtype=np.uint32)


@njit(**JIT_OPTIONS)
def _philox_py(c0, c1, c2, c3, k0, k1):
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


def keep_threshold(rate: float) -> int:
    """The integer ``round((1 - rate) * 2**32)``: a unit is kept iff its 32-bit word is
    below it, so it is kept with probability exactly ``threshold / 2**32``."""
    return int(round((1.0 - rate) * 2 ** 32))


def dropout_keep(seed, step, rows, layer, n_units, rate) -> np.ndarray:
    """The keep mask Dropout layer ``layer`` (its index in the chain) draws in training
    mode at step ``step`` for dataset rows ``rows``: a bool array ``(len(rows), n_units)``.

    The same function of ``(seed, step, row, layer, unit)`` as the compiled layer (but a
    separate implementation: one generator call per unit), for tests and for feeding the
    same mask to another framework. ``seed``: the key (``train_batched``'s ``seed``,
    ``valgrad``'s ``seed``); ``step``: the optimizer step count ``t`` (1 for the first step
    of a fresh optimizer)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((rows.shape[0], n_units), dtype=np.bool_)
    _keep_into(out, np.uint64(int(seed) % 2 ** 64), np.uint64(int(step)), rows,
               np.uint64(layer), np.uint64(keep_threshold(rate)))
    return out


@njit(**JIT_OPTIONS)
def _keep_into(out, key, step, rows, layer, thr):
    for i in range(rows.shape[0]):
        for u in range(out.shape[1]):
            w = philox4x32_10(step, np.uint64(rows[i]), layer, np.uint64(u // 4),
                              key & _LO, key >> _S32)
            out[i, u] = w[u % 4] < thr
