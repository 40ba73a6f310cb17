"""The on-disk kernel cache (smallchains.compiler.cache): falling back to a per-user
temporary directory when the cache directory cannot be written, no half-imported module
left in sys.modules, recompiling over truncated numba cache files, clear_cache/cache_info.

Every test uses its own cache directory and a chain (or width) no other test uses: the
generated module's name is a hash of its source, so a chain already imported in this
process would not touch the new directory at all."""

import os
import pickletools
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import smallchains as sc
from smallchains.compiler import codegen, linking

from conftest import assert_close, numpy_forward

PREFIX = "_smallchains_kernels_"


@pytest.fixture
def fallback(tmp_path, monkeypatch):
    """tempfile.gettempdir() -> tmp_path/tmp (where the fallback directory goes), and the
    fallback warning not issued yet in this process."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    cache = sys.modules.get("smallchains.compiler.cache")
    if cache is not None:
        monkeypatch.setattr(cache, "_warned", False)
    return tmp / f"smallchains-{os.getuid()}" / "kernels"


def _data(n_in, seed=0):
    return np.random.default_rng(seed).standard_normal((7, n_in))


# --------------------------------------------------------------------------------------
# 1. a cache directory that cannot be written

def test_uncreatable_cache_dir_falls_back_to_temp_dir(tmp_path, monkeypatch, fallback):
    # a path under a regular file cannot be created, not even by root
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SMALLCHAINS_CACHE_DIR", str(blocker / "kernels"))
    chain = sc.SimpleChain(3, sc.TurboDense(21, "tanh"), sc.TurboDense(2))
    p = sc.init_params(chain, seed=0, dtype=np.float64)
    X = _data(3)
    with pytest.warns(UserWarning, match="cannot be written"):
        Y = chain(X, p)
    assert_close(Y, numpy_forward(chain, X, p), np.float64)
    mod, _ = chain._kernels(np.float64)
    assert Path(mod.__file__).parent == fallback
    assert list((fallback / "__pycache__").glob(PREFIX + "*.nbi"))  # numba caches there too
    # one warning per process: the next new chain falls back silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod2, _ = codegen.get_kernels((3,), [sc.TurboDense(22, "tanh"), sc.TurboDense(2)],
                                      np.float64)
    assert Path(mod2.__file__).parent == fallback


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes to a read-only directory anyway")
def test_read_only_cache_dir_falls_back_to_temp_dir(tmp_path, monkeypatch, fallback):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setenv("SMALLCHAINS_CACHE_DIR", str(ro))
    try:
        with pytest.warns(UserWarning, match="cannot be written"):
            mod, _ = codegen.get_kernels((3,), [sc.TurboDense(24, "tanh"), sc.TurboDense(2)],
                                         np.float64)
    finally:
        ro.chmod(0o755)
    assert Path(mod.__file__).parent == fallback


def test_fallback_dir_writable_by_others_is_refused(tmp_path, monkeypatch, fallback):
    # a temporary directory others can write to could hold someone else's machine code
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SMALLCHAINS_CACHE_DIR", str(blocker / "kernels"))
    fallback.parent.mkdir()
    fallback.parent.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        codegen.get_kernels((3,), [sc.TurboDense(25, "tanh"), sc.TurboDense(2)], np.float64)


# --------------------------------------------------------------------------------------
# 2. a generated module whose import fails

def test_failed_import_leaves_no_module_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("SMALLCHAINS_CACHE_DIR", str(tmp_path / "kernels"))
    layers = [sc.TurboDense(23, "tanh"), sc.TurboDense(2)]

    def refused(symbol, namespace):
        raise RuntimeError("cannot export the step table")

    before = {m for m in sys.modules if m.startswith(PREFIX)}
    with monkeypatch.context() as m:
        m.setattr(linking, "StepTable", refused)  # the module's import creates its table
        with pytest.raises(RuntimeError, match="cannot export the step table"):
            codegen.get_kernels((3,), layers, np.float64)
    assert {m for m in sys.modules if m.startswith(PREFIX)} == before
    # the next attempt imports the module again, completely
    mod, _ = codegen.get_kernels((3,), layers, np.float64)
    assert isinstance(vars(mod).get("_TABLE"), linking.StepTable)
    assert "__getattr__" in vars(mod)


# --------------------------------------------------------------------------------------
# 3. truncated numba cache files

# a fresh process evaluates a chain and prints the output's bytes
_SCRIPT = textwrap.dedent("""
    import numpy as np
    import smallchains as sc
    chain = sc.SimpleChain(3, sc.TurboDense(19, "tanh"), sc.TurboDense(6, "relu"),
                           sc.TurboDense(2))
    p = sc.init_params(chain, seed=0, dtype=np.float64)
    X = np.random.default_rng(0).standard_normal((7, 3))
    print(chain(X, p).tobytes().hex())
""")


def _run(cache):
    env = dict(os.environ, SMALLCHAINS_CACHE_DIR=str(cache), SMALLCHAINS_COMPILE_WORKERS="0")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _is_pickles(data: bytes, n: int) -> bool:
    """``data`` starts with ``n`` complete pickles."""
    import io

    f = io.BytesIO(data)
    try:
        for _ in range(n):
            for _ in pickletools.genops(f):
                pass
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("suffix", [".nbi", ".nbc"])
def test_truncated_numba_cache_files_are_recompiled(tmp_path, suffix):
    cache = tmp_path / "kernels"
    first = _run(cache)
    files = sorted((cache / "__pycache__").glob(PREFIX + "*" + suffix))
    assert len(files) >= 3  # the kernel and the layer steps
    for i, f in enumerate(files):
        data = f.read_bytes()
        f.write_bytes(data[:0 if i == 0 else len(data) // 2])
    assert _run(cache) == first
    # and numba wrote them again
    for f in files:
        assert _is_pickles(f.read_bytes(), 2 if suffix == ".nbi" else 1), f.name


# --------------------------------------------------------------------------------------
# 3b. cached training loops in a process whose threading layer has not started

# a fresh process trains a small chain with train_batched or train_unbatched
_TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import smallchains as sc
    chain = sc.SimpleChain(3, sc.TurboDense(17, "tanh"), sc.TurboDense(1))
    X = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    model = sc.add_loss(chain, sc.SquaredLoss(X[:, :1].copy()))
    p = sc.init_params(chain, seed=0)
    G = sc.alloc_threaded_grad(chain, 2)
    if sys.argv[1] == "batched":
        h = sc.train_batched(G, p, model, X, sc.Adam(1e-3), 2, batch_size=16)
    else:
        h = sc.train_unbatched(G, p, model, X, sc.Adam(1e-3), 2)
    print(np.asarray(h).tobytes().hex(), p.tobytes().hex())
""")


def test_training_loop_cached_after_its_parallel_step_was_loaded(tmp_path):
    """Process 1 compiles train_batched_loop and the parallel _step it calls; process 2
    loads _step from the cache and compiles train_unbatched_loop, whose cache entry numba
    (0.68) then writes without "start the threading layer on load"; process 3 loads that
    entry before anything started the layer. Without loops._compile starting the layer
    first, process 3 aborted: "LLVM ERROR: Symbol not found: allocate_sched"."""
    env = dict(os.environ, SMALLCHAINS_CACHE_DIR=str(tmp_path / "kernels"),
               NUMBA_CACHE_DIR=str(tmp_path / "numba"))  # the loops' own entries too

    def run(which):
        r = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, which], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{which}: exit {r.returncode}: {r.stderr[-2000:]}"
        return r.stdout

    run("batched")
    compiled = run("unbatched")
    assert run("unbatched") == compiled  # loaded from the cache, same results


# --------------------------------------------------------------------------------------
# 3c. a custom loss from a module that a later process cannot import

# the loss function's module: executed from its file, never registered in sys.modules (as
# tests/conftest.py's load_example does), so numba records its globals as '<dynamic>'
_LOSS_MODULE = textwrap.dedent("""
    import numba
    import numpy as np
    W = np.array([1.0, 2.0])

    @numba.njit
    def weighted_sq(yhat, y, grad):
        t = yhat.dtype.type(0.0)
        for j in range(yhat.shape[0]):
            u = yhat[j] - y[j]
            t += W[j] * u * u
            grad[j] = 2 * W[j] * u
        return t
""")

_LOSS_SCRIPT = textwrap.dedent("""
    import importlib.util, sys, warnings
    import numba
    import numpy as np
    # a different number of functions compiled before: numba's environment names differ
    # from the first process's, as in any longer-running process
    for i in range(int(sys.argv[2])):
        exec(f"def _f{i}(x): return x + {i}")
        numba.njit(globals()[f"_f{i}"])(1.0)
    spec = importlib.util.spec_from_file_location("_loss_not_importable", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import smallchains as sc
    if sys.argv[3] == "pretend-importable":  # what the library cannot see: the fallback
        sc.losses._importable = lambda name: True
    chain = sc.SimpleChain(1, sc.TurboDense(5, "tanh"), sc.TurboDense(2))
    X = np.linspace(-1, 1, 9)[:, None]
    loss = sc.CustomLoss(mod.weighted_sq, np.zeros((9, 2)))
    print(loss.disk_cached)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        value, g = sc.valgrad(sc.add_loss(chain, loss), X, sc.init_params(chain, seed=0, dtype=np.float64))
    print(sorted({str(x.message).split(" (")[0] for x in w if x.category is RuntimeWarning}))
    print(repr(value), g.tobytes().hex())
""")


@pytest.mark.parametrize("mode", ["detected", "pretend-importable"])
def test_custom_loss_of_unimportable_module_across_processes(tmp_path, mode):
    """CI failure at 9b71312: a chain kernel calling a CustomLoss function of a module that
    was executed from a file without registration, cached on disk by one process, failed
    to load in another: "ModuleNotFoundError: No module named '<dynamic>'". Detected, such a
    loss's kernels are not written to numba's disk cache; undetected (pretended
    importable), loops._compile compiles the kernel again after the failed load, with a
    RuntimeWarning. Both processes give identical values and gradients."""
    (tmp_path / "lossmod.py").write_text(_LOSS_MODULE)
    env = dict(os.environ, SMALLCHAINS_CACHE_DIR=str(tmp_path / "kernels"))

    def run(pre):
        r = subprocess.run([sys.executable, "-c", _LOSS_SCRIPT, str(tmp_path / "lossmod.py"),
                            str(pre), mode], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
        return r.stdout.splitlines()

    first, second = run(0), run(3)
    assert first[0] == second[0] == ("False" if mode == "detected" else "True")
    assert first[1] == "[]"
    assert second[1] == ("[]" if mode == "detected" else "['smallchains: a cached kernel']")
    assert first[2] == second[2]
    if mode == "detected":  # nothing of the loss's module in numba's cache
        loss_modules = [f for f in (tmp_path / "kernels").glob(PREFIX + "*.py")
                        if "not disk-cached" in f.read_text()]
        assert len(loss_modules) == 1
        stem = loss_modules[0].stem
        assert not list((tmp_path / "kernels" / "__pycache__").glob(stem + ".*.nb*"))


# --------------------------------------------------------------------------------------
# 4. clear_cache and cache_info

def test_cache_info_and_clear_cache_without_cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "missing" / "kernels"
    monkeypatch.setenv("SMALLCHAINS_CACHE_DIR", str(d))
    assert sc.cache_info() == {"directory": d, "modules": 0, "files": 0, "bytes": 0}
    assert sc.clear_cache() == 0
    assert not d.parent.exists()  # neither call creates the directory


def test_clear_cache_removes_generated_modules_and_numba_files(tmp_path, monkeypatch):
    cache = tmp_path / "kernels"
    first = _run(cache)
    (cache / "notes.txt").write_text("not ours")
    (cache / "__pycache__" / "other-12.py311.nbi").write_bytes(b"not ours either")
    ours = [f for f in cache.rglob(PREFIX + "*") if f.is_file()]
    assert any(f.suffix == ".nbc" for f in ours) and any(f.suffix == ".py" for f in ours)
    monkeypatch.setenv("SMALLCHAINS_CACHE_DIR", str(cache))
    info = sc.cache_info()
    assert info == {"directory": cache, "modules": 1, "files": len(ours),
                    "bytes": sum(f.stat().st_size for f in ours)}
    assert sc.clear_cache() == info["bytes"]
    assert not list(cache.rglob(PREFIX + "*"))
    assert (cache / "notes.txt").exists() and (cache / "__pycache__" / "other-12.py311.nbi").exists()
    assert sc.cache_info() == {"directory": cache, "modules": 0, "files": 0, "bytes": 0}
    assert sc.clear_cache() == 0
    assert _run(cache) == first  # rebuilt


def test_clear_cache_keeps_modules_this_process_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("SMALLCHAINS_CACHE_DIR", str(tmp_path / "kernels"))
    chain = sc.SimpleChain(2, sc.TurboDense(17, "tanh"), sc.TurboDense(1))
    p = sc.init_params(chain, seed=0, dtype=np.float64)
    X = _data(2)
    Y = chain(X, p)
    mod, _ = chain._kernels(np.float64)
    assert sc.clear_cache() > 0
    # its source stays (numba needs it to compile the module's other kernels) ...
    assert Path(mod.__file__).exists()
    assert sc.cache_info()["modules"] == 1
    # ... so this process still compiles them
    model = sc.add_loss(chain, sc.SquaredLoss(np.zeros_like(Y)))
    loss, g = sc.valgrad(model, X, p)
    assert_close(loss, np.mean(np.sum(Y ** 2, axis=1)), np.float64)
    assert_close(chain(X, p), Y, np.float64)
