"""Driver: run bench/matexp.py for every installed impl at 1 and 2 threads and
print one markdown table (µs/epoch, ratio vs torch eager, GFLOP/s).

    python bench/run_matexp.py [--quick | --fast] [--impls torch jax ...]
                               [--threads 1 2] [--outdir DIR] [--out table.md]
                               [--no-compile-latency]

--quick: 3 worker processes x 3 values (+ calibration), our own short mode.
--fast : pyperf's --fast (10 processes x 2 values).
default: pyperf defaults (20 processes x 3 values) - slow for torch-compile.

For smallchains it also runs bench/compile_latency.py (cold/warm cache
compile latency, a separate non-pyperf measurement).
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

DEFAULT_IMPLS = ["torch", "torch-compile", "jax", "jax-fori", "smallchains"]
REQUIRES = {"smallchains": "smallchains", "torch": "torch",
            "torch-compile": "torch", "jax": "jax", "jax-fori": "jax"}


def installed(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--fast", action="store_true")
    ap.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--outdir", default=None,
                    help="dir for pyperf json files (default: fresh tmp dir)")
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--no-compile-latency", action="store_true")
    ap.add_argument("--extra", default="",
                    help="extra args passed to matexp.py, e.g. "
                         "'--compile-mode module'")
    args = ap.parse_args()

    import pyperf

    outdir = args.outdir or tempfile.mkdtemp(prefix="matexp-results-")
    os.makedirs(outdir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    pyperf_opts = []
    if args.quick:
        pyperf_opts = ["--processes", "3", "--values", "3", "--warmups", "1"]
    elif args.fast:
        pyperf_opts = ["--fast"]

    impls, skipped = [], []
    for impl in args.impls:
        mod = REQUIRES.get(impl, impl)
        (impls if installed(mod) else skipped).append(impl)
    for impl in skipped:
        print(f"skipping {impl}: module {REQUIRES.get(impl, impl)!r} not installed",
              flush=True)

    rows, failed = [], []
    for n in args.threads:
        for impl in impls:
            out = os.path.join(outdir, f"matexp-{impl}-t{n}-{stamp}.json")
            cmd = [sys.executable, os.path.join(HERE, "matexp.py"),
                   "--impl", impl, "--threads", str(n), "-q", "-o", out,
                   *pyperf_opts, *args.extra.split()]
            print("$", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            r = subprocess.run(cmd)
            dt = time.perf_counter() - t0
            if r.returncode != 0 or not os.path.exists(out):
                print(f"  FAILED ({impl}, {n} threads, rc={r.returncode})", flush=True)
                failed.append((impl, n))
                continue
            b = pyperf.Benchmark.load(out)
            mean = b.mean()
            std = b.stdev() if b.get_nvalue() > 1 else 0.0
            rows.append({"impl": impl, "threads": n, "mean": mean, "std": std,
                         "median": b.median()})
            print(f"  {mean * 1e6:,.1f} us/epoch ({dt:.0f}s wall)", flush=True)

    rows.sort(key=lambda r: (r["threads"], args.impls.index(r["impl"])
                             if r["impl"] in args.impls else 99))
    table = C.fmt_table(rows)
    notes = []
    if skipped:
        notes.append("skipped (not installed): " + ", ".join(skipped))
    if failed:
        notes.append("failed: " + ", ".join(f"{i}@{n}t" for i, n in failed))

    lat = ""
    if "smallchains" in impls and not args.no_compile_latency:
        lat = C.compile_latency()

    text = (f"Matrix-exponential benchmark: N={C.N_SAMPLES}, 4-32-16-4 tanh, Adam, "
            f"{C.FLOPS_PER_SAMPLE} flop/sample/step; pyperf json in {outdir}\n\n"
            + table + "\n")
    C.report(text, notes, lat, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
