"""LeNet5 on MNIST, as in the SimpleChains.jl blog post ("SimpleChains.jl: 10 epochs ...").

    Conv 5x5x6 relu -> MaxPool 2 -> Conv 5x5x16 relu -> MaxPool 2 -> Flatten
    -> Dense 120 relu -> Dense 84 relu -> Dense 10, logit cross-entropy, Adam(3e-4)

Reads the real MNIST IDX files from ``--data-dir``, else ``$SMALLCHAINS_DATA/mnist``
(see ``smallchains.datasets.mnist``). Prints per-epoch time, train/test accuracy and loss.

    python examples/lenet5_mnist.py                 # 10 epochs on all 60,000 images
    python examples/lenet5_mnist.py --epochs 2 --limit 10000
    python examples/lenet5_mnist.py --plot docs/img/lenet5_curves.png

``--plot PATH`` (needs matplotlib) draws the loss and accuracy per epoch to PATH.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None, help="default: sc.default_batch_size")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--limit", type=int, default=None, help="use only the first LIMIT training images")
    ap.add_argument("--threads", type=int, default=None, help="NUMBA_NUM_THREADS (set before import)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=1, help="evaluate accuracy every N epochs")
    ap.add_argument("--progress", action="store_true", help="tqdm bar over epochs")
    ap.add_argument("--compare-torch", action="store_true",
                    help="also train torch's LeNet5 from the same initial parameters (same batch "
                         "size, Adam, epochs, thread count) and print its accuracy and time")
    ap.add_argument("--plot", default=None, metavar="PATH",
                    help="write the learning curves (PNG) here; needs matplotlib")
    return ap.parse_args(argv)


def lenet5():
    import smallchains as sc

    return sc.SimpleChain(
        (1, 28, 28),
        sc.Conv(6, 5, "relu"), sc.MaxPool(2),
        sc.Conv(16, 5, "relu"), sc.MaxPool(2),
        sc.Flatten(),
        sc.TurboDense(120, "relu"), sc.TurboDense(84, "relu"), sc.TurboDense(10),
    )


def plot(path, rows, n_train):
    """Train loss and test accuracy per epoch (two panels) to PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    ev = [r for r in rows if "test_acc" in r]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax0.plot(ep, [r["running_loss"] for r in rows], "C0o-", ms=3, label="mean minibatch loss")
    ax0.plot([r["epoch"] for r in ev], [r["train_loss"] for r in ev], "C0s--", ms=3,
             label="train loss (end of epoch)")
    ax0.plot([r["epoch"] for r in ev], [r["test_loss"] for r in ev], "C1s--", ms=3, label="test loss")
    ax0.set_ylabel("logit cross-entropy")
    ax0.set_yscale("log")
    ax0.legend(fontsize=8)
    ax1.plot([r["epoch"] for r in ev], [100 * r["train_acc"] for r in ev], "C0s--", ms=3, label="train")
    ax1.plot([r["epoch"] for r in ev], [100 * r["test_acc"] for r in ev], "C1o-", ms=3, label="test")
    ax1.set_ylabel("accuracy (%)")
    ax1.legend(fontsize=8)
    for ax in (ax0, ax1):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"LeNet5 on MNIST ({n_train} training images), Adam", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse(argv)
    if args.threads is not None and "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    import numba
    import numpy as np

    import smallchains as sc

    t_start = time.perf_counter()
    Xtr, ytr = sc.datasets.mnist("train", data_dir=args.data_dir)
    Xte, yte = sc.datasets.mnist("test", data_dir=args.data_dir)
    if args.limit:
        Xtr, ytr = Xtr[: args.limit], ytr[: args.limit]
    # the loader returns read-only cached arrays; the library would copy them on every
    # call, so take one writeable copy here
    Xtr, ytr, Xte, yte = (np.array(a) for a in (Xtr, ytr, Xte, yte))
    chain = lenet5()
    print(chain.summary())
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(ytr))
    p = sc.init_params(chain, seed=args.seed)
    p0 = p.copy()
    G = sc.alloc_threaded_grad(chain)
    opt = sc.Adam(args.lr)
    print(f"threads: {numba.get_num_threads()}, training images: {len(Xtr)}, "
          f"batch size: {args.batch_size or 'default'}")

    t = time.perf_counter()  # compile (or load from the kernel cache) on a tiny copy
    warm = sc.add_loss(chain, sc.LogitCrossEntropyLoss(ytr[:64]))
    sc.train_batched(G, p.copy(), warm, Xtr[:64], sc.Adam(args.lr), 1)
    sc.accuracy_and_loss(model, Xte[:64], yte[:64], p)
    print(f"compile / cache load: {time.perf_counter() - t:.2f} s")

    rows = []
    print(f"{'epoch':>5} {'time (s)':>9} {'train loss*':>11} {'train acc':>9} {'train loss':>10} "
          f"{'test acc':>8} {'test loss':>9}")
    for epoch in range(1, args.epochs + 1):
        t = time.perf_counter()
        (mean_loss,) = sc.train_batched(G, p, model, Xtr, opt, 1, batch_size=args.batch_size,
                                        seed=args.seed + epoch, progress=args.progress)
        dt = time.perf_counter() - t
        row = dict(epoch=epoch, time=dt, running_loss=float(mean_loss))
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            row["train_acc"], row["train_loss"] = sc.accuracy_and_loss(model, Xtr, p)
            row["test_acc"], row["test_loss"] = sc.accuracy_and_loss(model, Xte, yte, p)
            print(f"{epoch:>5} {dt:>9.2f} {mean_loss:>11.4f} {row['train_acc']:>9.4f} "
                  f"{row['train_loss']:>10.4f} {row['test_acc']:>8.4f} {row['test_loss']:>9.4f}")
        else:
            print(f"{epoch:>5} {dt:>9.2f} {mean_loss:>11.4f}")
        rows.append(row)
    train_time = sum(r["time"] for r in rows)
    print(f"training time {train_time:.2f} s for {args.epochs} epochs "
          f"({train_time / max(1, args.epochs):.2f} s/epoch); total {time.perf_counter() - t_start:.1f} s")
    print("* mean minibatch loss during the epoch")
    out = dict(rows=rows, train_time=train_time, p=p)
    if args.plot:
        plot(args.plot, rows, len(Xtr))
        print(f"plot written to {args.plot}")
    if args.compare_torch:
        bs = args.batch_size or sc.default_batch_size(chain._kernels(np.float32)[1].B, G.shape[0], len(Xtr))
        out["torch"] = train_torch(chain, p0, Xtr, ytr, Xte, yte, args, bs, numba.get_num_threads())
    return out


def train_torch(chain, p0, Xtr, ytr, Xte, yte, args, batch_size, threads):
    """The same LeNet5 in torch eager, from the same initial parameters."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(256, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(),
        torch.nn.Linear(84, 10))
    layers = [m for m in net if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    views = [v for v in chain.param_views(p0) if v]
    with torch.no_grad():
        for m, v in zip(layers, views):
            m.weight.copy_(torch.from_numpy(v["W"]))
            m.bias.copy_(torch.from_numpy(v["b"]))
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    Xt, yt = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    Xv, yv = torch.from_numpy(Xte), torch.from_numpy(yte)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch size {batch_size}")
    rows = []
    for epoch in range(1, args.epochs + 1):
        t = time.perf_counter()
        perm = torch.randperm(len(Xt), generator=gen)
        for lo in range(0, len(Xt), batch_size):
            idx = perm[lo:lo + batch_size]
            opt.zero_grad()
            F.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()
        dt = time.perf_counter() - t
        with torch.no_grad():
            logits = net(Xv)
            acc = float((logits.argmax(1) == yv).float().mean())
            loss = float(F.cross_entropy(logits, yv))
        print(f"torch {epoch:>5} {dt:>9.2f}   test acc {acc:.4f}  test loss {loss:.4f}")
        rows.append(dict(epoch=epoch, time=dt, test_acc=acc, test_loss=loss))
    total = sum(r["time"] for r in rows)
    print(f"torch training time {total:.2f} s ({total / max(1, args.epochs):.2f} s/epoch)")
    return dict(rows=rows, train_time=total)


if __name__ == "__main__":
    main()
