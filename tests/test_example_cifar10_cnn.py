"""examples/cifar10_cnn_batchnorm.py (the Axon CIFAR-10 CNN with BatchNorm and Dropout,
issue 14's network 3) runs end to end on real CIFAR-10, updates the BatchNorm running
statistics, and learns like torch eager from the same parameters and minibatches."""

from __future__ import annotations

import numpy as np

from conftest import load_example


def test_cifar10_cnn_example_learns_like_torch(torch, data_dir, capsys):
    mod = load_example("cifar10_cnn_batchnorm.py")
    out = mod.main(["--epochs", "1", "--limit", "3000", "--data-dir", str(data_dir / "cifar10"),
                    "--compare-torch"])
    assert "first 1,000 test images only" in capsys.readouterr().out
    assert np.isfinite(out["p"]).all()
    chain = mod.network()
    views = [v for v in chain.state_views(out["state"]) if v]
    assert len(views) == 2
    for v in views:  # moved away from the initial 0 / 1 by 94 momentum-0.1 updates
        assert np.abs(v["running_mean"]).max() > 1e-3 and np.abs(v["running_var"] - 1).max() > 1e-2
    # 94 SGD steps on 3,000 images: above chance (10%), and within a few images per
    # hundred of torch (each side draws its own Dropout masks)
    assert out["test_acc"] > 0.15
    assert abs(out["test_acc"] - out["torch"]["test_acc"]) <= 0.05
