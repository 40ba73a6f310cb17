"""Layer steps compiled once, as C functions that the chain's kernels call through a table.

Each layer step of a generated chain module (``layer3_pullback`` ...) is a numba
``cfunc`` over the raw data pointers ``(p, g, work, state, meta)``: parameters, gradient
(forward steps ignore it), the thread's workspace, the layer state outside ``p`` and the
thread's int64 step metadata (seed, optimizer step, dataset row of each lane; see
:mod:`smallchains.compiler.codegen`). The module's kernels (``valgrad_range_<loss>``,
``forward_batch`` ...) call step ``i`` as
``call_step("<module>_steps_<dtype>", i, p, g, work, state, meta)``: an indirect call through slot
``i`` of a per-module table of function addresses (a ctypes array made at import,
exported to LLVM as a data symbol with ``llvmlite.binding.add_symbol``). :func:`bind`
compiles a step and fills its slot. Arrays of another dtype are a typing error.

Why not plain ``@njit`` calls: numba links a jitted callee's LLVM IR into every caller and
re-optimizes and re-generates machine code for all of it, so every layer step was compiled
twice, once on its own and once inside the kernel that inlined it. Through the table each
step is compiled once, the kernels compile without the steps (so both can compile at the
same time), and the call costs a few nanoseconds per layer per block of samples.

Independent steps also compile in parallel: when a kernel needs several steps that are not
in numba's on-disk cache yet, a helper process (a python running :func:`_helper_main`)
compiles steps into that cache while this process compiles the library loop that will run
the kernel and the kernel itself (:class:`Deferred`), then the steps the helper has not
claimed yet; this process then loads the helper's steps from the cache.
``SMALLCHAINS_COMPILE_WORKERS=0`` turns the helper off; if it fails, the steps are compiled
here (same result, slower).

A kernel should not run before its steps are bound (a slot then still holds a trampoline
that binds its step under the GIL, see :class:`StepTable`). So the generated module keeps
its kernels under private names (``_valgrad_range_logitce``) and its module ``__getattr__``
(PEP 562) calls :func:`resolve`: every way of reaching a kernel (``mod.forward_range``,
``getattr``, ``from mod import ...``) first binds the steps it calls. Only those are
compiled: training never compiles the first layer's input gradient. A kernel can only be
compiled or loaded in a process that has imported its generated module (which exports
the table's symbol); otherwise LLVM cannot link it and aborts. Do not pickle kernel
dispatchers to other processes: create the chain's kernels there.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
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
#: Seconds to wait for the helper process once this process is done with its own steps.
HELPER_TIMEOUT = 600


_STEP_PROTO = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 5)


class StepTable:
    """The function addresses of a generated module's layer steps, exported to LLVM as the
    data symbol ``symbol``. A slot starts as a trampoline that binds its step (compiles it
    or loads it from the cache, which overwrites the slot) and then runs it. Kernels
    reached through the module's ``__getattr__`` never meet a trampoline; a kernel that
    bypassed it (e.g. a numba dispatcher pickled to another process that then created the
    chain's kernels) runs correctly instead of calling a null pointer. A trampoline holds
    the GIL while binding."""

    def __init__(self, symbol: str, namespace: dict):
        layers = namespace["_LAYERS"]
        self.slots = (ctypes.c_void_p * max(len(layers), 1))()
        self._trampolines = []
        for step, (slot, _) in layers.items():
            trampoline = _STEP_PROTO(functools.partial(_trampoline, namespace, step, self, slot))
            self._trampolines.append(trampoline)
            self.slots[slot] = ctypes.cast(trampoline, ctypes.c_void_p).value
        llvm.add_symbol(symbol, ctypes.addressof(self.slots))


def _trampoline(namespace, step, table, slot, p, g, work, state, meta):
    try:
        bind(namespace, step)
        _STEP_PROTO(table.slots[slot])(p, g, work, state, meta)
    except BaseException:  # an exception cannot cross into the compiled caller
        traceback.print_exc()
        sys.stderr.write(f"smallchains: could not bind layer step {step!r}; aborting\n")
        os.abort()


@intrinsic(prefer_literal=True)
def call_step(typingctx, table, index, p, g, work, state, meta):
    """``call_step("<symbol>", i, p, g, work, state, meta)``: call the C function in slot
    ``i`` of the step table ``symbol`` (both literals; the symbol ends in the steps' dtype
    name) with the data pointers of the arrays. ``state`` (the chain's dtype) and ``meta``
    (int64) may be ``None`` where no step reads them (then a null pointer is passed)."""
    if not isinstance(table, types.StringLiteral) or not isinstance(index, types.IntegerLiteral):
        return None
    symbol, slot = table.literal_value, index.literal_value
    dtype = symbol.rsplit("_", 1)[1]
    for name, arr, dt in (("p", p, dtype), ("g", g, dtype), ("work", work, dtype),
                          ("state", state, dtype), ("meta", meta, "int64")):
        if name in ("state", "meta") and isinstance(arr, types.NoneType):
            continue
        if not isinstance(arr, types.Array) or arr.ndim != 1 or str(arr.dtype) != dt:
            raise TypingError(f"this chain's kernels were generated for {dtype}: {name} must "
                              f"be a 1-D {dt} array, got {arr}")

    def codegen(context, builder, sig, args):
        ptrs = []
        for t, v in zip(sig.args[2:], args[2:]):
            if isinstance(t, types.NoneType):
                ptrs.append(cgutils.voidptr_t(None))
            else:
                ptrs.append(builder.bitcast(context.make_array(t)(context, builder, v).data,
                                            cgutils.voidptr_t))
        fnty = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t] * len(ptrs))
        slots = context.get_c_value(builder, ir.ArrayType(cgutils.voidptr_t, 0), symbol)
        addr = builder.load(builder.gep(slots, [cgutils.int32_t(0), cgutils.int32_t(slot)]))
        builder.call(builder.bitcast(addr, fnty.as_pointer()), ptrs)
        return context.get_dummy_value()

    return types.void(table, index, p, g, work, state, meta), codegen


@intrinsic
def keep_alive(typingctx, p, g, work):
    """``keep_alive(p, g, work)``: the last statement of every layer step. Emits no code;
    it only keeps the three array views live to the end of the step.

    The views are ``carray``s over raw pointers, which numba's alias analysis does not tie
    to the step's arguments. Whenever numba runs its dead-code elimination on a step (it
    does after inlining an ``inline="always"`` function, e.g. ``gelu_grad``), a store into
    a view that is not read afterwards counts as dead and is deleted: the last
    ``g[...] += ...`` of a gelu or silu pullback vanished, and dL/dW of the last weight of
    every remainder row was lost. A call of unknown effect that reads the views keeps
    every store before it."""
    def codegen(context, builder, sig, args):
        return context.get_dummy_value()

    return types.void(p, g, work), codegen


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
        env = dict(os.environ)
        if not _cpu.PREFER_512:
            # same CPU features as here, or numba's cache would not share the helper's code
            # (smallchains._cpu sets NUMBA_CPU_FEATURES in os.environ when it applies)
            env["SMALLCHAINS_PREFER_512"] = "0"
        # The helper must import exactly this smallchains (its steps go into numba's cache
        # under the generated file's key, which does not cover the library code they call):
        # it gets this process's sys.path, not the current directory first as `-m` would.
        self.helper = None
        try:
            self.helper = subprocess.Popen(
                [sys.executable, "-c", _HELPER, os.pathsep.join(sys.path), _PACKAGE,
                 namespace["__file__"], namespace["__name__"], self.claims, *steps],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        except OSError:
            pass

    def finish(self):
        """Compile the steps the helper has not claimed, then wait for it (at most
        HELPER_TIMEOUT seconds: the caller binds every step afterwards anyway, so a killed
        helper only costs time)."""
        ok = False
        try:
            for step in reversed(self.steps):
                if _claim(self.claims, step):
                    bind(self.namespace, step)
            ok = True
        finally:
            self.stop(wait=ok)

    def stop(self, wait=False):
        if self.helper is not None:
            try:
                self.helper.wait(timeout=HELPER_TIMEOUT if wait else 0)
            except subprocess.TimeoutExpired:
                self.helper.kill()
                self.helper.wait()
        shutil.rmtree(self.claims, ignore_errors=True)


def _claim(directory, step) -> bool:
    try:
        os.close(os.open(os.path.join(directory, step), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # claim directory gone or full: compile it (twice at worst)
        return True
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
    if "_STEPS_FROM" in namespace:  # a loss module: its steps are the chain module's
        if name in namespace["_SAME_STEPS"] and name not in namespace:
            prefetch(sys.modules[namespace["_STEPS_FROM"]], namespace["_SAME_STEPS"][name])
        return
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


def resolve_shared(namespace: dict, name: str):
    """Module ``__getattr__`` of a generated *loss module* (the kernels of a custom,
    weighted or Huber loss, see :func:`smallchains.compiler.codegen.generate_source`): its
    kernels call the layer steps of the chain's own module ``_STEPS_FROM`` through that
    module's step table. Binding them there (``getattr`` of the kernel that runs the same
    steps, ``_SAME_STEPS``) compiles or loads each step once for every loss of the chain."""
    same = namespace["_SAME_STEPS"].get(name)
    if same is None:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    getattr(sys.modules[namespace["_STEPS_FROM"]], same)
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
        """The kernel's dispatcher, to compile before its steps are bound (do not run it
        from here: its steps would be bound one by one under the GIL)."""
        return vars(self.module)["_" + self.name]

    def get(self):
        return getattr(self.module, self.name)

    def cancel(self):
        """Stop a helper started by :meth:`start` whose kernel will not be fetched."""
        with _lock:
            job = _pending.pop((self.module.__name__, self.name), None)
        if job is not None:
            job.stop()


def _workers() -> int:
    env = os.environ.get("SMALLCHAINS_COMPILE_WORKERS")
    if not os.path.basename(sys.executable or "").lower().startswith("python"):
        return 0  # embedded interpreter (e.g. an application server): no python to start
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


_PACKAGE = str(Path(__file__).resolve().parents[1])
_HELPER = ("import sys; sys.path[:] = sys.argv[1].split(__import__('os').pathsep); "
           "from smallchains.compiler.linking import _helper_main; _helper_main(*sys.argv[2:])")


def _helper_main(package, path, modname, claims, *steps):
    """Helper process: compile the unclaimed ``steps`` of the generated module at ``path``
    into numba's on-disk cache, in order. Does nothing unless this smallchains is the
    parent's (``package``)."""
    if str(Path(__file__).resolve().parents[1]) != package:
        return
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    for step in steps:
        if _claim(claims, step):
            cfunc(module._STEP_SIG, **CFUNC_OPTIONS)(module._LAYERS[step][1])
