"""BatchNorm against torch BatchNorm1d / BatchNorm2d: training-mode forward (through the
loss), pullback and running statistics with whole-minibatch statistics whatever the
thread count; eval mode; float32 and float64; 1 and 2 threads; batch sizes 2, odd and
several blocks; batch size 1 raises in training as torch does; the layer state is not
touched by the optimizer and not by valgrad."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import smallchains as sc

from conftest import assert_close, central_fd, torch_chain_model, torch_flat

DTYPES = [np.float32, np.float64]


def dense_chain():
    return sc.SimpleChain(6, sc.TurboDense(5, "tanh"), sc.BatchNorm(), sc.TurboDense(4, "tanh"),
                          sc.BatchNorm(momentum=0.2, eps=1e-3), sc.TurboDense(3))


def conv_chain():
    return sc.SimpleChain((2, 7, 6), sc.Conv(3, 3, "relu"), sc.BatchNorm(), sc.MaxPool(2),
                          sc.Flatten(), sc.TurboDense(4), sc.BatchNorm(momentum=0.3),
                          sc.TurboDense(3))


def wide_chain():
    # a first layer of 530 inputs reads the input rows sample-major (dense dW "rows")
    return sc.SimpleChain(530, sc.TurboDense(5, "tanh"), sc.BatchNorm(), sc.TurboDense(3))


def random_state(chain, dtype, seed):
    """Running statistics away from their initial values; returns (state, the rng)."""
    state = sc.init_state(chain, dtype)
    rng = np.random.default_rng(seed)
    for v in chain.state_views(state):
        if v:
            v["running_mean"][:] = rng.standard_normal(v["running_mean"].shape)
            v["running_var"][:] = rng.uniform(0.3, 2.0, v["running_var"].shape)
    return state, rng


def random_affine(chain, p, rng):
    for layer, v in zip(chain.layers, chain.param_views(p)):
        if isinstance(layer, sc.BatchNorm):
            v["weight"][:] = rng.uniform(0.5, 1.5, v["weight"].shape)
            v["bias"][:] = rng.standard_normal(v["bias"].shape)


def setup(make, n, dtype, seed=0):
    chain = make()
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n,) + chain.input_shape) * 2 + 0.5).astype(dtype)
    T = rng.standard_normal((n, 3)).astype(dtype)
    p = sc.init_params(chain, seed=seed, dtype=dtype)
    random_affine(chain, p, rng)
    return chain, X, T, p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [dense_chain, conv_chain, wide_chain], ids=["dense", "conv", "wide"])
@pytest.mark.parametrize("n", [2, 37, 300])
@pytest.mark.parametrize("threads", [1, 2])
def test_training_gradient_and_running_stats_match_torch(torch, dtype, make, n, threads):
    chain, X, T, p = setup(make, n, dtype)
    model = sc.add_loss(chain, sc.SquaredLoss(T))
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        loss, g, gx = sc.valgrad_with_input(model, X, p)
        state = sc.init_state(chain, dtype)
        p1 = p.copy()
        G = sc.alloc_threaded_grad(chain, n_threads=threads, dtype=dtype)
        sc.train_batched(G, p1, model, X, sc.SGD(0.05), 1, batch_size=n, shuffle=False,
                         state=state)
    finally:
        numba.set_num_threads(before)
    net, pmods = torch_chain_model(torch, chain, p)
    x = torch.tensor(X.astype(np.float64), requires_grad=True)
    out = net(x)
    tl = ((out - torch.from_numpy(T.astype(np.float64))) ** 2).sum(1).mean()
    tl.backward()
    assert_close(np.float64(loss), tl.item(), dtype)
    g_t = torch_flat(pmods, grad=True)
    # BatchNorm of two values: the first layer's exact gradient is about 0, and float32
    # rounding of its 530-term products leaves about 1e-5 of the gradient's scale (the
    # reference kernels 2.4e-5): absolute tolerance there
    tol = dict(atol=2e-5 * np.abs(g_t).max()) if (make is wide_chain and n == 2
                                                   and dtype == np.float32) else {}
    assert_close(g, g_t, dtype, **tol)
    assert_close(gx, x.grad.numpy(), dtype, **tol)
    # one SGD step: p moved by the gradient, the running statistics as torch's after the
    # same forward (state never enters p or the optimizer)
    assert_close(p1, p - np.asarray(0.05, dtype) * g, dtype)
    bns = [m for m in pmods if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    views = [v for layer, v in zip(chain.layers, chain.state_views(state)) if v]
    for m, v in zip(bns, views):
        assert_close(v["running_mean"], m.running_mean.numpy(), dtype)
        assert_close(v["running_var"], m.running_var.numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [dense_chain, conv_chain], ids=["dense", "conv"])
@pytest.mark.parametrize("n", [2, 37, 300])
@pytest.mark.parametrize("threads", [1, 2])
def test_training_mode_forward_and_loss_match_torch(torch, dtype, make, n, threads):
    """chain(X, p, training=True) and model(X, p, training=True): whole-batch statistics
    (the forward stages), state read for nothing and left untouched."""
    chain, X, T, p = setup(make, n, dtype, seed=5)
    model = sc.add_loss(chain, sc.SquaredLoss(T))
    state = sc.init_state(chain, dtype)
    state[:] = np.random.default_rng(6).uniform(0.5, 2.0, state.shape)  # must not be read
    saved = state.copy()
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        Y = chain(X, p, state=state, training=True)
        loss = model(X, p, state=state, training=True)
        loss_vg, _ = sc.valgrad(model, X, p, state=state)
    finally:
        numba.set_num_threads(before)
    net, _ = torch_chain_model(torch, chain, p)
    out = net(torch.from_numpy(X.astype(np.float64)))  # train mode: batch statistics
    tl = ((out - torch.from_numpy(T.astype(np.float64))) ** 2).sum(1).mean()
    assert Y.dtype == dtype and Y.shape == (n, 3)
    assert_close(Y, out.detach().numpy(), dtype)
    assert_close(np.float64(loss), tl.item(), dtype)
    assert_close(np.float64(loss), np.float64(loss_vg), dtype)
    np.testing.assert_array_equal(state, saved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [dense_chain, conv_chain], ids=["dense", "conv"])
def test_eval_mode_forward_and_pullback_match_torch(torch, dtype, make):
    chain, X, T, p = setup(make, 29, dtype, seed=1)
    state, rng = random_state(chain, dtype, seed=2)
    saved = state.copy()
    model = sc.add_loss(chain, sc.SquaredLoss(T))
    Y = chain(X, p, state=state)
    loss, g, gx = sc.valgrad_with_input(model, X, p, state=state, training=False)
    net, pmods = torch_chain_model(torch, chain, p)
    bns = [m for m in pmods if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    for m, v in zip(bns, [v for v in chain.state_views(state) if v]):
        m.running_mean.copy_(torch.from_numpy(v["running_mean"].astype(np.float64)))
        m.running_var.copy_(torch.from_numpy(v["running_var"].astype(np.float64)))
    net.eval()
    x = torch.tensor(X.astype(np.float64), requires_grad=True)
    out = net(x)
    ((out - torch.from_numpy(T.astype(np.float64))) ** 2).sum(1).mean().backward()
    assert_close(Y, out.detach().numpy(), dtype)
    assert_close(g, torch_flat(pmods, grad=True), dtype)
    assert_close(gx, x.grad.numpy(), dtype)
    np.testing.assert_array_equal(state, saved)  # read, not written


def test_training_gradient_against_finite_differences():
    chain, X, T, p = setup(dense_chain, 23, np.float64, seed=3)
    model = sc.add_loss(chain, sc.SquaredLoss(T))
    _, g = sc.valgrad(model, X, p)
    assert_close(g, central_fd(lambda q: sc.valgrad(model, X, q)[0], p), np.float64,
                 rtol=1e-6, atol=1e-8)


def test_thread_counts_agree_and_runs_are_deterministic():
    chain, X, T, p = setup(conv_chain, 150, np.float64, seed=4)
    model = sc.add_loss(chain, sc.SquaredLoss(T))
    results = []
    before = numba.get_num_threads()
    try:
        for nt in (1, 2, 2):
            numba.set_num_threads(nt)
            state, q = sc.init_state(chain, np.float64), p.copy()
            G = sc.alloc_threaded_grad(chain, n_threads=nt, dtype=np.float64)
            # SGD: Adam would blow up the rounding noise of the biases before a BatchNorm,
            # whose exact gradient is 0
            sc.train_batched(G, q, model, X, sc.SGD(0.05), 2, batch_size=40, seed=1, state=state)
            results.append((q, state))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(results[1][0], results[2][0])
    np.testing.assert_array_equal(results[1][1], results[2][1])
    assert_close(results[0][0], results[1][0], np.float64, rtol=1e-9, atol=1e-12)
    assert_close(results[0][1], results[1][1], np.float64, rtol=1e-9, atol=1e-12)


def test_batch_of_one_raises_in_training_and_state_is_required():
    chain, X, T, p = setup(dense_chain, 5, np.float32)
    model = sc.add_loss(chain, sc.SquaredLoss(T))
    with pytest.raises(ValueError, match="more than one value per channel"):
        sc.valgrad(sc.add_loss(chain, sc.SquaredLoss(T[:1])), X[:1], p)
    with pytest.raises(ValueError, match="more than one value per channel"):
        chain(X[:1], p, state=sc.init_state(chain), training=True)
    with pytest.raises(ValueError, match="more than one value per channel"):
        sc.add_loss(chain, sc.SquaredLoss(T[:1]))(X[:1], p, state=sc.init_state(chain),
                                                  training=True)
    G = sc.alloc_threaded_grad(chain)
    state = sc.init_state(chain)
    saved = p.copy()
    with pytest.raises(ValueError, match="last minibatch"):
        sc.train_batched(G, p, model, X, sc.SGD(0.1), 1, batch_size=2, state=state)
    with pytest.raises(ValueError, match="pass state=sc.init_state"):
        sc.train_batched(G, p, model, X, sc.SGD(0.1), 1, batch_size=5)
    with pytest.raises(ValueError, match="pass state=sc.init_state"):
        chain(X, p)
    with pytest.raises(ValueError, match=r"state must be .* float32 array of shape \(18,\)"):
        chain(X, p, state=np.zeros(17, np.float32))
    np.testing.assert_array_equal(p, saved)
    np.testing.assert_array_equal(state, sc.init_state(chain))
    # a conv BatchNorm has H x W values per channel: one image is enough (as torch)
    cchain, CX, CT, cp = setup(conv_chain, 2, np.float64)
    with pytest.raises(ValueError, match="more than one value per channel"):  # the dense BN
        sc.valgrad(sc.add_loss(cchain, sc.SquaredLoss(CT[:1])), CX[:1], cp)


def test_init_state_views_and_bad_hyperparameters():
    chain = dense_chain()
    assert chain.n_state == 2 * 5 + 2 * 4 and sc.numparam(chain) == chain.n_params
    state = sc.init_state(chain, np.float64)
    views = chain.state_views(state)
    assert views[0] == {} and set(views[1]) == {"running_mean", "running_var"}
    assert (views[1]["running_mean"] == 0).all() and (views[3]["running_var"] == 1).all()
    assert sc.init_state(sc.SimpleChain(3, sc.TurboDense(2))).shape == (0,)
    for bad in (dict(momentum=0.0), dict(momentum=1.5), dict(eps=0.0), dict(eps=-1.0)):
        with pytest.raises(ValueError, match="BatchNorm"):
            sc.BatchNorm(**bad)
    with pytest.raises(ValueError, match=r"\(C,\) or \(C, H, W\)"):
        sc.SimpleChain((2, 3), sc.BatchNorm())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("make", [conv_chain, wide_chain], ids=["conv", "wide"])
def test_recompute_path_matches_resume_path(monkeypatch, threads, make):
    """Rows beyond the stage-workspace budget recompute every stage from the input; both
    paths give the same gradient and running statistics (to rounding)."""
    chain, X, T, p = setup(make, 70, np.float64, seed=5)
    model = sc.add_loss(chain, sc.SquaredLoss(T))
    results = []
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for budget in (sc.SimpleChain.STAGE_WORKSPACE_BYTES, 0):
            monkeypatch.setattr(sc.SimpleChain, "STAGE_WORKSPACE_BYTES", budget)
            loss, g, gx = sc.valgrad_with_input(model, X, p)
            state, q = sc.init_state(chain, np.float64), p.copy()
            G = sc.alloc_threaded_grad(chain, n_threads=threads, dtype=np.float64)
            sc.train_batched(G, q, model, X, sc.SGD(0.05), 1, batch_size=70, shuffle=False,
                             state=state)
            results.append((loss, g, gx, q, state))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*results):
        assert_close(a, b, np.float64, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_against_numpy_every_valid_lane_count(dtype):
    """The block kernels (one implementation, also the reference) against numpy for every
    number of valid lanes 0..B of a block (padding lanes, row -1, excluded) and spatial
    sizes 1 and 5, interpreted: statistics, their merge, forward, gradient sums, pullback."""
    from smallchains.layers import batchnorm as bn
    rng = np.random.default_rng(0)
    C, B = 3, 8
    for S in (1, 5):
        for nv in range(B + 1):
            meta = np.array([0, 0, 0] + [7] * nv + [-1] * (B - nv), np.int64)
            x = rng.standard_normal(C * S * B).astype(dtype)
            dy = rng.standard_normal(C * S * B).astype(dtype)
            xs = x.reshape(C, S, B)[:, :, :nv].reshape(C, -1)
            dys = dy.reshape(C, S, B)[:, :, :nv].reshape(C, -1)
            work = np.zeros(3 * C * S * B + 3 * C, dtype)
            work[:C * S * B], work[C * S * B:2 * C * S * B] = x, dy
            red = 3 * C * S * B
            bn.bn_stats.py_func(work, 0, red, C, S, B, meta)
            n = nv * S
            assert (work[red:red + C] == n).all()
            if n == 0:
                continue
            assert_close(work[red + C:red + 2 * C], xs.mean(1), dtype)
            assert_close(work[red + 2 * C:red + 3 * C], ((xs - xs.mean(1, keepdims=True)) ** 2).sum(1), dtype)
            state = np.zeros(7 * C, dtype)
            state[C:2 * C] = 1  # running var
            works = work[None, :]
            # one value per channel is refused before training (no unbiased variance)
            bn.bn_combine_stats.py_func(works, work.size, red, C, state, 2 * C, 0, dtype(0.1),
                                        dtype(1e-5), n > 1)
            mean, var = xs.mean(1), xs.var(1)
            inv = 1 / np.sqrt(var + 1e-5)
            assert_close(state[2 * C:3 * C], mean, dtype)
            assert_close(state[3 * C:4 * C], inv, dtype)
            if n > 1:
                assert_close(state[C:2 * C], 0.9 + 0.1 * xs.var(1, ddof=1), dtype)
            w = rng.uniform(0.5, 1.5, C).astype(dtype)
            b = rng.standard_normal(C).astype(dtype)
            p = np.concatenate([w, b])
            y_off = 2 * C * S * B
            bn.bn_forward.py_func(work, 0, y_off, C, S, B, p, 0, C, state, 2 * C, 3 * C, -1.0)
            y = work[y_off:y_off + C * S * B].reshape(C, S, B)[:, :, :nv].reshape(C, -1)
            xhat = (xs - mean[:, None]) * inv[:, None]
            assert_close(y, w[:, None] * xhat + b[:, None], dtype)
            work[red:] = 0
            bn.bn_grad_stats.py_func(work, 0, C * S * B, red, C, S, B, state, 2 * C, meta)
            assert_close(work[red:red + C], dys.sum(1), dtype)
            assert_close(work[red + C:red + 2 * C], (dys * xhat).sum(1), dtype)
            bn.bn_combine_grads.py_func(works, work.size, red, C, state, 2 * C)
            g = np.zeros(2 * C, dtype)
            bn.bn_pullback.py_func(work, 0, C * S * B, y_off, C, S, B, p, g, 0, C, state, 2 * C,
                                   3 * C, -1.0, 2 * C, meta, True)
            dx = (w * inv)[:, None] * (dys - dys.mean(1, keepdims=True)
                                       - xhat * (dys * xhat).mean(1, keepdims=True))
            full = work[y_off:y_off + C * S * B].reshape(C, S, B)
            assert_close(full[:, :, :nv].reshape(C, -1), dx, dtype)
            assert (full[:, :, nv:] == 0).all()
            assert_close(g, np.concatenate([(dys * xhat).sum(1), dys.sum(1)]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [dense_chain, conv_chain], ids=["dense", "conv"])
def test_embedding_kernels_read_the_state_from_the_end_of_work(dtype, make):
    """chain.kernels() of a chain with BatchNorm: inference with the running statistics
    held in the last n_state elements of work; single and batch kernels against
    chain(X, p, state=...) and the vjp against finite differences (float64)."""
    chain, X, T, p = setup(make, 11, dtype, seed=7)
    state, rng = random_state(chain, dtype, seed=8)
    k = chain.kernels(dtype, block_size=8)
    assert k.n_state == chain.n_state and k.work_size > chain.n_state
    with pytest.raises(ValueError, match="pass state=sc.init_state"):
        k.alloc_work()
    with pytest.raises(ValueError, match=rf"state must be .* shape \({chain.n_state},\)"):
        k.alloc_work(state[:-1].copy())
    work = k.alloc_work(state)
    np.testing.assert_array_equal(work[-chain.n_state:], state)
    Xf = X.reshape(11, -1)
    want = chain(X, p, state=state)
    Y = np.empty((11, k.n_out), dtype)
    work[:-chain.n_state] = np.nan  # nothing but the state may be read before written
    k.forward_batch(Xf, p, Y, work)
    assert_close(Y, want, dtype)
    y = np.empty(k.n_out, dtype)
    k.forward(Xf[4].copy(), p, y, work)
    assert_close(y, want[4], dtype)
    np.testing.assert_array_equal(work[-chain.n_state:], state)  # read, never written
    with pytest.raises(ValueError, match=f"the last {chain.n_state} of them the layer state"):
        k.forward_batch(Xf, p, Y, work[:2 * chain.n_state].copy())
    if dtype == np.float64:  # the batch vjp: d(sum(Ybar * Y))/dp and /dX
        Ybar = rng.standard_normal((11, k.n_out))
        Xbar, pbar = np.empty_like(Xf), np.empty_like(p)
        k.vjp_batch(Xf, p, Ybar, Xbar, pbar, work)

        def f(q, x=Xf):
            out = np.empty((11, k.n_out))
            k.forward_batch(x, q, out, work)
            return float((out * Ybar).sum())

        assert_close(pbar, central_fd(f, p), dtype, rtol=1e-6, atol=1e-8)
        assert_close(Xbar.ravel(), central_fd(lambda v: f(p, v.reshape(Xf.shape)), Xf.ravel()),
                     dtype, rtol=1e-6, atol=1e-8)
