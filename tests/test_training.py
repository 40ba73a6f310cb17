"""Training: threaded gradients, determinism, optimizers vs torch, train_unbatched vs a
torch loop, train_batched (partial batches, shuffling, equivalence to unbatched)."""

from __future__ import annotations

import _thread
import signal
import threading

import numba
import numpy as np
import pytest

import smallchains as sc
import smallchains.train as sctrain
from smallchains.compiler import loops
from conftest import (assert_close, get_chain, make_data, make_model, random_params, torch_flat,
                      torch_loss, torch_model)

ARCH = "deep"  # 3 -> 13 tanh -> 1 softplus -> 37 gelu -> 4, SquaredLoss


def _setup(n=50, seed=0, dtype=np.float64):
    X, _ = make_data(ARCH, n, seed=seed)
    # learnable targets (4 outputs from 3 inputs)
    Y = np.stack([np.sin(X[:, 0]), X[:, 1] * X[:, 2], np.tanh(X[:, 0] + X[:, 1]), 0.5 * X[:, 2]], axis=1)
    model = make_model(ARCH, Y)
    p = random_params(model.chain, seed=seed, dtype=dtype)
    return model, X.astype(dtype), Y, p


# --------------------------------------------------------------------------------------
# threads

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_threaded_training_matches_single_thread_and_is_deterministic(dtype):
    model, X, Y, p0 = _setup(n=50, dtype=dtype)
    runs = {}
    for rows in (1, 2, 3, 2):
        G = sc.alloc_threaded_grad(model.chain, n_threads=rows, dtype=dtype)
        assert G.shape == (rows, model.chain.n_params) and G.dtype == dtype
        p = p0.copy()
        hist = sc.train_unbatched(G, p, model, X, sc.SGD(0.05, momentum=0.5), 5)
        assert np.all(G[-1] != 0)  # the last row (thread) did contribute
        if rows in runs:  # same thread count: bitwise identical
            np.testing.assert_array_equal(p, runs[rows][0])
            np.testing.assert_array_equal(hist, runs[rows][1])
        runs[rows] = (p, hist)
    assert not np.array_equal(runs[1][0], p0)
    for rows in (2, 3):
        assert_close(runs[rows][0], runs[1][0], dtype)
        assert_close(runs[rows][1], runs[1][1], dtype)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_valgrad_same_with_one_or_two_threads():
    model, X, Y, p = _setup(n=601)  # several blocks, so two threads are used
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        l1, g1, gx1 = sc.valgrad_with_input(model, X, p)
        f1 = model.chain(X, p)
        m1 = model(X, p)
        numba.set_num_threads(2)
        l2, g2, gx2 = sc.valgrad_with_input(model, X, p)
        f2 = model.chain(X, p)
        m2 = model(X, p)
        l3, g3, gx3 = sc.valgrad_with_input(model, X, p)
    finally:
        numba.set_num_threads(old)
    assert_close(l2, l1, np.float64)
    assert_close(m2, m1, np.float64)
    assert_close(m1, l1, np.float64)
    assert_close(g2, g1, np.float64)
    assert_close(gx2, gx1, np.float64)
    np.testing.assert_array_equal(f2, f1)  # forward is per sample: no reduction
    np.testing.assert_array_equal(g3, g2)  # deterministic
    assert l3 == l2


# --------------------------------------------------------------------------------------
# optimizers step for step against torch

OPTS = [
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6)),
    ("rmsprop", dict(lr=1e-2)),
    ("rmsprop", dict(lr=1e-3, alpha=0.9, eps=1e-6)),
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.05, momentum=0.9)),
]


def _make_opts(torch, kind, kw, param):
    if kind == "adam":
        return sc.Adam(**kw), torch.optim.Adam([param], **kw)
    if kind == "rmsprop":
        return sc.RMSProp(**kw), torch.optim.RMSprop([param], **kw)
    return sc.SGD(**kw), torch.optim.SGD([param], **kw)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind,kw", OPTS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(OPTS)])
def test_optimizer_matches_torch(torch, kind, kw, dtype):
    rng = np.random.default_rng(1)
    n = 37
    p = rng.standard_normal(n).astype(dtype)
    p0 = p.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt, topt = _make_opts(torch, kind, kw, tp)
    for step in range(20):
        g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(dtype)
        g[step % n] = 0  # some exact zeros
        opt.step(p, g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        assert p.dtype == dtype
        assert_close(p, tp.detach().numpy(), dtype, err_msg=f"step {step}")
    assert opt.t == 20
    assert np.abs(p - p0).max() > 1e-3  # the steps did move p
    opt.reset()
    assert opt.t == 0 and opt.state is None


def test_train_unbatched_adam_matches_torch_loop(torch):
    model, X, Y, p0 = _setup(n=50, seed=4)
    p = p0.copy()
    G = sc.alloc_threaded_grad(model.chain, dtype=np.float64)
    opt = sc.Adam(1e-2)
    hist = sc.train_unbatched(G, p, model, X, opt, 50)
    assert opt.t == 50

    net, linears = torch_model(torch, model.chain, p0)
    topt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt = torch.from_numpy(X)
    thist = []
    for _ in range(50):
        topt.zero_grad()
        loss = torch_loss(torch, "squared", net(xt), Y)
        loss.backward()
        thist.append(loss.item())
        topt.step()
    assert_close(hist, thist, np.float64, rtol=1e-8, atol=1e-10)
    assert_close(p, torch_flat(linears), np.float64, rtol=1e-8, atol=1e-10)
    assert hist[-1] < 0.8 * hist[0]


# --------------------------------------------------------------------------------------
# loss history, chunked loops

def test_history_length_and_first_value():
    model, X, Y, p0 = _setup(n=30)
    G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)
    p = p0.copy()
    hist = sc.train_unbatched(G, p, model, X, sc.Adam(1e-2), 7)
    assert hist.shape == (7,) and hist.dtype == np.float64
    assert_close(hist[0], model(X, p0), np.float64)
    assert np.all(np.isfinite(hist)) and hist[-1] < hist[0]
    # the history is the loss BEFORE each step: continue one step and compare
    hist2 = sc.train_unbatched(G, p.copy(), model, X, sc.SGD(1e-3), 1)
    assert_close(hist2[0], model(X, p), np.float64)
    # zero iterations: nothing happens
    p_before = p.copy()
    opt = sc.Adam()
    assert sc.train_unbatched(G, p, model, X, opt, 0).shape == (0,)
    np.testing.assert_array_equal(p, p_before)
    assert opt.t == 0
    eh = sc.train_batched(G, p, model, X, sc.Adam(1e-2), 4, batch_size=7, seed=0)
    assert eh.shape == (4,) and np.all(np.isfinite(eh))


def test_callback_chunks_and_continuation_equal_one_run():
    model, X, Y, p0 = _setup(n=40, seed=2)
    G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)
    p_ref = p0.copy()
    h_ref = sc.train_unbatched(G, p_ref, model, X, sc.Adam(1e-2), 30)

    calls = []
    p = p0.copy()
    opt = sc.Adam(1e-2)
    h = sc.train_unbatched(G, p, model, X, opt, 30, report_every=10,
                           callback=lambda step, loss, q: calls.append((step, loss, q.copy())))
    np.testing.assert_array_equal(p, p_ref)
    np.testing.assert_array_equal(h, h_ref)
    assert [c[0] for c in calls] == [10, 20, 30]
    assert [c[1] for c in calls] == [h_ref[9], h_ref[19], h_ref[29]]
    np.testing.assert_array_equal(calls[-1][2], p_ref)

    # two calls of 15 with one optimizer == one call of 30 (state and step count carry on)
    p = p0.copy()
    opt = sc.Adam(1e-2)
    h1 = sc.train_unbatched(G, p, model, X, opt, 15)
    h2 = sc.train_unbatched(G, p, model, X, opt, 15)
    assert opt.t == 30
    np.testing.assert_array_equal(np.concatenate([h1, h2]), h_ref)
    np.testing.assert_array_equal(p, p_ref)


# --------------------------------------------------------------------------------------
# chunks of compiled steps, Ctrl-C

def test_chunked_training_is_bitwise_one_call(monkeypatch):
    """The drivers call the compiled loop in chunks (sctrain.CHUNK_SECONDS): one step per
    call gives exactly what one call for the whole run (one per epoch) gives."""
    model, X, Y, p0 = _setup(n=40, seed=3)
    G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)
    calls = []
    real = loops.call

    def counting(loop, kernels, args):
        calls.append(loop)
        return real(loop, kernels, args)

    monkeypatch.setattr(loops, "call", counting)
    runs = {}
    for seconds in (None, 0.0):  # one call per run; one call per step
        monkeypatch.setattr(sctrain, "CHUNK_SECONDS", seconds)
        calls.clear()
        p, opt = p0.copy(), sc.Adam(1e-2)
        h = sc.train_unbatched(G, p, model, X, opt, 25)
        n_unbatched = calls.count(loops.train_unbatched_loop)
        q, opt_b = p0.copy(), sc.RMSProp(1e-3)
        hb = sc.train_batched(G, q, model, X, opt_b, 3, batch_size=7, seed=5)  # 6 batches
        runs[seconds] = dict(p=p, h=h, state=opt.state, t=opt.t, q=q, hb=hb, state_b=opt_b.state,
                             t_b=opt_b.t, calls=(n_unbatched, calls.count(loops.train_batched_loop)))
    one, many = runs[None], runs[0.0]
    assert one["calls"] == (1, 3) and many["calls"] == (25, 18)
    assert one["t"] == 25 and one["t_b"] == 18
    for key in ("p", "h", "state", "t", "q", "hb", "state_b", "t_b"):
        np.testing.assert_array_equal(many[key], one[key], err_msg=key)
    assert not np.array_equal(one["p"], p0)


def _interrupt_during(fn, delay=1.0):
    """Run ``fn()`` while a timer thread raises KeyboardInterrupt in this (the main) thread
    after ``delay`` seconds; returns the KeyboardInterrupt (None if ``fn`` returned)."""
    # Python's own Ctrl-C handler for the duration, whatever this process inherited:
    # interrupt_main does nothing while SIGINT is ignored, as in a pytest started as a
    # background job of a non-interactive shell (SIG_IGN in /proc/<pid>/status; both
    # tests failed that way in a local CI run)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(delay, _thread.interrupt_main)
    timer.start()
    try:
        fn()
    except KeyboardInterrupt as e:
        return e
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    return None


def test_keyboard_interrupt_stops_train_unbatched_after_a_completed_step():
    model, X, Y, p0 = _setup(n=50, seed=5)
    G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)
    sc.train_unbatched(G, p0.copy(), model, X, sc.Adam(1e-3), 2)  # compiled before the timer
    iters = 10 ** 6  # many seconds: the interrupt comes long before the end
    p, opt = p0.copy(), sc.Adam(1e-3)
    err = _interrupt_during(lambda: sc.train_unbatched(G, p, model, X, opt, iters))
    assert err is not None
    k = opt.t
    assert 0 < k < iters
    assert err.history.shape == (k,)
    # p and the optimizer state are exactly those after k steps from the same start
    q, ref = p0.copy(), sc.Adam(1e-3)
    h = sc.train_unbatched(G, q, model, X, ref, k)
    np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(opt.state, ref.state)
    np.testing.assert_array_equal(err.history, h)
    # training goes on from there
    sc.train_unbatched(G, p, model, X, opt, 3)
    sc.train_unbatched(G, q, model, X, ref, 3)
    np.testing.assert_array_equal(p, q)


def test_keyboard_interrupt_stops_train_batched_after_a_completed_step():
    """One full batch per epoch, no shuffling: the interrupt lands between two epochs."""
    model, X, Y, p0 = _setup(n=50, seed=6)
    G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)
    sc.train_batched(G, p0.copy(), model, X, sc.SGD(1e-3), 2, batch_size=50, shuffle=False)
    epochs = 10 ** 6
    p, opt = p0.copy(), sc.SGD(1e-3, momentum=0.9)
    err = _interrupt_during(lambda: sc.train_batched(G, p, model, X, opt, epochs, batch_size=50,
                                                     shuffle=False))
    assert err is not None
    k = opt.t
    assert 0 < k < epochs
    assert err.history.shape == (k,) and err.batch_losses.shape == (0,)
    q, ref = p0.copy(), sc.SGD(1e-3, momentum=0.9)
    h = sc.train_batched(G, q, model, X, ref, k, batch_size=50, shuffle=False)
    np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(opt.state, ref.state)
    np.testing.assert_array_equal(err.history, h)


# --------------------------------------------------------------------------------------
# train_batched

def test_train_batched_loss_decreases():
    model, X, Y, p = _setup(n=200, seed=6)
    G = sc.alloc_threaded_grad(model.chain, dtype=np.float64)
    start = model(X, p)
    hist = sc.train_batched(G, p, model, X, sc.Adam(1e-2), 60, batch_size=32, seed=0)
    assert hist.shape == (60,)
    assert hist[-5:].mean() < 0.75 * hist[:5].mean()
    assert model(X, p) < 0.75 * start


def test_train_batched_uses_partial_last_batch():
    """N=10, batch 4 -> batches of 4, 4, 2, each one SGD step with its own mean loss."""
    model, X, Y, p0 = _setup(n=10, seed=8)
    G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)
    epochs = 3
    p = p0.copy()
    opt = sc.SGD(0.05, momentum=0.9)
    hist = sc.train_batched(G, p, model, X, opt, epochs, batch_size=4, shuffle=False)
    assert opt.t == 3 * epochs
    assert hist.shape == (epochs,)

    q = p0.copy()
    ref_opt = sc.SGD(0.05, momentum=0.9)
    ref_hist = []
    for _ in range(epochs):
        losses = []
        for lo, hi in ((0, 4), (4, 8), (8, 10)):
            sub = make_model(ARCH, Y[lo:hi])
            loss, g = sc.valgrad(sub, X[lo:hi], q)
            losses.append(loss)
            ref_opt.step(q, g)
        ref_hist.append(np.mean(losses))
    assert_close(p, q, np.float64)
    assert_close(hist, ref_hist, np.float64)
    # dropping the last batch would give a different result
    r = p0.copy()
    sc.train_batched(G, r, make_model(ARCH, Y[:8]), X[:8], sc.SGD(0.05, momentum=0.9), epochs,
                     batch_size=4, shuffle=False)
    assert not np.allclose(r, p, rtol=1e-6, atol=1e-9)


def test_train_batched_shuffle_seed_reproducible():
    model, X, Y, p0 = _setup(n=30, seed=9)
    G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)

    def run(**kw):
        p = p0.copy()
        h = sc.train_batched(G, p, model, X, sc.Adam(1e-2), 3, batch_size=8, **kw)
        return p, h

    a, ha = run(seed=123)
    b, hb = run(seed=123)
    c, _ = run(seed=124)
    d, _ = run(shuffle=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ha, hb)
    assert not np.allclose(a, c, rtol=1e-6, atol=1e-9)
    assert not np.allclose(a, d, rtol=1e-6, atol=1e-9)


def test_train_batched_shuffle_is_a_permutation():
    """With batch_size=N, shuffling only reorders the sum: same result as unshuffled."""
    model, X, Y, p0 = _setup(n=30, seed=10)
    G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)
    p1, p2 = p0.copy(), p0.copy()
    h1 = sc.train_batched(G, p1, model, X, sc.SGD(0.05), 4, batch_size=30, shuffle=True, seed=1)
    h2 = sc.train_batched(G, p2, model, X, sc.SGD(0.05), 4, batch_size=30, shuffle=False)
    assert_close(p1, p2, np.float64)
    assert_close(h1, h2, np.float64)


@pytest.mark.parametrize("kind", ["adam", "sgd", "rmsprop"])
def test_train_batched_full_batch_equals_unbatched(kind):
    model, X, Y, p0 = _setup(n=40, seed=11)
    G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)
    make = {"adam": lambda: sc.Adam(1e-2), "sgd": lambda: sc.SGD(0.05, momentum=0.5),
            "rmsprop": lambda: sc.RMSProp(1e-3)}[kind]
    p1, p2 = p0.copy(), p0.copy()
    o1, o2 = make(), make()
    h1 = sc.train_batched(G, p1, model, X, o1, 12, batch_size=40, shuffle=False)
    h2 = sc.train_unbatched(G, p2, model, X, o2, 12)
    assert o1.t == o2.t == 12
    assert_close(p1, p2, np.float64)
    assert_close(h1, h2, np.float64)
    assert not np.array_equal(p1, p0)


def test_accuracy_and_loss_matches_numpy():
    X, labels = make_data("clf", 97, seed=3)
    model = make_model("clf", labels)
    p = random_params(model.chain, seed=4)
    logits = model.chain(X, p)
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    want_loss = float(np.mean(lse - logits[np.arange(97), labels]))
    want_acc = float(np.mean(logits.argmax(axis=1) == labels))
    acc, loss = sc.accuracy_and_loss(model, X, p)
    assert acc == want_acc
    assert_close(loss, want_loss, np.float64)
    # explicit labels (other than the model's own) take precedence
    other = (labels + 1) % model.chain.output_shape[0]
    acc2, _ = sc.accuracy_and_loss(model, X, other, p)
    assert acc2 == float(np.mean(logits.argmax(axis=1) == other))
    with pytest.raises(TypeError, match="accuracy_and_loss"):
        sc.accuracy_and_loss(model, X)
    reg = make_model("deep", np.zeros((3,) + get_chain("deep").output_shape))
    with pytest.raises(TypeError, match="classification"):
        sc.accuracy_and_loss(reg, np.zeros((3,) + get_chain("deep").input_shape), random_params(reg.chain))


@pytest.mark.parametrize("offset", [0, 1])
def test_unaligned_gradient_rows_train_like_aligned_ones(offset):
    """train_batched and train_unbatched accumulate into 64-byte aligned per-thread rows:
    G itself when its rows are aligned, else rows of their own, copied into G at the end.
    Both give the same bits (p, losses, G), on 2 threads, with the split gradient sum
    (n_params >= 16,384) and without (train_unbatched on one thread's rows)."""
    chain = sc.SimpleChain(200, sc.TurboDense(96, "tanh"), sc.TurboDense(16))  # 20,912 params
    assert chain.n_params % 16 == 0 and chain.n_params >= 16384
    rng = np.random.default_rng(3)
    X = rng.standard_normal((250, 200)).astype(np.float32)
    y = rng.integers(0, 16, 250)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        results = []
        for G in (sc.alloc_threaded_grad(chain, n_threads=2),
                  np.full(2 * chain.n_params + offset + 16, np.nan, np.float32)):
            if G.ndim == 1:  # a view starting (1 + offset) * 4 bytes past a line
                base = (-G.ctypes.data // 4) % 16 + 1 + offset
                G = G[base:base + 2 * chain.n_params].reshape(2, chain.n_params)
                assert G.ctypes.data % 64 != 0 and sctrain._aligned_grad_rows(G) is not G
            else:
                assert sctrain._aligned_grad_rows(G) is G
            p = sc.init_params(chain, seed=1)
            h1 = sc.train_batched(G, p, model, X, sc.Adam(1e-2), 2, batch_size=64, seed=5)
            G1 = G.copy()
            h2 = sc.train_unbatched(G[:1], p, model, X, sc.Adam(1e-2), 3)
            results.append((p, h1, h2, G1, G.copy()))
        assert np.all(np.isfinite(results[1][4][0]))  # the caller's G got the rows
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("registers", [16, 32])
def test_train_block_rule(registers):
    """_train_block: small shares get blocks of the share rounded up to 16; chains whose
    first layer takes dW from the input rows get the fewest blocks of at most
    WIDE_TRAIN_BLOCK_MAX holding each thread's share; others, and chains given a
    block_size, keep their own block (None)."""
    wide = sc.SimpleChain(1024, sc.TurboDense(64, "sigmoid"), sc.TurboDense(10), registers=registers)
    default = wide._kernels(np.float32)[1].B
    assert wide._train_block(300, 2, np.float32) == 160
    assert wide._train_block(300, 1, np.float32) == 304
    assert wide._train_block(1024, 2, np.float32) == 256  # 512 rows: two blocks of 256
    assert wide._train_block(2000, 1, np.float32) == 288  # 7 blocks of 2000 / 7 -> 288
    assert wide._train_block(10, 1, np.float32) == (16 if 32 <= default else None)
    assert wide._train_block(default, 1, np.float32) is None  # the default block itself
    narrow = sc.SimpleChain(64, sc.TurboDense(64, "tanh"), sc.TurboDense(10), registers=registers)
    assert narrow._train_block(300, 2, np.float32) is None
    given = sc.SimpleChain(1024, sc.TurboDense(64), sc.TurboDense(10), block_size=32)
    assert given._train_block(300, 2, np.float32) is None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("registers", [16, 32])
def test_wide_training_blocks_train_like_the_default_block(threads, registers):
    """A wide first layer trains at the larger blocks of _train_block (here a partial
    160-sample block per thread, or one of 304) to the same parameters and losses, to
    float64 rounding, as at an explicit 16-sample block, and both match the reference
    kernels."""
    layers = lambda: (sc.TurboDense(24, "sigmoid"), sc.TurboDense(5))  # noqa: E731
    rng = np.random.default_rng(11)
    X = rng.random((600, 512))
    y = rng.integers(0, 5, 600)
    chains = [sc.SimpleChain(512, *layers(), registers=registers),
              sc.SimpleChain(512, *layers(), registers=registers, block_size=16),
              sc.SimpleChain(512, *layers(), kernels="reference")]
    assert chains[0]._train_block(300, threads, np.float64) == (160 if threads == 2 else 304)
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        out = []
        for chain in chains:
            model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
            p = sc.init_params(chain, seed=2, dtype=np.float64)
            G = sc.alloc_threaded_grad(chain, n_threads=threads, dtype=np.float64)
            h = sc.train_batched(G, p, model, X, sc.Adam(1e-2), 2, batch_size=300, seed=4)
            out.append((p, h))
    finally:
        numba.set_num_threads(before)
    for p, h in out[1:]:
        np.testing.assert_allclose(out[0][0], p, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out[0][1], h, rtol=1e-10)
