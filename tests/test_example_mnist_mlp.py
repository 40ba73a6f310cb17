"""examples/mnist_mlp_dropout.py (the Axon / Keras MNIST MLP with Dropout, issue 14's
network 2): the full set-up on real MNIST reaches torch eager's test accuracy from the
same initial parameters and minibatch order (each side draws its own Dropout masks)."""

from __future__ import annotations

import numpy as np

from conftest import load_example


def test_mnist_mlp_example_matches_torch(torch, data_dir, capsys):
    mod = load_example("mnist_mlp_dropout.py")
    out = mod.main(["--data-dir", str(data_dir / "mnist"), "--compare-torch"])
    assert "SGD(lr=0.01)" in capsys.readouterr().out
    assert np.isfinite(out["p"]).all()
    # 3 epochs of SGD 0.01 at batch 32: torch eager reaches about 92% (issue 14); the
    # target is the torch peer's accuracy within 1 point on the 10,000 test images
    assert out["test_acc"] > 0.88
    assert abs(out["test_acc"] - out["torch"]["test_acc"]) <= 0.01
