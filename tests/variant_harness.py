"""Runs a chain's generated layer steps in plain Python, and lists the variants they use.

The variant tests (test_variants.py) compare every tuned emitter variant with the
reference emitters (smallchains/layers/reference.py) at every remainder size. Compiling
each of those thousands of shapes would take hours, so the sweep runs the *generated
source* of both in the Python interpreter: the step functions the compiler would hand to
numba, with the explicit-vector intrinsics of smallchains._simd replaced by numpy slices
of the same width. That checks the emitters' index arithmetic, tiling and remainder logic
exactly as written. What only the compiler can break (the dead-store bug behind the wrong
gelu/silu gradients was one) is checked by the compiled half of the tests, on a smaller
set of shapes that still meets every variant.

The workspace is filled with NaN before every call, so a step that reads something it
did not write in the same call (a zero border assumed from allocation, scratch from an
earlier block) shows up as NaN.
"""

from __future__ import annotations

import importlib
import math

import numpy as np

import smallchains as sc
from smallchains._fastmath import tanh_f32, tanh_f64
from smallchains._numba_utils import like
from smallchains._simd import lanes, vector_bytes
from smallchains.activations import gelu_grad, silu_grad
from smallchains.compiler.codegen import _forward_lines, _Functions, _pullback_lines, forward_reads_rows, plan_chain
from smallchains.compiler.runtime import load_rows, load_rows_major, store_rows
from smallchains.layers.conv import Conv, conv_variants
from smallchains.layers.attention import TemporalPatternAttention
from smallchains.layers.dense import TurboDense, delta_pass_variant, dense_variants
from smallchains.layers.recurrent import LSTM, sequence_variant


# --- numpy stand-ins for smallchains._simd / _simd64 (the same lane counts) -------------

def _lanes(dtype, registers=16):
    return lanes(np.dtype(dtype).itemsize, registers)


def width_functions(registers):
    """``vload``, ``vsplat`` of the vectors of a ``registers`` budget (32 or 64 bytes)."""
    def vload(arr, i):
        n = _lanes(arr.dtype, registers)
        assert i >= 0 and i + n <= arr.size, "vload out of bounds"
        return arr[i:i + n].copy()

    def vsplat(x):
        return np.full(_lanes(x.dtype, registers), x, dtype=x.dtype)
    return dict(vload=vload, vsplat=vsplat)


def vstore(arr, i, v):
    assert i >= 0 and i + v.size <= arr.size, "vstore out of bounds"
    arr[i:i + v.size] = v


def vfma(a, b, c):
    return a * b + c


def vadd(a, b):
    return a + b


def vsub(a, b):
    return a - b


def vmul(a, b):
    return a * b


def vrelu(v):
    return np.where(v < 0, v.dtype.type(0), v)


def vrelu_grad(g, a):
    return np.where(a > 0, g, g.dtype.type(0))


def vsum(v):
    return v.sum(dtype=v.dtype)


def vsum4(*c):
    return np.array([x.sum(dtype=x.dtype) for x in c], dtype=c[0].dtype)


vsum8 = vsum4


def vadd_into(arr, i, v, first, count):
    assert i >= 0 and i + count <= arr.size, "vadd_into out of bounds"
    arr[i:i + count] += v[first:first + count]


def _carray(ptr, shape):
    assert ptr.shape == shape, f"step view {shape} over an array of shape {ptr.shape}"
    return ptr


_NAMESPACE = dict(np=np, math=math, tanh_f32=tanh_f32, tanh_f64=tanh_f64, like=like,
                  gelu_grad=gelu_grad, silu_grad=silu_grad, carray=_carray,
                  keep_alive=lambda p, g, work: None, vstore=vstore,
                  vfma=vfma, vadd=vadd, vsub=vsub, vmul=vmul, vrelu=vrelu, vrelu_grad=vrelu_grad, vsum=vsum,
                  vsum4=vsum4, vsum8=vsum8, vadd_into=vadd_into)


def _layer_kernels(plan):
    """The compiled kernels the layers' steps call (their ``kernel_imports``, the
    recurrent loop nests among them), except the vector functions replaced above."""
    out = {}
    for slot in plan.slots:
        for mod, names in slot.layer.kernel_imports.items():
            if mod != "smallchains._simd":
                m = importlib.import_module(mod)
                out.update((n, getattr(m, n)) for n in names)
    return out


class InterpretedChain:
    """The layer steps of ``chain`` (tuned or reference per ``chain.options``) for blocks of
    ``B`` samples of ``dtype``, run in Python. Same plan, offsets and step code as the
    compiled kernels; the block loop mirrors the generated ``valvjp_batch`` and moves rows
    with the library's own ``load_rows`` / ``store_rows``."""

    def __init__(self, chain, dtype, B):
        self.chain, self.dtype, self.B = chain, np.dtype(dtype), B
        self.plan = plan_chain(chain.input_shape, chain.layers, B)
        funcs = _Functions()
        self.forward = _forward_lines(self.plan, self.dtype, True, funcs, chain.options)
        # the training kernels' forward, if its first layer reads the input rows
        self.forward_rows = (_forward_lines(self.plan, self.dtype, True, funcs, chain.options,
                                            rows_in=True)
                             if forward_reads_rows(self.plan, chain.options) else None)
        self.pull_x, self.gx_off = _pullback_lines(self.plan, self.dtype, True, funcs, chain.options)
        self.pull_train, _ = _pullback_lines(self.plan, self.dtype, False, funcs, chain.options)
        ns = dict(_NAMESPACE, **width_functions(chain.options.registers),
                  **_layer_kernels(self.plan),
                  N_PARAMS=self.plan.n_params, WORK_SIZE=self.plan.work_size,
                  N_STATE=max(self.plan.n_state, 1), META_SIZE=self.plan.meta_size)
        for d in funcs.defs:
            exec(d, ns)  # noqa: S102 - our own generated code
        self.steps = {name: ns[f"_py_{name}"] for name in funcs.names}
        self.steps_source = dict(zip(funcs.names, funcs.defs))

    def valvjp(self, X, p, Ybar, with_gx=True):
        """``(Y, Xbar, pbar)`` for rows of ``X (n, n_in)`` and ``Ybar (n, n_out)``. Without
        ``with_gx`` the first layer's pullback runs as in training (no dL/dx) and ``Xbar``
        is None; so does the forward: from the input rows alone if the training kernels'
        does (``forward_rows``; the feature-major input block then stays NaN)."""
        plan, B, dt = self.plan, self.B, self.dtype
        n = X.shape[0]
        X, Ybar = X.reshape(n, -1), Ybar.reshape(n, -1)
        out_off = plan.slots[-1].out_off
        Y = np.empty((n, plan.n_out), dt)
        Xbar = np.empty((n, plan.n_in), dt) if with_gx else None
        pbar = np.zeros(plan.n_params, dt)
        work = np.full(plan.work_size, np.nan, dt)
        state = np.full(max(plan.n_state, 1), np.nan, dt)  # no layer here reads them
        meta = np.full(plan.meta_size, -7, np.int64)
        pull = self.pull_x if with_gx else self.pull_train
        for s0 in range(0, n, B):
            nb = min(B, n - s0)
            work[:] = np.nan
            forward = self.forward
            if self.forward_rows is not None and not with_gx:  # as the training kernels
                forward = self.forward_rows
                load_rows_major(X, s0, nb, work, plan.rows_off, plan.rows_ld, plan.n_in, B)
            else:
                load_rows(X, s0, nb, work, 0, plan.n_in, B)
            for step in forward:
                self.steps[step](p, p, work, state, meta)
            store_rows(Y, s0, nb, work, out_off, plan.n_out, B)
            load_rows(Ybar, s0, nb, work, plan.grad_a, plan.n_out, B)
            if plan.rows_off >= 0:  # the input rows, sample-major (a wide first dense layer)
                load_rows_major(X, s0, nb, work, plan.rows_off, plan.rows_ld, plan.n_in, B)
            for step in pull:
                self.steps[step](p, pbar, work, state, meta)
            if with_gx:
                store_rows(Xbar, s0, nb, work, self.gx_off, plan.n_in, B)
        return Y, Xbar, pbar


# --- which variants a chain uses -----------------------------------------------------

def variants(chain, dtype, B) -> set:
    """Labels of the tuned variants ``chain``'s layers get for blocks of ``B`` samples of
    ``dtype`` with the chain's register budget, e.g. ``("dense.dw", "tiles 2x4")``."""
    dt = f"np.{np.dtype(dtype).name}"
    regs = chain.options.registers
    w = f" {vector_bytes(regs)}B"  # explicit vectors: 32-byte (ymm) or 64-byte (zmm) code

    def vec(kind):
        return kind + w if kind.startswith("vector") else kind
    plan = plan_chain(chain.input_shape, chain.layers, B)
    rows_slot = plan.rows_slot
    out = set()
    for i, (layer, (ins, outs)) in enumerate(zip(chain.layers, chain._shapes)):
        if isinstance(layer, TurboDense):
            v = dense_variants(ins[0], layer.out, B, dt, regs, rows=i == rows_slot)
            if i == rows_slot and forward_reads_rows(plan, chain.options):  # the training forward
                out.add(("dense.forward", "rows" + w))
            out |= {("dense.forward", vec(v.forward)), ("dense.dx", vec(v.dx)),
                    ("dense.dw", v.dw + w * (v.dw in ("vector", "rows")) if v.dw != "tiles"
                     else f"tiles {v.dw_tile[0]}x{v.dw_tile[1]}")}
            if layer.activation.name == "relu" and v.dw != "tiles":  # dW after a delta pass
                out.add(("relu delta pass", vec(delta_pass_variant(layer.activation, B, dt, regs))))
        elif isinstance(layer, Conv):
            v = conv_variants(B, dt, regs, layer.activation)
            if layer.activation.name == "relu":
                row = outs[1] * outs[2] * B
                out.add(("relu delta pass", vec(delta_pass_variant(layer.activation, row, dt, regs))))
            out |= {("conv.forward", vec(v.forward + (" relu-in-registers" if v.relu_in_registers else ""))),
                    ("conv.weight_grad", f"{vec(v.weight_grad)} co-tile {v.wgrad_co_tile}"),
                    ("conv.input_grad", f"vector{w} tile {v.input_grad_tile[0]}x{v.input_grad_tile[1]}"
                     if v.input_grad == "vector" else f"scalar taps {min(v.corr_taps, 1024)}")}
        elif isinstance(layer, (LSTM, TemporalPatternAttention)):
            name = "lstm" if isinstance(layer, LSTM) else "tpa"
            out.add((name, vec(sequence_variant(B, dt, regs))))
    return out


def all_variants() -> set:
    """Every label :func:`variants` can produce (for both register budgets and dtypes)."""
    out = {("dense.forward", "scalar"), ("dense.dx", "scalar"), ("dense.dw", "transposed"),
           ("relu delta pass", "scalar"), ("conv.forward", "scalar"),
           ("lstm", "reference"), ("tpa", "reference")}
    for regs in (16, 32):
        w = f" {vector_bytes(regs)}B"
        out |= {("dense.forward", "vector" + w), ("dense.dx", "vector" + w), ("dense.dw", "vector" + w),
                ("dense.forward", "vector1" + w), ("dense.dx", "vector1" + w),
                ("dense.dw", "rows" + w), ("relu delta pass", "vector" + w),
                *([("dense.forward", "rows" + w)] if sc.layers.dense.rows_forward(regs, 32) else []),
                ("conv.forward", "vector" + w), ("conv.forward", "vector relu-in-registers" + w),
                ("lstm", "vector" + w), ("tpa", "vector" + w)}
        for n_in in (1, 8):
            to, ti = sc.layers.dense.dw_tile(n_in, regs)
            out.add(("dense.dw", f"tiles {to}x{ti}"))
        v = conv_variants(1, "np.float32", regs, sc.get_activation("relu"))
        out |= {("conv.weight_grad", f"vector{w} co-tile {v.wgrad_co_tile}"),
                ("conv.weight_grad", f"scalar co-tile {v.wgrad_co_tile}"),
                ("conv.input_grad", f"scalar taps {v.corr_taps}"),
                ("conv.input_grad", f"vector{w} tile {v.input_grad_tile[0]}x{v.input_grad_tile[1]}")}
    return out


def block_sizes(dtype, default, registers=16) -> list:
    """The block sizes that reach each remainder and variant under a budget of
    ``registers`` (its vectors: 32 or 64 bytes): 1, lanes - 1, lanes, lanes + 1, two
    vectors (the explicit-vector tiles; dW transposed at 64 bytes per feature), three
    vectors (the dense one-vector tiles, looping), three vectors + 1 (scalar code with
    register-tiled dW), four vectors (vector dW), and the chain's default."""
    V = _lanes(dtype, registers)
    return sorted({1, V - 1, V, V + 1, 2 * V, 3 * V, 3 * V + 1, 4 * V, default})


def rel_err(a, b) -> float:
    """Norm-wise relative error ``max|a - b| / max|b|`` (0 for two zero arrays); NaN
    anywhere counts as infinite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape} != {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    scale = np.abs(b).max(initial=0.0)
    diff = np.abs(a - b).max(initial=0.0)
    return diff / scale if scale > 0 else diff


def tolerance(chain, dtype, n) -> float:
    """Norm-wise relative tolerance for comparing two evaluations of ``chain`` that differ
    in summation order: float64 1e-12 (as the issue asks); float32 ``8 eps K`` with ``K``
    the sum over layers of the longest reduction each computes (inputs per output, outputs
    per input gradient, ``n`` samples times output pixels per weight gradient), the usual
    ``K eps`` bound of a length-``K`` sum with a safety factor for the chain's conditioning."""
    if np.dtype(dtype) == np.float64:
        return 1e-12
    K = 0
    for layer, (ins, outs) in zip(chain.layers, chain._shapes):
        if isinstance(layer, TurboDense):
            K += max(ins[0], layer.out, n)
        elif isinstance(layer, Conv):
            kh, kw = layer.kernel_size
            K += max(ins[0] * kh * kw, outs[0] * kh * kw, n * outs[1] * outs[2])
        elif isinstance(layer, LSTM):  # gates over F + H terms, dW over T steps of n samples
            T, F = ins
            K += max(F + layer.hidden, 4 * layer.hidden, n * T) * T  # errors carried over T steps
        elif isinstance(layer, TemporalPatternAttention):
            T, m = ins
            K += max(T * m, layer.filters * m, n * m)
        # MaxPool and Flatten reduce nothing: their results must match exactly
    return 8 * float(np.finfo(np.float32).eps) * K
