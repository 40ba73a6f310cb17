"""Layer steps called through a table (smallchains.compiler.linking): kernels reached through
the generated module's __getattr__, the parallel helper process, fresh processes loading the
cache, and the raw-pointer guard of the embedding kernels."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import smallchains as sc

CHAIN = sc.SimpleChain(3, sc.TurboDense(9, "tanh"), sc.TurboDense(6, "relu"), sc.TurboDense(2))

# A fresh process computes one batched VJP and prints it, with how many of the layer steps
# it bound were loaded from numba's cache (and how many there were).
_SCRIPT = textwrap.dedent("""
    import numpy as np
    import smallchains as sc
    from smallchains.compiler import linking
    chain = sc.SimpleChain(3, sc.TurboDense(9, "tanh"), sc.TurboDense(6, "relu"),
                           sc.TurboDense(2))
    k = chain.kernels(np.float64, block_size=8)
    rng = np.random.default_rng(0)
    X, Ybar = rng.standard_normal((11, 3)), rng.standard_normal((11, 2))
    p = sc.init_params(chain, seed=1, dtype=np.float64)
    Y, Xbar, pbar = np.empty((11, 2)), np.empty((11, 3)), np.empty(chain.n_params)
    k.valvjp_batch(X, p, Ybar, Y, Xbar, pbar, k.alloc_work())
    hits = sum(f.cache_hits for f in linking._bound.values())
    print(len(linking._bound), hits)
    print(np.concatenate([Y.ravel(), Xbar.ravel(), pbar]).tobytes().hex())
""")


def _run(cache, workers):
    # a fresh kernel cache (the generated module's numba cache goes with it); the library's
    # own cached functions stay warm
    env = dict(os.environ, SMALLCHAINS_CACHE_DIR=str(cache),
               SMALLCHAINS_COMPILE_WORKERS=str(workers))
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    counts, values = r.stdout.split("\n")[:2]
    n, hits = map(int, counts.split())
    return n, hits, values


def test_parallel_serial_and_cached_compiles_agree(tmp_path):
    n, hits, parallel = _run(tmp_path / "a", 1)
    assert n >= 4  # forward steps (shared by inference and training) and pullbacks
    assert 0 < hits < n, "the helper process compiled none of the steps"
    n_serial, hits_serial, serial = _run(tmp_path / "b", 0)
    assert (n_serial, hits_serial) == (n, 0)
    n_warm, hits_warm, warm = _run(tmp_path / "a", 1)  # new process, same cache
    assert (n_warm, hits_warm) == (n, n)
    assert parallel == serial == warm  # bit for bit


def test_unknown_kernel_is_attribute_error():
    mod, _ = CHAIN._kernels(np.float32)
    with pytest.raises(AttributeError, match="no_such_kernel"):
        mod.no_such_kernel
    assert callable(mod.forward_range)


def test_embedding_kernels_reject_strided_arrays():
    k = CHAIN.kernels(np.float64)
    p = sc.init_params(CHAIN, seed=0, dtype=np.float64)
    strided = np.zeros(2 * p.size)[::2]
    strided[:] = p
    x, y = np.ones(3), np.empty(2)
    with pytest.raises(ValueError, match="C-contiguous"):
        k.forward(x, strided, y, k.alloc_work())
    pbar = np.zeros(2 * p.size)
    with pytest.raises(ValueError, match="C-contiguous"):
        k.vjp_batch(np.ones((4, 3)), p, np.ones((4, 2)), np.empty((4, 3)), pbar[::2],
                    k.alloc_work())
    k.forward(x, p, y, k.alloc_work())  # the contiguous call works
    np.testing.assert_allclose(y, CHAIN(x, p), rtol=1e-12)


def test_embedding_kernels_reject_other_dtype():
    from numba.core.errors import TypingError

    k = CHAIN.kernels(np.float32, block_size=8)
    X, Y = np.ones((4, 3)), np.empty((4, 2))  # float64 arrays for float32 kernels
    with pytest.raises(TypingError, match="generated for float32"):
        k.forward_batch(X, np.zeros(CHAIN.n_params), Y, np.zeros(k.work_size))


def test_bad_compile_workers_setting(monkeypatch):
    from smallchains.compiler import linking

    monkeypatch.setenv("SMALLCHAINS_COMPILE_WORKERS", "many")
    with pytest.raises(ValueError, match="SMALLCHAINS_COMPILE_WORKERS"):
        linking._workers()
    monkeypatch.setenv("SMALLCHAINS_COMPILE_WORKERS", "0")
    assert linking._workers() == 0


_PICKLED = textwrap.dedent("""
    import pickle, sys
    import numpy as np
    import smallchains as sc
    chain = sc.SimpleChain(3, sc.TurboDense(9, "tanh"), sc.TurboDense(6, "relu"),
                           sc.TurboDense(2))
    from smallchains.compiler import get_kernels, linking
    mod, plan = get_kernels(chain.input_shape, chain.layers, np.float64, B=8)
    mod.forward_batch  # binds the forward steps only
    before = len(linking._bound)
    vjp_batch = pickle.loads(bytes.fromhex(sys.argv[1]))
    rng = np.random.default_rng(0)
    X, Ybar = rng.standard_normal((11, 3)), rng.standard_normal((11, 2))
    p = sc.init_params(chain, seed=1, dtype=np.float64)
    Xbar, pbar = np.empty((11, 3)), np.empty(chain.n_params)
    vjp_batch(X, p, Ybar, Xbar, pbar, np.zeros(plan.work_size))
    print(np.concatenate([Xbar.ravel(), pbar]).tobytes().hex(), before, len(linking._bound))
""")


def test_kernel_that_skipped_getattr_binds_its_steps(tmp_path):
    # A dispatcher pickled to another process is rebuilt without the module's __getattr__:
    # its table slots still hold the binding trampolines, so it computes the right VJP.
    import pickle

    k = CHAIN.kernels(np.float64, block_size=8)
    rng = np.random.default_rng(0)
    X, Ybar = rng.standard_normal((11, 3)), rng.standard_normal((11, 2))
    p = sc.init_params(CHAIN, seed=1, dtype=np.float64)
    Xbar, pbar = np.empty((11, 3)), np.empty(CHAIN.n_params)
    k.vjp_batch(X, p, Ybar, Xbar, pbar, k.alloc_work())
    env = dict(os.environ, SMALLCHAINS_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", _PICKLED, pickle.dumps(k.vjp_batch).hex()],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out, before, after = r.stdout.split()
    assert int(before) < int(after)  # the pullback steps were bound by their trampolines
    got = np.frombuffer(bytes.fromhex(out))
    np.testing.assert_allclose(got, np.concatenate([Xbar.ravel(), pbar]), rtol=1e-12, atol=0)
