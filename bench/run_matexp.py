"""Driver: run bench/matexp.py for every installed impl at 1 and 2 threads and
print one markdown table (µs/epoch, ratio vs torch eager, GFLOP/s).

    python bench/run_matexp.py [--quick | --fast] [--impls torch jax ...]
                               [--threads 1 2] [--outdir DIR] [--out table.md]
                               [--no-compile-latency]

--quick: 3 worker processes x 3 values (+ calibration), our own short mode.
--fast : as pyperf's --fast (10 processes x 2 values).
default: as pyperf's defaults (20 processes x 3 values) - slow for torch-compile.

Every configuration's worker processes are split over --rounds rounds (default 5, at
most one per process), and each round runs every (threads, impl) configuration in turn,
appending to its pyperf file. The first round calibrates the number of loops per value;
later rounds reuse it. This machine's speed drifts by up to 2x over seconds to minutes,
so running one configuration after another (--rounds 1) lets the drift land on whichever
ran in a slow phase; interleaved, every mean spans the whole run.

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
    ap.add_argument("--no-floor", action="store_true",
                    help="skip bench/limits.py (the 'x of floor' column)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleave the configurations over this many rounds (1: one "
                         "configuration after another)")
    ap.add_argument("--extra", default="",
                    help="extra args passed to matexp.py, e.g. "
                         "'--compile-mode module'")
    args = ap.parse_args()

    import pyperf

    outdir = args.outdir or tempfile.mkdtemp(prefix="matexp-results-")
    os.makedirs(outdir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    if args.quick:
        processes, values = 3, 3
    elif args.fast:
        processes, values = 10, 2
    else:
        processes, values = 20, 3
    rounds = max(1, min(args.rounds, processes))
    # worker processes per round, e.g. 10 over 3 rounds -> 4, 3, 3
    per_round = [processes // rounds + (r < processes % rounds) for r in range(rounds)]

    impls, skipped = [], []
    for impl in args.impls:
        mod = REQUIRES.get(impl, impl)
        (impls if installed(mod) else skipped).append(impl)
    for impl in skipped:
        print(f"skipping {impl}: module {REQUIRES.get(impl, impl)!r} not installed",
              flush=True)

    floors = None if args.no_floor else C.machine_floors("matexp", args.threads)
    configs = [(n, impl) for n in args.threads for impl in impls]
    files = {c: os.path.join(outdir, f"matexp-{c[1]}-t{c[0]}-{stamp}.json") for c in configs}
    loops, failed, wall = {}, set(), dict.fromkeys(configs, 0.0)
    for r, nproc in enumerate(per_round):
        for c in configs:
            if c in failed:
                continue
            n, impl = c
            cmd = [sys.executable, os.path.join(HERE, "matexp.py"),
                   "--impl", impl, "--threads", str(n), "-q", "--append", files[c],
                   "--processes", str(nproc), "--values", str(values), "--warmups", "1",
                   *(["--loops", str(loops[c])] if c in loops else []),
                   *args.extra.split()]
            print(f"[round {r + 1}/{rounds}] $", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            res = subprocess.run(cmd)
            wall[c] += time.perf_counter() - t0
            if res.returncode != 0 or not os.path.exists(files[c]):
                print(f"  FAILED ({impl}, {n} threads, rc={res.returncode})", flush=True)
                failed.add(c)
                continue
            if c not in loops:
                b = pyperf.Benchmark.load(files[c])
                loops[c] = max(run.get_loops() for run in b.get_runs())

    if not args.no_floor:  # the machine drifts: keep the stricter of the two floors
        floors = C.lower_floors(floors, C.machine_floors("matexp", args.threads))
    rows = []
    for c in configs:
        if c in failed:
            continue
        b = pyperf.Benchmark.load(files[c])
        mean = b.mean()
        std = b.stdev() if b.get_nvalue() > 1 else 0.0
        rows.append({"impl": c[1], "threads": c[0], "mean": mean, "std": std,
                     "median": b.median()})
        print(f"{c[1]}, {c[0]} thread(s): {mean * 1e6:,.1f} us/epoch over {b.get_nvalue()} "
              f"values ({wall[c]:.0f}s wall)", flush=True)

    rows.sort(key=lambda r: (r["threads"], args.impls.index(r["impl"])
                             if r["impl"] in args.impls else 99))
    table = C.fmt_table(rows, floors=floors)
    notes = []
    if skipped:
        notes.append("skipped (not installed): " + ", ".join(skipped))
    if failed:
        notes.append("failed: " + ", ".join(f"{i}@{n}t" for n, i in sorted(failed)))

    lat = ""
    if "smallchains" in impls and not args.no_compile_latency:
        lat = C.compile_latency()

    text = (f"Matrix-exponential benchmark: N={C.N_SAMPLES}, 4-32-16-4 tanh, Adam, "
            f"{C.FLOPS_PER_SAMPLE} flop/sample/step; {processes} processes x {values} values "
            f"per configuration in {rounds} interleaved round(s); pyperf json in {outdir}\n\n"
            + table + "\n")
    C.report(text, notes, lat, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
