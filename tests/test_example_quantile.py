"""examples/quantile_engel.py: a user-defined (pinball) loss on statsmodels' Engel data;
its gradient equals torch autograd's, and the fitted quantiles are ordered."""

import numpy as np
import pytest

from conftest import load_example


def test_quantile_example(torch):
    pytest.importorskip("statsmodels")
    ex = load_example("quantile_engel.py")
    Xtr, Ytr, Xte, Yte = ex.load(seed=0)
    assert Xtr.shape == (188, 1) and Ytr.shape == (188, 3) and Xte.shape == (47, 1)
    import smallchains as sc

    # the example's network (its kernels then serve main() below too)
    chain = sc.SimpleChain(1, sc.TurboDense(16, "tanh"), sc.TurboDense(16, "tanh"), sc.TurboDense(3))
    model = sc.add_loss(chain, sc.CustomLoss(ex.pinball, Ytr))
    diff = ex.torch_gradient_check(chain, model, Xtr, Ytr, sc.init_params(chain, seed=1))
    assert diff < 1e-12
    res = ex.main(["--iters", "300"])
    assert res["history"][-1] < 0.5 * res["history"][0]
    cov = [res["coverage"][t] for t in sorted(res["coverage"])]
    assert cov[0] < cov[1] < cov[2] and cov[0] < 0.3 and cov[2] > 0.7
