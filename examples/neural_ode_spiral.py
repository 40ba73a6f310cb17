"""Train a neural ODE on the spiral of torchdiffeq's ``examples/ode_demo.py``.

True dynamics ``dy/dt = (y^3) A``, ``A = [[-0.1, 2], [-2, -0.1]]``, ``y(0) = [2, 0]``,
observed at 1000 times in [0, 25] (the dopri5 solution). Model ``dy/dt = net(y^3)`` with
``net`` 2 -> 50 tanh -> 2, weights normal(0, 0.1), zero biases. Each iteration takes 20
random start points and integrates them together, as ONE 20x2 state, over the next 10
time points with adaptive Dormand-Prince 5(4) (rtol 1e-7, atol 1e-9); loss = mean |pred -
true|; the gradient comes from the discrete adjoint (``--adjoint backsolve``: the
backsolve adjoint of the demo, torchdiffeq's ``odeint_adjoint``); RMSprop(lr=1e-3); 2000
iterations.
Everything numerical runs in numba (smallchains.ode); Python only loops over iterations.

    python examples/neural_ode_spiral.py                    # 2000 iterations
    python examples/neural_ode_spiral.py --niters 300 --plot spiral.png

With ``--plot PATH`` (``--png`` is the older name; needs matplotlib) the observed data and
the fitted trajectory from ``y(0)`` are plotted: phase portrait and both components
over time.
:func:`main` takes an argv list and returns a dict of results; the helpers
(:func:`make_problem`, :func:`get_batch`) are shared with ``bench/neural_ode.py``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import smallchains as sc
from smallchains import ode

DATA_SIZE, BATCH_TIME, BATCH_SIZE = 1000, 10, 20


#: du/dt = net(u**3): the elementwise map and its derivative, as expressions in u
CUBE = ("u**3", "3*u**2")


def make_problem(dtype=np.float64, param_seed=0, batch_size=BATCH_SIZE, **solver_options):
    """Return ``(net, p, solver)``: the 2 -> 50 tanh -> 2 chain, its initial parameters
    (weights normal(0, 0.1), zero biases, as the demo) and a :class:`smallchains.ode.Dopri5`
    for ``du/dt = net(u^3)`` over ``batch_size`` start points."""
    net = sc.SimpleChain(2, sc.TurboDense(50, "tanh"), sc.TurboDense(2))
    p = np.zeros(net.n_params, dtype=dtype)
    rng = np.random.default_rng(param_seed)
    for views in net.param_views(p):
        views["W"][...] = rng.normal(0.0, 0.1, size=views["W"].shape)
    f = ode.chain_rhs(net, batch_size, dtype, input_map=CUBE)
    solver = ode.Dopri5(f, param_groups=net, **solver_options)
    return net, p, solver


def get_batch(rng, true_y, batch_time=BATCH_TIME, batch_size=BATCH_SIZE):
    """As the demo: 20 distinct start indices; returns (y0 (20, 2), Y (10, 20, 2))."""
    s = rng.choice(np.arange(true_y.shape[0] - batch_time), batch_size, replace=False)
    return true_y[s], np.stack([true_y[s + i] for i in range(batch_time)])


def loss_and_grad(solver, p, y0, t, Y):
    """mean |U - Y| and its gradient dL/dp (forward solve + backsolve adjoint)."""
    U = solver.solve(y0, t, p)
    diff = U - Y
    Ubar = np.sign(diff) / diff.size
    _, pbar = solver.vjp(t, U, Ubar, p)
    return float(np.abs(diff).mean()), pbar


def plot(path, t, data, fit, niters):
    """The observations and the fitted trajectory: phase portrait and ``y(t)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    ax0.plot(data[:, 0], data[:, 1], "k.", ms=2, alpha=0.5, label="data")
    ax0.plot(fit[:, 0], fit[:, 1], "C3-", lw=1.2, label="fit")
    ax0.set_xlabel("y1"), ax0.set_ylabel("y2"), ax0.set_title("phase portrait", fontsize=10)
    ax0.set_aspect("equal", adjustable="datalim")
    for i, c in enumerate(("C0", "C1")):
        ax1.plot(t, data[:, i], ".", color=c, ms=2, alpha=0.5, label=f"y{i + 1} data")
        ax1.plot(t, fit[:, i], "-", color=c, lw=1.2, label=f"y{i + 1} fit")
    ax1.set_xlabel("t"), ax1.set_title("components over time", fontsize=10)
    ax0.legend(fontsize=8, loc="best")
    ax1.legend(fontsize=8, loc="upper right")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
    fig.suptitle(f"neural ODE du/dt = net(u^3) after {niters} iterations, "
                 f"solved from y(0) over [0, {t[-1]:g}]", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--niters", type=int, default=2000)
    ap.add_argument("--test-freq", type=int, default=100, help="print every N iterations")
    ap.add_argument("--seed", type=int, default=0, help="seed of parameters and batches")
    ap.add_argument("--plot", "--png", dest="plot", default=None, metavar="PATH",
                    help="save a plot of data and fit here (PNG; needs matplotlib)")
    ap.add_argument("--adjoint", choices=("discrete", "backsolve"), default="discrete")
    ap.add_argument("--checkpoints", default="all",
                    help='states kept by the discrete adjoint: "all" or a count')
    args = ap.parse_args(argv)
    if args.niters < 1 or args.test_freq < 1:
        ap.error("--niters and --test-freq must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    t, true_y = sc.datasets.spiral(DATA_SIZE)
    ck = args.checkpoints if args.checkpoints == "all" else int(args.checkpoints)
    net, p, solver = make_problem(param_seed=args.seed, adjoint=args.adjoint, checkpoints=ck)
    full = ode.Dopri5(ode.chain_rhs(net, 1, input_map=CUBE))
    opt = sc.RMSProp(1e-3)
    rng = np.random.default_rng(args.seed)
    batch_t = t[:BATCH_TIME]
    y0, Y = get_batch(np.random.default_rng(12345), true_y)  # warm-up call
    loss_and_grad(solver, p.copy(), y0, batch_t, Y)
    full.solve(true_y[0], t, p)
    compile_s = time.perf_counter() - t0
    print(f"setup (data, compile or cache load, first call): {compile_s:.2f} s")

    history = []
    t_train = time.perf_counter()
    for it in range(1, args.niters + 1):
        y0, Y = get_batch(rng, true_y)
        loss, g = loss_and_grad(solver, p, y0, batch_t, Y)
        opt.step(p, g)
        if it % args.test_freq == 0 or it == args.niters:
            pred = full.solve(true_y[0], t, p)
            total = float(np.abs(pred - true_y).mean())
            history.append((it, loss, total))
            print(f"iter {it:5d} | batch loss {loss:.6f} | full-trajectory loss {total:.6f} "
                  f"| {time.perf_counter() - t_train:7.2f} s", flush=True)
    train_s = time.perf_counter() - t_train
    print(f"{args.niters} iterations in {train_s:.2f} s ({1e3 * train_s / args.niters:.2f} ms "
          f"per iteration: forward solve + {args.adjoint} adjoint + RMSprop step)")

    if args.plot:
        plot(args.plot, t, true_y, full.solve(true_y[0], t, p), args.niters)
        print(f"saved {args.plot}")
    return {"history": history, "train_seconds": train_s, "compile_seconds": compile_s,
            "p": p}


if __name__ == "__main__":
    main()
