"""Learn the 2x2 matrix exponential: the SimpleChains.jl announcement-blog workflow.

A 4 -> 32 (tanh) -> 16 (tanh) -> 4 multilayer perceptron is trained full-batch with
Adam(1e-3) on 10,000 random 2x2 matrices (flattened) and their exponentials, and
evaluated on an independent 10,000-sample test set. Training runs in rounds of 10,000
steps; after each round the train loss, test loss and wall time of the round are printed.

With ``--compare-torch`` an identical PyTorch model, started from the SAME initial
parameters, is trained on the same data with ``torch.optim.Adam(1e-3)``, the same loss
(sum of squared errors / N) and the same number of steps, in float32.

    python examples/matrix_exponential.py                      # smallchains only
    python examples/matrix_exponential.py --compare-torch      # + PyTorch reference
    python examples/matrix_exponential.py --threads 1 --steps 2000 --quiet
    python examples/matrix_exponential.py --quiet --plot docs/img/matexp_loss.png

With ``--plot PATH`` (needs matplotlib) the test loss is also evaluated every
``--steps // 50`` steps (inside the timed rounds) and the train and test loss curves are
drawn to PATH.

:func:`main` takes an argv list (or None for ``sys.argv``) and returns a dict of results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

LAYERS = [(32, "tanh"), (16, "tanh"), (4, "identity")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000, help="Adam steps per round (10000)")
    ap.add_argument("--rounds", type=int, default=3, help="number of rounds (3)")
    ap.add_argument("--n", type=int, default=10_000, help="train and test set size (10000)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for numba (NUMBA_NUM_THREADS) and torch; default: numba's")
    ap.add_argument("--compare-torch", action="store_true",
                    help="also train an identical torch model from the same initial parameters")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the parameters; the train set uses seed, the test set seed+1")
    ap.add_argument("--plot", default=None, metavar="PATH",
                    help="write the train/test loss curves (PNG) here; needs matplotlib")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.n < 1:
        ap.error("--steps, --rounds and --n must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


# --------------------------------------------------------------------------------------
# torch reference

def _torch_model(torch, chain, p):
    """nn.Sequential equal to ``chain`` at parameters ``p`` (float32, copied)."""
    nn = torch.nn
    mods = []
    for (width, act), views in zip(LAYERS, chain.param_views(p)):
        W, b = views["W"], views["b"]
        lin = nn.Linear(W.shape[1], W.shape[0], dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(W, dtype=np.float32)))
            lin.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))
        mods.append(lin)
        if act == "tanh":
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


def _torch_loss(torch, net, X, Y):
    return ((net(X) - Y) ** 2).sum() / X.shape[0]


# --------------------------------------------------------------------------------------

def plot(path, res):
    """Train loss of every step and test loss every few steps, log y, to PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = np.concatenate(res["sc_hist"])  # loss before each step
    steps, test = zip(*res["sc_test_curve"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(np.arange(len(hist)), hist, "C0-", lw=1, label="train loss (before each step)")
    ax.plot(steps, test, "C1o-", ms=3, lw=1, label="test loss")
    for r in range(1, res["rounds"]):
        ax.axvline(r * res["steps"], color="0.8", lw=0.8, zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel("full-batch Adam(1e-3) steps")
    ax.set_ylabel("loss: sum of squared errors / N")
    ax.set_title(f"2x2 matrix exponential, 4-32-16-4 tanh MLP, N = {res['n']} train / test",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_row(name, rnd, steps_done, train, test, secs, steps):
    return (f"{name:<12} {rnd:>5} {steps_done:>8} {train:>12.6g} {test:>12.6g} "
            f"{secs:>9.2f} {1e3 * secs / steps:>9.3f}")


HEADER = (f"{'library':<12} {'round':>5} {'steps':>8} {'train loss':>12} {'test loss':>12} "
          f"{'time (s)':>9} {'ms/step':>9}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None and "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)

    import numba

    import smallchains as sc

    if args.threads is not None:
        # effective even if numba was imported before us (up to NUMBA_NUM_THREADS)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    n_threads = numba.get_num_threads()

    torch = None
    if args.compare_torch:
        import torch

        torch.set_num_threads(n_threads)

    # ---- data and model --------------------------------------------------------------
    X, Y = sc.datasets.matrix_exponential(args.n, seed=args.seed)
    Xtest, Ytest = sc.datasets.matrix_exponential(args.n, seed=args.seed + 1)

    chain = sc.SimpleChain(4, *[sc.TurboDense(w, a) for w, a in LAYERS])
    p = sc.init_params(chain, seed=args.seed)
    p0 = p.copy()  # the initial parameters, shared with torch
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    G = sc.alloc_threaded_grad(chain)

    print(f"matrix exponential: {chain}, {chain.n_params} parameters")
    print(f"train/test samples: {args.n}/{args.n}; {args.rounds} rounds x {args.steps} "
          f"full-batch Adam(1e-3) steps; float32")
    print(f"threads: numba.get_num_threads() = {n_threads}"
          + (f", torch.get_num_threads() = {torch.get_num_threads()}" if torch else ""))

    # compile the kernels outside the timed rounds (on a copy; p is untouched)
    t0 = time.perf_counter()
    sc.train_unbatched(G, p.copy(), model, X, sc.Adam(1e-3), 2,
                       **({"callback": lambda *a: None, "report_every": 1} if args.plot else {}))
    model(Xtest, p, Ytest)
    print(f"smallchains compile/warm-up: {time.perf_counter() - t0:.2f} s")

    init_train, init_test = model(X, p), model(Xtest, p, Ytest)
    print(f"initial loss: train {init_train:.6g}, test {init_test:.6g}")
    print()
    print(HEADER)

    res = {"threads": n_threads, "steps": args.steps, "rounds": args.rounds, "n": args.n,
           "init_train": init_train, "init_test": init_test,
           "sc_train": [], "sc_test": [], "sc_time": [], "sc_hist": []}

    # ---- smallchains -----------------------------------------------------------------
    opt = sc.Adam(1e-3)
    callback = every = None
    if args.plot:  # the test loss every `every` steps, for the plot
        res["sc_test_curve"] = [(0, init_test)]
        every = max(1, args.steps // 50)

        def callback(step, loss, p):
            res["sc_test_curve"].append(((r - 1) * args.steps + step, model(Xtest, p, Ytest)))

    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        hist = sc.train_unbatched(G, p, model, X, opt, args.steps, progress=not args.quiet,
                                  callback=callback, report_every=every)
        secs = time.perf_counter() - t0
        train, test = model(X, p), model(Xtest, p, Ytest)
        res["sc_train"].append(train)
        res["sc_test"].append(test)
        res["sc_time"].append(secs)
        res["sc_hist"].append(np.asarray(hist))
        print(_fmt_row("smallchains", r, r * args.steps, train, test, secs, args.steps), flush=True)
    res["params"] = p

    # ---- torch -----------------------------------------------------------------------
    if torch is not None:
        net = _torch_model(torch, chain, p0)
        Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
        Xtt, Ytt = torch.from_numpy(Xtest), torch.from_numpy(Ytest)
        topt = torch.optim.Adam(net.parameters(), lr=1e-3)
        res.update(torch_train=[], torch_test=[], torch_time=[])
        bar = None
        for r in range(1, args.rounds + 1):
            if not args.quiet:
                try:
                    from tqdm.auto import tqdm
                    bar = tqdm(total=args.steps, desc="torch")
                except ImportError:
                    bar = None
            every = max(1, args.steps // 100)
            t0 = time.perf_counter()
            for i in range(args.steps):
                topt.zero_grad(set_to_none=True)
                loss = _torch_loss(torch, net, Xt, Yt)
                loss.backward()
                topt.step()
                if bar is not None and (i + 1) % every == 0:
                    bar.update(every)
                    bar.set_postfix(loss=f"{loss.item():.6g}")
            secs = time.perf_counter() - t0
            if bar is not None:
                bar.close()
            with torch.no_grad():
                train = float(_torch_loss(torch, net, Xt, Yt))
                test = float(_torch_loss(torch, net, Xtt, Ytt))
            res["torch_train"].append(train)
            res["torch_test"].append(test)
            res["torch_time"].append(secs)
            print(_fmt_row("torch", r, r * args.steps, train, test, secs, args.steps), flush=True)

        print()
        print(f"{'round':>5} {'test loss ratio sc/torch':>25} {'speedup torch/sc':>17}")
        res["test_ratio"], res["speedup"] = [], []
        for r in range(args.rounds):
            ratio = res["sc_test"][r] / res["torch_test"][r]
            speed = res["torch_time"][r] / res["sc_time"][r]
            res["test_ratio"].append(ratio)
            res["speedup"].append(speed)
            print(f"{r + 1:>5} {ratio:>25.4f} {speed:>16.1f}x")

    if args.plot:
        plot(args.plot, res)
        print(f"plot written to {args.plot}")
    return res


if __name__ == "__main__":
    main()
