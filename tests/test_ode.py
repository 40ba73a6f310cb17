"""smallchains.ode: Dormand-Prince solve, backsolve adjoint, scipy adapter, bad input.

Reference values: matrix exponentials (linear ODE), float64 central finite differences of
the whole solve, scipy's DOP853 at tight tolerances, and (if installed) torchdiffeq.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

import smallchains as sc
from conftest import assert_close, central_fd, load_example
from smallchains import ode


# --- problems ----------------------------------------------------------------------------

@njit
def linear_rhs(t, u, p, du, work):
    """du/dt = A u with A = p.reshape(2, 2)."""
    du[0] = p[0] * u[0] + p[1] * u[1]
    du[1] = p[2] * u[0] + p[3] * u[1]


@njit
def linear_vjp(t, u, p, a, du, ubar, pbar, work):
    linear_rhs(t, u, p, du, work)
    ubar[0] = p[0] * a[0] + p[2] * a[1]
    ubar[1] = p[1] * a[0] + p[3] * a[1]
    pbar[0], pbar[1], pbar[2], pbar[3] = a[0] * u[0], a[0] * u[1], a[1] * u[0], a[1] * u[1]


LINEAR = ode.ODEFunction(linear_rhs, linear_vjp, 2, 4, 0, np.float64)
A = np.array([-0.3, 1.1, -0.9, -0.2])


@njit
def cube(u):
    return u * u * u


@njit
def dcube(u):
    return 3.0 * u * u


NET = sc.SimpleChain(2, sc.TurboDense(6, "tanh"), sc.TurboDense(2))


def neural(n_samples=3, input_map=None, **kw):
    p = sc.init_params(NET, seed=1, dtype=np.float64)
    p += 0.05 * np.random.default_rng(2).standard_normal(p.size)  # nonzero biases
    f = ode.chain_rhs(NET, n_samples, input_map=input_map)
    return f, p, ode.Dopri5(f, param_groups=NET, **kw)


# --- forward solve -----------------------------------------------------------------------

def test_linear_solution_matches_matrix_exponential():
    from scipy.linalg import expm
    s = ode.Dopri5(LINEAR, rtol=1e-11, atol=1e-13)
    u0, t = np.array([1.0, -0.5]), np.linspace(0.0, 3.0, 7)
    U = s.solve(u0, t, A)
    ref = np.stack([expm(A.reshape(2, 2) * ti) @ u0 for ti in t])
    assert_close(U, ref, np.float64, rtol=1e-9, atol=1e-11)
    assert s.stats["nfe"] > 0 and s.stats["accepted"] > 0


def test_backward_in_time_and_single_time():
    from scipy.linalg import expm
    s = ode.Dopri5(LINEAR, rtol=1e-11, atol=1e-13)
    u0 = np.array([0.3, 0.8])
    t = np.array([2.0, 1.5, 0.0])
    U = s.solve(u0, t, A)
    ref = np.stack([expm(A.reshape(2, 2) * (ti - 2.0)) @ u0 for ti in t])
    assert_close(U, ref, np.float64, rtol=1e-9, atol=1e-11)
    U1 = s.solve(u0, np.array([4.0]), A)
    assert np.array_equal(U1, u0[None])
    u0bar, pbar = s.vjp(np.array([4.0]), U1, np.array([[2.0, 3.0]]), A)
    assert np.array_equal(u0bar, [2.0, 3.0]) and np.array_equal(pbar, np.zeros(4))


def test_neural_solution_matches_scipy():
    from scipy.integrate import solve_ivp
    f, p, s = neural(input_map=(cube, dcube))
    u0 = np.random.default_rng(0).uniform(-1, 1, (3, 2))
    t = np.linspace(0.0, 1.5, 6)
    U = s.solve(u0, t, p)
    assert U.shape == (6, 3, 2)
    fun = ode.ScipyAdapter(f).fun
    ref = solve_ivp(fun, (0.0, 1.5), u0.ravel(), method="DOP853", t_eval=t, rtol=1e-12,
                    atol=1e-12, args=(p,)).y.T.reshape(6, 3, 2)
    assert_close(U, ref, np.float64, rtol=1e-6, atol=1e-8)


# --- adjoint -----------------------------------------------------------------------------

def _weighted_loss(s, u0, t, p, W):
    return float((W * s.solve(u0, t, p)).sum())


@pytest.mark.parametrize("adjoint", ["discrete", "backsolve"])
@pytest.mark.parametrize("input_map", [None, (cube, dcube), ("np.sin(u) + u", "math.cos(u) + 1")],
                         ids=["plain", "cube-njit", "sin-expr"])
def test_adjoint_matches_finite_differences(input_map, adjoint):
    f, p, s = neural(input_map=input_map, rtol=1e-11, atol=1e-12, adjoint=adjoint)
    rng = np.random.default_rng(3)
    u0 = rng.uniform(-1, 1, (3, 2))
    t = np.array([0.0, 0.4, 0.5, 1.2])
    W = rng.standard_normal((4, 3, 2))
    U = s.solve(u0, t, p)
    u0bar, pbar = s.vjp(t, U, W, p)
    fd_p = central_fd(lambda q: _weighted_loss(s, u0, t, q, W), p)
    fd_u = central_fd(lambda v: _weighted_loss(s, v.reshape(3, 2), t, p, W), u0.ravel())
    assert_close(pbar, fd_p, "fd", rtol=2e-6, atol=1e-7)
    assert_close(u0bar.ravel(), fd_u, "fd", rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("adjoint", ["discrete", "backsolve"])
def test_linear_adjoint_matches_finite_differences(adjoint):
    s = ode.Dopri5(LINEAR, rtol=1e-11, atol=1e-13, adjoint=adjoint)
    u0, t = np.array([1.0, 0.4]), np.array([0.0, 0.7, 2.0])
    W = np.array([[0.0, 0.0], [1.0, -2.0], [0.5, 0.25]])
    u0bar, pbar = s.vjp(t, s.solve(u0, t, A), W, A)
    assert_close(pbar, central_fd(lambda q: _weighted_loss(s, u0, t, q, W), A), "fd")
    assert_close(u0bar, central_fd(lambda v: _weighted_loss(s, v, t, A, W), u0), "fd")


def test_adjoint_matches_scipy_backsolve():
    f, p, s = neural(rtol=1e-10, atol=1e-12)
    rng = np.random.default_rng(4)
    u0, t = rng.uniform(-1, 1, (3, 2)), np.linspace(0.0, 1.0, 5)
    U = s.solve(u0, t, p)
    Ubar = rng.standard_normal(U.shape)
    u0bar, pbar = s.vjp(t, U, Ubar, p)
    u0bar2, pbar2 = ode.ScipyAdapter(f).vjp(t, U, Ubar, p)
    assert u0bar2.shape == u0bar.shape == (3, 2)
    assert_close(pbar, pbar2, np.float64, rtol=1e-7, atol=1e-9)
    assert_close(u0bar, u0bar2, np.float64, rtol=1e-7, atol=1e-9)


def test_seminorm_takes_fewer_steps_same_gradient():
    f, p, mixed = neural(rtol=1e-8, atol=1e-10, adjoint="backsolve")
    semi = ode.Dopri5(f, rtol=1e-8, atol=1e-10, adjoint_norm="seminorm", adjoint="backsolve")
    rng = np.random.default_rng(5)
    u0, t = rng.uniform(-1, 1, (3, 2)), np.linspace(0.0, 2.0, 3)
    U = mixed.solve(u0, t, p)
    Ubar = rng.standard_normal(U.shape)
    g1 = mixed.vjp(t, U, Ubar, p)[1]
    n1 = mixed.stats["nfe"]
    g2 = semi.vjp(t, U, Ubar, p)[1]
    assert semi.stats["nfe"] <= n1
    assert_close(g2, g1, np.float64, rtol=1e-5, atol=1e-7)


def test_torchdiffeq_agrees_step_for_step():
    """Backsolve adjoint: torchdiffeq's odeint_adjoint, evaluation for evaluation."""
    torch = pytest.importorskip("torch")
    tde = pytest.importorskip("torchdiffeq")
    f, p, s = neural(n_samples=4, input_map=(cube, dcube), adjoint="backsolve")
    rng = np.random.default_rng(6)
    u0, t = rng.uniform(-1.5, 1.5, (4, 2)), np.linspace(0.0, 0.5, 6)
    W = rng.standard_normal((6, 4, 2))
    calls = [0]

    class Func(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(2, 6).double(), torch.nn.Linear(6, 2).double()

        def forward(self, t, y):
            calls[0] += 1
            return self.l2(torch.tanh(self.l1(y ** 3)))

    func = Func()
    views = NET.param_views(p)
    with torch.no_grad():
        for lin, v in zip((func.l1, func.l2), views):
            lin.weight.copy_(torch.from_numpy(v["W"]))
            lin.bias.copy_(torch.from_numpy(v["b"]))
    y0 = torch.from_numpy(u0).requires_grad_(True)
    pred = tde.odeint_adjoint(func, y0, torch.from_numpy(t), method="dopri5", rtol=1e-7, atol=1e-9)
    n_fwd = calls[0]
    (pred * torch.from_numpy(W)).sum().backward()
    grad = np.concatenate([q.grad.numpy().ravel() for q in
                           (func.l1.weight, func.l1.bias, func.l2.weight, func.l2.bias)])
    U = s.solve(u0, t, p)
    assert s.stats["nfe"] == n_fwd
    u0bar, pbar = s.vjp(t, U, W, p)
    assert s.stats["nfe"] == calls[0] - n_fwd
    assert_close(U, pred.detach().numpy(), np.float64, rtol=1e-12, atol=1e-13)
    assert_close(pbar, grad, np.float64, rtol=1e-10, atol=1e-12)
    assert_close(u0bar, y0.grad.numpy(), np.float64, rtol=1e-10, atol=1e-12)


def test_spiral_data_matches_torchdiffeq():
    torch = pytest.importorskip("torch")
    tde = pytest.importorskip("torchdiffeq")
    t, y = sc.datasets.spiral(200, 5.0)
    A_ = torch.from_numpy(sc.datasets.SPIRAL_A)
    ref = tde.odeint(lambda s, v: torch.mm(v ** 3, A_), torch.tensor([[2.0, 0.0]], dtype=torch.float64),
                     torch.from_numpy(t), method="dopri5")
    assert_close(y, ref[:, 0].numpy(), np.float64, rtol=1e-12, atol=1e-13)


# --- embedding: a training loop written in numba ------------------------------------------

TRAIN_SCRIPT = r"""
import json, sys
import numpy as np
from numba import njit
from numba.core.runtime import rtsys
import smallchains as sc
from smallchains import ode
from smallchains.ode import dopri5, backsolve, N_SCRATCH_ROWS

net = sc.SimpleChain(2, sc.TurboDense(6, "tanh"), sc.TurboDense(2))
f = ode.compile_rhs(ode.chain_rhs(net, 3))
rhs, rhs_vjp = f.rhs, f.rhs_vjp

@njit
def train(u0, ts, target, p, iters, lr, work, S, Sa, Z2, t2, U, Ubar, u0bar, pbar, fb, ab, stats):
    losses = np.empty(iters)  # allocated once per call, not per iteration
    for it in range(iters):
        code = dopri5(rhs, ts, u0, p, work, 1e-7, 1e-9, fb, U, S, 10000, stats)
        if code != 0:
            return losses, code
        loss = 0.0
        for i in range(U.shape[0]):
            for j in range(U.shape[1]):
                d = U[i, j] - target[i, j]
                loss += d * d
                Ubar[i, j] = 2.0 * d
        losses[it] = loss
        code = backsolve(rhs, rhs_vjp, ts, U, Ubar, p, work, 1e-7, 1e-9, ab, Sa, Z2, t2, 10000,
                         stats, u0bar, pbar)
        if code != 0:
            return losses, code
        for k in range(p.shape[0]):
            p[k] -= lr * pbar[k]
    return losses, 0

n, m = 6, 12 + net.n_params
p = sc.init_params(net, seed=0, dtype=np.float64)
ts = np.linspace(0.0, 1.0, 5)
u0 = np.linspace(-1, 1, n)
target = np.tile(u0, (5, 1)) * 0.5
args = (u0, ts, target, p, 0, 1e-3, np.zeros(f.work_size), np.zeros((N_SCRATCH_ROWS, n)),
        np.zeros((N_SCRATCH_ROWS, m)), np.zeros((2, m)), np.zeros(2), np.zeros((5, n)),
        np.zeros((5, n)), np.zeros(n), np.zeros(net.n_params), np.array([0, n]),
        np.array([0, n, 2 * n, m]), np.zeros(3, dtype=np.int64))

def count(iters):
    a = list(args); a[4] = iters
    before = rtsys.get_allocation_stats()
    losses, code = train(*a)
    after = rtsys.get_allocation_stats()
    return after.alloc - before.alloc, float(losses[0]), float(losses[-1]), code

count(1)
one, l0, _, c1 = count(1)
many, first, last, c2 = count(50)
print(json.dumps({"one": one, "many": many, "first": first, "last": last, "codes": [c1, c2]}))
"""


def test_numba_training_loop_allocates_nothing_per_iteration():
    env = dict(os.environ, NUMBA_NRT_STATS="1")
    res = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["codes"] == [0, 0]
    assert out["many"] == out["one"], out  # 50 iterations allocate what 1 does
    assert out["last"] < out["first"], out  # and gradient descent reduced the loss


# --- bad input ---------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors_and_leave_arrays_untouched():
    f, p, s = neural()
    u0 = np.zeros((3, 2))
    t = np.linspace(0.0, 1.0, 4)
    p_before, u0_before = p.copy(), u0.copy()
    with pytest.raises(ValueError, match="u0 must have shape"):
        s.solve(np.zeros(5), t, p)
    with pytest.raises(TypeError, match="u0 must be a float array"):
        s.solve(np.zeros((3, 2), dtype=np.int64), t, p)
    with pytest.raises(ValueError, match="u0 must be finite"):
        s.solve(np.full((3, 2), np.nan), t, p)
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        s.solve(u0, np.array([0.0, 1.0, 0.5]), p)
    with pytest.raises(ValueError, match="1-D array"):
        s.solve(u0, np.zeros((2, 2)), p)
    with pytest.raises(ValueError, match="t must be finite"):
        s.solve(u0, np.array([0.0, np.inf]), p)
    with pytest.raises(ValueError, match=r"p must be a \(%d,\) float64" % p.size):
        s.solve(u0, t, p.astype(np.float32))
    with pytest.raises(ValueError, match="p must be"):
        s.solve(u0, t, p[:-1])
    with pytest.raises(ValueError, match="out must be"):
        s.solve(u0, t, p, out=np.empty((3, 3, 2)))
    U = s.solve(u0, t, p)
    with pytest.raises(ValueError, match="Ubar must have shape"):
        s.vjp(t, U, np.zeros((3, 3, 2)), p)
    assert np.array_equal(p, p_before) and np.array_equal(u0, u0_before)


def test_bad_solver_options():
    f, p, _ = neural()
    with pytest.raises(ValueError, match="rtol"):
        ode.Dopri5(f, rtol=-1.0)
    with pytest.raises(ValueError, match="both be zero"):
        ode.Dopri5(f, rtol=0.0, atol=0.0)
    with pytest.raises(ValueError, match="adjoint_norm"):
        ode.Dopri5(f, adjoint_norm="max")
    with pytest.raises(ValueError, match="param_groups"):
        ode.Dopri5(f, param_groups=[1, 2])
    with pytest.raises(TypeError, match="float64 or float32"):
        ode.Dopri5(f._replace(dtype=np.float16))
    with pytest.raises(TypeError, match="does not compile"):  # float64 functions, said float32
        ode.Dopri5(f._replace(dtype=np.float32))
    with pytest.raises(TypeError, match="numba @njit function"):
        ode.Dopri5(f._replace(rhs=lambda *a: None))
    with pytest.raises(TypeError, match="does not compile"):
        ode.Dopri5(f._replace(rhs=njit(lambda t, u: None)))
    with pytest.raises(ValueError, match="n_out == n_in"):
        ode.chain_rhs(sc.SimpleChain(2, sc.TurboDense(3)), 4)
    with pytest.raises(ValueError, match="may only use u"):
        ode.chain_rhs(NET, 3, input_map=("__import__('os')", "1"))
    with pytest.raises(ValueError, match="not a Python expression"):
        ode.chain_rhs(NET, 3, input_map=("u**", "1"))
    with pytest.raises(TypeError, match="float64 or float32"):
        ode.chain_rhs(NET, 3, dtype=np.int64)
    with pytest.raises(TypeError, match="float64"):
        ode.ScipyAdapter(ode.chain_rhs(NET, 3, dtype=np.float32))


@njit
def blowup_rhs(t, u, p, du, work):
    du[0] = u[0] * u[0]  # u = 1 / (1 - t): infinite at t = 1


def test_blowup_raises():
    s = ode.Dopri5(ode.ODEFunction(blowup_rhs, None, 1, 0, 0, np.float64), max_steps=2000)
    with pytest.raises((RuntimeError, FloatingPointError), match="dopri5 forward solve"):
        s.solve(np.array([1.0]), np.array([0.0, 2.0]), np.zeros(0))
    with pytest.raises(ValueError, match="no rhs_vjp"):
        s.vjp(np.array([0.0, 0.5]), np.ones((2, 1)), np.ones((2, 1)), np.zeros(0))


# --- the example -------------------------------------------------------------------------

def test_example_neural_ode_spiral_trains():
    """It trains, and along the same losses with either adjoint over the first 100
    iterations (their gradients differ by the backsolve's tolerance; later the training,
    which is sensitive to small changes, drifts apart)."""
    mod = load_example("neural_ode_spiral.py")
    out = mod.main(["--niters", "200", "--test-freq", "100"])
    (_, _, total100), (_, _, total200) = out["history"]
    back = mod.main(["--niters", "100", "--test-freq", "50", "--adjoint", "backsolve"])
    disc = mod.main(["--niters", "100", "--test-freq", "50", "--checkpoints", "2"])
    for (_, b1, t1), (_, b2, t2) in zip(disc["history"], back["history"]):
        assert abs(b1 - b2) <= 1e-4 * b2 and abs(t1 - t2) <= 1e-4 * t2
    assert disc["history"][-1][1:] == out["history"][0][1:]  # checkpoints change nothing
    t, y = sc.datasets.spiral()
    _, p0, _ = mod.make_problem()
    full = ode.Dopri5(ode.chain_rhs(mod.make_problem()[0], 1, input_map=mod.CUBE))
    initial = float(np.abs(full.solve(y[0], t, p0) - y).mean())
    assert total200 < initial
