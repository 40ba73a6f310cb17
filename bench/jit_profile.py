"""Where a training epoch's time goes, per compiled function: a ``perf`` sampling profile
of one of issue 14's benchmarks with numba's JIT code named.

    python bench/jit_profile.py {cifar_dense,mnist_mlp,cifar_cnn} [--threads T]
                                [--epochs N] [--freq HZ] [--top K]

Runs the benchmark's smallchains trainer (``build_smallchains`` of ``bench/<name>.py``,
the same chain, data, minibatch and optimizer as its pyperf benchmark) in a child
process under ``perf record -e cpu-clock -k CLOCK_MONOTONIC``, with empty numba and
kernel caches so that every function is compiled (or loaded) in that process. After
the timed epochs the child writes the address of every function its numba libraries
define; the samples taken during those epochs are then attributed to the function
whose start is the nearest below them. Prints, per function (a chain's layer steps
appear as ``layer<k>_forward`` / ``layer<k>_pullback``, everything the compiler inlined
is counted in its caller), the share of the samples and the CPU milliseconds per epoch
summed over the threads. ``libgomp`` is OpenMP (numba's ``omp`` threading layer): time
a thread spends waiting at the end of a parallel region or for the next one.

Needs Linux ``perf`` with software events (``cpu-clock``; a VM without hardware
counters is enough) and ``kernel.perf_event_paranoid <= 2``. Not a benchmark: sampling
and the cold caches cost some speed; use the pyperf scripts for times and this to see
which part to work on.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ("cifar_dense", "mnist_mlp", "cifar_cnn")


def _child(args):
    """Build and warm the trainer, time ``args.epochs`` epochs, write the symbol table."""
    sys.argv = [sys.argv[0], "--impl", "smallchains", "--threads", str(args.threads)]
    sys.path.insert(0, HERE)
    import importlib
    mod = importlib.import_module(args.bench)
    epoch = mod.build_smallchains(*mod.load())  # compiles, trains warm-up minibatches
    epoch(1)
    t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
    seconds = epoch(args.epochs)
    t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
    with open(args.child, "w") as fh:
        json.dump(dict(t0=t0, t1=t1, seconds=seconds, symbols=_symbols()), fh)


def _symbols():
    """``{address: name}`` of every function defined by a finalized numba library of this
    process (compiled here, or loaded from numba's object-code cache: the names then
    come from the library's bitcode for linking)."""
    import gc

    from numba.core.codegen import CPUCodeLibrary
    names, engine = set(), None
    for lib in gc.get_objects():
        if not isinstance(lib, CPUCodeLibrary) or not getattr(lib, "_finalized", False):
            continue
        engine = lib._codegen._engine
        for attr in ("_final_module", "_shared_module"):
            module = getattr(lib, attr, None)
            if module is not None:
                names.update(f.name for f in module.functions if not f.is_declaration)
    out = {}
    for name in names:
        try:
            address = engine.get_function_address(name)
        except Exception:  # noqa: BLE001 -- a name the engine does not know: skip it
            continue
        if address:
            out[address] = name
    return out


def demangle(name: str) -> str:
    """A readable form of a numba symbol: its nested name parts joined by dots (the
    generated chain module's parts shortened to ``chain``), prefixed ``cfunc``/``cpython``
    for numba's wrappers."""
    prefix = ""
    if name.startswith("cfunc."):
        prefix, name = "cfunc ", name[len("cfunc."):]
    if not name.startswith("_ZN"):
        return prefix + name
    parts, i = [], 3
    while i < len(name) and name[i].isdigit():
        j = i
        while j < len(name) and name[j].isdigit():
            j += 1
        n = int(name[i:j])
        parts.append(name[j:j + n])
        i = j + n
    if parts and parts[0] == "cpython":
        prefix, parts = prefix + "cpython ", parts[1:]
    parts = ["chain" if p.startswith("_smallchains_kernels_") else p for p in parts]
    if parts and parts[0] == "_3cdynamic_3e":  # numba's outlined prange bodies
        return prefix + "prange body " + parts[-1].split("_0x")[0].lstrip("_")
    return prefix + ".".join(p.replace("_3clocals_3e", "<locals>") for p in parts)


def _perf_samples(data, t0, t1):
    """(tid, ip, dso, symbol) of every sample of ``perf.data`` taken between t0 and t1."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "tid,time,ip,dso,sym"],
                         capture_output=True, text=True, check=True).stdout
    samples = []
    for line in out.splitlines():
        fields = line.split(None, 3)
        if len(fields) < 4:
            continue
        try:
            tid, t, ip = int(fields[0]), float(fields[1].rstrip(":")), int(fields[2], 16)
        except ValueError:
            continue
        if t0 <= t <= t1:
            rest = fields[3]
            dso = rest[rest.rfind("(") + 1:rest.rfind(")")] if "(" in rest else ""
            sym = rest[:rest.rfind("(")].strip() if "(" in rest else rest.strip()
            samples.append((tid, ip, dso, sym))
    return samples


def attribute(samples, symbols):
    """Counter of ``(label, tid)``: numba functions by nearest lower address (JIT samples,
    whose dso perf calls ``/tmp/perf-<pid>.map``), else ``<library> <symbol>``."""
    starts = sorted(symbols)
    names = [symbols[a] for a in starts]
    c = collections.Counter()
    for tid, ip, dso, sym in samples:
        if "perf-" in dso or dso.startswith("[JIT]") or dso == "//anon":
            k = bisect.bisect_right(starts, ip) - 1
            label = demangle(names[k]) if k >= 0 else "JIT code below every known function"
        else:
            lib = os.path.basename(dso)
            label = f"{lib} (OpenMP: waiting)" if lib.startswith("libgomp") else f"{lib} {sym}"
        c[label, tid] += 1
    return c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", choices=BENCHES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--freq", type=int, default=4999, help="samples per second per CPU")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    if shutil.which("perf") is None:
        sys.exit("jit_profile: needs Linux perf (Debian: apt-get install linux-perf)")
    tmp = tempfile.mkdtemp(prefix="jit_profile-")
    data, result = os.path.join(tmp, "perf.data"), os.path.join(tmp, "result.json")
    env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "numba"),
               SMALLCHAINS_CACHE_DIR=os.path.join(tmp, "kernels"))
    env.setdefault("SMALLCHAINS_DATA", os.path.join(HERE, "..", "..", "shared", "datasets"))
    cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(args.freq), "-k", "CLOCK_MONOTONIC",
           "-o", data, "--", sys.executable, os.path.abspath(__file__), args.bench, "--threads",
           str(args.threads), "--epochs", str(args.epochs), "--child", result]
    run = subprocess.run(cmd, env=env)
    if run.returncode != 0 or not os.path.exists(result):
        sys.exit(f"jit_profile: the profiled run failed (exit {run.returncode}): {' '.join(cmd)}")
    with open(result) as fh:
        res = json.load(fh)
    symbols = {int(a): n for a, n in res["symbols"].items()}
    samples = _perf_samples(data, res["t0"], res["t1"])
    by_thread = attribute(samples, symbols)
    counts, threads = collections.Counter(), collections.Counter()
    for (label, tid), n in by_thread.items():
        counts[label] += n
        threads[tid] += n
    tids = [t for t, _ in threads.most_common(args.threads)]  # the busiest: the workers
    total = sum(counts.values())
    per_epoch = res["seconds"] / args.epochs

    def ms(n):
        return f"{n / args.freq / args.epochs * 1e3:8.2f}"

    print(f"{args.bench}, smallchains, {args.threads} thread(s): {per_epoch * 1e3:.1f} ms per epoch "
          f"while sampled ({args.epochs} epochs); {total} samples at {args.freq} Hz. CPU ms per "
          "epoch, all threads and per thread (the busiest first):")
    print(f"{'%':>5} {'all':>8} " + " ".join(f"{'thread ' + str(i):>8}" for i in range(len(tids)))
          + "  function")
    top = counts.most_common(args.top)
    for name, n in top:
        print(f"{100 * n / total:5.1f} {ms(n)} " + " ".join(ms(by_thread[name, t]) for t in tids)
              + f"  {name}")
    rest = total - sum(n for _, n in top)
    if rest:
        print(f"{100 * rest / total:5.1f} {ms(rest)}  (the others)")
    print(f"{'':5} {ms(total)} " + " ".join(ms(threads[t]) for t in tids) + "  total")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
