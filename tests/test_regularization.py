"""Penalties (L1Penalty, L2Penalty), AdamW, gradient clipping and frozen parameters against
torch step for step (float64, and float32 to rounding); validation each epoch with
restore-best and early stopping; and their bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest

import smallchains as sc
from conftest import (assert_close, central_fd, deep_training_setup, get_chain, make_data,
                      random_params, torch_flat, torch_model)

CASES = {  # name -> (l1, l2, clip_norm, frozen layers, optimizer)
    "adamw": (0.0, 0.0, None, None, "adamw"),
    "elastic_clip_frozen_adamw": (0.01, 0.02, 0.5, [0], "adamw"),
    "l1_clip_frozen_last_adam": (0.003, 0.0, 0.1, [-1], "adam"),
    "l2_sgd_momentum": (0.0, 0.05, 1.0, None, "sgd"),
}


def _penalized(model, l1, l2):
    if l1:
        model = sc.L1Penalty(model, l1)
    if l2:
        model = sc.L2Penalty(model, l2)
    return model


def _ours(name):
    return {"adamw": sc.AdamW(1e-2, weight_decay=0.1), "adam": sc.Adam(1e-2),
            "sgd": sc.SGD(1e-2, momentum=0.9)}[name]


def _torch_opt(torch, name, params):
    return {"adamw": lambda: torch.optim.AdamW(params, 1e-2, weight_decay=0.1),
            "adam": lambda: torch.optim.Adam(params, 1e-2),
            "sgd": lambda: torch.optim.SGD(params, 1e-2, momentum=0.9)}[name]()


# every case in float64; float32 (the same compiled step in the other dtype) for two
_RUNS = [(c, b, np.float64) for c in sorted(CASES) for b in (False, True)] + [
    ("elastic_clip_frozen_adamw", True, np.float32), ("l2_sgd_momentum", False, np.float32)]


@pytest.mark.parametrize("case, batched, dtype", _RUNS,
                         ids=[f"{c}-{'batched' if b else 'unbatched'}-{np.dtype(d).name}"
                              for c, b, d in _RUNS])
def test_training_matches_torch(torch, case, batched, dtype, split_update):
    l1, l2, clip, frozen, opt_name = CASES[case]
    X, Y = make_data("deep", 40, seed=0)
    chain = get_chain("deep")
    p0 = random_params(chain, seed=0)
    model = _penalized(sc.add_loss(chain, sc.SquaredLoss(Y)), l1, l2)
    p = p0.astype(dtype)
    G = sc.alloc_threaded_grad(chain, 2, dtype)
    kw = dict(clip_norm=clip, frozen=frozen)
    steps = 6
    if batched:  # no shuffle: torch takes the same minibatches of 16, 16, 8
        h = sc.train_batched(G, p, model, X.astype(dtype), _ours(opt_name), 2, batch_size=16,
                             shuffle=False, **kw)
        batches = [slice(0, 16), slice(16, 32), slice(32, 40)] * 2
    else:
        h = sc.train_unbatched(G, p, model, X.astype(dtype), _ours(opt_name), steps, **kw)
        batches = [slice(0, 40)] * steps
    net, linears = torch_model(torch, chain, p0)
    for i in frozen or []:
        for q in linears[i].parameters():
            q.requires_grad_(False)
    params = [q for q in net.parameters() if q.requires_grad]
    opt = _torch_opt(torch, opt_name, params)
    losses = []
    for b in batches:
        opt.zero_grad()
        yb = torch.from_numpy(Y[b])
        L = ((net(torch.from_numpy(X[b])) - yb) ** 2).sum() / yb.shape[0]
        flat = torch.cat([q.reshape(-1) for q in net.parameters()])
        L = L + l1 * flat.abs().sum() + l2 * (flat ** 2).sum()
        losses.append(L.item())
        L.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    expected = np.mean(np.reshape(losses, (2, 3)), axis=1) if batched else losses
    tol = {} if dtype == np.float64 else dict(rtol=2e-4, atol=1e-5)
    assert_close(h, expected, dtype, **tol)
    assert_close(p, torch_flat(linears), dtype, **tol)
    if frozen:  # frozen parameters are bitwise unchanged (AdamW's decay undone too)
        mask = np.zeros(chain.n_params, bool)
        mask[sc.frozen_indices(chain, frozen)] = True
        np.testing.assert_array_equal(p[mask], p0.astype(dtype)[mask])
        assert (p[~mask] != p0.astype(dtype)[~mask]).all()


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_update_equals_serial_update_bitwise(monkeypatch, batched, dtype):
    """The parallel sum and update of a step (each thread its slice of p) give the same bits
    as the serial ones, with penalties, clipping and frozen parameters."""
    import smallchains.train
    X, Y = make_data("deep", 40, seed=0)
    chain = get_chain("deep")
    model = _penalized(sc.add_loss(chain, sc.SquaredLoss(Y)), 0.01, 0.02)
    out = []
    for threshold in (None, 0):
        if threshold is not None:
            monkeypatch.setattr(smallchains.train, "PARALLEL_UPDATE_PARAMS", threshold)
        assert (smallchains.train.update_slices(chain.n_params, 2) is None) == (threshold is None)
        p = random_params(chain, seed=0).astype(dtype)
        G = sc.alloc_threaded_grad(chain, 2, dtype)
        opt = sc.AdamW(1e-2, weight_decay=0.1)
        kw = dict(clip_norm=0.5, frozen=[0])
        if batched:
            h = sc.train_batched(G, p, model, X.astype(dtype), opt, 3, batch_size=16, seed=1, **kw)
        else:
            h = sc.train_unbatched(G, p, model, X.astype(dtype), opt, 5, **kw)
        out.append((p, h, opt.state.copy()))
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("arch", ["deep", "batchnorm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_sum_leaves_no_stale_gradient(monkeypatch, arch, dtype):
    """With the split sum, the gradient rows are zeroed by the sum for the next step, not by
    the range kernels. A G full of NaN from the caller, a frozen last layer (whose entries
    of p wait in G[0] during the update), a BatchNorm chain (the staged kernels), and then
    valgrad and serial training on the same chain (whose cached step metadata the split
    path marked) all give the serial path's bits."""
    import smallchains.train
    default = smallchains.train.PARALLEL_UPDATE_PARAMS
    if arch == "deep":
        X, Y = make_data("deep", 40, seed=5)
        chain = get_chain("deep")
    else:
        rng = np.random.default_rng(5)
        X, Y = rng.standard_normal((40, 6)), rng.standard_normal((40, 3))
        chain = sc.SimpleChain(6, sc.TurboDense(5, "tanh"), sc.BatchNorm(), sc.TurboDense(3))
    model = sc.add_loss(chain, sc.SquaredLoss(Y.astype(dtype)))
    X = X.astype(dtype)
    frozen = [len(chain.layers) - 1]
    out = []
    for split in (False, True):
        monkeypatch.setattr(smallchains.train, "PARALLEL_UPDATE_PARAMS", 0 if split else default)
        assert (smallchains.train.update_slices(chain.n_params, 2) is None) != split
        p = random_params(chain, seed=1).astype(dtype)
        state = sc.init_state(chain, dtype) if chain.n_state else None
        G = np.full((2, chain.n_params), np.nan, dtype)
        opt = sc.AdamW(1e-2, weight_decay=0.1)
        h1 = sc.train_batched(G, p, model, X, opt, 2, batch_size=16, seed=2, frozen=frozen,
                              state=state)
        loss, g = sc.valgrad(model, X, p, state=state)
        monkeypatch.setattr(smallchains.train, "PARALLEL_UPDATE_PARAMS", default)
        h2 = sc.train_batched(G, p, model, X, opt, 1, batch_size=16, seed=3, frozen=frozen,
                              state=state)
        out.append((p, h1, np.array([loss]), g, h2) + (() if state is None else (state,)))
    assert np.isfinite(out[0][3]).all() and (out[0][3] != 0).any()
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_penalized_valgrad_matches_finite_differences():
    X, Y = make_data("deep", 21, seed=2)
    chain = get_chain("deep")
    model = sc.L1Penalty(sc.L2Penalty(sc.add_loss(chain, sc.SquaredLoss(Y)), 0.03), 0.02)
    p = random_params(chain, seed=3)
    loss, g = sc.valgrad(model, X, p)
    plain = sc.add_loss(chain, sc.SquaredLoss(Y))
    assert_close(loss, plain(X, p) + 0.02 * np.abs(p).sum() + 0.03 * (p * p).sum(), np.float64)
    assert_close(model(X, p), loss, np.float64)
    assert_close(g, central_fd(lambda q: model(X, q), p), "fd")
    assert model.l1 == 0.02 and model.l2 == 0.03 and model.chain is chain


def test_fit_many_with_penalty_clip_and_frozen_equals_train_unbatched():
    X, Y = make_data("deep", 30, seed=4)
    chain = get_chain("deep")
    model = sc.L2Penalty(sc.add_loss(chain, sc.SquaredLoss(Y)), 0.01)
    res = sc.fit_many(model, X, 2, optimizer=sc.AdamW(1e-2), iters=5, n_threads=2,
                      clip_norm=0.3, frozen=[1])
    for seed, r in enumerate(res):
        p = sc.init_params(chain, seed=seed)
        h = sc.train_unbatched(sc.alloc_threaded_grad(chain, 1), p, model, X, sc.AdamW(1e-2), 5,
                               clip_norm=0.3, frozen=[1])
        np.testing.assert_array_equal(r.p, p)
        np.testing.assert_array_equal(r.history, h)


def test_exact_arithmetic_is_compiled_on_its_own():
    """The penalty and clipping arithmetic must keep IEEE semantics in every training loop
    (the bitwise test above depends on it). numba inlines ``inline="always"`` callees at
    the level of its IR, where they take the caller's fast-math flags: such a function's
    own ``fastmath=False`` would be silently ignored. Check both the options and the
    compiled code of a fast-math caller."""
    from numba import njit

    from smallchains.compiler import loops

    opts = loops._regularize.targetoptions
    assert opts["fastmath"] is False and opts.get("inline", "never") == "never"

    @njit(fastmath=True)
    def caller(p, g, reg, frozen):
        return loops._regularize(p, g, reg, frozen)

    p = np.ones(4, np.float32)
    caller(p, p.copy(), np.zeros(3, np.float32), np.zeros(0, np.int64))
    ir = "\n".join(caller.inspect_llvm().values())
    penalty = [ln for ln in ir.splitlines() if "fadd" in ln or "fmul" in ln]
    assert penalty and not [ln for ln in penalty if " fast " in ln or "contract" in ln]


def test_frozen_mask_equals_layer_indices():
    chain = get_chain("deep")
    views = chain.param_views(np.arange(chain.n_params, dtype=np.float64))
    idx = sc.frozen_indices(chain, [0, -1])
    expected = np.concatenate([v.ravel() for k in (0, len(views) - 1) for v in views[k].values()]).astype(np.int64)
    np.testing.assert_array_equal(idx, np.sort(expected))
    mask = np.zeros(chain.n_params, bool)
    mask[idx] = True
    np.testing.assert_array_equal(sc.frozen_indices(chain, mask), idx)


def _run(model, X, p, epochs, **kw):
    return sc.train_batched(sc.alloc_threaded_grad(model.chain, 1), p, model, X, sc.Adam(0.05),
                            epochs, batch_size=8, seed=1, **kw)


def test_validation_restore_best_and_patience():
    model, X, p0, _ = deep_training_setup(n=40, seed=0)
    Xv, Yv = make_data("deep", 15, seed=9)
    p = p0.copy()
    h, hv = _run(model, X, p, 12, validation=(Xv, Yv), restore_best=True)
    assert h.shape == hv.shape == (12,)
    vmodel = sc.add_loss(model.chain, sc.SquaredLoss(Yv))
    best = int(np.argmin(hv))
    assert_close(vmodel(Xv, p), hv[best], np.float32)  # p is the best epoch's
    q = p0.copy()  # and bitwise what training stopped after that epoch gives
    _run(model, X, q, best + 1)
    np.testing.assert_array_equal(p, q)
    # patience: stops after `patience` epochs without a new best
    q = p0.copy()
    h2, hv2 = _run(model, X, q, 12, validation=(Xv, Yv), patience=1)
    # (the same trajectory as the full run: the first epoch that is not a new best)
    stop = next((i for i in range(1, 12) if hv[i] >= hv[:i].min()), 11)
    assert stop < 11  # else this test would not test patience
    assert len(h2) == len(hv2) == stop + 1
    np.testing.assert_array_equal(hv2, hv[:len(hv2)])


def test_validation_with_batchnorm_uses_running_statistics():
    chain = sc.SimpleChain(3, sc.TurboDense(8), sc.BatchNorm(), sc.TurboDense(4))
    X, Y = make_data("deep", 32, seed=0)
    Xv, Yv = make_data("deep", 10, seed=1)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    p, state = sc.init_params(chain, seed=0), sc.init_state(chain)
    h, hv = sc.train_batched(sc.alloc_threaded_grad(chain, 1), p, model, X, sc.Adam(1e-2), 3,
                             batch_size=16, seed=0, state=state, validation=(Xv, Yv))
    # the last validation loss is the inference loss with the final running statistics
    assert_close(sc.add_loss(chain, sc.SquaredLoss(Yv))(Xv, p, state=state), hv[-1], np.float32)


def test_bad_training_control_input():
    model, X, p, G = deep_training_setup(n=10)
    chain = model.chain
    before = p.copy()
    for kw, err, match in [
        (dict(frozen=np.zeros(3, bool)), ValueError, r"mask must have shape \(\d+,\)"),
        (dict(frozen=[7]), ValueError, r"layer index 7 out of range"),
        (dict(frozen=[0.5]), TypeError, r"boolean mask .* or a sequence of layer indices"),
        (dict(clip_norm=0.0), ValueError, r"clip_norm"),
        (dict(clip_norm=float("nan")), ValueError, r"clip_norm"),
    ]:
        with pytest.raises(err, match=match):
            sc.train_unbatched(G, p, model, X, sc.Adam(), 2, **kw)
    for kw, err, match in [
        (dict(restore_best=True), ValueError, r"need validation"),
        (dict(validation=(X, np.zeros((3, 4)))), ValueError, r"validation: .*targets have 3 samples"),
        (dict(validation=X), TypeError, r"validation must be a pair"),
    ]:
        with pytest.raises(err, match=match):
            sc.train_batched(G, p, model, X, sc.Adam(), 2, **kw)
    np.testing.assert_array_equal(p, before)
    with pytest.raises(TypeError, match=r"L2Penalty expects a model with a loss"):
        sc.L2Penalty(chain, 0.1)
    with pytest.raises(ValueError, match=r"lam"):
        sc.L1Penalty(model, -1.0)
    with pytest.raises(ValueError, match=r"weight_decay"):
        sc.AdamW(weight_decay=-0.1)


def test_penalized_model_and_adamw_pickle_and_save(tmp_path):
    import pickle

    model, X, p, _ = deep_training_setup(n=10)
    m2 = pickle.loads(pickle.dumps(sc.L2Penalty(sc.L1Penalty(model, 0.1), 0.2)))
    assert (m2.l1, m2.l2) == (0.1, 0.2)
    opt = sc.AdamW(1e-2, weight_decay=0.05)
    sc.train_unbatched(sc.alloc_threaded_grad(model.chain, 1), p, model, X, opt, 2)
    sc.save(tmp_path / "m.sc", model.chain, p, optimizer=opt)
    back = sc.load(tmp_path / "m.sc").optimizer
    assert isinstance(back, sc.AdamW) and back.weight_decay == 0.05 and back.t == 2
    np.testing.assert_array_equal(back.state, opt.state)
