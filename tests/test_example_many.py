"""examples/many_fits_sweep.py: a learning-rate x seed sweep on real MNIST through
``sc.fit_many``: every fit trains, the sweep finds the better learning rate, and the
ensemble of its fits is at least as accurate as their mean."""

from __future__ import annotations

import numpy as np

from conftest import load_example


def test_mnist_sweep_example(data_dir):
    ex = load_example("many_fits_sweep.py")
    configs, results, acc, best, ensemble, _ = ex.sweep([1e-4, 3e-3], 2, 1, 3000,
                                                        data_dir=data_dir / "mnist")
    assert [c["lr"] for c in configs] == [1e-4, 1e-4, 3e-3, 3e-3]
    assert all(r.ok and r.history.shape == (1,) for r in results)
    assert best == 3e-3 and acc[2:].min() > acc[:2].max()
    assert acc[2:].min() > 0.8  # one epoch on 3,000 images
    assert ensemble >= acc[2:].mean() - 0.005
    assert not np.array_equal(results[2].p, results[3].p)  # seeds differ
