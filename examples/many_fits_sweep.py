"""A learning-rate sweep and deep ensemble on real MNIST with ``sc.fit_many``.

    python examples/many_fits_sweep.py [--lrs 3e-4 1e-3 3e-3 1e-2 3e-2] [--seeds 4]
        [--epochs 5] [--train 10000] [--backend threads|dask] [--plot docs/img/many_fits_sweep.png]

Every (learning rate, seed) pair is one fit of a 784 -> 32 relu -> 10 network (logit
cross-entropy, Adam, minibatches of 128) on the first ``--train`` training images; the
seed sets the initial parameters and the shuffling. All fits run at once, each on one
thread from start to end (``--backend dask``: on a local Dask cluster of one worker
process per core). The script prints, per learning rate, the final training loss and
the test accuracy (10,000 test images) of every seed, and the accuracy of the ensemble
of the best learning rate's fits (mean of their softmax probabilities); ``--plot`` draws
final loss and test accuracy against the learning rate, one point per seed.

Data: ``sc.datasets.mnist`` from ``$SMALLCHAINS_DATA`` (see README).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import smallchains as sc


def network():
    return sc.SimpleChain((1, 28, 28), sc.Flatten(), sc.TurboDense(32, "relu"), sc.TurboDense(10))


def sweep(lrs, seeds, epochs, n_train, backend="threads", data_dir=None):
    """``(configs, results, test accuracies, ensemble accuracy of the best lr)``."""
    X, y = sc.datasets.mnist("train", data_dir=data_dir)
    Xte, yte = sc.datasets.mnist("test", data_dir=data_dir)
    X, y = X[:n_train], y[:n_train]
    chain = network()
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    configs = [{"lr": lr, "seed": s} for lr in lrs for s in range(seeds)]
    t0 = time.perf_counter()
    results = sc.fit_many(model, X, configs, optimizer=sc.Adam(), epochs=epochs, batch_size=128,
                          backend=backend)
    seconds = time.perf_counter() - t0
    test = sc.add_loss(chain, sc.LogitCrossEntropyLoss(yte))
    acc = np.array([sc.accuracy_and_loss(test, Xte, r.p)[0] if r.ok else np.nan for r in results])
    # the ensemble of the learning rate with the best mean test accuracy
    best = lrs[int(np.nanargmax(acc.reshape(len(lrs), seeds).mean(1)))]
    probs = [sc.predict_proba(chain, Xte, r.p) for c, r in zip(configs, results)
             if c["lr"] == best and r.ok]
    ensemble = float(np.mean(np.argmax(np.mean(probs, axis=0), axis=1) == yte))
    return configs, results, acc, best, ensemble, seconds


def plot(path, lrs, seeds, results, acc):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.array([r.final_loss for r in results]).reshape(len(lrs), seeds)
    acc = acc.reshape(len(lrs), seeds)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for s in range(seeds):
        axes[0].plot(lrs, loss[:, s], "o", color=f"C{s}", alpha=0.8, label=f"seed {s}")
        axes[1].plot(lrs, 100 * acc[:, s], "o", color=f"C{s}", alpha=0.8)
    axes[0].plot(lrs, np.median(loss, 1), "k-", lw=1, label="median")
    axes[1].plot(lrs, 100 * np.median(acc, 1), "k-", lw=1)
    for ax, label in zip(axes, ("final training loss (last epoch)", "test accuracy (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("Adam learning rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"MNIST, 784-32-10 relu: {len(results)} fits with sc.fit_many", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--train", type=int, default=10_000)
    ap.add_argument("--backend", choices=("threads", "dask"), default="threads")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    configs, results, acc, best, ensemble, seconds = sweep(
        args.lrs, args.seeds, args.epochs, args.train, args.backend, args.data_dir)
    print(f"{len(results)} fits x {args.epochs} epochs on {args.train} images: {seconds:.2f} s "
          f"(backend {args.backend}, compile included)")
    print(f"{'lr':>8}  final loss per seed{'':<{9 * args.seeds - 19}}  test accuracy per seed")
    for i, lr in enumerate(args.lrs):
        rs = results[i * args.seeds:(i + 1) * args.seeds]
        losses = "".join(f"{r.final_loss:9.4f}" if r.ok else f"{r.status:>9}" for r in rs)
        accs = "".join(f"{100 * a:8.2f}" for a in acc[i * args.seeds:(i + 1) * args.seeds])
        print(f"{lr:8.0e}  {losses}  {accs}")
    print(f"ensemble of the {args.seeds} fits at lr {best:g}: test accuracy {100 * ensemble:.2f}% "
          f"(best single fit {100 * np.nanmax(acc[[c['lr'] == best for c in configs]]):.2f}%)")
    if args.plot:
        plot(args.plot, args.lrs, args.seeds, results, acc)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
