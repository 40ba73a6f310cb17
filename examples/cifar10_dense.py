"""The Numerical Elixir (Nx) CIFAR-10 benchmark network, a dense net on grayscale images.

    input 1024 (grayscale: mean of R, G, B scaled to [0, 1]) -> Dense 64 sigmoid
    -> Dense 32 sigmoid -> Dense 10, softmax (logit) cross-entropy, Adam 1e-3,
    batch 300, 5 epochs over the 50,000 training images

Prints the benchmark's three figures: dataset load time, time to build the batched input
(here: one contiguous (N, 1024) float32 array), mean epoch time; then the accuracy on the
test images available (the shared data holds only the first 1,000 of CIFAR-10's 10,000
test images, and says so). ``--compare-torch`` trains the same network in torch eager from
the same initial parameters, same minibatch order, same thread count, to compare accuracy
(its times share the process with numba's thread pool: use bench/cifar_dense.py for speed).

    python examples/cifar10_dense.py
    python examples/cifar10_dense.py --epochs 1 --limit 6000 --compare-torch
"""

from __future__ import annotations

import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import load_params, parser, set_threads, shuffled_orders, train_and_evaluate  # noqa: E402


def parse(argv=None):
    return parser(__doc__, epochs=5, batch_size=300, lr=1e-3).parse_args(argv)


def network():
    import smallchains as sc

    return sc.SimpleChain(1024, sc.TurboDense(64, "sigmoid"), sc.TurboDense(32, "sigmoid"),
                          sc.TurboDense(10))


def main(argv=None):
    args = parse(argv)
    set_threads(args)
    import numba
    import numpy as np

    import smallchains as sc

    t = time.perf_counter()
    Xtr, ytr = sc.datasets.cifar10("train", grayscale=True, data_dir=args.data_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", sc.datasets.PartialDatasetWarning)
        Xte, yte = sc.datasets.cifar10("test", grayscale=True, data_dir=args.data_dir)
    t_load = time.perf_counter() - t
    if args.limit:
        Xtr, ytr = Xtr[: args.limit], ytr[: args.limit]
    t = time.perf_counter()
    # one writeable contiguous copy (the loader's arrays are read-only and cached)
    Xtr = np.array(Xtr.reshape(len(Xtr), 1024))
    Xte = np.array(Xte.reshape(len(Xte), 1024))
    ytr, yte = np.array(ytr), np.array(yte)
    t_build = time.perf_counter() - t

    chain = network()
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(ytr))
    p = sc.init_params(chain, seed=args.seed)
    p0 = p.copy()
    G = sc.alloc_threaded_grad(chain)
    opt = sc.Adam(args.lr)
    threads = numba.get_num_threads()
    t = time.perf_counter()  # compile (or load from the kernel cache) on a tiny copy
    sc.train_batched(G, p.copy(), sc.add_loss(chain, sc.LogitCrossEntropyLoss(ytr[:64])), Xtr[:64],
                     sc.Adam(args.lr), 1)
    sc.accuracy_and_loss(model, Xte[:64], yte[:64], p)
    t_compile = time.perf_counter() - t

    times, seeds = [], [args.seed + e for e in range(args.epochs)]
    for s in seeds:
        t = time.perf_counter()
        sc.train_batched(G, p, model, Xtr, opt, 1, batch_size=args.batch_size, seed=s)
        times.append(time.perf_counter() - t)
    orders = shuffled_orders(len(Xtr), seeds)  # the orders train_batched visited
    acc, loss = sc.accuracy_and_loss(model, Xte, yte, p)
    partial = " (the first 1,000 test images only: the full test batch is absent)" if caught else ""
    print(f"threads {threads}, {len(Xtr)} training images, batch {args.batch_size}, {args.epochs} epochs")
    print(f"dataset load {t_load:.2f} s; batched input {t_build:.3f} s; compile / cache load {t_compile:.2f} s")
    print(f"smallchains: mean epoch {np.mean(times):.3f} s (epochs: {', '.join(f'{x:.3f}' for x in times)}); "
          f"test accuracy {acc:.4f}, loss {loss:.4f} on {len(Xte)} images{partial}")
    out = dict(load=t_load, build=t_build, epoch_times=times, test_acc=acc, p=p)
    if args.compare_torch:
        out["torch"] = tt = train_torch(p0, chain, Xtr, ytr, Xte, yte, orders, args, threads)
        print(f"torch eager / smallchains mean epoch time: {np.mean(tt['epoch_times']) / np.mean(times):.2f}x "
              "(same process, after smallchains' threads ran: a correctness check, not a speed "
              "measurement; measure speed with bench/cifar_dense.py)")
    return out


def train_torch(p0, chain, Xtr, ytr, Xte, yte, orders, args, threads):
    """The same network in torch eager from the same parameters and minibatch order."""
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(1024, 64), torch.nn.Sigmoid(), torch.nn.Linear(64, 32),
                              torch.nn.Sigmoid(), torch.nn.Linear(32, 10))
    load_params(net, chain, p0)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    return train_and_evaluate(net, opt, Xtr, ytr, Xte, yte, orders, args.batch_size, threads)


if __name__ == "__main__":
    main()
