"""One solve of the whole batch vs each trajectory its own adaptive solve
(``Dopri5(..., trajectories=k)``), on the spiral demo: one training iteration (forward
solve + loss + discrete adjoint), float64.

    python bench/ode_trajectories.py --mode {joint,independent} --points H [--threads N]
        [pyperf options]

``--points H``: output times per batch (torchdiffeq's demo uses 10; longer horizons let
the trajectories' step counts differ more). The joint solve is serial (``--threads``
only matters for ``independent``, whose trajectories run on numba's threads).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import _common as C  # noqa: E402

C.setup_threads(int(C.peek_arg("--threads", "1")), "smallchains")

import numpy as np  # noqa: E402


def main():
    import pyperf

    import neural_ode_spiral as ex
    import smallchains as sc
    from smallchains import ode

    runner = pyperf.Runner(add_cmdline_args=lambda cmd, a: cmd.extend(
        ["--mode", a.mode, "--points", str(a.points), "--threads", str(a.threads)]))
    runner.argparser.add_argument("--mode", choices=("joint", "independent"), default="joint")
    runner.argparser.add_argument("--points", type=int, default=10)
    runner.argparser.add_argument("--threads", type=int, default=1)
    args = runner.parse_args()
    t, true_y = sc.datasets.spiral(ex.DATA_SIZE)
    net, p, solver = ex.make_problem()
    if args.mode == "independent":
        solver = ode.Dopri5(ode.chain_rhs(net, 1, input_map=ex.CUBE), trajectories=ex.BATCH_SIZE,
                            n_threads=args.threads)
    rng = np.random.default_rng(0)
    batches = [ex.get_batch(rng, true_y, batch_time=args.points) for _ in range(8)]
    tt = t[:args.points]

    def iteration(y0, Y):
        U = solver.solve(y0, tt, p)
        d = U - Y
        return solver.vjp(tt, U, np.sign(d) / d.size, p)

    for y0, Y in batches:
        iteration(y0, Y)

    def timed(loops):
        t0 = pyperf.perf_counter()
        for i in range(loops):
            iteration(*batches[i % len(batches)])
        return pyperf.perf_counter() - t0

    runner.bench_time_func(f"ode_{args.mode}_{args.points}pts_{args.threads}t", timed)


if __name__ == "__main__":
    main()
