"""The discrete (discretise-then-optimise) adjoint of smallchains.ode.Dopri5: the exact
gradient of the discrete solution, checked against torch autograd through the same
Dormand-Prince steps and dense output (an independent implementation), diffrax with the
same steps (if installed), finite differences, for every checkpoint count, on a solve
with rejected steps; and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_close, central_fd
from smallchains import ode
from test_ode import LINEAR, A, NET, cube, dcube, neural

torch = pytest.importorskip("torch")

# Dormand-Prince tableau, midpoint weights and dense output, written again for torch
_A = [[1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
      [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
      [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]]
_C = [1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0]
_B = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
_M = [6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2,
      -2691868925 / 45128329728 / 2, 187940372067 / 1594534317056 / 2,
      -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2]


def torch_discrete_solve(f, u0, ts, steps):
    """The solution at ``ts`` of Dormand-Prince with the given steps ``(t_start, dt)``
    and 4th-order dense output (torchdiffeq's), in torch, for autograd."""
    t_start, dts = steps
    y, k1 = u0, f(t_start[0], u0)
    out, j = [u0], 1
    for t, dt in zip(t_start, dts):
        ks = [k1]
        for r in range(5):
            yr = y + dt * sum(a * k for a, k in zip(_A[r], ks))
            ks.append(f(t + _C[r] * dt, yr))
        y1 = y + dt * sum(b * k for b, k in zip(_B, ks))
        k7 = f(t + dt, y1)
        ks.append(k7)
        ym = y + dt * sum(m * k for m, k in zip(_M, ks))
        h = (t + dt) - t
        while j < len(ts) and (ts[j] - (t + dt)) * np.sign(dt) <= 0:
            x = (ts[j] - t) / h
            a = 2 * h * (k7 - k1) - 8 * (y1 + y) + 16 * ym
            b = h * (5 * k1 - 3 * k7) + 18 * y + 14 * y1 - 32 * ym
            c = h * (k7 - 4 * k1) - 11 * y - 5 * y1 + 16 * ym
            out.append(y + x * (h * k1 + x * (c + x * (b + x * a))))
            j += 1
        y, k1 = y1, k7
    assert j == len(ts)
    return torch.stack(out)


def _torch_net(p):
    views = NET.param_views(p)
    l1, l2 = torch.nn.Linear(2, 6).double(), torch.nn.Linear(6, 2).double()
    with torch.no_grad():
        for lin, v in zip((l1, l2), views):
            lin.weight.copy_(torch.from_numpy(v["W"]))
            lin.bias.copy_(torch.from_numpy(v["b"]))
    return (l1, l2), lambda t, y: l2(torch.tanh(l1(y ** 3)))


def _torch_grads(p, u0, ts, steps, W):
    (l1, l2), f = _torch_net(p)
    y0 = torch.from_numpy(u0).requires_grad_(True)
    U = torch_discrete_solve(f, y0, ts, steps)
    (U * torch.from_numpy(W)).sum().backward()
    g = np.concatenate([q.grad.numpy().ravel() for q in (l1.weight, l1.bias, l2.weight, l2.bias)])
    return U.detach().numpy(), y0.grad.numpy(), g


@pytest.mark.parametrize("checkpoints", ["all", 2])  # 1, 3, 5: bitwise the same (below)
@pytest.mark.parametrize("direction", [1, -1], ids=["forward", "backward-in-time"])
def test_gradient_is_autograd_of_the_same_steps(checkpoints, direction):
    f, p, s = neural(n_samples=4, input_map=(cube, dcube), checkpoints=checkpoints)
    rng = np.random.default_rng(6)
    u0 = rng.uniform(-1.5, 1.5, (4, 2))
    t = direction * np.array([0.0, 0.05, 0.3, 0.31, 1.4, 3.0])
    W = rng.standard_normal((6, 4, 2))
    U = s.solve(u0, t, p)
    steps = s.accepted_steps
    assert len(steps[0]) >= 8  # enough steps for the checkpoints to thin out
    u0bar, pbar = s.vjp(t, U, W, p)
    U_t, u0bar_t, pbar_t = _torch_grads(p, u0, t, steps, W)
    assert_close(U, U_t, np.float64, rtol=1e-12, atol=1e-13)
    assert_close(pbar, pbar_t, np.float64, rtol=1e-11, atol=1e-13)
    assert_close(u0bar, u0bar_t, np.float64, rtol=1e-11, atol=1e-13)
    assert s.stats["vjp"] == 6 * len(steps[0]) + 1


def test_checkpoint_counts_give_bitwise_the_same_gradient():
    f, p, s_all = neural(n_samples=3, checkpoints="all", rtol=1e-9, atol=1e-11)
    rng = np.random.default_rng(7)
    u0, t = rng.uniform(-1, 1, (3, 2)), np.linspace(0.0, 4.0, 9)
    W = rng.standard_normal((9, 3, 2))
    U = s_all.solve(u0, t, p)
    ref = s_all.vjp(t, U, W, p)
    n_all = s_all.stats["nfe"]
    for c in (1, 2, 3, 5):
        s = ode.Dopri5(f, rtol=1e-9, atol=1e-11, checkpoints=c)
        np.testing.assert_array_equal(s.solve(u0, t, p), U)
        got = s.vjp(t, U, W, p)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        assert s.stats["nfe"] > n_all  # states recomputed from the checkpoints


def test_rejected_steps_and_finite_differences():
    """A stiff-ish linear problem from a bad initial step: the solve rejects steps; the
    gradient is still the discrete one (torch), and close to finite differences of the
    whole adaptive solve (whose step sizes move with the parameters)."""
    s = ode.Dopri5(LINEAR, rtol=1e-6, atol=1e-8)
    A2 = np.array([-8.0, 3.0, -3.0, -0.5])
    u0, t = np.array([1.0, 0.4]), np.array([0.0, 0.7, 2.5])
    W = np.array([[0.0, 0.0], [1.0, -2.0], [0.5, 0.25]])
    U = s.solve(u0, t, A2)
    assert s.stats["rejected"] > 0
    u0bar, pbar = s.vjp(t, U, W, A2)

    def f(tt, y):
        M = torch.from_numpy(A2.reshape(2, 2))
        return M @ y

    pt = torch.from_numpy(A2.copy()).requires_grad_(True)
    y0 = torch.from_numpy(u0).requires_grad_(True)
    Ut = torch_discrete_solve(lambda tt, y: pt.reshape(2, 2) @ y, y0, t, s.accepted_steps)
    (Ut * torch.from_numpy(W)).sum().backward()
    assert_close(pbar, pt.grad.numpy(), np.float64, rtol=1e-12, atol=1e-14)
    assert_close(u0bar, y0.grad.numpy(), np.float64, rtol=1e-12, atol=1e-14)

    def loss(q):
        return float((W * ode.Dopri5(LINEAR, rtol=1e-6, atol=1e-8, adjoint="backsolve")
                      .solve(u0, t, q)).sum())
    assert_close(pbar, central_fd(loss, A2, h=1e-7), "fd", rtol=1e-4, atol=1e-6)


def test_matches_diffrax_with_the_same_steps():
    jax = pytest.importorskip("jax")
    diffrax = pytest.importorskip("diffrax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    f, p, s = neural(n_samples=4, input_map=(cube, dcube))
    rng = np.random.default_rng(8)
    u0, t = rng.uniform(-1.5, 1.5, (4, 2)), np.linspace(0.0, 2.0, 5)
    W = rng.standard_normal((5, 4, 2))
    U = s.solve(u0, t, p)
    u0bar, pbar = s.vjp(t, U, W, p)
    t_start, dts = s.accepted_steps
    grid = jnp.asarray(np.append(t_start, t_start[-1] + dts[-1]))
    views = NET.param_views(p)
    params = [(jnp.asarray(v["W"]), jnp.asarray(v["b"])) for v in views]

    def vf(tt, y, q):
        (W1, b1), (W2, b2) = q
        return jnp.tanh((y ** 3) @ W1.T + b1) @ W2.T + b2

    def loss(q, y0):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(vf), diffrax.Dopri5(), grid[0], grid[-1], None,
                                  y0, args=q, stepsize_controller=diffrax.StepTo(ts=grid),
                                  saveat=diffrax.SaveAt(ts=jnp.asarray(t)))
        return jnp.sum(sol.ys * W)

    gq, gy = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(u0))
    g = np.concatenate([np.asarray(a).ravel() for w in gq for a in w])
    assert_close(pbar, g, np.float64, rtol=1e-10, atol=1e-13)
    assert_close(u0bar, np.asarray(gy), np.float64, rtol=1e-10, atol=1e-13)


def test_vjp_needs_its_solve():
    f, p, s = neural()
    u0, t = np.zeros((3, 2)) + 0.3, np.array([0.0, 1.0])
    with pytest.raises(ValueError, match="differentiates the last solve"):
        s.vjp(t, np.zeros((2, 3, 2)), np.ones((2, 3, 2)), p)
    U = s.solve(u0, t, p)
    for args in ((t, U, U, p + 1.0), (t * 2, U, U, p), (t, U + 1.0, U, p)):
        with pytest.raises(ValueError, match="differentiates the last solve"):
            s.vjp(*args)
    s.vjp(t, U, U, p)  # the matching call works
    assert s.accepted_steps[0][0] == 0.0
    with pytest.raises(ValueError, match="checkpoints"):
        ode.Dopri5(f, checkpoints=0)
    with pytest.raises(ValueError, match="adjoint"):
        ode.Dopri5(f, adjoint="interpolating")
    assert ode.Dopri5(f, adjoint="backsolve").accepted_steps is None


def test_records_grow_for_long_solves():
    s = ode.Dopri5(LINEAR, rtol=1e-10, atol=1e-12)
    u0, t = np.array([1.0, 0.0]), np.linspace(0.0, 60.0, 4)
    U = s.solve(u0, t, np.array([0.0, 1.0, -1.0, 0.0]))  # a rotation: many steps
    assert len(s.accepted_steps[0]) > 64  # past the initial capacity
    u0bar, pbar = s.vjp(t, U, np.ones_like(U), np.array([0.0, 1.0, -1.0, 0.0]))
    assert np.isfinite(pbar).all()


@pytest.mark.parametrize("adjoint", ["discrete", "backsolve"])
def test_float32_against_float64(adjoint):
    """float32 states, parameters and network (float64 times and step arithmetic), at a
    tolerance float32 can meet: solution and gradient as float64's to that tolerance."""
    rng = np.random.default_rng(9)
    u0, t = rng.uniform(-1.5, 1.5, (4, 2)), np.linspace(0.0, 2.0, 5)
    W = rng.standard_normal((5, 4, 2))
    out = {}
    for dtype in (np.float64, np.float32):
        p = neural(n_samples=4)[1].astype(dtype)
        f = ode.chain_rhs(NET, 4, dtype, input_map=("u**3", "3*u**2"))
        s = ode.Dopri5(f, rtol=1e-5, atol=1e-7, adjoint=adjoint)
        U = s.solve(u0.astype(dtype), t, p)
        u0bar, pbar = s.vjp(t, U, W.astype(dtype), p)
        assert U.dtype == pbar.dtype == u0bar.dtype == dtype
        out[dtype] = (U, u0bar, pbar)
    for a, b in zip(out[np.float32], out[np.float64]):
        assert_close(a.astype(np.float64), b, np.float64, rtol=2e-4, atol=2e-5)


def test_independent_trajectories():
    """trajectories=k: each start point its own adaptive solve; the same solution and
    gradient (bitwise) as k separate one-trajectory solves summed in order, for any
    thread count; close to the joint solve's (its steps differ)."""
    _, p, joint = neural(n_samples=5, input_map=(cube, dcube))
    f1 = ode.chain_rhs(NET, 1, input_map=(cube, dcube))
    rng = np.random.default_rng(10)
    u0 = rng.uniform(-1.5, 1.5, (5, 2))
    u0[0] *= 0.1  # slow: fewer steps than the others
    t = np.linspace(0.0, 2.0, 6)
    W = rng.standard_normal((6, 5, 2))
    results = []
    for nt in (1, 2):
        s = ode.Dopri5(f1, trajectories=5, n_threads=nt)
        U = s.solve(u0, t, p)
        results.append((U, *s.vjp(t, U, W, p)))
        steps = [len(a) for a, _ in s.accepted_steps]
        assert min(steps) < max(steps)  # their own step sizes
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    U, u0bar, pbar = results[0]
    single = ode.Dopri5(f1)
    total = np.zeros_like(p)
    for i in range(5):
        Ui = single.solve(u0[i], t, p)
        np.testing.assert_array_equal(Ui, U[:, i])
        gi, pi = single.vjp(t, Ui, W[:, i], p)
        np.testing.assert_array_equal(gi, u0bar[i])
        total += pi
    np.testing.assert_array_equal(pbar, total)
    Uj = joint.solve(u0, t, p)
    _, pj = joint.vjp(t, Uj, W, p)
    assert_close(U, Uj, np.float64, rtol=1e-5, atol=1e-7)
    assert_close(pbar, pj, np.float64, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="trajectories"):
        ode.Dopri5(f1, trajectories=0)
    with pytest.raises(ValueError, match="discrete adjoint"):
        ode.Dopri5(f1, trajectories=2, adjoint="backsolve")
    with pytest.raises(ValueError, match=r"u0 must have shape \(5,\)"):
        ode.Dopri5(f1, trajectories=5).solve(u0[:4], t, p)
