"""Accuracy and vectorisation tests for smallchains._fastmath."""
import math
import re

import numba
import numpy as np
import pytest

from smallchains._fastmath import FASTMATH, exp_f32, sigmoid_f32, tanh_f32, tanh_f64

_FM = set(FASTMATH)


# --------------------------------------------------------------------------
# loop kernels (the intended use: scalar helpers inlined into an njit loop)
# --------------------------------------------------------------------------
@numba.njit(fastmath=_FM, error_model="numpy")
def _tanh_loop(x, out):
    for i in range(x.size):
        out[i] = tanh_f32(x[i])


@numba.njit(fastmath=_FM, error_model="numpy")
def _exp_loop(x, out):
    for i in range(x.size):
        out[i] = exp_f32(x[i])


@numba.njit(fastmath=_FM, error_model="numpy")
def _sigmoid_loop(x, out):
    for i in range(x.size):
        out[i] = sigmoid_f32(x[i])


@numba.njit(fastmath=_FM, error_model="numpy")
def _libm_tanh_loop(x, out):
    # positive control for the assembly check: this one *does* call tanhf
    for i in range(x.size):
        out[i] = math.tanh(x[i])


def _run(loop, x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    loop(x, out)
    return out


def _ref_sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _random_f32_bits(n, seed=0):
    """Uniformly random float32 bit patterns (all exponents, inf, NaN)."""
    bits = np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint64)
    return bits.astype(np.uint32).view(np.float32)


# Dense grids: ~2.4M points over the interesting range, plus log-spaced
# magnitudes across the full float32 range.
_LOGMAG = np.logspace(-45, 38.5, 200_001).astype(np.float32)
_GRID = np.concatenate([
    np.linspace(-12.0, 12.0, 2_400_001, dtype=np.float32),
    _LOGMAG, -_LOGMAG,
])

EDGE = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1e-20, -1e-20,
                 1e-7, -1e-7, 9.0, -9.0, 20.0, -20.0, 1e4, -1e4,
                 3.4e38, -3.4e38, np.inf, -np.inf], dtype=np.float32)


# --------------------------------------------------------------------------
# tanh
# --------------------------------------------------------------------------
TANH_ABS_TOL = 5e-7


def test_tanh_dense_grid_abs_error():
    got = _run(_tanh_loop, _GRID)
    assert got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - np.tanh(_GRID.astype(np.float64)))
    assert err.max() <= TANH_ABS_TOL, (err.max(), _GRID[np.argmax(err)])


def test_tanh_random_bit_patterns():
    x = _random_f32_bits(1_000_000, seed=1)
    got = _run(_tanh_loop, x)
    nan = np.isnan(x)
    assert np.array_equal(np.isnan(got), nan)
    with np.errstate(invalid="ignore"):
        err = np.abs(got[~nan].astype(np.float64) - np.tanh(x[~nan].astype(np.float64)))
    assert err.max() <= TANH_ABS_TOL


def test_tanh_edge_cases():
    got = _run(_tanh_loop, EDGE).astype(np.float64)
    ref = np.tanh(EDGE.astype(np.float64))
    assert np.all(np.abs(got - ref) <= TANH_ABS_TOL)
    # saturation is exact and never overshoots
    big = np.array([9.0, 20.0, 1e4, 3.4e38, np.inf], dtype=np.float32)
    assert np.all(_run(_tanh_loop, big) == 1.0)
    assert np.all(_run(_tanh_loop, -big) == -1.0)
    assert np.all(np.abs(_run(_tanh_loop, _GRID)) <= 1.0)
    # tiny arguments: tanh(x) ~ x, relative accuracy, sign preserved
    tiny = np.array([1e-38, 1e-30, 1e-20, 1e-10, 1e-5], dtype=np.float32)
    for t in (tiny, -tiny):
        got_t = _run(_tanh_loop, t).astype(np.float64)
        assert np.all(np.abs(got_t - t) <= 2e-7 * np.abs(t))
        assert np.all(np.sign(got_t) == np.sign(t))
    assert _run(_tanh_loop, np.zeros(3, np.float32))[0] == 0.0


def test_tanh_nan_and_odd_symmetry():
    assert np.isnan(_run(_tanh_loop, np.array([np.nan, -np.nan], np.float32))).all()
    x = np.linspace(0.0, 12.0, 100_001, dtype=np.float32)
    assert np.array_equal(_run(_tanh_loop, -x), -_run(_tanh_loop, x))


def test_tanh_callable_as_scalar():
    assert abs(float(tanh_f32(np.float32(0.5))) - math.tanh(0.5)) <= TANH_ABS_TOL


# --------------------------------------------------------------------------
# exp
# --------------------------------------------------------------------------
EXP_REL_TOL = 2e-6


def test_exp_dense_grid_rel_error():
    x = np.concatenate([
        np.linspace(-87.0, 88.0, 3_000_001, dtype=np.float32),
        np.linspace(-1.0, 1.0, 200_001, dtype=np.float32),
        np.array([88.5, 88.72, -87.0, 88.0], np.float32),
    ])
    got = _run(_exp_loop, x)
    assert got.dtype == np.float32
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(got.astype(np.float64) - ref) / ref
    assert rel.max() <= EXP_REL_TOL, (rel.max(), x[np.argmax(rel)])


def test_exp_tiny_arguments():
    t = np.concatenate([_LOGMAG[_LOGMAG < 1e-3], -_LOGMAG[_LOGMAG < 1e-3], [0.0, -0.0]])
    got = _run(_exp_loop, t.astype(np.float32)).astype(np.float64)
    ref = np.exp(t.astype(np.float32).astype(np.float64))
    assert np.all(np.abs(got - ref) <= EXP_REL_TOL * ref)
    assert float(exp_f32(np.float32(0.0))) == 1.0


def test_exp_underflow_overflow_nan():
    # results below the smallest normal: absolute error of a subnormal ulp
    x = np.linspace(-110.0, -87.0, 200_001, dtype=np.float32)
    got = _run(_exp_loop, x).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.all(got >= 0.0)
    assert np.all(np.abs(got - ref) <= 2.0**-149)
    neg = np.array([-104.0, -110.0, -200.0, -1e4, -3.4e38, -np.inf], np.float32)
    assert np.all(_run(_exp_loop, neg) == 0.0)
    pos = np.array([88.73, 88.8, 89.0, 100.0, 1e4, 3.4e38, np.inf], np.float32)
    assert np.all(np.isposinf(_run(_exp_loop, pos)))
    assert np.isfinite(_run(_exp_loop, np.array([88.72], np.float32))).all()
    assert np.isnan(_run(_exp_loop, np.array([np.nan, -np.nan], np.float32))).all()


def test_exp_random_bit_patterns():
    x = _random_f32_bits(1_000_000, seed=2)
    got = _run(_exp_loop, x)
    nan = np.isnan(x)
    assert np.array_equal(np.isnan(got), nan)
    xd = x[~nan].astype(np.float64)
    with np.errstate(over="ignore"):
        ref = np.exp(xd).astype(np.float32)  # float32-rounded reference
    g = got[~nan]
    assert np.array_equal(np.isposinf(g), np.isposinf(ref))
    fin = np.isfinite(ref)
    exact = np.exp(xd[fin])
    err = np.abs(g[fin].astype(np.float64) - exact)
    # relative tolerance for normal results, one subnormal ulp below that
    assert np.all(err <= np.maximum(EXP_REL_TOL * exact, 2.0**-149))


# --------------------------------------------------------------------------
# sigmoid
# --------------------------------------------------------------------------
SIGMOID_ABS_TOL = 1e-6


def test_sigmoid_dense_grid_abs_error():
    got = _run(_sigmoid_loop, _GRID)
    assert got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - _ref_sigmoid(_GRID))
    assert err.max() <= SIGMOID_ABS_TOL, (err.max(), _GRID[np.argmax(err)])


def test_sigmoid_edge_cases():
    got = _run(_sigmoid_loop, EDGE).astype(np.float64)
    assert np.all(np.abs(got - _ref_sigmoid(EDGE)) <= SIGMOID_ABS_TOL)
    assert float(sigmoid_f32(np.float32(0.0))) == 0.5
    big = np.array([20.0, 1e4, 3.4e38, np.inf], np.float32)
    assert np.all(_run(_sigmoid_loop, big) == 1.0)
    assert np.all(_run(_sigmoid_loop, -big) == 0.0)
    assert np.all((got >= 0.0) & (got <= 1.0))
    assert np.isnan(_run(_sigmoid_loop, np.array([np.nan], np.float32))).all()


# --------------------------------------------------------------------------
# vectorisation: generated assembly has packed FMAs and no libm calls
# --------------------------------------------------------------------------
_LIBM = re.compile(r"\b(tanhf?|expf?|__tanhf?_finite|__expf?_finite)\b")


def _asm(loop):
    x = np.zeros(64, np.float32)
    loop(x, np.empty_like(x))
    return loop.inspect_asm(loop.signatures[0])


def test_asm_detector_positive_control():
    # make sure the libm-call regex would catch a non-vectorised loop
    assert _LIBM.search(_asm(_libm_tanh_loop))


@pytest.mark.parametrize("loop, packed", [
    (_tanh_loop, r"vfmadd\w*ps\s+%[yz]mm"),
    (_sigmoid_loop, r"vfmadd\w*ps\s+%[yz]mm"),
    (_exp_loop, r"vfmadd\w*pd\s+%[yz]mm"),
])
def test_loops_vectorize_without_libm_calls(loop, packed):
    asm = _asm(loop)
    assert not _LIBM.search(asm), _LIBM.search(asm).group(0)
    assert re.search(packed, asm), "no packed ymm/zmm FMA: loop not vectorised"


# --------------------------------------------------------------------------
# float64 tanh (used by float64 chains)
# --------------------------------------------------------------------------
@numba.njit(fastmath=_FM, error_model="numpy")
def _tanh64_loop(x, out):
    for i in range(x.size):
        out[i] = tanh_f64(x[i])


def _tanh64(x):
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(x)
    _tanh64_loop(x, out)
    return out


@pytest.mark.parametrize("scale", [1e-300, 1e-8, 1e-3, 0.1, 0.5, 1.0, 3.0, 10.0, 30.0])
def test_tanh_f64_within_4_ulp(scale):
    x = np.random.default_rng(7).standard_normal(1_000_000) * scale
    got, ref = _tanh64(x), np.tanh(x)
    ulp = np.spacing(np.abs(ref))
    assert np.all(np.abs(got - ref) <= 4 * ulp), np.max(np.abs(got - ref) / ulp)


def test_tanh_f64_edges_and_oddness():
    x = np.array([0.0, -0.0, 5e-324, -5e-324, 19.0, 20.0, 21.0, 1e300, np.inf, -np.inf])
    got, ref = _tanh64(x), np.tanh(x)
    assert np.all(np.abs(got - ref) <= np.spacing(np.abs(ref)))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))  # -0.0 stays -0.0
    assert np.isnan(_tanh64(np.array([np.nan]))[0])
    g = np.linspace(0.0, 25.0, 100_001)
    np.testing.assert_array_equal(_tanh64(-g), -_tanh64(g))
    assert np.all(np.abs(_tanh64(g)) <= 1.0)


def test_tanh_f64_loop_is_vectorised():
    asm = _tanh64_loop.inspect_asm(_tanh64_loop.signatures[0])
    assert re.search(r"vdivpd\s+%[yz]mm", asm), "tanh_f64 loop did not vectorise"
    assert not re.search(r"call\w*\s+\S*tanh", asm)  # no libm call
