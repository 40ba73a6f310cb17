"""Per-layer-step times of a chain's generated code: where a training step's time goes.

    python bench/step_profile.py [--model {lenet5,mnist_mlp,cifar_dense,tpa_lstm,lstnet,
                                           matexp}] [--block B]
                                 [--registers 16|32]
                                 [--dtype float32|float64] [--repeats 5]
                                 [--samples 2048]

Builds the chain's layer steps exactly as the compiler generates them for blocks of
``B`` samples (``codegen._forward_lines`` / ``_pullback_lines``, training pullback:
no input gradient of the first layer), compiles each step on its own with numba (arrays
passed directly instead of the kernels' raw pointers), runs the forward steps then the
pullback steps once on random data, and then times each step over ``--samples`` samples
(``samples // B`` calls on the same workspace), best of ``--repeats``. Prints ms per
that many samples per step and their sum. Not a pyperf benchmark: the steps run outside the
training loop (no loss, gathers, optimizer or threads), so the sum is a lower bound of
a step's time; use it to find the step to work on, and bench/lenet5.py for the speed.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time

import numba
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import smallchains as sc  # noqa: E402
from smallchains import models  # noqa: E402
from smallchains import _simd, _simd64  # noqa: E402
from smallchains._cpu import vector_registers  # noqa: E402
from smallchains._simd import vector_bytes  # noqa: E402
from smallchains._fastmath import tanh_f32, tanh_f64  # noqa: E402
from smallchains._numba_utils import like  # noqa: E402
from smallchains.activations import gelu_grad, silu_grad  # noqa: E402
from smallchains.compiler.codegen import (_forward_lines, _Functions, _pullback_lines, forward_reads_rows,  # noqa: E402
                                         choose_block_size, plan_chain)


def model(name, registers):
    if name == "lenet5":
        from lenet5_mnist import lenet5
        c = lenet5()
    elif name == "cifar_dense":  # network 1 of issue 14
        c = sc.SimpleChain(1024, sc.TurboDense(64, "sigmoid"), sc.TurboDense(32, "sigmoid"),
                           sc.TurboDense(10))
    elif name == "tpa_lstm":  # issue 15's benchmark size
        c = models.tpa_lstm(10, 10)
    elif name == "matexp":  # bench/matexp.py's 4 -> 32 tanh -> 16 tanh -> 4
        c = sc.SimpleChain(4, sc.TurboDense(32, "tanh"), sc.TurboDense(16, "tanh"),
                           sc.TurboDense(4))
    elif name == "lstnet":
        c = models.lstnet(20, 10)
    else:  # network 2 of issue 14 without its Dropout
        c = sc.SimpleChain(784, sc.TurboDense(128, "relu"), sc.TurboDense(10))
    return sc.SimpleChain(c.input_shape, *c.layers, registers=registers)


@numba.njit
def _keep_alive(p, g, work):
    pass


@numba.njit
def _carray(a, shape):
    return a


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["lenet5", "mnist_mlp", "cifar_dense", "tpa_lstm", "lstnet",
                                        "matexp"], default="lenet5")
    ap.add_argument("--block", type=int, default=None,
                    help="samples per block (default: the compiler's choice for the budget)")
    ap.add_argument("--registers", type=int, choices=[16, 32], default=vector_registers(),
                    help="register budget (default: this CPU's, 32 with AVX-512)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=2048, help="samples per timed run")
    a = ap.parse_args(argv)
    chain, dt = model(a.model, a.registers), np.dtype(a.dtype)
    B = a.block or choose_block_size(chain.input_shape, chain.layers, dt.itemsize, a.registers)
    plan = plan_chain(chain.input_shape, chain.layers, B)
    funcs = _Functions()
    # the training kernels' steps (the first layer's forward from the input rows, if so)
    fwd = _forward_lines(plan, dt, True, funcs, chain.options,
                         rows_in=forward_reads_rows(plan, chain.options))
    pull, _ = _pullback_lines(plan, dt, False, funcs, chain.options)
    ns = dict(np=np, math=math, tanh_f32=tanh_f32, tanh_f64=tanh_f64, like=like,
              gelu_grad=gelu_grad, silu_grad=silu_grad, carray=_carray, keep_alive=_keep_alive,
              N_PARAMS=plan.n_params, WORK_SIZE=plan.work_size, N_STATE=max(plan.n_state, 1),
              META_SIZE=plan.meta_size)
    simd = _simd64 if vector_bytes(a.registers) == 64 else _simd  # as codegen imports them
    for slot in plan.slots:  # the kernels the generated steps call, as codegen imports them
        for mod, names in slot.layer.kernel_imports.items():
            m = importlib.import_module(mod)
            ns.update({n: getattr(m, n) for n in names})
    ns.update({k: getattr(simd, k) for k in simd.__all__})
    for d in funcs.defs:
        exec(d, ns)  # noqa: S102 - the library's own generated code
    opts = dict(fastmath=True, error_model="numpy")
    steps = {n: numba.njit(**opts)(ns[f"_py_{n}"]) for n in funcs.names}
    rng = np.random.default_rng(0)
    p = (0.1 * rng.standard_normal(plan.n_params)).astype(dt)
    g = np.zeros_like(p)
    work = rng.standard_normal(plan.work_size).astype(dt)
    if plan.rows_off >= 0:  # the rows dW reads its row count there (the loaders write it)
        work[plan.rows_off + B * plan.rows_ld] = B
    state, meta = np.zeros(max(plan.n_state, 1), dt), np.zeros(plan.meta_size, np.int64)
    order = list(fwd) + list(pull)
    for name in order:  # compile, and leave every step's inputs as a real pass leaves them
        steps[name](p, g, work, state, meta)
    nblk = max(1, a.samples // B)
    print(f"{a.model}, B = {B}, {a.dtype}, registers {a.registers}: ms per {nblk * B} samples")
    total = 0.0
    for name in order:
        f, best = steps[name], math.inf
        for _ in range(a.repeats):
            t = time.perf_counter()
            for _ in range(nblk):
                f(p, g, work, state, meta)
            best = min(best, time.perf_counter() - t)
        total += best
        print(f"  {name:32s} {best * 1e3:8.3f}")
    print(f"  {'sum':32s} {total * 1e3:8.3f}")


if __name__ == "__main__":
    main()
