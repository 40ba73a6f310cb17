"""examples/forecast_macro.py: the windows, targets and split it builds from statsmodels'
macrodata (training the models is left to the example: its layers are tested in
test_recurrent.py and test_branches.py)."""

import numpy as np
import pytest

from conftest import load_example


def test_forecast_windows_targets_and_split():
    pytest.importorskip("statsmodels")
    ex = load_example("forecast_macro.py")
    Xtr, ytr, Xte, yte, naive = ex.load(window=10, horizon=2, target="infl")
    assert Xtr.shape == (143, 10, 12) and Xte.shape == (48, 10, 12)
    assert ytr.shape == (143, 1) and yte.shape == (48, 1) and naive.shape == (48, 1)
    assert Xtr.dtype == np.float32 and ytr.dtype == np.float32
    j = ex.SERIES.index("infl")
    # consecutive windows overlap by one quarter; the target is 2 quarters past the window
    np.testing.assert_array_equal(Xtr[1, :-1], Xtr[0, 1:])
    np.testing.assert_array_equal(ytr[0, 0], Xtr[2, -1, j])
    np.testing.assert_array_equal(Xte[0, :-1], Xtr[-1, 1:])
    np.testing.assert_array_equal(naive[:, 0], Xte[:, -1, j])
    # z-scored with the statistics of the training period (its 154 quarters; the windows
    # show the first 153), not of the test quarters
    train_q = np.concatenate([Xtr[:, 0], Xtr[-1, 1:]])
    assert np.abs(train_q.mean(0)).max() < 0.05 and np.abs(train_q.std(0) - 1).max() < 0.05
    test_q = np.concatenate([Xte[:, 0], Xte[-1, 1:]])
    assert np.abs(test_q.mean(0)).max() > 0.2
    assert ex.rmse(naive, yte) > 0
