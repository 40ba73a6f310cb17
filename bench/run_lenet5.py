"""Driver: run bench/lenet5.py over the grid and print one markdown table
(s/epoch of 60,000 MNIST images, ratio vs the best torch batch size at the
same thread count).

    python bench/run_lenet5.py [--quick] [--limit N] [--threads 1 2]
                               [--impls smallchains torch] [--outdir DIR]
                               [--out table.md] [--no-compile-latency]
                               [--extra "pyperf/lenet5 args"]

Grid: smallchains batch size {128, 2048, default} and torch {128, 2048}, each
at every --threads value (default 1 2).

default: lenet5.py's defaults, 1 worker process x 3 values (+1 warmup epoch)
         per configuration, loops=1 (one value = one epoch).
--quick: 1 process x 2 values (+1 warmup), for smoke tests; combine with e.g.
         --limit 10000 (each "epoch" is a pass over the first N images, time
         scaled by 60000/N; the table header says so).

SMALLCHAINS_DATA is set for the subprocesses if unset (default
<repo>/../shared/datasets). For smallchains it also runs
``bench/compile_latency.py --model lenet5`` (cold/warm cache compile latency,
import -> end of the first train_batched step on 128 images).
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

GRID = {"smallchains": ["128", "2048", "default"], "torch": ["128", "2048"]}


def installed(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--limit", type=int, default=None,
                    help="train on the first N images only; time scaled to 60k")
    ap.add_argument("--impls", nargs="+", default=list(GRID), choices=list(GRID))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--outdir", default=None,
                    help="dir for pyperf json files (default: fresh tmp dir)")
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--no-compile-latency", action="store_true")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip bench/limits.py (the 'x of floor' column)")
    ap.add_argument("--extra", default="",
                    help="extra args passed to lenet5.py, e.g. '--values 5'")
    args = ap.parse_args()

    import pyperf

    env = C.ensure_data_env(dict(os.environ))
    outdir = args.outdir or tempfile.mkdtemp(prefix="lenet5-results-")
    os.makedirs(outdir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    opts = ["--values", "2", "--warmups", "1"] if args.quick else []
    if args.limit:
        opts += ["--limit", str(args.limit)]

    impls = [i for i in args.impls if installed(i)]
    skipped = [i for i in args.impls if i not in impls]
    for impl in skipped:
        print(f"skipping {impl}: not installed", flush=True)

    floors = None if args.no_floor else C.machine_floors("LeNet5", args.threads)
    rows, failed = [], []
    for n in args.threads:
        for impl in impls:
            for bs in GRID[impl]:
                out = os.path.join(outdir, f"lenet5-{impl}-bs{bs}-t{n}-{stamp}.json")
                cmd = [sys.executable, os.path.join(HERE, "lenet5.py"),
                       "--impl", impl, "--threads", str(n), "--batch-size", bs,
                       "-q", "-o", out, *opts, *args.extra.split()]
                print("$", " ".join(cmd), flush=True)
                t0 = time.perf_counter()
                r = subprocess.run(cmd, env=env)
                dt = time.perf_counter() - t0
                if r.returncode != 0 or not os.path.exists(out):
                    print(f"  FAILED ({impl}, bs {bs}, {n} threads, "
                          f"rc={r.returncode})", flush=True)
                    failed.append((impl, bs, n))
                    continue
                b = pyperf.Benchmark.load(out)
                mean = b.mean()
                std = b.stdev() if b.get_nvalue() > 1 else 0.0
                label = bs
                if bs == "default":
                    res = b.get_metadata().get("batch_size_resolved")
                    label = f"default ({res})" if res not in (None, "None") else bs
                rows.append({"impl": impl, "batch": label, "threads": n,
                             "mean": mean, "std": std})
                print(f"  {mean:.3f} s/epoch ({dt:.0f}s wall)", flush=True)

    if not args.no_floor:  # the machine drifts: keep the stricter of the two floors
        floors = C.lower_floors(floors, C.machine_floors("LeNet5", args.threads))
    table = C.fmt_table_lenet5(rows, floors=floors)
    notes = []
    if skipped:
        notes.append("skipped (not installed): " + ", ".join(skipped))
    if failed:
        notes.append("failed: " + ", ".join(f"{i} bs{b}@{n}t" for i, b, n in failed))

    lat = ""
    if "smallchains" in impls and not args.no_compile_latency:
        lat = C.compile_latency("--model", "lenet5", env=env)

    if args.limit:
        data = (f"first {args.limit} MNIST training images per 'epoch', time "
                f"SCALED x{C.LENET5_N_TRAIN / args.limit:g} to 60,000 images")
    else:
        data = "60,000 MNIST training images per epoch"
    mode = "quick (2 values/config)" if args.quick else "1 process x 3 values/config"
    text = (f"LeNet5/MNIST training benchmark: {data}; Adam(3e-4), logit "
            f"cross-entropy; {mode}; ratio = best torch s/epoch at the same "
            f"thread count / this s/epoch; pyperf json in {outdir}\n\n"
            + table + "\n")
    C.report(text, notes, lat, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
