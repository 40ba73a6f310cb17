"""Vectorisable float32 approximations of tanh / exp / sigmoid for numba.

llvmlite ships no SVML, so ``math.tanh`` / ``math.exp`` inside an ``@njit``
loop are scalar libm calls that stop LLVM from vectorising the loop.  The
functions here use only +, -, *, /, comparisons/selects and int<->float
conversions, so a loop such as::

    @numba.njit(fastmath=FASTMATH, error_model="numpy")
    def act(x, out):
        for i in range(x.size):
            out[i] = tanh_f32(x[i])

compiles to packed AVX/AVX-512 code (see ``tests/test_fastmath.py``).

Use ``fastmath=FASTMATH`` (no ``nnan``/``ninf``: NaN and inf keep IEEE
semantics) and ``error_model="numpy"`` in the calling kernel as well; the
latter removes the zero-division check that would otherwise block
vectorisation.  All constants are float32 module globals so float32
arithmetic is not promoted to float64 by numba's float64 literals.

Accuracy (measured exhaustively over every float32 in the stated range,
reference = numpy float64):

* ``tanh_f32``    max abs error 3.24e-7 (all float32; spec 5e-7); exactly
  odd; ``|x| >= 9`` gives exactly +-1; result never leaves [-1, 1]; NaN -> NaN.
* ``exp_f32``     max rel error 8.0e-8 on [-87, 88] (float32 rounding is
  6e-8); computed in float64 lanes internally (see below); 0 for
  x <= -104, inf for x >= 88.73, NaN -> NaN.
* ``sigmoid_f32`` ``0.5 + 0.5*tanh(x/2)``, max abs error 1.9e-7.

Coefficients come from ``tools/fit_tanh.py``: tanh is an absolute-error
minimax odd rational x*P(x^2)/Q(x^2) (deg 4/4, Q(0)=1) on [0, 9] found by
Loeb's iteration (weighted linear minimax |x*P - tanh*Q| / Q_prev solved as
an LP with scipy HiGHS on a dense grid, in rescaled correction form); the
exp inner polynomial is a linear relative-error minimax LP.  Coefficients
were then rounded to float32 (exact-arithmetic error 1.8e-8 -> 3.5e-8; the
rest of the 3.2e-7 is float32 evaluation rounding near |tanh| ~ 1).
"""
import math

import numpy as np
import numba
from llvmlite import ir
from numba import types
from numba.core import errors
from numba.extending import intrinsic, overload

__all__ = ["FASTMATH", "tanh_f32", "tanh_f64", "exp_f32", "sigmoid_f32", "exp_like"]

# Everything except nnan / ninf, so NaN / inf propagate with IEEE semantics.
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

_jit = numba.njit(fastmath=set(FASTMATH), error_model="numpy", cache=True)

# ---------------------------------------------------------------------------
# tanh: odd rational  x * P(x^2) / Q(x^2)  on |x| <= 9 (degree 4/4 in x^2),
# absolute-error minimax fit (exact-arithmetic error 1.85e-8).  tanh(9) is
# 1 - 3.0e-8, which is 1.0 in float32, so |x| is clamped to 9 (as s = x^2 <= 81).
# ---------------------------------------------------------------------------
_TANH_S_BOUND = np.float32(81.0)  # x^2 at the clamp |x| = 9
_ONE = np.float32(1.0)
_NONE = np.float32(-1.0)
_HALF = np.float32(0.5)

_TP0 = np.float32(0.9999998807907104)
_TP1 = np.float32(0.13373197615146637)
_TP2 = np.float32(0.003486580913886428)
_TP3 = np.float32(2.0471816242206842e-05)
_TP4 = np.float32(1.318420661533537e-08)
_TQ1 = np.float32(0.4670649468898773)
_TQ2 = np.float32(0.025841975584626198)
_TQ3 = np.float32(0.00032713840482756495)
_TQ4 = np.float32(7.702656148467213e-07)


@_jit
def tanh_f32(x):
    """float32 tanh(x); plain arithmetic, vectorises in numba loops."""
    x = np.float32(x)
    # Clamps as min/max: numba's min(a, b) keeps a when the comparison is false, so NaN
    # passes through, and LLVM emits one vminps/vmaxps each (the equivalent
    # `B if x > B else x` became compare + blend: the whole tanh ~30% slower on Zen 3).
    # Only s = x^2 is clamped (to 81, i.e. |x| to 9): for |x| > 9, x * P(81) / Q(81)
    # has |r| >= 1 and the output clamp makes it exactly +-1 (checked over every float32
    # >= 9). One op fewer than clamping x to [-9, 9]: 14 vector ops per 8 floats, and
    # the pass is op-bound (tanh of matexp's 4 -> 32 layer: 7% faster on Zen 3).
    s = min(x * x, _TANH_S_BOUND)
    p = (((_TP4 * s + _TP3) * s + _TP2) * s + _TP1) * s + _TP0
    q = (((_TQ4 * s + _TQ3) * s + _TQ2) * s + _TQ1) * s + _ONE
    r = (x * p) / q
    return max(min(r, _ONE), _NONE)


@_jit
def sigmoid_f32(x):
    """float32 logistic sigmoid 1/(1+exp(-x)) = 0.5 + 0.5*tanh(x/2)."""
    x = np.float32(x)
    return _HALF + _HALF * tanh_f32(_HALF * x)


# ---------------------------------------------------------------------------
# exp: without bit-casting there is no cheap 2^k, so use
#     exp(x) = exp(x / 256) ** 256
# evaluated in float64: a degree-7 minimax polynomial for exp(y) on
# y in [-104/256, 89/256] (rel. error 7.9e-11) followed by 8 squarings
# (error amplified x256 -> 2e-8, plus float64 rounding ~1e-14), then one
# rounding to float32.  Squaring in float32 would amplify float32 rounding
# by 256, so float64 is required; the loop still vectorises (8 f64 lanes
# per zmm), at roughly half the throughput of a pure-float32 kernel.
# x is clamped to [-104, 89]: exp(-104) < 2^-150 rounds to 0.0f and
# exp(89) > FLT_MAX rounds to inf.
# ---------------------------------------------------------------------------
_EXP_HI = 89.0
_EXP_LO = -104.0
_EXP_SCALE = 1.0 / 256.0
_EC0 = 0.9999999999546235
_EC1 = 1.000000001319171
_EC2 = 0.5000000116198112
_EC3 = 0.1666665778610401
_EC4 = 0.04166619949911123
_EC5 = 0.008334791179285558
_EC6 = 0.0013949546751681132
_EC7 = 0.00019192500253496414


@_jit
def exp_f32(x):
    """float32 exp(x) (computed in float64 internally), vectorises."""
    y = np.float64(x)
    y = max(min(y, _EXP_HI), _EXP_LO)  # NaN passes through (see tanh_f32)
    y = y * _EXP_SCALE
    p = ((((((_EC7 * y + _EC6) * y + _EC5) * y + _EC4) * y + _EC3) * y
          + _EC2) * y + _EC1) * y + _EC0
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    return np.float32(p)


# ---------------------------------------------------------------------------
# float64 tanh for float64 chains (ODE right-hand sides call tanh per element per stage;
# libm's scalar tanh is a call per element, ~24 ns, and blocks vectorization).
#     tanh(|x|) = e / (e + 2),   e = expm1(2|x|) = 2^k (1 + q) - 1
# with 2|x| = k ln2 + r, |r| <= ln2/2 (Cody-Waite split of ln2 into a head with trailing
# zero bits, exact for k < 2^11, and a tail), q = expm1(r) by its Taylor series to r^13
# (truncation < 1.2e-17 relative), 2^k built from its exponent bits. For k = 0, e = q exactly, so
# small |x| keeps full relative accuracy; for k >= 1, e >= 0.41 and the subtraction loses
# at most two bits. |x| is clamped to 20 (tanh(20) rounds to 1.0). Measured: <= 3 ulp
# against numpy on 10^6 normal samples at each scale 1e-8..30 (tests/test_fastmath.py),
# ~2.6 ns per element in a vectorized loop on an AVX-512 Xeon (libm: ~24 ns). k and 2^k
# come from bit patterns (_ROUND, _bits, _from_bits), not float <-> int64 conversions:
# AVX2 has no packed instructions for those, and on a Zen 3 they made the loop scalar
# (4.14 ns per element; with the bit patterns 2.43 ns). Compiled without
# ``reassoc``/``afn`` so the ln2 split is evaluated as written.
# ---------------------------------------------------------------------------
_jit64 = numba.njit(fastmath={"nsz", "contract"}, error_model="numpy", cache=True)
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00


@intrinsic
def _bits(typingctx, x):
    """The IEEE bits of a float64 as an int64 (an LLVM bitcast: vectorizes, unlike numba's
    float <-> int64 conversions, which AVX2 has no packed instructions for)."""
    if x != types.float64:
        raise errors.TypingError(f"_bits: expected float64, got {x}")

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(x), codegen


@intrinsic
def _from_bits(typingctx, i):
    """The float64 whose IEEE bits are the int64 ``i`` (bitcast)."""
    if i != types.int64:
        raise errors.TypingError(f"_from_bits: expected int64, got {i}")

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(i), codegen


# y / ln2 + _ROUND has its integer part in the low mantissa bits: minus _ROUND it is y / ln2
# rounded to the nearest integer, and its bits minus _ROUND's are that integer k
_ROUND = 6755399441055744.0  # 1.5 * 2^52
_ROUND_BITS = 0x4338000000000000


@_jit64
def tanh_f64(x):
    """float64 tanh(x) to a few ulp; plain arithmetic, vectorises in numba loops."""
    x = np.float64(x)
    a = abs(x)
    a = min(a, 20.0)  # NaN passes through (see tanh_f32)
    y = a + a
    t = y * _INV_LN2 + _ROUND
    kf = t - _ROUND  # k = round(y / ln2), 0..58, exactly (no reassoc: not folded away)
    r = (y - kf * _LN2_HI) - kf * _LN2_LO
    q = r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r * (
        1 / 5040 + r * (1 / 40320 + r * (1 / 362880 + r * (1 / 3628800 + r * (
            1 / 39916800 + r * (1 / 479001600 + r * (1 / 6227020800)))))))))))))
    # 2^k from its bits: exponent field k + 1023 (a NaN x gives garbage bits here, but q
    # and so the result stay NaN)
    s = _from_bits((_bits(t) - _ROUND_BITS + 1023) << 52)
    e = s * q + (s - 1.0)
    t = e / (e + 2.0)
    return math.copysign(t, x)


def exp_like(x):
    """exp(x) in the floating type of ``x``, for kernels compiled for both dtypes: float32
    through :func:`exp_f32` (vectorizes), float64 through ``math.exp`` (libm; a scalar
    call)."""
    return math.exp(x)


@overload(exp_like, inline="always")
def _exp_like_impl(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    if isinstance(x, types.Float):
        return lambda x: math.exp(x)
    return None
