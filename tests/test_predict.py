"""softmax / log_softmax / predict_proba against torch, and accuracy_and_loss from one
forward pass against torch's cross_entropy and the model's compiled loss."""

import numpy as np
import pytest

import smallchains as sc
from conftest import assert_close, get_chain, make_data, make_model, random_params, torch_model

# --------------------------------------------------------------------------------------
# softmax, log_softmax


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_and_log_softmax_match_torch(torch, dtype, axis):
    rng = np.random.default_rng(0)
    x = (5 * rng.standard_normal((4, 7, 3))).astype(dtype)
    s = sc.softmax(x, axis=axis)
    ls = sc.log_softmax(x, axis=axis)
    assert s.dtype == ls.dtype == dtype and s.shape == ls.shape == x.shape
    t = torch.from_numpy(x)
    assert_close(s, torch.softmax(t, dim=axis).numpy(), dtype)
    assert_close(ls, torch.log_softmax(t, dim=axis).numpy(), dtype)
    assert_close(s.sum(axis=axis), np.ones(np.delete(x.shape, axis % 3)), dtype)


def test_softmax_is_stable_for_huge_logits():
    x = np.array([[1e4, 1e4 - 1.0, -1e4], [-3e4, -3e4, -3e4]], dtype=np.float32)
    s = sc.softmax(x)
    assert np.isfinite(s).all()
    e = np.exp(np.array([0.0, -1.0]))
    assert_close(s[0], np.r_[e / e.sum(), 0.0], np.float32)
    assert_close(s[1], np.full(3, 1 / 3), np.float32)
    ls = sc.log_softmax(x)
    assert_close(ls[0, :2], np.log(e / e.sum()), np.float32)
    assert ls[0, 2] == pytest.approx(-2e4 - np.log(e.sum()), rel=1e-6)  # no -inf
    # the naive formula overflows: the test would catch an unshifted implementation
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(np.exp(x[0]) / np.exp(x[0]).sum()).all()


def test_softmax_keeps_other_float_dtypes_and_non_finite_rules():
    x16 = np.array([0.0, 1.0, 2.0], dtype=np.float16)
    s16 = sc.softmax(x16)
    assert s16.dtype == np.float16
    np.testing.assert_allclose(s16.astype(np.float64), np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum(),
                               rtol=2e-3)
    xl = np.array([1.0, 2.0], dtype=np.longdouble)
    assert sc.softmax(xl).dtype == np.longdouble
    s = sc.softmax(np.array([[0.0, -np.inf, 0.0], [np.nan, 0.0, 1.0]]))
    np.testing.assert_array_equal(s[0], [0.5, 0.0, 0.5])
    assert np.isnan(s[1]).all()
    x = np.array([1.0, 2.0, 3.0])
    sc.softmax(x)
    np.testing.assert_array_equal(x, [1.0, 2.0, 3.0])  # input untouched


@pytest.mark.parametrize("fn", [sc.softmax, sc.log_softmax])
def test_softmax_bad_input(fn):
    with pytest.raises(TypeError, match=r"logits must be a float array, got dtype int64; cast"):
        fn(np.arange(3))
    with pytest.raises(TypeError, match="float array"):
        fn(np.array([True, False]))
    with pytest.raises(TypeError, match="float array"):
        fn(np.ones(3, dtype=complex))
    with pytest.raises(ValueError, match="scalar"):
        fn(np.float64(1.0))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        fn(np.ones((2, 3)), axis=2)
    with pytest.raises(ValueError, match="length 0"):
        fn(np.ones((2, 0)))
    with pytest.raises(TypeError, match="axis must be an int"):
        fn(np.ones((2, 3)), axis=1.0)


# --------------------------------------------------------------------------------------
# predict_proba


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_predict_proba_matches_torch(torch, dtype):
    X, labels = make_data("clf", 53, seed=1)
    model = make_model("clf", labels)
    chain = model.chain
    p = random_params(chain, seed=2, dtype=dtype)
    P = sc.predict_proba(chain, X, p)
    assert P.shape == (53, 3) and P.dtype == dtype
    net, _ = torch_model(torch, chain, p.astype(np.float64))
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(X)), dim=1).numpy()
    assert_close(P, ref, dtype)
    assert_close(P.sum(axis=1), np.ones(53), dtype)
    # a model works like its chain; a single sample gives one row
    np.testing.assert_array_equal(sc.predict_proba(model, X, p), P)
    one = sc.predict_proba(chain, X[5], p)
    assert one.shape == (3,)
    assert_close(one, P[5], dtype)
    assert (P.argmax(axis=1) == chain(X, p).argmax(axis=1)).all()


def test_predict_proba_bad_input():
    p = random_params(get_chain("clf"), seed=0)
    with pytest.raises(TypeError, match="SimpleChain or a model"):
        sc.predict_proba(sc.TurboDense(3), np.zeros((2, 6)), p)
    conv = sc.SimpleChain((1, 5, 5), sc.Conv(2, 3))
    with pytest.raises(ValueError, match=r"1-D logits per sample, got output shape \(2, 3, 3\)"):
        sc.predict_proba(conv, np.zeros((2, 1, 5, 5)), np.zeros(conv.n_params))
    single = sc.SimpleChain(3, sc.TurboDense(1))
    with pytest.raises(ValueError, match="at least 2 classes"):
        sc.predict_proba(single, np.zeros((2, 3)), np.zeros(single.n_params))
    with pytest.raises(ValueError, match=r"X must have shape \(N, 6\)"):
        sc.predict_proba(get_chain("clf"), np.zeros((2, 5)), p)
    with pytest.raises(ValueError, match="NaN"):
        sc.predict_proba(get_chain("clf"), np.full((2, 6), np.nan), p)


# --------------------------------------------------------------------------------------
# accuracy_and_loss: one forward pass


def count_passes(monkeypatch):
    """Counts chain forward passes; the model's compiled loss must not run at all."""
    calls = []
    forward = sc.SimpleChain.__call__

    def counting(self, X, p, **kw):
        calls.append(X.shape[0])
        return forward(self, X, p, **kw)

    def no_loss(self, *a, **k):
        raise AssertionError("accuracy_and_loss evaluated the model's loss (a second pass)")

    monkeypatch.setattr(sc.SimpleChain, "__call__", counting)
    monkeypatch.setattr(sc.SimpleChainWithLoss, "__call__", no_loss)
    return calls


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_accuracy_and_loss_one_pass_matches_torch_and_compiled_loss(torch, dtype, monkeypatch):
    X, labels = make_data("clf", 211, seed=8)
    model = make_model("clf", labels)
    p = random_params(model.chain, seed=9, dtype=dtype)
    p *= 3  # confident logits: large log-softmax terms
    own_loss = model(X, p)  # the compiled LogitCrossEntropyLoss (before patching)
    other = (labels + 1) % 3
    own_other = model(X, p, other)
    logits = model.chain(X, p)
    net, _ = torch_model(torch, model.chain, p.astype(np.float64))
    with torch.no_grad():
        tl = net(torch.from_numpy(X))
        ref = torch.nn.functional.cross_entropy(tl, torch.from_numpy(labels)).item()
        ref_other = torch.nn.functional.cross_entropy(tl, torch.from_numpy(other)).item()
    calls = count_passes(monkeypatch)

    acc, loss = sc.accuracy_and_loss(model, X, p)
    assert calls == [211]  # exactly one forward pass over all samples
    assert type(acc) is float and type(loss) is float
    assert acc == np.count_nonzero(logits.argmax(axis=1) == labels) / 211
    assert 0.0 < acc < 1.0
    assert_close(loss, ref, dtype)
    assert_close(loss, own_loss, dtype)

    acc2, loss2 = sc.accuracy_and_loss(model, X, other, p)  # explicit labels win
    assert calls == [211, 211]
    assert acc2 == np.count_nonzero(logits.argmax(axis=1) == other) / 211
    assert_close(loss2, ref_other, dtype)
    assert_close(loss2, own_other, dtype)
    assert abs(loss2 - loss) > 0.1


def test_accuracy_and_loss_float32_is_computed_in_float32(monkeypatch):
    """The loss is evaluated in p's dtype like the compiled loss: with float32 logits of
    1e4 the result is the float32 one (float64 arithmetic on the same logits differs)."""
    X, labels = make_data("clf", 64, seed=2)
    model = make_model("clf", labels)
    p = random_params(model.chain, seed=3, dtype=np.float32)
    p *= np.float32(40.0)
    logits = model.chain(X, p)
    m = logits.max(axis=1, keepdims=True)
    ls32 = (logits - m) - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
    want = float(-ls32[np.arange(64), labels].sum(dtype=np.float32) * np.float32(1 / 64))
    l64 = logits.astype(np.float64)
    m64 = l64.max(axis=1, keepdims=True)
    ls64 = (l64 - m64) - np.log(np.exp(l64 - m64).sum(axis=1, keepdims=True))
    want64 = float(-ls64[np.arange(64), labels].mean())
    assert want64 != want  # so the comparison below tells the two apart
    _, loss = sc.accuracy_and_loss(model, X, p)
    assert loss == want
    assert_close(loss, model(X, p), np.float32, rtol=1e-5)


def test_accuracy_and_loss_validates_before_the_forward_pass(monkeypatch):
    X, labels = make_data("clf", 30, seed=0)
    model = make_model("clf", labels)
    p = random_params(model.chain, seed=0)
    calls = count_passes(monkeypatch)
    cases = [
        ((X, np.full(30, 3), p), ValueError, r"labels must lie in \[0, 3\)"),
        ((X, np.full(30, -1), p), ValueError, r"labels must lie in \[0, 3\)"),
        ((X, labels[:29], p), ValueError, r"labels must have shape \(30,\)"),
        ((X, labels.astype(float), p), TypeError, "labels must be integers"),
        ((X[0], labels[:1], p), ValueError, r"X must have shape \(N, 6\)"),
        ((X[:, :5], labels, p), ValueError, r"X must have shape \(N, 6\)"),
        ((X, labels, p[:-1]), ValueError, r"p must have shape"),
        ((X, labels, p.astype(np.float16)), TypeError, "float32 or float64"),
        ((X, labels, p, p), TypeError, "accuracy_and_loss"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            sc.accuracy_and_loss(model, *args)
    assert calls == []
    with pytest.raises(TypeError, match="model with a loss"):
        sc.accuracy_and_loss(model.chain, X, p)
    reg = make_model("deep", np.zeros((3,) + get_chain("deep").output_shape))
    with pytest.raises(TypeError, match="classification"):
        sc.accuracy_and_loss(reg, np.zeros((3, 3)), random_params(reg.chain))
    assert calls == []
