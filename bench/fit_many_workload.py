"""The whole fit_many workload of issue 17, end to end: F fits (default 256) of the matrix-
exponential network on 1,000 samples each, S full-batch Adam steps (default 2,000), in
process (``backend="threads"``) and through a Dask ``LocalCluster`` of N single-threaded
worker processes, interleaved, R rounds (default 3).

    python bench/fit_many_workload.py [--threads 2] [--fits 256] [--steps 2000] [--rounds 3]

Not pyperf: one value is a whole run (tens of seconds). Every run is timed from the call
to the returned results, set-up included; the first call of each backend (compiling, and
starting the workers' kernels) is made before timing and reported apart. The process is
pinned to the first N cores; the Dask workers inherit the pinning. Prints seconds per run,
fits per second, and the ratio Dask / in-process per round.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fits", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    C.setup_threads(args.threads, "smallchains")
    import numpy as np
    from distributed import Client, LocalCluster

    import smallchains as sc

    X, Y = C.make_data(1000)
    model = sc.add_loss(C.matexp_chain(), sc.SquaredLoss(Y))
    with LocalCluster(n_workers=args.threads, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        backends = {"threads": dict(n_threads=args.threads), "dask": dict(backend=client)}
        for name, kw in backends.items():
            t = time.perf_counter()
            sc.fit_many(model, X, args.fits, iters=3, **kw)
            print(f"first call ({name}, {args.fits} fits x 3 steps, compile or load included): "
                  f"{time.perf_counter() - t:.2f} s", flush=True)
        times = {name: [] for name in backends}
        ref = None
        for r in range(args.rounds):
            for name, kw in backends.items():
                t = time.perf_counter()
                res = sc.fit_many(model, X, args.fits, iters=args.steps, **kw)
                dt = time.perf_counter() - t
                assert all(x.ok for x in res)
                final = np.array([x.final_loss for x in res])
                if ref is None:
                    ref = final
                assert np.array_equal(final, ref), "backends disagree"
                times[name].append(dt)
                print(f"round {r + 1} {name:8s}: {dt:7.2f} s  {args.fits / dt:7.2f} fits/s  "
                      f"{dt / args.fits / args.steps * 1e6:6.2f} us per fit-step", flush=True)
            print(f"round {r + 1} dask / threads: {times['dask'][-1] / times['threads'][-1]:.3f}",
                  flush=True)
        for name in backends:
            best = min(times[name])
            print(f"{name}: best {best:.2f} s ({args.fits / best:.2f} fits/s), all "
                  + ", ".join(f"{t:.2f}" for t in times[name]))
        print(f"dask / threads, best over best: {min(times['dask']) / min(times['threads']):.3f}; "
              f"median final loss {np.median(ref):.4g}")


if __name__ == "__main__":
    main()
