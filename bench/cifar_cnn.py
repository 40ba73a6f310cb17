"""Training benchmark of the Axon CIFAR-10 CNN with BatchNorm (issue 14's network 3).

    python bench/cifar_cnn.py --impl {smallchains,torch} --threads N [--images 5000]
                              [--channels 32 64] [pyperf options]

Model: 3x32x32 -> Conv C1 3x3 relu -> BatchNorm -> MaxPool 2 -> Conv C2 3x3 relu ->
BatchNorm -> MaxPool 2 -> Flatten -> Dense 64 relu -> Dropout 0.5 -> Dense 10, logit
cross-entropy, SGD(0.01), batch 32 (C1/C2 = 32/64 is the published network; other
channel counts give the crossover table). Data: the first ``--images`` real CIFAR-10
training images (``$SMALLCHAINS_DATA/cifar10``). Metric: seconds per shuffled pass over
those images (one pyperf value = one pass; a full epoch of 50,000 is 50,000 / images
times longer). BatchNorm in training mode normalizes with the batch statistics on both
sides (smallchains: 4 reduction stages per step, see docs/api.md).

pyperf defaults: ``--processes 2 --values 3 --warmups 1 --loops 1``. Threads are set and
the process pinned to the first N cores before numba or torch is imported. torch: eager
nn.Sequential in train mode, foreach SGD, minibatches gathered by index.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

IMPL = C.peek_arg("--impl", "torch")
THREADS = int(C.peek_arg("--threads", "1"))
IMAGES = int(C.peek_arg("--images", "5000"))
C.setup_threads(THREADS, IMPL, pin="--no-pin" not in sys.argv)
C.ensure_data_env()


def _channels():
    argv = sys.argv[1:]
    if "--channels" in argv:
        i = argv.index("--channels")
        return int(argv[i + 1]), int(argv[i + 2])
    return 32, 64


C1, C2 = _channels()

BATCH, LR = 32, 0.01


def load():
    import numpy as np

    import smallchains as sc
    X, y = sc.datasets.cifar10("train")
    return np.array(X[:IMAGES]), np.array(y[:IMAGES])


def build_smallchains(X, y):
    import smallchains as sc
    chain = sc.SimpleChain(
        (3, 32, 32), sc.Conv(C1, 3, "relu"), sc.BatchNorm(), sc.MaxPool(2), sc.Conv(C2, 3, "relu"),
        sc.BatchNorm(), sc.MaxPool(2), sc.Flatten(), sc.TurboDense(64, "relu"), sc.Dropout(0.5),
        sc.TurboDense(10))
    return C.smallchains_trainer(chain, X, y, lambda: sc.SGD(LR), BATCH, 10)


def build_torch(X, y):
    import torch
    C.torch_threads(THREADS)
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, C1, 3), nn.ReLU(), nn.BatchNorm2d(C1), nn.MaxPool2d(2), nn.Conv2d(C1, C2, 3),
        nn.ReLU(), nn.BatchNorm2d(C2), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(C2 * 36, 64),
        nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))
    opt = torch.optim.SGD(net.parameters(), lr=LR, foreach=True)
    return C.torch_trainer(net, opt, X, y, BATCH, 10)


BUILDERS = {"smallchains": build_smallchains, "torch": build_torch}


def main():
    C.run_training_bench(lambda args: f"cifar_cnn-{args.impl}-t{args.threads}-c{C1}x{C2}", BUILDERS, load, forwarded=("--images", "--channels"),
                         extra_args=[("--images", dict(type=int, default=IMAGES)), ("--channels", dict(type=int, nargs=2, default=(C1, C2)))], metadata=dict(batch_size=str(BATCH), images=str(IMAGES), channels=f"{C1}/{C2}"))


if __name__ == "__main__":
    main()
