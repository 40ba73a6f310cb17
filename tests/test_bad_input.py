"""Bad input gets a clear exception (type and message) and leaves the caller's arrays
untouched; odd-but-valid input (non-contiguous X) works."""

from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
import pytest

import smallchains as sc
from conftest import assert_close, get_chain, make_data, make_model, random_params

N = 5


@contextmanager
def unchanged(*arrays):
    """Assert that the arrays hold the same values (NaN == NaN) after the block."""
    copies = [np.array(a, copy=True) for a in arrays]
    yield
    for i, (a, c) in enumerate(zip(arrays, copies)):
        np.testing.assert_array_equal(a, c, err_msg=f"argument {i} was modified")


@pytest.fixture
def reg():
    """Regression setup: 'deep' chain (3 inputs, 4 outputs), SquaredLoss, float64."""
    X, Y = make_data("deep", N, seed=0)
    model = make_model("deep", Y, "squared")
    p = random_params(model.chain, seed=0)
    G = sc.alloc_threaded_grad(model.chain, n_threads=2, dtype=np.float64)
    return model, X, Y, p, G


# Every public entry point that takes X, as f(model, X, p, G, opt).
CALLS = {
    "chain": lambda m, X, p, G, o: m.chain(X, p),
    "model": lambda m, X, p, G, o: m(X, p),
    "valgrad": lambda m, X, p, G, o: sc.valgrad(m, X, p),
    "valgrad_with_input": lambda m, X, p, G, o: sc.valgrad_with_input(m, X, p),
    "train_unbatched": lambda m, X, p, G, o: sc.train_unbatched(G, p, m, X, o, 3),
    "train_batched": lambda m, X, p, G, o: sc.train_batched(G, p, m, X, o, 2, batch_size=2, seed=0),
}
MODEL_CALLS = [k for k in CALLS if k != "chain"]
TRAIN_CALLS = ["train_unbatched", "train_batched"]


def _rejects(call, model, X, p, G, exc, match, extra=()):
    opt = sc.Adam(1e-2)
    with unchanged(X, p, G, model.loss.targets, *extra), pytest.raises(exc, match=match):
        CALLS[call](model, X, p, G, opt)
    assert opt.t == 0 and opt.state is None  # optimizer untouched too


# --------------------------------------------------------------------------------------
# bad X

BAD_X = {
    "wrong_width": (lambda X: X[:, :2].copy(), ValueError, r"X must have shape \(N, 3\).*got \(5, 2\)"),
    "3d": (lambda X: X[:, :, None].copy(), ValueError, r"X must have shape \(N, 3\) \(batch first\)"),
    "int": (lambda X: np.round(X).astype(np.int64), TypeError, r"float32 or float64.*int64"),
    "object": (lambda X: X.astype(object), TypeError, r"float32 or float64.*object"),
    "bool": (lambda X: X > 0, TypeError, r"float32 or float64.*bool"),
    "empty": (lambda X: X[:0].copy(), ValueError, r"empty batch"),
    "nan": (lambda X: np.where(np.arange(N)[:, None] == 3, np.nan, X), ValueError,
            r"NaN or Inf \(first at sample 3\)"),
    "inf": (lambda X: np.where(np.arange(N)[:, None] == 1, -np.inf, X), ValueError,
            r"NaN or Inf \(first at sample 1\)"),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("bad", list(BAD_X))
def test_bad_X_rejected(reg, bad, call):
    model, X, Y, p, G = reg
    make, exc, match = BAD_X[bad]
    _rejects(call, model, make(X), p, G, exc, match)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_X_found_in_large_arrays(dtype, value):
    """Arrays of 2**16 elements or more are checked by a compiled loop, smaller ones by
    numpy: both find one bad value anywhere, read-only arrays included."""
    from smallchains._validate import _COMPILED_CHECK_SIZE, all_finite, check_inputs
    n = _COMPILED_CHECK_SIZE // 3 + 5  # rows of 3: above the size
    X = np.random.default_rng(0).standard_normal((n, 3)).astype(dtype)
    assert all_finite(X)
    for row in (0, n // 2, n - 1):
        Xb = X.copy()
        Xb[row, 2] = value
        Xb.flags.writeable = row != n // 2
        with pytest.raises(ValueError, match=rf"NaN or Inf \(first at sample {row}\)"):
            check_inputs((3,), Xb, dtype)
        assert not all_finite(Xb) and not all_finite(Xb[:10 + row])


def test_X_huge_but_finite_float64_ok(reg):
    model, X, Y, p, G = reg
    X = X.copy()
    X[2, 0] = 1e300
    assert np.isfinite(model.chain(X, p)).all()


def test_X_overflowing_float32_rejected_cleanly(reg):
    """Finite float64 X that overflows when cast to a float32 p: a clean ValueError."""
    model, X, Y, p, G = reg
    X = X.copy()
    X[2, 0] = 1e300
    p = p.astype(np.float32)
    with unchanged(X, p), pytest.raises(ValueError, match=r"beyond the float32 range"):
        model.chain(X, p)


@pytest.mark.parametrize("call", MODEL_CALLS)
def test_single_sample_rejected_where_batch_needed(reg, call):
    model, X, Y, p, G = reg
    _rejects(call, model, X[0].copy(), p, G, ValueError, r"\(N, 3\)")


@pytest.mark.parametrize("call", list(CALLS))
def test_non_contiguous_X_works(reg, call):
    model, X, Y, p, G = reg
    wide = np.zeros((N, 6))
    wide[:, ::2] = X
    variants = [wide[:, ::2], np.asfortranarray(X)]
    assert not variants[0].flags.c_contiguous and not variants[1].flags.c_contiguous
    expected = CALLS[call](model, X, p.copy(), G.copy(), sc.Adam(1e-2))
    for Xv in variants:
        before = Xv.copy()
        q = p.copy()
        got = CALLS[call](model, Xv, q, G.copy(), sc.Adam(1e-2))
        np.testing.assert_array_equal(Xv, before)
        if isinstance(got, tuple):
            for a, b in zip(got, expected):
                assert_close(a, b, np.float64)
        else:
            assert_close(got, expected, np.float64)
        if call in TRAIN_CALLS:
            ref = p.copy()
            CALLS[call](model, X, ref, G.copy(), sc.Adam(1e-2))
            assert_close(q, ref, np.float64)
            assert not np.array_equal(q, p)


def test_float32_X_into_float64_chain_is_converted(reg):
    model, X, Y, p, G = reg
    X32 = X.astype(np.float32)
    assert_close(model.chain(X32, p), model.chain(X32.astype(np.float64), p), np.float64, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# bad targets

@pytest.mark.parametrize("call", MODEL_CALLS)
def test_targets_N_mismatch(reg, call):
    model, X, Y, p, G = reg
    bad = make_model("deep", Y[:4], "squared")
    _rejects(call, bad, X, p, G, ValueError, r"targets have 4 samples but X has 5")


@pytest.mark.parametrize("call", MODEL_CALLS)
def test_targets_wrong_width(reg, call):
    model, X, Y, p, G = reg
    bad = make_model("deep", Y[:, :3].copy(), "squared")
    _rejects(call, bad, X, p, G, ValueError, r"targets must have shape \(N, 4\)")


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("call", MODEL_CALLS)
def test_nonfinite_targets(reg, call, value):
    model, X, Y, p, G = reg
    Y = Y.copy()
    Y[2, 1] = value
    for loss in ("squared", "absolute"):
        _rejects(call, make_model("deep", Y, loss), X, p, G, ValueError, r"targets contain NaN or Inf")


# --------------------------------------------------------------------------------------
# bad p

BAD_P = {
    "short": (lambda p: p[:-1].copy(), ValueError, r"p must have shape \(292,\).*got \(291,\)"),
    "long": (lambda p: np.append(p, 0.0), ValueError, r"p must have shape \(292,\)"),
    "2d": (lambda p: p[None, :].copy(), ValueError, r"p must have shape \(292,\)"),
    "int": (lambda p: np.round(p).astype(np.int64), TypeError, r"p must have dtype float32 or float64, got int64"),
    "list": (lambda p: list(p), TypeError, r"p must be a numpy ndarray"),
    "strided": (lambda p: np.repeat(p, 2)[::2], ValueError, r"C-contiguous"),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("bad", list(BAD_P))
def test_bad_p_rejected(reg, bad, call):
    model, X, Y, p, G = reg
    assert model.chain.n_params == 292
    make, exc, match = BAD_P[bad]
    q = make(p)
    opt = sc.Adam(1e-2)
    with unchanged(X, G, *(() if isinstance(q, list) else (q,))), pytest.raises(exc, match=match):
        CALLS[call](model, X, q, G, opt)
    assert opt.t == 0 and opt.state is None


def test_readonly_p_rejected_for_training(reg):
    model, X, Y, p, G = reg
    p.flags.writeable = False
    for call in TRAIN_CALLS:
        _rejects(call, model, X, p, G, ValueError, r"p must be writeable")


# --------------------------------------------------------------------------------------
# NaN/Inf during training

def test_loss_inf_at_first_iteration(reg):
    """Finite but huge targets: the very first loss overflows; no step is applied."""
    model, X, Y, p, G = reg
    huge = make_model("deep", np.full_like(Y, 1e200), "squared")
    opt = sc.SGD(1e-3)
    with unchanged(p, X), pytest.raises(FloatingPointError, match=r"iteration 0 \(0-based\)"):
        sc.train_unbatched(G, p, huge, X, opt, 5)
    assert opt.t == 0


def test_loss_nan_after_diverging(reg):
    """A huge learning rate: step 0 is finite, then the loss overflows."""
    model, X, Y, p, G = reg
    p0 = p.copy()
    opt = sc.SGD(1e150)
    with pytest.raises(FloatingPointError, match=r"iteration 1 \(0-based\) of train_unbatched") as e:
        sc.train_unbatched(G, p, model, X, opt, 10)
    assert "loss is" in str(e.value)
    # p holds the parameters of the failing iteration: finite, one step away from p0
    assert opt.t == 1
    assert np.isfinite(p).all() and not np.array_equal(p, p0)
    assert not np.isfinite(model(X, p))
    assert e.value.nonfinite == "loss"
    assert e.value.history.shape == (1,)
    assert_close(e.value.history[0], model(X, p0), np.float64)


# SGD at this learning rate diverges so that after 3 steps the loss is still finite but its
# gradient overflows (lr 1e10 .. 1e16 all do; smaller ones overflow the loss first)
DIVERGING = dict(lr=1e13, momentum=0.9)


def test_nonfinite_gradient_with_finite_loss_is_not_applied(reg, split_update):
    model, X, Y, p, G = reg
    p0 = p.copy()
    opt = sc.SGD(**DIVERGING)
    with pytest.raises(FloatingPointError, match=r"the gradient is not finite \(the loss is .*\) "
                       r"at iteration 3 \(0-based\) of train_unbatched") as e:
        sc.train_unbatched(G, p, model, X, opt, 10)
    assert e.value.nonfinite == "gradient"
    # a real case: at the p we are left with the loss is finite, its gradient is not
    loss, g = sc.valgrad(model, X, p)
    assert np.isfinite(loss) and not np.isfinite(g).all()
    # p, opt.t and the momentum buffer are those after the 3 good steps
    ref, q = sc.SGD(**DIVERGING), p0.copy()
    hist = sc.train_unbatched(G, q, model, X, ref, 3)
    assert opt.t == ref.t == 3
    np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(opt.state, ref.state)
    assert np.isfinite(opt.state).all()
    np.testing.assert_array_equal(e.value.history, hist)


def test_nonfinite_gradient_in_train_batched_is_not_applied(reg, split_update):
    """Full batches, no shuffling: epoch e is step e of the unbatched run above."""
    model, X, Y, p, G = reg
    p0 = p.copy()
    opt = sc.SGD(**DIVERGING)
    with pytest.raises(FloatingPointError, match=r"the gradient is not finite .* in epoch 4, "
                       r"minibatch 0 \(0-based\) of train_batched") as e:
        sc.train_batched(G, p, model, X, opt, 10, batch_size=N, shuffle=False)
    assert e.value.nonfinite == "gradient"
    ref, q = sc.SGD(**DIVERGING), p0.copy()
    hist = sc.train_batched(G, q, model, X, ref, 3, batch_size=N, shuffle=False)
    assert opt.t == ref.t == 3
    np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(opt.state, ref.state)
    np.testing.assert_array_equal(e.value.history, hist)
    assert e.value.batch_losses.shape == (0,)


def test_loss_nan_in_train_batched_names_epoch_and_minibatch(reg):
    model, X, Y, p, G = reg
    opt = sc.SGD(1e150)
    with pytest.raises(FloatingPointError, match=r"epoch 1, minibatch 1 \(0-based\)"):
        sc.train_batched(G, p, model, X, opt, 3, batch_size=2, shuffle=False)
    assert opt.t == 1
    assert np.isfinite(p).all()


def test_nan_in_p_detected_by_training(reg):
    model, X, Y, p, G = reg
    p[5] = np.nan
    with unchanged(p), pytest.raises(FloatingPointError, match=r"iteration 0"):
        sc.train_unbatched(G, p, model, X, sc.Adam(), 3)


# --------------------------------------------------------------------------------------
# LogitCrossEntropyLoss labels ('clf' chain: 6 inputs, 3 classes)

BAD_LABELS = {
    "too_big": (np.array([0, 1, 3, 2, 0]), ValueError, r"labels must lie in \[0, 3\).*got range \[0, 3\]"),
    "negative": (np.array([0, -1, 2, 2, 0]), ValueError, r"labels must lie in \[0, 3\).*\[-1, 2\]"),
    "float": (np.array([0.0, 1.0, 2.0, 1.0, 0.0]), TypeError, r"labels must be integers.*float64"),
    "bool": (np.array([True, False, True, True, False]), TypeError, r"labels must be integers"),
    "short": (np.array([0, 1, 2, 1]), ValueError, r"labels must have shape \(5,\), got \(4,\)"),
    "2d": (np.array([[0], [1], [2], [1], [0]]), ValueError, r"labels must have shape \(5,\)"),
}


@pytest.mark.parametrize("call", MODEL_CALLS)
@pytest.mark.parametrize("bad", list(BAD_LABELS))
def test_bad_labels(bad, call):
    labels, exc, match = BAD_LABELS[bad]
    X, _ = make_data("clf", N, seed=1)
    model = make_model("clf", labels, "logitce")
    p = random_params(model.chain, seed=1)
    G = sc.alloc_threaded_grad(model.chain, n_threads=1, dtype=np.float64)
    _rejects(call, model, X, p, G, exc, match, extra=(labels,))


def test_good_labels_any_int_dtype():
    X, _ = make_data("clf", N, seed=1)
    labels = np.array([0, 1, 2, 1, 0])
    p = random_params(get_chain("clf"), seed=1)
    ref = make_model("clf", labels, "logitce")(X, p)
    for dt in (np.int32, np.uint8, np.int64):
        assert_close(make_model("clf", labels.astype(dt), "logitce")(X, p), ref, np.float64)


# --------------------------------------------------------------------------------------
# layers and chains

def test_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'tanhh'.*'tanh'"):
        sc.TurboDense(3, "tanhh")
    with pytest.raises(TypeError, match=r"activation must be a name"):
        sc.TurboDense(3, 3)


def test_activation_name_and_code_must_match():
    with pytest.raises(ValueError, match=r"Activation\('tanh', 2\): name and code do not match; "
                       r"valid \(name, code\) pairs are \('identity', 0\), \('tanh', 1\), \('relu', 2\)"):
        sc.Activation("tanh", 2)
    with pytest.raises(ValueError, match=r"Activation\('tanhh', 1\)"):
        sc.Activation("tanhh", 1)
    with pytest.raises(TypeError, match=r"code must be an int, got bool"):
        sc.Activation("tanh", True)
    with pytest.raises(TypeError, match=r"name must be a str"):
        sc.Activation(1, 1)
    for name in sc.available_activations():  # the built-ins stay constructible
        act = sc.get_activation(name)
        assert sc.Activation(name, act.code) == act


@pytest.mark.parametrize("out", [0, -2, 2.5, True, "4", None])
def test_bad_dense_width(out):
    with pytest.raises(ValueError, match=r"TurboDense: out must be a positive int"):
        sc.TurboDense(out)


def test_bad_chain_construction():
    with pytest.raises(ValueError, match=r"at least one layer"):
        sc.SimpleChain(3)
    with pytest.raises(ValueError, match=r"input_shape must be positive"):
        sc.SimpleChain(0, sc.TurboDense(2))
    with pytest.raises(TypeError, match=r"layer 1 must be a smallchains layer"):
        sc.SimpleChain(3, sc.TurboDense(2), "tanh")
    with pytest.raises(ValueError, match=r"layer 0 .*TurboDense expects a 1-D feature input"):
        sc.SimpleChain((2, 3), sc.TurboDense(2))


# --------------------------------------------------------------------------------------
# training arguments

@pytest.mark.parametrize("call", TRAIN_CALLS)
def test_G_wrong_shape(reg, call):
    model, X, Y, p, G = reg
    n = model.chain.n_params
    for bad in (np.zeros((2, n + 1)), np.zeros(n), np.zeros((n, 2))):
        _rejects(call, model, X, p, bad, ValueError, rf"G must have shape \(n_threads, {n}\)")
    _rejects(call, model, X, p, [[0.0] * n], ValueError, r"G must have shape")


@pytest.mark.parametrize("call", TRAIN_CALLS)
def test_G_with_zero_rows_rejected(reg, call):
    """np.zeros((0, n)) has the right width but no thread row: nothing to sum."""
    model, X, Y, p, G = reg
    n = model.chain.n_params
    _rejects(call, model, X, p, np.zeros((0, n)), ValueError,
             rf"G must have shape \(n_threads, {n}\) with n_threads >= 1 .*got \(0, {n}\)")


@pytest.mark.parametrize("call", TRAIN_CALLS)
def test_G_wrong_dtype(reg, call):
    model, X, Y, p, G = reg
    _rejects(call, model, X, p, G.astype(np.float32), TypeError, r"G has dtype float32 but p has float64")
    _rejects(call, model, X, p.astype(np.float32), G, TypeError, r"G has dtype float64 but p has float32")


@pytest.mark.parametrize("call", TRAIN_CALLS)
def test_G_not_contiguous(reg, call):
    model, X, Y, p, G = reg
    Gf = np.asfortranarray(G)
    _rejects(call, model, X, p, Gf, ValueError, r"G must be writeable and C-contiguous")


def test_opt_not_an_optimizer(reg, torch):
    model, X, Y, p, G = reg
    tp = torch.nn.Parameter(torch.zeros(3))
    for bad in ("adam", sc.Adam, torch.optim.Adam([tp]), None):
        for fn in (lambda o: sc.train_unbatched(G, p, model, X, o, 2),
                   lambda o: sc.train_batched(G, p, model, X, o, 2)):
            with unchanged(p, G, X), pytest.raises(TypeError, match=r"opt must be a smallchains optimizer"):
                fn(bad)


def test_model_without_loss(reg):
    model, X, Y, p, G = reg
    chain = model.chain
    for fn in (lambda: sc.valgrad(chain, X, p), lambda: sc.valgrad_with_input(chain, X, p),
               lambda: sc.train_unbatched(G, p, chain, X, sc.Adam(), 2),
               lambda: sc.train_batched(G, p, chain, X, sc.Adam(), 2)):
        with unchanged(p, G, X), pytest.raises(TypeError, match=r"expected a model with a loss \(sc.add_loss"):
            fn()
    with pytest.raises(TypeError, match=r"add_loss expects a smallchains Loss"):
        sc.add_loss(chain, Y)
    with pytest.raises(TypeError, match=r"add_loss expects a SimpleChain"):
        sc.add_loss(model, sc.SquaredLoss(Y))


def test_bad_out_arrays(reg):
    model, X, Y, p, G = reg
    n = p.shape[0]
    for out in (np.zeros(n - 1), np.zeros(n, dtype=np.float32), np.zeros((1, n)),
                np.zeros(2 * n)[::2], "g"):
        for fn in (sc.valgrad, sc.valgrad_with_input):
            extra = (out,) if isinstance(out, np.ndarray) else ()
            with unchanged(p, X, *extra), pytest.raises(ValueError, match=r"out must be a writeable C-contiguous float64 array of shape \(292,\)"):
                fn(model, X, p, out=out)
    for x_out in (np.zeros((N, 2)), np.zeros((N, 3), dtype=np.float32), np.zeros(3 * N)):
        with unchanged(p, X, x_out), pytest.raises(ValueError, match=r"x_out must be a writeable C-contiguous float64 array of shape \(5, 3\)"):
            sc.valgrad_with_input(model, X, p, x_out=x_out)
    # a good x_out is filled and returned
    x_out = np.full(X.shape, np.nan)
    _, _, gx = sc.valgrad_with_input(model, X, p, x_out=x_out)
    assert gx is x_out and np.isfinite(x_out).all()


def test_bad_counts(reg):
    model, X, Y, p, G = reg
    with unchanged(p, G), pytest.raises(ValueError, match=r"iters must be >= 0, got -1"):
        sc.train_unbatched(G, p, model, X, sc.Adam(), -1)
    with unchanged(p, G), pytest.raises(ValueError, match=r"epochs must be >= 0, got -1"):
        sc.train_batched(G, p, model, X, sc.Adam(), -1)
    with unchanged(p, G), pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0"):
        sc.train_batched(G, p, model, X, sc.Adam(), 1, batch_size=0)
    with pytest.raises(ValueError, match=r"n_threads must be >= 1"):
        sc.alloc_threaded_grad(model.chain, n_threads=0)
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64"):
        sc.alloc_threaded_grad(model.chain, dtype=np.int32)
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64"):
        sc.init_params(model.chain, seed=0, dtype=np.float16)


@pytest.mark.parametrize("bad", [3.5, 3.0, np.float64(3.0), True, np.True_, "3"], ids=repr)
def test_non_integer_counts_rejected(reg, bad):
    """No silent int() truncation: floats (even 3.0), bools and strings are TypeErrors."""
    model, X, Y, p, G = reg
    name = type(bad).__name__
    for call, what in ((lambda o: sc.train_unbatched(G, p, model, X, o, bad), "iters"),
                       (lambda o: sc.train_batched(G, p, model, X, o, bad), "epochs"),
                       (lambda o: sc.train_batched(G, p, model, X, o, 1, batch_size=bad), "batch_size"),
                       (lambda o: sc.train_unbatched(G, p, model, X, o, 2, report_every=bad,
                                                     callback=lambda *a: None), "report_every")):
        opt = sc.Adam(1e-2)
        with unchanged(p, G, X), pytest.raises(TypeError, match=rf"{what} must be an int, got {name}"):
            call(opt)
        assert opt.t == 0 and opt.state is None
    with pytest.raises(TypeError, match=rf"n_threads must be an int, got {name}"):
        sc.alloc_threaded_grad(model.chain, n_threads=bad)


def test_numpy_integer_counts_accepted(reg):
    model, X, Y, p, G = reg
    ref = p.copy()
    h = sc.train_unbatched(G, ref, model, X, sc.Adam(1e-2), 3)
    hb = sc.train_batched(G, ref, model, X, sc.Adam(1e-2), 2, batch_size=2, seed=0)
    for i in (np.int64(3), np.int32(3), np.uint8(3)):
        q = p.copy()
        np.testing.assert_array_equal(sc.train_unbatched(G, q, model, X, sc.Adam(1e-2), i), h)
        j, b = type(i)(2), type(i)(2)
        np.testing.assert_array_equal(sc.train_batched(G, q, model, X, sc.Adam(1e-2), j, batch_size=b, seed=0), hb)
        np.testing.assert_array_equal(q, ref)
    assert sc.alloc_threaded_grad(model.chain, n_threads=np.int64(3)).shape == (3, model.chain.n_params)


NAN, INF = float("nan"), float("inf")
BAD_HYPER = {
    "adam_lr_nan": (lambda: sc.Adam(NAN), ValueError, r"Adam: lr must be > 0 and finite, got nan"),
    "adam_lr_inf": (lambda: sc.Adam(INF), ValueError, r"Adam: lr must be > 0 and finite, got inf"),
    "adam_lr_str": (lambda: sc.Adam("0.1"), TypeError, r"Adam: lr must be a real number, got str"),
    "adam_beta1_neg": (lambda: sc.Adam(1e-3, betas=(-0.1, 0.9)), ValueError,
                       r"Adam: betas must lie in \[0, 1\), got betas\[0\] = -0.1"),
    "adam_beta2_nan": (lambda: sc.Adam(1e-3, betas=(0.9, NAN)), ValueError,
                       r"Adam: betas must lie in \[0, 1\), got betas\[1\] = nan"),
    "adam_betas_scalar": (lambda: sc.Adam(1e-3, betas=0.9), TypeError, r"Adam: betas must be a pair"),
    "adam_betas_three": (lambda: sc.Adam(1e-3, betas=(0.9, 0.9, 0.9)), TypeError, r"Adam: betas must be a pair"),
    "adam_eps_zero": (lambda: sc.Adam(1e-3, eps=0.0), ValueError, r"Adam: eps must be > 0 and finite, got 0.0"),
    "adam_eps_neg": (lambda: sc.Adam(1e-3, eps=-1e-8), ValueError, r"Adam: eps must be > 0"),
    "adam_eps_nan": (lambda: sc.Adam(1e-3, eps=NAN), ValueError, r"Adam: eps must be > 0"),
    "sgd_lr_nan": (lambda: sc.SGD(NAN), ValueError, r"SGD: lr must be > 0 and finite, got nan"),
    "sgd_lr_bool": (lambda: sc.SGD(True), TypeError, r"SGD: lr must be a real number, got bool"),
    "sgd_momentum_neg": (lambda: sc.SGD(0.1, momentum=-0.5), ValueError,
                         r"SGD: momentum must be >= 0 and finite, got -0.5"),
    "sgd_momentum_nan": (lambda: sc.SGD(0.1, momentum=NAN), ValueError, r"SGD: momentum must be >= 0"),
    "sgd_momentum_inf": (lambda: sc.SGD(0.1, momentum=INF), ValueError, r"SGD: momentum must be >= 0"),
    "rmsprop_lr_nan": (lambda: sc.RMSProp(NAN), ValueError, r"RMSProp: lr must be > 0 and finite"),
    "rmsprop_alpha_one": (lambda: sc.RMSProp(1e-2, alpha=1.0), ValueError,
                          r"RMSProp: alpha must be in \[0, 1\), got 1.0"),
    "rmsprop_alpha_neg": (lambda: sc.RMSProp(1e-2, alpha=-0.1), ValueError, r"RMSProp: alpha must be in \[0, 1\)"),
    "rmsprop_alpha_nan": (lambda: sc.RMSProp(1e-2, alpha=NAN), ValueError, r"RMSProp: alpha must be in \[0, 1\)"),
    "rmsprop_eps_zero": (lambda: sc.RMSProp(1e-2, eps=0.0), ValueError, r"RMSProp: eps must be > 0 and finite"),
    "rmsprop_eps_inf": (lambda: sc.RMSProp(1e-2, eps=INF), ValueError, r"RMSProp: eps must be > 0 and finite"),
}


@pytest.mark.parametrize("bad", list(BAD_HYPER))
def test_bad_optimizer_hyperparameters(bad):
    make, exc, match = BAD_HYPER[bad]
    with pytest.raises(exc, match=match):
        make()


def test_hyperparameters_checked_again_when_training(reg):
    """A value assigned after construction is caught before anything is touched."""
    model, X, Y, p, G = reg
    for opt, attr, value in ((sc.Adam(), "lr", NAN), (sc.SGD(), "momentum", -1.0),
                             (sc.RMSProp(), "alpha", 2.0)):
        setattr(opt, attr, value)
        with unchanged(p, G), pytest.raises(ValueError, match=rf"{attr} must be"):
            sc.train_unbatched(G, p, model, X, opt, 2)
        assert opt.t == 0 and opt.state is None
        with unchanged(p), pytest.raises(ValueError, match=rf"{attr} must be"):
            opt.step(p, np.ones_like(p))


def test_good_optimizer_hyperparameters_accepted():
    a = sc.Adam(np.float32(1e-3), betas=np.array([0.0, 0.5]), eps=1)
    assert a.lr == np.float32(1e-3) and a.betas == (0.0, 0.5) and a.eps == 1.0
    assert type(a.lr) is float
    s = sc.SGD(1, momentum=np.float64(0.9))
    assert (s.lr, s.momentum) == (1.0, 0.9)
    r = sc.RMSProp(alpha=0, eps=np.float32(1e-6))
    assert r.alpha == 0.0


def test_bad_optimizer_settings_and_state(reg):
    model, X, Y, p, G = reg
    for make in (lambda: sc.Adam(0.0), lambda: sc.Adam(-1e-3), lambda: sc.Adam(float("nan")),
                 lambda: sc.SGD(0.0), lambda: sc.RMSProp(-1.0)):
        with pytest.raises(ValueError, match=r"lr must be > 0"):
            make()
    with pytest.raises(ValueError, match=r"betas must lie in \[0, 1\)"):
        sc.Adam(1e-3, betas=(0.9, 1.0))
    opt = sc.Adam(1e-3)
    opt.step(p.copy(), np.ones_like(p))
    q = np.zeros(7)
    with unchanged(q), pytest.raises(ValueError, match=r"call opt.reset\(\)"):
        opt.step(q, np.ones_like(q))
    with unchanged(p, G), pytest.raises(ValueError, match=r"call opt.reset\(\)"):
        sc.train_unbatched(G.astype(np.float32), p.astype(np.float32), model, X, opt, 1)
    with pytest.raises(ValueError, match=r"p and g must be 1-D with equal shape and dtype"):
        sc.Adam().step(p.copy(), np.ones(3))


# --------------------------------------------------------------------------------------
# NaN / Inf in X found by the training kernels (train_batched skips its up-front scan)

KERNEL_CHECK_CHAINS = {
    # first layer's dW from the input rows (load_block_and_rows checks the rows it copies)
    "rows": lambda: sc.SimpleChain(512, sc.TurboDense(8, "relu"), sc.TurboDense(3)),
    # a narrow first layer (load_block, then a finite check of the block); relu after maxing NaN away
    "block": lambda: sc.SimpleChain(6, sc.TurboDense(5, "relu"), sc.TurboDense(3)),
    "conv": lambda: sc.SimpleChain((1, 6, 6), sc.Conv(2, 3, "relu"), sc.MaxPool(2), sc.Flatten(),
                                   sc.TurboDense(3)),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", list(KERNEL_CHECK_CHAINS))
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_X_found_by_the_training_kernels(kind, dtype, threads, value, monkeypatch):
    """train_batched finds a NaN or Inf in X in the gather of its minibatch (the up-front
    scan is disabled here, so only the kernels can find it), after earlier minibatches
    were applied, and undoes the run: the same ValueError as the scan's, with p, G, the
    optimizer's state and step count as before the call, for an optimizer that had state
    and for a fresh one."""
    import smallchains.train as sctrain
    chain = KERNEL_CHECK_CHAINS[kind]()
    assert sctrain._kernels_check_X(chain) and not chain._kernels(np.dtype(dtype))[1].reducing
    scans = []
    monkeypatch.setattr(sc._validate, "check_finite", lambda X2, name="X": scans.append(name))
    rng = np.random.default_rng(0)
    n = 97
    X = rng.standard_normal((n,) + chain.input_shape).astype(dtype)
    y = rng.integers(0, 3, n)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    p = sc.init_params(chain, seed=1, dtype=dtype)
    G = sc.alloc_threaded_grad(chain, n_threads=threads, dtype=dtype)
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        used = sc.Adam(1e-2)
        sc.train_batched(G, p, model, X, used, 1, batch_size=10, seed=3)  # has state now
        # the bad sample: in the last minibatches of the shuffled epoch, after others
        order = np.random.default_rng(3).permutation(n)
        bad = int(order[-3])
        Xb = X.copy()
        Xb.reshape(n, -1)[bad, -1] = value
        for opt in (used, sc.Adam(1e-2)):
            t, st = opt.t, None if opt.state is None else opt.state.copy()
            with unchanged(Xb, p, G), pytest.raises(ValueError, match=rf"NaN or Inf \(first at sample {bad}\)"):
                sc.train_batched(G, p, model, Xb, opt, 1, batch_size=10, seed=3)
            assert opt.t == t
            assert (opt.state is None) if st is None else np.array_equal(opt.state, st)
    finally:
        numba.set_num_threads(before)
    assert scans == []  # the kernels found it


def test_nonfinite_X_scanned_up_front_with_batch_statistics(monkeypatch):
    """Chains with BatchNorm (staged kernels) keep the up-front scan of X."""
    import smallchains.train as sctrain
    chain = sc.SimpleChain(6, sc.TurboDense(5), sc.BatchNorm(), sc.TurboDense(3))
    assert not sctrain._kernels_check_X(chain) and chain._kernels(np.dtype(np.float64))[1].reducing
    X = np.random.default_rng(0).standard_normal((40, 6))
    X[33, 2] = np.nan
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(np.arange(40) % 3))
    p, state = sc.init_params(chain, dtype=np.float64), sc.init_state(chain, dtype=np.float64)
    G = sc.alloc_threaded_grad(chain, n_threads=1, dtype=np.float64)
    opt = sc.Adam(1e-2)
    with unchanged(p, G, state), pytest.raises(ValueError, match=r"NaN or Inf \(first at sample 33\)"):
        sc.train_batched(G, p, model, X, opt, 1, batch_size=8, state=state, seed=0)
    assert opt.t == 0 and opt.state is None


def test_nonfinite_X_rejected_by_train_batched_without_epochs():
    """With no epochs to run, the kernels never see X: train_batched scans it up front."""
    chain = KERNEL_CHECK_CHAINS["block"]()
    X = np.random.default_rng(0).standard_normal((20, 6))
    X[7, 0] = np.inf
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(np.arange(20) % 3))
    p = sc.init_params(chain, dtype=np.float64)
    G = sc.alloc_threaded_grad(chain, n_threads=1, dtype=np.float64)
    opt = sc.Adam(1e-2)
    with unchanged(p, G), pytest.raises(ValueError, match=r"NaN or Inf \(first at sample 7\)"):
        sc.train_batched(G, p, model, X, opt, 0, batch_size=8)
    assert opt.t == 0 and opt.state is None


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_float64_X_for_float32_p_named_before_the_range_check(value):
    """float64 X for float32 p is scanned before its float32-range check (an Inf is not
    "beyond the float32 range", and a NaN must not hide a large finite value)."""
    chain = KERNEL_CHECK_CHAINS["block"]()
    X = np.random.default_rng(0).standard_normal((20, 6))
    X[2, 1] = 1e300
    X[7, 0] = value
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(np.arange(20) % 3))
    p = sc.init_params(chain)
    G = sc.alloc_threaded_grad(chain, n_threads=1)
    with unchanged(p, G), pytest.raises(ValueError, match=r"NaN or Inf \(first at sample 7\)"):
        sc.train_batched(G, p, model, X, sc.Adam(1e-2), 1, batch_size=8)


def test_nan_written_into_X_after_the_first_epoch_is_not_undone():
    """A NaN that appears in X during training (here a callback writes it after epoch 2)
    is found as a non-finite loss: the epochs before stay applied (FloatingPointError, as
    for any loss), not undone as a bad input would be."""
    chain = KERNEL_CHECK_CHAINS["block"]()
    X = np.random.default_rng(0).standard_normal((20, 6))
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(np.arange(20) % 3))
    p = sc.init_params(chain, dtype=np.float64)
    p0 = p.copy()
    G = sc.alloc_threaded_grad(chain, n_threads=1, dtype=np.float64)
    opt = sc.Adam(1e-2)

    def spoil(epoch, loss, p):
        if epoch == 2:
            X[5, 0] = np.nan

    with pytest.raises(FloatingPointError, match="in epoch 3"):
        sc.train_batched(G, p, model, X, opt, 4, batch_size=8, seed=0, callback=spoil)
    assert opt.t >= 6 and not np.array_equal(p, p0)  # 2 epochs of 3 steps applied
