"""sc.save / sc.load: exact round trips of every layer type, parameters, layer state and
optimizer (training continues bitwise as if never saved); files that do not match are
refused with a clear error; nothing in a file is ever executed."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import smallchains as sc
from smallchains.io import _signature
from smallchains.models import lstnet, tpa_lstm
from conftest import get_chain, make_data, make_model

D = sc.TurboDense

#: every layer type, nested containers, shape layers, chain options
CHAINS = {
    "conv": lambda: sc.SimpleChain((2, 7, 6), sc.Conv(3, (3, 2), "relu", padding=(1, 0)),
                                   sc.BatchNorm(momentum=0.2), sc.MaxPool((2, 3)), sc.Flatten(),
                                   sc.Dropout(0.25), D(4, "gelu", bias=False), block_size=32),
    "same": lambda: sc.SimpleChain((1, 5, 5), sc.Conv(2, 3, "tanh", padding="same", bias=False),
                                   sc.MaxPool(), sc.Flatten(), D(3, "leaky_relu")),
    "shapes": lambda: sc.SimpleChain((4, 3), sc.Permute((1, 0)), sc.Reshape((12,)),
                                     sc.Slice(slice(2, None)), sc.SkipConnection((D(10, "elu"),)),
                                     sc.Parallel("concat", D(2, "softplus"), ())),
    "lstnet": lambda: lstnet(5, 11, skip=3, highway=3),
    "tpa": lambda: tpa_lstm(4, 6, hidden=3, filters=2),
    "recurrent": lambda: sc.SimpleChain((5, 2), sc.GRU(3, return_sequences=True), sc.Conv1D(2, 2, "silu"),
                                        sc.TimeDistributed(D(2, "sigmoid")), sc.LSTM(4), kernels="reference"),
    "registers": lambda: sc.SimpleChain(3, D(2), registers=32 if sc.SimpleChain(3, D(2)).options.registers == 16 else 16),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_every_layer_round_trips_exactly(tmp_path, name):
    chain = CHAINS[name]()
    p = sc.init_params(chain, seed=1, dtype=np.float64)
    state = sc.init_state(chain, np.float64) if chain.n_state else None
    if state is not None:
        state[:] = np.random.default_rng(0).uniform(0.5, 2, state.shape)
    sc.save(tmp_path / "m.sc", chain, p, state=state)
    chain2, p2, state2, opt2 = sc.load(tmp_path / "m.sc")
    assert _signature(chain2) == _signature(chain) and repr(chain2) == repr(chain)
    assert p2.dtype == np.float64 and np.array_equal(p2, p) and opt2 is None
    if state is None:
        assert state2 is None
    else:
        np.testing.assert_array_equal(state2, state)
    assert [list(v) for v in chain2.param_views(p2)] == [list(v) for v in chain.param_views(p)]


def test_file_is_a_zip_with_a_readable_description(tmp_path):
    chain = get_chain("deep")
    p = sc.init_params(chain, seed=0)
    sc.save(tmp_path / "m.sc", chain, p, optimizer=sc.Adam(3e-3))
    with zipfile.ZipFile(tmp_path / "m.sc") as z:
        spec = json.loads(z.read("spec.json"))
        assert sorted(z.namelist()) == ["p.npy", "spec.json"]  # the optimizer has no state yet
    assert spec["format"] == "smallchains-model" and spec["version"] == 1
    assert spec["chain"] == repr(chain) and spec["dtype"] == "float32"
    assert spec["optimizer"] == {"constructor": "Adam(lr=0.003, betas=(0.9, 0.999), eps=1e-08)", "t": 0}


@pytest.mark.parametrize("opt", [sc.Adam(2e-3, betas=(0.8, 0.95)), sc.SGD(0.05, momentum=0.9, nesterov=True)],
                         ids=["adam", "sgd"])
def test_training_continues_bitwise_after_load(tmp_path, opt):
    X, Y = make_data("deep", 40, seed=2)
    model = make_model("deep", Y)
    p = sc.init_params(model.chain, seed=3)
    G = sc.alloc_threaded_grad(model.chain, 1)
    sc.train_unbatched(G, p, model, X, opt, 7)
    sc.save(tmp_path / "m.sc", model, p, optimizer=opt)  # a model: its chain is saved
    chain2, p2, _, opt2 = sc.load(tmp_path / "m.sc")
    assert repr(opt2) == repr(opt) and opt2.t == 7 and np.array_equal(opt2.state, opt.state)
    h1 = sc.train_unbatched(G, p, model, X, opt, 5)
    h2 = sc.train_unbatched(G, p2, sc.add_loss(chain2, sc.SquaredLoss(Y)), X, opt2, 5)
    np.testing.assert_array_equal(h1, h2)
    np.testing.assert_array_equal(p, p2)
    np.testing.assert_array_equal(model.chain(X, p), chain2(X, p2))


def _spec_edit(src, dst, edit=None, drop=(), replace=None):
    with zipfile.ZipFile(src) as z:
        files = {n: z.read(n) for n in z.namelist()}
    spec = json.loads(files["spec.json"])
    if edit:
        edit(spec)
    files["spec.json"] = json.dumps(spec).encode()
    files.update(replace or {})
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in files.items():
            if n not in drop:
                z.writestr(n, b)


def test_files_that_do_not_match_are_refused(tmp_path):
    chain = sc.SimpleChain(3, D(4, "tanh"), sc.BatchNorm(), D(2))
    p = sc.init_params(chain, seed=0)
    good = tmp_path / "good.sc"
    sc.save(good, chain, p, state=sc.init_state(chain))
    data = good.read_bytes()
    bad = tmp_path / "bad.sc"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a smallchains model file, or truncated"):
        sc.load(bad)
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a smallchains model file"):
        sc.load(bad)
    cases = [
        (dict(edit=lambda s: s.update(version=2)), "format version 2.*upgrade smallchains"),
        (dict(edit=lambda s: s.update(format="other")), "not a smallchains model file"),
        (dict(edit=lambda s: s.update(chain="SimpleChain(3, TurboDense(5, 'tanh'), BatchNorm(), TurboDense(2))")),
         "parameters but the file holds"),
        (dict(drop=("state.npy",)), "array 'state' is missing"),
        (dict(edit=lambda s: s.pop("chain")), "incomplete description"),
        (dict(edit=lambda s: s.update(chain="SimpleChain(3, TurboDense(2, 'nope'))")), "cannot be built.*nope"),
        (dict(edit=lambda s: s.update(dtype="float64")), "array 'p' is float32"),
    ]
    for kw, match in cases:
        _spec_edit(good, bad, **kw)
        with pytest.raises(ValueError, match=match):
            sc.load(bad)
    with pytest.raises(FileNotFoundError):
        sc.load(tmp_path / "missing.sc")


@pytest.mark.parametrize("expr", [
    "__import__('os').system('touch PWNED')",
    "SimpleChain(3, TurboDense(2, __import__('os').getcwd()))",
    "open('x', 'w')",
    "SimpleChain(3, TurboDense(2).__class__)",
    "SimpleChain(3, *[TurboDense(2)])",
    "SimpleChain(3, TurboDense(**{'out': 2}))",
    "(lambda: 0)()",
])
def test_nothing_in_a_file_is_executed(tmp_path, monkeypatch, expr):
    monkeypatch.chdir(tmp_path)
    chain = sc.SimpleChain(3, D(2))
    sc.save("good.sc", chain, sc.init_params(chain, seed=0))
    _spec_edit("good.sc", "bad.sc", edit=lambda s: s.update(chain=expr))
    with pytest.raises(ValueError, match="only smallchains constructors and literals|not allowed"):
        sc.load("bad.sc")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "x").exists()


def test_save_refuses_what_it_cannot_write_faithfully(tmp_path):
    chain = sc.SimpleChain(3, D(4, "tanh"), sc.BatchNorm(), D(2))
    p = sc.init_params(chain, seed=0)
    path = tmp_path / "m.sc"
    with pytest.raises(ValueError, match="layer state.*pass state="):
        sc.save(path, chain, p)
    with pytest.raises(ValueError, match=r"p must be a float32 array of shape \(\d+,\)"):
        sc.save(path, chain, p[:-1], state=sc.init_state(chain))
    q = p.copy()
    q[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sc.save(path, chain, q, state=sc.init_state(chain))
    with pytest.raises(ValueError, match="optimizer.state must be"):
        opt = sc.Adam()
        opt.prepare(np.zeros(5, np.float32))
        sc.save(path, chain, p, state=sc.init_state(chain), optimizer=opt)
    assert not path.exists()
