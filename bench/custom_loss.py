"""What a user-defined loss costs: the matrix-exponential MLP (4-32-16-4 tanh, 10,000
samples) trained full batch with Adam, the built-in SquaredLoss against the same loss
as a CustomLoss (a numba function of one sample, compiled into the kernels) and as a
weighted SquaredLoss (weights of ones: the per-sample path).

    python bench/custom_loss.py --loss {builtin,custom,weighted} [--threads N] [pyperf options]

One timed unit: 10 training steps (train_unbatched), float32.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

C.setup_threads(int(C.peek_arg("--threads", "1")), "smallchains")

import numba  # noqa: E402
import numpy as np  # noqa: E402


@numba.njit
def squared(yhat, y, grad):
    total = yhat.dtype.type(0.0)
    for j in range(yhat.shape[0]):
        d = yhat[j] - y[j]
        total += d * d
        grad[j] = 2 * d
    return total


def main():
    import pyperf

    import smallchains as sc

    runner = pyperf.Runner(add_cmdline_args=lambda cmd, a: cmd.extend(
        ["--loss", a.loss, "--threads", str(a.threads)]))
    runner.argparser.add_argument("--loss", choices=("builtin", "custom", "weighted"),
                                  default="builtin")
    runner.argparser.add_argument("--threads", type=int, default=1)
    args = runner.parse_args()
    X, Y = sc.datasets.matrix_exponential(10_000, seed=0)
    chain = C.matexp_chain()
    loss = {"builtin": lambda: sc.SquaredLoss(Y), "custom": lambda: sc.CustomLoss(squared, Y),
            "weighted": lambda: sc.SquaredLoss(Y, weights=np.ones(len(Y)))}[args.loss]()
    model = sc.add_loss(chain, loss)
    p = sc.init_params(chain, seed=0)
    G = sc.alloc_threaded_grad(chain, args.threads)
    opt = sc.Adam(1e-3)
    sc.train_unbatched(G, p, model, X, opt, 10)  # compile

    def timed(loops):
        t0 = pyperf.perf_counter()
        for _ in range(loops):
            sc.train_unbatched(G, p, model, X, opt, 10)
        return pyperf.perf_counter() - t0

    runner.bench_time_func(f"custom_loss_{args.loss}_{args.threads}t", timed)


if __name__ == "__main__":
    main()
