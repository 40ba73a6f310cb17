"""Conv / MaxPool / Flatten chains: gradients (finite differences and torch autograd, float64),
float32 vs float64 forward, MaxPool ties, shape inference and errors, LogitCrossEntropyLoss
checks, and a short real-MNIST training run.

Every distinct architecture compiles its own kernels (10-30 s cold), so the gradient tests
share three architectures (:data:`CONV_ARCHS`) that together cover:

* padding ``"valid"``, ``"same"``, ``1``, ``2``;
* input channels 1 and 3 (and 2, 5 from a previous conv);
* output channels 1, 2, 5 (5 = one full 4-channel weight-gradient tile plus a remainder);
* kernels 1, 2, 3, 5;
* activations relu, tanh, identity, gelu; a bias-free conv;
* MaxPool 2 and 3 on images whose H and/or W is not divisible by the window;
* a chain ending with Flatten (conv features used directly as logits).
"""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest

import smallchains as sc
from conftest import TORCH_ACT, assert_close, central_fd, torch_chain_model
from conftest import random_params as conv_params

# --------------------------------------------------------------------------------------
# architectures

#: name -> (input shape (C, H, W), layers factory)
CONV_ARCHS = {
    # (1,7,6) -same-> (2,7,6) -pool2-> (2,3,3) -pad1,k2-> (5,4,4) -> 80 -> 3
    "a": ((1, 7, 6), lambda: [sc.Conv(2, 3, "relu", padding="same"), sc.MaxPool(2),
                              sc.Conv(5, 2, "tanh", padding=1), sc.Flatten(), sc.TurboDense(3)]),
    # (3,8,7) -pad2,k5-> (1,8,7) -pool3-> (1,2,2) -> 4 -> 4 -> 3
    "b": ((3, 8, 7), lambda: [sc.Conv(1, 5, "gelu", padding=2), sc.MaxPool(3), sc.Flatten(),
                              sc.TurboDense(4, "tanh"), sc.TurboDense(3)]),
    # (3,7,6) -k1-> (5,7,6) -k3 valid, no bias-> (2,5,4) -pool2-> (2,2,2) -> 8 logits
    "c": ((3, 7, 6), lambda: [sc.Conv(5, 1, "identity"), sc.Conv(2, 3, "relu", bias=False),
                              sc.MaxPool(2), sc.Flatten()]),
    # rectangular kernels, paddings and pooling windows (torch's tuple forms):
    # (2,7,9) -k(3,5), pad(2,1)-> (3,9,7) -pool(2,3)-> (3,4,2) -k(1,2), pad(0,1)-> (2,4,3) -> 24 -> 3
    "d": ((2, 7, 9), lambda: [sc.Conv(3, (3, 5), "silu", padding=(2, 1)), sc.MaxPool((2, 3)),
                              sc.Conv(2, (1, 2), "elu", padding=(0, 1)), sc.Flatten(), sc.TurboDense(3)]),
}
ARCH_NAMES = sorted(CONV_ARCHS)
N_GRAD = 4


@functools.lru_cache(maxsize=None)
def conv_chain(name):
    shape, layers = CONV_ARCHS[name]
    return sc.SimpleChain(shape, *layers())


def n_classes(name):
    return conv_chain(name).output_shape[0]


def conv_case(name, n=N_GRAD, seed=0):
    chain = conv_chain(name)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n,) + chain.input_shape)
    y = rng.integers(0, n_classes(name), size=n)
    p = conv_params(chain, seed=seed)
    return chain, X, y, p


# --------------------------------------------------------------------------------------
# torch reference

def torch_conv_model(torch, chain, p):
    """An nn.Sequential (float64) equal to ``chain`` at ``p``, and its parametrized modules
    in chain order (conftest.torch_chain_model)."""
    return torch_chain_model(torch, chain, p)


def torch_valgrad(torch, chain, X, y, p):
    """(loss, dL/dp in smallchains order, dL/dX, logits) from torch autograd."""
    net, pmods = torch_conv_model(torch, chain, p)
    Xt = torch.tensor(np.asarray(X, dtype=np.float64), requires_grad=True)
    out = net(Xt)
    loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(np.asarray(y, dtype=np.int64)))
    loss.backward()
    parts = []
    for m in pmods:
        for t in (m.weight, m.bias):
            if t is not None:
                parts.append(t.grad.detach().numpy().reshape(-1))
    return loss.item(), np.concatenate(parts), Xt.grad.detach().numpy(), out.detach().numpy()


def assert_valgrad_matches_torch(torch, chain, X, y, p):
    """Loss, dL/dp and dL/dX of the logit cross-entropy model equal torch autograd's;
    returns dL/dX."""
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    loss, g, gx = sc.valgrad_with_input(model, X, p)
    tl, tg, tgx, _ = torch_valgrad(torch, chain, X, y, p)
    assert_close(loss, tl, np.float64, err_msg="loss")
    assert_close(g, tg, np.float64, err_msg="dL/dp")
    assert_close(gx, tgx, np.float64, err_msg="dL/dX")
    return gx


def test_archs_cover_requested_combinations():
    """The three architectures cover every padding/channel/kernel/activation/pool case."""
    convs = [l for n in ARCH_NAMES for l in conv_chain(n).layers if isinstance(l, sc.Conv)]
    assert {c.padding for c in convs} >= {(0, 0), (1, 1), (2, 2)}
    assert any(c.padding == (1, 1) and c.kernel_size == (3, 3) for c in convs)  # same
    assert {c.out_channels for c in convs} >= {1, 2, 5}
    assert {c.kernel_size[0] for c in convs} >= {1, 2, 3, 5}
    assert {c.activation.name for c in convs} >= {"relu", "tanh", "identity", "gelu"}
    in_ch = {ins[0] for n in ARCH_NAMES for l, (ins, _) in zip(conv_chain(n).layers, conv_chain(n)._shapes)
             if isinstance(l, sc.Conv)}
    assert in_ch >= {1, 3}
    pools = [(l.k, ins) for n in ARCH_NAMES for l, (ins, _) in zip(conv_chain(n).layers, conv_chain(n)._shapes)
             if isinstance(l, sc.MaxPool)]
    assert {k for k, _ in pools} >= {(2, 2), (3, 3), (2, 3)}
    assert any(c.kernel_size[0] != c.kernel_size[1] for c in convs)
    assert any(c.padding[0] != c.padding[1] for c in convs)
    assert all(ins[1] % k[0] or ins[2] % k[1] for k, ins in pools)


# --------------------------------------------------------------------------------------
# gradients (float64)

@pytest.mark.parametrize("name", ARCH_NAMES)
def test_conv_grad_matches_torch_and_fd(torch, name):
    chain, X, y, p = conv_case(name)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    X0, p0, y0 = X.copy(), p.copy(), y.copy()
    loss, g, gx = sc.valgrad_with_input(model, X, p)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(y, y0)
    assert g.shape == p.shape and gx.shape == X.shape
    assert g.dtype == np.float64 and gx.dtype == np.float64

    # torch autograd
    tl, tg, tgx, tout = torch_valgrad(torch, chain, X, y, p)
    assert_close(chain(X, p), tout, np.float64, err_msg="forward")
    assert_close(loss, tl, np.float64, err_msg="loss")
    assert_close(model(X, p), tl, np.float64, err_msg="model(X, p)")
    assert_close(g, tg, np.float64, err_msg="dL/dp vs torch")
    assert_close(gx, tgx, np.float64, err_msg="dL/dX vs torch")
    # per-layer named views line up with torch's modules
    for views in chain.param_views(g):
        for v in views.values():
            assert np.isfinite(v).all()

    # central finite differences
    fd_p = central_fd(lambda q: model(X, q), p)
    fd_x = central_fd(lambda x: model(x, p), X)
    assert np.abs(fd_p).max() > 1e-3 and np.abs(fd_x).max() > 1e-3
    assert_close(g, fd_p, "fd", err_msg="dL/dp vs FD")
    assert_close(gx, fd_x, "fd", err_msg="dL/dX vs FD")


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_conv_grad_every_param_nonzero_somewhere(name):
    """Every conv weight/bias gets gradient (no silently dropped taps or channels)."""
    chain, X, y, p = conv_case(name, n=N_GRAD, seed=3)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    _, g, gx = sc.valgrad_with_input(model, X, p)
    for layer, views in zip(chain.layers, chain.param_views(g)):
        if isinstance(layer, sc.Conv):
            # summed over output channels: each (ci, ky, kx) tap is used
            assert (np.abs(views["W"]).sum(axis=0) > 0).all(), layer
    # only MaxPool-dropped rows/columns can have zero input gradient; the rest do not
    assert np.count_nonzero(gx) > 0


@pytest.mark.parametrize("name", ARCH_NAMES)
@pytest.mark.parametrize("kind", ["zeros", "constant"])
def test_maxpool_ties_match_torch(torch, name, kind):
    """Tied MaxPool windows (constant images, zeros) send the gradient to the first max."""
    chain, X, y, p = conv_case(name, seed=5)
    # dyadic inputs and weights: every conv sum is exact whatever the summation order, so
    # tied windows are bit-identical ties (not 1-ulp near-ties broken by rounding)
    p = np.round(p * 64) / 64
    if kind == "zeros":
        X = np.zeros_like(X)
    else:
        X = np.broadcast_to(np.array([0.75, -0.5, 1.25, 0.25, 2.0])[:X.shape[0], None, None, None],
                            X.shape).copy()
    assert_valgrad_matches_torch(torch, chain, X, y, p)


def test_maxpool_ties_after_relu_bias(torch):
    """All-negative pre-activations -> relu zeros everywhere -> every window tied at 0."""
    chain, X, y, p = conv_case("a", seed=2)
    views = chain.param_views(p)
    views[0]["b"][...] = -50.0  # relu output all zeros in the first conv
    gx = assert_valgrad_matches_torch(torch, chain, X, y, p)
    assert not gx.any()  # no path back to the input


def test_maxpool_ties_constant_feature_maps(torch):
    """First conv zeroed with bias 1: every later feature map is constant, so every MaxPool
    window is tied; parameter gradients must still match torch (first-index routing)."""
    chain, X, y, p = conv_case("c", seed=7)
    v = chain.param_views(p)
    v[0]["W"][...] = 0.0
    v[0]["b"][...] = 1.0           # first conv output: constant 1 in every channel
    v[1]["W"][...] = np.round(v[1]["W"] * 64) / 64  # dyadic: exact (bit-identical) ties
    gx = assert_valgrad_matches_torch(torch, chain, X, y, p)
    assert not gx.any()


# --------------------------------------------------------------------------------------
# forward: float32 vs float64, single sample, batch bigger than a block

def test_conv_forward_float32_matches_float64():
    chain = conv_chain("a")
    rng = np.random.default_rng(11)
    X = rng.standard_normal((37,) + chain.input_shape)
    p64 = conv_params(chain, seed=11)
    Y64 = chain(X, p64)
    Y32 = chain(X.astype(np.float32), p64.astype(np.float32))
    assert Y32.dtype == np.float32 and Y32.shape == (37, 3)
    assert_close(Y32, Y64, np.float32, rtol=1e-4, atol=1e-4)
    # single sample = the matching row of the batch
    assert_close(chain(X[5], p64), Y64[5], np.float64)
    # a float32 X is converted to p's dtype
    assert_close(chain(X.astype(np.float32), p64), chain(X.astype(np.float32).astype(np.float64), p64),
                 np.float64)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_conv_forward_matches_torch_large_batch(torch, name):
    """A batch that spans several blocks plus a partial one."""
    chain = conv_chain(name)
    rng = np.random.default_rng(21)
    X = rng.standard_normal((29,) + chain.input_shape)
    p = conv_params(chain, seed=21)
    net, _ = torch_conv_model(torch, chain, p)
    with torch.no_grad():
        ref = net(torch.from_numpy(X)).numpy()
    assert_close(chain(X, p), ref, np.float64)
    # loss and gradient over the same batch (exercises partial-block padding lanes)
    y = rng.integers(0, n_classes(name), size=29)
    assert_valgrad_matches_torch(torch, chain, X, y, p)


# --------------------------------------------------------------------------------------
# shape inference and construction errors (no compilation)

def lenet5():
    return sc.SimpleChain((1, 28, 28),
                          sc.Conv(6, 5, "relu"), sc.MaxPool(2),
                          sc.Conv(16, 5, "relu"), sc.MaxPool(2),
                          sc.Flatten(),
                          sc.TurboDense(120, "relu"), sc.TurboDense(84, "relu"), sc.TurboDense(10))


def test_lenet5_shapes_and_param_count():
    chain = lenet5()
    outs = [o for _, o in chain._shapes]
    assert outs == [(6, 24, 24), (6, 12, 12), (16, 8, 8), (16, 4, 4), (256,), (120,), (84,), (10,)]
    assert chain.input_shape == (1, 28, 28) and chain.output_shape == (10,)
    assert chain.n_params == 44426 == sc.numparam(chain)
    p = sc.init_params(chain, seed=0)
    assert p.shape == (44426,) and p.dtype == np.float32
    views = chain.param_views(p)
    assert views[0]["W"].shape == (6, 1, 5, 5) and views[0]["b"].shape == (6,)
    assert views[2]["W"].shape == (16, 6, 5, 5) and views[2]["b"].shape == (16,)
    assert views[1] == {} and views[3] == {} and views[4] == {}
    assert views[5]["W"].shape == (120, 256)
    # views share memory with p, in chain order
    views[0]["W"][0, 0, 0, 0] = 123.0
    assert p[0] == 123.0
    views[0]["b"][0] = 7.0
    assert p[150] == 7.0
    # conv init: zero bias, Glorot-normal weights
    p = sc.init_params(chain, seed=1, dtype=np.float64)
    v = chain.param_views(p)
    assert not v[0]["b"].any() and not v[2]["b"].any()
    std = np.sqrt(2.0 / (6 * 25 + 16 * 25))
    assert 0.7 * std < v[2]["W"].std() < 1.3 * std


def test_lenet5_summary():
    chain = lenet5()
    s = chain.summary()
    lines = s.splitlines()
    for layer, (ins, outs) in zip(chain.layers, chain._shapes):
        row = [ln for ln in lines if ln.startswith(repr(layer)) and str(outs) in ln]
        assert row, f"no summary row for {layer!r} {outs}:\n{s}"
        assert row[0].split()[-1] == str(layer.n_params(ins))
    assert "156" in s and "2416" in s and "30840" in s and "10164" in s and "850" in s
    assert "44426" in s


def test_shape_variants():
    c = sc.SimpleChain((3, 9, 8), sc.Conv(4, 3, padding="same"), sc.MaxPool(3), sc.Flatten())
    assert [o for _, o in c._shapes] == [(4, 9, 8), (4, 3, 2), (24,)]
    c = sc.SimpleChain((2, 5, 5), sc.Conv(3, 2, padding=2, bias=False), sc.Flatten())
    assert c._shapes[0][1] == (3, 8, 8) and c.n_params == 3 * 2 * 4
    c = sc.SimpleChain((1, 4, 4), sc.Conv(1, 4))      # kernel == image: 1x1 output
    assert c.output_shape == (1, 1, 1)
    c = sc.SimpleChain((1, 3, 3), sc.Conv(1, 5, padding=1))  # fits once padded
    assert c.output_shape == (1, 1, 1)
    assert sc.SimpleChain((1, 7, 6), sc.MaxPool(3)).output_shape == (1, 2, 2)
    assert sc.Conv(2, 3, padding="valid").padding == (0, 0)
    assert sc.Conv(2, 5, padding="same").padding == (2, 2)
    assert sc.Conv(2, (3, 5), padding="same").padding == (1, 2)
    assert sc.Conv(2, 3, padding=(0, 2)).padding == (0, 2)
    assert sc.Conv(6, (5, 5), "relu") == sc.Conv(6, 5, "relu")
    assert sc.MaxPool((2, 2)) == sc.MaxPool(2)
    c = sc.SimpleChain((1, 7, 9), sc.Conv(2, (3, 5), padding=(1, 0)), sc.MaxPool((2, 3)))
    assert c.output_shape == (2, 3, 1)
    assert c.param_views(sc.init_params(c))[0]["W"].shape == (2, 1, 3, 5)


def test_wrong_image_shape_raises_naming_expected():
    chain = lenet5()
    p = sc.init_params(chain, seed=0)
    y = np.zeros(4, dtype=np.int64)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    for bad in [np.zeros((4, 28, 28), np.float32), np.zeros((4, 3, 28, 28), np.float32),
                np.zeros((4, 1, 28, 27), np.float32), np.zeros((4, 784), np.float32)]:
        for call in (lambda X: chain(X, p), lambda X: model(X, p),
                     lambda X: sc.valgrad_with_input(model, X, p)):
            with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
                call(bad)


def test_dense_after_conv_without_flatten_raises():
    with pytest.raises(ValueError, match="Flatten"):
        sc.SimpleChain((1, 8, 8), sc.Conv(2, 3), sc.TurboDense(10))
    with pytest.raises(ValueError, match="Flatten"):
        sc.SimpleChain((1, 8, 8), sc.Conv(2, 3), sc.MaxPool(2), sc.TurboDense(10))
    with pytest.raises(ValueError, match="Flatten"):
        sc.SimpleChain((1, 8, 8), sc.TurboDense(10))


def test_image_layers_reject_flat_input():
    for layer in (sc.Conv(2, 3), sc.MaxPool(2)):
        with pytest.raises(ValueError, match=r"\(C, H, W\)"):
            sc.SimpleChain(64, layer)
        with pytest.raises(ValueError, match=r"\(C, H, W\)"):
            sc.SimpleChain((1, 8, 8), sc.Flatten(), layer)


def test_kernel_larger_than_image_raises():
    with pytest.raises(ValueError, match="larger"):
        sc.SimpleChain((1, 4, 6), sc.Conv(2, 5))
    with pytest.raises(ValueError, match="larger"):
        sc.SimpleChain((1, 8, 8), sc.Conv(2, 3), sc.MaxPool(2), sc.Conv(2, 5))
    with pytest.raises(ValueError):
        sc.SimpleChain((1, 2, 8), sc.MaxPool(3))


@pytest.mark.parametrize("k", [2, 4])
def test_same_padding_even_kernel_raises(k):
    with pytest.raises(ValueError, match="odd"):
        sc.Conv(2, k, padding="same")


@pytest.mark.parametrize("padding", [-1, "full", "SAME", 1.5, None, True, [1], (1, 2, 3), (1, -1), (1.0, 1)])
def test_invalid_padding_raises(padding):
    with pytest.raises(ValueError, match="padding"):
        sc.Conv(2, 3, padding=padding)


@pytest.mark.parametrize("kw", [dict(out_channels=0, kernel_size=3), dict(out_channels=2, kernel_size=0),
                                dict(out_channels=2.0, kernel_size=3), dict(out_channels=2, kernel_size=-1)])
def test_invalid_conv_sizes_raise(kw):
    with pytest.raises(ValueError):
        sc.Conv(**kw)


@pytest.mark.parametrize("kernel_size", [(3,), (3, 0), (2, 2, 2), (1.5, 2), "3"])
def test_invalid_conv_kernel_tuple_raises(kernel_size):
    with pytest.raises(ValueError, match="kernel_size"):
        sc.Conv(2, kernel_size)


@pytest.mark.parametrize("k", [0, -2, 1.5, (2,), (2, 0), (2, 2.0)])
def test_invalid_maxpool_raises(k):
    with pytest.raises(ValueError):
        sc.MaxPool(k)


def test_unknown_activation_raises():
    with pytest.raises((ValueError, KeyError)):
        sc.Conv(2, 3, "nope")


# --------------------------------------------------------------------------------------
# LogitCrossEntropyLoss

def test_logitce_value_matches_torch(torch):
    chain, X, y, p = conv_case("b", n=9, seed=4)
    logits = chain(X, p)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)).item()
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    assert_close(model(X, p), ref, np.float64)
    # large logits: stable (log-sum-exp)
    p2 = p.copy()
    last = chain.param_views(p2)[-1]
    last["W"][...] *= 30.0
    last["b"][...] = [80.0, -60.0, 75.0]
    logits = chain(X, p2)
    assert np.abs(logits).max() > 50
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)).item()
    assert_close(model(X, p2), ref, np.float64, rtol=1e-8)
    # labels of other integer dtypes give the same value
    for dt in (np.int32, np.uint8, np.int16):
        m = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y.astype(dt)))
        assert_close(m(X, p), model(X, p), np.float64)
    # targets= override
    y2 = (y + 1) % 3
    ref2 = torch.nn.functional.cross_entropy(torch.from_numpy(chain(X, p)), torch.from_numpy(y2)).item()
    assert_close(model(X, p, targets=y2), ref2, np.float64)


def _bad_label_cases(n, k):
    return [
        ("too big", np.full(n, k, dtype=np.int64), ValueError, "0, 3"),
        ("negative", np.r_[np.zeros(n - 1, dtype=np.int64), -1], ValueError, "0, 3"),
        ("float", np.zeros(n, dtype=np.float64), TypeError, "integer"),
        ("float32", np.zeros(n, dtype=np.float32), TypeError, "integer"),
        ("bool", np.zeros(n, dtype=bool), TypeError, "integer"),
        ("short", np.zeros(n - 1, dtype=np.int64), ValueError, f"\\({n},\\)"),
        ("long", np.zeros(n + 1, dtype=np.int64), ValueError, f"\\({n},\\)"),
        ("2-D", np.zeros((n, 1), dtype=np.int64), ValueError, f"\\({n},\\)"),
        ("one-hot", np.eye(k, dtype=np.int64)[np.arange(n) % k], ValueError, f"\\({n},\\)"),
    ]


@pytest.mark.parametrize("case", range(9), ids=[c[0] for c in _bad_label_cases(4, 3)])
def test_logitce_bad_labels_raise_and_leave_arrays_untouched(case):
    chain, X, _, p = conv_case("b", n=4, seed=0)
    _, labels, exc, msg = _bad_label_cases(4, 3)[case]
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(labels))
    X0, p0, l0 = X.copy(), p.copy(), labels.copy()
    calls = [lambda: model(X, p), lambda: sc.valgrad(model, X, p),
             lambda: sc.valgrad_with_input(model, X, p)]
    G = sc.alloc_threaded_grad(chain, dtype=np.float64)
    G0 = G.copy()
    calls += [lambda: sc.train_batched(G, p, model, X, sc.Adam(1e-2), 1, batch_size=2)]
    for call in calls:
        with pytest.raises(exc, match=msg):
            call()
        np.testing.assert_array_equal(X, X0)
        np.testing.assert_array_equal(p, p0)
        np.testing.assert_array_equal(labels, l0)
        assert labels.dtype == l0.dtype
        np.testing.assert_array_equal(G, G0)


def test_logitce_rejects_image_output():
    chain = sc.SimpleChain((1, 4, 4), sc.Conv(2, 3))  # output (2, 2, 2): not 1-D logits
    p = sc.init_params(chain, seed=0, dtype=np.float64)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(np.zeros(2, dtype=np.int64)))
    with pytest.raises(ValueError, match="1-D"):
        model(np.zeros((2, 1, 4, 4)), p)


# --------------------------------------------------------------------------------------
# training on real MNIST

def test_mnist_lenet_like_trains(data_dir):
    root = data_dir / "mnist"
    if not (root / "train-images-idx3-ubyte.gz").exists() or not (root / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST files not found in {root}")
    t0 = time.perf_counter()
    Xtr, ytr = sc.datasets.mnist("train", data_dir=root)
    Xte, yte = sc.datasets.mnist("test", data_dir=root)
    assert Xtr.shape == (60000, 1, 28, 28) and Xtr.dtype == np.float32
    # (the loader returns read-only arrays: training must accept them without copying)
    Xtr, ytr, Xte, yte = Xtr[:2000], ytr[:2000], Xte[:1000], yte[:1000]

    chain = sc.SimpleChain((1, 28, 28), sc.Conv(4, 5, "relu"), sc.MaxPool(2), sc.Flatten(),
                           sc.TurboDense(10))
    assert chain.n_params == 4 * 25 + 4 + 576 * 10 + 10
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(ytr))
    p = sc.init_params(chain, seed=0, dtype=np.float32)
    G = sc.alloc_threaded_grad(chain, dtype=np.float32)
    loss0 = model(Xtr, p)
    acc0 = (chain(Xte, p).argmax(axis=1) == yte).mean()
    hist = sc.train_batched(G, p, model, Xtr, sc.Adam(3e-3), 2, batch_size=32, shuffle=True, seed=0)
    assert hist.shape == (2,) and np.isfinite(hist).all()
    loss1 = model(Xtr, p)
    acc = (chain(Xte, p).argmax(axis=1) == yte).mean()
    assert loss1 < 0.6 * loss0, (loss0, loss1)
    assert hist[1] < hist[0]
    assert acc > 0.80, f"test accuracy {acc:.3f} (before training {acc0:.3f})"
    assert time.perf_counter() - t0 < 90
