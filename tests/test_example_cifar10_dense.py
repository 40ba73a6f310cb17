"""examples/cifar10_dense.py (the Nx CIFAR-10 benchmark network): runs end to end on real
grayscale CIFAR-10 and trains like torch eager from the same parameters and minibatches."""

from __future__ import annotations

import numpy as np

from conftest import load_example


def test_cifar10_dense_example_matches_torch(torch, data_dir, capsys):
    mod = load_example("cifar10_dense.py")
    out = mod.main(["--epochs", "2", "--limit", "6000", "--data-dir", str(data_dir / "cifar10"),
                    "--compare-torch"])
    printed = capsys.readouterr().out
    assert "first 1,000 test images only" in printed
    assert len(out["epoch_times"]) == 2 and np.isfinite(out["p"]).all()
    # 2 epochs of 20 Adam steps from the same start and minibatch order: float32 rounding
    # only, so the held-out accuracy (1,000 images) agrees to a few images
    assert 0.15 < out["test_acc"] < 0.5
    assert abs(out["test_acc"] - out["torch"]["test_acc"]) <= 0.01
