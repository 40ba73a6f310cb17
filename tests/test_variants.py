"""Every tuned kernel variant against the reference kernels, at every remainder size.

The model is XNNPACK's micro-kernel testers: one test per variant family, every remainder
of every tile dimension, both dtypes, both register budgets (16 = AVX2, 32 = AVX-512,
forced through ``SimpleChain(..., registers=)``, so each CPU also checks the other's
tiles). The oracle is ``kernels="reference"`` (smallchains/layers/reference.py), itself
checked against torch autograd below and by the finite-difference tests elsewhere.

Two halves (see variant_harness.py):

* **interpreted sweep** -- the generated step code of tuned and reference kernels run in
  Python for every shape of the sweep: forward, dL/dx and dL/dp of the pullback with and
  without the input gradient (valvjp and the training path);
* **compiled** -- the same comparison with the numba-compiled tuned kernels
  (``chain.kernels(block_size=B)``: batch and single-sample kernels, and the training
  kernel ``valgrad_range_squared``) on chains that meet every variant, for both dtypes
  and register budgets.

Tolerances: float64 1e-12 norm-wise relative, float32 from the reduction lengths
(variant_harness.tolerance). ``SMALLCHAINS_TEST_PROFILE=thorough`` runs the sweeps on more
shapes and block sizes (about ten times longer).
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

import smallchains as sc
from smallchains._simd import lanes as sc_lanes
from smallchains.compiler.codegen import get_kernels
from smallchains.compiler.options import kernel_options
from variant_harness import (InterpretedChain, all_variants, block_sizes, rel_err, tolerance,
                             variants)

THOROUGH = os.environ.get("SMALLCHAINS_TEST_PROFILE", "ci") == "thorough"
ACTS = sc.available_activations()
DTYPES = [np.float64, np.float32]
DT_IDS = ["f64", "f32"]
REGISTERS = [16, 32]
#: widths 1 .. 2 x tile + 1 for the largest dense tile (8 inputs: CHUNK, the 1x8 dW tile,
#: the vector dW tile; 4 outputs: the GEMM and dL/dx tiles)
WIDTHS = range(1, 18)


def _block_sizes(dtype, registers=16):
    # each budget at its own vectors' remainders; the default B is covered by the compiled tests
    return block_sizes(dtype, default=1, registers=registers)


def _data(chain, dtype, n, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n,) + chain.input_shape).astype(dtype)
    Ybar = rng.standard_normal((n,) + chain.output_shape).astype(dtype)
    p = sc.init_params(chain, seed=seed, dtype=np.float64)
    for v in chain.param_views(p):  # non-zero biases, so bias paths matter
        if "b" in v:
            v["b"][...] = 0.3 * rng.standard_normal(v["b"].shape)
    return X, p.astype(dtype), Ybar


def _compare(tuned, ref, chain, dtype, n, what):
    tol = tolerance(chain, dtype, n)
    for name, a, b in zip(("forward", "dL/dx", "dL/dp"), tuned, ref):
        if b is None:
            continue
        err = rel_err(a, b)
        assert err <= tol, f"{what}: {name} relative error {err:.3g} > {tol:.3g}"


def _check_interpreted(layers, input_shape, dtype, B, registers, seed, seen, tail=1):
    """Tuned (``registers``) vs reference, both interpreted, over a full block and a
    partial one of ``tail`` rows; skipped (returns False) if the tuned step code equals
    that of a shape already checked under another budget."""
    tuned = sc.SimpleChain(input_shape, *layers, registers=registers)
    it = InterpretedChain(tuned, dtype, B)
    key = (tuple(sorted(it.steps_source.items())), np.dtype(dtype).name, B)
    if key in seen:
        return False
    seen.add(key)
    ref = sc.SimpleChain(input_shape, *layers, kernels="reference")
    ir = InterpretedChain(ref, dtype, B)
    n = B + tail  # one full block and one partial block
    X, p, Ybar = _data(tuned, dtype, n, seed)
    what = f"{tuned!r} registers={registers} {np.dtype(dtype).name} B={B}"
    for with_gx in (True, False):
        _compare(it.valvjp(X, p, Ybar, with_gx), ir.valvjp(X, p, Ybar, with_gx), tuned, dtype, n,
                 f"{what} with_gx={with_gx}")
    return True


# --------------------------------------------------------------------------------------
# interpreted sweeps

def dense_cases():
    """Every (n_in, n_out) in WIDTHS x WIDTHS, activations rotating so that each meets
    every remainder class; bias off for one shape in five."""
    for k, (n_in, n_out) in enumerate(itertools.product(WIDTHS, WIDTHS)):
        act = ACTS[(n_in + 3 * n_out) % len(ACTS)]
        yield n_in, [sc.TurboDense(n_out, act, bias=k % 5 != 4)]


@pytest.fixture
def small_rows(monkeypatch):
    """The input-rows dW from 16 inputs (the library uses it from ROWS_MIN_IN = 512; the
    emitted code is the same, and interpreted sweeps of 512-input layers would take long)."""
    monkeypatch.setattr(sc.layers.dense, "ROWS_MIN_IN", 16)


def rows_cases():
    """First dense layers that take dW from the sample-major input rows (with
    ``small_rows``), and with 32 registers their training forward too: inputs 16 .. 33
    (every remainder of the 2-vector input tile in both dtypes, the 1-vector tile, scalar
    inputs; strides rounded up), 64, 71, 87, 104, 125 (the 4-vector dW tile of 32
    registers over 16 float32 lanes, then none, 1 or 2 of the smaller tiles and scalar
    inputs) and 128 (the padded stride), outputs rotating over 1 .. 9 (every remainder
    of the dW's 4-output tile and of the forward's 6-output tile, odd and even); at the
    block sizes that have rows."""
    for k, n_in in enumerate(list(range(16, 34)) + [64, 71, 87, 104, 125, 128]):
        for n_out in (1 + k % 9, 1 + (k + 4) % 9):
            act = ACTS[(n_in + 3 * n_out) % len(ACTS)]
            yield n_in, [sc.TurboDense(n_out, act, bias=n_out % 3 != 0)]


def conv_cases():
    """Every kernel (KH, KW) in 1..5 x 1..5 with every padding form (valid, same, int,
    (PH, 0), (0, PW)): 125 cases; the (in, out) channel pairs 1..9 x 1..9 rotate through
    them (each pair at least once), output sizes 1..4 x 1..5, activations and bias too."""
    pads = ["valid", "same", 1, (2, 0), (0, 1)]
    kernels = list(itertools.product(range(1, 6), range(1, 6)))
    for k, ((kh, kw), pad) in enumerate(itertools.product(kernels, pads)):
        ci, co = 1 + k % 9, 1 + (k // 9) % 9
        if pad == "same" and (kh % 2 == 0 or kw % 2 == 0):
            pad = (kh // 2, 0)
        ph, pw = ((kh - 1) // 2, (kw - 1) // 2) if pad == "same" else (0, 0) if pad == "valid" else \
            (pad, pad) if isinstance(pad, int) else pad
        ho, wo = 1 + k % 4, 1 + (k // 4) % 5  # output size
        H, W = ho + kh - 1 - 2 * ph, wo + kw - 1 - 2 * pw
        if H < 1 or W < 1:
            H, W, pad = ho + kh - 1, wo + kw - 1, "valid"
        act = ACTS[k % len(ACTS)]
        yield (ci, H, W), [sc.Conv(co, (kh, kw), act, padding=pad, bias=(k // 9) % 2 == 0)]


def pool_cases():
    """Windows (KH, KW) in 1..3 x 1..3 over images whose sides leave every remainder."""
    for kh, kw in itertools.product(range(1, 4), range(1, 4)):
        for extra in range(3):
            yield (1 + extra % 2, 2 * kh + extra, kw + 2 * extra), [sc.MaxPool((kh, kw))]


def sequence_cases():
    """LSTM widths 1..9 (4H gate rows; every remainder of the 4-column dW and GEMM tiles
    over the inputs F and the hidden state H), lengths T 1..3, alone as the first layer
    (the training path without dL/dx, valvjp with it) and stacked (dL/dh of every step
    into the first); temporal pattern attention with 1..9 filters over T - 1 = 1..3
    earlier states of m = 1..9 features (every row and column remainder of its tiles)."""
    for k, H in enumerate(range(1, 10)):
        F, T = 1 + (4 * k + 2) % 9, 1 + k % 3
        yield (T, F), [sc.LSTM(H, return_sequences=k % 2 == 0)]
        yield (T, F), [sc.LSTM(H, return_sequences=True), sc.LSTM(1 + (H + 4) % 9)]
    for k, filters in enumerate(range(1, 10)):
        T, m = 2 + k % 3, 1 + (5 * k + 3) % 9
        yield (T, m), [sc.TemporalPatternAttention(filters)]


def _schedule(cases, dtype, every_block, blocks=None):
    """``(k, shape, layers, B, registers)`` of a sweep: every case at every block size of
    each budget (``blocks(dtype, registers)``, default :func:`_block_sizes`), or
    (``every_block=False``) at one block size rotating over the cases."""
    blocks = blocks or _block_sizes
    for k, (shape, layers) in enumerate(cases):
        for regs in REGISTERS:
            bl = blocks(dtype, regs)
            for B in (bl if every_block else [bl[k % len(bl)]]):
                yield k, shape, layers, B, regs


def _rows_blocks(dtype, registers=16):
    return [B for B in _block_sizes(dtype, registers) if B % 16 == 0]


def _sweep(cases, dtype, every_block, blocks=None, tails=1):
    """Run the interpreted comparison for all cases, with partial blocks of 1 row or (case
    ``k``) ``1 + k % tails`` rows; returns (cases run, variants met)."""
    seen, met, count = set(), set(), 0
    for k, shape, layers, B, regs in _schedule(cases, dtype, every_block, blocks):
        if _check_interpreted(layers, shape, dtype, B, regs, seed=k, seen=seen, tail=1 + k % tails):
            count += 1
            met |= variants(sc.SimpleChain(shape, *layers, registers=regs), dtype, B)
    return count, met


#: (layer family, dtype) -> (cases run, variants met); printed at the end of the session
#: by conftest's pytest_terminal_summary
SWEEP_LOG = {}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_dense_variants_every_width_and_block(dtype):
    count, met = _sweep(dense_cases(), dtype, every_block=True)
    SWEEP_LOG[("dense", np.dtype(dtype).name)] = (count, met)
    assert count >= 17 * 17 * len(_block_sizes(dtype))  # every shape at every block, at least once


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_dense_rows_variant_every_input_remainder(dtype, small_rows):
    # partial blocks of 1 .. 4 rows: every remainder of the rows forward's 4-sample groups
    count, met = _sweep(rows_cases(), dtype, every_block=True, blocks=_rows_blocks, tails=4)
    SWEEP_LOG[("dense rows", np.dtype(dtype).name)] = (count, met)
    assert {("dense.dw", "rows 32B"), ("dense.dw", "rows 64B"), ("dense.forward", "rows 64B")} <= met
    assert count >= 24 * 2 * len(_rows_blocks(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_conv_variants_every_channel_pair(dtype):
    count, met = _sweep(conv_cases(), dtype, every_block=THOROUGH)
    SWEEP_LOG[("conv", np.dtype(dtype).name)] = (count, met)
    assert count >= 125


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_sequence_variants_every_width_and_block(dtype):
    count, met = _sweep(sequence_cases(), dtype, every_block=True)
    SWEEP_LOG[("lstm, tpa", np.dtype(dtype).name)] = (count, met)
    assert {("lstm", "vector 32B"), ("lstm", "vector 64B"), ("tpa", "vector 32B"), ("tpa", "vector 64B")} <= met
    assert count >= 27 * len(_block_sizes(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_maxpool_every_window(dtype):
    count, _ = _sweep(pool_cases(), dtype, every_block=True)
    SWEEP_LOG[("maxpool", np.dtype(dtype).name)] = (count, set())
    assert count >= 27 * len(_block_sizes(dtype))


def test_sweeps_meet_every_variant(small_rows):
    """The cases above reach every variant the dispatch rules can choose (computed from the
    case lists, so this holds however the tests are selected)."""
    met = set()
    for dtype in DTYPES:
        for cases, every, blocks in ((dense_cases(), True, None), (conv_cases(), THOROUGH, None),
                                     (rows_cases(), True, _rows_blocks), (sequence_cases(), True, None)):
            for _, shape, layers, B, regs in _schedule(cases, dtype, every, blocks):
                met |= variants(sc.SimpleChain(shape, *layers, registers=regs), dtype, B)
    missing = all_variants() - met
    assert not missing, f"variants no sweep reaches: {sorted(missing)}"


# --------------------------------------------------------------------------------------
# compiled kernels

#: chains whose layers meet every dense and conv variant and remainder class: dense widths
#: with every n_out mod 4 and n_in below and above 8; conv with rectangular kernels,
#: padding, several channel remainders, relu (in registers) and a z-saving activation
def compiled_chains(k):
    """name -> (input shape, layers), activations rotated by ``k``."""
    acts = ACTS[k % len(ACTS):] + ACTS[:k % len(ACTS)]
    dense = (3, [sc.TurboDense(17, acts[0]), sc.TurboDense(11, acts[1]), sc.TurboDense(8, acts[2]),
                 sc.TurboDense(6, acts[3], bias=False), sc.TurboDense(2, acts[4])])
    conv = ((2, 9, 8), [sc.Conv(5, (3, 2), "relu", padding=(1, 0)), sc.MaxPool((2, 3)),
                        sc.Conv(3, 2, acts[5], padding=1, bias=False), sc.Flatten(),
                        sc.TurboDense(4, acts[6])])
    # a wide first layer after a Flatten: dW from the input rows at B % 16 == 0
    wide = ((1, 7, 77), [sc.Flatten(), sc.TurboDense(7, acts[7]), sc.TurboDense(2, acts[8])])
    # the sequence layers' tiles: stacked LSTMs (every step's dL/dh, dL/dx of both) and the
    # attention, after a per-step dense layer
    seq = ((3, 4), [sc.TimeDistributed(sc.TurboDense(5, acts[2])), sc.LSTM(6, return_sequences=True),
                    sc.LSTM(3, return_sequences=True), sc.TemporalPatternAttention(5), sc.TurboDense(2)])
    return {"dense": dense, "conv": conv, "wide": wide, "seq": seq}


#: every activation on a layer with fewer than 8 inputs and remainder output rows, so its
#: delta is fused into the register-tiled dW and the step ends in straight-line code after
#: the row loop: where numba's dead-code elimination dropped gelu's and silu's last store
EVERY_ACTIVATION = (3, [sc.TurboDense(w, act) for w, act in zip([7, 5, 3] * 3, ACTS)] + [sc.TurboDense(2)])


def _compiled_configs():
    """(dtype, registers, block size, chain name). Per dtype and budget, with that
    budget's vectors (32 bytes for 16 registers, 64 for 32): four vectors (explicit-vector
    tiles, vector dW, the rows dW and forward, the vector conv and sequence tiles) under
    each, lanes - 1 (scalar, dW transposed) under 32 and three vectors + 1 (scalar,
    register-tiled dW) under 16, and three vectors (dense one-vector tiles) under each.
    Every config compiles the dense chain (its widths meet every remainder of the dense
    tiles at that block); the other chains only where they reach a variant no other
    config of the dtype compiles (elsewhere the conv and sequence layers fall back to the
    scalar or reference code that the lanes - 1 config compiles, and the wide chain has
    the dense chain's variants); together they meet every variant in each dtype
    (test_compiled_configs_meet_every_variant). The thorough profile compiles every chain
    at every config, and adds lanes + 1 and the other budget of each."""
    every = ("dense", "conv", "wide", "seq")
    out = []
    for dtype in DTYPES:
        V, W = (sc_lanes(np.dtype(dtype).itemsize, r) for r in (16, 32))  # lanes per budget
        sizes = [(16, 4 * V, every), (32, W - 1, ("dense", "conv", "seq")), (16, 3 * V + 1, ("dense", "conv")),
                 (32, 4 * W, every), (32, 3 * W, ("dense",)), (16, 3 * V, ("dense",))]
        if THOROUGH:
            sizes = [(r, b, every) for r, b, _ in sizes]
            sizes += [(r, b, every) for r, b in ((32, 2 * W), (16, V - 1), (32, 3 * W + 1), (16, 2 * V),
                                                 (16, V + 1), (32, W + 1))]
        out += [(dtype, r, b, name) for r, b, names in sizes for name in names]
    return out


COMPILED = _compiled_configs()


def _first_config(dtype, registers):
    """The block size of the first config of a dtype and budget (which also compiles
    EVERY_ACTIVATION)."""
    return next(b for d, r, b, _ in COMPILED if d is dtype and r == registers)


@pytest.mark.parametrize("dtype,registers,B,name", COMPILED,
                         ids=[f"{np.dtype(d).name}-r{r}-B{b}-{n}" for d, r, b, n in COMPILED])
def test_compiled_variants_match_reference(dtype, registers, B, name):
    # activations rotate with the budget (the B = 1 modules are shared by a budget's configs)
    chains = [compiled_chains(registers // 8)[name]]
    if name == "dense" and B == _first_config(dtype, registers):
        chains.append(EVERY_ACTIVATION)
    for k, (shape, layers) in enumerate(chains):
        chain = sc.SimpleChain(shape, *layers, registers=registers)
        ref = InterpretedChain(sc.SimpleChain(shape, *layers, kernels="reference"), dtype, B)
        n = 2 * B + 3
        X, p, Ybar = _data(chain, dtype, n, seed=k)
        what = f"compiled {chain!r} registers={registers} {np.dtype(dtype).name} B={B}"
        expected = ref.valvjp(X.reshape(n, -1), p, Ybar.reshape(n, -1))
        kern = chain.kernels(dtype, block_size=B)
        work = np.full(kern.work_size, np.nan, dtype)  # the kernels must not rely on its contents
        Y, Xbar, pbar = np.empty_like(Ybar.reshape(n, -1)), np.empty_like(X.reshape(n, -1)), np.empty_like(p)
        kern.valvjp_batch(X.reshape(n, -1), p, Ybar.reshape(n, -1), Y, Xbar, pbar, work)
        _compare((Y, Xbar, pbar), expected, chain, dtype, n, what + " valvjp_batch")
        # the single-sample kernels (B = 1 module) on the same, now used, workspace
        y1, x1, g1 = np.empty(kern.n_out, dtype), np.empty(kern.n_in, dtype), np.empty_like(p)
        kern.valvjp(X[0].reshape(-1), p, Ybar[0].reshape(-1), y1, x1, g1, work)
        ref1 = InterpretedChain(sc.SimpleChain(shape, *layers, kernels="reference"), dtype, 1)
        expected1 = ref1.valvjp(X[:1].reshape(1, -1), p, Ybar[:1].reshape(1, -1))
        _compare((y1[None], x1[None], g1), expected1, chain, dtype, 1, what + " valvjp (one sample)")
        # the training kernel (first layer without dL/dx) at the same block size
        mod, plan = get_kernels(chain.input_shape, chain.layers, dtype, B=B, options=chain.options)
        T = (Ybar.reshape(n, -1) / 2).astype(dtype)  # SquaredLoss: d/dy sum (y - t)^2 = 2 (y - t)
        g = np.empty_like(p)
        scale = np.dtype(dtype).type(1.0)
        state, meta = np.zeros(1, dtype), np.zeros(plan.meta_size, np.int64)
        mod.valgrad_range_squared(X.reshape(n, -1), T, np.arange(n), 0, n, p, g, state, work,
                                  meta, scale, np.empty((0, plan.n_in), dtype))
        Yr = expected[0]
        _, _, g_exp = ref.valvjp(X.reshape(n, -1), p, (2 * (Yr - T)).astype(dtype), with_gx=False)
        _compare((g,), (g_exp,), chain, dtype, n, what + " valgrad_range_squared")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_compiled_configs_meet_every_variant(dtype):
    met = set()
    for d, registers, B, name in COMPILED:
        if d is dtype:
            shape, layers = compiled_chains(registers // 8)[name]
            met |= variants(sc.SimpleChain(shape, *layers, registers=registers), dtype, B)
    missing = all_variants() - met
    assert not missing, f"variants the compiled {np.dtype(dtype).name} tests do not reach: {sorted(missing)}"


@pytest.mark.parametrize("registers, B, rows_forward", [(32, 32, True), (32, 160, True), (32, 16, False),
                                                      (16, 64, False)])
def test_valgrad_kernels_load_what_the_first_layer_reads(registers, B, rows_forward):
    """The dispatch of the rows forward reaches the compiled kernels: where the first
    layer's training forward reads the input rows (dense.rows_forward), the valgrad
    kernels gather only the rows (no transposed input block) and call that forward step;
    elsewhere they build both. The results are checked above; this guards the wiring,
    which the comparisons cannot see (the other path gives the same numbers)."""
    layers = [sc.Flatten(), sc.TurboDense(7, "tanh"), sc.TurboDense(2)]
    src, plan = sc.compiler.codegen.generate_source((1, 7, 77), layers, np.float32, B=B,
                                                    options=kernel_options(registers=registers))
    valgrad = src[src.index("def _valgrad_range_squared"):]
    valgrad = valgrad[:valgrad.index("\n\n\n")]
    assert plan.rows_off >= 0
    assert ("layer1_forward_train_rows" in valgrad) == rows_forward
    assert ("load_block_rows(X, idx" in valgrad) == rows_forward
    assert ("load_block_and_rows(X, idx" in valgrad) != rows_forward
    # the inference forward kernels keep the feature-major block
    fwd = src[src.index("def _forward_range"):]
    assert "load_block(X, idx" in fwd[:fwd.index("\n\n\n")]


# --------------------------------------------------------------------------------------
# the reference itself, compiled, against torch autograd

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_reference_kernels_match_torch(torch, dtype):
    F = torch.nn.functional
    chain = sc.SimpleChain((2, 7, 6), sc.Conv(3, (3, 2), "relu", padding=(1, 2)), sc.MaxPool((2, 3)),
                           sc.Conv(2, 3, "gelu", padding="same"), sc.Flatten(),
                           sc.TurboDense(5, "silu"), sc.TurboDense(4, "elu"), sc.TurboDense(3),
                           kernels="reference")
    X, p, _ = _data(chain, dtype, 21, seed=5)
    y = np.random.default_rng(5).integers(0, 3, 21)
    loss, g, gx = sc.valgrad_with_input(sc.add_loss(chain, sc.LogitCrossEntropyLoss(y)), X, p)
    v = chain.param_views(p.astype(np.float64))
    T = [torch.tensor(np.array(a, np.float64), requires_grad=True)
         for layer in v for a in layer.values()]
    xt = torch.tensor(X.astype(np.float64), requires_grad=True)
    h = F.max_pool2d(F.relu(F.conv2d(xt, T[0], T[1], padding=(1, 2))), (2, 3))
    h = F.gelu(F.conv2d(h, T[2], T[3], padding=1), approximate="tanh").flatten(1)
    h = F.elu(F.silu(h @ T[4].T + T[5]) @ T[6].T + T[7]) @ T[8].T + T[9]
    L = F.cross_entropy(h, torch.from_numpy(y))
    L.backward()
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert abs(loss - L.item()) <= tol * abs(L.item())
    assert rel_err(g, np.concatenate([t.grad.numpy().ravel() for t in T])) <= tol
    assert rel_err(gx, xt.grad.numpy()) <= tol * 10
