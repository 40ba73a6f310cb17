"""Chain -> Python source of fused numba kernels -> imported, disk-cached module.

For a chain, a dtype and (optionally) a loss, :func:`generate_source` writes one Python
module whose functions call the layers' block kernels with every size and offset as a
literal, so LLVM sees fixed trip counts and folds the activation dispatch. The module is
written under :func:`smallchains._config.cache_dir` with a name derived from a hash of its
source (which includes the library version and a hash of the kernel sources) and imported;
its functions use ``cache=True``, so numba's on-disk cache serves later processes (numba
cannot cache code built with ``exec``; a real file can, see numba issue #3501).

Generated functions (all take ``p`` as an argument; nothing chain-specific is a closure):

``forward_range(X, idx, lo, hi, p, state, work, meta, Y)``
    rows ``idx[lo:hi]`` of ``X`` -> the same rows of ``Y``, block by block (inference).
``valgrad_range_<loss>(X, T, idx, lo, hi, p, g, state, work, meta, scale, gx) -> float``
    overwrites ``g`` with ``scale * dL/dp`` of rows ``idx[lo:hi]`` (training mode);
    returns ``scale * loss sum``. ``gx`` is unused: the first layer's input gradient is
    not even compiled (training never needs it).
``valgrad_x_range_<loss>(...)``
    the same, and also overwrites rows ``idx[lo:hi]`` of ``gx`` with ``scale * dL/dx``.
``loss_range_<loss>(X, T, idx, lo, hi, p, state, work, meta, scale) -> float``
    loss only (inference).
``forward_batch``, ``vjp_batch``, ``valvjp_batch`` (and in the ``B = 1`` module
``forward_single``, ``vjp_single``, ``valvjp_single``)
    the embedding kernels of :meth:`SimpleChain.kernels` (inference mode).

Mode: if some layer computes differently in training and inference (Dropout), the
module also has the other mode of each range kernel, named with the suffix ``_train``
(``forward_range_train``, ``loss_range_<loss>_train``) or ``_infer``
(``valgrad_range_<loss>_infer``, ``valgrad_x_range_<loss>_infer``), and
``plan.mode_dependent`` is True. For all other chains both modes are the same code and
only the names above exist.

``state`` is the chain's layer state outside ``p`` (``plan.n_state`` elements; a dummy
when it has none). ``meta`` is the calling thread's int64 row of ``plan.meta_size``
elements: ``meta[0]`` the random key (seed), ``meta[1]`` the optimizer step, ``meta[2]``
the stage of a batch-statistics pass (below), set by the caller; the range kernels write
``meta[3 + s]``, the dataset row of lane ``s`` of the current block (-1 for a padding
lane). Random layers read them (:mod:`smallchains.layers.dropout`). The last element,
``meta[3 + B]``, is 0 unless the caller has already zeroed the gradient ``g``: the
``valgrad`` range kernels then accumulate into it without zeroing it first (the training
step's split sum zeroes each gradient row's slice right after reading it, see
:func:`smallchains.compiler.loops._step`).

Nothing parallel is generated: :mod:`smallchains.compiler.loops` holds the threaded
drivers and training loops once for all chains and receives these range kernels as
function pointers. The kernels call each layer's block code ("layer steps", one small
C function per layer forward / pullback) through the module's step table, see
:mod:`smallchains.compiler.linking`; the kernels themselves are module attributes served
by the module's ``__getattr__``, which binds those steps first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from .. import _config
from ..layers.base import STEP_BREAK, EmitContext
from .options import KernelOptions, kernel_options
from .._simd import lanes, vector_bytes

#: Bytes of per-thread block workspace aimed for (fits in L2 alongside the weights).
TARGET_BLOCK_BYTES = 64 * 1024
MAX_BLOCK = 256
MIN_BLOCK = 16


@dataclass
class LayerSlot:
    layer: object
    in_shape: tuple
    out_shape: tuple
    p_off: int
    n_params: int
    in_off: int = 0
    out_off: int = 0
    saved_off: int = 0
    state_off: int = 0
    n_state: int = 0
    red_off: int = 0  # per-thread partial sums of a batch-statistics layer (in work)
    scratch_off: int = 0  # its batch statistics of the current step (in state)


@dataclass
class ChainPlan:
    """Static layout of a chain for one block size: parameter offsets and workspace."""

    input_shape: tuple
    output_shape: tuple
    slots: list
    n_params: int
    B: int
    work_size: int = 0
    grad_a: int = 0
    grad_b: int = 0
    n_state: int = 0
    #: True if some layer computes differently in training and inference (set by
    #: generate_source): the module then has both modes of its range kernels
    mode_dependent: bool = False
    #: state elements after the layers' persistent state: batch statistics of one step
    n_scratch: int = 0
    #: slot indices of the layers with batch statistics in training (BatchNorm)
    reducing: tuple = ()
    red_lo: int = 0
    red_hi: int = 0
    loss_slot: int = 0
    #: the slot whose weight gradient reads the input rows sample-major (a wide first
    #: dense layer, see TurboDense.input_rows_stride) and their offset in work; -1 if none
    rows_slot: int = -1
    rows_off: int = -1
    rows_ld: int = 0  # elements from one row to the next there
    #: names of the module's layer steps in slot order (set by generate_source)
    step_names: list = field(default_factory=list)

    @property
    def n_stages(self) -> int:
        """Reduction stages before a training step: forward and backward per reducing layer."""
        return 2 * len(self.reducing)

    @property
    def meta_size(self) -> int:
        """Elements of a thread's ``meta`` row: key, step, stage, one row index per lane,
        the caller's "g is zero" flag."""
        return 4 + self.B

    @property
    def n_in(self) -> int:
        return prod(self.input_shape)

    @property
    def n_out(self) -> int:
        return prod(self.output_shape)


def _shapes(input_shape, layers):
    slots, shape, off, soff = [], tuple(input_shape), 0, 0
    for layer in layers:
        out = tuple(layer.output_shape(shape))
        n = layer.n_params(shape)
        ns = layer.n_state(shape)
        slots.append(LayerSlot(layer, shape, out, off, n, state_off=soff, n_state=ns))
        shape, off, soff = out, off + n, soff + ns
    return slots, shape, off


def choose_block_size(input_shape, layers, itemsize, registers=16) -> int:
    """Samples per block: about :data:`TARGET_BLOCK_BYTES` of workspace per block, clipped
    to [MIN_BLOCK, MAX_BLOCK], a multiple of 16 and of two vectors (the explicit-vector
    tiles' step: 32 float32 samples with the 64-byte vectors of a 32-register budget)."""
    step = max(16, 2 * lanes(itemsize, registers))
    slots, _, _ = _shapes(input_shape, layers)
    per_sample = prod(input_shape) + sum(
        prod(s.out_shape) + s.layer.saved_size(s.in_shape) for s in slots
    )
    per_sample += 2 * max([prod(input_shape)] + [prod(s.out_shape) for s in slots])
    b = TARGET_BLOCK_BYTES // (per_sample * itemsize)
    b = max(MIN_BLOCK, min(MAX_BLOCK, b))
    return int(max(step, b // step * step))


def _input_rows(slots, B):
    """``(slot, stride)`` of the first layer reading the chain's input (past layers that
    alias it) if that layer wants the input rows sample-major at blocks of ``B``
    (``input_rows_stride``, a dense layer taking dW from them), else ``(-1, 0)``."""
    for i, s in enumerate(slots):
        wants = getattr(s.layer, "input_rows_stride", None)
        ld = wants(s.in_shape, B) if wants is not None else 0
        if ld:
            return i, ld
        if not getattr(s.layer, "aliases_input", False):
            break
    return -1, 0


def takes_input_rows(input_shape, layers, B) -> bool:
    """Whether the chain's first layer takes its weight gradient from the input rows at
    blocks of ``B`` (a wide first dense layer, :func:`~smallchains.layers.dense.rows_dw`)."""
    return _input_rows(_shapes(input_shape, layers)[0], B)[1] > 0


def plan_chain(input_shape, layers, B: int) -> ChainPlan:
    """Lay out parameters and the per-thread workspace of ``B``-sample blocks."""
    slots, out_shape, n_params = _shapes(input_shape, layers)
    off = B * prod(input_shape)
    cur = 0  # offset of the current activation
    maxf = prod(input_shape)
    for s in slots:
        s.in_off = cur
        if getattr(s.layer, "aliases_input", False):
            s.out_off = cur
        else:
            s.out_off = off
            off += B * prod(s.out_shape)
        s.saved_off = off
        off += B * s.layer.saved_size(s.in_shape)
        cur = s.out_off
        maxf = max(maxf, prod(s.out_shape))
    # the input rows, sample-major, for the first layer reading the input if it wants them
    rows_slot, rows_ld = _input_rows(slots, B)
    rows_off = -1
    if rows_ld:  # the rows, then their count (see load_block_rows), 16 elements for it
        rows_off = off
        off += B * rows_ld + 16
    grad_a, grad_b = off, off + B * maxf
    off += 2 * B * maxf
    # per-thread partial sums of the layers with batch statistics, and their batch
    # statistics after the state proper
    red_lo, reducing = off, []
    n_state = sum(s.n_state for s in slots)
    scratch = n_state
    for i, s in enumerate(slots):
        if getattr(s.layer, "reduces_batch", False):
            reducing.append(i)
            s.red_off, s.scratch_off = off, scratch
            off += s.layer.reduce_size(s.in_shape)
            scratch += s.layer.scratch_size(s.in_shape)
    loss_slot = off  # the loss of a staged step, kept between stages
    off += 1
    # a multiple of 16 elements, so each row of a (threads, work_size) array stays aligned
    work_size = -(-off // 16) * 16
    return ChainPlan(tuple(input_shape), out_shape, slots, n_params, B, work_size, grad_a, grad_b,
                     n_state, n_scratch=scratch - n_state, reducing=tuple(reducing), red_lo=red_lo,
                     red_hi=loss_slot, loss_slot=loss_slot, rows_slot=rows_slot, rows_off=rows_off, rows_ld=rows_ld)


def _ctx(plan: ChainPlan, i: int, dtype, options: KernelOptions, **kw) -> EmitContext:
    s = plan.slots[i]
    return EmitContext(
        in_shape=s.in_shape, out_shape=s.out_shape, p_off=s.p_off,
        in_off=s.in_off, out_off=s.out_off, saved_off=s.saved_off, B=plan.B,
        layer_index=i, state_off=s.state_off, red_off=s.red_off, scratch_off=s.scratch_off,
        dt=f"np.{np.dtype(dtype).name}", registers=options.registers,
        rows_off=plan.rows_off if i == plan.rows_slot else -1,
        rows_ld=plan.rows_ld if i == plan.rows_slot else 0, **kw,
    )


def emit_layer_forward(layer, ctx, options: KernelOptions) -> list:
    """A layer's forward lines: tuned, or its reference with ``kernels="reference"``."""
    return layer.emit_forward_reference(ctx) if options.reference else layer.emit_forward(ctx)


def emit_layer_pullback(layer, ctx, options: KernelOptions) -> list:
    """A layer's pullback lines: tuned, or its reference with ``kernels="reference"``."""
    return layer.emit_pullback_reference(ctx) if options.reference else layer.emit_pullback(ctx)


class _Functions:
    """Collects one small function per layer step. numba's front end (SSA, reaching
    definitions, typing) grows much faster than linearly with function size: LeNet5 as ONE
    function spent ~49 s in the front end; split per layer it is a sum of small compiles.
    Each step becomes a C function over raw pointers that the kernels call through the
    module's step table (:mod:`smallchains.compiler.linking`), so it is compiled once."""

    def __init__(self):
        self.defs, self._seen, self.names, self.calls = [], {}, [], {}

    def add(self, name, uses_g, lines):
        """Define step ``name`` (``lines`` use the arrays ``p``, ``work``, if ``uses_g``
        ``g``, and if they name them ``state`` and ``meta``) and return its name (that of
        an identical earlier step if there is one)."""
        key = "\n".join(lines)
        if key in self._seen:  # identical code (e.g. train/infer forward): reuse
            return self._seen[key]
        views = ["p = carray(p_, (N_PARAMS,))"]
        views += ["g = carray(g_, (N_PARAMS,))"] if uses_g else []
        views += ["work = carray(work_, (WORK_SIZE,))"]
        views += ["state = carray(state_, (N_STATE,))"] if re.search(r"\bstate\b", key) else []
        views += ["meta = carray(meta_, (META_SIZE,))"] if re.search(r"\bmeta\b", key) else []
        # keep_alive: numba's dead-code elimination must not drop the last stores into the
        # views (see smallchains.compiler.linking.keep_alive); steps never write state or meta
        end = [f"keep_alive(p, {'g' if uses_g else 'p'}, work)"]
        self.defs.append(f"def _py_{name}(p_, g_, work_, state_, meta_):\n"
                         + _indent(views + lines + end) + "\n")
        self.calls[name] = (f'call_step(@TABLE@, {len(self.names)}, p, {"g" if uses_g else "p"}, '
                            f'work, state, meta)  # {name}')
        self._seen[key] = name
        self.names.append(name)
        return name

    def add_steps(self, name, uses_g, lines):
        """:meth:`add` for each part of ``lines`` between :data:`STEP_BREAK` lines (a
        container layer's sub-layers each get their own function); the names in order."""
        parts, cur = [], []
        for ln in lines:
            if ln == STEP_BREAK:
                parts.append(cur)
                cur = []
            else:
                cur.append(ln)
        parts = [q for q in parts + [cur] if q]
        if len(parts) == 1:
            return [self.add(name, uses_g, parts[0])]
        return [self.add(f"{name}_{k}", uses_g, q) for k, q in enumerate(parts)]

    def run(self, steps, n=4):
        """Kernel lines running ``steps`` in order, indented by ``n``. An item
        ``("stage", j, step)`` runs ``step`` and skips the rest of the block when the
        kernel's ``stage`` is ``j`` (see :func:`_forward_lines`)."""
        lines = []
        for step in steps:
            if isinstance(step, tuple):
                _, j, name = step
                lines += [f"if stage == {j}:", "    " + self.calls[name], "    continue"]
            else:
                lines.append(self.calls[step])
        return _indent(lines, n)

    def shared_source(self, steps_from, same_steps):
        """A loss module's stand-in for :meth:`source`: no step definitions or table, the
        name of the module whose steps the kernels call, and for each kernel the kernel of
        that module that runs the same steps."""
        lines = [f"    {k!r}: {v!r}," for k, v in sorted(same_steps.items())]
        return (f"_STEPS_FROM = {steps_from!r}  # the module whose layer steps these kernels call\n"
                + "_SAME_STEPS = {\n" + "\n".join(lines) + "\n}\n\n\n"
                + "def __getattr__(name):\n    return _resolve_shared(globals(), name)\n")

    def source(self, deps):
        """The step definitions, the step table and the kernels' ``_DEPS``."""
        layers = ", ".join(f"{n!r}: ({i}, _py_{n})" for i, n in enumerate(self.names))
        dep_lines = [f"    {k!r}: {tuple(dict.fromkeys(v))!r}," for k, v in sorted(deps.items())]
        return ("\n\n".join(self.defs) + f"\n\n_LAYERS = {{{layers}}}  # step: (slot, function)\n"
                + '_TABLE = StepTable(@TABLE@, globals())\n'
                + "_DEPS = {\n" + "\n".join(dep_lines) + "\n}\n\n\n"
                + "def __getattr__(name):\n    return _resolve(globals(), name)\n")


def forward_reads_rows(plan, options) -> bool:
    """Whether the valgrad kernels give the input rows to the first layer's forward too
    (it computes from them, ``forward_from_rows``), so that they load no feature-major
    input block: tuned kernels of a chain without batch statistics whose rows slot
    (:func:`_input_rows`) wants it."""
    if plan.rows_slot < 0 or plan.reducing or options.reference:
        return False
    wants = getattr(plan.slots[plan.rows_slot].layer, "forward_from_rows", None)
    return wants is not None and wants(options.registers, plan.B)


def _forward_lines(plan, dtype, training, funcs, options, stages=False, rows_in=False):
    """Names of the forward steps, in order. With ``stages`` (training kernels of a chain
    with batch statistics), before the forward step of the ``j``-th reducing layer an item
    ``("stage", j, its batch-statistics step)``: in stage ``j`` a block goes no further.
    With ``rows_in`` the rows slot's forward reads the input rows (see
    :func:`forward_reads_rows`)."""
    steps = []
    for i, s in enumerate(plan.slots):
        rows = rows_in and i == plan.rows_slot
        ctx = _ctx(plan, i, dtype, options, training=training, rows_in=rows)
        if stages and i in plan.reducing:
            name = funcs.add(f"layer{i}_batch_stats", False, s.layer.emit_batch_stats(ctx))
            steps.append(("stage", plan.reducing.index(i), name))
        lines = emit_layer_forward(s.layer, ctx, options)
        if lines:
            name = f"layer{i}_forward{'_train' if training else ''}{'_rows' if rows else ''}"
            steps += funcs.add_steps(name, False, lines)
    return steps


def _pullback_lines(plan, dtype, first_need_gin, funcs, options, training=True, stages=False):
    """Pullback steps in reverse order; returns (step names, offset of dL/dx). The first layer
    computes dL/dx only if ``first_need_gin``: training never needs it, and leaving it out
    saves its compile (a convolution's input gradient is its costliest part). With
    ``stages``, before the pullback of a reducing layer the item of its gradient-statistics
    stage (``m + (m - 1 - j)`` for the ``j``-th of ``m``: the last layer first)."""
    steps, gout, gin = [], plan.grad_a, plan.grad_b
    for i in reversed(range(len(plan.slots))):
        s = plan.slots[i]
        need = first_need_gin if i == 0 else True
        if getattr(s.layer, "aliases_input", False):
            continue  # output is the input: dL/dx = dL/dy, nothing to do
        ctx = _ctx(plan, i, dtype, options, gout_off=gout, gin_off=gin, need_gin=need,
                   training=training)
        if stages and i in plan.reducing:
            m = len(plan.reducing)
            name = funcs.add(f"layer{i}_grad_stats", False, s.layer.emit_grad_stats(ctx))
            steps.append(("stage", m + (m - 1 - plan.reducing.index(i)), name))
        lines = emit_layer_pullback(s.layer, ctx, options)
        if lines:
            name = f"layer{i}_pullback{'_gx' if i == 0 and need else ''}{'' if training else '_infer'}"
            steps += funcs.add_steps(name, True, lines)
        gout, gin = gin, gout
    return steps, gout


def _names(steps):
    """The step names of a list of :func:`_forward_lines` / :func:`_pullback_lines` items."""
    return [st[2] if isinstance(st, tuple) else st for st in steps]


def _segments(items):
    """Split a staged step list at its ``("stage", j, step)`` items: ``[(steps, item)]``,
    the last with item None."""
    out, cur = [], []
    for it in items:
        if isinstance(it, tuple):
            out.append((cur, it))
            cur = []
        else:
            cur.append(it)
    out.append((cur, None))
    return out


def _staged_prelude(plan, funcs, vfwd, pull, loss_kernel, out_off, store_gx):
    """Start of the training valgrad kernel of a chain with batch statistics: read the
    stage, zero the partial sums, and, when ``work`` holds one workspace per block of the
    thread's rows (``work.shape[0] >= nblocks * WORK_SIZE``, see
    :meth:`smallchains.SimpleChain._workspace`), run the stage by resuming every block
    from where the previous stage left its workspace instead of from the input:

    stage ``j < m``: forward from reducing layer ``j - 1`` (or the input) to layer ``j``'s
    input, its statistics; stage ``m``: the rest of the forward pass, the loss (summed in
    ``work[LOSS]``), the pullback down to the last reducing layer's output, its gradient
    statistics; stage ``m + i``: the pullback on to the next reducing layer; stage ``2m``:
    the rest. ``g`` is zeroed in stage ``m`` only (unless the caller has), so it sums over
    the stages. Block ``b`` uses ``work[b * WORK_SIZE:(b + 1) * WORK_SIZE]`` (its own
    partial sums too: the combine kernel merges every slice). Otherwise every stage starts from the input (the
    block loop below)."""
    m = len(plan.reducing)
    fseg, pseg = _segments(vfwd), _segments(pull)
    assert len(fseg) == m + 1 and len(pseg) == m + 1

    def calls(steps, extra=None):
        out = [funcs.calls[st] for st in steps] + ([funcs.calls[extra[2]]] if extra else [])
        return [ln.replace(", work, state, meta)", ", wb, state, meta)") for ln in out]

    def per_block(body):
        return (["    for b in range(nblk):", "        s0 = lo + b * B", "        nb = min(B, hi - s0)",
                 "        wb = work[b * WORK_SIZE:(b + 1) * WORK_SIZE]",
                 "        set_lane_rows(meta, idx, s0, nb, B)"] + ["        " + ln for ln in body])

    lines = ["stage = meta[2]", "nslices = work.shape[0] // WORK_SIZE",
             "for b in range(nslices):", f"    for j in range({plan.red_lo}, {plan.red_hi}):",
             "        work[b * WORK_SIZE + j] = 0",
             "nblk = (hi - lo + B - 1) // B",
             "if nblk <= nslices:  # a workspace per block: resume where the last stage stopped"]
    for j in range(m):
        body = (["load_block(X, idx, s0, nb, wb, 0, N_IN, B)"] if j == 0 else []) + calls(*fseg[j])
        lines += [f"    {'if' if j == 0 else 'elif'} stage == {j}:"] + ["    " + ln for ln in per_block(body)]
    lines += [f"    elif stage == {m}:", "        if meta[META_SIZE - 1] == 0:  # else the caller has",
              "            for j in range(g.shape[0]):  # zeroed g", "                g[j] = 0",
              f"        work[{plan.loss_slot}] = 0"]
    body = (calls(fseg[m][0])
            + [f"work[{plan.loss_slot}] += {loss_kernel}(wb, {out_off}, {plan.grad_a}, T, idx, s0, "
               "N_OUT, B, nb, scale, True)"] + calls(*pseg[0]))
    lines += ["    " + ln for ln in per_block(body)]
    for i in range(1, m):
        lines += [f"    elif stage == {m + i}:"] + ["    " + ln for ln in per_block(calls(*pseg[i]))]
    gx = [store_gx.strip().replace(", work, ", ", wb, ")] if store_gx else []
    rows = ([f"load_block_rows(X, idx, s0, nb, wb, {plan.rows_off}, {plan.rows_ld}, N_IN, B)"]
            if plan.rows_off >= 0 else [])  # the first layer's, whose pullback is last
    lines += ["    else:"] + ["    " + ln for ln in per_block(rows + calls(pseg[m][0]) + gx)]
    lines += [f"        return work[{plan.loss_slot}] * scale", "    return total * scale"]
    return "\n" + _indent(lines)


def _forward_stage_prelude(plan):
    """Start of the training forward and loss kernels of a chain with batch statistics:
    read the stage, zero the partial sums. Stage ``j < m`` runs every block from the input
    to the ``j``-th reducing layer and sums its statistics there; stage ``m`` is the whole
    forward pass with the batch statistics that ``combine`` put into ``state`` (see
    :func:`smallchains.compiler.loops._forward_threads`). Unlike the valgrad kernels', no
    block's workspace is kept between stages: the forward pass is recomputed."""
    return ["stage = meta[2]", f"for j in range({plan.red_lo}, {plan.red_hi}):", "    work[j] = 0"]


def _combine_source(plan, dtype, options):
    """``combine(stage, works, state, update_running)``: the serial part of each reduction
    stage (see :func:`smallchains.compiler.loops._stages`), merging the threads' partial
    sums of the stage's layer into ``state``."""
    m = len(plan.reducing)
    lines = []
    for j, i in enumerate(plan.reducing):
        ctx = _ctx(plan, i, dtype, options)
        layer = plan.slots[i].layer
        lines += [f"if stage == {j}:", "    " + layer.emit_combine_stats(ctx),
                  f"if stage == {m + (m - 1 - j)}:", "    " + layer.emit_combine_grads(ctx)]
    # every thread's row of works holds one or more block workspaces of WORK_SIZE
    lines = [ln.replace("(works, ", "(works, WORK_SIZE, ") for ln in lines]
    imports = sorted({n for i in plan.reducing for n in plan.slots[i].layer.combine_imports})
    mod = type(plan.slots[plan.reducing[0]].layer).__module__
    return (f"\n\nfrom {mod} import {', '.join(imports)}  # noqa: E402\n\n\n@njit(**_J)\n"
            "def _combine(stage, works, state, update_running):\n"
            '    """Merge the threads\' partial sums of reduction stage ``stage`` into state."""\n'
            + _indent(lines) + "\n")


def _indent(lines, n=4):
    return "\n".join(" " * n + ln for ln in lines)


_TEMPLATE = '''\
# Generated by smallchains {version}. Do not edit: regenerated from the chain spec.
# chain: {spec}
# dtype: {dtype}; loss: {loss}; block size B = {B}; kernel-source hash {kernel_hash}
# kernels: {kernels}; vector register budget: {registers}
import math
import numpy as np
from numba import carray, njit, types
from smallchains._config import {cached}JIT_OPTIONS as _J
from smallchains.compiler.linking import (StepTable, call_step, keep_alive, resolve as _resolve,
                                          resolve_shared as _resolve_shared)
from smallchains._fastmath import tanh_f32, tanh_f64
from smallchains._numba_utils import like
from smallchains.activations import gelu_grad, silu_grad
from smallchains.compiler.runtime import (
    check_contiguous, load_block, load_block_and_rows, load_block_checked, load_block_rows, load_rows, load_rows_major, set_lane_rows, store_block, store_rows, sum_rows)
{imports}

B = {B}
N_IN = {n_in}
N_OUT = {n_out}
N_PARAMS = {n_params}
WORK_SIZE = {work_size}
N_STATE = {n_state}
# the layer state's elements: the embedding kernels read it from the end of their work
N_LAYER_STATE = {n_layer_state}
META_SIZE = {meta_size}

# Layer steps: C functions over raw pointers (p, g, work, state, meta), called through the
# step table _TABLE, which is filled on first use of a kernel that calls them
# (module __getattr__ -> smallchains.compiler.linking.resolve).
_STEP_SIG = types.void(types.CPointer(types.{dtype}), types.CPointer(types.{dtype}),
                       types.CPointer(types.{dtype}), types.CPointer(types.{dtype}),
                       types.CPointer(types.int64))
'''

_FORWARD_TEMPLATE = '''

@njit(**_J)
def _forward_range{mode}(X, idx, lo, hi, p, state, work, meta, Y):{prelude}
    for s0 in range(lo, hi, B):
        nb = min(B, hi - s0)
        load_block(X, idx, s0, nb, work, 0, N_IN, B)
        set_lane_rows(meta, idx, s0, nb, B)
{forward}
        store_block(Y, idx, s0, nb, work, {out_off}, N_OUT, B)
'''

_LOSS_TEMPLATE = '''

@njit(**_J)
def _valgrad{x}_range_{kind}{mode}(X, T, idx, lo, hi, p, g, state, work, meta, scale, gx):
    \"\"\"Overwrite g with scale * dL/dp over rows idx[lo:hi]; return scale * loss sum
    (NaN if an input value is NaN or Inf). {gx_doc}\"\"\"
    total = like(scale, 0.0)
    finite = True{prelude}
    if meta[META_SIZE - 1] == 0:  # else the caller has zeroed g
        for j in range(g.shape[0]):
            g[j] = 0
    for s0 in range(lo, hi, B):
        nb = min(B, hi - s0)
        finite &= {load_in}
        set_lane_rows(meta, idx, s0, nb, B)
{forward}
        total += {loss_kernel}(work, {out_off}, {grad_a}, T, idx, s0, N_OUT, B, nb, scale, True)
{pullback}{store_gx}
    # NaN if an input value was not: the loss check of the training step then stops it
    # before its update (smallchains.train_batched names the sample)
    return total * scale if finite else like(scale, np.nan)
'''

_LOSS_ONLY_TEMPLATE = '''

@njit(**_J)
def _loss_range_{kind}{mode}(X, T, idx, lo, hi, p, state, work, meta, scale):
    total = like(scale, 0.0){prelude}
    for s0 in range(lo, hi, B):
        nb = min(B, hi - s0)
        load_block(X, idx, s0, nb, work, 0, N_IN, B)
        set_lane_rows(meta, idx, s0, nb, B)
{forward}
        total += {loss_kernel}(work, {out_off}, {grad_a}, T, idx, s0, N_OUT, B, nb, scale, False)
    return total * scale
'''

_SINGLE_TEMPLATE = '''

@njit(**_J)
def _forward_single(x, p, y, work):
    """One sample: y = chain(x; p). Overwrites y and work; allocates nothing."""
    check_contiguous(p, p, work)
    if x.shape[0] != N_IN or y.shape[0] != N_OUT or p.shape[0] != N_PARAMS or work.shape[0] < WORK_SIZE + N_LAYER_STATE:
        raise ValueError("forward(x, p, y, work) expects x ({n_in},), p ({n_params},), y ({n_out},) "
                         "and work of at least {work_min} elements{state_msg}")
{state_line}
    for f in range(N_IN):
        work[f] = x[f]
{forward_single}
    for f in range(N_OUT):
        y[f] = work[{out_off} + f]


@njit(**_J)
def _valvjp_single(x, p, ybar, y, xbar, pbar, work):
    """One sample: y = chain(x; p) (skipped if y is empty), xbar = ybar^T dy/dx,
    pbar = ybar^T dy/dp (overwritten, not accumulated)."""
    check_contiguous(p, pbar, work)
    if (x.shape[0] != N_IN or ybar.shape[0] != N_OUT or (y.shape[0] != N_OUT and y.shape[0] != 0)
            or xbar.shape[0] != N_IN or p.shape[0] != N_PARAMS or pbar.shape[0] != N_PARAMS
            or work.shape[0] < WORK_SIZE + N_LAYER_STATE):
        raise ValueError("vjp / valvjp expect x, xbar ({n_in},), ybar, y ({n_out},), p, pbar "
                         "({n_params},) and work of at least {work_min} elements{state_msg}")
{state_line}
    for f in range(N_IN):
        work[f] = x[f]
{forward_single}
    if y.shape[0] > 0:
        for f in range(N_OUT):
            y[f] = work[{out_off} + f]
    for f in range(N_OUT):
        work[{grad_a} + f] = ybar[f]
    for j in range(pbar.shape[0]):
        pbar[j] = 0
    g = pbar
{pullback_single}
    for f in range(N_IN):
        xbar[f] = work[{gx_off} + f]


@njit(**_J)
def _vjp_single(x, p, ybar, xbar, pbar, work):
    """One sample: xbar = ybar^T dy/dx, pbar = ybar^T dy/dp (overwritten, not accumulated)."""
    _valvjp_single(x, p, ybar, xbar[:0], xbar, pbar, work)
'''

_BATCH_TEMPLATE = '''

@njit(**_J)
def _forward_batch(X, p, Y, work):
    """Rows of X (n, N_IN) -> rows of Y (n, N_OUT), block by block. Allocates nothing."""
    check_contiguous(p, p, work)
    n = X.shape[0]
    if (X.shape[1] != N_IN or Y.shape[0] != n or Y.shape[1] != N_OUT or p.shape[0] != N_PARAMS
            or work.shape[0] < WORK_SIZE + N_LAYER_STATE):
        raise ValueError("forward_batch(X, p, Y, work) expects X (n, {n_in}), Y (n, {n_out}), "
                         "p ({n_params},) and work of at least {work_min} elements{state_msg}")
{state_line}
    for s0 in range(0, n, B):
        nb = min(B, n - s0)
        load_rows(X, s0, nb, work, 0, N_IN, B)
{forward}
        store_rows(Y, s0, nb, work, {out_off}, N_OUT, B)


@njit(**_J)
def _valvjp_batch(X, p, Ybar, Y, Xbar, pbar, work):
    """Y = chain(X) row-wise; Xbar = Ybar^T dY/dX row-wise; pbar = sum over rows of
    Ybar^T dY/dp. Y, Xbar, pbar overwritten (Y may have 0 rows: then not written)."""
    check_contiguous(p, pbar, work)
    n = X.shape[0]
    want_y = Y.shape[0] > 0
    if (X.shape[1] != N_IN or Ybar.shape[0] != n or Ybar.shape[1] != N_OUT
            or (want_y and (Y.shape[0] != n or Y.shape[1] != N_OUT)) or Xbar.shape[0] != n
            or Xbar.shape[1] != N_IN or p.shape[0] != N_PARAMS or pbar.shape[0] != N_PARAMS
            or work.shape[0] < WORK_SIZE + N_LAYER_STATE):
        raise ValueError("vjp_batch / valvjp_batch expect X, Xbar (n, {n_in}), Ybar and Y (n, {n_out}) "
                         "(Y may have 0 rows), p, pbar ({n_params},) and work of at least "
                         "{work_min} elements{state_msg}")
{state_line}
    for j in range(pbar.shape[0]):
        pbar[j] = 0
    g = pbar
    for s0 in range(0, n, B):
        nb = min(B, n - s0)
        load_rows(X, s0, nb, work, 0, N_IN, B)
{forward}
        if want_y:
            store_rows(Y, s0, nb, work, {out_off}, N_OUT, B)
        load_rows(Ybar, s0, nb, work, {grad_a}, N_OUT, B){load_x_rows}
{pullback}
        store_rows(Xbar, s0, nb, work, {gx_off}, N_IN, B)


@njit(**_J)
def _vjp_batch(X, p, Ybar, Xbar, pbar, work):
    """Xbar = Ybar^T dY/dX row-wise, pbar = sum over rows of Ybar^T dY/dp (overwritten)."""
    _valvjp_batch(X, p, Ybar, Xbar[:0], Xbar, pbar, work)
'''


_kernel_hash_value = None


def kernel_source_hash() -> str:
    """Hash of the library's kernel sources: part of every generated module's name, so a
    library upgrade never reuses stale numba cache entries of inlined kernels."""
    global _kernel_hash_value
    if _kernel_hash_value is None:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            if "datasets" in path.parts or "ode" in path.parts:
                continue
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
        _kernel_hash_value = h.hexdigest()[:16]
    return _kernel_hash_value


def generate_source(input_shape, layers, dtype, B=None, options=None,
                    losses=(), steps_from=None) -> tuple[str, ChainPlan]:
    """Source of the kernel module of a chain: forward kernels plus, for every loss kind
    valgrad and loss kernels, and the embedding kernels (numba compiles each on first use).
    ``options``: a :class:`~smallchains.compiler.options.KernelOptions` (default: tuned
    kernels for the host's register budget). ``losses``: ``(kind, source)`` pairs of
    generated losses (:meth:`smallchains.losses.Loss.kernel_source`), whose kernels the
    module gets beside the built-ins'.

    ``steps_from``: the name of the imported module of the same chain without ``losses``.
    The source is then a *loss module*: only the valgrad and loss kernels of ``losses``
    (and ``combine``), calling that module's layer steps through its step table, so no
    layer code is compiled again (see :func:`smallchains.compiler.linking.resolve_shared`).
    ``plan.step_names`` lists the steps in slot order; the caller checks they are the
    other module's."""
    if options is None:
        options = kernel_options()
    from .. import __version__
    from ..losses import LOSS_KERNELS

    dtype = np.dtype(dtype)
    if B is None:
        B = choose_block_size(input_shape, layers, dtype.itemsize, options.registers)
    plan = plan_chain(input_shape, layers, B)
    shared = steps_from is not None
    imports = {"smallchains.losses": set(LOSS_KERNELS.values())}
    loss_kernels = {} if shared else dict(LOSS_KERNELS)
    loss_kernels.update((kind, f"_loss_block_{kind}") for kind, _ in losses)
    # a loss calling a function no other process can import: no numba disk cache
    cached = "UNCACHED_" if any(_config.UNCACHED_MARK in src for _, src in losses) else ""
    # the 64-byte vector functions under the same names for a 32-register budget
    simd = "smallchains._simd64" if vector_bytes(options.registers) == 64 else "smallchains._simd"
    for s in plan.slots:
        for mod, names in s.layer.kernel_imports.items():
            imports.setdefault(simd if mod == "smallchains._simd" else mod, set()).update(names)
    import_lines = "\n".join(
        f"from {mod} import {', '.join(sorted(names))}" for mod, names in sorted(imports.items()))
    out_off = plan.slots[-1].out_off if plan.slots else 0
    spec = f"SimpleChain({tuple(input_shape)}, " + ", ".join(s.layer.spec() for s in plan.slots) + ")"
    fmt = dict(
        cached=cached,
        version=__version__, spec=spec, dtype=dtype.name, loss="all", B=B,
        kernel_hash=kernel_source_hash(), imports=import_lines, n_in=plan.n_in,
        n_out=plan.n_out, n_params=plan.n_params, work_size=plan.work_size, out_off=out_off,
        kernels=options.kernels, registers=options.registers,
        n_state=max(plan.n_state + plan.n_scratch, 1), n_layer_state=plan.n_state,
        meta_size=plan.meta_size,
    )
    funcs = _Functions()
    steps = {}  # (pass, training) -> step names; "pull_x": with dL/dx of the first layer
    for training in (False, True):
        steps["forward", training] = _forward_lines(plan, dtype, training, funcs, options)
    for training in (True, False):  # identical steps keep the first name: the training one
        for kind, need in (("pull_x", True), ("pull", False)):
            steps[kind, training], gx_off = _pullback_lines(plan, dtype, need, funcs, options,
                                                            training, stages=training)
    # valgrad kernels in training mode: with the reduction stages (none for most chains)
    # (and the first layer's forward from the input rows, if it reads them: forward_reads_rows)
    rows_in = forward_reads_rows(plan, options)
    steps["vforward", True] = _forward_lines(plan, dtype, True, funcs, options, stages=True,
                                             rows_in=rows_in)
    steps["vforward", False] = (_forward_lines(plan, dtype, False, funcs, options, rows_in=True)
                                if rows_in else steps["forward", False])
    plan.mode_dependent = any(steps[k, False] != steps[k, True] for k in ("forward", "pull", "pull_x"))
    # default mode of each kernel, and (if the chain is mode dependent) the other one
    modes = [(False, True, "")]  # (training of forward kernels, of valgrad kernels, suffix)
    if plan.mode_dependent:
        modes.append((True, False, None))
    infer = steps["forward", False]
    with_gx = infer + steps["pull_x", False]  # embedding kernels: inference mode
    deps = {"forward_batch": infer, "valvjp_batch": with_gx, "vjp_batch": with_gx}
    body = _TEMPLATE.format(**fmt)
    # a loss module: kernel -> the kernel of the module `steps_from` that runs the same steps
    same_steps = {}
    # embedding kernels: inference mode; the layer state (BatchNorm's running statistics)
    # is the last n_state elements of work (a view past them is never read: inference
    # steps read only the running statistics)
    embed = dict(work_min=plan.work_size + plan.n_state, state_msg="", state_line=(
        "    state = meta = None  # inference steps of chains without layer state read neither"))
    if plan.n_state:
        embed.update(state_msg=f", the last {plan.n_state} of them the layer state", state_line=(
            "    state = work[work.shape[0] - N_LAYER_STATE:]  # the layer state, read only\n"
            "    meta = None"))
    if shared:
        deps = {}
    elif B == 1:
        deps.update(forward_single=infer, valvjp_single=with_gx, vjp_single=with_gx)
        body += _SINGLE_TEMPLATE.format(
            forward_single=funcs.run(infer), pullback_single=funcs.run(steps["pull_x", False]),
            out_off=out_off, grad_a=plan.grad_a, gx_off=gx_off, n_in=plan.n_in, n_out=plan.n_out,
            n_params=plan.n_params, **embed)
    if not shared:
        body += _BATCH_TEMPLATE.format(
            forward=funcs.run(infer, 8), pullback=funcs.run(steps["pull_x", False], 8),
            out_off=out_off, grad_a=plan.grad_a, gx_off=gx_off, n_in=plan.n_in, n_out=plan.n_out,
            n_params=plan.n_params, **embed,
            load_x_rows=(f"\n        load_rows_major(X, s0, nb, work, {plan.rows_off}, {plan.rows_ld}, N_IN, B)"
                         if plan.rows_off >= 0 else ""))
    # the input block; with the sample-major input rows for the first layer's weight
    # gradient (see TurboDense.input_rows_stride), the block transposed from them, or the
    # rows alone where that layer's forward reads them too
    load_in = (f"load_block_rows(X, idx, s0, nb, work, {plan.rows_off}, {plan.rows_ld}, N_IN, B)"
               if rows_in else
               f"load_block_and_rows(X, idx, s0, nb, work, 0, {plan.rows_off}, {plan.rows_ld}, N_IN, B)"
               if plan.rows_off >= 0 else "load_block_checked(X, idx, s0, nb, work, 0, N_IN, B)")
    for f_train, v_train, suffix in modes:
        f_mode = suffix if suffix is not None else "_train"
        v_mode = suffix if suffix is not None else "_infer"
        fwd = steps["forward", f_train]
        f_prelude = ""
        if f_train and plan.reducing:  # batch statistics: the forward stages (see loops)
            fwd = steps["vforward", True]
            f_prelude = "\n" + _indent(_forward_stage_prelude(plan))
        if not shared:
            deps["forward_range" + f_mode] = _names(fwd)
            body += _FORWARD_TEMPLATE.format(mode=f_mode, forward=funcs.run(fwd, 8), out_off=out_off,
                                             prelude=f_prelude)
        vfwd = steps["vforward", v_train]
        prelude = ""
        valgrad_variants = (  # (name suffix, pullback, gx store, docstring line)
            ("", steps["pull", v_train], "", "gx is not used (same signature as valgrad_x_range)."),
            ("_x", steps["pull_x", v_train],
             f"\n        store_block(gx, idx, s0, nb, work, {gx_off}, N_IN, B)",
             "Also overwrites rows idx[lo:hi] of gx (N, N_IN) with scale * dL/dx."))
        for kind, kernel in sorted(loss_kernels.items()):
            deps[f"loss_range_{kind}{f_mode}"] = _names(fwd)
            same_steps[f"loss_range_{kind}{f_mode}"] = f"loss_range_squared{f_mode}"
            for x, pullback, store_gx, gx_doc in valgrad_variants:
                if v_train and plan.reducing:
                    prelude = _staged_prelude(plan, funcs, vfwd, pullback, kernel, out_off,
                                              store_gx)
                deps[f"valgrad{x}_range_{kind}{v_mode}"] = _names(vfwd + pullback)
                same_steps[f"valgrad{x}_range_{kind}{v_mode}"] = f"valgrad{x}_range_squared{v_mode}"
                body += _LOSS_TEMPLATE.format(
                    prelude=prelude,
                    kind=kind, mode=v_mode, forward=funcs.run(vfwd, 8), loss_kernel=kernel,
                    out_off=out_off, grad_a=plan.grad_a, pullback=funcs.run(pullback, 8), x=x,
                    store_gx=store_gx, gx_doc=gx_doc, load_in=load_in)
            body += _LOSS_ONLY_TEMPLATE.format(kind=kind, mode=f_mode, forward=funcs.run(fwd, 8),
                                               loss_kernel=kernel, out_off=out_off,
                                               grad_a=plan.grad_a, prelude=f_prelude)
    if plan.reducing:
        body += _combine_source(plan, dtype, options)
        deps["combine"] = ()
        same_steps["combine"] = "combine"
    if losses:
        body += f"\n\nfrom smallchains._config import {cached}INLINE_OPTIONS as _JI  # noqa: E402\n"
        body += "".join(source for _, source in sorted(losses))
    plan.step_names = list(funcs.names)
    # layer functions go between the header (imports, constants) and the range kernels
    head, sep, rest = body.partition("\n\n@njit")
    if shared:
        src = head + "\n\n\n" + funcs.shared_source(steps_from, same_steps) + "\n" + sep + rest
        table = f'"{steps_from}_steps_{dtype.name}"'
    else:
        src = head + "\n\n\n" + funcs.source(deps) + "\n" + sep + rest
        # the step table's symbol: module name (filled in on import) and dtype (call_step
        # checks that the arrays match it)
        table = f'"@MODULE@_steps_{dtype.name}"'
    return src.replace("@TABLE@", table), plan


_lock = threading.RLock()  # get_kernels of a loss module first gets the chain's module
_modules: dict = {}


def _import_generated(src: str):
    digest = hashlib.sha256(src.encode()).hexdigest()[:20]
    modname = f"_smallchains_kernels_{digest}"
    if modname in sys.modules:
        return sys.modules[modname]
    from .cache import remove_broken, write_module

    src = src.replace("@MODULE@", modname)  # the step table's symbol name
    # in the cache directory, or a per-user temporary one if that cannot be written
    path = write_module(modname, src)
    remove_broken(path)  # truncated numba cache files: recompile rather than raise
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:  # no half-initialised module for the next import to find
        if sys.modules.get(modname) is module:
            del sys.modules[modname]
        raise
    return module


def get_kernels(input_shape, layers, dtype, B=None, options=None, losses=()):
    """Return ``(module, plan)`` for the chain; memoized in-process and cached on disk.
    ``options``: :class:`~smallchains.compiler.options.KernelOptions` (default: tuned, the
    host's register budget). ``losses``: generated losses, as for :func:`generate_source`
    (a chain with one gets a module of its own)."""
    if options is None:
        options = kernel_options()
    losses = tuple(sorted(losses))
    key = (tuple(input_shape), tuple(l.spec() for l in layers), np.dtype(dtype).name, B, options,
           losses)
    with _lock:
        hit = _modules.get(key)
        if hit is None:
            base = get_kernels(input_shape, layers, dtype, B, options)[0] if losses else None
            src, plan = generate_source(input_shape, layers, dtype, B, options, losses,
                                        steps_from=base.__name__ if base else None)
            if base is not None and plan.step_names != list(base._LAYERS):  # pragma: no cover
                # slots would not match: a module of its own (its steps compile again)
                src, plan = generate_source(input_shape, layers, dtype, B, options, losses)
            hit = _modules[key] = (_import_generated(src), plan)
        return hit
