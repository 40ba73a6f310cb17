"""Dropout and its generator: Philox4x32-10 known answers, masks that depend only on
(seed, step, row, layer, unit), gradients against torch fed the same mask and against
finite differences, inference as the identity, and the tuned mask kernel against its
reference for every remainder of units per generator call."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import smallchains as sc
from smallchains.compiler import get_kernels
from smallchains.layers.dropout import dropout_apply, dropout_apply_reference
from smallchains.philox import dropout_keep, keep_threshold, philox4x32

from conftest import assert_close, central_fd

DTYPES = [np.float32, np.float64]


# Random123's kat_vectors (Salmon et al. 2011): counter (4 words), key (2 words) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert philox4x32(counter, key).tolist() == list(expected)


def test_keep_fraction_and_threshold():
    assert keep_threshold(0.0) == 2 ** 32 and keep_threshold(0.5) == 2 ** 31
    m = dropout_keep(7, 1, np.arange(2000), 0, 100, 0.3)  # 200,000 draws
    sigma = np.sqrt(0.3 * 0.7 / m.size)
    assert abs(m.mean() - 0.7) < 5 * sigma
    # neighbouring counters are not correlated: rows, steps, layers and seeds all change it
    for other in (dropout_keep(7, 2, np.arange(2000), 0, 100, 0.3),
                  dropout_keep(7, 1, np.arange(1, 2001), 0, 100, 0.3),
                  dropout_keep(7, 1, np.arange(2000), 1, 100, 0.3),
                  dropout_keep(8, 1, np.arange(2000), 0, 100, 0.3)):
        agree = np.mean(m == other)
        assert abs(agree - (0.7 ** 2 + 0.3 ** 2)) < 5 * np.sqrt(0.58 * 0.42 / m.size)


# --- the tuned mask kernel against its reference, every remainder of 4 units -------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compiled", [False, True])
def test_mask_kernel_matches_reference_every_remainder(dtype, compiled):
    """``dropout_apply`` draws four units per generator call; sweep n_feat over every
    remainder mod 4 (and lane counts with and without a vector remainder) against the
    one-call-per-unit reference, interpreted and compiled. Register budgets do not enter
    this kernel (it has no tiles)."""
    fast = dropout_apply if compiled else dropout_apply.py_func
    ref = dropout_apply_reference if compiled else dropout_apply_reference.py_func
    rng = np.random.default_rng(0)
    rate = 0.4
    thr, scale = np.uint64(keep_threshold(rate)), np.dtype(dtype).type(1 / (1 - rate))
    for n_feat in range(1, 10):
        for B in (1, 3, 8, 17):
            meta = np.concatenate([[2 ** 40 + 5, 9, 0], rng.integers(0, 10 ** 6, B)]).astype(np.int64)
            meta[3] = -1  # a padding lane
            work = rng.standard_normal(2 * n_feat * B + 3).astype(dtype)
            a, b = work.copy(), work.copy()
            fast(a, 1, 1 + n_feat * B, n_feat, B, meta, 3, thr, scale)
            ref(b, 1, 1 + n_feat * B, n_feat, B, meta, 3, thr, scale)
            np.testing.assert_array_equal(a, b, err_msg=f"n_feat={n_feat} B={B}")
            # and both agree with the Python mask of the rows
            keep = dropout_keep(meta[0], meta[1], meta[3:], 3, n_feat, rate)  # (B, n_feat)
            x = work[1:1 + n_feat * B].reshape(n_feat, B)
            np.testing.assert_array_equal(a[1 + n_feat * B:1 + 2 * n_feat * B].reshape(n_feat, B),
                                          np.where(keep.T, x * scale, x * 0))


# --- masks are a function of (seed, step, row, layer, unit) only -------------------------

def _chain(rate=0.5, kernels="tuned"):
    return sc.SimpleChain(10, sc.TurboDense(9, "tanh"), sc.Dropout(rate), sc.TurboDense(3),
                          kernels=kernels)


def _numpy_forward(chain, X, p, seed, step, rows=None):
    V = chain.param_views(p)
    rows = np.arange(X.shape[0]) if rows is None else rows
    h = np.tanh(X @ V[0]["W"].T + V[0]["b"])
    keep = dropout_keep(seed, step, rows, 1, h.shape[1], chain.layers[1].rate)
    return (h * keep / (1 - chain.layers[1].rate)) @ V[2]["W"].T + V[2]["b"], keep


def test_training_forward_matches_mask_for_threads_and_block_splits():
    chain = _chain()
    rng = np.random.default_rng(1)
    X = rng.standard_normal((83, 10))
    p = sc.init_params(chain, seed=0, dtype=np.float64)
    expected, keep = _numpy_forward(chain, X, p, 11, 4)
    assert 0.3 < keep.mean() < 0.7
    before = numba.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            numba.set_num_threads(nt)
            outs.append(chain(X, p, training=True, seed=11, step=4))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert_close(outs[0], expected, np.float64)
    # two block sizes, and the rows split into other ranges: the same row, the same mask
    idx = np.random.default_rng(2).permutation(83)
    for B in (16, 32):
        mod, plan = get_kernels(chain.input_shape, chain.layers, np.float64, B=B)
        work, state = np.zeros(plan.work_size), np.zeros(1)
        meta = np.zeros(plan.meta_size, np.int64)
        meta[:2] = 11, 4
        Y = np.zeros((83, 3))
        for lo, hi in ((0, 7), (7, 50), (50, 83)):
            mod.forward_range_train(X, idx, lo, hi, p, state, work, meta, Y)
        np.testing.assert_array_equal(Y, outs[0], err_msg=f"B={B}")


def test_other_seed_or_step_gives_another_mask_and_inference_is_the_identity():
    chain = _chain()
    plain = sc.SimpleChain(10, sc.TurboDense(9, "tanh"), sc.TurboDense(3))
    X = np.random.default_rng(3).standard_normal((40, 10)).astype(np.float32)
    p = sc.init_params(chain, seed=1)
    a = chain(X, p, training=True, seed=1, step=1)
    assert not np.array_equal(a, chain(X, p, training=True, seed=2, step=1))
    assert not np.array_equal(a, chain(X, p, training=True, seed=1, step=2))
    np.testing.assert_array_equal(a, chain(X, p, training=True, seed=1, step=1))
    np.testing.assert_array_equal(chain(X, p), plain(X, p))  # inference: no dropout
    model = sc.add_loss(chain, sc.SquaredLoss(np.zeros((40, 3), np.float32)))
    plain_model = sc.add_loss(plain, sc.SquaredLoss(np.zeros((40, 3), np.float32)))
    np.testing.assert_array_equal(sc.valgrad(model, X, p, training=False)[1],
                                  sc.valgrad(plain_model, X, p)[1])
    assert model(X, p) == plain_model(X, p)
    # the embedding kernels are inference kernels
    k = chain.kernels(np.float32)
    Y = np.empty((40, 3), np.float32)
    k.forward_batch(X, p, Y, k.alloc_work())
    np.testing.assert_array_equal(Y, plain(X, p))


def test_rate_zero_and_rate_near_one():
    X = np.random.default_rng(4).standard_normal((30, 10))
    chain0 = _chain(0.0)
    p = sc.init_params(chain0, seed=2, dtype=np.float64)
    np.testing.assert_array_equal(chain0(X, p, training=True, seed=5), chain0(X, p))
    chain1 = _chain(0.999)
    out = chain1(X, p, training=True, seed=5, step=3)
    expected, keep = _numpy_forward(chain1, X, p, 5, 3)
    assert keep.mean() < 0.01
    assert_close(out, expected, np.float64)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 1.5])
def test_bad_rate_raises(bad):
    with pytest.raises(ValueError, match="Dropout: rate"):
        sc.Dropout(bad)


def test_bad_mode_and_seed_raise():
    chain = _chain()
    X = np.zeros((3, 10), np.float32)
    p = sc.init_params(chain)
    with pytest.raises(TypeError, match="training must be True or False"):
        chain(X, p, training="yes")
    with pytest.raises(TypeError, match="seed must be an int"):
        chain(X, p, training=True, seed=1.5)
    with pytest.raises(ValueError, match="step must be >= 0"):
        chain(X, p, training=True, step=-1)


# --- gradients -------------------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["tuned", "reference"])
def test_gradient_against_finite_differences_with_fixed_mask(kernels):
    chain = _chain(0.3, kernels)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((21, 10))
    T = rng.standard_normal((21, 3))
    model = sc.add_loss(chain, sc.SquaredLoss(T))
    p = sc.init_params(chain, seed=3, dtype=np.float64)
    loss, g, gx = sc.valgrad_with_input(model, X, p, seed=9, step=2)
    assert_close(g, central_fd(lambda q: model(X, q, training=True, seed=9, step=2), p),
                 np.float64, rtol=1e-6, atol=1e-8)
    assert_close(gx, central_fd(lambda x: model(x, p, training=True, seed=9, step=2), X),
                 np.float64, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [False, True])
def test_gradients_against_torch_fed_the_same_mask(torch, dtype, first):
    """Dropout inside the chain, and as the first layer (no dL/dx of it in training)."""
    rng = np.random.default_rng(6)
    n = 37
    if first:
        chain = sc.SimpleChain(10, sc.Dropout(0.25), sc.TurboDense(9, "tanh"), sc.TurboDense(3))
    else:
        chain = _chain(0.25)
    X = rng.standard_normal((n, 10)).astype(dtype)
    labels = rng.integers(0, 3, n)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(labels))
    p = sc.init_params(chain, seed=4, dtype=dtype)
    loss, g = sc.valgrad(model, X, p, seed=123, step=7)
    loss_x, _, gx = sc.valgrad_with_input(model, X, p, seed=123, step=7)
    dense = [v for v in chain.param_views(p) if v]
    li = 0 if first else 1  # the Dropout layer's index in the chain
    keep = dropout_keep(123, 7, np.arange(n), li, 10 if first else 9, 0.25)
    tt = torch.float64
    W1 = torch.tensor(np.asarray(dense[0]["W"], np.float64), dtype=tt, requires_grad=True)
    b1 = torch.tensor(np.asarray(dense[0]["b"], np.float64), dtype=tt, requires_grad=True)
    W2 = torch.tensor(np.asarray(dense[1]["W"], np.float64), dtype=tt, requires_grad=True)
    b2 = torch.tensor(np.asarray(dense[1]["b"], np.float64), dtype=tt, requires_grad=True)
    x = torch.tensor(X.astype(np.float64), requires_grad=True)
    mask = torch.tensor(keep, dtype=tt) / 0.75
    if first:
        h = torch.tanh((x * mask) @ W1.T + b1)
    else:
        h = torch.tanh(x @ W1.T + b1) * mask
    out = h @ W2.T + b2
    tl = torch.nn.functional.cross_entropy(out, torch.tensor(labels))
    tl.backward()
    tg = np.concatenate([t.grad.numpy().ravel() for t in (W1, b1, W2, b2)])
    assert_close(np.float64(loss), tl.item(), dtype)
    assert loss_x == loss
    assert_close(g, tg, dtype)
    assert_close(gx, x.grad.numpy(), dtype)


def test_train_batched_reproducible_and_thread_independent_masks():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((200, 10)).astype(np.float64)
    labels = rng.integers(0, 3, 200)
    chain = _chain(0.5)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(labels))
    results = []
    for nt in (1, 1, 2):
        p = sc.init_params(chain, seed=5, dtype=np.float64)
        G = sc.alloc_threaded_grad(chain, n_threads=nt, dtype=np.float64)
        sc.train_batched(G, p, model, X, sc.SGD(0.1), 2, batch_size=50, seed=3)
        results.append(p)
    np.testing.assert_array_equal(results[0], results[1])  # same seed: same run
    # other thread count: same masks, the gradient sums only rounded in another order
    assert_close(results[2], results[0], np.float64, rtol=1e-9, atol=1e-12)
    p = sc.init_params(chain, seed=5, dtype=np.float64)
    G = sc.alloc_threaded_grad(chain, n_threads=1, dtype=np.float64)
    sc.train_batched(G, p, model, X, sc.SGD(0.1), 2, batch_size=50, seed=4)
    assert not np.allclose(p, results[0])  # another seed: other masks (and order)
    # the first step's gradient is valgrad's at step 1 on the first minibatch
    opt = sc.SGD(0.1)
    p0 = sc.init_params(chain, seed=5, dtype=np.float64)
    p1 = p0.copy()
    sc.train_batched(G, p1, model, X, opt, 1, batch_size=200, shuffle=False, seed=3)
    _, g = sc.valgrad(model, X, p0, seed=3, step=1)
    assert_close(p1, p0 - 0.1 * g, np.float64)
