"""Kernels shared by every generated chain module: moving samples in and out of blocks,
summing the per-thread gradient rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._config import EXACT_OPTIONS, INLINE_OPTIONS, JIT_OPTIONS
from .._simd import transpose8
from .._validate import _all_finite_flat

# Workspace alignment in bytes: one cache line, so no vector load of a block row is split
# across two lines. In the training workspaces block offsets are multiples of 16 elements
# (choose_block_size makes B one), so an aligned base aligns every row; other block sizes
# (kernels(block_size=24), the ODE's blocks) align only the first. Measured on a Zen 3
# (matexp steps, 1 thread): a workspace 16 bytes off a 32-byte boundary made the layer
# steps 23-30% slower than an aligned one.
ALIGN_BYTES = 64


def aligned_zeros(shape, dtype) -> np.ndarray:
    """A zeroed C-contiguous array whose first element is ``ALIGN_BYTES``-aligned.

    numpy only guarantees 16-byte alignment (glibc's malloc and mmap chunks start 16 bytes
    past a page), which splits half of all 32-byte AVX loads across cache lines.
    """
    dtype = np.dtype(dtype)
    dims = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    if any(int(d) < 0 for d in dims):
        raise ValueError(f"aligned_zeros: negative dimensions are not allowed, got {shape!r}")
    n = int(np.prod(dims, dtype=np.int64))
    raw = np.zeros(n * dtype.itemsize + ALIGN_BYTES, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN_BYTES
    return raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape)


@njit(**INLINE_OPTIONS)
def load_block(X, idx, s0, nb, work, off, n_feat, B):
    """Copy rows ``idx[s0:s0+nb]`` of ``X (N, n_feat)`` into a feature-major block.

    Lanes ``nb..B-1`` of a partial block are zeroed: every layer computes all ``B`` lanes
    (constant trip counts vectorize best); the loss gives those lanes zero gradient.
    """
    # groups of 8 lanes: 8 sequential read streams, 8 adjacent lanes written per feature
    # (one row at a time writes every feature's cache line of the block once per sample:
    # measured on a Zen 3, Flatten -> Dense(1) over 200 inputs, B = 128: 448 ns per sample
    # forward, of which this loop was most)
    g8 = nb // 8 * 8
    for s in range(0, g8, 8):
        r0, r1, r2, r3 = idx[s0 + s], idx[s0 + s + 1], idx[s0 + s + 2], idx[s0 + s + 3]
        r4, r5, r6, r7 = idx[s0 + s + 4], idx[s0 + s + 5], idx[s0 + s + 6], idx[s0 + s + 7]
        for f in range(n_feat):
            o = off + f * B + s
            work[o] = X[r0, f]
            work[o + 1] = X[r1, f]
            work[o + 2] = X[r2, f]
            work[o + 3] = X[r3, f]
            work[o + 4] = X[r4, f]
            work[o + 5] = X[r5, f]
            work[o + 6] = X[r6, f]
            work[o + 7] = X[r7, f]
    for s in range(g8, nb):
        r = idx[s0 + s]
        for f in range(n_feat):
            work[off + f * B + s] = X[r, f]
    if nb < B:
        for f in range(n_feat):
            for s in range(nb, B):
                work[off + f * B + s] = 0


# The loaders of the training kernels also say whether every value they copied is finite
# (train_batched then skips its up-front scan of X, see smallchains.train). The checks
# (load_block_rows, and _all_finite_flat, X's own scan) are compiled without fast-math
# and on their own (EXACT_OPTIONS), so they do not rest on the kernels' fast-math flags
# leaving out nnan and ninf (see smallchains._config).


@njit(**INLINE_OPTIONS)
def load_block_checked(X, idx, s0, nb, work, off, n_feat, B):
    """:func:`load_block`, then whether the block is all finite."""
    load_block(X, idx, s0, nb, work, off, n_feat, B)
    return _all_finite_flat(work[off:off + n_feat * B])


@njit(**EXACT_OPTIONS)
def load_block_rows(X, idx, s0, nb, work, off, ld, n_feat, B):
    """Copy rows ``idx[s0:s0+nb]`` of ``X (N, n_feat)`` into a sample-major block
    (``work[off + s * ld + f]``, ``ld >= n_feat``; rows ``nb..B-1`` and the gaps zeroed),
    and ``nb`` after them (``work[off + B * ld]``, so the weight gradient skips padding
    rows): the input rows as they are, for a first layer whose weight gradient reads them
    (dense ``dw = "rows"``). Returns whether the rows are all finite (checked as they are
    copied). Four rows at a time, interleaved (one element of each per step, so the
    memory system fetches four rows at once). Measured on a Zen 4, network 1 of issue
    14, in-process A/B against one row at a time (minimum epochs, 4 processes with
    either variant built first): at 2 threads 86.4-87.5 against 93.9-95.8 ms in three,
    91.6 against 90.6 in one; at 1 thread 159.8-161.4 against 169.1-174.7 ms (2
    processes). Eight rows at a time measured slower than four (89.0-92.8 against
    86.8-88.1 ms at 2 threads).

    The loops index views (a row of ``X``, a row of the block) with the loop counter, not
    ``work[o + f]`` with a signed ``o``: numba's negative-index wraparound on such an
    index kept LLVM from vectorizing the copy (the same cause as in the optimizers'
    updates, see :mod:`smallchains.optim`). Measured on the Zen 4, one thread, 150 rows
    of 1,024 float32 per call: 91.7 -> 16.7 µs with ``X`` in the caches (600 rows),
    111.2 -> 44.4 µs from DRAM (50,000 rows)."""
    ok = True
    n4 = nb // 4 * 4
    for s in range(0, n4, 4):
        x0, x1 = X[idx[s0 + s]], X[idx[s0 + s + 1]]
        x2, x3 = X[idx[s0 + s + 2]], X[idx[s0 + s + 3]]
        o = off + s * ld
        w0, w1 = work[o:o + n_feat], work[o + ld:o + ld + n_feat]
        w2, w3 = work[o + 2 * ld:o + 2 * ld + n_feat], work[o + 3 * ld:o + 3 * ld + n_feat]
        for f in range(n_feat):
            a, b, c, d = x0[f], x1[f], x2[f], x3[f]
            w0[f] = a
            w1[f] = b
            w2[f] = c
            w3[f] = d
            ok &= np.isfinite(a) & np.isfinite(b) & np.isfinite(c) & np.isfinite(d)
    for s in range(n4, nb):
        x = X[idx[s0 + s]]
        o = off + s * ld
        w = work[o:o + n_feat]
        for f in range(n_feat):
            v = x[f]
            w[f] = v
            ok &= np.isfinite(v)
    for s in range(nb):  # the gaps after each row
        gap = work[off + s * ld + n_feat:off + (s + 1) * ld]
        for j in range(gap.shape[0]):
            gap[j] = 0
    pad = work[off + nb * ld:off + B * ld]
    for j in range(pad.shape[0]):
        pad[j] = 0
    work[off + B * ld] = nb
    return ok


@njit(**INLINE_OPTIONS)
def load_block_and_rows(X, idx, s0, nb, work, off, rows_off, ld, n_feat, B):
    """:func:`load_block_rows` at ``rows_off``, then the feature-major block of
    :func:`load_block` at ``off`` transposed from those rows (``B`` a multiple of 8; lanes
    ``nb..B-1`` zero as there): the input gathered from ``X`` once, not twice, for a
    training step whose first layer's weight gradient reads the rows. The transpose runs
    in 8 x 8 register blocks (:func:`~smallchains._simd.transpose8`). Measured on a Zen 5,
    one thread, the 50,000 CIFAR images (1,024 float32 features) in shuffled blocks of 32:
    29.0 ms per epoch for both gathers (:func:`load_block` then :func:`load_block_rows`),
    28.7 with this function's transpose as a scalar loop, 19.6 with ``transpose8``; the
    rows alone 14.2-14.7 (copying and transposing 8 rows at a time, while they are in L1,
    was no faster). Returns whether the rows are all finite (see :func:`load_block_rows`)."""
    ok = load_block_rows(X, idx, s0, nb, work, rows_off, ld, n_feat, B)
    f8 = n_feat // 8 * 8
    for s in range(0, B, 8):  # 8 rows of the (cached) sample-major block at a time
        r = rows_off + s * ld
        for f in range(0, f8, 8):
            transpose8(work, r + f, ld, off + f * B + s, B)
        for f in range(f8, n_feat):
            for k in range(8):
                work[off + f * B + s + k] = work[r + k * ld + f]
    return ok


@njit(**INLINE_OPTIONS)
def load_rows_major(X, s0, nb, work, off, ld, n_feat, B):
    """Like :func:`load_block_rows` for the contiguous rows ``s0:s0+nb`` of ``X``."""
    for s in range(nb):
        o = off + s * ld
        for f in range(n_feat):
            work[o + f] = X[s0 + s, f]
        for f in range(n_feat, ld):
            work[o + f] = 0
    for j in range(off + nb * ld, off + B * ld):
        work[j] = 0
    work[off + B * ld] = nb


@njit(**INLINE_OPTIONS)
def set_lane_rows(meta, idx, s0, nb, B):
    """``meta[3 + s] = idx[s0 + s]`` for the ``nb`` lanes of a block, -1 for padding lanes:
    the dataset row of every lane, which random layers key their numbers on (and batch
    statistics use to skip padding lanes)."""
    for s in range(nb):
        meta[3 + s] = idx[s0 + s]
    for s in range(nb, B):
        meta[3 + s] = -1


@njit(**INLINE_OPTIONS)
def store_block(Y, idx, s0, nb, work, off, n_feat, B):
    """Copy a feature-major block back to rows ``idx[s0:s0+nb]`` of ``Y (N, n_feat)``."""
    for s in range(nb):
        r = idx[s0 + s]
        for f in range(n_feat):
            Y[r, f] = work[off + f * B + s]


@njit(**INLINE_OPTIONS)
def load_rows(X, s0, nb, work, off, n_feat, B):
    """Like :func:`load_block` for the contiguous rows ``s0:s0+nb`` of ``X (N, n_feat)``."""
    for s in range(nb):
        for f in range(n_feat):
            work[off + f * B + s] = X[s0 + s, f]
    if nb < B:
        for f in range(n_feat):
            for s in range(nb, B):
                work[off + f * B + s] = 0


@njit(**INLINE_OPTIONS)
def store_rows(Y, s0, nb, work, off, n_feat, B):
    """Copy a feature-major block back to the contiguous rows ``s0:s0+nb`` of ``Y``."""
    for s in range(nb):
        for f in range(n_feat):
            Y[s0 + s, f] = work[off + f * B + s]


@njit(**JIT_OPTIONS)
def sum_rows(G, g):
    """``g[:] = G[0] + G[1] + ...`` in fixed row order (deterministic)."""
    n = g.shape[0]
    for j in range(n):
        g[j] = G[0, j]
    for t in range(1, G.shape[0]):
        for j in range(n):
            g[j] += G[t, j]


@njit(**INLINE_OPTIONS)
def check_contiguous(p, pbar, work):
    """Raise ValueError unless ``p``, ``pbar`` and ``work`` are C-contiguous: the layer
    steps read them through raw pointers (a strided view would be read as if dense)."""
    if not (p.flags.c_contiguous and pbar.flags.c_contiguous and work.flags.c_contiguous):
        raise ValueError("chain kernels need C-contiguous p, pbar and work arrays")
