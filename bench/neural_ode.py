"""Neural-ODE training-iteration benchmark: smallchains.ode vs torchdiffeq.odeint_adjoint.

    python bench/neural_ode.py --impl {smallchains,torchdiffeq} [pyperf options]
    python bench/neural_ode.py --check          # gradients and step counts, no timing

The problem of torchdiffeq's examples/ode_demo.py (see examples/neural_ode_spiral.py):
du/dt = net(u^3), net 2 -> 50 tanh -> 2, one state of 20 start points x 2, 10 output times
(spacing 25/999), loss mean |U - Y|, adaptive dopri5 with rtol 1e-7 / atol 1e-9 forward
and backward, backsolve adjoint with torchdiffeq's default adjoint norm (max of the RMS
norms of u, a and each parameter tensor). Both impls run in float64 at 1 thread (pinned)
and start from the SAME parameters. One timed iteration = forward solve + loss + adjoint
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
CHECK = "--check" in sys.argv
C.setup_threads(1, "smallchains" if CHECK else IMPL)

import numpy as np  # noqa: E402

N_BATCHES = 16


def make_data():
    import smallchains as sc
    import neural_ode_spiral as ex
    t, true_y = sc.datasets.spiral(ex.DATA_SIZE)
    rng = np.random.default_rng(0)
    batches = [ex.get_batch(rng, true_y) for _ in range(N_BATCHES)]
    return t[:ex.BATCH_TIME], batches


def build_smallchains():
    import neural_ode_spiral as ex
    net, p, solver = ex.make_problem()
    counts = {}

    def iteration(y0, t, Y):
        U = solver.solve(y0, t, p)
        counts["forward"] = solver.stats["nfe"]
        diff = U - Y
        loss = np.abs(diff).mean()
        u0bar, pbar = solver.vjp(t, U, np.sign(diff) / diff.size, p)
        counts["backward"] = solver.stats["nfe"]
        return loss, pbar, u0bar

    return net, p, iteration, counts


def build_torchdiffeq(net, p):
    """The torchdiffeq demo's ODEFunc in float64 with smallchains' parameters copied in."""
    import torch
    from torchdiffeq import odeint_adjoint
    C.torch_threads(1)
    counts = {"n": 0}

    class ODEFunc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(2, 50), torch.nn.Tanh(),
                                           torch.nn.Linear(50, 2)).double()

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
        pred = odeint_adjoint(func, y0, torch.from_numpy(t), method="dopri5", rtol=1e-7, atol=1e-9)
        counts["forward"] = counts["n"]
        loss = torch.mean(torch.abs(pred - torch.from_numpy(Y)))
        func.zero_grad()
        loss.backward()
        counts["backward"] = counts["n"] - counts["forward"]
        grad = np.concatenate([q.grad.numpy().ravel() for q in params])
        return float(loss.detach()), grad, y0.grad.numpy()

    return iteration, counts


def check():
    t, batches = make_data()
    net, p, sc_iter, sc_counts = build_smallchains()
    th_iter, th_counts = build_torchdiffeq(net, p)
    print("batch | nfe fwd sc/torch | nfe bwd sc/torch | loss rel diff | dL/dp rel err | dL/du0 rel err")
    worst = 0.0
    for i, (y0, Y) in enumerate(batches):
        l1, g1, u1 = sc_iter(y0, t, Y)
        l2, g2, u2 = th_iter(y0, t, Y)
        ep = np.linalg.norm(g1 - g2) / np.linalg.norm(g2)
        eu = np.linalg.norm(u1 - u2) / np.linalg.norm(u2)
        worst = max(worst, ep, eu)
        print(f"{i:5d} | {sc_counts['forward']:4d} / {th_counts['forward']:4d} | "
              f"{sc_counts['backward']:4d} / {th_counts['backward']:4d} | {abs(l1 - l2) / abs(l2):.1e} | "
              f"{ep:.2e} | {eu:.2e}")
    print(f"worst relative gradient difference: {worst:.2e}")


def main():
    import pyperf
    runner = pyperf.Runner(add_cmdline_args=lambda cmd, args: cmd.extend(["--impl", args.impl]))
    runner.argparser.add_argument("--impl", choices=["smallchains", "torchdiffeq"], default="smallchains")
    args = runner.parse_args()
    t, batches = make_data()
    net, p, iteration, _ = build_smallchains()
    if args.impl == "torchdiffeq":
        iteration, _ = build_torchdiffeq(net, p)
    for y0, Y in batches[:2]:  # warm-up (compilation, allocator)
        iteration(y0, t, Y)

    def timed(loops):
        t0 = pyperf.perf_counter()
        for i in range(loops):
            y0, Y = batches[i % N_BATCHES]
            iteration(y0, t, Y)
        return pyperf.perf_counter() - t0

    runner.bench_time_func(f"neural_ode_{args.impl}", timed)


if __name__ == "__main__":
    if CHECK:
        check()
    else:
        main()
