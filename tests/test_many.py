"""fit_many: every fit equals the same training run alone at one thread (bitwise), for any
thread count; data subsets, own datasets, several models, minibatches, layer state and
Dropout; a diverging fit does not stop the others; bad input is refused before any work.
The Dask backend is tested in tests/test_many_dask.py."""

from __future__ import annotations

import numpy as np
import pytest

import smallchains as sc
from conftest import get_chain, make_data, make_model

DTYPES = [np.float32, np.float64]
DT_IDS = ["f32", "f64"]


def _deep(n=60, seed=0):
    X, Y = make_data("deep", n, seed=seed)  # 3 -> 13 tanh -> 1 softplus -> 37 gelu -> 4
    return make_model("deep", Y), X


def _alone(model, X, p0, opt, *, iters=None, epochs=None, seed, state=None, **kw):
    """The reference: one fit with train_unbatched / train_batched at one thread."""
    p = p0.copy()
    G = sc.alloc_threaded_grad(model.chain, 1, dtype=p.dtype)
    if iters is not None:
        h = sc.train_unbatched(G, p, model, X, opt, iters, seed=seed, state=state, **kw)
    else:
        h = sc.train_batched(G, p, model, X, opt, epochs, seed=seed, state=state, **kw)
    return p, h


def _same(result, p, h, state=None):
    assert result.status == "ok", result.message
    np.testing.assert_array_equal(result.p, p)
    np.testing.assert_array_equal(result.history, h)
    if state is not None:
        np.testing.assert_array_equal(result.state, state)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_full_batch_fits_equal_train_unbatched_alone(dtype, n_threads):
    model, X = _deep()
    configs = [{"seed": 10 + k, "lr": 2e-3 * (k + 1)} for k in range(5)]
    res = sc.fit_many(model, X, configs, optimizer=sc.Adam(betas=(0.8, 0.99)), iters=25,
                      dtype=dtype, n_threads=n_threads)
    assert [r.config for r in res] == configs and all(r.config is c for r, c in zip(res, configs))
    for c, r in zip(configs, res):
        p0 = sc.init_params(model.chain, seed=c["seed"], dtype=dtype)
        p, h = _alone(model, X, p0, sc.Adam(c["lr"], betas=(0.8, 0.99)), iters=25, seed=c["seed"])
        _same(r, p, h)
        assert r.steps == 25 and r.history.shape == (25,) and r.final_loss == h[-1]
        assert r.history[-1] < r.history[0]  # the fits learn


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_minibatch_fits_on_rows_and_own_data_equal_train_batched_alone(dtype):
    model, X = _deep(n=90)
    Y = model.loss.targets
    rng = np.random.default_rng(3)
    boot = rng.integers(0, 90, 70)  # a bootstrap resample of the shared X
    X2, Y2 = make_data("deep", 41, seed=7)  # a dataset of its own, 41 rows: a partial batch
    p_given = sc.init_params(model.chain, seed=99, dtype=dtype)
    configs = [{"seed": 1}, {"seed": 2, "rows": boot}, {"seed": 3, "data": (X2, Y2), "lr": 3e-3},
               {"seed": 4, "p": p_given, "rows": np.arange(0, 90, 3)}]
    res = sc.fit_many(model, X, configs, epochs=3, batch_size=16, dtype=dtype, n_threads=2)
    refs = [(X, Y, 1), (X[boot], Y[boot], 2), (X2, Y2, 3), (X[::3], Y[::3], 4)]
    for c, r, (Xf, Yf, seed) in zip(configs, res, refs):
        p0 = c.get("p", sc.init_params(model.chain, seed=seed, dtype=dtype))
        p, h = _alone(sc.add_loss(model.chain, sc.SquaredLoss(Yf)), Xf, p0, sc.Adam(c.get("lr", 1e-3)),
                      epochs=3, batch_size=16, seed=seed)
        _same(r, p, h)
        assert r.history.shape == (3,)
    assert np.array_equal(p_given, sc.init_params(model.chain, seed=99, dtype=dtype))  # not modified


def test_unshuffled_minibatches_and_default_batch_size():
    model, X = _deep(n=200)
    res = sc.fit_many(model, X, 2, epochs=2, shuffle=False, n_threads=2)
    for s, r in enumerate(res):
        p, h = _alone(model, X, sc.init_params(model.chain, seed=s), sc.Adam(), epochs=2,
                      seed=s, shuffle=False, batch_size=sc.default_batch_size(
                          model.chain._kernels(np.dtype(np.float32))[1].B, 1, 200))
        _same(r, p, h)


def test_several_models_are_grouped_and_returned_in_order():
    model, X = _deep()
    clf = get_chain("clf")  # 6 inputs: needs data of its own
    Xc, labels = make_data("clf", 50, seed=1)
    mclf = make_model("clf", labels)
    configs = [{"seed": 0}, {"seed": 1, "model": mclf, "data": (Xc, labels)}, {"seed": 2},
               {"seed": 3, "model": mclf, "data": (Xc, labels), "lr": 1e-2}]
    res = sc.fit_many(model, X, configs, iters=10, n_threads=2)
    assert [r.p.shape[0] for r in res] == [model.n_params, clf.n_params, model.n_params, clf.n_params]
    for c, r in zip(configs, res):
        m, Xf = (c["model"], Xc) if "model" in c else (model, X)
        p, h = _alone(m, Xf, sc.init_params(m.chain, seed=c["seed"]), sc.Adam(c.get("lr", 1e-3)),
                      iters=10, seed=c["seed"])
        _same(r, p, h)


def test_batchnorm_state_and_dropout_keys_per_fit():
    chain = sc.SimpleChain(6, sc.TurboDense(5, "tanh"), sc.BatchNorm(), sc.TurboDense(4, "tanh"),
                           sc.Dropout(0.3), sc.TurboDense(3))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6))
    model = sc.add_loss(chain, sc.SquaredLoss(rng.standard_normal((40, 3))))
    state0 = sc.init_state(chain, np.float64)
    state0[:5] = 0.5  # running mean from an earlier training
    configs = [{"seed": 5}, {"seed": 6, "state": state0}, {"seed": 7}]
    res = sc.fit_many(model, X, configs, iters=6, dtype=np.float64, n_threads=2)
    for c, r in zip(configs, res):
        st = c.get("state", sc.init_state(chain, np.float64)).copy()
        p, h = _alone(model, X, sc.init_params(chain, seed=c["seed"], dtype=np.float64), sc.Adam(),
                      iters=6, seed=c["seed"], state=st)
        _same(r, p, h, state=st)
        assert not np.array_equal(r.state, c.get("state", sc.init_state(chain, np.float64)))
    assert state0[0] == 0.5  # the caller's state is copied, not trained in place
    assert not np.array_equal(res[0].p, res[2].p)


def test_a_diverging_fit_stops_alone_and_says_why():
    model, X = _deep()
    configs = [{"seed": 0}, {"seed": 1, "lr": 1e30}, {"seed": 2}]
    res = sc.fit_many(model, X, configs, iters=40, n_threads=2)  # float32: overflows to inf
    bad = res[1]
    assert bad.status in ("loss not finite", "gradient not finite") and not bad.ok
    assert bad.steps < 40 and len(bad.history) == bad.steps and str(bad.steps) in bad.message
    # what train_unbatched does: stops there, p at the last good step
    p = sc.init_params(model.chain, seed=1)
    with pytest.raises(FloatingPointError) as e:
        sc.train_unbatched(sc.alloc_threaded_grad(model.chain, 1), p, model, X, sc.Adam(1e30), 40,
                           seed=1)
    np.testing.assert_array_equal(bad.history, e.value.history)
    np.testing.assert_array_equal(bad.p, p)  # both at the last good step
    for k in (0, 2):
        p, h = _alone(model, X, sc.init_params(model.chain, seed=k), sc.Adam(), iters=40, seed=k)
        _same(res[k], p, h)


def test_zero_steps_and_more_threads_than_fits():
    model, X = _deep()
    res = sc.fit_many(model, X, 2, iters=0, n_threads=8)
    for s, r in enumerate(res):
        assert r.ok and r.steps == 0 and r.history.shape == (0,)
        np.testing.assert_array_equal(r.p, sc.init_params(model.chain, seed=s))


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(configs="abc"), TypeError, "sequence of dicts"),
    (dict(configs=[]), ValueError, "empty"),
    (dict(configs=0), ValueError, "configs"),
    (dict(configs=[{"seed": 0}, 3]), TypeError, r"configs\[1\] must be a dict"),
    (dict(configs=[{"sed": 1}]), ValueError, r"unknown key\(s\) \['sed'\]"),
    (dict(configs=[{"lr": -1.0}]), ValueError, r"configs\[0\]: .*lr"),
    (dict(configs=[{"seed": 1.5}]), TypeError, "seed"),
    (dict(configs=[{"rows": np.array([0, 60])}]), ValueError, r"rows'\] must lie in \[0, 60\)"),
    (dict(configs=[{"rows": np.array([0.5])}]), ValueError, "integer"),
    (dict(configs=[{"data": (np.zeros((5, 2)), np.zeros((5, 4)))}]), ValueError, r"data'\]"),
    (dict(configs=[{"data": (np.zeros((5, 3)), np.zeros((4, 4)))}]), ValueError, "targets"),
    (dict(configs=[{"rows": np.array([0]), "data": (np.zeros((1, 3)), np.zeros((1, 4)))}]),
     ValueError, "not both"),
    (dict(configs=[{"p": np.zeros(3)}]), ValueError, r"p'\] must be a float32 array of shape"),
    (dict(configs=[{"model": "x"}]), TypeError, "model"),
    (dict(X=None), ValueError, "no shared X"),
    (dict(X=np.zeros((60, 2))), ValueError, "shared X"),
    (dict(iters=None), TypeError, "exactly one of iters"),
    (dict(epochs=2), TypeError, "exactly one of iters"),
    (dict(iters=2.0), TypeError, "iters"),
    (dict(iters=5, batch_size=4), TypeError, "batch_size goes with epochs"),
    (dict(optimizer="adam"), TypeError, "optimizer"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(n_threads=0), ValueError, "n_threads"),
])
def test_bad_input_is_refused_before_any_work(kwargs, err, match):
    model, X = _deep()
    args = dict(X=X, configs=2, iters=3)
    args.update(kwargs)
    Xc = None if args["X"] is None else args["X"].copy()
    with pytest.raises(err, match=match):
        sc.fit_many(model, args.pop("X"), args.pop("configs"), **args)
    if Xc is not None:
        np.testing.assert_array_equal(kwargs.get("X", X), Xc)


def test_fetch_add_hands_out_every_number_once():
    import numba

    from smallchains._numba_utils import fetch_add

    @numba.njit(parallel=True)
    def take(counter, n):
        got = np.zeros(n, np.int64)
        for k in numba.prange(n):
            got[k] = fetch_add(counter, 1, 2)
        return got

    counter = np.array([7, 5], np.int64)
    got = take(counter, 1001)
    assert counter[0] == 7 and counter[1] == 5 + 2 * 1001
    np.testing.assert_array_equal(np.sort(got), 5 + 2 * np.arange(1001))
