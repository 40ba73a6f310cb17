"""How small is small? Training-step time of smallchains against torch eager (and JAX) as
dense chains widen, batches grow and conv channels multiply.

    python bench/crossover.py [--threads 1 2] [--impls smallchains torch jax]
                              [--quick] [--json out.json] [--plot docs/img/crossover.png]

One worker process per (impl, thread count), threads set and cores pinned before the
framework is imported (``_common.setup_threads``), runs every configuration in turn; the
driver prints one table of ratios (peer time / smallchains time, so above 1 means
smallchains is faster) and can plot them.

Workloads (float32, one full-batch Adam(1e-3) step on a fixed random batch, the loss and
its gradient included):

* **dense**: 64 inputs -> Dense(w, tanh) -> Dense(w, tanh) -> Dense(8), mean squared
  error, for widths w in 16, 64, 256, 1024 and batches 32, 256, 2048, 10000 (``--quick``:
  fewer);
* **conv**: (1, 28, 28) -> Conv(c, 5x5, relu) -> MaxPool 2 -> Conv(2c, 5x5, relu) ->
  MaxPool 2 -> Flatten -> Dense(10), logit cross-entropy, batch 128, c in 6 (LeNet5's),
  16, 32, 64.

Each figure is the best of 5 repeats of enough steps for about 0.2 s (a floor estimate
rather than a mean: this machine's speed drifts, and the best repeat is the least
disturbed one). smallchains runs ``train_unbatched`` (all steps in compiled code); torch an
eager loop with fused Adam; JAX one jitted step (forward, grad, hand-written Adam) in a
Python loop, dense only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

WIDTHS, BATCHES = (16, 64, 256, 1024), (32, 256, 2048, 10000)
CHANNELS, CONV_BATCH = (6, 16, 32, 64), 128
N_IN, N_OUT = 64, 8


def configs(quick):
    widths, batches = ((16, 256, 1024), (32, 2048)) if quick else (WIDTHS, BATCHES)
    out = [("dense", w, b) for w in widths for b in batches]
    out += [("conv", c, CONV_BATCH) for c in ((6, 32) if quick else CHANNELS)]
    return out


def _data(kind, size, batch):
    import numpy as np
    rng = np.random.default_rng(0)
    if kind == "dense":
        X = rng.standard_normal((batch, N_IN)).astype(np.float32)
        Y = rng.standard_normal((batch, N_OUT)).astype(np.float32)
    else:
        X = rng.random((batch, 1, 28, 28), dtype=np.float32)
        Y = rng.integers(0, 10, batch)
    return X, Y


def _best(run_steps, target=0.2, repeats=5):
    """Seconds per step: ``run_steps(k)`` runs k steps; k is calibrated to ``target``."""
    k = 1
    while True:
        t0 = time.perf_counter()
        run_steps(k)
        dt = time.perf_counter() - t0
        if dt > target / 4 or k >= 4096:
            break
        k *= 2
    k = max(1, int(k * target / max(dt, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_steps(k)
        best = min(best, (time.perf_counter() - t0) / k)
    return best


def run_smallchains(kind, size, batch):
    import smallchains as sc
    X, Y = _data(kind, size, batch)
    if kind == "dense":
        chain = sc.SimpleChain(N_IN, sc.TurboDense(size, "tanh"), sc.TurboDense(size, "tanh"),
                               sc.TurboDense(N_OUT))
        model = sc.add_loss(chain, sc.MSELoss(Y))
    else:
        chain = sc.SimpleChain((1, 28, 28), sc.Conv(size, 5, "relu"), sc.MaxPool(2),
                               sc.Conv(2 * size, 5, "relu"), sc.MaxPool(2), sc.Flatten(),
                               sc.TurboDense(10))
        model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(Y))
    p = sc.init_params(chain, seed=0)
    G = sc.alloc_threaded_grad(chain)
    opt = sc.Adam(1e-3)
    sc.train_unbatched(G, p, model, X, opt, 2)
    return _best(lambda k: sc.train_unbatched(G, p, model, X, opt, k))


def run_torch(kind, size, batch, threads):
    import torch
    C.torch_threads(threads)
    torch.manual_seed(0)
    nn = torch.nn
    X, Y = (torch.from_numpy(a) for a in _data(kind, size, batch))
    if kind == "dense":
        net = nn.Sequential(nn.Linear(N_IN, size), nn.Tanh(), nn.Linear(size, size), nn.Tanh(),
                            nn.Linear(size, N_OUT))
        loss_fn = nn.MSELoss()
    else:
        net = nn.Sequential(nn.Conv2d(1, size, 5), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(size, 2 * size, 5), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(2 * size * 16, 10))
        loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

    def steps(k):
        for _ in range(k):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(X), Y).backward()
            opt.step()
    steps(2)
    return _best(steps)


def run_jax(kind, size, batch):
    if kind != "dense":
        return None
    import jax
    import jax.numpy as jnp
    X, Y = (jnp.asarray(a) for a in _data(kind, size, batch))
    key = jax.random.PRNGKey(0)
    shapes = [(N_IN, size), (size, size), (size, N_OUT)]
    params = []
    for (a, b) in shapes:
        key, sub = jax.random.split(key)
        params += [jax.random.normal(sub, (a, b), jnp.float32) * (2 / (a + b)) ** 0.5,
                   jnp.zeros(b, jnp.float32)]

    def loss(ps):
        h = jnp.tanh(X @ ps[0] + ps[1])
        h = jnp.tanh(h @ ps[2] + ps[3])
        return jnp.mean((h @ ps[4] + ps[5] - Y) ** 2)

    @jax.jit
    def step(ps, m, v, t):
        g = jax.grad(loss)(ps)
        m = [0.9 * a + 0.1 * b for a, b in zip(m, g)]
        v = [0.999 * a + 0.001 * b * b for a, b in zip(v, g)]
        bc1, bc2 = 1 - 0.9 ** t, 1 - 0.999 ** t
        ps = [q - 1e-3 / bc1 * a / (jnp.sqrt(b / bc2) + 1e-8) for q, a, b in zip(ps, m, v)]
        return ps, m, v

    st = [params, [jnp.zeros_like(q) for q in params], [jnp.zeros_like(q) for q in params], 1.0]

    def steps(k):
        ps, m, v, t = st
        for _ in range(k):
            ps, m, v = step(ps, m, v, t)
            t += 1.0
        jax.block_until_ready(ps)
        st[:] = [ps, m, v, t]
    steps(2)
    return _best(steps)


def worker(impl, threads, quick):
    out = {}
    for kind, size, batch in configs(quick):
        if impl == "smallchains":
            t = run_smallchains(kind, size, batch)
        elif impl == "torch":
            t = run_torch(kind, size, batch, threads)
        else:
            t = run_jax(kind, size, batch)
        if t is not None:
            out[f"{kind}:{size}:{batch}"] = t
            print(f"  {impl} t{threads} {kind} {size} batch {batch}: {t * 1e6:,.0f} us/step",
                  file=sys.stderr, flush=True)
    print(json.dumps(out))


def _installed(mod):
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def table(res, threads, impls):
    peers = [i for i in impls if i != "smallchains"]
    head = "| workload | size | batch | threads | smallchains (us/step) | " + " | ".join(
        f"{p} (us/step) | {p} / smallchains" for p in peers) + " |"
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|---:|" * len(peers)]
    for key in res.get(("smallchains", threads[0]), {}):
        kind, size, batch = key.split(":")
        for t in threads:
            ours = res.get(("smallchains", t), {}).get(key)
            if ours is None:
                continue
            cells = []
            for p in peers:
                v = res.get((p, t), {}).get(key)
                cells += [f"{v * 1e6:,.0f}", f"{v / ours:.2f}x"] if v else ["", ""]
            lines.append(f"| {kind} | {size} | {batch} | {t} | {ours * 1e6:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res, threads, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for t, style in zip(threads, ("-", "--")):
        ours = res.get(("smallchains", t), {})
        peer = res.get(("torch", t), {})
        widths = sorted({int(k.split(":")[1]) for k in ours if k.startswith("dense")})
        for w, color in zip(widths, colors):
            keys = sorted((k for k in ours if k.startswith(f"dense:{w}:")), key=lambda k: int(k.split(":")[2]))
            xs = [int(k.split(":")[2]) for k in keys if k in peer]
            ys = [peer[k] / ours[k] for k in keys if k in peer]
            ax.plot(xs, ys, style, color=color, marker="o", label=f"width {w}, {t} thr")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("batch size"), ax.set_ylabel("torch eager time / smallchains time")
    ax.set_title("dense 64 -> w -> w -> 8 (tanh), Adam step")
    ax.legend(fontsize=7)
    ax = axes[1]
    for t, style in zip(threads, ("-", "--")):
        ours = res.get(("smallchains", t), {})
        peer = res.get(("torch", t), {})
        keys = sorted((k for k in ours if k.startswith("conv") and k in peer), key=lambda k: int(k.split(":")[1]))
        ax.plot([int(k.split(":")[1]) for k in keys], [peer[k] / ours[k] for k in keys], style,
                color="k", marker="o", label=f"{t} thr")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xticks(list(CHANNELS), [str(c) for c in CHANNELS])
    ax.minorticks_off()
    ax.set_xlabel("first conv channels c (second: 2c)"), ax.set_ylabel("torch eager time / smallchains time")
    ax.set_title(f"conv 28x28, batch {CONV_BATCH}, Adam step")
    ax.legend(fontsize=7)
    fig.suptitle(f"above 1: smallchains faster ({C.cpu_name()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--impls", nargs="+", default=["smallchains", "torch", "jax"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--from-json", help="table and plot of an earlier --json file (no runs)")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.quick)
        return
    if args.from_json:
        with open(args.from_json) as fh:
            res = {(k.split("@")[0], int(k.split("@")[1])): v for k, v in json.load(fh).items()}
        threads = sorted({t for _, t in res})
        print(table(res, threads, [i for i in args.impls if any(i == j for j, _ in res)]))
        if args.plot:
            plot(res, threads, args.plot)
        return
    impls = [i for i in args.impls if _installed({"smallchains": "smallchains"}.get(i, i))]
    res = {}
    for t in args.threads:
        for impl in impls:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, str(t)] + ["--quick"] * args.quick
            print("$", " ".join(cmd[1:]), flush=True)
            r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if r.returncode == 0:
                res[(impl, t)] = json.loads(r.stdout.strip().splitlines()[-1])
            else:
                print(f"  FAILED: {impl} at {t} threads (rc {r.returncode})", flush=True)
    print(f"\nCPU: {C.cpu_name()}\n")
    print(table(res, args.threads, impls))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({f"{i}@{t}": v for (i, t), v in res.items()}, fh, indent=1)
    if args.plot:
        plot(res, args.threads, args.plot)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        C.setup_threads(int(sys.argv[i + 2]), sys.argv[i + 1])
    main()
