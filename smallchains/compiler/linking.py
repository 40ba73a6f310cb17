"""Layer steps compiled once, as C functions that the chain's kernels call by symbol name.

Each layer step of a generated chain module (``layer3_pullback`` ...) is a numba
``cfunc`` over raw pointers ``(p, work)`` or ``(p, g, work)``. The module's kernels
(``valgrad_range_<loss>``, ``forward_batch`` ...) call it through a
``numba.types.ExternalFunction`` of a symbol unique to the module, which this module binds
to the compiled function's address (``llvmlite.binding.add_symbol``) before any kernel that
calls it is compiled or loaded from numba's cache.

Why not plain ``@njit`` calls: numba links a jitted callee's LLVM IR into every caller and
re-optimizes and re-generates machine code for all of it, so every layer step was compiled
twice, once on its own and once inside the kernel that inlined it. A call by symbol
compiles each step once; the call itself costs a few nanoseconds per layer per block.

Independent steps also compile in parallel: when a kernel needs several steps that are not
in numba's on-disk cache yet, a helper process (``python -m smallchains.compiler.linking``)
compiles steps into that cache while this process first compiles the library loop that
will run the kernel (:class:`Deferred`), then the steps the helper has not claimed yet;
this process then loads the helper's steps from the cache. ``SMALLCHAINS_COMPILE_WORKERS=0``
turns the helper off; if it fails, the steps are compiled here (same result, slower).

The generated module keeps its kernels under private names (``_valgrad_range_logitce``)
and its module ``__getattr__`` (PEP 562) calls :func:`resolve`, so every way of reaching a
kernel (``mod.forward_range``, ``getattr``, ``from mod import ...``) first binds the
symbols it needs. Only those are compiled: training never compiles the first layer's
input gradient.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import llvmlite.binding as llvm
from numba import cfunc

from .._config import CFUNC_OPTIONS

_lock = threading.RLock()
_bound: dict = {}  # symbol -> numba CFunc (kept alive: its machine code must stay mapped)

#: Do not start a helper process for less than this many source lines of uncached steps
#: (its start-up, about 0.5 s, would eat the gain).
MIN_PARALLEL_LINES = 60


def bind(symbol: str, pyfunc, sig) -> None:
    """Compile ``pyfunc`` as a C function of ``sig`` (or load it from numba's cache) and bind
    ``symbol`` to its address, once per process."""
    with _lock:
        if symbol in _bound:
            return
        compiled = cfunc(sig, **CFUNC_OPTIONS)(pyfunc)
        llvm.add_symbol(symbol, compiled.address)
        _bound[symbol] = compiled


class _Job:
    """Compiling a kernel's uncached layer steps with one helper process. The helper takes
    steps from the front of the list (the longest), this process from the back (once it gets
    to them:
    :func:`loops.call <smallchains.compiler.loops.call>` first compiles the library loop);
    a step is claimed by creating a file, so each is compiled once."""

    def __init__(self, namespace, steps):
        self.namespace, self.steps = namespace, steps
        self.claims = tempfile.mkdtemp(prefix=".claims-", dir=Path(namespace["__file__"]).parent)
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        try:
            self.helper = subprocess.Popen(
                [sys.executable, "-m", "smallchains.compiler.linking", namespace["__file__"],
                 namespace["__name__"], self.claims, *steps],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        except OSError:
            self.helper = None

    def finish(self):
        """Compile the steps the helper has not claimed, then wait for it."""
        layers, prefix = self.namespace["_LAYERS"], self.namespace["_SYMBOL_PREFIX"]
        try:
            for step in reversed(self.steps):
                if _claim(self.claims, step):
                    bind(prefix + step, *layers[step])
        finally:
            if self.helper is not None:
                self.helper.wait()
            shutil.rmtree(self.claims, ignore_errors=True)


def _claim(directory, step) -> bool:
    try:
        os.close(os.open(os.path.join(directory, step), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


_pending: dict = {}  # (module name, kernel name) -> _Job started by prefetch


def _marker(namespace, name) -> Path:
    # exists once all of the kernel's steps have been compiled into numba's cache
    return Path(namespace["__file__"]).with_suffix(f".{name}.compiled")


def _start(namespace, name):
    """A :class:`_Job` for kernel ``name``'s uncached steps, or None if a helper process
    would not pay off (cached, too little code, one step, or helpers turned off)."""
    prefix, layers = namespace["_SYMBOL_PREFIX"], namespace["_LAYERS"]
    todo = [s for s in namespace["_DEPS"][name] if prefix + s not in _bound]
    if len(todo) < 2 or _workers() < 1 or _marker(namespace, name).exists():
        return None
    lines = {s: len(inspect.getsource(layers[s][0]).splitlines()) for s in todo}
    if sum(lines.values()) < MIN_PARALLEL_LINES:
        return None
    # longest first: the helper starts on the big steps, this process joins from the small
    # end once it is done with the library loop, and the last steps finish close together
    return _Job(namespace, sorted(todo, key=lines.get, reverse=True))


def prefetch(module, name) -> None:
    """Start compiling kernel ``name``'s uncached layer steps in a helper process, so that
    this process can compile something else meanwhile; ``getattr(module, name)`` finishes."""
    namespace = vars(module)
    with _lock:
        key = (module.__name__, name)
        if name in namespace or key in _pending or name not in namespace["_DEPS"]:
            return
        job = _start(namespace, name)
        if job is not None:
            _pending[key] = job


def resolve(namespace: dict, name: str):
    """Module ``__getattr__`` of a generated chain module: bind the layer steps kernel
    ``name`` calls, then return the kernel (and store it under ``name``, so later lookups
    are plain attribute reads)."""
    deps = namespace["_DEPS"].get(name)
    if deps is None:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    layers, prefix = namespace["_LAYERS"], namespace["_SYMBOL_PREFIX"]
    with _lock:
        new = [s for s in deps if prefix + s not in _bound]
        job = _pending.pop((namespace["__name__"], name), None) or _start(namespace, name)
        if job is not None:
            job.finish()
        for step in deps:  # the helper's steps load from numba's cache
            bind(prefix + step, *layers[step])
        if new:
            _marker(namespace, name).touch()
    kernel = namespace["_" + name]
    namespace[name] = kernel
    return kernel


class Deferred:
    """Kernel ``name`` of a generated module, to be fetched later: lets
    :func:`smallchains.compiler.loops.call` compile the library loop while a helper
    process compiles the kernel's layer steps."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def start(self):
        prefetch(self.module, self.name)

    def get(self):
        return getattr(self.module, self.name)


def _workers() -> int:
    env = os.environ.get("SMALLCHAINS_COMPILE_WORKERS")
    if env is not None:
        return max(0, int(env))
    return min(1, len(os.sched_getaffinity(0)) - 1)


def _helper_main(path, modname, claims, steps):
    """Helper process: compile the unclaimed ``steps`` of the generated module at ``path``
    into numba's on-disk cache, in order."""
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    for step in steps:
        if _claim(claims, step):
            pyfunc, sig = module._LAYERS[step]
            cfunc(sig, **CFUNC_OPTIONS)(pyfunc)


if __name__ == "__main__":
    _helper_main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
