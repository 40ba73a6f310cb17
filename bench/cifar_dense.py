"""Training benchmark of the Nx CIFAR-10 dense network (issue 14's network 1).

    python bench/cifar_dense.py --impl {smallchains,torch} --threads N [pyperf options]

Model: grayscale 1024 -> Dense 64 sigmoid -> Dense 32 sigmoid -> Dense 10, logit
cross-entropy (mean over the minibatch), Adam(1e-3), batch 300. Data: the 50,000 real
CIFAR-10 training images, grayscale ((R+G+B)/765, ``sc.datasets.cifar10("train",
grayscale=True)``, from ``$SMALLCHAINS_DATA/cifar10``). Metric: seconds per epoch (one
pyperf value = one shuffled epoch, the last smaller minibatch included). About 20.4 GFLOP
per epoch (forward, input gradient of the hidden layers and weight gradients).

pyperf defaults: ``--processes 2 --values 3 --warmups 1 --loops 1``. Threads are set and
the process pinned to the first N cores before numba or torch is imported (as
bench/lenet5.py). torch: eager nn.Sequential, fused Adam, minibatches gathered by index
(``x[perm[i:i+bs]]``), inside the timing like smallchains' gather.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

IMPL = C.peek_arg("--impl", "torch")
THREADS = int(C.peek_arg("--threads", "1"))
C.setup_threads(THREADS, IMPL, pin="--no-pin" not in sys.argv)
C.ensure_data_env()

BATCH, LR = 300, 1e-3
FLOPS_PER_EPOCH = 50_000 * 6 * (1024 * 64 + 64 * 32 + 32 * 10)


def load():
    import numpy as np

    import smallchains as sc
    X, y = sc.datasets.cifar10("train", grayscale=True)
    return np.array(X.reshape(len(X), 1024)), np.array(y)


def build_smallchains(X, y):
    import smallchains as sc
    chain = sc.SimpleChain(1024, sc.TurboDense(64, "sigmoid"), sc.TurboDense(32, "sigmoid"),
                           sc.TurboDense(10))
    return C.smallchains_trainer(chain, X, y, lambda: sc.Adam(LR), BATCH, 3)


def build_torch(X, y):
    import torch
    C.torch_threads(THREADS)
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(1024, 64), nn.Sigmoid(), nn.Linear(64, 32), nn.Sigmoid(),
                        nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=LR, fused=True)
    return C.torch_trainer(net, opt, X, y, BATCH, 3)


BUILDERS = {"smallchains": build_smallchains, "torch": build_torch}


def main():
    C.run_training_bench(lambda args: f"cifar_dense-{args.impl}-t{args.threads}", BUILDERS, load, forwarded=(),
                         extra_args=(), metadata=dict(batch_size=str(BATCH), flops_per_epoch=str(FLOPS_PER_EPOCH)))


if __name__ == "__main__":
    main()
