"""Shared helpers for the smallchains benchmarks.

Keep this module free of heavy imports at module level: ``setup_threads`` must
run *before* numba / torch / jax are imported, because their thread pools are
sized from environment variables read at import time.
"""
from __future__ import annotations

import os
import sys

# Workload constants (SimpleChains.jl matrix-exponential example).
N_SAMPLES = 10_000
N_IN = 4
N_OUT = 4
HIDDEN = (32, 16)
LR = 1e-3
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
DATA_SEED = 0
PARAM_SEED = 0

# FLOPs per sample per training step, as used by the SimpleChains.jl docs for
# this model (forward + backward). Throughput = FLOPS_PER_SAMPLE * N / time.
FLOPS_PER_SAMPLE = 4224
FLOPS_PER_EPOCH = FLOPS_PER_SAMPLE * N_SAMPLES

IMPLS = ("smallchains", "torch", "torch-compile", "jax")


# --------------------------------------------------------------------------
# argv / threads
# --------------------------------------------------------------------------
def peek_arg(name: str, default=None, argv=None):
    """Read ``--name VALUE`` or ``--name=VALUE`` from argv without argparse.

    Used at the very top of scripts, before heavy imports, because pyperf
    worker processes re-run the script with the same (user) arguments.
    """
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def setup_threads(n: int, impl: str, pin: bool = True) -> list[int]:
    """Configure thread counts for ``impl``. MUST run before importing numba,
    torch or jax. Returns the CPU set the process is pinned to.

    * all impls: OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS = n
      and (if ``pin``) ``os.sched_setaffinity`` to the first n allowed cores,
      so every impl sees the same hardware.
    * smallchains: NUMBA_NUM_THREADS = n.
    * jax: XLA_FLAGS = "--xla_cpu_multi_thread_eigen=<n > 1>
      intra_op_parallelism_threads=n". XLA's CPU thread pool is sized from the
      number of *schedulable* CPUs (sched_getaffinity), so the affinity mask
      is what really restricts it (measured: with the flags alone a
      1-thread run still used ~1.06 cores; pinned, <= 1.0); the eigen flag controls intra-op Eigen
      threading. (``intra_op_parallelism_threads=`` without the leading
      ``--`` is accepted-and-ignored by the XLA flag parser; with ``--`` it is
      a fatal "Unknown flag".)
    * torch: torch.set_num_threads(n) / set_num_interop_threads(1) is done
      after import by ``torch_threads``.
    """
    n = int(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if impl == "smallchains":
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    if impl.startswith("jax"):
        multi = "true" if n > 1 else "false"
        flags = os.environ.get("XLA_FLAGS", "")
        flags += (f" --xla_cpu_multi_thread_eigen={multi}"
                  f" intra_op_parallelism_threads={n}")
        os.environ["XLA_FLAGS"] = flags.strip()
    cpus = sorted(os.sched_getaffinity(0))
    if pin:
        if n > len(cpus):
            print(f"warning: {n} threads requested but only {len(cpus)} CPUs "
                  f"available", file=sys.stderr)
        cpus = cpus[:n]
        os.sched_setaffinity(0, cpus)
    return cpus


def torch_threads(n: int):
    import torch
    torch.set_num_threads(int(n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        # only allowed once, before any inter-op work has started
        pass


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def expm_2x2_batch(A):
    """Exact matrix exponential of a batch of 2x2 matrices, A: (n, 2, 2)
    (float64). Closed form: with m = tr/2, B = A - m I, d^2 = -det(B),
    exp(A) = e^m (cosh(d) I + sinh(d)/d B)  (d may be imaginary)."""
    import numpy as np
    A = np.asarray(A, dtype=np.float64)
    m = 0.5 * (A[:, 0, 0] + A[:, 1, 1])
    B = A - m[:, None, None] * np.eye(2)
    d2 = -(B[:, 0, 0] * B[:, 1, 1] - B[:, 0, 1] * B[:, 1, 0])
    d = np.sqrt(d2.astype(np.complex128))
    c = np.cosh(d).real
    small = np.abs(d) < 1e-8
    s = np.where(small, 1.0 + d2 / 6.0,
                 (np.sinh(d) / np.where(small, 1.0, d)).real)
    E = c[:, None, None] * np.eye(2) + s[:, None, None] * B
    return np.exp(m)[:, None, None] * E


def make_data(n: int = N_SAMPLES, seed: int = DATA_SEED, check: bool = False):
    """X: (n, 4) float32 ~ randn, each row a row-major flattened 2x2 matrix.
    Y: (n, 4) float32, row-major flattened expm of that matrix.

    Row-major samples (n, features): transpose for feature-major libraries.
    If ``check``, verify the closed form against scipy.linalg.expm."""
    import numpy as np
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4), dtype=np.float32)
    Y = expm_2x2_batch(X.astype(np.float64).reshape(n, 2, 2))
    if check:
        from scipy.linalg import expm
        ref = expm(X.astype(np.float64).reshape(n, 2, 2))  # batched in scipy>=1.9
        err = np.max(np.abs(ref - Y) / (1 + np.abs(ref)))
        assert err < 1e-10, err
    return X, Y.reshape(n, 4).astype(np.float32)


def glorot_params(seed: int = PARAM_SEED):
    """Reference initial params [(W (out,in), b (out,)), ...] as float32,
    Glorot-uniform weights, zero bias. Used by torch/jax impls so both start
    from identical weights."""
    import numpy as np
    rng = np.random.default_rng(seed)
    dims = (N_IN,) + HIDDEN + (N_OUT,)
    out = []
    for fi, fo in zip(dims[:-1], dims[1:]):
        lim = np.sqrt(6.0 / (fi + fo))
        W = rng.uniform(-lim, lim, size=(fo, fi)).astype(np.float32)
        out.append((W, np.zeros(fo, np.float32)))
    return out


# --------------------------------------------------------------------------
# result table
# --------------------------------------------------------------------------
def fmt_table(rows, baseline_impl="torch", floors=None):
    """rows: list of dicts with keys impl, threads, mean, std (seconds per
    epoch). ``floors``: {threads: floor seconds} (bench/limits.py) for an
    "x of floor" column. Returns a markdown table string."""
    base = {r["threads"]: r["mean"] for r in rows if r["impl"] == baseline_impl}
    fl = " x of floor |" if floors else ""
    lines = [
        "| impl | threads | µs/epoch (mean ± std) | vs torch eager | GFLOP/s |" + fl,
        "|---|---:|---:|---:|---:|" + "---:|" * bool(floors),
    ]
    for r in rows:
        us, sd = r["mean"] * 1e6, r["std"] * 1e6
        b = base.get(r["threads"])
        ratio = f"{b / r['mean']:.2f}x" if b else "n/a"
        gf = FLOPS_PER_EPOCH / r["mean"] / 1e9
        lines.append(f"| {r['impl']} | {r['threads']} | {us:,.1f} ± {sd:,.1f}"
                     f" | {ratio} | {gf:.2f} |" + _floor_cell(r, floors))
    return "\n".join(lines)


def _floor_cell(r, floors):
    if not floors:
        return ""
    f = floors.get(r["threads"])
    return f" {r['mean'] / f:.2f} |" if f else " n/a |"


def machine_floors(workload, threads):
    """{threads: floor seconds} of ``workload`` (a name prefix of bench/limits.py's
    workloads), measured by bench/limits.py in a subprocess (nothing else running), or
    None if that failed."""
    import json
    import subprocess
    import tempfile
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        cmd = [sys.executable, os.path.join(here, "limits.py"), "--json", fh.name,
               "--threads", *map(str, threads)]
        print("$", " ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return None
        with open(fh.name) as f:
            res = json.load(f)
    for name, fl in res["floors"].items():
        if name.startswith(workload):
            return {int(t): s for t, s in fl["seconds"].items()}
    return None


def lower_floors(a, b):
    """The lower floor per thread count of two :func:`machine_floors` results (the faster
    phase of a drifting machine: the stricter floor)."""
    if not a or not b:
        return a or b
    return {t: min(a[t], b[t]) for t in a}


if __name__ == "__main__":
    X, Y = make_data(check=True)
    print(X.shape, X.dtype, Y.shape, Y.dtype, "expm check OK")


# --------------------------------------------------------------------------
# LeNet5 / MNIST workload (SimpleChains.jl's second published benchmark)
# --------------------------------------------------------------------------
LENET5_N_TRAIN = 60_000
LENET5_LR = 3e-4


def cpu_name():
    """The CPU model and its vector extensions, as printed beside every figure."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        for line in info.splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        flags = info.split("flags", 1)[1].split("\n", 1)[0].split() if "flags" in info else []
        ext = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
        return f"{name} ({ext}, {os.cpu_count()} logical CPUs)"
    except OSError:
        return name


def matexp_chain():
    """The matrix-exponential model 4 -> 32 tanh -> 16 tanh -> 4 (imports smallchains)."""
    import smallchains as sc
    return sc.SimpleChain(4, sc.TurboDense(32, "tanh"), sc.TurboDense(16, "tanh"),
                          sc.TurboDense(4))


def lenet5_chain():
    """The blog's LeNet5 over (1, 28, 28) images: ``examples/lenet5_mnist.py``'s
    ``lenet5()`` (imports smallchains)."""
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    from lenet5_mnist import lenet5
    return lenet5()


def default_data_dir() -> str:
    """``$SMALLCHAINS_DATA`` if set, else ``<repo>/../shared/datasets``."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("SMALLCHAINS_DATA") or os.path.normpath(
        os.path.join(repo, "..", "shared", "datasets"))


def ensure_data_env(env=None):
    """Set SMALLCHAINS_DATA in ``env`` (default ``os.environ``) if unset;
    returns ``env``."""
    env = os.environ if env is None else env
    if not env.get("SMALLCHAINS_DATA"):
        env["SMALLCHAINS_DATA"] = default_data_dir()
    return env


def load_mnist_train(limit=None):
    """Real MNIST training set via smallchains.datasets: X float32
    (N,1,28,28) in [0,1], y int64, read-only; first ``limit`` images if given.
    Imports smallchains (so numba): call after setup_threads."""
    ensure_data_env()
    import smallchains as sc
    X, y = sc.datasets.mnist("train")
    if limit:
        X, y = X[:int(limit)], y[:int(limit)]
    return X, y


def fmt_table_lenet5(rows, floors=None):
    """rows: dicts with impl, batch (label str), threads, mean, std (s/epoch
    of 60k images). Ratio = best torch mean at the same thread count / mean.
    ``floors``: as :func:`fmt_table`."""
    best = {}
    for r in rows:
        if r["impl"] == "torch":
            t = r["threads"]
            best[t] = min(best.get(t, float("inf")), r["mean"])
    lines = [
        "| impl | batch size | threads | s/epoch (mean ± std) | vs best torch |"
        + (" x of floor |" if floors else ""),
        "|---|---:|---:|---:|---:|" + "---:|" * bool(floors),
    ]
    for r in rows:
        b = best.get(r["threads"])
        ratio = f"{b / r['mean']:.2f}x" if b else "n/a"
        lines.append(f"| {r['impl']} | {r['batch']} | {r['threads']} | "
                     f"{r['mean']:.3f} ± {r['std']:.3f} | {ratio} |" + _floor_cell(r, floors))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# driver output
# --------------------------------------------------------------------------
def compile_latency(*args, env=None) -> str:
    """Run ``bench/compile_latency.py *args`` in a subprocess; its summary line, or a
    FAILED note with the end of its stderr."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    print("$ compile_latency.py " + " ".join(args), flush=True)
    r = subprocess.run([sys.executable, os.path.join(here, "compile_latency.py"), *args],
                       capture_output=True, text=True, env=env)
    if r.returncode == 0:
        return r.stdout.strip()
    return "compile latency: FAILED\n" + r.stderr.strip()[-2000:]


def report(text, notes=(), lat="", out=None) -> str:
    """Append notes and the compile-latency line to ``text``, print it, and also write it
    to ``out`` if given."""
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    if lat:
        text += "\n" + lat + "\n"
    print()
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text


# --------------------------------------------------------------------------
# training benchmarks of the published small networks (cifar_dense, mnist_mlp, cifar_cnn)
# --------------------------------------------------------------------------
def torch_epoch(net, opt, x, t, batch, gen, limit=None):
    """One shuffled torch eager epoch (``limit``: only the first rows of the permutation):
    minibatches gathered by index, ``zero_grad(set_to_none=True)``, logit cross-entropy."""
    import torch
    import torch.nn.functional as F
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x) if limit is None else limit, batch):
        idx = perm[i:i + batch]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x[idx]), t[idx]).backward()
        opt.step()


def smallchains_trainer(chain, X, y, make_opt, batch, warm_batches):
    """A pyperf time function of shuffled ``train_batched`` epochs of ``chain`` (logit
    cross-entropy on labels ``y``, optimizer ``make_opt()``, minibatches of ``batch``,
    layer state if the chain has one), after compiling on ``warm_batches`` minibatches."""
    import smallchains as sc
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    p = sc.init_params(chain, seed=0)
    state = sc.init_state(chain) if chain.n_state else None
    G = sc.alloc_threaded_grad(chain)
    opt = make_opt()
    rows = warm_batches * batch
    warm = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y[:rows]))
    sc.train_batched(G, p.copy(), warm, X[:rows], make_opt(), 1, batch_size=batch,
                     state=None if state is None else state.copy())
    epoch = [0]

    def run_epoch():
        epoch[0] += 1
        sc.train_batched(G, p, model, X, opt, 1, batch_size=batch, seed=epoch[0], state=state)
    return timed_epochs(run_epoch)


def torch_trainer(net, opt, X, y, batch, warm_batches):
    """A pyperf time function of shuffled torch eager epochs (:func:`torch_epoch`) of
    ``net`` in train mode, after ``warm_batches`` minibatches."""
    import torch
    net.train()
    x, t = torch.from_numpy(X), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    torch_epoch(net, opt, x, t, batch, gen, limit=warm_batches * batch)
    return timed_epochs(lambda: torch_epoch(net, opt, x, t, batch, gen))


def timed_epochs(run_epoch):
    """A pyperf time function: ``loops`` calls of ``run_epoch()``."""
    import time

    def bench(loops):
        t0 = time.perf_counter()
        for _ in range(loops):
            run_epoch()
        return time.perf_counter() - t0
    return bench


def run_training_bench(name, builders, load, forwarded=(), extra_args=(), metadata=None):
    """The pyperf main of a training benchmark: ``--impl`` (a key of ``builders``),
    ``--threads``, ``--no-pin`` and ``extra_args`` (``(flag, argparse kwargs)``; the
    ``forwarded`` ones are passed on to the worker processes). In a worker,
    ``builders[impl](*load())`` returns the time function; the benchmark is named
    ``name(args)``."""
    import pyperf

    def add_cmdline_args(cmd, args):
        cmd.extend(["--impl", args.impl, "--threads", str(args.threads)])
        for flag in forwarded:
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            cmd.extend([flag, *map(str, value if isinstance(value, (list, tuple)) else [value])])
        if args.no_pin:
            cmd.append("--no-pin")

    runner = pyperf.Runner(processes=2, values=3, warmups=1, loops=1,
                           add_cmdline_args=add_cmdline_args)
    ap = runner.argparser
    ap.add_argument("--impl", choices=sorted(builders), default="torch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-pin", action="store_true")
    for flag, kwargs in extra_args:
        ap.add_argument(flag, **kwargs)
    args = runner.parse_args()
    runner.metadata.update(impl=args.impl, threads=str(args.threads), **(metadata or {}))
    if args.worker:
        bench = builders[args.impl](*load())
    else:
        def bench(loops):
            raise RuntimeError("unreachable")
    runner.bench_time_func(name(args), bench)
