"""SGD (momentum, dampening, Nesterov) step for step against ``torch.optim.SGD``; its
validation; its update kernel allocates nothing and runs the same inside the compiled
training loop.

Adam and RMSProp are compared step for step with torch in tests/test_training.py
(``test_optimizer_matches_torch``), together with plain SGD and SGD with momentum at the
suite's float64 tolerance; the float64 comparisons here are much tighter (1e-14).
"""

import math
import re

import numpy as np
import pytest
from numba import njit

import smallchains as sc
from smallchains import optim
from smallchains._config import JIT_OPTIONS
from conftest import assert_close, get_chain, make_data, make_model, random_params

#: torch.optim.SGD keyword sets; every branch of sgd_update (no momentum, plain momentum,
#: dampened, Nesterov) is reached
SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "dampening": dict(lr=0.05, momentum=0.9, dampening=0.5),
    "dampening_small_mu": dict(lr=0.2, momentum=0.3, dampening=0.1),
    "dampening_one": dict(lr=0.05, momentum=0.8, dampening=1.0),
    "nesterov_low_mu": dict(lr=0.3, momentum=0.1, nesterov=True),
}

#: float64: torch and smallchains agree to a few ulps (measured bitwise equal here)
EXACT64 = dict(rtol=1e-14, atol=1e-15)


def _torch_pair(torch, kw, p):
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    return tp, torch.optim.SGD([tp], **kw)


def _gradients(rng, n, dtype):
    # magnitudes over four decades, some exact zeros
    g = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)
    g[rng.integers(0, n, 3)] = 0.0
    return g.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_torch_step_for_step(torch, case, dtype):
    kw = SGD_CASES[case]
    rng = np.random.default_rng(7)
    n = 41
    p = rng.standard_normal(n).astype(dtype)
    p0 = p.copy()
    tp, topt = _torch_pair(torch, kw, p)
    opt = sc.SGD(**kw)
    tol = EXACT64 if dtype == np.float64 else {}
    for step in range(12):
        g = _gradients(rng, n, dtype)
        opt.step(p, g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        assert p.dtype == dtype
        assert_close(p, tp.detach().numpy(), dtype, err_msg=f"{case} step {step}", **tol)
        if kw.get("momentum", 0.0):
            buf = topt.state[tp]["momentum_buffer"].numpy()
            assert_close(opt.state[0], buf, dtype, err_msg=f"{case} buffer step {step}", **tol)
    assert opt.t == 12
    assert np.abs(p - p0).max() > 1e-2  # the steps moved p


def test_sgd_variants_differ():
    """The hyperparameters reach the kernel: each variant gives another trajectory."""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(20)
    grads = [rng.standard_normal(20) for _ in range(4)]
    finals = {}
    for case, kw in SGD_CASES.items():
        if kw["lr"] != 0.05:
            continue
        p, opt = p0.copy(), sc.SGD(**kw)
        for g in grads:
            opt.step(p, g)
        finals[case] = p
    names = list(finals)
    assert len(names) == 4
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(finals[a] - finals[b]).max() > 1e-3, (a, b)


def test_sgd_reset_restarts_the_buffer_like_a_new_torch_optimizer(torch):
    kw = SGD_CASES["dampening"]
    rng = np.random.default_rng(11)
    p = rng.standard_normal(9)
    opt = sc.SGD(**kw)
    for _ in range(3):
        opt.step(p, rng.standard_normal(9))
    opt.reset()
    tp, topt = _torch_pair(torch, kw, p)  # fresh torch optimizer from the current p
    for step in range(3):
        g = rng.standard_normal(9)
        opt.step(p, g)
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        assert_close(p, tp.detach().numpy(), np.float64, err_msg=f"step {step}", **EXACT64)


def test_sgd_nesterov_in_compiled_training_loop_matches_python_steps():
    """train_unbatched calls sgd_update from compiled code with the 4-entry hyper array:
    the result equals valgrad + opt.step in Python, and differs from plain momentum."""
    X, labels = make_data("clf", 40, seed=5)
    model = make_model("clf", labels)
    p0 = random_params(model.chain, seed=6)
    G = sc.alloc_threaded_grad(model.chain, n_threads=1, dtype=np.float64)
    p, opt = p0.copy(), sc.SGD(0.1, momentum=0.9, nesterov=True)
    hist = sc.train_unbatched(G, p, model, X, opt, 6)
    q, ref = p0.copy(), sc.SGD(0.1, momentum=0.9, nesterov=True)
    for step in range(6):
        loss, g = sc.valgrad(model, X, q)
        assert_close(hist[step], loss, np.float64, err_msg=f"loss {step}")
        ref.step(q, g)
    assert_close(p, q, np.float64)
    assert opt.t == ref.t == 6
    r = p0.copy()
    sc.train_unbatched(G, r, model, X, sc.SGD(0.1, momentum=0.9), 6)
    assert np.abs(r - p).max() > 1e-4  # nesterov is not ignored


# --------------------------------------------------------------------------------------
# validation

@pytest.mark.parametrize("kw", [
    dict(lr=0.1, nesterov=True),                              # no momentum
    dict(lr=0.1, momentum=0.0, nesterov=True),
    dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),  # dampening
], ids=["no-momentum", "zero-momentum", "dampening"])
def test_nesterov_needs_momentum_and_no_dampening_like_torch(torch, kw):
    tp = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        torch.optim.SGD([tp], **kw)
    with pytest.raises(ValueError, match=r"SGD: Nesterov momentum requires a momentum > 0 and "
                                         r"zero dampening"):
        sc.SGD(**kw)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(dampening=-0.1), ValueError, r"SGD: dampening must be in \[0, 1\], got -0.1"),
    (dict(dampening=1.5), ValueError, r"SGD: dampening must be in \[0, 1\], got 1.5"),
    (dict(dampening=math.nan), ValueError, r"SGD: dampening must be in \[0, 1\]"),
    (dict(dampening=math.inf), ValueError, r"SGD: dampening must be in \[0, 1\]"),
    (dict(dampening="0.1"), TypeError, r"SGD: dampening must be a real number"),
    (dict(momentum=0.9, nesterov=1), TypeError, r"SGD: nesterov must be a bool, got int"),
    (dict(momentum=0.9, nesterov="yes"), TypeError, r"SGD: nesterov must be a bool"),
], ids=["damp-neg", "damp-big", "damp-nan", "damp-inf", "damp-str", "nest-int", "nest-str"])
def test_bad_sgd_hyperparameters(kw, exc, match):
    with pytest.raises(exc, match=match):
        sc.SGD(0.1, **kw)


def test_good_sgd_hyperparameters_accepted():
    s = sc.SGD(0.1, momentum=np.float32(0.5), dampening=np.float64(1.0), nesterov=np.bool_(False))
    assert (s.momentum, s.dampening, s.nesterov) == (0.5, 1.0, False)
    assert type(s.dampening) is float and type(s.nesterov) is bool
    assert sc.SGD(0.1, momentum=0.9, nesterov=True).nesterov is True
    assert "nesterov=True" in repr(sc.SGD(0.1, momentum=0.9, nesterov=True))
    # dampening without momentum is ignored, as in torch
    p, q = np.ones(4), np.ones(4)
    sc.SGD(0.1, dampening=0.7).step(p, np.full(4, 2.0))
    sc.SGD(0.1).step(q, np.full(4, 2.0))
    np.testing.assert_array_equal(p, q)


def test_nesterov_assigned_later_is_checked_before_anything_changes():
    opt = sc.SGD(0.1)
    opt.nesterov = True
    p = np.ones(5)
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        opt.step(p, np.ones(5))
    np.testing.assert_array_equal(p, np.ones(5))
    assert opt.t == 0 and opt.state is None


# --------------------------------------------------------------------------------------
# the kernel allocates nothing

_ALLOC = re.compile(r"@(NRT_MemInfo_alloc\w*|NRT_MemInfo_new\w*|NRT_Allocate\w*)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["sgd", "adam", "rmsprop"])
def test_update_kernels_allocate_nothing(kind, dtype):
    """No numba runtime allocation anywhere in the compiled update (checked in its LLVM
    IR, for every branch at once: a temporary array would show as NRT_MemInfo_alloc).
    numba disables inspection of code loaded from its cache, so the kernel's Python
    source is compiled again here, with the same options but no cache."""
    opt = {"sgd": lambda: sc.SGD(0.1, momentum=0.9, nesterov=True), "adam": sc.Adam,
           "rmsprop": sc.RMSProp}[kind]()
    p = np.ones(8, dtype=dtype)
    state, hyper = opt.prepare(p)
    kernel = opt.update_kernel()
    assert kernel is getattr(optim, optim.UPDATE_KERNELS[kind][1])
    fresh = njit(**dict(JIT_OPTIONS, cache=False))(kernel.py_func)
    fresh(p, np.ones_like(p), state, hyper, 1, 0, p.shape[0])
    assert p[0] != 1.0  # it ran
    (sig,) = fresh.signatures
    found = sorted(set(_ALLOC.findall(fresh.inspect_llvm(sig))))
    assert not found, f"{kind} update allocates: {found}"
