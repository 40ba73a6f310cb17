"""User losses (CustomLoss), HuberLoss and per-sample weights: loss, dL/dp and dL/dx
against torch autograd (float64) and float64 central finite differences, with a partial
block; float32 to rounding; training with them; and the errors a user meets first."""

from __future__ import annotations

import pickle

import numba
import numpy as np
import pytest

import smallchains as sc
from conftest import (assert_close, central_fd, get_chain, make_data, random_params, torch_flat,
                      torch_model)

TAU = 0.3


@numba.njit
def pinball(yhat, y, grad):
    """Quantile (pinball) loss at TAU, summed over outputs: not in the library."""
    tau = yhat.dtype.type(TAU)
    one = yhat.dtype.type(1.0)
    total = yhat.dtype.type(0.0)
    for j in range(yhat.shape[0]):
        d = y[j] - yhat[j]
        if d >= 0:
            total += tau * d
            grad[j] = -tau
        else:
            total += (tau - one) * d
            grad[j] = one - tau
    return total


@numba.njit
def squared(yhat, y, grad):
    total = yhat.dtype.type(0.0)
    for j in range(yhat.shape[0]):
        d = yhat[j] - y[j]
        total += d * d
        grad[j] = 2 * d
    return total


def _torch_pinball(torch, yh, y):
    d = y - yh
    return torch.where(d >= 0, TAU * d, (TAU - 1) * d).sum(1)


def _cases(torch, Y, labels, w):
    F = torch.nn.functional
    tw = torch.from_numpy(w)
    return {  # name -> (loss, torch loss of (yhat, y))
        "pinball": (sc.CustomLoss(pinball, Y), lambda yh, y: _torch_pinball(torch, yh, y).mean()),
        "pinball_weighted": (sc.CustomLoss(pinball, Y, weights=w),
                             lambda yh, y: (tw * _torch_pinball(torch, yh, y)).mean()),
        "huber": (sc.HuberLoss(Y, delta=0.7), lambda yh, y: torch.nn.HuberLoss(delta=0.7)(yh, y)),
        "huber_weighted": (sc.HuberLoss(Y, delta=0.7, weights=w), lambda yh, y: (
            tw * torch.nn.HuberLoss(delta=0.7, reduction="none")(yh, y).mean(1)).mean()),
        "squared_weighted": (sc.SquaredLoss(Y, weights=w),
                             lambda yh, y: (tw * ((yh - y) ** 2).sum(1)).mean()),
        "mse_weighted": (sc.MSELoss(Y, weights=w), lambda yh, y: (tw * ((yh - y) ** 2).mean(1)).mean()),
        "absolute_weighted": (sc.AbsoluteLoss(Y, weights=w),
                              lambda yh, y: (tw * (yh - y).abs().sum(1)).mean()),
        "bce_weighted": (sc.BinaryLogitCrossEntropyLoss(1 / (1 + np.exp(-Y)), weights=w),
                         lambda yh, y: (tw * F.binary_cross_entropy_with_logits(
                             yh, torch.sigmoid(y), reduction="none").mean(1)).mean()),
        "logitce_weighted": (sc.LogitCrossEntropyLoss(labels, weights=w), lambda yh, y: (
            tw * F.cross_entropy(yh, torch.from_numpy(labels), reduction="none")).mean()),
    }


CASES = ["pinball", "pinball_weighted", "huber", "huber_weighted", "squared_weighted",
         "mse_weighted", "absolute_weighted", "bce_weighted", "logitce_weighted"]
# every case in float64; float32 (the same generated code in another dtype, each case a
# kernel module of its own to compile) for one custom, one Huber and one label loss
F32_CASES = ["pinball_weighted", "huber", "logitce_weighted"]


@pytest.mark.parametrize("name, dtype", [(c, np.float64) for c in CASES]
                         + [(c, np.float32) for c in F32_CASES],
                         ids=[f"{c}-f64" for c in CASES] + [f"{c}-f32" for c in F32_CASES])
def test_loss_matches_torch(torch, name, dtype):
    chain = get_chain("deep")  # 3 -> ... -> 4 outputs
    n = 37  # a partial block
    X, _ = make_data("deep", n, seed=1)
    rng = np.random.default_rng(3)
    Y = rng.standard_normal((n, 4))
    labels = rng.integers(0, 4, n)
    w = rng.uniform(0.0, 2.0, n)
    w[5] = 0.0
    loss, ref = _cases(torch, Y, labels, w)[name]
    model = sc.add_loss(chain, loss)
    p = random_params(chain, seed=2, dtype=dtype)
    value, gp, gx = sc.valgrad_with_input(model, X.astype(dtype), p)
    net, linears = torch_model(torch, chain, p.astype(np.float64))
    xt = torch.from_numpy(X).requires_grad_()
    L = ref(net(xt), torch.from_numpy(Y))
    L.backward()
    tol = {} if dtype == np.float64 else dict(rtol=1e-4, atol=1e-6)
    assert_close(value, L.item(), dtype, **tol)
    assert_close(gp, torch_flat(linears, grad=True), dtype, **tol)
    assert_close(gx, xt.grad.numpy(), dtype, **tol)
    assert_close(model(X.astype(dtype), p), L.item(), dtype, **tol)
    if dtype == np.float64 and "absolute" not in name and "pinball" not in name:
        # (kinks: finite differences are only meaningful for the smooth losses)
        assert_close(gp, central_fd(lambda q: model(X, q), p), "fd")


def test_custom_loss_trains_like_the_builtin():
    """A CustomLoss that computes SquaredLoss trains along the built-in's path (float64:
    the per-sample path sums in another order, so to rounding)."""
    X, Y = make_data("deep", 50, seed=4)
    chain = get_chain("deep")
    runs = []
    for loss in (sc.SquaredLoss(Y), sc.CustomLoss(squared, Y)):
        p = sc.init_params(chain, seed=0, dtype=np.float64)
        model = sc.add_loss(chain, loss)
        h = sc.train_batched(sc.alloc_threaded_grad(chain, 2, np.float64), p, model, X,
                             sc.Adam(1e-2), 5, batch_size=16, seed=3)
        runs.append((p, np.asarray(h)))
    assert_close(runs[1][0], runs[0][0], np.float64, rtol=1e-9, atol=1e-12)
    assert_close(runs[1][1], runs[0][1], np.float64, rtol=1e-9, atol=1e-12)


def test_weights_of_ones_equal_unweighted():
    X, Y = make_data("deep", 33, seed=5)
    chain = get_chain("deep")
    p = random_params(chain, seed=1)
    a = sc.valgrad(sc.add_loss(chain, sc.SquaredLoss(Y)), X, p)
    b = sc.valgrad(sc.add_loss(chain, sc.SquaredLoss(Y, weights=np.ones(33))), X, p)
    assert_close(b[0], a[0], np.float64)
    assert_close(b[1], a[1], np.float64)


def test_custom_loss_pickles_and_keeps_hyperparameters():
    Y = np.zeros((4, 4))
    loss = sc.CustomLoss(pinball, Y, weights=np.ones(4))
    back = pickle.loads(pickle.dumps(loss))
    assert back.kernel_kind == loss.kernel_kind and back.fn is pinball
    h = sc.HuberLoss(Y, delta=0.25)
    other = h.with_targets(np.ones((2, 4)))
    assert other.delta == 0.25 and other.weights is None and other.kernel_kind == h.kernel_kind
    assert sc.HuberLoss(Y, delta=0.5).kernel_kind != h.kernel_kind


def _plain(yhat, y, grad):
    return 0.0


@numba.njit
def _two_args(yhat, y):
    return 0.0


@numba.njit
def _uncompilable(yhat, y, grad):
    return {"a": yhat}  # a dict of arrays is not a loss: numba types it, then the check fails


@numba.njit
def _untypable(yhat, y, grad):
    return yhat.no_such_attribute


@numba.njit
def _returns_array(yhat, y, grad):
    return yhat


def _check_error(fn, err, match, **kw):
    chain = get_chain("deep")
    X, Y = make_data("deep", 6)
    if fn is _plain or fn is _two_args:
        with pytest.raises(err, match=match):
            sc.CustomLoss(fn, Y, **kw)
        return
    model = sc.add_loss(chain, sc.CustomLoss(fn, Y, **kw))
    with pytest.raises(err, match=match):
        sc.valgrad(model, X, sc.init_params(chain))


@pytest.mark.parametrize("fn, err, match", [
    (_plain, TypeError, r"must be a numba @njit function"),
    (_two_args, TypeError, r"three positional arguments \(yhat, y, grad\)"),
    (_untypable, TypeError, r"numba could not compile _untypable\(yhat, y, grad\) for yhat, grad: "
                            r"float32\[4\] \(strided\)"),
    (_uncompilable, TypeError, r"must return the sample's loss as a real scalar"),
    (_returns_array, TypeError, r"must return the sample's loss as a real scalar, got ndarray"),
])
def test_bad_custom_loss_functions(fn, err, match):
    _check_error(fn, err, match)


def test_bad_targets_and_weights():
    chain = get_chain("deep")
    X, Y = make_data("deep", 6)
    p = sc.init_params(chain)
    with pytest.raises(ValueError, match=r"target rows must have 4 elements"):
        sc.valgrad(sc.add_loss(chain, sc.CustomLoss(pinball, Y[:, :3])), X, p)
    with pytest.raises(ValueError, match=r"target rows must have 3 elements \(target_width\)"):
        sc.valgrad(sc.add_loss(chain, sc.CustomLoss(pinball, Y, target_width=3)), X, p)
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0"):
        sc.SquaredLoss(Y, weights=-np.ones(6))
    with pytest.raises(ValueError, match=r"weights must have shape \(N,\)"):
        sc.SquaredLoss(Y, weights=np.ones((6, 1)))
    with pytest.raises(ValueError, match=r"has 5 weights but 6 samples"):
        sc.valgrad(sc.add_loss(chain, sc.SquaredLoss(Y, weights=np.ones(5))), X, p)
    with pytest.raises(ValueError, match=r"delta must be"):
        sc.HuberLoss(Y, delta=0.0)
    w = np.ones(6)
    sc.SquaredLoss(Y, weights=w).weights[0] = 5.0  # a copy: the caller's array is untouched
    assert w[0] == 1.0


def test_fit_many_with_custom_and_weighted_losses():
    """fit_many runs generated losses through the same kernels: bitwise train_unbatched."""
    X, Y = make_data("deep", 30, seed=6)
    chain = get_chain("deep")
    w = np.linspace(0.5, 1.5, 30)
    for loss in (sc.CustomLoss(pinball, Y, weights=w), sc.HuberLoss(Y)):
        model = sc.add_loss(chain, loss)
        res = sc.fit_many(model, X, 2, iters=4, n_threads=2)
        for seed, r in enumerate(res):
            p = sc.init_params(chain, seed=seed)
            h = sc.train_unbatched(sc.alloc_threaded_grad(chain, 1), p, model, X, sc.Adam(), 4)
            np.testing.assert_array_equal(r.p, p)
            np.testing.assert_array_equal(r.history, h)
