"""The Axon CIFAR-10 CNN: convolutions with BatchNorm, Dropout, plain SGD.

    3x32x32 -> Conv 32 3x3 relu -> BatchNorm -> MaxPool 2 -> Conv 64 3x3 relu -> BatchNorm
    -> MaxPool 2 -> Flatten -> Dense 64 relu -> Dropout 0.5 -> Dense 10, softmax (logit)
    cross-entropy, SGD lr 0.01, batch 32, 3 epochs over the 50,000 training images

Prints the total training time (compilation excluded) and the accuracy on the held-out
images available: the shared data holds only the first 1,000 of CIFAR-10's 10,000 test
images, and the output says so. BatchNorm normalizes with the statistics of each whole
minibatch (torch semantics) and keeps its running statistics in the layer state
``sc.init_state(chain)``, which evaluation reads. ``--optimizer adam`` trains with
Adam(1e-3). ``--compare-torch`` trains the same network in torch eager from the same
initial parameters, minibatch order and thread count (torch draws its own Dropout masks);
its time is a check, not a speed measurement.

    python examples/cifar10_cnn_batchnorm.py
    python examples/cifar10_cnn_batchnorm.py --epochs 1 --limit 5000 --compare-torch
"""

from __future__ import annotations

import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import (load_params, optimizer, parser, set_threads, shuffled_orders,  # noqa: E402
                     torch_optimizer, train_and_evaluate)


def parse(argv=None):
    ap = parser(__doc__, epochs=3, batch_size=32, optimizers=True)
    ap.add_argument("--channels", type=int, nargs=2, default=(32, 64), metavar=("C1", "C2"))
    return ap.parse_args(argv)


def network(c1=32, c2=64):
    import smallchains as sc

    return sc.SimpleChain(
        (3, 32, 32), sc.Conv(c1, 3, "relu"), sc.BatchNorm(), sc.MaxPool(2), sc.Conv(c2, 3, "relu"),
        sc.BatchNorm(), sc.MaxPool(2), sc.Flatten(), sc.TurboDense(64, "relu"), sc.Dropout(0.5),
        sc.TurboDense(10))



def main(argv=None):
    args = parse(argv)
    set_threads(args)
    import numba
    import numpy as np

    import smallchains as sc

    Xtr, ytr = sc.datasets.cifar10("train", data_dir=args.data_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", sc.datasets.PartialDatasetWarning)
        Xte, yte = sc.datasets.cifar10("test", data_dir=args.data_dir)
    if args.limit:
        Xtr, ytr = Xtr[: args.limit], ytr[: args.limit]
    Xtr, Xte, ytr, yte = np.array(Xtr), np.array(Xte), np.array(ytr), np.array(yte)

    chain = network(*args.channels)
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(ytr))
    p = sc.init_params(chain, seed=args.seed)
    state = sc.init_state(chain)
    p0 = p.copy()
    G = sc.alloc_threaded_grad(chain)
    threads = numba.get_num_threads()
    t = time.perf_counter()  # compile (or load from the kernel cache) on a tiny copy
    sc.train_batched(G, p.copy(), sc.add_loss(chain, sc.LogitCrossEntropyLoss(ytr[:64])), Xtr[:64],
                     optimizer(args), 1, batch_size=args.batch_size, state=state.copy())
    sc.accuracy_and_loss(model, Xte[:64], yte[:64], p, state=state)
    t_compile = time.perf_counter() - t

    opt = optimizer(args)
    seeds = [args.seed + e for e in range(args.epochs)]
    t = time.perf_counter()
    for s in seeds:
        sc.train_batched(G, p, model, Xtr, opt, 1, batch_size=args.batch_size, seed=s, state=state)
    t_train = time.perf_counter() - t
    orders = shuffled_orders(len(Xtr), seeds)  # the orders train_batched visited
    acc, loss = sc.accuracy_and_loss(model, Xte, yte, p, state=state)
    partial = " (the first 1,000 test images only: the full test batch is absent)" if caught else ""
    print(f"threads {threads}, {len(Xtr)} training images, batch {args.batch_size}, {args.epochs} "
          f"epochs, channels {args.channels[0]}/{args.channels[1]}, {type(opt).__name__}(lr={opt.lr:g})")
    print(f"smallchains: training {t_train:.2f} s (compile / cache load {t_compile:.2f} s, not "
          f"included); held-out accuracy {acc:.4f}, loss {loss:.4f} on {len(Xte)} images{partial}")
    out = dict(train_time=t_train, test_acc=acc, p=p, state=state)
    if args.compare_torch:
        out["torch"] = tt = train_torch(p0, chain, Xtr, ytr, Xte, yte, orders, args, threads)
        print(f"torch eager / smallchains training time: {tt['train_time'] / t_train:.2f}x "
              "(same process, after smallchains' threads ran: a correctness check, not a speed "
              "measurement)")
    return out


def train_torch(p0, chain, Xtr, ytr, Xte, yte, orders, args, threads):
    """The same network in torch eager from the same parameters and minibatch order."""
    import torch

    torch.manual_seed(args.seed)
    nn = torch.nn
    c1, c2 = args.channels
    net = nn.Sequential(
        nn.Conv2d(3, c1, 3), nn.ReLU(), nn.BatchNorm2d(c1), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 3),
        nn.ReLU(), nn.BatchNorm2d(c2), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 36, 64),
        nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))
    load_params(net, chain, p0)
    opt = torch_optimizer(args, net.parameters())
    return train_and_evaluate(net, opt, Xtr, ytr, Xte, yte, orders, args.batch_size, threads,
                              label="held-out")


if __name__ == "__main__":
    main()
