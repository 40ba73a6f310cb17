"""Shared by the benchmark-network examples: their common command line, and the torch
eager peer (``--compare-torch``): the same network from the same initial parameters,
trained on the same minibatch order."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def parser(doc, epochs, batch_size, lr=None, optimizers=False):
    """The examples' command line: ``--epochs``, ``--batch-size``, ``--lr``, ``--limit``,
    ``--threads``, ``--data-dir``, ``--seed``, ``--compare-torch`` and, with
    ``optimizers``, ``--optimizer {sgd,adam}`` (``--lr`` then defaults per optimizer)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    if optimizers:
        ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
        ap.add_argument("--lr", type=float, default=None, help="default 0.01 (sgd), 1e-3 (adam)")
    else:
        ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--limit", type=int, default=None, help="use only the first LIMIT training images")
    ap.add_argument("--threads", type=int, default=None, help="NUMBA_NUM_THREADS (set before import)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-torch", action="store_true")
    return ap


def set_threads(args):
    """``--threads``: numba's thread count, which only takes effect before numba is imported."""
    if args.threads is not None and "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)


def optimizer(args):
    """``--optimizer sgd`` (default lr 0.01) or ``adam`` (1e-3) as a smallchains optimizer."""
    import smallchains as sc

    return sc.Adam(args.lr or 1e-3) if args.optimizer == "adam" else sc.SGD(args.lr or 0.01)


def torch_optimizer(args, params):
    """The same optimizer in torch."""
    import torch

    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr or 1e-3)
    return torch.optim.SGD(params, lr=args.lr or 0.01)


def shuffled_orders(n, seeds):
    """The row orders ``train_batched(..., seed=s)`` visits, one per epoch seed."""
    orders = []
    for s in seeds:
        order = np.arange(n)
        np.random.default_rng(s).shuffle(order)
        orders.append(order)
    return orders


def load_params(net, chain, p):
    """Copy smallchains parameters ``p`` into the torch modules of ``net`` that have a
    weight, in chain order (Linear / Conv2d ``W``, ``b``; BatchNorm ``weight``, ``bias``)."""
    import torch

    mods = [m for m in net.modules() if getattr(m, "weight", None) is not None]
    views = [v for v in chain.param_views(p) if v]
    if len(mods) != len(views):
        raise ValueError(f"torch net has {len(mods)} parametrized modules, the chain {len(views)}")
    with torch.no_grad():
        for m, v in zip(mods, views):
            m.weight.copy_(torch.from_numpy(np.array(v["W"] if "W" in v else v["weight"])))
            m.bias.copy_(torch.from_numpy(np.array(v["b"] if "b" in v else v["bias"])))


def train_and_evaluate(net, opt, Xtr, ytr, Xte, yte, orders, batch_size, threads, label="test"):
    """Train ``net`` in train mode over ``orders`` (one epoch each) in minibatches of
    ``batch_size``, then its eval-mode accuracy on ``(Xte, yte)``. Prints and returns
    ``dict(train_time, epoch_times, test_acc)``."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    X, y = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    net.train()
    times = []
    for order in orders:
        t = time.perf_counter()
        for lo in range(0, len(order), batch_size):
            rows = torch.from_numpy(order[lo:lo + batch_size])
            opt.zero_grad()
            F.cross_entropy(net(X[rows]), y[rows]).backward()
            opt.step()
        times.append(time.perf_counter() - t)
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(Xte)).argmax(1).numpy() == yte).mean())
    print(f"torch eager: training {sum(times):.2f} s (epochs: {', '.join(f'{x:.3f}' for x in times)}); "
          f"{label} accuracy {acc:.4f}")
    return dict(train_time=sum(times), epoch_times=times, test_acc=acc)
