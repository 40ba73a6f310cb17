"""Layer steps compiled once, as C functions that the chain's kernels call through a table.

Each layer step of a generated chain module (``layer3_pullback`` ...) is a numba
``cfunc`` over the raw data pointers ``(p, g, work)`` (forward steps ignore ``g``). The
module's kernels (``valgrad_range_<loss>``, ``forward_batch`` ...) call step ``i`` as
``call_step("<module>_steps_<dtype>", i, p, g, work)``: an indirect call through slot
``i`` of a per-module table of function addresses (a ctypes array made at import,
exported to LLVM as a data symbol with ``llvmlite.binding.add_symbol``). :func:`bind`
compiles a step and fills its slot. Arrays of another dtype are a typing error.

Why not plain ``@njit`` calls: numba links a jitted callee's LLVM IR into every caller and
re-optimizes and re-generates machine code for all of it, so every layer step was compiled
twice, once on its own and once inside the kernel that inlined it. Through the table each
step is compiled once, the kernels compile without the steps (so both can compile at the
same time), and the call costs a few nanoseconds per layer per block of samples.

Independent steps also compile in parallel: when a kernel needs several steps that are not
in numba's on-disk cache yet, a helper process (``python -m smallchains.compiler.linking``)
compiles steps into that cache while this process compiles the library loop that will run
the kernel and the kernel itself (:class:`Deferred`), then the steps the helper has not
claimed yet; this process then loads the helper's steps from the cache.
``SMALLCHAINS_COMPILE_WORKERS=0`` turns the helper off; if it fails, the steps are compiled
here (same result, slower).

A kernel must never run before its steps are bound (an empty slot is a null pointer). So
the generated module keeps its kernels under private names (``_valgrad_range_logitce``)
and its module ``__getattr__`` (PEP 562) calls :func:`resolve`: every way of reaching a
kernel (``mod.forward_range``, ``getattr``, ``from mod import ...``) first binds the steps
it calls. Only those are compiled: training never compiles the first layer's input
gradient.
"""

from __future__ import annotations

import ctypes
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
from llvmlite import ir
from numba import cfunc, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from .. import _cpu
from .._config import CFUNC_OPTIONS

_lock = threading.RLock()
_bound: dict = {}  # (module name, step) -> numba CFunc (kept alive: its code must stay mapped)

#: Do not start a helper process for less than this many source lines of uncached steps
#: (its start-up, about 0.5 s, would eat the gain).
MIN_PARALLEL_LINES = 60


class StepTable:
    """The function addresses of a generated module's layer steps, exported to LLVM as the
    data symbol ``symbol`` (an array of ``n`` pointers, null until bound)."""

    def __init__(self, symbol: str, n: int):
        self.symbol = symbol
        self.slots = (ctypes.c_void_p * max(n, 1))()
        llvm.add_symbol(symbol, ctypes.addressof(self.slots))


@intrinsic(prefer_literal=True)
def call_step(typingctx, table, index, p, g, work):
    """``call_step("<symbol>", i, p, g, work)``: call the C function in slot ``i`` of the
    step table ``symbol`` (both literals; the symbol ends in the steps' dtype name) with
    the data pointers of the arrays."""
    if not isinstance(table, types.StringLiteral) or not isinstance(index, types.IntegerLiteral):
        return None
    symbol, slot = table.literal_value, index.literal_value
    dtype = symbol.rsplit("_", 1)[1]
    for name, arr in (("p", p), ("g", g), ("work", work)):
        if not isinstance(arr, types.Array) or arr.ndim != 1 or str(arr.dtype) != dtype:
            raise TypingError(f"this chain's kernels were generated for {dtype}: {name} must "
                              f"be a 1-D {dtype} array, got {arr}")

    def codegen(context, builder, sig, args):
        ptrs = [context.make_array(t)(context, builder, v).data
                for t, v in zip(sig.args[2:], args[2:])]
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type for ptr in ptrs])
        slots = context.get_c_value(builder, ir.ArrayType(cgutils.voidptr_t, 0), symbol)
        addr = builder.load(builder.gep(slots, [cgutils.int32_t(0), cgutils.int32_t(slot)]))
        builder.call(builder.bitcast(addr, fnty.as_pointer()), ptrs)
        return context.get_dummy_value()

    return types.void(table, index, p, g, work), codegen


def bind(namespace: dict, step: str) -> None:
    """Compile layer step ``step`` of a generated module (or load it from numba's cache) and
    put its address in the module's step table, once per process."""
    key = (namespace["__name__"], step)
    with _lock:
        if key in _bound:
            return
        slot, pyfunc = namespace["_LAYERS"][step]
        compiled = cfunc(namespace["_STEP_SIG"], **CFUNC_OPTIONS)(pyfunc)
        namespace["_TABLE"].slots[slot] = compiled.address
        _bound[key] = compiled


class _Job:
    """Compiling a kernel's uncached layer steps with one helper process. The helper takes
    steps from the front of the list (the longest), this process from the back once it gets
    to them (:func:`smallchains.compiler.loops.call` first compiles the library loop and
    the kernel). A step is claimed by creating a file, so each is compiled once."""

    def __init__(self, namespace, steps):
        self.namespace, self.steps = namespace, steps
        self.claims = tempfile.mkdtemp(prefix=".claims-", dir=Path(namespace["__file__"]).parent)
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        if not _cpu.PREFER_512:
            # same CPU features as here, or numba's cache would not share the helper's code
            # (smallchains._cpu sets NUMBA_CPU_FEATURES in os.environ when it applies)
            env["SMALLCHAINS_PREFER_512"] = "0"
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
        try:
            for step in reversed(self.steps):
                if _claim(self.claims, step):
                    bind(self.namespace, step)
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
    layers = namespace["_LAYERS"]
    todo = [s for s in namespace["_DEPS"][name] if (namespace["__name__"], s) not in _bound]
    if len(todo) < 2 or _workers() < 1 or _marker(namespace, name).exists():
        return None
    lines = {s: len(inspect.getsource(layers[s][1]).splitlines()) for s in todo}
    if sum(lines.values()) < MIN_PARALLEL_LINES:
        return None
    # longest first: the helper starts on the big steps, this process joins from the small
    # end once it is done with the library loop, and the last steps finish close together
    try:
        return _Job(namespace, sorted(todo, key=lines.get, reverse=True))
    except OSError:  # e.g. a read-only cache directory: compile here
        return None


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
    with _lock:
        new = [s for s in deps if (namespace["__name__"], s) not in _bound]
        job = _pending.pop((namespace["__name__"], name), None) or _start(namespace, name)
        if job is not None:
            job.finish()
        for step in deps:  # the helper's steps load from numba's cache
            bind(namespace, step)
        if new:
            try:
                _marker(namespace, name).touch()
            except OSError:  # read-only cache directory: only costs a helper next time
                pass
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

    def unbound(self):
        """The kernel's dispatcher, to compile before its steps are bound. Never call it:
        its steps' table slots may still be empty."""
        return vars(self.module)["_" + self.name]

    def get(self):
        return getattr(self.module, self.name)


def _workers() -> int:
    env = os.environ.get("SMALLCHAINS_COMPILE_WORKERS")
    if not sys.executable:  # embedded interpreter: no python to start
        return 0
    if env is not None:
        try:
            return max(0, min(1, int(env)))
        except ValueError:
            raise ValueError("SMALLCHAINS_COMPILE_WORKERS must be an integer (0: no helper "
                             f"process, 1: one), got {env!r}") from None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(1, cores - 1)


def _helper_main(path, modname, claims, steps):
    """Helper process: compile the unclaimed ``steps`` of the generated module at ``path``
    into numba's on-disk cache, in order."""
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    for step in steps:
        if _claim(claims, step):
            cfunc(module._STEP_SIG, **CFUNC_OPTIONS)(module._LAYERS[step][1])


if __name__ == "__main__":
    _helper_main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
