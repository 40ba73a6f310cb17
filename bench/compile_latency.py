"""smallchains compile latency (cold and warm cache), not a pyperf benchmark.

    python bench/compile_latency.py [--threads N] [--keep]

Each measurement is a fresh subprocess; inside it the wall time is taken from
just before ``import smallchains`` to the end of the first training step
(``train_unbatched(..., 1)``) on the matexp workload. Data generation (numpy)
happens before the clock starts.

* cold: SMALLCHAINS_CACHE_DIR = a fresh empty temp dir
* warm: same dir, new process
NUMBA_CACHE_DIR is also pointed inside that temp dir so numba-level on-disk
caches (cache=True) are cold too and don't leak into the source tree.
Also printed: whole-process wall time (interpreter start -> exit) as seen by
the parent.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(threads):
    sys.path.insert(0, HERE)
    import _common as C
    C.setup_threads(threads, "smallchains")
    X, Y = C.make_data()
    t0 = time.perf_counter()
    import smallchains as sc
    chain = sc.SimpleChain(4, sc.TurboDense(32, "tanh"),
                           sc.TurboDense(16, "tanh"), sc.TurboDense(4))
    p = sc.init_params(chain, seed=0)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    G = sc.alloc_threaded_grad(chain)
    opt = sc.Adam(1e-3)
    sc.train_unbatched(G, p, model, X, opt, 1)
    t1 = time.perf_counter()
    print(f"LATENCY {t1 - t0:.6f}")


def run_once(cache, threads):
    env = dict(os.environ)
    env["SMALLCHAINS_CACHE_DIR"] = cache
    env["NUMBA_CACHE_DIR"] = os.path.join(cache, "numba")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                        "--threads", str(threads)],
                       env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(f"child failed (rc={r.returncode})")
    lat = [float(l.split()[1]) for l in r.stdout.splitlines()
           if l.startswith("LATENCY ")][0]
    return lat, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--keep", action="store_true", help="keep the cache dir")
    args = ap.parse_args()
    if args.child:
        child(args.threads)
        return
    cache = tempfile.mkdtemp(prefix="smallchains-cache-")
    try:
        cold, cold_wall = run_once(cache, args.threads)
        warm, warm_wall = run_once(cache, args.threads)
    finally:
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"smallchains compile latency ({args.threads} threads; import -> end "
          f"of first step): cold {cold:.2f} s, warm {warm:.2f} s "
          f"(whole process: cold {cold_wall:.2f} s, warm {warm_wall:.2f} s)")


if __name__ == "__main__":
    main()
