"""Training control: a callback that returns True stops training (the history has the
steps done, and continuing from there equals one uninterrupted run); progress=True
without tqdm warns instead of silently showing nothing."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

import smallchains as sc
from conftest import deep_training_setup


_setup = deep_training_setup


def test_callback_stops_train_unbatched():
    model, X, p0, G = _setup()
    seen = []

    def stop_at_30(step, loss, p):
        seen.append(step)
        return step >= 30

    p, opt = p0.copy(), sc.Adam()
    h = sc.train_unbatched(G, p, model, X, opt, 100, callback=stop_at_30, report_every=10)
    assert seen == [10, 20, 30] and h.shape == (30,) and opt.t == 30
    q, opt2 = p0.copy(), sc.Adam()
    h_ref = sc.train_unbatched(G, q, model, X, opt2, 30)
    np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_array_equal(p, q)
    # a callback returning None (or anything but True) never stops
    assert sc.train_unbatched(G, p0.copy(), model, X, sc.Adam(), 20, callback=lambda *a: 1,
                              report_every=5).shape == (20,)


def test_callback_stops_train_batched():
    model, X, p0, G = _setup()
    p, opt = p0.copy(), sc.Adam()
    h = sc.train_batched(G, p, model, X, opt, 10, batch_size=16, seed=1,
                         callback=lambda epoch, loss, p: epoch == 3)
    assert h.shape == (3,) and opt.t == 3 * 3
    q = p0.copy()
    np.testing.assert_array_equal(h, sc.train_batched(G, q, model, X, sc.Adam(), 3, batch_size=16, seed=1))
    np.testing.assert_array_equal(p, q)


def test_progress_without_tqdm_warns(monkeypatch):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError("No module named 'tqdm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    model, X, p0, G = _setup()
    with pytest.warns(UserWarning, match="progress=True needs tqdm"):
        h = sc.train_unbatched(G, p0.copy(), model, X, sc.Adam(), 3, progress=True)
    assert h.shape == (3,)
    with pytest.warns(UserWarning, match="progress=True needs tqdm"):
        sc.fit_many(model, X, 1, iters=2, progress=True)
