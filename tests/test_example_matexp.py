"""examples/matrix_exponential.py: runs end to end and matches PyTorch's Adam.

A reduced configuration of the SimpleChains.jl blog workflow (1000 samples, 2 rounds of
600 full-batch Adam steps), smallchains and torch from the same initial parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import load_example


def _load_example():
    return load_example("matrix_exponential.py")


@pytest.fixture(scope="module")
def results(torch):  # the conftest fixture skips without torch
    import numba

    mod = _load_example()
    # one thread: torch's intra-op pool slows down by 10x+ on a busy 2-core machine, and
    # the test checks results, not speed. Thread counts are restored for later tests.
    nb_threads, torch_threads = numba.get_num_threads(), torch.get_num_threads()
    try:
        return mod.main(["--n", "1000", "--steps", "600", "--rounds", "2", "--threads", "1",
                         "--compare-torch", "--quiet"])
    finally:
        numba.set_num_threads(nb_threads)
        torch.set_num_threads(torch_threads)


def test_everything_finite(results):
    for key in ("init_train", "init_test"):
        assert math.isfinite(results[key])
    for key in ("sc_train", "sc_test", "sc_time", "torch_train", "torch_test", "torch_time",
                "test_ratio"):
        assert len(results[key]) == 2, key
        assert all(math.isfinite(v) for v in results[key]), (key, results[key])
    for h in results["sc_hist"]:
        assert h.shape == (600,) and np.all(np.isfinite(h))
    assert np.all(np.isfinite(results["params"]))


def test_losses_decrease_between_rounds(results):
    for lib in ("sc", "torch"):
        train = [results["init_train"]] + results[f"{lib}_train"]
        test = [results["init_test"]] + results[f"{lib}_test"]
        assert all(b < a for a, b in zip(train, train[1:])), (lib, train)
        assert all(b < a for a, b in zip(test, test[1:])), (lib, test)
    # the recorded per-step history ends below where it started
    h = np.concatenate(results["sc_hist"])
    assert h[-1] < 0.5 * h[0]


def test_smallchains_no_worse_than_torch(results):
    # same init, data, loss, optimizer and step count: test losses should agree closely
    for sc_test, t_test in zip(results["sc_test"], results["torch_test"]):
        assert sc_test <= 1.5 * t_test, (results["sc_test"], results["torch_test"])
