"""Training benchmark of the Axon / Keras MNIST MLP with Dropout (issue 14's network 2).

    python bench/mnist_mlp.py --impl {smallchains,torch} --threads N [pyperf options]

Model: 784 -> Dense 128 relu -> Dropout 0.5 -> Dense 10, logit cross-entropy (mean over
the minibatch), SGD(0.01) without momentum, batch 32. Data: the 60,000 real MNIST
training images (``sc.datasets.mnist("train")``, pixels in [0, 1], from
``$SMALLCHAINS_DATA/mnist``). Metric: seconds per epoch (one pyperf value = one shuffled
epoch of 1,875 minibatches); the issue's figure, total time of 3 epochs, is 3x that.
About 24.5 GFLOP per epoch (forward, weight gradients, input gradient of the last layer).

pyperf defaults: ``--processes 2 --values 3 --warmups 1 --loops 1``. Threads are set and
the process pinned to the first N cores before numba or torch is imported (as
bench/lenet5.py). torch: eager nn.Sequential in train mode (its own Dropout masks),
foreach SGD, minibatches gathered by index (``x[perm[i:i+bs]]``), inside the timing like
smallchains' gather.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

IMPL = C.peek_arg("--impl", "torch")
THREADS = int(C.peek_arg("--threads", "1"))
C.setup_threads(THREADS, IMPL, pin="--no-pin" not in sys.argv)
C.ensure_data_env()

BATCH, LR = 32, 0.01
FLOPS_PER_EPOCH = 60_000 * 2 * (2 * 784 * 128 + 3 * 128 * 10)


def load():
    import numpy as np

    import smallchains as sc
    X, y = sc.datasets.mnist("train")
    return np.array(X.reshape(len(X), 784)), np.array(y)


def build_smallchains(X, y):
    import smallchains as sc
    chain = sc.SimpleChain(784, sc.TurboDense(128, "relu"), sc.Dropout(0.5), sc.TurboDense(10))
    return C.smallchains_trainer(chain, X, y, lambda: sc.SGD(LR), BATCH, 30)


def build_torch(X, y):
    import torch
    C.torch_threads(THREADS)
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    opt = torch.optim.SGD(net.parameters(), lr=LR, foreach=True)
    return C.torch_trainer(net, opt, X, y, BATCH, 30)


BUILDERS = {"smallchains": build_smallchains, "torch": build_torch}


def main():
    C.run_training_bench(lambda args: f"mnist_mlp-{args.impl}-t{args.threads}", BUILDERS, load, forwarded=(),
                         extra_args=(), metadata=dict(batch_size=str(BATCH), flops_per_epoch=str(FLOPS_PER_EPOCH)))


if __name__ == "__main__":
    main()
