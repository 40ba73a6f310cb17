"""Shared helpers for the smallchains test-suite.

* :func:`assert_close` -- THE tolerance helper (per-dtype rtol/atol), used by all tests.
* :func:`get_chain` / :func:`make_model` -- a few shared architectures, built once per
  session (every distinct architecture/dtype/loss compiles its own numba kernels, which
  costs seconds on a cold cache, so tests reuse these instead of inventing new ones).
* :func:`numpy_forward` -- a naive float64 reference forward pass.
* fixtures ``torch`` (skips without torch) and ``data_dir`` (skips without datasets).

Import the helpers with ``from conftest import ...`` (tests/ is on sys.path).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

import smallchains as sc

# Under pytest-xdist the test processes already keep every core busy compiling; the
# compile helper process each of them would start per new chain (compiler/linking.py)
# only adds interpreter start-ups. Tests of the helper set the variable themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("SMALLCHAINS_COMPILE_WORKERS", "0")

# --------------------------------------------------------------------------------------
# tolerances

#: (rtol, atol) by comparison kind. "fd" is for float64 central finite differences.
TOLERANCES = {
    "float64": (1e-9, 1e-11),
    "float32": (2e-5, 2e-5),
    "fd": (1e-6, 1e-8),
}


def _tol_key(dtype) -> str:
    if isinstance(dtype, str) and dtype in TOLERANCES:
        return dtype
    return np.dtype(dtype).name


def assert_close(actual, expected, dtype, *, rtol=None, atol=None, err_msg=""):
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, shapes equal.

    ``dtype`` picks the default tolerances: ``np.float32``, ``np.float64`` or ``"fd"``
    (finite differences); ``rtol``/``atol`` override them.
    """
    r, a = TOLERANCES[_tol_key(dtype)]
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} {err_msg}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=err_msg)


# --------------------------------------------------------------------------------------
# shared architectures

#: name -> (input width, [(out, activation, bias), ...])
#: Together they use every activation, widths 1, 2, 3, 4, 7, 8, 9, 13, 16, 37, depths 3-4,
#: a 1-wide input and a bias-free layer.
ARCHS = {
    "deep": (3, [(13, "tanh", True), (1, "softplus", True), (37, "gelu", True), (4, "identity", True)]),
    "kinks": (1, [(8, "relu", True), (7, "elu", True), (2, "leaky_relu", True)]),
    "clf": (6, [(9, "sigmoid", True), (16, "silu", False), (3, "identity", True)]),
}

#: the loss each architecture is differentiated with
ARCH_LOSS = {"deep": "squared", "kinks": "absolute", "clf": "logitce"}


@functools.lru_cache(maxsize=None)
def get_chain(name: str) -> sc.SimpleChain:
    n_in, layers = ARCHS[name]
    return sc.SimpleChain(n_in, *[sc.TurboDense(o, a, bias=b) for o, a, b in layers])


def make_targets(name: str, n: int, rng) -> np.ndarray:
    chain = get_chain(name)
    if ARCH_LOSS[name] == "logitce":
        return rng.integers(0, chain.output_shape[0], size=n)
    return rng.standard_normal((n,) + chain.output_shape)


def make_model(name: str, targets, loss: str | None = None):
    loss = ARCH_LOSS[name] if loss is None else loss
    cls = {"squared": sc.SquaredLoss, "absolute": sc.AbsoluteLoss,
           "logitce": sc.LogitCrossEntropyLoss}[loss]
    return sc.add_loss(get_chain(name), cls(targets))


def make_data(name: str, n: int, seed: int = 0):
    """``(X, targets)`` float64 for architecture ``name``."""
    rng = np.random.default_rng(seed)
    chain = get_chain(name)
    X = rng.standard_normal((n,) + chain.input_shape)
    return X, make_targets(name, n, rng)


def deep_training_setup(n=40, seed=0):
    """``(model, X, p0, G)``: the "deep" architecture on ``n`` samples, float32 parameters
    from ``seed``, one gradient row (the training-control tests' common start)."""
    X, Y = make_data("deep", n, seed=seed)
    model = make_model("deep", Y)
    return model, X, sc.init_params(model.chain, seed=seed), sc.alloc_threaded_grad(model.chain, 1)


def random_params(chain, seed=0, dtype=np.float64, bias_scale=0.3):
    """Glorot weights plus non-zero biases (so bias gradients and paths are exercised)."""
    p = sc.init_params(chain, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1000)
    for v in chain.param_views(p):
        if "b" in v:
            v["b"][...] = bias_scale * rng.standard_normal(v["b"].shape)
    return p.astype(dtype)


# --------------------------------------------------------------------------------------
# reference implementations

def np_activation(name: str, z: np.ndarray) -> np.ndarray:
    """float64 numpy activations (overflow-free formulations)."""
    if name == "identity":
        return z
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "sigmoid":
        return 0.5 + 0.5 * np.tanh(0.5 * z)
    if name == "softplus":
        return np.logaddexp(0.0, z)
    if name == "gelu":
        return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))
    if name == "silu":
        return z * (0.5 + 0.5 * np.tanh(0.5 * z))
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)))
    if name == "leaky_relu":
        return np.where(z > 0, z, 0.01 * z)
    raise KeyError(name)


def numpy_forward(chain, X, p) -> np.ndarray:
    """Naive float64 forward pass of a chain of TurboDense layers over a batch ``X``."""
    a = np.asarray(X, dtype=np.float64).reshape(X.shape[0], -1)
    p = np.asarray(p, dtype=np.float64)
    for layer, views in zip(chain.layers, chain.param_views(p)):
        z = a @ views["W"].T
        if "b" in views:
            z = z + views["b"]
        a = np_activation(layer.activation.name, z)
    return a.reshape((X.shape[0],) + chain.output_shape)


def central_fd(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite-difference gradient of scalar ``f`` at float64 ``x`` (any shape)."""
    x = np.array(x, dtype=np.float64)
    flat = x.reshape(-1)
    g = np.empty_like(flat)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f(x)
        flat[i] = old - h
        fm = f(x)
        flat[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g.reshape(x.shape)


# torch equivalents (float64)

TORCH_ACT = {
    "identity": lambda nn: nn.Identity(),
    "tanh": lambda nn: nn.Tanh(),
    "relu": lambda nn: nn.ReLU(),
    "sigmoid": lambda nn: nn.Sigmoid(),
    "softplus": lambda nn: nn.Softplus(),
    "gelu": lambda nn: nn.GELU(approximate="tanh"),
    "silu": lambda nn: nn.SiLU(),
    "elu": lambda nn: nn.ELU(),
    "leaky_relu": lambda nn: nn.LeakyReLU(0.01),
}


def torch_model(torch, chain, p):
    """An nn.Sequential equal to ``chain`` at parameters ``p`` (float64), and its Linears."""
    nn = torch.nn
    mods, linears = [], []
    for layer, views in zip(chain.layers, chain.param_views(p)):
        W = views["W"]
        lin = nn.Linear(W.shape[1], W.shape[0], bias="b" in views, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(W, dtype=np.float64)))
            if "b" in views:
                lin.bias.copy_(torch.from_numpy(np.array(views["b"], dtype=np.float64)))
        mods += [lin, TORCH_ACT[layer.activation.name](nn)]
        linears.append(lin)
    return nn.Sequential(*mods), linears


def torch_loss(torch, loss, yhat, T):
    n = yhat.shape[0]
    if loss == "squared":
        return ((yhat - torch.from_numpy(T)) ** 2).sum() / n
    if loss == "absolute":
        return (yhat - torch.from_numpy(T)).abs().sum() / n
    return torch.nn.functional.cross_entropy(yhat, torch.from_numpy(np.asarray(T, dtype=np.int64)))


def torch_flat(linears, grad=False) -> np.ndarray:
    """Parameters (or their gradients) of ``torch_model``'s Linears in smallchains order."""
    parts = []
    for lin in linears:
        names = RNN_PARAMS if hasattr(lin, RNN_PARAMS[0]) else ("weight", "bias")
        for t in (getattr(lin, n) for n in names):
            if t is not None:
                parts.append((t.grad if grad else t).detach().numpy().reshape(-1))
    return np.concatenate(parts)


#: torch's names of a one-layer GRU/LSTM's parameters, in smallchains' order
RNN_PARAMS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def _torch_rnn(torch, layer, n_in, views, dtype):
    """``(module, rnn)``: torch's GRU/LSTM with ``views``' weights, wrapped to return the
    output sequence or its last step (as ``layer.return_sequences``)."""
    nn = torch.nn
    cls = nn.GRU if isinstance(layer, sc.GRU) else nn.LSTM
    rnn = cls(n_in, layer.hidden, batch_first=True, dtype=dtype)
    with torch.no_grad():
        for n, k in zip(RNN_PARAMS, ("weight_ih", "weight_hh", "bias_ih", "bias_hh")):
            getattr(rnn, n).copy_(torch.from_numpy(np.array(views[k], np.float64)).to(dtype))

    class Out(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            y = self.rnn(x)[0]
            return y if layer.return_sequences else y[:, -1]
    return Out(), rnn


# --------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(params=[False, True], ids=["serial-update", "split-update"])
def split_update(request, monkeypatch):
    """Both ways a step on several threads may sum the gradient rows and update ``p``: on
    one thread, or split over the threads (``smallchains.train.update_slices``; the test
    chains are below its parameter count, so True lowers it to 0)."""
    if request.param:
        import smallchains.train
        monkeypatch.setattr(smallchains.train, "PARALLEL_UPDATE_PARAMS", 0)
    return request.param


@pytest.fixture(scope="session")
def torch():
    """The torch module (float64 reference autograd); skips the test without torch."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Shared datasets folder: ``$SMALLCHAINS_DATA`` else ``<repo>/../shared/datasets``."""
    env = os.environ.get("SMALLCHAINS_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    if not path.is_dir():
        pytest.skip(f"datasets folder {path} not found (set SMALLCHAINS_DATA)")
    return path


# --------------------------------------------------------------------------------------
# hypothesis profiles (tests/test_properties.py and every other @given test)
#
# "ci" (the default): few examples, derandomized, so a CI run is reproducible and bounded
# (derandomize=True implies no example database, so nothing is written to .hypothesis/);
# no shrinking, because every shrink step of an architecture property compiles a new chain
# (1-15 s each): a failure reports the example as drawn. "thorough": many more examples,
# random, with shrinking and the default database (.hypothesis/, git-ignored) so a failure
# found once replays on the next run. Select with HYPOTHESIS_PROFILE=thorough (or pytest's
# --hypothesis-profile=thorough). Tests that pass an explicit max_examples keep it.

try:
    from hypothesis import HealthCheck as _HealthCheck
    from hypothesis import Phase as _Phase
    from hypothesis import settings as _hyp_settings
except ImportError:  # hypothesis is a test extra; the files that use it import it anyway
    _hyp_settings = None

if _hyp_settings is not None:
    _hyp_settings.register_profile(
        "ci", max_examples=10, deadline=None, derandomize=True, print_blob=True,
        phases=(_Phase.explicit, _Phase.generate),
        suppress_health_check=[_HealthCheck.too_slow])
    _hyp_settings.register_profile(
        "thorough", max_examples=200, deadline=None, print_blob=True,
        suppress_health_check=[_HealthCheck.too_slow])
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --------------------------------------------------------------------------------------
# torch equivalent of any chain (TurboDense, Conv, MaxPool, Flatten, BatchNorm, GRU, LSTM,
# TimeDistributed(Dense)), any dtype

def torch_chain_model(torch, chain, p, dtype=None):
    """``(net, pmods)``: an ``nn.Sequential`` equal to ``chain`` at parameters ``p``, in torch
    ``dtype`` (default float64; ``p`` is cast to it), and its parametrized modules
    (``Linear`` / ``Conv2d`` / ``BatchNorm1d`` / ``BatchNorm2d``) in chain order, so
    ``torch_flat(pmods, grad=True)`` is ``dL/dp`` in smallchains' layout. Each layer with
    an activation is followed by its module from :data:`TORCH_ACT` (identity included);
    BatchNorm modules start with torch's running statistics (0 and 1, as ``init_state``)."""
    nn = torch.nn
    dtype = torch.float64 if dtype is None else dtype
    mods, pmods = [], []
    for layer, (ins, _), views in zip(chain.layers, chain._shapes, chain.param_views(p)):
        if isinstance(layer, sc.BatchNorm):
            cls = nn.BatchNorm1d if len(ins) == 1 else nn.BatchNorm2d
            m = cls(ins[0], momentum=layer.momentum, eps=layer.eps, dtype=dtype)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(np.array(views["weight"], np.float64)).to(dtype))
                m.bias.copy_(torch.from_numpy(np.array(views["bias"], np.float64)).to(dtype))
            mods.append(m)
            pmods.append(m)
            continue
        if isinstance(layer, (sc.GRU, sc.LSTM)):
            m, rnn = _torch_rnn(torch, layer, ins[1], views, dtype)
            mods.append(m)
            pmods.append(rnn)
            continue
        if isinstance(layer, sc.TimeDistributed):  # nn.Linear acts on the last axis
            layer = layer.layer
        if isinstance(layer, sc.MaxPool):
            mods.append(nn.MaxPool2d(layer.k))
            continue
        if isinstance(layer, sc.Flatten):
            mods.append(nn.Flatten())
            continue
        W = np.asarray(views["W"])
        if isinstance(layer, sc.Conv):
            m = nn.Conv2d(W.shape[1], W.shape[0], layer.kernel_size, padding=layer.padding,
                          bias="b" in views, dtype=dtype)
        else:
            m = nn.Linear(W.shape[1], W.shape[0], bias="b" in views, dtype=dtype)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.array(W, dtype=np.float64)).to(dtype))
            if "b" in views:
                m.bias.copy_(torch.from_numpy(np.array(views["b"], dtype=np.float64)).to(dtype))
        mods += [m, TORCH_ACT[layer.activation.name](nn)]
        pmods.append(m)
    return nn.Sequential(*mods), pmods


def load_example(filename: str):
    """The module of ``examples/<filename>``, imported from its file (the examples are
    scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / filename
    spec = importlib.util.spec_from_file_location(f"_example_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_bench_module(filename: str):
    """The module of ``bench/<filename>`` (e.g. the torch twins of the models,
    ``torch_models.py``), imported from its file."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / filename
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_against_torch_twin(torch, chain, twin_cls, p, X, Y, dtype, **twin_kw):
    """``chain``'s output, mean-of-squares loss, ``dL/dp`` and ``dL/dX`` at ``p`` equal those
    of its torch twin ``twin_cls(**twin_kw).from_flat(p)`` (bench/torch_models.py, run in
    float64): to 1e-10 in float64, to float32 rounding otherwise."""
    loss, gp, gx = sc.valgrad_with_input(sc.add_loss(chain, sc.SquaredLoss(Y)), X, p)
    net = twin_cls(dtype=torch.float64, **twin_kw).from_flat(p)
    xt = torch.from_numpy(X.astype(np.float64)).requires_grad_()
    yt = net(xt)
    lt = ((yt - torch.from_numpy(Y.astype(np.float64))) ** 2).sum() / len(X)
    lt.backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=2e-5)
    assert_close(chain(X, p), yt.detach().numpy(), dtype, **tol)
    assert_close(loss, lt.item(), dtype, **tol)
    assert_close(gp, net.flat_grad(), dtype, **tol)
    assert_close(gx, xt.grad.numpy(), dtype, **tol)


def _sweep_log():
    """The variant sweeps' log of this process (tests/test_variants.py), JSON-ready."""
    import sys

    tv = sys.modules.get("test_variants")
    if tv is None:
        return {}
    return {f"{family} {dtype}": [count, sorted(f"{part} {variant}" for part, variant in met)]
            for (family, dtype), (count, met) in tv.SWEEP_LOG.items()}


_WORKER_SWEEPS = {}


def pytest_sessionfinish(session):
    """Under pytest-xdist, a worker hands its sweep log to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["sweep_log"] = _sweep_log()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """Under pytest-xdist, the controller collects each worker's sweep log."""
    for key, (count, names) in getattr(node, "workeroutput", {}).get("sweep_log", {}).items():
        old_count, old_names = _WORKER_SWEEPS.get(key, (0, []))
        _WORKER_SWEEPS[key] = (old_count + count, sorted(set(old_names) | set(names)))


def pytest_terminal_summary(terminalreporter):
    """Which kernel variants the variant sweeps ran (tests/test_variants.py), and on how
    many shape / block size / register budget cases (in this process, or summed over the
    pytest-xdist workers)."""
    log = {**_WORKER_SWEEPS, **_sweep_log()}
    if not log:
        return
    terminalreporter.section("kernel variants checked against the reference")
    for key, (count, names) in sorted(log.items()):
        terminalreporter.write_line(f"{key}: {count} cases" + (f"; {', '.join(names)}" if names else ""))
