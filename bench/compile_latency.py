"""smallchains compile latency (cold and warm cache), not a pyperf benchmark.

    python bench/compile_latency.py [--model {matexp,lenet5,ode}] [--threads N] [--keep]

Each measurement is a fresh subprocess; inside it the wall time is taken from
just before ``import smallchains`` to the end of the first training step:
* matexp (default): ``train_unbatched(..., 1)`` on the matexp workload. Data
  generation (numpy) happens before the clock starts.
* lenet5: ``train_batched(..., 1 epoch, batch_size=128)`` on the first 128
  MNIST training images (LeNet5, Adam(3e-4)). The images are loaded by the
  parent (smallchains.datasets) and handed to the child as a .npy file, so the
  child reads them with numpy before the clock starts.
* ode: the neural-ODE spiral problem (examples/neural_ode_spiral.py): import to the end
  of the first training iteration (forward solve + backsolve adjoint); the start points
  and targets are computed with numpy before the clock starts.

* cold: SMALLCHAINS_CACHE_DIR = a fresh empty temp dir
* warm: same dir, new process
* warm, no scipy (matexp, lenet5): the same, with scipy made unimportable in the child
  (``sys.modules["scipy"] = None``), as in an install of smallchains' own dependencies
  (numba, numpy). numba imports scipy.linalg when it sets up its CPU target (a BLAS
  check), whether or not anything uses it; this run shows what that costs
* new chain (matexp, lenet5): another fresh dir, where a process first trained a
  slightly different chain (first hidden layer one unit / two channels wider), so the
  library's own kernels (training loops, optimizer, activations) are cached but none of
  the measured chain's are: what a user pays for each new architecture on a machine
  where smallchains has run before
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


def child_lenet5(threads, data, variant=False):
    sys.path.insert(0, HERE)
    import _common as C
    C.setup_threads(threads, "smallchains")
    import numpy as np
    d = np.load(data)
    X, y = d["X"], d["y"]
    t0 = time.perf_counter()
    import smallchains as sc
    chain = C.lenet5_chain()
    if variant:
        chain = sc.SimpleChain(chain.input_shape, sc.Conv(8, 5, "relu"), *chain.layers[1:])
    p = sc.init_params(chain, seed=0)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    G = sc.alloc_threaded_grad(chain)
    opt = sc.Adam(C.LENET5_LR)
    sc.train_batched(G, p, model, X, opt, 1, batch_size=128, shuffle=True, seed=0)
    t1 = time.perf_counter()
    print(f"LATENCY {t1 - t0:.6f}")


def write_lenet5_data(path, n=128):
    """Parent side: first n MNIST training images -> npz for the child."""
    sys.path.insert(0, HERE)
    import _common as C
    import numpy as np
    X, y = C.load_mnist_train(n)
    np.savez(path, X=np.ascontiguousarray(X), y=np.ascontiguousarray(y))


def child(threads, variant=False):
    sys.path.insert(0, HERE)
    import _common as C
    C.setup_threads(threads, "smallchains")
    X, Y = C.make_data()
    t0 = time.perf_counter()
    import smallchains as sc
    chain = C.matexp_chain()
    if variant:
        chain = sc.SimpleChain(4, sc.TurboDense(33, "tanh"), *chain.layers[1:])
    p = sc.init_params(chain, seed=0)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    G = sc.alloc_threaded_grad(chain)
    opt = sc.Adam(1e-3)
    sc.train_unbatched(G, p, model, X, opt, 1)
    t1 = time.perf_counter()
    print(f"LATENCY {t1 - t0:.6f}")


def child_ode():
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
    import numpy as np
    rng = np.random.default_rng(0)
    y0, Y = rng.uniform(-2, 2, (20, 2)), rng.uniform(-2, 2, (10, 20, 2))
    t = np.linspace(0.0, 25.0, 1000)[:10]
    t0 = time.perf_counter()
    import neural_ode_spiral as ex  # imports smallchains
    _, p, solver = ex.make_problem()
    ex.loss_and_grad(solver, p, y0, t, Y)
    t1 = time.perf_counter()
    print(f"LATENCY {t1 - t0:.6f}")


def run_once(cache, threads, model="matexp", data=None, variant=False, no_scipy=False):
    env = dict(os.environ)
    env["SMALLCHAINS_CACHE_DIR"] = cache
    env["NUMBA_CACHE_DIR"] = os.path.join(cache, "numba")
    cmd = [sys.executable, os.path.abspath(__file__), "--child",
           "--threads", str(threads), "--model", model]
    if data:
        cmd += ["--data", data]
    if variant:
        cmd += ["--variant"]
    if no_scipy:
        cmd += ["--no-scipy"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
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
    ap.add_argument("--model", choices=["matexp", "lenet5", "ode"], default="matexp")
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variant", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-scipy", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.no_scipy:  # before numba is imported (setup_threads imports nothing heavy)
            sys.modules["scipy"] = None
        if args.model == "lenet5":
            child_lenet5(args.threads, args.data, args.variant)
        elif args.model == "ode":
            child_ode()
        else:
            child(args.threads, args.variant)
        return
    cache = tempfile.mkdtemp(prefix="smallchains-cache-")
    cache2 = tempfile.mkdtemp(prefix="smallchains-cache-")
    new = None
    data = None
    try:
        if args.model == "lenet5":
            # outside the cache dir so the cache starts empty
            datadir = tempfile.mkdtemp(prefix="smallchains-lat-data-")
            data = os.path.join(datadir, "mnist128.npz")
            write_lenet5_data(data)
        cold, cold_wall = run_once(cache, args.threads, args.model, data)
        warm, warm_wall = run_once(cache, args.threads, args.model, data)
        no_scipy = None
        if args.model != "ode":
            no_scipy, _ = run_once(cache, args.threads, args.model, data, no_scipy=True)
            run_once(cache2, args.threads, args.model, data, variant=True)
            new, _ = run_once(cache2, args.threads, args.model, data)
    finally:
        if data:
            shutil.rmtree(os.path.dirname(data), ignore_errors=True)
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(cache2, ignore_errors=True)
    what = "" if args.model == "matexp" else f"{args.model}, "
    new_text = "" if new is None else f", new chain {new:.2f} s"
    no_scipy_text = "" if no_scipy is None else f" (without scipy {no_scipy:.2f} s)"
    print(f"smallchains compile latency ({what}{args.threads} threads; import -> end "
          f"of first step): cold {cold:.2f} s, warm {warm:.2f} s{no_scipy_text}{new_text} "
          f"(whole process: cold {cold_wall:.2f} s, warm {warm_wall:.2f} s)")


if __name__ == "__main__":
    main()
