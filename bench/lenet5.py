"""LeNet5-on-MNIST training benchmark (SimpleChains.jl's second published workload).

    python bench/lenet5.py --impl {smallchains,torch} --threads N
                           --batch-size {128,2048,default} [--limit N]
                           [pyperf options, e.g. -o out.json]

Model: Conv(1->6, 5x5) relu, MaxPool 2, Conv(6->16, 5x5) relu, MaxPool 2,
Flatten, Dense 256->120 relu, 120->84 relu, 84->10; logit cross-entropy
(mean over the minibatch); Adam(3e-4). Data: the real MNIST training set
(60,000 images, ``smallchains.datasets.mnist("train")``, read from
``$SMALLCHAINS_DATA/mnist``; defaults to <repo>/../shared/datasets if unset).

Metric: seconds per epoch of 60,000 images. One pyperf loop = one epoch
(shuffled minibatches; the last, smaller minibatch is taken, as in
``sc.train_batched``). With ``--limit L`` an "epoch" is one pass over the first
L images and the reported time is scaled by 60000/L (smoke runs only).

pyperf defaults here (an epoch takes seconds): ``--processes 1 --values 3
--warmups 1 --loops 1`` (no loop calibration); every one can be overridden on
the command line. Before timing, each worker compiles / warms up on a few
minibatches (not timed); the pyperf warmup value is then a full epoch.

Thread setup happens at the very top (before numba/torch are imported) and the
process is pinned to the first N cores, exactly as bench/matexp.py.

Impl notes
* smallchains: ``sc.train_batched(G, p, model, X, opt, 1, batch_size=bs,
  shuffle=True, seed=...)`` per epoch; ``--batch-size default`` passes None
  (library default ``sc.default_batch_size``; the resolved value is stored in
  the pyperf metadata as ``batch_size_resolved``).
* torch: eager nn.Sequential + torch.optim.Adam (``--torch-adam``, default
  ``fused``, as in matexp.py), F.cross_entropy; per epoch a
  ``torch.randperm`` permutation, minibatches gathered by index slicing
  (``x[perm[i:i+bs]]``, included in the timing, like smallchains' gather).
  No DataLoader. ``--batch-size default`` is rejected for torch.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (light-weight, no heavy imports)

IMPL = C.peek_arg("--impl", "torch")
THREADS = int(C.peek_arg("--threads", "1"))
NO_PIN = "--no-pin" in sys.argv
C.setup_threads(THREADS, IMPL, pin=not NO_PIN)
C.ensure_data_env()

import pyperf  # noqa: E402

N_FULL = C.LENET5_N_TRAIN
WARMUP_BATCHES = 3


def _bs(args):
    return None if args.batch_size == "default" else int(args.batch_size)


# --------------------------------------------------------------------------
# smallchains
# --------------------------------------------------------------------------
def build_smallchains(X, y, args, runner):
    import smallchains as sc
    chain = C.lenet5_chain()
    model = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y))
    p = sc.init_params(chain, seed=0)
    G = sc.alloc_threaded_grad(chain)
    opt = sc.Adam(C.LENET5_LR)
    bs = _bs(args)
    n = X.shape[0]
    try:  # resolved default batch size, for the record only
        B = chain._kernels(p.dtype)[1].B
        real_bs = bs if bs is not None else sc.default_batch_size(B, G.shape[0], n)
    except Exception:  # private API moved: not fatal
        real_bs = bs
    runner.metadata["batch_size_resolved"] = str(real_bs)

    # compile + warm on a few minibatches (separate model/opt: same kernels)
    k = min(n, WARMUP_BATCHES * (real_bs or 128))
    warm = sc.add_loss(chain, sc.LogitCrossEntropyLoss(y[:k]))
    sc.train_batched(G, p.copy(), warm, X[:k], sc.Adam(C.LENET5_LR), 1,
                     batch_size=bs, shuffle=True, seed=0)

    scale = N_FULL / n
    epoch = [0]

    def bench(loops):
        t0 = time.perf_counter()
        for _ in range(loops):
            epoch[0] += 1
            sc.train_batched(G, p, model, X, opt, 1, batch_size=bs,
                             shuffle=True, seed=epoch[0])
        return (time.perf_counter() - t0) * scale
    return bench


# --------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------
def build_torch(X, y, args, runner):
    import torch
    import torch.nn.functional as F
    if args.batch_size == "default":
        raise SystemExit("--batch-size default is only for smallchains")
    C.torch_threads(THREADS)
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10))
    adam_kw = {"default": {}, "foreach": {"foreach": True},
               "fused": {"fused": True}, "loop": {"foreach": False}}[args.torch_adam]
    opt = torch.optim.Adam(model.parameters(), lr=C.LENET5_LR, **adam_kw)
    x = torch.from_numpy(X.copy())
    t = torch.from_numpy(y.copy())
    n = x.shape[0]
    bs = int(args.batch_size)
    runner.metadata["batch_size_resolved"] = str(bs)
    gen = torch.Generator().manual_seed(0)

    def step(idx):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), t[idx])
        loss.backward()
        opt.step()
        return loss

    def run_epoch(limit=None):
        perm = torch.randperm(n, generator=gen)
        stop = n if limit is None else min(n, limit)
        for i in range(0, stop, bs):
            step(perm[i:i + bs])

    run_epoch(limit=WARMUP_BATCHES * bs)  # warm up allocator / kernels
    scale = N_FULL / n

    def bench(loops):
        t0 = time.perf_counter()
        for _ in range(loops):
            run_epoch()
        return (time.perf_counter() - t0) * scale
    return bench


BUILDERS = {"smallchains": build_smallchains, "torch": build_torch}


def add_cmdline_args(cmd, args):
    cmd.extend(["--impl", args.impl, "--threads", str(args.threads),
                "--batch-size", args.batch_size,
                "--torch-adam", args.torch_adam])
    if args.limit:
        cmd.extend(["--limit", str(args.limit)])
    if args.no_pin:
        cmd.append("--no-pin")


def main():
    runner = pyperf.Runner(processes=1, values=3, warmups=1, loops=1,
                           add_cmdline_args=add_cmdline_args)
    ap = runner.argparser
    ap.add_argument("--impl", choices=sorted(BUILDERS), default="torch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", default="128",
                    help="128, 2048, any int, or 'default' (smallchains only)")
    ap.add_argument("--limit", type=int, default=None,
                    help="use only the first LIMIT images; time scaled to 60k")
    ap.add_argument("--torch-adam", default="fused",
                    choices=["default", "foreach", "fused", "loop"])
    ap.add_argument("--no-pin", action="store_true",
                    help="don't sched_setaffinity to N cores")
    args = runner.parse_args()
    if args.batch_size != "default":
        int(args.batch_size)  # validate early
    if args.impl != "smallchains" and args.batch_size == "default":
        ap.error("--batch-size default is only valid with --impl smallchains")

    name = f"lenet5-{args.impl}-bs{args.batch_size}-t{args.threads}"
    runner.metadata["impl"] = args.impl
    runner.metadata["threads"] = str(args.threads)
    runner.metadata["batch_size"] = args.batch_size
    runner.metadata["n_images"] = str(args.limit or N_FULL)
    runner.metadata["time_scaled_to"] = str(N_FULL)

    if args.worker:
        X, y = C.load_mnist_train(args.limit)
        bench = BUILDERS[args.impl](X, y, args, runner)
    else:  # parent only spawns workers; don't load/compile here
        def bench(loops):
            raise RuntimeError("unreachable")
    runner.bench_time_func(name, bench)


if __name__ == "__main__":
    main()
