"""The Axon / Keras MNIST MLP: a dense net with Dropout, trained with plain SGD.

    input 784 (pixels scaled to [0, 1]) -> Dense 128 relu -> Dropout 0.5 -> Dense 10,
    softmax (logit) cross-entropy, SGD lr 0.01, batch 32, 3 epochs over the 60,000
    training images; accuracy on the 10,000 test images

Prints the total training time (compilation excluded, measured separately) and the test
accuracy. ``--optimizer adam`` trains with Adam(1e-3) instead, to show what the same
layers reach with a better optimizer. ``--compare-torch`` trains the same network in torch
eager from the same initial parameters, same minibatch order and thread count (torch
draws its own Dropout masks), to compare accuracy; its time shares the process with
numba's thread pool, so it is a check, not a speed measurement: use bench/mnist_mlp.py.

    python examples/mnist_mlp_dropout.py
    python examples/mnist_mlp_dropout.py --epochs 1 --limit 6000 --compare-torch
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import (load_params, optimizer, parser, set_threads, shuffled_orders,  # noqa: E402
                     torch_optimizer, train_and_evaluate)


def parse(argv=None):
    return parser(__doc__, epochs=3, batch_size=32, optimizers=True).parse_args(argv)


def network():
    import smallchains as sc

    return sc.SimpleChain(784, sc.TurboDense(128, "relu"), sc.Dropout(0.5), sc.TurboDense(10))


def main(argv=None):
    args = parse(argv)
    set_threads(args)
    import numba
    import numpy as np

    import smallchains as sc

    Xtr, ytr = sc.datasets.mnist("train", data_dir=args.data_dir)
    Xte, yte = sc.datasets.mnist("test", data_dir=args.data_dir)
    if args.limit:
        Xtr, ytr = Xtr[: args.limit], ytr[: args.limit]
    Xtr, Xte = np.array(Xtr.reshape(len(Xtr), 784)), np.array(Xte.reshape(len(Xte), 784))
    ytr, yte = np.array(ytr), np.array(yte)

    chain = network()
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(ytr))
    p = sc.init_params(chain, seed=args.seed)
    p0 = p.copy()
    G = sc.alloc_threaded_grad(chain)
    threads = numba.get_num_threads()
    t = time.perf_counter()  # compile (or load from the kernel cache) on a tiny copy
    sc.train_batched(G, p.copy(), sc.add_loss(chain, sc.LogitCrossEntropyLoss(ytr[:64])), Xtr[:64],
                     optimizer(args), 1, batch_size=args.batch_size)
    sc.accuracy_and_loss(model, Xte[:64], yte[:64], p)
    t_compile = time.perf_counter() - t

    opt = optimizer(args)
    seeds = [args.seed + e for e in range(args.epochs)]
    t = time.perf_counter()
    for s in seeds:
        sc.train_batched(G, p, model, Xtr, opt, 1, batch_size=args.batch_size, seed=s)
    t_train = time.perf_counter() - t
    orders = shuffled_orders(len(Xtr), seeds)  # the orders train_batched visited
    acc, loss = sc.accuracy_and_loss(model, Xte, yte, p)
    print(f"threads {threads}, {len(Xtr)} training images, batch {args.batch_size}, "
          f"{args.epochs} epochs, {type(opt).__name__}(lr={opt.lr:g})")
    print(f"smallchains: training {t_train:.2f} s (compile / cache load {t_compile:.2f} s, "
          f"not included); test accuracy {acc:.4f}, loss {loss:.4f} on {len(Xte)} images")
    out = dict(train_time=t_train, test_acc=acc, p=p)
    if args.compare_torch:
        out["torch"] = tt = train_torch(p0, chain, Xtr, ytr, Xte, yte, orders, args, threads)
        print(f"torch eager / smallchains training time: {tt['train_time'] / t_train:.2f}x "
              "(same process, after smallchains' threads ran: a correctness check, not a speed "
              "measurement; measure speed with bench/mnist_mlp.py)")
    return out


def train_torch(p0, chain, Xtr, ytr, Xte, yte, orders, args, threads):
    """The same network in torch eager from the same parameters and minibatch order."""
    import torch

    torch.manual_seed(args.seed)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    load_params(net, chain, p0)
    opt = torch_optimizer(args, net.parameters())
    return train_and_evaluate(net, opt, Xtr, ytr, Xte, yte, orders, args.batch_size, threads)


if __name__ == "__main__":
    main()
