"""Many independent fits (issue 17): a deep ensemble of the matrix-exponential network
(4 -> 32 tanh -> 16 tanh -> 4, squared loss / N, Adam(1e-3)), F fits from different seeds,
each on the same 1,000 samples, full-batch steps.

    python bench/fit_many.py --impl IMPL --threads N [--fits F] [pyperf options, e.g. --fast]

IMPL:

* ``smallchains``: ``sc.fit_many(model, X, F, iters=loops, n_threads=N)`` (one call, every
  fit on one thread from start to end; the time includes its set-up: validation,
  ``init_params`` of every fit, copying the results);
* ``smallchains-dask``: the same through a Dask ``LocalCluster`` of N single-threaded
  worker processes (created and warmed before timing: first-call compile excluded);
* ``smallchains-alone``: ONE fit with ``sc.train_unbatched`` at one thread, for scale;
* ``torch-vmap``: ``torch.func.stack_module_state`` + ``vmap(grad(functional_call))``
  over the F stacked models, fused Adam on the stacked parameters;
* ``torch-loop``: F torch modules stepped one after another (eager, fused Adam each);
* ``jax-vmap``: ``jax.jit(jax.vmap(train))`` where ``train`` runs ``STEPS_PER_CALL``
  Adam steps in a ``lax.fori_loop``.

One pyperf loop = one optimizer step of ALL F fits (F fit-steps; ``smallchains-alone``:
one step of its one fit), so "fits per second" of a 2,000-step fit is
``1 / (value / F * 2000)``. Threads: N for every impl, pinned to the same N cores.
Before timing, each impl's first-step loss gradient for fit 0 is checked against a
float64 torch autograd reference (relative 1e-4 of its largest entry).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

IMPL = C.peek_arg("--impl", "smallchains")
THREADS = int(C.peek_arg("--threads", "1"))
C.setup_threads(THREADS, "smallchains" if IMPL.startswith("smallchains") else IMPL,
                pin="--no-pin" not in sys.argv)

N = 1000
STEPS_PER_CALL = 20  # jax: steps per jitted call
WARM = 3


def data_and_params(fits):
    import numpy as np

    import smallchains as sc
    X, Y = C.make_data(N)
    chain = C.matexp_chain()
    P = np.stack([sc.init_params(chain, seed=s) for s in range(fits)])
    return chain, X, Y, P


def torch_views(chain, p):
    """(W, b) per layer of flat smallchains parameters ``p`` (W is (out, in), as torch)."""
    return [(v["W"], v["b"]) for v in chain.param_views(p)]


def reference_grad(chain, X, Y, p):
    """float64 torch autograd gradient of sum((net(X) - Y)^2) / N at ``p``, flat."""
    import numpy as np
    import torch
    ws = [(torch.tensor(W, dtype=torch.float64, requires_grad=True),
           torch.tensor(b, dtype=torch.float64, requires_grad=True)) for W, b in torch_views(chain, p)]
    h = torch.from_numpy(X.astype(np.float64))
    for k, (W, b) in enumerate(ws):
        h = h @ W.T + b
        if k < len(ws) - 1:
            h = torch.tanh(h)
    (((h - torch.from_numpy(Y.astype(np.float64))) ** 2).sum() / N).backward()
    return np.concatenate([t.grad.numpy().ravel() for W, b in ws for t in (W, b)])


def check(name, g, gref):
    import numpy as np
    err = np.abs(g - gref).max() / np.abs(gref).max()
    if not err < 1e-4:
        raise SystemExit(f"{name}: first-step gradient differs from torch float64 autograd "
                         f"(relative {err:.2e})")


def build_smallchains(fits, dask=False):
    import smallchains as sc
    chain, X, Y, P = data_and_params(fits)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    check("smallchains", sc.valgrad(model, X, P[0].copy())[1], reference_grad(chain, X, Y, P[0]))
    kw = dict(n_threads=THREADS)
    if dask:
        from distributed import Client, LocalCluster
        cluster = LocalCluster(n_workers=THREADS, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
        client = Client(cluster)
        kw = dict(backend=client)
        build_smallchains.keep = (cluster, client)
    sc.fit_many(model, X, fits, iters=WARM, **kw)  # compile (in every worker) and warm

    def bench(loops):
        t0 = time.perf_counter()
        res = sc.fit_many(model, X, fits, iters=loops, **kw)
        dt = time.perf_counter() - t0
        assert all(r.ok for r in res)
        return dt
    return bench


def build_alone(fits):
    import smallchains as sc
    chain, X, Y, P = data_and_params(1)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    G = sc.alloc_threaded_grad(chain, 1)
    p = P[0].copy()
    opt = sc.Adam(1e-3)
    sc.train_unbatched(G, p, model, X, opt, WARM)

    def bench(loops):
        t0 = time.perf_counter()
        sc.train_unbatched(G, p, model, X, opt, loops)
        return time.perf_counter() - t0
    return bench


def _torch_net(torch, chain, p):
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16),
                              torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for lin, (W, b) in zip([m for m in net if isinstance(m, torch.nn.Linear)],
                               torch_views(chain, p)):
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
    return net


def build_torch_vmap(fits):
    import copy

    import numpy as np
    import torch
    from torch.func import functional_call, grad, stack_module_state, vmap
    C.torch_threads(THREADS)
    chain, X, Y, P = data_and_params(fits)
    nets = [_torch_net(torch, chain, P[k]) for k in range(fits)]
    params, buffers = stack_module_state(nets)
    base = copy.deepcopy(nets[0]).to("meta")
    x, y = torch.from_numpy(X), torch.from_numpy(Y)

    def loss(prm, buf, x, y):
        return ((functional_call(base, (prm, buf), (x,)) - y) ** 2).sum() / N

    vgrad = vmap(grad(loss), in_dims=(0, 0, None, None))
    leaves = list(params.values())
    opt = torch.optim.Adam(leaves, lr=C.LR, betas=(C.BETA1, C.BETA2), eps=C.EPS, fused=True)
    g0 = vgrad(params, buffers, x, y)
    check("torch-vmap", np.concatenate([g0[k][0].detach().numpy().ravel() for k in params]),
          reference_grad(chain, X, Y, P[0]))

    def step():
        g = vgrad(params, buffers, x, y)
        for k, leaf in zip(params, leaves):
            leaf.grad = g[k]
        opt.step()

    for _ in range(WARM):
        step()
    return C.timed_epochs(step)


def build_torch_loop(fits):
    import torch
    C.torch_threads(THREADS)
    chain, X, Y, P = data_and_params(fits)
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    nets = [_torch_net(torch, chain, P[k]) for k in range(fits)]
    opts = [torch.optim.Adam(n.parameters(), lr=C.LR, betas=(C.BETA1, C.BETA2), eps=C.EPS,
                             fused=True) for n in nets]

    def step():
        for net, opt in zip(nets, opts):
            opt.zero_grad(set_to_none=True)
            (((net(x) - y) ** 2).sum() / N).backward()
            opt.step()

    for _ in range(WARM):
        step()
    return C.timed_epochs(step)


def build_jax_vmap(fits):
    import jax
    import jax.numpy as jnp
    import numpy as np
    chain, X, Y, P = data_and_params(fits)
    x, y = jnp.asarray(X), jnp.asarray(Y)
    stacked = [tuple(jnp.asarray(np.stack([a for a in arrs])) for arrs in zip(*layer))
               for layer in zip(*[torch_views(chain, P[k]) for k in range(fits)])]

    def loss(ws, x, y):
        h = x
        for k, (W, b) in enumerate(ws):
            h = h @ W.T + b
            if k < len(ws) - 1:
                h = jnp.tanh(h)
        return jnp.sum((h - y) ** 2) / N

    b1, b2, lr, eps = C.BETA1, C.BETA2, C.LR, C.EPS

    def train(ws, m, v, t0, x, y):
        def body(i, carry):
            ws, m, v = carry
            g = jax.grad(loss)(ws, x, y)
            t = t0 + i + 1
            m = jax.tree_util.tree_map(lambda a, b: b1 * a + (1 - b1) * b, m, g)
            v = jax.tree_util.tree_map(lambda a, b: b2 * a + (1 - b2) * b * b, v, g)
            step = lr / (1 - b1 ** t)
            c2 = jnp.sqrt(1 - b2 ** t)
            ws = jax.tree_util.tree_map(lambda w, a, b: w - step * a / (jnp.sqrt(b) / c2 + eps),
                                        ws, m, v)
            return ws, m, v
        return jax.lax.fori_loop(0, STEPS_PER_CALL, body, (ws, m, v))

    run = jax.jit(jax.vmap(train, in_axes=(0, 0, 0, None, None, None)))
    g0 = jax.vmap(jax.grad(loss), in_axes=(0, None, None))(stacked, x, y)
    check("jax-vmap", np.concatenate([np.asarray(a[0]).ravel() for layer in g0 for a in layer]),
          reference_grad(chain, X, Y, P[0]))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, stacked)
    state = [stacked, zeros, zeros, 0]

    def call():
        ws, m, v = run(state[0], state[1], state[2], jnp.float32(state[3]), x, y)
        jax.block_until_ready(ws)
        state[:3] = ws, m, v
        state[3] += STEPS_PER_CALL

    call()  # compile

    def bench(loops):
        t0 = time.perf_counter()
        for _ in range(-(-loops // STEPS_PER_CALL)):
            call()
        return (time.perf_counter() - t0) * loops / (-(-loops // STEPS_PER_CALL) * STEPS_PER_CALL)
    return bench


BUILDERS = {"smallchains": build_smallchains, "smallchains-dask": lambda f: build_smallchains(f, True),
            "smallchains-alone": build_alone, "torch-vmap": build_torch_vmap,
            "torch-loop": build_torch_loop, "jax-vmap": build_jax_vmap}


def main():
    import pyperf

    def add_cmdline_args(cmd, args):
        cmd.extend(["--impl", args.impl, "--threads", str(args.threads), "--fits", str(args.fits)])
        if args.no_pin:
            cmd.append("--no-pin")

    # values of at least 1 s: fit_many's set-up (validation, init_params of every fit,
    # threads) is then about 1% of a value, as over a 2,000-step run
    runner = pyperf.Runner(add_cmdline_args=add_cmdline_args, min_time=1.0)
    runner.argparser.add_argument("--impl", choices=sorted(BUILDERS), default="smallchains")
    runner.argparser.add_argument("--threads", type=int, default=1)
    runner.argparser.add_argument("--fits", type=int, default=256)
    runner.argparser.add_argument("--no-pin", action="store_true")
    args = runner.parse_args()
    runner.metadata["fits"] = str(args.fits)
    runner.metadata["threads"] = str(args.threads)
    runner.metadata["unit_of_work"] = "one optimizer step of every fit"
    bench = BUILDERS[args.impl](args.fits)
    runner.bench_time_func(f"fit_many-{args.impl}-{args.threads}t-{args.fits}fits", bench)


if __name__ == "__main__":
    main()
