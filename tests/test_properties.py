"""Property tests against torch autograd: hypothesis-generated chains, float64 and float32.

Each example draws an architecture (dense, or convolutional: Conv with padding
"valid"/"same"/int, MaxPool, Flatten, TurboDense), activations from
``sc.available_activations()``, widths that are often not multiples of 4 or 8, channel
counts 1..9, kernel sizes 1..5, image sizes, a loss (SquaredLoss, AbsoluteLoss,
LogitCrossEntropyLoss) and three batch sizes (1 or a few samples; around 8/16/32; beyond
the chain's block size ``B``, which also splits the batch over threads), and compares
``sc.valgrad_with_input``'s loss, dL/dp (per layer, through ``param_views``) and dL/dx
(per sample) with torch autograd on an equivalent ``nn.Sequential``
(:func:`conftest.torch_chain_model`).

Tolerances (norm-wise relative; see :func:`assert_matches_torch`):

* float64: 1e-9.
* float32: compared with **float64** torch evaluated at the float32-rounded parameters,
  inputs and targets, so the difference measured is smallchains' own float32 arithmetic
  (torch's float32 rounding would otherwise add its own error of the same size; the
  LeNet5 test in test_torch_float32.py compares with float32 torch as well). The
  tolerance is derived from the reduction lengths (:func:`float32_tolerance`).

Kinks: relu and leaky_relu (at 0), MaxPool (at ties) and AbsoluteLoss (at 0) have
derivatives that jump; a float32 value within its rounding error of a kink can take the
other branch than float64, which is correct behaviour but changes that sample's
gradient by O(1). :func:`unsafe_samples` bounds the float32 forward error of every
pre-activation, pooling gap and residual (worst-case rounding bounds propagated through
the layers in float64) and the batch is redrawn for the few samples that come that close.
For float64 the bounds are ~1e-16 and redraws essentially never happen. (elu, with
alpha = 1, has a continuous derivative at 0: no kink.)

Compile cost: every architecture x dtype compiles its own kernels (5-15 s on a cold
cache), so the "ci" hypothesis profile (tests/conftest.py) runs a handful of
examples per test; ``HYPOTHESIS_PROFILE=thorough`` runs many more. Coverage of a run is
visible with ``pytest --hypothesis-show-statistics`` (events: activation, conv kernel and
padding, MaxPool, loss). :func:`test_every_activation_and_loss` is a deterministic companion
that guarantees every activation and loss are exercised whatever hypothesis draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import currently_in_test_context, event, given, reject, settings
from hypothesis import strategies as st

import smallchains as sc
from conftest import random_params, torch_chain_model, torch_flat

ACTIVATIONS = sc.available_activations()
LOSSES = ("squared", "absolute", "logitce")
LOSS_CLASS = {"squared": sc.SquaredLoss, "absolute": sc.AbsoluteLoss,
              "logitce": sc.LogitCrossEntropyLoss}
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]

#: float64 tolerance, norm-wise relative (the brief: ~1e-9)
TOL64 = 1e-9
#: documented max abs error of the float32 rational tanh (smallchains._fastmath: 3.24e-7
#: measured, 5e-7 spec); tanh, sigmoid, gelu, silu and softplus' derivative go through it
TANH_ERR32 = 5e-7
TANH_FAMILY = {"tanh", "sigmoid", "gelu", "silu", "softplus"}

# examples per test and dtype: half (dense) and 3/10 (conv) of the profile's max_examples
# (ci: 5 dense and 3 conv architectures per dtype, ~5-10 s of compilation each on a cold cache)
_N = settings.default.max_examples
N_DENSE = max(1, _N // 2)
N_CONV = max(1, 3 * _N // 10)

# --------------------------------------------------------------------------------------
# tolerances

def unit_roundoff(dtype) -> float:
    return float(np.finfo(dtype).eps) / 2


def float32_tolerance(chain, n: int) -> float:
    """Norm-wise relative tolerance of a float32 valgrad of ``chain`` over ``n`` samples
    (against the exact, i.e. float64, result at the same float32 inputs).

    Rounding model: a float32 dot product / sum of length ``m`` has a relative error of
    about ``sqrt(m) * u`` (``u = 2**-24``; random-walk accumulation of roundings, the
    worst-case bound ``m * u`` is reached only by adversarial data), and errors of
    successive reductions add up along the chain. The reductions are, per layer, the
    forward dot product (fan-in: ``n_in`` or ``C*K*K``) and the backward one (fan-out:
    ``out`` or ``out_channels*K*K``), plus the sum over samples and output pixels of the
    weight gradient (``n*Ho*Wo``) and of the loss (``n*n_out``). So

        tol = 10 * u * (sum_layers (sqrt(fan_in) + sqrt(fan_out)) + sqrt(n*Ho*Wo) + sqrt(n*n_out))
              + 4 * 5e-7 * (number of layers with a tanh-based activation)

    The last term is the float32 rational tanh's absolute error (5e-7) propagated through
    each such layer. 10 is a safety factor for the condition numbers of random chains:
    calibration runs (72 float32 comparisons of random dense and conv chains, every
    activation and loss, N up to 625) measured errors up to 1.4 u S (S the bracket), so
    >= 7x headroom; LeNet5 on MNIST (N <= 37) up to 0.06 u S (its errors, 1e-7 to 1e-6, do not
    grow with N: the sums over samples are blocked in both smallchains and torch). Any
    real gradient bug (a wrong lane, tap, sample or index) is O(1e-2) or more in the
    block or sample row it touches, far above this."""
    u = unit_roundoff(np.float32)
    s, n_sum, n_tanh = 0.0, n, 0
    for layer, (ins, outs) in zip(chain.layers, chain._shapes):
        if isinstance(layer, sc.Conv):
            K2 = math.prod(np.broadcast_to(layer.kernel_size, 2))  # int K or (KH, KW)
            s += math.sqrt(ins[0] * K2) + math.sqrt(layer.out_channels * K2)
            n_sum = max(n_sum, n * outs[1] * outs[2])
        elif isinstance(layer, sc.TurboDense):
            s += math.sqrt(ins[0]) + math.sqrt(outs[0])
        else:
            continue
        n_tanh += layer.activation.name in TANH_FAMILY
    s += math.sqrt(n_sum) + math.sqrt(n * math.prod(chain.output_shape))
    return 10 * u * s + 4 * TANH_ERR32 * n_tanh


def tolerance(chain, n, dtype) -> float:
    return TOL64 if np.dtype(dtype) == np.float64 else float32_tolerance(chain, n)


# --------------------------------------------------------------------------------------
# torch reference

def output_scales(loss, out, T):
    """``(dmag, lmag)``: the size of the output-side quantities whose rounding sets the
    absolute float error of a valgrad, for the floors of :func:`gradient_errors`.

    ``dmag (N, n_out) >= |dL/dyhat|`` elementwise bounds the absolute rounding of
    ``dL/dyhat``: cross-entropy ``(softmax + onehot) / N`` (``softmax - onehot`` is rounded
    at the size of its terms: a confidently classified sample's ``p - 1`` keeps only
    ``u / (1 - p)`` relative accuracy); squared ``2 (|yhat| + |y|) / N`` (the residual is
    rounded at the size of ``yhat`` and ``y``); absolute ``1 / N``. ``lmag`` is the size
    at which the loss is rounded: the mean largest |logit| (log-sum-exp minus the label's
    logit), or the mean of ``sum_j |r| (|yhat| + |y|)`` (squared) / ``sum_j (|yhat| + |y|)``
    (absolute)."""
    n = out.shape[0]
    o = np.asarray(out, dtype=np.float64).reshape(n, -1)
    if loss == "logitce":
        e = np.exp(o - o.max(1, keepdims=True))
        dmag = e / e.sum(1, keepdims=True)
        dmag[np.arange(n), np.asarray(T)] += 1.0
        return dmag / n, float(np.abs(o).max(1).mean())
    y = np.asarray(T, dtype=np.float64).reshape(n, -1)
    size = np.abs(o) + np.abs(y)
    if loss == "squared":
        return 2 * size / n, float((np.abs(o - y) * size).sum(1).mean())
    return np.full_like(o, 1.0 / n), float(size.sum(1).mean())


def torch_valgrad(torch, net, pmods, X, T, loss):
    """``(loss, dL/dp, dL/dX, output, mags)`` of ``net`` by torch autograd, in the dtype of
    ``net``'s parameters; dL/dp is in smallchains' layout. ``mags = (gmag, gxmag, lmag)``:
    the same chain's vector-Jacobian products with the :func:`output_scales` bound
    ``dmag`` in place of dL/dyhat (the size of the gradient's rounding errors), and
    ``lmag``."""
    dt = pmods[0].weight.dtype
    Xt = torch.tensor(np.asarray(X, dtype=np.float64), dtype=dt, requires_grad=True)
    params = [t for m in pmods for t in (m.weight, m.bias) if t is not None]
    for t in params:
        t.grad = None
    out = net(Xt)
    n = out.shape[0]
    if loss == "logitce":
        L = torch.nn.functional.cross_entropy(out, torch.from_numpy(np.asarray(T, dtype=np.int64)))
    else:
        r = out - torch.tensor(np.asarray(T, dtype=np.float64), dtype=dt).reshape(out.shape)
        L = ((r * r) if loss == "squared" else r.abs()).sum() / n
    o = out.detach().numpy().astype(np.float64)
    dmag, lmag = output_scales(loss, o, T)
    mags = torch.autograd.grad(out, params + [Xt], torch.tensor(dmag.reshape(o.shape), dtype=dt),
                               retain_graph=True)
    gmag = np.concatenate([t.detach().numpy().reshape(-1) for t in mags[:-1]]).astype(np.float64)
    L.backward()
    return (L.item(), torch_flat(pmods, grad=True).astype(np.float64),
            Xt.grad.numpy().astype(np.float64), o,
            (gmag, mags[-1].detach().numpy().astype(np.float64), lmag))


def unsafe_samples(torch, net, X, T, loss, dtype) -> np.ndarray:
    """Boolean mask of the samples whose ``dtype`` gradient may legitimately differ from the
    float64 one because a value lies within its rounding error of a kink.

    ``net`` is the float64 torch model (at ``dtype``-rounded parameters), ``X`` and ``T``
    the ``dtype``-rounded batch. Alongside every activation ``a`` it carries ``e``, a bound
    on ``|a_dtype - a_exact|``: through a Linear/Conv with fan-in ``m``,
    ``e' = (m+1) u (|W| |a| + |b|) + |W| e`` (the worst-case summation bound, whatever the
    order; ``u`` the unit roundoff); through an activation ``e' = 1.2 e + (tanh error +
    4u)(1 + |z|)`` (1.2 bounds every activation's slope); MaxPool and Flatten carry
    ``e`` along (the max of the window's bounds). A sample is unsafe if a relu/leaky_relu
    input is nonzero with ``|z| <= 2e``, a MaxPool window's top-two gap is nonzero with
    ``gap <= 4 max(e)``, or (AbsoluteLoss) a residual is nonzero with ``|r| <= 2e``. Exact
    float64 zeros and ties are structural (padding, dead relus, identical computations)
    and are exact ties in float32 too."""
    F, nn = torch.nn.functional, torch.nn
    u = unit_roundoff(dtype)
    terr = TANH_ERR32 if np.dtype(dtype) == np.float32 else 0.0
    with torch.no_grad():
        a = torch.from_numpy(np.asarray(X, dtype=np.float64))
        e = torch.zeros_like(a)
        bad = torch.zeros(a.shape[0], dtype=torch.bool)

        def flag(mask):
            bad.logical_or_(mask.reshape(mask.shape[0], -1).any(1))

        for m in net:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                absb = None if m.bias is None else m.bias.abs()
                if isinstance(m, nn.Linear):
                    fan = m.in_features
                    mag = F.linear(a.abs(), m.weight.abs(), absb)
                    prop = F.linear(e, m.weight.abs())
                else:
                    fan = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                    mag = F.conv2d(a.abs(), m.weight.abs(), absb, padding=m.padding)
                    prop = F.conv2d(e, m.weight.abs(), padding=m.padding)
                a, e = m(a), (fan + 1) * u * mag + prop
            elif isinstance(m, nn.MaxPool2d):
                kh, kw = np.broadcast_to(m.kernel_size, 2).tolist()
                n_, c_, h_, w_ = a.shape
                ho, wo = h_ // kh, w_ // kw

                def windows(t):
                    t = t[:, :, :ho * kh, :wo * kw].reshape(n_, c_, ho, kh, wo, kw)
                    return t.permute(0, 1, 2, 4, 3, 5).reshape(n_, c_, ho, wo, kh * kw)

                aw, ew = windows(a), windows(e)
                emax = ew.amax(-1)
                if kh * kw > 1:
                    top = aw.topk(2, dim=-1).values
                    gap = top[..., 0] - top[..., 1]
                    flag((gap > 0) & (gap <= 4 * emax))
                a, e = aw.amax(-1), emax
            elif isinstance(m, nn.Flatten):
                a, e = a.flatten(1), e.flatten(1)
            elif isinstance(m, nn.Identity):
                continue
            else:  # an activation
                z, a = a, m(a)
                if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
                    flag((z != 0) & (z.abs() <= 2 * e))
                    e = e * (z > 0) if isinstance(m, nn.ReLU) else e + u * a.abs()
                else:
                    e = 1.2 * e + (terr + 4 * u) * (1 + z.abs())
        if loss == "absolute":
            r = a - torch.from_numpy(np.asarray(T, dtype=np.float64)).reshape(a.shape)
            flag((r != 0) & (r.abs() <= 2 * e))
    return bad.numpy()


def random_batch(rng, chain, n, loss, dtype, scale):
    X = (scale * rng.standard_normal((n,) + chain.input_shape)).astype(dtype)
    if loss == "logitce":
        T = rng.integers(0, chain.output_shape[0], size=n)
    else:
        T = rng.standard_normal((n,) + chain.output_shape).astype(dtype)
    return X, T


def safe_batch(torch, net64, chain, n, loss, dtype, rng, scale=1.0, max_rounds=40):
    """A random ``dtype`` batch of ``n`` samples none of which is near a kink
    (:func:`unsafe_samples`); unsafe samples are redrawn. Returns ``(X, T, n_redrawn)``."""
    X, T = random_batch(rng, chain, n, loss, dtype, scale)
    redrawn = 0
    for _ in range(max_rounds):
        bad = unsafe_samples(torch, net64, X, T, loss, dtype)
        if not bad.any():
            return X, T, redrawn
        redrawn += int(bad.sum())
        X2, T2 = random_batch(rng, chain, int(bad.sum()), loss, dtype, scale)
        X[bad], T[bad] = X2, T2
    if currently_in_test_context():
        reject()  # a degenerate chain: some sample always lands on a kink (never seen)
    pytest.fail(f"no batch of {n} samples away from the kinks of {chain_spec(chain)}")


# --------------------------------------------------------------------------------------
# comparison

def _norm(a) -> float:
    return float(np.linalg.norm(np.ravel(a)))


def gradient_errors(chain, res, ref) -> dict:
    """Norm-wise relative errors of ``res = (loss, g, gx)`` against ``ref`` (from
    :func:`torch_valgrad`): the loss; all of dL/dp; each layer's W and b (through
    ``param_views``); the worst per-sample row of dL/dx.

    Each is ``||res - ref|| / max(||ref||, floor)``. The floors keep ill-conditioned small
    values from failing a correct float32 result, while a wrong lane, tap, sample or index
    is still O(1) relative to them:

    * 0.1 x the same block of the :func:`output_scales` product (``gmag``, ``gxmag``,
      ``lmag``): where the gradient is small only because ``dL/dyhat`` is (confidently
      classified samples, residuals near 0), its absolute rounding error is not;
    * 0.1 x the block's share of the whole vector, ``||g|| sqrt(size / total size)`` (and
      the RMS row norm for dL/dx): a block behind saturated tanh units is small, but the
      float32 tanh's absolute error (5e-7) in ``1 - a^2`` is not."""
    tiny = np.finfo(np.float64).tiny
    loss, g, gx = res
    tl, tg, tgx, _, (gmag, gxmag, lmag) = ref
    g = np.asarray(g, dtype=np.float64)
    gx = np.asarray(gx, dtype=np.float64)
    err = {"loss": abs(loss - tl) / max(abs(tl), 0.1 * lmag, tiny)}
    gn = _norm(tg)
    err["dL/dp"] = _norm(g - tg) / max(gn, 0.1 * _norm(gmag), tiny)
    views = zip(chain.layers, chain.param_views(g), chain.param_views(tg), chain.param_views(gmag))
    for i, (layer, v, vr, vm) in enumerate(views):
        for name in v:
            floor = 0.1 * max(gn * math.sqrt(v[name].size / g.size), _norm(vm[name]))
            err[f"layer {i} {layer!r} {name}"] = _norm(v[name] - vr[name]) / max(_norm(vr[name]), floor, tiny)
    n = gx.shape[0]
    rows, rref = gx.reshape(n, -1), tgx.reshape(n, -1)
    floor = 0.1 * np.maximum(_norm(rref) / math.sqrt(n), np.linalg.norm(gxmag.reshape(n, -1), axis=1))
    row_err = (np.linalg.norm(rows - rref, axis=1)
               / np.maximum(np.maximum(np.linalg.norm(rref, axis=1), floor), tiny))
    k = int(np.argmax(row_err))
    err[f"dL/dx (worst: sample {k})"] = float(row_err[k])
    return err


def assert_matches_torch(chain, res, ref, tol, what=""):
    """Every error of :func:`gradient_errors` is ``<= tol``; returns the largest."""
    err = gradient_errors(chain, res, ref)
    bad = {k: v for k, v in err.items() if not v <= tol}
    assert not bad, (f"{what}: errors above tol {tol:.3g}: "
                     + ", ".join(f"{k}: {v:.3g}" for k, v in bad.items())
                     + f"\n  chain: {chain_spec(chain)}\n  all errors: "
                     + ", ".join(f"{k}: {v:.2g}" for k, v in err.items()))
    return max(err.values())


def chain_spec(chain) -> str:
    return f"SimpleChain({chain.input_shape}, " + ", ".join(map(repr, chain.layers)) + ")"


def check_chain(torch, chain, dtype, loss, ns, seed, scale=1.0):
    """valgrad_with_input of ``chain`` with ``loss`` at each batch size in ``ns`` against
    torch (float64, at the ``dtype``-rounded parameters and data)."""
    rng = np.random.default_rng(seed)
    p = random_params(chain, seed=seed % 100_000, dtype=dtype)
    net64, pmods64 = torch_chain_model(torch, chain, p, dtype=torch.float64)
    for n in ns:
        X, T, redrawn = safe_batch(torch, net64, chain, n, loss, dtype, rng, scale)
        if redrawn and currently_in_test_context():
            event("redrawn samples near a kink")
        model = sc.add_loss(chain, LOSS_CLASS[loss](T))
        loss_v, g, gx = sc.valgrad_with_input(model, X, p)
        assert g.dtype == dtype and gx.dtype == dtype and gx.shape == X.shape
        ref = torch_valgrad(torch, net64, pmods64, X, T, loss)
        assert_matches_torch(chain, (loss_v, g, gx), ref, tolerance(chain, n, dtype),
                             what=f"{np.dtype(dtype).name} {loss} N={n} (B={chain._kernels(dtype)[1].B})")


# --------------------------------------------------------------------------------------
# strategies

#: widths: any of 1..40, with the remainders around 4/8/16/32/64 over-represented
WIDTHS = st.one_of(st.integers(1, 40),
                   st.sampled_from([1, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 23, 24, 25, 31, 33, 47, 63, 65,
                                    96, 129]))


@st.composite
def activations(draw):
    a = draw(st.sampled_from(ACTIVATIONS))
    event(f"activation {a}")
    return a


@st.composite
def dense_chains(draw):
    """``(chain, loss)``: 1-4 TurboDense layers, any activations, some without bias."""
    loss = draw(st.sampled_from(LOSSES))
    n_in = draw(WIDTHS)
    depth = draw(st.integers(1, 4))
    layers = []
    for i in range(depth):
        last = i == depth - 1
        out = draw(st.integers(2 if loss == "logitce" else 1, 17)) if last else draw(WIDTHS)
        layers.append(sc.TurboDense(out, draw(activations()), bias=draw(st.booleans())))
    return sc.SimpleChain(n_in, *layers), loss


@st.composite
def conv_layers(draw, shape):
    """A Conv that fits ``shape``: kernel (KH, KW) in 1..5 each (square half of the time),
    padding valid / same / int / (PH, PW), 1..9 channels."""
    _, h, w = shape
    KH = draw(st.integers(1, 5))
    KW = KH if draw(st.booleans()) else draw(st.integers(1, 5))
    mode = draw(st.sampled_from(["valid", "same", "int", "pair"]))
    if mode == "same" and (KH % 2 == 0 or KW % 2 == 0):
        mode = "pair"

    def pad(K, m):  # 0 <= P <= K - 1 (no output window entirely in the padding), K <= m + 2P
        return draw(st.integers(max(0, -(-(K - m) // 2)), K - 1))

    if mode == "valid" or (mode == "int" and KH != KW):
        KH, KW = min(KH, h), min(KW, w)
        padding = "valid"
        mode = "valid"
    elif mode == "same":
        padding = "same"
    elif mode == "int":
        lo = max(0, -(-(KH - min(h, w)) // 2))
        padding = draw(st.integers(lo, KH - 1))
    else:
        padding = (pad(KH, h), pad(KW, w))
    event(f"conv padding {mode}")
    event(f"conv kernel {KH}x{KW}")
    kernel = KH if KH == KW else (KH, KW)
    return sc.Conv(draw(st.integers(1, 9)), kernel, draw(activations()), padding=padding,
                   bias=draw(st.booleans()))


@st.composite
def conv_chains(draw):
    """``(chain, loss)``: (C, H, W) images (C 1..9, H, W 1..12), 1-3 Conv / MaxPool layers
    (at least one Conv), Flatten, then 0-2 TurboDense layers."""
    loss = draw(st.sampled_from(LOSSES))
    shape = (draw(st.integers(1, 9)), draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    n_img = draw(st.integers(1, 3))
    layers, cur, has_conv = [], shape, False
    for i in range(n_img):
        can_pool = min(cur[1:]) >= 2 and (has_conv or i < n_img - 1)
        if can_pool and draw(st.integers(0, 3)) == 0:
            k = draw(st.sampled_from([k for k in (2, 3) if k <= min(cur[1:])]))
            layer = sc.MaxPool(k)
            event(f"maxpool {k}")
        else:
            layer, has_conv = draw(conv_layers(cur)), True
        layers.append(layer)
        cur = sc.SimpleChain(shape, *layers).output_shape
    layers.append(sc.Flatten())
    n_flat = math.prod(cur)
    n_dense = draw(st.integers(1 if (loss == "logitce" and n_flat < 2) else 0, 2))
    event(f"dense layers after Flatten: {n_dense}")
    for i in range(n_dense):
        last = i == n_dense - 1
        out = draw(st.integers(2 if loss == "logitce" else 1, 12)) if last else draw(WIDTHS)
        layers.append(sc.TurboDense(out, draw(activations()), bias=draw(st.booleans())))
    return sc.SimpleChain(shape, *layers), loss


def batch_sizes(draw, B):
    """Three batch sizes: 1 or a few samples; around 8/16/32 lanes; beyond the block size
    ``B`` (more than one block: a full block plus a partial one, several blocks, and
    with 2 threads the batch is split over both)."""
    n_small = draw(st.sampled_from([1, 1, 2, 3, 5]))
    n_lanes = draw(st.sampled_from([7, 8, 9, 15, 16, 17, 31, 32, 33]))
    n_big = draw(st.one_of(st.integers(B + 1, 2 * B + 3), st.sampled_from([2 * B, 3 * B + 1])))
    return [n_small, n_lanes, n_big]


def run_example(torch, data, chain, loss, dtype):
    event(f"loss {loss}")
    B = chain._kernels(dtype)[1].B
    ns = batch_sizes(data.draw, B)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    scale = data.draw(st.sampled_from([0.5, 1.0, 2.0]), label="input scale")
    check_chain(torch, chain, dtype, loss, ns, seed, scale)


# --------------------------------------------------------------------------------------
# tests

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@settings(max_examples=N_DENSE)
@given(arch=dense_chains(), data=st.data())
def test_dense_chain_matches_torch(torch, dtype, arch, data):
    chain, loss = arch
    run_example(torch, data, chain, loss, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@settings(max_examples=N_CONV)
@given(arch=conv_chains(), data=st.data())
def test_conv_chain_matches_torch(torch, dtype, arch, data):
    chain, loss = arch
    run_example(torch, data, chain, loss, dtype)


#: one chain through all nine activations (widths not multiples of 4 or 8, a bias-free
#: layer), so every activation is checked whatever hypothesis draws above
ALL_ACT_CHAIN = (5, [(7, "identity", True), (9, "tanh", True), (3, "relu", True), (13, "sigmoid", False),
                     (6, "softplus", True), (17, "gelu", True), (5, "silu", True), (11, "elu", True),
                     (4, "leaky_relu", True)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_activation_and_loss(torch, dtype):
    n_in, spec = ALL_ACT_CHAIN
    assert sorted(a for _, a, _ in spec) == ACTIVATIONS
    chain = sc.SimpleChain(n_in, *[sc.TurboDense(o, a, bias=b) for o, a, b in spec])
    B = chain._kernels(dtype)[1].B
    for i, loss in enumerate(LOSSES):
        check_chain(torch, chain, dtype, loss, [1, 9, B + 5], seed=100 + i)


# --------------------------------------------------------------------------------------
# the helpers themselves

def test_float32_tolerance_grows_with_reductions():
    small = sc.SimpleChain(3, sc.TurboDense(4))
    big = sc.SimpleChain((3, 12, 12), sc.Conv(8, 5, "tanh"), sc.Flatten(), sc.TurboDense(10))
    assert float32_tolerance(small, 1) < 2e-5
    assert float32_tolerance(small, 1) < float32_tolerance(small, 1000) < float32_tolerance(big, 1000)
    assert float32_tolerance(big, 1000) < 1e-3


def test_unsafe_samples_flags_near_kinks(torch):
    """A relu input a few ulps from 0, a near-tied MaxPool window and a tiny AbsoluteLoss
    residual are flagged in float32, not in float64, and a clean sample is not."""
    chain = sc.SimpleChain((1, 2, 2), sc.Conv(1, 1), sc.MaxPool(2), sc.Flatten(),
                           sc.TurboDense(1, "relu"))
    p = np.array([1.0, 0.1, 1.0, 0.0])  # conv: x + 0.1 (inexact in float32); dense: relu(max)
    net, _ = torch_chain_model(torch, chain, p)
    X = np.array([[[[1.0, 0.5], [0.25, 0.0]]],              # clean
                  [[[1.0, 1.0 + 2.0**-22], [0.0, 0.0]]],    # MaxPool near-tie
                  [[[-1.0, -2.0], [-3.0, -1.0]]]])          # exact tie: structural, fine
    T = np.zeros((3, 1))
    np.testing.assert_array_equal(unsafe_samples(torch, net, X, T, "squared", np.float32),
                                  [False, True, False])
    np.testing.assert_array_equal(unsafe_samples(torch, net, X, T, "squared", np.float64),
                                  [False, False, False])
    chain2 = sc.SimpleChain(2, sc.TurboDense(1, "relu"))
    net2, _ = torch_chain_model(torch, chain2, np.array([1.0, -1.0, 0.0]))
    X2 = np.array([[1.0, 1.0 - 2.0**-22], [1.0, 0.5]])      # z = 2^-22, error bound ~6u
    np.testing.assert_array_equal(unsafe_samples(torch, net2, X2, np.zeros((2, 1)), "squared",
                                                 np.float32), [True, False])
    np.testing.assert_array_equal(unsafe_samples(torch, net2, X2, np.zeros((2, 1)), "squared",
                                                 np.float64), [False, False])
    T3 = np.array([[2.0**-22 + 1e-12], [3.0]])              # residual ~1e-12 from 0
    np.testing.assert_array_equal(unsafe_samples(torch, net2, X2, T3, "absolute", np.float32),
                                  [True, False])
