"""The machine's own floor: what no kernel on this CPU can beat, and each workload's share.

    python bench/limits.py [--threads 1 2] [--seconds 0.3] [--json limits.json]

Measures, with nothing else running:

* **FMA peak**: a register-only loop of fused multiply-adds on the explicit vectors the
  generated kernels use on this CPU (:func:`smallchains._simd.vector_bytes` of the
  default register budget: 32-byte vectors, 8 float32 / 4 float64 lanes, without
  AVX-512; 64-byte ones, 16 / 8 lanes, with it; ``--vector-bytes`` overrides), 12
  independent accumulators (enough to cover FMA latency on two pipes; 14 of AVX2's 16
  registers), no memory traffic. GFLOP/s counts 2 per lane per
  FMA. At N threads, N Python threads run it at once (the loop is ``nogil``), so the
  figure shows whether the cores have their own FMA units.
* **tanh cost**: nanoseconds per element of the kernels' float32/float64 tanh
  (:mod:`smallchains._fastmath`) over a 4,096-element vector (in L1), one thread.
* **input gather**: for each workload, seconds per epoch to copy its input rows (float32,
  random data of the workload's shape) in a shuffled order into a block buffer of 160
  rows, as every training step does before its first layer; at N threads each thread
  copies a contiguous share of the shuffled order at once. No arithmetic floor counts this
  memory traffic, and kernels cannot hide it: a workload whose gather is a large part of
  its floor cannot come near that floor (network 1: 205 MB of rows per epoch).

Then prints each benchmark workload's arithmetic floor at 1 and 2 threads: its
multiply-adds (forward, weight gradients, input gradients except the first layer's)
at the measured FMA peak, plus its tanh/sigmoid evaluations at the measured cost (tanh
and sigmoid are forward-only; their derivatives come from the output). Loss, optimizer,
pooling and data movement are left out, so a real step is always above the floor; "x of
floor" = measured time / floor. ``--json`` writes the figures for other scripts
(``bench/run_matexp.py`` and ``bench/run_lenet5.py`` run this script in a subprocess and
read that file: ``_common.machine_floors``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402


def kernel_vector_bytes():
    """Bytes per vector of the generated kernels for the default register budget."""
    from smallchains._simd import vector_bytes
    from smallchains.compiler.options import default_registers
    return vector_bytes(default_registers())


@functools.lru_cache(maxsize=None)
def _kernels(nbytes=32):
    from numba import njit

    from smallchains._fastmath import tanh_f32, tanh_f64
    from smallchains._simd import vfma, vstore, width_functions

    vload, vsplat = width_functions(nbytes)

    @njit(nogil=True, cache=False)
    def fma_loop(n, a, out):
        # 12 independent chains c = c * m + b; m, b and the chains live in registers
        m, b = vsplat(a[0]), vsplat(a[1])
        c0 = vload(a, 2)
        c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11 = c0, c0, c0, c0, c0, c0, c0, c0, c0, c0, c0
        for _ in range(n):
            c0 = vfma(c0, m, b)
            c1 = vfma(c1, m, b)
            c2 = vfma(c2, m, b)
            c3 = vfma(c3, m, b)
            c4 = vfma(c4, m, b)
            c5 = vfma(c5, m, b)
            c6 = vfma(c6, m, b)
            c7 = vfma(c7, m, b)
            c8 = vfma(c8, m, b)
            c9 = vfma(c9, m, b)
            c10 = vfma(c10, m, b)
            c11 = vfma(c11, m, b)
        for c in (c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11):
            vstore(out, 0, vfma(c, m, vload(out, 0)))

    def tanh_loop(tanh):
        @njit(nogil=True, cache=False)
        def loop(n, x, y):
            for _ in range(n):
                for k in range(x.shape[0]):
                    y[k] = tanh(x[k])
        return loop

    @njit(nogil=True, cache=False)
    def gather_loop(X, idx, lo, hi, buf):
        # rows idx[lo:hi] of X copied, in order, into the rows of buf (reused cyclically)
        nb = buf.shape[0]
        for s in range(lo, hi):
            r = idx[s]
            row = buf[(s - lo) % nb]
            for f in range(X.shape[1]):
                row[f] = X[r, f]

    return (fma_loop, {np.float32: tanh_loop(tanh_f32), np.float64: tanh_loop(tanh_f64)},
            gather_loop)


def _run_threads(fn, nthreads):
    """Wall seconds of ``fn(k)`` run by threads ``k = 0 .. nthreads - 1`` started together."""
    barrier = threading.Barrier(nthreads + 1)
    done = []

    def work(k):
        barrier.wait()
        fn(k)
        done.append(time.perf_counter())

    ts = [threading.Thread(target=work, args=(k,)) for k in range(nthreads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return max(done) - t0


def fma_peak(dtype, nthreads, seconds=0.3, repeats=5, nbytes=None):
    """GFLOP/s of the register-only FMA loop in ``dtype`` on ``nthreads`` threads (best of
    ``repeats`` runs of about ``seconds`` each)."""
    nbytes = nbytes or kernel_vector_bytes()
    fma_loop = _kernels(nbytes)[0]
    dt = np.dtype(dtype)
    lanes = nbytes // dt.itemsize
    a = np.full(2 + lanes, 0.5, dtype=dt)
    a[0], a[1] = 0.999, 1e-3
    out = np.zeros(lanes, dtype=dt)
    fma_loop(10, a, out)
    n = 1 << 16
    while True:  # calibrate n to about `seconds` on one thread
        t0 = time.perf_counter()
        fma_loop(n, a, out)
        if time.perf_counter() - t0 > seconds / 4:
            break
        n *= 2
    n = int(n * seconds / max(time.perf_counter() - t0, 1e-9))
    best = min(_run_threads(lambda k: fma_loop(n, a, np.zeros(lanes, dtype=dt)), nthreads)
               for _ in range(repeats))
    return nthreads * n * 12 * lanes * 2 / best / 1e9


def tanh_ns(dtype, repeats=5):
    """Nanoseconds per element of the kernels' tanh in ``dtype``, one thread."""
    loops = _kernels()[1]
    fn = loops[np.dtype(dtype).type]
    x = np.linspace(-4, 4, 4096).astype(dtype)
    y = np.empty_like(x)
    fn(1, x, y)
    n = 2000
    best = 1e9
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n, x, y)
        best = min(best, time.perf_counter() - t0)
    return best / (n * x.size) * 1e9


def gather_seconds(n, features, nthreads, repeats=3, seed=0):
    """Seconds to copy the ``n`` rows of an ``(n, features)`` float32 array in a shuffled
    order into a 160-row buffer, each of ``nthreads`` threads copying a contiguous share of
    the shuffled order (best of ``repeats``; inputs under 2 million rows are copied several
    times per run, and the time divided)."""
    gather_loop = _kernels()[2]
    rng = np.random.default_rng(seed)
    X = rng.random((n, features), dtype=np.float32)
    idx = rng.permutation(n)
    bufs = [np.zeros((160, features), np.float32) for _ in range(nthreads)]
    bounds = [n * k // nthreads for k in range(nthreads + 1)]
    gather_loop(X, idx, 0, min(n, 1000), bufs[0])
    loops = max(1, 2_000_000 // n)  # small inputs: many epochs per thread start
    best = 1e9
    def one(k):
        for _ in range(loops):
            gather_loop(X, idx, bounds[k], bounds[k + 1], bufs[k])
    for _ in range(repeats):
        best = min(best, _run_threads(one, nthreads) / loops)
    return best


# --- workloads ---------------------------------------------------------------------

def chain_costs(chain):
    """(multiply-adds, tanh/sigmoid evaluations) per sample of one training step of
    ``chain``: forward, dW, and dL/dx of every layer but the first; dense and conv
    layers (recurrent layers are not counted)."""
    import smallchains as sc
    from math import prod
    macs, tanhs, first = 0, 0, True
    for layer, (ins, outs) in zip(chain.layers, chain._shapes):
        if isinstance(layer, sc.TurboDense):
            m = ins[0] * layer.out
        elif isinstance(layer, sc.Conv):
            kh, kw = layer.kernel_size
            m = prod(outs) * ins[0] * kh * kw
        else:
            continue
        macs += m * (2 if first else 3)
        first = False
        if layer.activation.name in ("tanh", "sigmoid"):
            tanhs += prod(outs)
    return macs, tanhs


def workloads():
    """name -> (chain, samples per timed unit, unit, dtype) of the bench/ workloads."""
    import smallchains as sc
    return {
        "matexp (bench/matexp.py)": (C.matexp_chain(), C.N_SAMPLES, "epoch (one step)",
                                     np.float32),
        "LeNet5 (bench/lenet5.py)": (C.lenet5_chain(), 60_000, "epoch", np.float32),
        "CIFAR dense, net 1 (bench/cifar_dense.py)": (
            sc.SimpleChain(1024, sc.TurboDense(64, "sigmoid"), sc.TurboDense(32, "sigmoid"),
                           sc.TurboDense(10)), 50_000, "epoch", np.float32),
        "MNIST MLP, net 2 (bench/mnist_mlp.py)": (
            sc.SimpleChain(784, sc.TurboDense(128, "relu"), sc.Dropout(0.5), sc.TurboDense(10)),
            60_000, "epoch", np.float32),
    }


def measure(threads=(1, 2), seconds=0.3, nbytes=None):
    """The figures as a dict: ``fma_gflops[dtype][threads]``, ``tanh_ns[dtype]``, and
    ``floors[workload] = {unit, samples, macs, tanhs, seconds: {threads: s},
    gather_seconds: {threads: s}}`` (float32)."""
    out = {"fma_gflops": {}, "tanh_ns": {}, "floors": {}}
    for dt in (np.float32, np.float64):
        name = np.dtype(dt).name
        out["fma_gflops"][name] = {str(t): fma_peak(dt, t, seconds, nbytes=nbytes) for t in threads}
        out["tanh_ns"][name] = tanh_ns(dt)
    for name, (chain, n, unit, dt) in workloads().items():
        macs, tanhs = chain_costs(chain)
        dn = np.dtype(dt).name
        secs = {str(t): n * (2 * macs / (out["fma_gflops"][dn][str(t)] * 1e9)
                             + tanhs * out["tanh_ns"][dn] * 1e-9 / t) for t in threads}
        gather = {str(t): gather_seconds(n, int(np.prod(chain.input_shape)), t) for t in threads}
        out["floors"][name] = dict(unit=unit, samples=n, macs=macs, tanhs=tanhs, seconds=secs,
                                   gather_seconds=gather)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=0.3, help="length of one FMA run")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--vector-bytes", type=int, choices=(32, 64),
                    help="width of the FMA loop's vectors (default: the kernels' on this CPU)")
    args = ap.parse_args()
    nbytes = args.vector_bytes or kernel_vector_bytes()
    res = measure(tuple(args.threads), args.seconds, nbytes)
    print(f"CPU: {C.cpu_name()}; FMA loop on {nbytes}-byte vectors")
    print("| dtype | " + " | ".join(f"FMA peak, {t} thr (GFLOP/s)" for t in args.threads)
          + " | tanh (ns/element, 1 thr) |")
    print("|---|" + "---:|" * (len(args.threads) + 1))
    for dt, g in res["fma_gflops"].items():
        print(f"| {dt} | " + " | ".join(f"{g[str(t)]:.1f}" for t in args.threads)
              + f" | {res['tanh_ns'][dt]:.3f} |")
    print()
    print("| workload (float32) | unit | MACs/sample | tanh/sample | "
          + " | ".join(f"floor {t} thr" for t in args.threads) + " | "
          + " | ".join(f"input gather {t} thr" for t in args.threads) + " |")
    print("|---|---|---:|---:|" + "---:|" * 2 * len(args.threads))
    for name, f in res["floors"].items():
        cells = " | ".join(_fmt(f[key][str(t)]) for key in ("seconds", "gather_seconds")
                           for t in args.threads)
        print(f"| {name} | {f['unit']} | {f['macs']:,} | {f['tanhs']} | {cells} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


def _fmt(s):
    return f"{s * 1e6:.0f} us" if s < 0.01 else f"{s:.3f} s"


if __name__ == "__main__":
    main()
