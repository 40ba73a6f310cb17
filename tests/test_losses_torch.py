"""MSELoss and BinaryLogitCrossEntropyLoss: loss, dL/dp and dL/dx against torch's
nn.MSELoss() and nn.BCEWithLogitsLoss() (autograd, float64) and float64 central finite
differences, with a partial block; float32 to rounding; bad targets refused."""

from __future__ import annotations

import numpy as np
import pytest

import smallchains as sc
from conftest import assert_close, central_fd, get_chain, make_data, random_params

LOSSES = {"mse": (sc.MSELoss, "MSELoss"), "bce": (sc.BinaryLogitCrossEntropyLoss, "BCEWithLogitsLoss")}


def _targets(name, n, rng):
    if name == "bce":  # hard labels and soft targets
        y = (rng.random((n, 4)) < 0.5).astype(float)
        y[::3] = rng.random((len(y[::3]), 4))
        return y
    return rng.standard_normal((n, 4))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_torch(torch, name, dtype):
    chain = get_chain("deep")  # 3 -> ... -> 4 outputs
    rng = np.random.default_rng(1)
    n = 37  # a partial block
    X, _ = make_data("deep", n, seed=1)
    Y = _targets(name, n, rng)
    cls, tname = LOSSES[name]
    model = sc.add_loss(chain, cls(Y))
    p = random_params(chain, seed=2, dtype=dtype)
    loss, gp, gx = sc.valgrad_with_input(model, X.astype(dtype), p)
    from conftest import torch_model, torch_flat
    net, linears = torch_model(torch, chain, p.astype(np.float64))
    xt = torch.from_numpy(X).requires_grad_()
    L = getattr(torch.nn, tname)()(net(xt), torch.from_numpy(Y))
    L.backward()
    tol = {} if dtype == np.float64 else dict(rtol=1e-4, atol=1e-6)
    assert_close(loss, L.item(), dtype, **tol)
    assert_close(gp, torch_flat(linears, grad=True), dtype, **tol)
    assert_close(gx, xt.grad.numpy(), dtype, **tol)
    assert_close(model(X.astype(dtype), p), L.item(), dtype, **tol)
    if dtype == np.float64:
        assert_close(gp, central_fd(lambda q: model(X, q), p), "fd")


def test_bce_targets_must_be_probabilities():
    chain = get_chain("deep")
    model = sc.add_loss(chain, sc.BinaryLogitCrossEntropyLoss(np.full((5, 4), 1.5)))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        sc.valgrad(model, np.zeros((5, 3)), sc.init_params(chain))
