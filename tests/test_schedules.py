"""Learning-rate schedules: values equal torch.optim.lr_scheduler's, and a scheduled run
equals stepping the optimizer by hand with the learning rate changed every step (or
epoch), bitwise; bad schedules are refused before training."""

from __future__ import annotations

import numpy as np
import pytest

import smallchains as sc
from smallchains import schedules
from conftest import deep_training_setup


def _torch_lrs(torch, make, n):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return np.array(out)


@pytest.mark.parametrize("name", ["step", "exponential", "cosine", "warmup"])
def test_schedules_match_torch(torch, name):
    S = torch.optim.lr_scheduler
    ours, make = {
        "step": (schedules.step(0.1, 3, gamma=0.5), lambda o: S.StepLR(o, 3, gamma=0.5)),
        "exponential": (schedules.exponential(0.1, 0.9), lambda o: S.ExponentialLR(o, 0.9)),
        "cosine": (schedules.cosine(0.1, 10, min_lr=1e-3), lambda o: S.CosineAnnealingLR(o, 10, eta_min=1e-3)),
        "warmup": (schedules.linear_warmup(0.1, 4, start_factor=0.25),
                   lambda o: S.LinearLR(o, start_factor=0.25, total_iters=4)),
    }[name]
    n = 11 if name == "cosine" else 20  # torch's cosine turns back up after T_max; ours stays
    np.testing.assert_allclose([ours(k) for k in range(n)], _torch_lrs(torch, make, n), rtol=1e-12)


_setup = deep_training_setup


def test_scheduled_unbatched_equals_stepping_by_hand():
    model, X, p0, G = _setup()
    sched = schedules.linear_warmup(schedules.cosine(3e-3, 12, min_lr=1e-4), 3)
    p, opt = p0.copy(), sc.Adam(1.0)  # opt.lr is not used, nor changed
    h = sc.train_unbatched(G, p, model, X, opt, 12, lr_schedule=sched)
    assert opt.lr == 1.0 and opt.t == 12
    q, opt2 = p0.copy(), sc.Adam()
    for k in range(12):
        loss, g = sc.valgrad(model, X, q)
        assert loss == pytest.approx(float(h[k]), rel=1e-6)
        opt2.lr = sched(k)
        opt2.step(q, g)
    np.testing.assert_array_equal(p, q)


def test_scheduled_batched_equals_one_epoch_at_a_time():
    model, X, p0, G = _setup()
    sched = schedules.step(1e-2, 2, gamma=0.3)
    p, opt = p0.copy(), sc.SGD(1.0, momentum=0.9)
    h = sc.train_batched(G, p, model, X, opt, 5, batch_size=16, shuffle=False, lr_schedule=sched)
    q, opt2 = p0.copy(), sc.SGD(1.0, momentum=0.9)
    for e in range(5):
        opt2.lr = sched(e)
        he = sc.train_batched(G, q, model, X, opt2, 1, batch_size=16, shuffle=False)
        assert he[0] == h[e]
    np.testing.assert_array_equal(p, q)


@pytest.mark.parametrize("bad, err", [(lambda k: 0.0, ValueError), (lambda k: float("nan"), ValueError),
                                      (lambda k: "0.1", ValueError), (0.1, TypeError)])
def test_bad_schedules_are_refused_before_training(bad, err):
    model, X, p0, G = _setup()
    p = p0.copy()
    with pytest.raises(err, match="lr_schedule"):
        sc.train_unbatched(G, p, model, X, sc.Adam(), 3, lr_schedule=bad)
    with pytest.raises(err, match="lr_schedule"):
        sc.train_batched(G, p, model, X, sc.Adam(), 3, lr_schedule=bad)
    np.testing.assert_array_equal(p, p0)
    with pytest.raises(ValueError, match="lr"):
        schedules.cosine(-1.0, 10)
