"""The logit cross-entropy block kernel (smallchains.losses.logit_crossentropy_block, the
loss of every classification chain) against a float64 numpy log-softmax, lane by lane:
every filled-lane count of a block (all remainders of the vector widths LLVM gives its
sample loops: 8 or 16 float32, 4 or 8 float64 lanes; the kernel has no register-tile
variants), float32 and float64, 1 to 17 classes, with and without the gradient; padding
lanes zeroed; huge and NaN logits."""

from __future__ import annotations

import numpy as np
import pytest

from smallchains.losses import logit_crossentropy_block

B = 48  # three 16-lane vectors: every remainder of 4, 8 and 16 lanes, and whole vectors


def _reference(yb, labels, scale):
    """float64 loss sum and gradient ``scale (softmax - onehot)`` of logits ``yb (n_out, nb)``."""
    y = yb.astype(np.float64)
    m = y.max(axis=0)
    lse = m + np.log(np.exp(y - m).sum(axis=0))
    cols = np.arange(y.shape[1])
    total = float((lse - y[labels, cols]).sum())
    grad = np.exp(y - lse)
    grad[labels, cols] -= 1.0
    return total, scale * grad


def _run(dtype, n_out, nb, need_grad, logits=None, seed=0):
    rng = np.random.default_rng(seed)
    N = 3 * B
    T = rng.integers(0, n_out, N).astype(np.int64)
    idx = rng.permutation(N).astype(np.int64)
    s0 = 5
    y_off, gy_off = 7, 7 + n_out * B + 3  # odd offsets: no alignment is assumed
    work = rng.standard_normal(gy_off + n_out * B + 5).astype(dtype)
    if logits is not None:
        work[y_off:y_off + n_out * B] = logits
    yb = work[y_off:y_off + n_out * B].reshape(n_out, B)[:, :nb].copy()
    before = work.copy()
    scale = dtype(1.0 / 300)
    total = logit_crossentropy_block(work, y_off, gy_off, T, idx, s0, n_out, B, nb, scale, need_grad)
    labels = T[idx[s0:s0 + nb]]
    ref_total, ref_grad = _reference(yb, labels, float(scale))
    # the logits and everything outside the gradient area are left alone
    np.testing.assert_array_equal(work[:gy_off], before[:gy_off])
    np.testing.assert_array_equal(work[gy_off + n_out * B:], before[gy_off + n_out * B:])
    return total, ref_total, work[gy_off:gy_off + n_out * B].reshape(n_out, B), ref_grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n_out", [1, 2, 3, 10, 17])
def test_logit_crossentropy_block_every_lane_count(dtype, n_out):
    rtol = 2e-6 if dtype == np.float32 else 1e-13
    for nb in range(1, B + 1):
        for need_grad in (True, False):
            total, ref_total, grad, ref_grad = _run(dtype, n_out, nb, need_grad, seed=nb)
            np.testing.assert_allclose(total, ref_total, rtol=rtol, atol=rtol * nb,
                                       err_msg=f"loss, nb={nb}")
            if need_grad:
                np.testing.assert_allclose(grad[:, :nb], ref_grad, rtol=rtol * 4,
                                           atol=rtol / 300, err_msg=f"gradient, nb={nb}")
                assert not grad[:, nb:].any(), f"padding lanes not zeroed, nb={nb}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_logit_crossentropy_block_huge_and_nan_logits(dtype):
    n_out, nb = 10, 37
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(n_out * B) * 1e4).astype(dtype)  # exp would overflow unshifted
    total, ref_total, grad, ref_grad = _run(dtype, n_out, nb, True, logits=logits)
    assert np.isfinite(total)
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    np.testing.assert_allclose(grad[:, :nb], ref_grad, atol=1e-7)
    logits[3 * B + 11] = np.nan  # class 3 of lane 11
    total, *_ = _run(dtype, n_out, nb, True, logits=logits)
    assert np.isnan(total)
