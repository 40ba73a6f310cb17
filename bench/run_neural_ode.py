"""Driver: bench/neural_ode.py for smallchains and torchdiffeq (1 thread, pinned), the
gradient check, and the cold/warm compile latency; prints one markdown table.

    python bench/run_neural_ode.py [--fast] [--outdir DIR]
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
    args = ap.parse_args()
    import pyperf

    outdir = args.outdir or tempfile.mkdtemp(prefix="neural-ode-results-")
    os.makedirs(outdir, exist_ok=True)
    script = os.path.join(HERE, "neural_ode.py")
    means = {}
    for impl in ("torchdiffeq", "smallchains"):
        out = os.path.join(outdir, f"neural_ode-{impl}.json")
        if os.path.exists(out):
            os.remove(out)
        cmd = [sys.executable, script, "--impl", impl, "-o", out] + (["--fast"] if args.fast else [])
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        bench = pyperf.Benchmark.load(out)
        means[impl] = (bench.mean(), bench.stdev() if bench.get_nvalue() > 1 else 0.0)
    print("+ python bench/neural_ode.py --check", flush=True)
    check = subprocess.run([sys.executable, script, "--check"], check=True, capture_output=True,
                           text=True).stdout
    print(check)
    lat = C.compile_latency("--model", "ode", "--threads", "1")
    ref = means["torchdiffeq"][0]
    print("| impl | threads | ms per iteration (mean ± std) | speed-up vs torchdiffeq |")
    print("|---|---:|---:|---:|")
    for impl in ("torchdiffeq", "smallchains"):
        m, sd = means[impl]
        print(f"| {impl} | 1 | {1e3 * m:.3f} ± {1e3 * sd:.3f} | {ref / m:.1f}x |")
    print()
    print(check.strip().splitlines()[-1])
    print(lat.strip())


if __name__ == "__main__":
    main()
