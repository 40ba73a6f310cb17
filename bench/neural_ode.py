"""Neural-ODE training-iteration benchmark: smallchains.ode vs diffrax and torchdiffeq.

    python bench/neural_ode.py --impl IMPL [--threads N] [pyperf options]
    python bench/neural_ode.py --check          # gradients and step counts, no timing

IMPL: ``smallchains`` (discrete adjoint), ``smallchains-backsolve``, ``diffrax``
(``RecursiveCheckpointAdjoint``, its default: the exact gradient of its discrete solve),
``diffrax-backsolve`` (``BacksolveAdjoint``), ``torchdiffeq`` (``odeint_adjoint``).
diffrax solves with ``Dopri5`` and ``PIDController(rtol, atol)`` (an RMS norm over the
whole state, as smallchains' forward solve), ``SaveAt(ts=t)``, jitted
``value_and_grad``; its step sequence differs slightly from torchdiffeq's and ours (it
ends its last step at ``t[-1]``, where those step past it and interpolate), so its
gradient agrees with ours to the solver tolerance; with ``StepTo`` our steps it agrees
to rounding (``--check`` shows both).

The problem of torchdiffeq's examples/ode_demo.py (see examples/neural_ode_spiral.py):
du/dt = net(u^3), net 2 -> 50 tanh -> 2, one state of 20 start points x 2, 10 output times
(spacing 25/999), loss mean |U - Y|, adaptive dopri5 with rtol 1e-7 / atol 1e-9 forward
and backward, backsolve adjoint with torchdiffeq's default adjoint norm (max of the RMS
norms of u, a and each parameter tensor). All impls run in ``--dtype`` (float64 default;
float32 with rtol 1e-5 / atol 1e-7, which float32 states can meet) at ``--threads``
threads (pinned) and start from the SAME parameters. One timed iteration = forward solve + loss + adjoint
gradient (no optimizer step, so every loop sees the same parameters); iterations cycle
over 16 fixed random batches, so both impls integrate exactly the same problems.

--check prints, per batch, the forward/backward function-evaluation counts of both impls
and the relative difference of the gradients dL/dp and dL/du0.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import _common as C  # noqa: E402

IMPL = C.peek_arg("--impl", "smallchains")
THREADS = int(C.peek_arg("--threads", "1"))
DTYPE = C.peek_arg("--dtype", "float64")
#: (rtol, atol) per dtype: float32 states cannot meet 1e-7 (see docs/ode.md, float32)
TOLS = {"float64": (1e-7, 1e-9), "float32": (1e-5, 1e-7)}[DTYPE]
CHECK = "--check" in sys.argv
IMPLS = ("smallchains", "smallchains-backsolve", "diffrax", "diffrax-backsolve", "torchdiffeq")
C.setup_threads(THREADS, "smallchains" if CHECK else ("jax" if IMPL.startswith("diffrax") else IMPL))
if CHECK:  # everything in one process: JAX single-threaded too
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402

N_BATCHES = 16


def make_data():
    import smallchains as sc
    import neural_ode_spiral as ex
    t, true_y = sc.datasets.spiral(ex.DATA_SIZE)
    rng = np.random.default_rng(0)
    batches = [tuple(a.astype(DTYPE) for a in ex.get_batch(rng, true_y)) for _ in range(N_BATCHES)]
    return t[:ex.BATCH_TIME], batches


def build_smallchains(adjoint="discrete"):
    import neural_ode_spiral as ex
    net, p, solver = ex.make_problem(dtype=np.dtype(DTYPE), adjoint=adjoint, rtol=TOLS[0],
                                     atol=TOLS[1])
    counts = {}

    def iteration(y0, t, Y):
        U = solver.solve(y0, t, p)
        counts["forward"] = solver.stats["nfe"]
        diff = U - Y
        loss = np.abs(diff).mean()
        u0bar, pbar = solver.vjp(t, U, np.sign(diff) / diff.size, p)
        counts["backward"] = solver.stats["nfe"] + solver.stats.get("vjp", 0)
        return loss, pbar, u0bar

    return net, p, iteration, counts


def build_torchdiffeq(net, p):
    """The torchdiffeq demo's ODEFunc in float64 with smallchains' parameters copied in."""
    import torch
    from torchdiffeq import odeint_adjoint
    C.torch_threads(THREADS)
    counts = {"n": 0}

    class ODEFunc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(2, 50), torch.nn.Tanh(),
                                           torch.nn.Linear(50, 2)).to(getattr(torch, DTYPE))

        def forward(self, t, y):
            counts["n"] += 1
            return self.net(y ** 3)

    func = ODEFunc()
    views = net.param_views(p)
    with torch.no_grad():
        for lin, v in zip((func.net[0], func.net[2]), views):
            lin.weight.copy_(torch.from_numpy(v["W"]))
            lin.bias.copy_(torch.from_numpy(v["b"]))
    params = [func.net[0].weight, func.net[0].bias, func.net[2].weight, func.net[2].bias]

    def iteration(y0, t, Y):
        y0 = torch.from_numpy(y0).requires_grad_(True)
        counts["n"] = 0
        pred = odeint_adjoint(func, y0, torch.from_numpy(t), method="dopri5", rtol=TOLS[0],
                              atol=TOLS[1])
        counts["forward"] = counts["n"]
        loss = torch.mean(torch.abs(pred - torch.from_numpy(Y)))
        func.zero_grad()
        loss.backward()
        counts["backward"] = counts["n"] - counts["forward"]
        grad = np.concatenate([q.grad.numpy().ravel() for q in params])
        return float(loss.detach()), grad, y0.grad.numpy()

    return iteration, counts


def build_diffrax(net, p, adjoint="recursive", steps=None):
    """diffrax's Dopri5 on the same problem, float64, jitted value_and_grad over
    (params, y0); ``steps``: a function of the batch giving the step grid (StepTo)."""
    import jax
    jax.config.update("jax_enable_x64", True)
    import diffrax
    import jax.numpy as jnp

    views = net.param_views(p)
    params = [(jnp.asarray(v["W"], DTYPE), jnp.asarray(v["b"], DTYPE)) for v in views]

    def vf(t, y, q):
        (W1, b1), (W2, b2) = q
        return jnp.tanh((y ** 3) @ W1.T + b1) @ W2.T + b2

    term = diffrax.ODETerm(vf)
    adj = diffrax.RecursiveCheckpointAdjoint() if adjoint == "recursive" else diffrax.BacksolveAdjoint()

    def loss(q, y0, Y, t, grid):
        if grid is None:
            ctrl, t0, t1 = diffrax.PIDController(rtol=TOLS[0], atol=TOLS[1]), t[0], t[-1]
        else:
            ctrl, t0, t1 = diffrax.StepTo(ts=grid), grid[0], grid[-1]
        sol = diffrax.diffeqsolve(term, diffrax.Dopri5(), t0, t1, None, y0, args=q,
                                  stepsize_controller=ctrl, saveat=diffrax.SaveAt(ts=t),
                                  adjoint=adj, max_steps=4096)
        return jnp.mean(jnp.abs(sol.ys - Y))

    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=())

    def iteration(y0, t, Y, grid=None):
        (l, (gq, gy)) = vg(params, y0, Y, t, grid)
        g = np.concatenate([np.asarray(a).ravel() for w in gq for a in w])
        return float(l), g, np.asarray(gy)

    return iteration


def check():
    t, batches = make_data()
    net, p, sc_iter, sc_counts = build_smallchains()
    _, _, bs_iter, _ = build_smallchains("backsolve")
    _, _, sc_solver_iter, solver = _solver_for_steps()
    th_iter, th_counts = build_torchdiffeq(net, p)
    try:
        dfx = build_diffrax(net, p)
    except ImportError:
        dfx = None
    print("batch | nfe fwd sc/torch | nfe+vjp bwd sc | nfe bwd torch | rel diff dL/dp: backsolve, "
          "torchdiffeq, diffrax (own steps), diffrax (our steps)")
    worst = 0.0
    for i, (y0, Y) in enumerate(batches):
        l1, g1, u1 = sc_iter(y0, t, Y)
        _, gb, _ = bs_iter(y0, t, Y)
        l2, g2, u2 = th_iter(y0, t, Y)

        def rel(g):
            return np.linalg.norm(g1 - g) / np.linalg.norm(g)
        cols = [rel(gb), rel(g2)]
        if dfx is not None:
            _, gd, _ = dfx(y0, t, Y)
            sc_solver_iter(y0, t, Y)
            ts, dts = solver.accepted_steps
            grid = np.append(ts, ts[-1] + dts[-1])
            _, gs, us = dfx(y0, t, Y, grid)
            cols += [rel(gd), rel(gs)]
            # (dL/du0 is not compared: U[0] = Y[0] exactly, where |.| has its kink and jax
            # takes the derivative 1, numpy's sign 0)
            worst = max(worst, rel(gs))
        print(f"{i:5d} | {sc_counts['forward']:4d} / {th_counts['forward']:4d} | "
              f"{sc_counts['backward']:4d} | {th_counts['backward']:4d} | "
              + ", ".join(f"{c:.1e}" for c in cols))
    if dfx is not None:
        print(f"worst relative dL/dp difference to diffrax with the same steps: {worst:.2e}")


def _solver_for_steps():
    import neural_ode_spiral as ex
    net, p, solver = ex.make_problem()

    def iteration(y0, t, Y):
        solver.solve(y0, t, p)
    return net, p, iteration, solver


def main():
    import pyperf
    runner = pyperf.Runner(add_cmdline_args=lambda cmd, args: cmd.extend(
        ["--impl", args.impl, "--threads", str(args.threads), "--dtype", args.dtype]))
    runner.argparser.add_argument("--impl", choices=IMPLS, default="smallchains")
    runner.argparser.add_argument("--threads", type=int, default=1)
    runner.argparser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = runner.parse_args()
    t, batches = make_data()
    net, p, iteration, _ = build_smallchains(
        "backsolve" if args.impl == "smallchains-backsolve" else "discrete")
    if args.impl == "torchdiffeq":
        C.torch_threads(args.threads)
        iteration, _ = build_torchdiffeq(net, p)
    elif args.impl.startswith("diffrax"):
        iteration = build_diffrax(net, p, "backsolve" if args.impl == "diffrax-backsolve" else "recursive")
    for y0, Y in batches[:2]:  # warm-up (compilation, allocator)
        iteration(y0, t, Y)
    if not args.worker and args.impl != "smallchains":
        # the gradients compared once before timing (the same first batch)
        _, _, ref, _ = build_smallchains()
        y0, Y = batches[0]
        g_ref, g = ref(y0, t, Y)[1], iteration(y0, t, Y)[1]
        print(f"dL/dp relative difference to smallchains (discrete adjoint), batch 0: "
              f"{np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref):.2e}", flush=True)

    def timed(loops):
        t0 = pyperf.perf_counter()
        for i in range(loops):
            y0, Y = batches[i % N_BATCHES]
            iteration(y0, t, Y)
        return pyperf.perf_counter() - t0

    runner.bench_time_func(f"neural_ode_{args.impl}_{args.dtype}_{args.threads}t", timed)


if __name__ == "__main__":
    if CHECK:
        check()
    else:
        main()
