"""Matrix-exponential training benchmark (SimpleChains.jl's published workload).

    python bench/matexp.py --impl {smallchains,torch,torch-compile,jax,jax-fori}
                           --threads N [pyperf options, e.g. --fast -o out.json]

Model 4 -> 32 tanh -> 16 tanh -> 4 (dense + bias), loss sum((yhat-y)^2)/N,
Adam(lr=1e-3, 0.9, 0.999, 1e-8). One epoch = one full-batch gradient step on
all 10_000 samples. The timed body runs ``loops`` epochs; everything is
compiled/warmed up before timing.

Thread setup happens at the very top (before numba/torch/jax are imported);
pyperf worker processes re-run this script with the same user arguments, so
--impl/--threads are parsed manually from sys.argv first. See
_common.setup_threads for exactly what is set per impl. All impls are pinned
(sched_setaffinity) to the first N allowed cores.

Impl notes
* torch: eager nn.Sequential + torch.optim.Adam. ``--torch-adam`` chooses the
  optimizer kernel (default ``fused``: fastest eager option measured here).
* torch-compile: ``--compile-mode`` picks the strategy (default ``func``):
    func   - a functional step (torch.func.grad_and_value of the loss + a
             hand-written Adam, same math as torch.optim.Adam) wrapped in ONE
             torch.compile -> a single inductor graph per step, like jax.jit.
    module - torch.compile(model+loss) (AOTAutograd compiles fwd+bwd) plus
             torch.compile(opt.step) (the documented optimizer pattern).
* jax: forward + grad + hand-written Adam under one jax.jit, params/moments
  donated; Python loop over epochs, block_until_ready at the end.
* jax-fori: same step, but the `loops` epochs run inside one jitted
  lax.fori_loop (dynamic trip count, compiled once) - comparable to
  smallchains' single compiled training loop (no per-step dispatch).
* smallchains: sc.train_unbatched(G, p, model, X, opt, loops), one call.
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

import pyperf  # noqa: E402

N = C.N_SAMPLES
WARMUP_STEPS = 5


# --------------------------------------------------------------------------
# smallchains
# --------------------------------------------------------------------------
def build_smallchains(X, Y, args):
    import smallchains as sc
    chain = C.matexp_chain()
    p = sc.init_params(chain, seed=0)
    model = sc.add_loss(chain, sc.SquaredLoss(Y))
    G = sc.alloc_threaded_grad(chain)
    opt = sc.Adam(1e-3)
    sc.train_unbatched(G, p, model, X, opt, WARMUP_STEPS)  # compile + warm

    def bench(loops):
        t0 = time.perf_counter()
        sc.train_unbatched(G, p, model, X, opt, loops)
        return time.perf_counter() - t0
    return bench


# --------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------
def _torch_model(torch):
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 4))
    lins = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin, (W, b) in zip(lins, C.glorot_params()):
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
    return model


def build_torch(X, Y, args, compiled=False):
    import torch
    C.torch_threads(THREADS)
    x = torch.from_numpy(X)
    y = torch.from_numpy(Y)
    model = _torch_model(torch)

    if compiled and args.compile_mode == "func":
        return _build_torch_func(torch, model, x, y)

    adam_kw = {"default": {}, "foreach": {"foreach": True},
               "fused": {"fused": True}, "loop": {"foreach": False}}[args.torch_adam]
    opt = torch.optim.Adam(model.parameters(), lr=C.LR,
                           betas=(C.BETA1, C.BETA2), eps=C.EPS, **adam_kw)

    def loss_fn(x, y):
        return ((model(x) - y) ** 2).sum() / N

    opt_step = opt.step
    if compiled:  # "module" mode
        loss_fn = torch.compile(loss_fn)
        opt_step = torch.compile(opt.step)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        opt_step()
        return loss

    for _ in range(WARMUP_STEPS):
        step()

    def bench(loops):
        t0 = time.perf_counter()
        for _ in range(loops):
            step()
        return time.perf_counter() - t0
    return bench


def _build_torch_func(torch, model, x, y):
    """Functional step: grad_and_value + hand-written Adam in one compiled
    graph; params/moments updated in place (no allocation per step)."""
    from torch.func import functional_call, grad_and_value
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone() for _, p in model.named_parameters()]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    t = torch.zeros((), dtype=torch.float32)
    b1, b2, lr, eps = C.BETA1, C.BETA2, C.LR, C.EPS

    def loss_of(plist, x, y):
        out = functional_call(model, dict(zip(names, plist)), (x,))
        return ((out - y) ** 2).sum() / N

    gv = grad_and_value(loss_of)

    @torch.compile(fullgraph=True)
    def step(params, ms, vs, t, x, y):
        g, loss = gv(params, x, y)
        t.add_(1.0)
        bc1 = 1.0 - b1 ** t
        bc2 = 1.0 - b2 ** t
        for p, m, v, gi in zip(params, ms, vs, g):
            m.mul_(b1).add_(gi, alpha=1 - b1)
            v.mul_(b2).addcmul_(gi, gi, value=1 - b2)
            p.sub_(lr * (m / bc1) / ((v / bc2).sqrt() + eps))
        return loss

    with torch.no_grad():
        for _ in range(WARMUP_STEPS):
            step(params, ms, vs, t, x, y)

    def bench(loops):
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(loops):
                step(params, ms, vs, t, x, y)
        return time.perf_counter() - t0
    return bench


# --------------------------------------------------------------------------
# jax
# --------------------------------------------------------------------------
def build_jax(X, Y, args, fori=False):
    import jax
    import jax.numpy as jnp
    from functools import partial

    # W stored as (in, out) so the forward is x @ W + b.
    params = [(jnp.asarray(W.T), jnp.asarray(b)) for W, b in C.glorot_params()]
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    state = (params, zeros, jax.tree_util.tree_map(jnp.zeros_like, params),
             jnp.zeros((), jnp.float32))
    x = jnp.asarray(X)
    y = jnp.asarray(Y)
    b1, b2, lr, eps = C.BETA1, C.BETA2, C.LR, C.EPS

    def loss_fn(params, x, y):
        h = x
        for i, (W, b) in enumerate(params):
            h = h @ W + b
            if i < len(params) - 1:
                h = jnp.tanh(h)
        return jnp.sum((h - y) ** 2) / N

    def step_fn(state, x, y):
        p, m, v, t = state
        g = jax.grad(loss_fn)(p, x, y)
        t = t + 1.0
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        bc1 = 1.0 - b1 ** t
        bc2 = 1.0 - b2 ** t
        p = jax.tree_util.tree_map(
            lambda p, m, v: p - lr * (m / bc1) / (jnp.sqrt(v / bc2) + eps), p, m, v)
        return (p, m, v, t)

    if fori:
        @partial(jax.jit, donate_argnums=(0,))
        def run(state, n, x, y):
            return jax.lax.fori_loop(0, n, lambda i, s: step_fn(s, x, y), state)

        state = run(state, jnp.int32(WARMUP_STEPS), x, y)
        jax.block_until_ready(state)
        box = [state]

        def bench(loops):
            n = jnp.int32(loops)
            t0 = time.perf_counter()
            s = run(box[0], n, x, y)
            jax.block_until_ready(s)
            dt = time.perf_counter() - t0
            box[0] = s
            return dt
        return bench

    step = jax.jit(step_fn, donate_argnums=(0,))
    for _ in range(WARMUP_STEPS):
        state = step(state, x, y)
    jax.block_until_ready(state)
    box = [state]

    def bench(loops):
        s = box[0]
        t0 = time.perf_counter()
        for _ in range(loops):
            s = step(s, x, y)
        jax.block_until_ready(s)
        dt = time.perf_counter() - t0
        box[0] = s
        return dt
    return bench


BUILDERS = {
    "smallchains": build_smallchains,
    "torch": lambda X, Y, a: build_torch(X, Y, a, compiled=False),
    "torch-compile": lambda X, Y, a: build_torch(X, Y, a, compiled=True),
    "jax": lambda X, Y, a: build_jax(X, Y, a, fori=False),
    "jax-fori": lambda X, Y, a: build_jax(X, Y, a, fori=True),
}


def add_cmdline_args(cmd, args):
    cmd.extend(["--impl", args.impl, "--threads", str(args.threads),
                "--torch-adam", args.torch_adam,
                "--compile-mode", args.compile_mode])
    if args.no_pin:
        cmd.append("--no-pin")


def main():
    runner = pyperf.Runner(add_cmdline_args=add_cmdline_args)
    ap = runner.argparser
    ap.add_argument("--impl", choices=sorted(BUILDERS), default="torch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--torch-adam", default="fused",
                    choices=["default", "foreach", "fused", "loop"])
    ap.add_argument("--compile-mode", default="func", choices=["func", "module"])
    ap.add_argument("--no-pin", action="store_true",
                    help="don't sched_setaffinity to N cores")
    args = runner.parse_args()

    name = f"matexp-{args.impl}-t{args.threads}"
    runner.metadata["impl"] = args.impl
    runner.metadata["threads"] = str(args.threads)
    runner.metadata["flops_per_epoch"] = str(C.FLOPS_PER_EPOCH)

    if args.worker:
        X, Y = C.make_data()
        bench = BUILDERS[args.impl](X, Y, args)
    else:  # parent only spawns workers; don't build/compile here
        def bench(loops):
            raise RuntimeError("unreachable")
    runner.bench_time_func(name, bench)


if __name__ == "__main__":
    main()
