"""Training-step and forward benchmark of the recurrent time-series models (issue 15):
LSTNet and TPA-LSTM (``smallchains.models``) against their torch eager twins
(bench/torch_models.py).

    python bench/sequence_models.py --model {lstnet,tpa_lstm} --impl {smallchains,torch}
        --mode {train,forward} --threads N [pyperf options, e.g. --fast -o out.json]

Sizes (FluxBench's, per-window meaning): LSTNet with 20 input series, window 10, conv 2
filters of width 3, GRU 3, skip-GRU 3 over 4 interleaved sub-sequences, highway 4, batch
500 (269 parameters); TPA-LSTM with 10 input series, window 10, embedding and hidden 10,
2 stacked LSTMs, 32 attention filters, batch 300 (2,941 parameters). Data: standard
normal windows and targets (seed 0), float32.

* ``train``: one pyperf loop = one full-batch training step on the 500 windows: forward,
  mean-of-squares loss, gradient, Adam(1e-3). smallchains: ``sc.train_unbatched`` (one
  call runs ``loops`` steps); torch: ``zero_grad(set_to_none=True)``, ``backward``, fused
  Adam.
* ``forward``: one loop = the 500 outputs (torch under ``no_grad``).

Both sides start from the same parameters (smallchains' ``init_params(seed=0)`` copied
into torch); before timing, each worker checks that the two sides' loss and gradient at
those parameters agree (float32, relative 1e-4 of the largest gradient entry).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

IMPL = C.peek_arg("--impl", "torch")
THREADS = int(C.peek_arg("--threads", "1"))
C.setup_threads(THREADS, IMPL, pin="--no-pin" not in sys.argv)

MODELS = {"lstnet": dict(n_series=20, window=10, batch=500),
          "tpa_lstm": dict(n_series=10, window=10, batch=300)}
WARM = 5


def make(model):
    import numpy as np

    import smallchains as sc
    from smallchains import models
    cfg = MODELS[model]
    chain = getattr(models, model)(cfg["n_series"], cfg["window"])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((cfg["batch"],) + chain.input_shape).astype(np.float32)
    Y = rng.standard_normal((cfg["batch"],) + chain.output_shape).astype(np.float32)
    p = sc.init_params(chain, seed=0)
    return chain, X, Y, p


def torch_twin(model, p):
    import torch
    import torch_models
    cfg = MODELS[model]
    cls = {"lstnet": torch_models.LSTNet, "tpa_lstm": torch_models.TPALSTM}[model]
    return cls(cfg["n_series"], cfg["window"]).from_flat(p)


def check_agreement(model, chain, X, Y, p):
    """Loss and gradient of both sides at ``p`` (float32) agree, else AssertionError."""
    import numpy as np
    import torch

    import smallchains as sc
    loss, g = sc.valgrad(sc.add_loss(chain, sc.SquaredLoss(Y)), X, p)
    net = torch_twin(model, p)
    lt = ((net(torch.from_numpy(X)) - torch.from_numpy(Y)) ** 2).sum() / len(X)
    lt.backward()
    gt = net.flat_grad()
    scale = np.abs(gt).max()
    assert abs(loss - lt.item()) <= 1e-4 * abs(lt.item()), (loss, lt.item())
    assert np.abs(g - gt).max() <= 1e-4 * scale, np.abs(g - gt).max() / scale



def build_smallchains(model, mode):
    import smallchains as sc
    chain, X, Y, p = make(model)
    check_agreement(model, chain, X, Y, p)
    if mode == "forward":
        chain(X, p)

        def bench(loops):
            t0 = time.perf_counter()
            for _ in range(loops):
                chain(X, p)
            return time.perf_counter() - t0
        return bench
    m = sc.add_loss(chain, sc.SquaredLoss(Y))
    G = sc.alloc_threaded_grad(chain)
    opt = sc.Adam(1e-3)
    sc.train_unbatched(G, p, m, X, opt, WARM)

    def bench(loops):
        t0 = time.perf_counter()
        sc.train_unbatched(G, p, m, X, opt, loops)
        return time.perf_counter() - t0
    return bench


def build_torch(model, mode):
    import torch
    C.torch_threads(THREADS)
    chain, X, Y, p = make(model)
    check_agreement(model, chain, X, Y, p)
    net = torch_twin(model, p)
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    if mode == "forward":
        def bench(loops):
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(loops):
                    net(x)
            return time.perf_counter() - t0
        bench(WARM)
        return bench
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        (((net(x) - y) ** 2).sum() / len(x)).backward()
        opt.step()

    for _ in range(WARM):
        step()

    def bench(loops):
        t0 = time.perf_counter()
        for _ in range(loops):
            step()
        return time.perf_counter() - t0
    return bench


def main():
    import pyperf

    def add_cmdline_args(cmd, args):
        cmd.extend(["--impl", args.impl, "--threads", str(args.threads), "--model", args.model,
                    "--mode", args.mode])
        if args.no_pin:
            cmd.append("--no-pin")

    runner = pyperf.Runner(add_cmdline_args=add_cmdline_args)
    ap = runner.argparser
    ap.add_argument("--impl", choices=("smallchains", "torch"), default="torch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=sorted(MODELS), default="lstnet")
    ap.add_argument("--mode", choices=("train", "forward"), default="train")
    ap.add_argument("--no-pin", action="store_true")
    args = runner.parse_args()
    runner.metadata.update(impl=args.impl, threads=str(args.threads), model=args.model, mode=args.mode)
    if args.worker:
        bench = {"smallchains": build_smallchains, "torch": build_torch}[args.impl](args.model, args.mode)
    else:
        def bench(loops):
            raise RuntimeError("unreachable")
    runner.bench_time_func(f"{args.model}-{args.mode}-{args.impl}-t{args.threads}", bench)


if __name__ == "__main__":
    main()
