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
compiles part of them into that cache while this process compiles the rest, and this
process then loads the helper's from the cache. ``SMALLCHAINS_COMPILE_WORKERS=0`` turns the
helper off; if it fails, the steps are compiled here (same result, only slower).

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
import subprocess
import sys
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


def resolve(namespace: dict, name: str):
    """Module ``__getattr__`` of a generated chain module: bind the layer steps kernel
    ``name`` calls, then return the kernel (and store it under ``name``, so later lookups
    are plain attribute reads)."""
    deps = namespace["_DEPS"].get(name)
    if deps is None:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    layers, prefix = namespace["_LAYERS"], namespace["_SYMBOL_PREFIX"]
    with _lock:
        todo = [s for s in deps if prefix + s not in _bound]
        marker = Path(namespace["__file__"]).with_suffix(f".{name}.compiled")
        helper = None
        if todo and not marker.exists():
            todo, helper = _start_helper(namespace, todo)
        try:
            for step in todo:
                bind(prefix + step, *layers[step])
        finally:
            if helper is not None:
                helper.wait()
        for step in deps:  # the helper's steps now load from numba's cache
            bind(prefix + step, *layers[step])
        if todo or helper is not None:
            marker.touch()
    kernel = namespace["_" + name]
    namespace[name] = kernel
    return kernel


def _workers() -> int:
    env = os.environ.get("SMALLCHAINS_COMPILE_WORKERS")
    if env is not None:
        return max(0, int(env))
    return min(1, len(os.sched_getaffinity(0)) - 1)


def _start_helper(namespace, steps):
    """Start a helper process compiling about half of ``steps`` (by source lines) into
    numba's cache; return (the steps left for this process, the helper or None)."""
    if _workers() < 1 or len(steps) < 2:
        return steps, None
    layers = namespace["_LAYERS"]
    cost = {s: len(inspect.getsource(layers[s][0]).splitlines()) for s in steps}
    if sum(cost.values()) < MIN_PARALLEL_LINES:
        return steps, None
    mine, theirs = [], []
    load = [0.0, 0.15 * sum(cost.values())]  # the helper starts late (interpreter, numba)
    for s in sorted(steps, key=cost.get, reverse=True):
        k = 0 if load[0] <= load[1] else 1
        (mine, theirs)[k].append(s)
        load[k] += cost[s]
    if not theirs:
        return steps, None
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    try:
        helper = subprocess.Popen(
            [sys.executable, "-m", "smallchains.compiler.linking", namespace["__file__"],
             namespace["__name__"], *theirs],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
    except OSError:
        return steps, None
    return mine, helper


def _helper_main(path, modname, steps):
    """Helper process: compile ``steps`` of the generated module at ``path`` into numba's
    on-disk cache."""
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    for step in steps:
        pyfunc, sig = module._LAYERS[step]
        cfunc(sig, **CFUNC_OPTIONS)(pyfunc)


if __name__ == "__main__":
    _helper_main(sys.argv[1], sys.argv[2], sys.argv[3:])
