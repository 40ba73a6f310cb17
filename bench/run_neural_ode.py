"""Driver: bench/neural_ode.py for smallchains (both adjoints), diffrax (both adjoints)
and torchdiffeq, float64 and float32, at 1 and 2 threads (pinned), the gradient check,
and the cold/warm compile latency; prints one markdown table.

    python bench/run_neural_ode.py [--fast] [--outdir DIR] [--quick]

``--quick``: float64 at 1 thread only.
"""
import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="pyperf --fast")
    ap.add_argument("--outdir", default=None)
    ap.add_argument("--quick", action="store_true", help="float64, 1 thread only")
    args = ap.parse_args()
    import pyperf

    outdir = args.outdir or tempfile.mkdtemp(prefix="neural-ode-results-")
    os.makedirs(outdir, exist_ok=True)
    script = os.path.join(HERE, "neural_ode.py")
    means = {}
    impls = ("smallchains", "diffrax", "smallchains-backsolve", "diffrax-backsolve", "torchdiffeq")
    configs = [("float64", 1)] if args.quick else [("float64", 1), ("float64", 2), ("float32", 1),
                                                   ("float32", 2)]
    for dtype, threads in configs:
        for impl in impls:
            out = os.path.join(outdir, f"neural_ode-{impl}-{dtype}-{threads}.json")
            if os.path.exists(out):
                os.remove(out)
            cmd = [sys.executable, script, "--impl", impl, "--dtype", dtype, "--threads",
                   str(threads), "-o", out] + (["--fast"] if args.fast else [])
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            bench = pyperf.Benchmark.load(out)
            means[impl, dtype, threads] = (bench.mean(), bench.stdev() if bench.get_nvalue() > 1 else 0.0)
    print("+ python bench/neural_ode.py --check", flush=True)
    check = subprocess.run([sys.executable, script, "--check"], check=True, capture_output=True,
                           text=True).stdout
    print(check)
    lat = C.compile_latency("--model", "ode", "--threads", "1")
    print("| impl | dtype | threads | ms per iteration (mean ± std) | vs diffrax | vs torchdiffeq |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype, threads in configs:
        for impl in impls:
            m, sd = means[impl, dtype, threads]
            dfx = means["diffrax", dtype, threads][0]
            tde = means["torchdiffeq", dtype, threads][0]
            print(f"| {impl} | {dtype} | {threads} | {1e3 * m:.3f} ± {1e3 * sd:.3f} | "
                  f"{dfx / m:.2f}x | {tde / m:.1f}x |")
    print()
    print(check.strip().splitlines()[-1])
    print(lat.strip())


if __name__ == "__main__":
    main()
