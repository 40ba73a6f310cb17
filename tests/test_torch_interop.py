"""sc.from_torch / sc.to_torch: a torch.nn.Sequential becomes a chain with the same
outputs and gradients (torch autograd as the oracle), BatchNorm running statistics
included; to_torch is its inverse; unsupported modules name themselves."""

from __future__ import annotations

import numpy as np
import pytest

import smallchains as sc
from conftest import assert_close

torch = pytest.importorskip("torch")
nn = torch.nn


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 8), nn.GELU(approximate="tanh"),
                         nn.Sequential(nn.Linear(8, 7), nn.SiLU()), nn.Dropout(0.3),
                         nn.Linear(7, 6, bias=False), nn.LeakyReLU(), nn.Linear(6, 4), nn.ELU(),
                         nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 3), nn.Sigmoid(),
                         nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))


def _cnn():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding="same"), nn.ReLU(), nn.BatchNorm2d(4, momentum=0.2),
                        nn.MaxPool2d(2), nn.Conv2d(4, 3, (2, 3), padding=(1, 0), bias=False),
                        nn.Flatten(), nn.Linear(3 * 5 * 2, 6), nn.BatchNorm1d(6, eps=1e-3),
                        nn.Linear(6, 3))
    with torch.no_grad():  # running statistics from a few training batches
        net.train()
        for _ in range(3):
            net(torch.randn(16, 2, 8, 8))
    return net.eval()


def _grads(net, X, Y):
    net = net.double()
    xt = torch.from_numpy(X).requires_grad_()
    loss = ((net(xt) - torch.from_numpy(Y)) ** 2).sum() / len(X)
    loss.backward()
    return loss.item(), xt.grad.numpy()


@pytest.mark.parametrize("make, input_shape", [(_mlp, None), (_cnn, (2, 8, 8))], ids=["mlp", "cnn"])
def test_from_torch_outputs_and_gradients_match(make, input_shape):
    net = make()
    mode = net.training
    chain, p, state = sc.from_torch(net, input_shape, dtype=np.float64)  # checks the outputs itself
    assert net.training == mode  # the module is not modified
    assert (state is None) == (make is _mlp)
    assert len(chain.layers) == (10 if make is _mlp else 8)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((7,) + chain.input_shape)
    ref = net.double().eval()
    with torch.no_grad():
        assert_close(chain(X, p, state=state), ref(torch.from_numpy(X)).numpy(), np.float64)
    # inference-mode gradients w.r.t. the input (Dropout off, BatchNorm with running statistics)
    Y = rng.standard_normal((7,) + chain.output_shape)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    loss, _, gx = sc.valgrad_with_input(model, X, p, state=state, training=False)
    loss_t, gx_t = _grads(ref, X, Y)
    assert_close(loss, loss_t, np.float64)
    assert_close(gx, gx_t, np.float64)


def test_to_torch_is_the_inverse():
    chain, p, state = sc.from_torch(_cnn(), (2, 8, 8), dtype=np.float64)
    back = sc.to_torch(chain, p, state)
    assert not back.training
    chain2, p2, state2 = sc.from_torch(back, (2, 8, 8), dtype=np.float64, check=False)
    assert repr(chain2) == repr(chain)
    np.testing.assert_array_equal(p2, p)
    np.testing.assert_array_equal(state2, state)
    assert back[0].weight.dtype == torch.float64
    net32 = sc.to_torch(sc.SimpleChain(3, sc.TurboDense(2, "tanh")), np.ones(8, np.float32))
    assert [type(m) for m in net32] == [nn.Linear, nn.Tanh] and net32[0].weight.dtype == torch.float32


def test_float32_conversion_trains_like_the_module():
    net = _mlp()
    chain, p, _ = sc.from_torch(net)
    assert p.dtype == np.float32 and chain.input_shape == (5,)
    X = np.random.default_rng(3).standard_normal((50, 5)).astype(np.float32)
    Y = np.zeros((50, 2), np.float32)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    h = sc.train_unbatched(sc.alloc_threaded_grad(chain), p, model, X, sc.Adam(1e-2), 30, training=False)
    assert h[-1] < h[0]


@pytest.mark.parametrize("mods, shape, match", [
    ([nn.Linear(3, 2), nn.GRU(2, 2)], None, r"module 1 \(GRU.*only batch_first=True"),
    ([nn.GRU(2, 2, batch_first=True, num_layers=2)], (4, 2), r"num_layers=1"),
    ([nn.LSTM(3, 2, batch_first=True)], (4, 2), r"takes sequences \(T, 3\), gets shape \(4, 2\)"),
    ([nn.Linear(3, 2), nn.Bilinear(2, 2, 2)], None, r"module 1 \(Bilinear.*not supported"),
    ([nn.Conv2d(1, 2, 3, stride=2)], (1, 8, 8), "only stride 1"),
    ([nn.Linear(3, 2), nn.GELU()], None, "tanh approximation"),
    ([nn.Linear(3, 2), nn.LeakyReLU(0.2)], None, "only 0.01"),
    ([nn.Linear(3, 2), nn.BatchNorm1d(2), nn.ReLU()], None, r"module 2 .*must follow a Linear or Conv2d"),
    ([nn.Linear(3, 2), nn.Tanh(), nn.Tanh()], None, "must follow"),
    ([nn.Conv2d(1, 2, 3)], None, "give input_shape"),
    ([nn.Flatten(), nn.Linear(10, 2)], (2, 3, 3), r"takes 10 features, gets shape \(18,\)"),
    ([nn.Linear(3, 2)], (4,), r"takes 3 features, gets shape \(4,\)"),
    ([nn.MaxPool2d(2, stride=1)], (1, 4, 4), "non-overlapping"),
    ([nn.Conv2d(1, 2, 2, padding="same")], (1, 4, 4), "same"),
    ([], None, "empty"),
])
def test_unsupported_modules_name_themselves(mods, shape, match):
    with pytest.raises(ValueError, match=match):
        sc.from_torch(nn.Sequential(*mods), shape, check=False)
    with pytest.raises(TypeError, match="nn.Sequential"):
        sc.from_torch(nn.Linear(3, 2))


def test_to_torch_refuses_layers_without_a_torch_module():
    chain = sc.SimpleChain((4, 3), sc.Conv1D(2, 2))
    with pytest.raises(ValueError, match=r"layer 0 \(Conv1D.*\) has no plain torch module"):
        sc.to_torch(chain, sc.init_params(chain))


def _rnn():
    torch.manual_seed(4)
    Out = sc.torch_interop.RecurrentOutput
    return nn.Sequential(nn.GRU(3, 5, batch_first=True), nn.Linear(5, 4), nn.Tanh(),
                         Out(nn.LSTM(4, 6, batch_first=True), return_sequences=True),
                         Out(nn.GRU(6, 3, batch_first=True)), nn.Linear(3, 2))


def test_recurrent_modules_round_trip_with_the_same_gradients():
    """GRU / LSTM (bare: the output sequence; in RecurrentOutput: sequence or last step)
    and a Linear on a sequence: same outputs (checked by from_torch), same dL/dx, and
    to_torch gives the module back."""
    net = _rnn()
    chain, p, state = sc.from_torch(net, (7, 3), dtype=np.float64)
    assert [type(l).__name__ for l in chain.layers] == ["GRU", "TimeDistributed", "LSTM", "GRU",
                                                        "TurboDense"]
    assert chain.layers[0].return_sequences and not chain.layers[3].return_sequences
    rng = np.random.default_rng(5)
    X = rng.standard_normal((6, 7, 3))
    Y = rng.standard_normal((6, 2))
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    loss, _, gx = sc.valgrad_with_input(model, X, p)
    back = sc.to_torch(chain, p)
    loss_t, gx_t = _grads(back, X, Y)
    assert_close(loss, loss_t, np.float64)
    assert_close(gx, gx_t, np.float64)
    chain2, p2, _ = sc.from_torch(back, (7, 3), dtype=np.float64)
    assert repr(chain2) == repr(chain)
    np.testing.assert_array_equal(p2, p)
    import pickle

    assert type(pickle.loads(pickle.dumps(back))[0]).__name__ == "RecurrentOutput"
