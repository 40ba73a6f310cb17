"""TurboDense chains: gradients (finite differences, torch autograd), forward pass
(numpy reference, float32 vs float64, single sample vs batch) and init_params."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smallchains as sc
from conftest import (ARCH_LOSS, ARCHS, TORCH_ACT, assert_close, central_fd, get_chain, make_data,
                      make_model, make_targets, np_activation, numpy_forward, random_params,
                      torch_flat, torch_loss, torch_model)

# (architecture, loss) pairs differentiated below: every architecture with its own loss,
# plus "deep" with the other two losses (so all three losses are checked on one chain).
GRAD_CASES = [(name, ARCH_LOSS[name]) for name in ARCHS] + [("deep", "absolute"), ("deep", "logitce")]
GRAD_IDS = [f"{a}-{l}" for a, l in GRAD_CASES]
N_GRAD = 7  # samples in gradient checks (small: finite differences loop over all entries)


def test_every_activation_is_covered():
    """The shared architectures (hence the gradient checks) use every activation."""
    used = {act for _, layers in ARCHS.values() for _, act, _ in layers}
    assert used == set(sc.available_activations())


def _case(name, loss, n=N_GRAD, seed=0):
    X, _ = make_data(name, n, seed=seed)
    rng = np.random.default_rng(seed + 7)
    if loss == ARCH_LOSS[name]:
        T = make_targets(name, n, rng)
    elif loss == "logitce":
        T = rng.integers(0, get_chain(name).output_shape[0], size=n)
    else:
        T = rng.standard_normal((n,) + get_chain(name).output_shape)
    model = make_model(name, T, loss)
    p = random_params(model.chain, seed=seed)
    return model, X, T, p


# --------------------------------------------------------------------------------------
# gradients against central finite differences (float64)

@pytest.mark.parametrize("name,loss", GRAD_CASES, ids=GRAD_IDS)
def test_valgrad_matches_finite_differences(name, loss):
    model, X, T, p = _case(name, loss)
    X0, p0 = X.copy(), p.copy()
    val, g, gx = sc.valgrad_with_input(model, X, p)
    assert g.shape == p.shape and g.dtype == np.float64
    assert gx.shape == X.shape and gx.dtype == np.float64
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(p, p0)

    assert_close(val, model(X, p), np.float64)
    fd_p = central_fd(lambda q: model(X, q), p)
    fd_x = central_fd(lambda x: model(x, p), X)
    assert np.abs(fd_p).max() > 1e-3 and np.abs(fd_x).max() > 1e-3  # non-trivial
    assert_close(g, fd_p, "fd", err_msg="dL/dp")
    assert_close(gx, fd_x, "fd", err_msg="dL/dx")
    # valgrad (no input gradient) agrees with valgrad_with_input, and fills out=
    out = np.full_like(p, np.nan)
    val2, g2 = sc.valgrad(model, X, p, out=out)
    assert g2 is out
    assert_close(val2, val, np.float64)
    assert_close(g2, g, np.float64)


# --------------------------------------------------------------------------------------
# gradients against torch autograd (float64)

def test_torch_activations_match_numpy_reference(torch):
    """Guards the reference: torch modules above == conftest.np_activation."""
    z = np.linspace(-6, 6, 97)
    for name, make in TORCH_ACT.items():
        got = make(torch.nn)(torch.from_numpy(z)).numpy()
        assert_close(got, np_activation(name, z), np.float64, err_msg=name)


@pytest.mark.parametrize("name,loss", GRAD_CASES, ids=GRAD_IDS)
def test_valgrad_matches_torch_autograd(torch, name, loss):
    model, X, T, p = _case(name, loss, n=23, seed=3)
    val, g, gx = sc.valgrad_with_input(model, X, p)

    net, linears = torch_model(torch, model.chain, p)
    xt = torch.from_numpy(X.copy()).requires_grad_(True)
    lt = torch_loss(torch, loss, net(xt), T)
    lt.backward()

    assert_close(val, lt.item(), np.float64, err_msg="loss")
    assert_close(gx, xt.grad.numpy(), np.float64, err_msg="dL/dx")
    for i, (lin, gv) in enumerate(zip(linears, model.chain.param_views(g))):
        assert_close(gv["W"], lin.weight.grad.numpy(), np.float64, err_msg=f"dL/dW layer {i}")
        if lin.bias is not None:
            assert_close(gv["b"], lin.bias.grad.numpy(), np.float64, err_msg=f"dL/db layer {i}")
        else:
            assert "b" not in gv
    # forward pass too
    with torch.no_grad():
        assert_close(model.chain(X, p), net(torch.from_numpy(X)).numpy(), np.float64)


# --------------------------------------------------------------------------------------
# forward pass

@pytest.mark.parametrize("name", list(ARCHS))
def test_float32_forward_matches_float64(name):
    chain = get_chain(name)
    X, _ = make_data(name, 300, seed=5)
    p64 = random_params(chain, seed=5)
    p32 = p64.astype(np.float32)
    X32 = X.astype(np.float32)
    y32 = chain(X32, p32)
    assert y32.dtype == np.float32
    # same (float32-rounded) inputs in float64
    y64 = chain(X32.astype(np.float64), p32.astype(np.float64))
    assert y64.dtype == np.float64
    assert_close(y32, y64, np.float32)
    # float64 X into a float32 chain is converted (same result)
    assert_close(chain(X32.astype(np.float64), p32), y32, np.float32, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_single_sample_matches_batch(dtype):
    chain = get_chain("deep")
    X, _ = make_data("deep", 11, seed=2)
    X = X.astype(dtype)
    p = random_params(chain, seed=2, dtype=dtype)
    Y = chain(X, p)
    assert Y.shape == (11,) + chain.output_shape
    for i in range(X.shape[0]):
        y = chain(X[i], p)
        assert y.shape == chain.output_shape and y.dtype == dtype
        assert_close(y, Y[i], dtype)
    assert_close(chain(X[3:4], p), Y[3:4], dtype)
    # a fresh array every call
    assert chain(X, p) is not Y


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(ARCHS)),
    n=st.one_of(st.integers(1, 20), st.integers(21, 700),
                st.sampled_from([1, 7, 8, 9, 143, 144, 145, 255, 256, 257, 513])),
    dtype=st.sampled_from([np.float64, np.float32]),
    scale=st.sampled_from([0.1, 1.0, 4.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_matches_numpy_reference(name, n, dtype, scale, seed):
    chain = get_chain(name)
    rng = np.random.default_rng(seed)
    X = (scale * rng.standard_normal((n,) + chain.input_shape)).astype(dtype)
    p = random_params(chain, seed=seed % 1000, dtype=dtype)
    Y = chain(X, p)
    assert Y.shape == (n,) + chain.output_shape and Y.dtype == dtype
    ref = numpy_forward(chain, X.astype(np.float64), p.astype(np.float64))
    if dtype == np.float32:
        assert_close(Y, ref, dtype, atol=2e-5 * max(1.0, np.abs(ref).max()))
    else:
        assert_close(Y, ref, dtype)


# --------------------------------------------------------------------------------------
# parameters

def test_param_views_layout_and_sharing():
    chain = get_chain("clf")
    p = np.arange(chain.n_params, dtype=np.float64)
    views = chain.param_views(p)
    off = 0
    n_in = chain.input_shape[0]
    for (out, _, bias), v in zip(ARCHS["clf"][1], views):
        assert v["W"].shape == (out, n_in)
        assert v["W"][0, 0] == off and v["W"][0, 1] == off + 1 and v["W"][1, 0] == off + n_in
        off += out * n_in
        if bias:
            assert v["b"].shape == (out,) and v["b"][0] == off
            off += out
        else:
            assert "b" not in v
        n_in = out
    assert off == chain.n_params == sc.numparam(chain)
    views[1]["W"][0, 0] = -1.0  # writing a view writes p (layer 1 starts after 6*9 + 9)
    assert p[6 * 9 + 9] == -1.0 and np.shares_memory(views[1]["W"], p)
    assert str(chain.n_params) in chain.summary()


def test_init_params_glorot_normal_wide_layers():
    chain = sc.SimpleChain(200, sc.TurboDense(400, "tanh"), sc.TurboDense(300))
    p = sc.init_params(chain, seed=0, dtype=np.float64)
    assert p.shape == (chain.n_params,) and p.dtype == np.float64
    for (fan_in, fan_out), v in zip([(200, 400), (400, 300)], chain.param_views(p)):
        W = v["W"]
        std = np.sqrt(2.0 / (fan_in + fan_out))
        n = W.size
        assert abs(W.mean()) < 5 * std / np.sqrt(n)
        assert abs(W.std() / std - 1) < 5 / np.sqrt(2 * n)  # sd of the std estimate
        # normal, not uniform: P(|w| < std) = 0.6827 (uniform with that std: 0.577)
        assert abs(np.mean(np.abs(W) < std) - 0.6827) < 0.01
        np.testing.assert_array_equal(v["b"], 0.0)


def test_init_params_default_dtype_seed_and_float32():
    chain = get_chain("deep")
    p = sc.init_params(chain, seed=42)
    assert p.dtype == np.float32 and p.shape == (chain.n_params,)
    np.testing.assert_array_equal(p, sc.init_params(chain, seed=42))
    assert not np.array_equal(p, sc.init_params(chain, seed=43))
    p64 = sc.init_params(chain, seed=42, dtype=np.float64)
    np.testing.assert_array_equal(p, p64.astype(np.float32))
    assert_close(p, p64, np.float32)
    # a model works too; an explicit rng gives the same stream as its seed
    model = sc.add_loss(chain, sc.SquaredLoss(np.zeros((1, 4))))
    np.testing.assert_array_equal(sc.init_params(model, seed=42), p)
    np.testing.assert_array_equal(sc.init_params(chain, rng=np.random.default_rng(42)), p)
    for v in chain.param_views(p):
        np.testing.assert_array_equal(v["b"], 0.0)
        assert np.all(v["W"] != 0)


# --------------------------------------------------------------------------------------
# regression: issue 13's reproduction (gelu / silu gradients wrong at widths that are not
# a multiple of 8: numba's dead-code elimination deleted the last store of the pullback
# step after inlining gelu_grad / silu_grad; see smallchains.compiler.linking.keep_alive)

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_gelu_silu_gradients_against_torch_every_width(torch, act, dtype):
    """One chain through every width (each layer's pullback is its own compiled step);
    each layer's gradient block is compared on its own scale."""
    n, widths = 20, (7, 8, 9, 16, 17, 25, 33)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 6))
    Y = rng.standard_normal((n, 2))
    chain = sc.SimpleChain(6, *[sc.TurboDense(w, act) for w in widths], sc.TurboDense(2))
    p = random_params(chain, seed=1, dtype=dtype)
    model = sc.add_loss(chain, sc.SquaredLoss(Y.astype(dtype)))
    loss, g = sc.valgrad(model, X.astype(dtype), p)
    net, linears = torch_model(torch, chain, p.astype(np.float64))
    L = torch_loss(torch, "squared", net(torch.from_numpy(X)), Y)
    L.backward()
    expected = torch_flat(linears, grad=True)
    tol = 1e-11 if dtype == np.float64 else 5e-5
    off = 0
    for k, views in enumerate(chain.param_views(g)):
        size = sum(v.size for v in views.values())
        got, exp = g[off:off + size], expected[off:off + size]
        err = np.abs(got - exp).max() / np.abs(exp).max()
        width = (widths + (2,))[k]
        assert err <= tol, f"{act} layer {k} (width {width}) {np.dtype(dtype).name}: relative gradient error {err:.3g}"
        off += size
    assert off == g.size
    assert abs(loss - L.item()) <= tol * max(1.0, abs(L.item()))
