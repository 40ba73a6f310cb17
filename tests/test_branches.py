"""Parallel / SkipConnection containers, the shape layers (Reshape, Permute, Slice),
Conv1D and the LSTNet model: gradients against float64 central finite differences, torch
autograd where torch has the same network, tuned against reference kernels, bad input."""

import numpy as np
import pytest

import smallchains as sc
from conftest import assert_close, central_fd, check_against_torch_twin, load_bench_module

D = sc.Dense
BRANCHY = {
    # a 3-way concat with an identity branch, a sum, and a skip connection, in one chain
    "concat3_sum_skip": lambda: sc.SimpleChain(
        (5,), sc.Parallel("concat", D(3, "tanh"), (D(4, "relu"), D(2)), ()), D(4, "tanh"),
        sc.Parallel("sum", D(3, "gelu"), (D(4, "relu"), D(3))),
        sc.SkipConnection((D(6, "tanh"), D(3))), D(2)),
    "skip_concat_nested": lambda: sc.SimpleChain(
        (3, 4), sc.SkipConnection(sc.Parallel("sum", sc.GRU(4, return_sequences=True),
                                              sc.TimeDistributed(D(4, "tanh"))), "concat"),
        sc.Flatten(), D(2)),
    "sequence_concat": lambda: sc.SimpleChain(
        (4, 3), sc.Parallel("concat", sc.GRU(3), (sc.Flatten(), D(2)), (sc.Slice(slice(-2, None), 1), D(1, "tanh"))), D(2)),
}


def _random_biases(chain, p, rng):
    for v in chain.param_views(p):
        for k in v:
            if k.endswith("b") or k.endswith("bias"):
                v[k][:] = 0.2 * rng.standard_normal(v[k].shape)
    return p


def _fd_check(chain, N=5, seed=0, training=False):
    rng = np.random.default_rng(seed)
    p = _random_biases(chain, sc.init_params(chain, seed=seed, dtype=np.float64), rng)
    X = rng.standard_normal((N,) + chain.input_shape)
    Y = rng.standard_normal((N,) + chain.output_shape)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    kw = dict(training=training, seed=7)
    _, gp, gx = sc.valgrad_with_input(model, X, p, **kw)
    assert_close(gp, central_fd(lambda q: model(X, q, **kw), p), "fd")
    assert_close(gx, central_fd(lambda x: model(x, p, **kw), X), "fd")
    return p, X, Y, gp, gx


@pytest.mark.parametrize("name", sorted(BRANCHY))
def test_branches_match_finite_differences_and_reference(name):
    chain = BRANCHY[name]()
    p, X, Y, gp, gx = _fd_check(chain)
    if name not in ("concat3", "skip_concat_nested"):  # the reference: a second compile
        return
    ref = sc.SimpleChain(chain.input_shape, *chain.layers, kernels="reference")
    _, gp_r, gx_r = sc.valgrad_with_input(sc.add_loss(ref, sc.SquaredLoss(Y)), X, p)
    assert_close(gp_r, gp, np.float64)
    assert_close(gx_r, gx, np.float64)
    assert_close(ref(X, p), chain(X, p), np.float64)


def test_parallel_values_and_names():
    """Concat stacks the branch outputs in order, sum adds them; the identity branch
    passes the input; param_views names "<branch>.<layer>.<name>"."""
    a, b = D(3, "tanh"), D(2)
    chain = sc.SimpleChain((4,), sc.Parallel("concat", a, (b,), ()))
    p = sc.init_params(chain, seed=1, dtype=np.float64)
    (v,) = chain.param_views(p)
    assert list(v) == ["0.0.W", "0.0.b", "1.0.W", "1.0.b"]
    X = np.random.default_rng(0).standard_normal((6, 4))
    ya = np.tanh(X @ v["0.0.W"].T + v["0.0.b"])
    yb = X @ v["1.0.W"].T + v["1.0.b"]
    assert_close(chain(X, p), np.concatenate([ya, yb, X], axis=1), np.float64)
    skip = sc.SimpleChain((4,), sc.SkipConnection((D(4, "tanh"),)))
    q = sc.init_params(skip, seed=2, dtype=np.float64)
    (w,) = skip.param_views(q)
    assert list(w) == ["0.W", "0.b"]
    assert_close(skip(X, q), np.tanh(X @ w["0.W"].T + w["0.b"]) + X, np.float64)
    assert repr(skip.layers[0]) == "SkipConnection(TurboDense(4, 'tanh'), 'sum')"


def test_dropout_inside_branches():
    """Two Dropouts in two branches draw different masks (their own counters); training
    mode gradients equal finite differences at a fixed seed; inference is the identity."""
    chain = sc.SimpleChain((6,), sc.Parallel("concat", (D(8), sc.Dropout(0.5)), (D(8), sc.Dropout(0.5))))
    p = sc.init_params(chain, seed=0, dtype=np.float64)
    (v,) = chain.param_views(p)
    v["1.0.W"][:] = v["0.0.W"]  # identical branches: only the masks differ
    X = np.random.default_rng(1).standard_normal((9, 6))
    y = chain(X, p, training=True, seed=3)
    assert not np.array_equal(y[:, :8] == 0, y[:, 8:] == 0)
    assert_close(chain(X, p), np.concatenate([X @ v["0.0.W"].T] * 2, axis=1), np.float64)
    _fd_check(sc.SimpleChain((6,), sc.Parallel("sum", (D(5, "tanh"), sc.Dropout(0.3)), D(5))),
              training=True)


def test_shape_layers_match_numpy():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((7, 3, 4, 5))
    cases = [(sc.Permute((2, 0, 1)), lambda x: x.transpose(0, 3, 1, 2)),
             (sc.Slice(slice(1, None), slice(None, None, -2), 3), lambda x: x[:, 1:, ::-2, 3]),
             (sc.Slice(0), lambda x: x[:, 0]),
             (sc.Reshape((12, -1)), lambda x: x.reshape(7, 12, 5))]
    for layer, ref in cases:
        chain = sc.SimpleChain((3, 4, 5), layer)
        assert chain.output_shape == ref(X).shape[1:], layer
        assert_close(chain(X, np.zeros(0)), ref(X), np.float64, err_msg=repr(layer))
    # gradients through them (Slice leaves zero gradient outside)
    _fd_check(sc.SimpleChain((3, 4, 5), sc.Slice(slice(0, 2), 1), sc.Permute((1, 0)), sc.Flatten(), D(2, "tanh")))


#: Conv1D layers in sequence: kernel widths 2, 4, 3 (T 8 -> 7 -> 4 -> 2), with and
#: without bias, relu / gelu / identity
CONV1D_LAYERS = [sc.Conv1D(3, 2, "relu"), sc.Conv1D(5, 4, "gelu", bias=False), sc.Conv1D(2, 3)]


@pytest.mark.parametrize("dtype", [np.float64])  # each window is the dense layer's code, tested in float32 too
def test_conv1d_matches_torch(torch, dtype):
    """Conv1D layers (after a TimeDistributed Dense, so dL/dx goes through the overlapping
    windows) against torch.nn.functional.conv1d on the transposed sequence."""
    T, N = 8, 11
    chain = sc.SimpleChain((T, 3), sc.TimeDistributed(D(4, "tanh")), *CONV1D_LAYERS, sc.Flatten())
    rng = np.random.default_rng(0)
    p = _random_biases(chain, sc.init_params(chain, seed=0, dtype=np.float64), rng).astype(dtype)
    X = rng.standard_normal((N, T, 3)).astype(dtype)
    Y = rng.standard_normal((N,) + chain.output_shape).astype(dtype)
    _, gp, gx = sc.valgrad_with_input(sc.add_loss(chain, sc.SquaredLoss(Y)), X, p)
    views = chain.param_views(p)
    t = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)  # noqa: E731
    params = [[t(v[k]) for k in v] for v in views[:-1]]
    xt = t(X)
    W1, b1 = params[0]
    h = torch.tanh(xt @ W1.T + b1)                                  # (N, T, F)
    acts = {"relu": torch.relu, "identity": lambda z: z,
            "gelu": lambda z: torch.nn.functional.gelu(z, approximate="tanh")}
    for conv, ps in zip(CONV1D_LAYERS, params[1:]):
        W, b = ps[0], (ps[1] if len(ps) > 1 else None)
        h = acts[conv.activation.name](
            torch.nn.functional.conv1d(h.transpose(1, 2), W.permute(0, 2, 1), b)).transpose(1, 2)
    loss = ((h.reshape(N, -1) - torch.from_numpy(Y.astype(np.float64))) ** 2).sum() / N
    loss.backward()
    gp_t = np.concatenate([a.grad.numpy().ravel() for ps in params for a in ps])
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    assert_close(chain(X, p), h.detach().numpy().reshape(N, -1), dtype, **tol)
    assert_close(gp, gp_t, dtype, **tol)
    assert_close(gx, xt.grad.numpy(), dtype, **tol)


@pytest.mark.parametrize("dtype", [np.float64])
def test_lstnet_matches_torch_twin(torch, dtype):
    """smallchains.models.lstnet and bench/torch_models.LSTNet at the same parameters:
    outputs, loss, dL/dp, dL/dx; window 7 so the skip branch crops a step. (float64:
    exact to 1e-10; its layers are compared in float32 in test_recurrent.py and
    test_conv1d_matches_torch, and the whole model in bench/sequence_models.py.)"""
    from smallchains.models import lstnet
    chain = lstnet(5, 7, skip=3, highway=3)
    rng = np.random.default_rng(0)
    p = _random_biases(chain, sc.init_params(chain, seed=0, dtype=np.float64), rng).astype(dtype)
    X = rng.standard_normal((37, 7, 5)).astype(dtype)
    Y = rng.standard_normal((37, 1)).astype(dtype)
    check_against_torch_twin(torch, chain, load_bench_module("torch_models.py").LSTNet, p, X, Y, dtype,
                             n_series=5, window=7, skip=3, highway=3)


def test_branch_bad_input():
    with pytest.raises(ValueError, match=r"concat.*branch 0: \(3,\), branch 1: \(2, 2\)"):
        sc.SimpleChain((4,), sc.Parallel("concat", D(3), (D(4), sc.Reshape((2, 2)))))
    with pytest.raises(ValueError, match=r"'sum'.*branch 0: \(3,\), branch 1: \(4,\)"):
        sc.SimpleChain((4,), sc.Parallel("sum", D(3), ()))
    with pytest.raises(ValueError, match=r"branch 1, layer 0 \(GRU\(2\)\) with input shape \(4,\)"):
        sc.SimpleChain((4,), sc.Parallel("concat", D(3), sc.GRU(2)))
    with pytest.raises(ValueError, match="connection must be one of"):
        sc.Parallel("cat", D(3))
    with pytest.raises(ValueError, match="at least one branch"):
        sc.Parallel("sum")
    with pytest.raises(TypeError, match="batch statistics or state"):
        sc.SkipConnection((D(3), sc.BatchNorm()))
    with pytest.raises(TypeError, match="branch 0, layer 1 must be a smallchains layer"):
        sc.Parallel("sum", (D(3), "relu"))
    with pytest.raises(ValueError, match="not a permutation"):
        sc.SimpleChain((3, 4), sc.Permute((0, 0)))
    with pytest.raises(ValueError, match="empty slice"):
        sc.SimpleChain((3, 4), sc.Slice(slice(5, None)))
    with pytest.raises(ValueError, match="out of range"):
        sc.SimpleChain((3, 4), sc.Slice(3))
    with pytest.raises(ValueError, match="cannot reshape"):
        sc.SimpleChain((3, 4), sc.Reshape((5, -1)))
    with pytest.raises(ValueError, match="T >= kernel_size 4"):
        sc.SimpleChain((3, 4), sc.Conv1D(2, 4))
    with pytest.raises(ValueError, match="block_size must be"):
        sc.SimpleChain(3, D(2), block_size=24)
    from smallchains.models import lstnet
    with pytest.raises(ValueError, match="skip must be in 1..8"):
        lstnet(20, 10, skip=9)
