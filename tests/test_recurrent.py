"""GRU, LSTM and TimeDistributed: forward, dL/dp and dL/dx against torch autograd
(``torch.nn.GRU`` / ``LSTM`` with the same weights) and float64 central finite
differences; sequence shapes and bad input.

The cases cover T in {1, 2, 7, 16}, hidden sizes 1, 2, 5, 9 and 17, batch sizes 1, odd and
larger than one block (partial blocks), both ``return_sequences``, in float32 and float64.
"""

import numpy as np
import pytest

import smallchains as sc
from conftest import (assert_close, central_fd, check_against_torch_twin, load_bench_module,
                      torch_chain_model, torch_flat)

# (N, T, F, H, return_sequences)
CASES = [(5, 1, 3, 2, False), (37, 7, 4, 9, True), (1, 16, 2, 5, False), (3, 2, 1, 17, True),
         (40, 7, 3, 1, False)]
CELLS = {"gru": sc.GRU, "lstm": sc.LSTM}


def _data(chain, N, dtype, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N,) + chain.input_shape).astype(dtype)
    Y = rng.standard_normal((N,) + chain.output_shape).astype(dtype)
    return X, Y


def _torch_grads(torch, chain, p, X, Y):
    net, pmods = torch_chain_model(torch, chain, p)
    xt = torch.from_numpy(X.astype(np.float64)).requires_grad_()
    yhat = net(xt)
    loss = ((yhat - torch.from_numpy(Y.astype(np.float64))) ** 2).sum() / X.shape[0]
    loss.backward()
    return yhat.detach().numpy(), loss.item(), torch_flat(pmods, grad=True), xt.grad.numpy()


# each case in one dtype (every layout is a compile), case 1 in both
CASE_DTYPES = [(c, np.float64 if k % 2 == 0 else np.float32) for k, c in enumerate(CASES)] + [(CASES[1], np.float64)]


@pytest.mark.parametrize("case,dtype", CASE_DTYPES, ids=lambda c: (
    "N{}-T{}-F{}-H{}-{}".format(*c[:4], "seq" if c[4] else "last") if isinstance(c, tuple) else np.dtype(c).name))
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_cell_matches_torch(torch, cell, dtype, case):
    N, T, F, H, seq = case
    chain = sc.SimpleChain((T, F), CELLS[cell](H, return_sequences=seq))
    assert chain.output_shape == ((T, H) if seq else (H,))
    p = sc.init_params(chain, seed=3, dtype=dtype)
    X, Y = _data(chain, N, dtype)
    y = chain(X, p)
    loss, gp, gx = sc.valgrad_with_input(sc.add_loss(chain, sc.SquaredLoss(Y)), X, p)
    y_t, loss_t, gp_t, gx_t = _torch_grads(torch, chain, p, X, Y)
    # float32: reductions over T steps and N lanes, tanh to 5e-7
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6 * T)
    assert y.dtype == dtype and gp.dtype == dtype
    assert_close(y, y_t, dtype, **tol)
    assert_close(loss, loss_t, dtype, **tol)
    assert_close(gp, gp_t, dtype, **tol)
    assert_close(gx, gx_t, dtype, **tol)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_cell_matches_finite_differences(cell):
    """dL/dp and dL/dx of a GRU/LSTM -> TimeDistributed(Dense) -> Flatten chain against
    float64 central differences (no torch needed)."""
    chain = sc.SimpleChain((4, 2), CELLS[cell](3, return_sequences=True),
                           sc.TimeDistributed(sc.Dense(2, "tanh")), sc.Flatten())
    p = sc.init_params(chain, seed=5, dtype=np.float64)
    X, Y = _data(chain, 3, np.float64, seed=2)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    _, gp, gx = sc.valgrad_with_input(model, X, p)
    assert_close(gp, central_fd(lambda q: model(X, q), p), "fd")
    assert_close(gx, central_fd(lambda x: model(x, p), X), "fd")


@pytest.mark.parametrize("dtype", [np.float64])  # float32 LSTMs: test_cell_matches_torch
def test_stacked_lstm_time_distributed_matches_torch(torch, dtype):
    """Dense embedding at every step -> LSTM (sequences) -> GRU -> Dense: dL/dx flows
    through three sequence layers; tuned and reference kernels agree."""
    layers = (sc.TimeDistributed(sc.Dense(6, "relu")), sc.LSTM(5, return_sequences=True),
              sc.GRU(4), sc.Dense(3))
    chain = sc.SimpleChain((7, 3), *layers)
    p = sc.init_params(chain, seed=0, dtype=dtype)
    for v in chain.param_views(p):  # non-zero biases, so ReLU kinks move
        if "b" in v:
            v["b"][:] = 0.1
    X, Y = _data(chain, 19, dtype)
    y = chain(X, p)
    loss, gp, gx = sc.valgrad_with_input(sc.add_loss(chain, sc.SquaredLoss(Y)), X, p)
    y_t, loss_t, gp_t, gx_t = _torch_grads(torch, chain, p, X, Y)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=2e-5)
    for a, b in ((y, y_t), (loss, loss_t), (gp, gp_t), (gx, gx_t)):
        assert_close(a, b, dtype, **tol)
    ref = sc.SimpleChain((7, 3), *layers, kernels="reference")
    _, gp_r, gx_r = sc.valgrad_with_input(sc.add_loss(ref, sc.SquaredLoss(Y)), X, p)
    assert_close(gp_r, gp, dtype, **tol)
    assert_close(gx_r, gx, dtype, **tol)


def test_param_views_use_torch_names():
    chain = sc.SimpleChain((6, 4), sc.LSTM(3, return_sequences=True), sc.GRU(2))
    p = sc.init_params(chain, seed=0)
    lstm, gru = chain.param_views(p)
    assert {k: v.shape for k, v in lstm.items()} == {
        "weight_ih": (12, 4), "weight_hh": (12, 3), "bias_ih": (12,), "bias_hh": (12,)}
    assert {k: v.shape for k, v in gru.items()} == {
        "weight_ih": (6, 3), "weight_hh": (6, 2), "bias_ih": (6,), "bias_hh": (6,)}
    assert sc.numparam(chain) == 12 * 4 + 12 * 3 + 24 + 6 * 3 + 6 * 2 + 12
    k = 1 / np.sqrt(3)  # torch's init: uniform in (-1/sqrt(H), 1/sqrt(H))
    assert all(np.abs(v).max() <= k for v in lstm.values())
    assert np.std(lstm["weight_ih"]) > 0.2 * k


def test_gru_trains_on_a_sequence_task():
    """A GRU learns the running mean of a noisy sequence's first feature (train_batched,
    Adam, 2 threads): the loss falls by far more than noise would allow."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((512, 8, 2)).astype(np.float32)
    Y = X[:, :, :1].mean(axis=1)
    chain = sc.SimpleChain((8, 2), sc.GRU(8), sc.Dense(1))
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    p = sc.init_params(chain, seed=0)
    before = model(X, p)
    G = sc.alloc_threaded_grad(model, n_threads=2)
    sc.train_batched(G, p, model, X, sc.Adam(1e-2), 30, batch_size=64)
    after = model(X, p)
    assert after < 0.1 * before, (before, after)


def test_sequence_bad_input():
    chain = sc.SimpleChain((5, 3), sc.GRU(4), sc.Dense(2))
    p = sc.init_params(chain)
    for shape in [(4, 15), (4, 6, 3), (4, 5, 2)]:
        X = np.zeros(shape, np.float32)
        with pytest.raises(ValueError, match=r"\(N, 5, 3\)"):
            chain(X, p)
    with pytest.raises(ValueError, match=r"layer 1 \(GRU\(3\)\).*sequence input \(T, F\)"):
        sc.SimpleChain((8,), sc.Dense(3), sc.GRU(3))
    with pytest.raises(ValueError, match="LSTM expects a sequence input"):
        sc.SimpleChain((2, 4, 4), sc.LSTM(3))
    with pytest.raises(ValueError, match="TimeDistributed expects a sequence"):
        sc.SimpleChain((8,), sc.TimeDistributed(sc.Dense(3)))
    for bad in [0, -1, 2.5, True]:
        with pytest.raises(ValueError, match="hidden must be a positive int"):
            sc.GRU(bad)
    with pytest.raises(TypeError, match="return_sequences must be a bool"):
        sc.LSTM(3, return_sequences="yes")
    for layer in [sc.Dropout(0.1), sc.BatchNorm(), "Dense"]:
        with pytest.raises(TypeError, match="TimeDistributed"):
            sc.TimeDistributed(layer)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tpa_lstm_matches_torch_twin(torch, dtype):
    """smallchains.models.tpa_lstm (embedding, 2 stacked LSTMs, temporal pattern
    attention, Dense) against bench/torch_models.TPALSTM at the same parameters."""
    from smallchains.models import tpa_lstm
    chain = tpa_lstm(3, 4, hidden=5, filters=7, n_out=2)
    rng = np.random.default_rng(0)
    p = sc.init_params(chain, seed=0, dtype=np.float64)
    for v in chain.param_views(p):  # non-zero biases
        for k in v:
            if k in ("b", "c"):
                v[k][:] = 0.2 * rng.standard_normal(v[k].shape)
    p = p.astype(dtype)
    X, Y = _data(chain, 21, dtype)
    check_against_torch_twin(torch, chain, load_bench_module("torch_models.py").TPALSTM, p, X, Y, dtype,
                             n_series=3, window=4, hidden=5, filters=7, n_out=2)


def test_temporal_pattern_attention_finite_differences_and_errors():
    chain = sc.SimpleChain((2, 3), sc.TemporalPatternAttention(2), sc.Dense(1, "tanh"))
    p = sc.init_params(chain, seed=1, dtype=np.float64)
    chain.param_views(p)[0]["c"][:] = [0.3, -0.2]
    X, Y = _data(chain, 4, np.float64)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    _, gp, gx = sc.valgrad_with_input(model, X, p)
    assert_close(gp, central_fd(lambda q: model(X, q), p), "fd")
    assert_close(gx, central_fd(lambda x: model(x, p), X), "fd")
    assert list(chain.param_views(p)[0]) == ["C", "c", "W_a", "W_h", "W_v"]
    with pytest.raises(ValueError, match=r"T >= 2"):
        sc.SimpleChain((1, 3), sc.TemporalPatternAttention(2))
    with pytest.raises(ValueError, match="filters must be a positive int"):
        sc.TemporalPatternAttention(0)
