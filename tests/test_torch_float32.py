"""LeNet5 (float32, and float64) against torch autograd over small batches.

``sc.SimpleChain((1, 28, 28), Conv(6, 5, "relu"), MaxPool(2), Conv(16, 5, "relu"),
MaxPool(2), Flatten(), TurboDense(120, "relu"), TurboDense(84, "relu"), TurboDense(10))``
with LogitCrossEntropyLoss, at batch sizes 1, 5, 16 and ``2 B + 5`` (``B`` = the float32
chain's block size, ``chain._kernels(np.float32)[1].B``: two full blocks and a partial one,
split over the threads). Checked: the loss, dL/dp of every layer (``param_views``: W and b
of both convolutions and the three dense layers) and every sample's dL/dx, beyond "it
trains":

* smallchains float32 vs torch **float64** at the same float32 parameters and images
  (so only smallchains' rounding is measured), tolerance ``float32_tolerance`` (derived
  from the reduction lengths, see tests/test_properties.py);
* smallchains float32 vs torch **float32**: twice that (both sides round);
* smallchains float64 vs torch float64: 1e-9.

Parameters: Glorot weights with non-zero biases (``random_params``), and
``sc.init_params`` (zero biases, what training starts from: on MNIST's blank background
many pre-activations are then exactly 0 and many MaxPool windows exact ties).

Images: real MNIST training images if ``$SMALLCHAINS_DATA`` (default ../shared/datasets)
has them, else uniform random images. Images with a relu input or a MaxPool gap within
the float32 rounding bound of its kink (``unsafe_samples``) are skipped, since there the
float32 and float64 derivatives legitimately differ.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

import smallchains as sc
from conftest import random_params, torch_chain_model
from test_properties import TOL64, assert_matches_torch, float32_tolerance, torch_valgrad, unsafe_samples


@functools.lru_cache(maxsize=None)
def lenet5() -> sc.SimpleChain:
    return sc.SimpleChain((1, 28, 28),
                          sc.Conv(6, 5, "relu"), sc.MaxPool(2), sc.Conv(16, 5, "relu"), sc.MaxPool(2),
                          sc.Flatten(),
                          sc.TurboDense(120, "relu"), sc.TurboDense(84, "relu"), sc.TurboDense(10))


@functools.lru_cache(maxsize=None)
def images():
    """``(X, y, source)``: MNIST training images (float32, read-only) or 2000 random ones."""
    env = os.environ.get("SMALLCHAINS_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    try:
        X, y = sc.datasets.mnist("train", data_dir=root / "mnist")
        return X, y, f"MNIST ({root / 'mnist'})"
    except (OSError, ValueError):  # missing (FileNotFoundError) or bad (ChecksumError) files
        rng = np.random.default_rng(0)
        return (rng.random((2000, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 2000),
                "random images")


@functools.lru_cache(maxsize=None)
def params(kind: str) -> np.ndarray:
    chain = lenet5()
    if kind == "random_bias":
        return random_params(chain, seed=5, dtype=np.float32)
    return sc.init_params(chain, seed=5, dtype=np.float32)


def block_size() -> int:
    return lenet5()._kernels(np.float32)[1].B


@functools.lru_cache(maxsize=None)
def batch(torch, kind: str, n: int):
    """``n`` images (and labels) in a seeded random order, skipping those near a kink of
    the float32 network at parameters ``kind``. Returns ``(X, y, n_skipped)``."""
    X_all, y_all, _ = images()
    net64, _ = torch_chain_model(torch, lenet5(), params(kind))
    order = np.random.default_rng(n).permutation(len(X_all))
    chosen, skipped = [], 0
    for start in range(0, len(order), 64):
        idx = order[start:start + 64]
        bad = unsafe_samples(torch, net64, X_all[idx], None, "logitce", np.float32)
        skipped += int(bad[:n - len(chosen)].sum())
        chosen.extend(idx[~bad][:n - len(chosen)])
        if len(chosen) == n:
            break
    assert len(chosen) == n, "not enough images away from the kinks"
    chosen = np.sort(np.asarray(chosen))
    return np.ascontiguousarray(X_all[chosen]), y_all[chosen].copy(), skipped


BATCHES = [1, 5, 16, "2B+5"]
KINDS = ["random_bias", "init_params"]


def _n(n) -> int:
    return 2 * block_size() + 5 if n == "2B+5" else n


def test_lenet5_shapes_and_block_size():
    chain = lenet5()
    assert chain.n_params == 44426
    assert [tuple(v["W"].shape) for v in chain.param_views(params("random_bias")) if v] == [
        (6, 1, 5, 5), (16, 6, 5, 5), (120, 256), (84, 120), (10, 84)]
    B = block_size()
    assert 16 <= B <= 256 and _n("2B+5") > 2 * B  # more than one block: full + partial


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", BATCHES)
def test_lenet5_float32_gradient_matches_torch(torch, n, kind):
    chain = lenet5()
    n = _n(n)
    X, y, _ = batch(torch, kind, n)
    p = params(kind)
    assert X.dtype == np.float32 and p.dtype == np.float32
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    loss, g, gx = sc.valgrad_with_input(model, X, p)
    assert g.dtype == np.float32 and gx.dtype == np.float32 and gx.shape == X.shape
    res = (loss, g, gx)
    tol = float32_tolerance(chain, n)
    source = images()[2]
    # reference 1: float64 torch at the float32 values (only smallchains rounds)
    net64, pm64 = torch_chain_model(torch, chain, p, dtype=torch.float64)
    assert_matches_torch(chain, res, torch_valgrad(torch, net64, pm64, X, y, "logitce"), tol,
                         what=f"LeNet5 float32 vs torch float64, N={n}, {kind}, {source}")
    # reference 2: float32 torch (both round: twice the tolerance)
    net32, pm32 = torch_chain_model(torch, chain, p, dtype=torch.float32)
    assert_matches_torch(chain, res, torch_valgrad(torch, net32, pm32, X, y, "logitce"), 2 * tol,
                         what=f"LeNet5 float32 vs torch float32, N={n}, {kind}, {source}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", BATCHES)
def test_lenet5_float64_gradient_matches_torch(torch, n, kind):
    chain = lenet5()
    n = _n(n)
    X, y, _ = batch(torch, kind, n)
    p = params(kind).astype(np.float64)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    res = sc.valgrad_with_input(model, X.astype(np.float64), p)
    net64, pm64 = torch_chain_model(torch, chain, p, dtype=torch.float64)
    assert_matches_torch(chain, res, torch_valgrad(torch, net64, pm64, X, y, "logitce"), TOL64,
                         what=f"LeNet5 float64 vs torch float64, N={n}, {kind}, {images()[2]}")
