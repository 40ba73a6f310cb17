"""Library-wide settings: fastmath flags, kernel cache directory, default sizes.

One place for the numba options every kernel uses, so a change here reaches every
generated kernel (the generated module's source embeds them, so the cache key changes too).
"""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

# LLVM fast-math flags for every kernel. Deliberately WITHOUT ``nnan`` and ``ninf``:
# with those, ``np.isnan``/``np.isfinite`` checks are compiled away and NaN detection
# during training would silently stop working.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

# numba options shared by all kernels. ``error_model="numpy"`` drops the per-division
# zero check of the default ``"python"`` model, which otherwise blocks vectorization.
JIT_OPTIONS = dict(nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
INLINE_OPTIONS = dict(JIT_OPTIONS, inline="always")
# Plain IEEE arithmetic, for functions compiled on their own (not inlined: an inlined
# callee takes its caller's fast-math flags), see smallchains.compiler.loops._regularize.
EXACT_OPTIONS = dict(JIT_OPTIONS, fastmath=False)
# The same without numba's disk cache: a chain module whose kernels call a user's function
# that later processes could not import (see smallchains.losses.CustomLoss).
UNCACHED_JIT_OPTIONS = dict(JIT_OPTIONS, cache=False)
UNCACHED_INLINE_OPTIONS = dict(INLINE_OPTIONS, cache=False)
#: A line in a generated loss's source that gives its chain module the options above
UNCACHED_MARK = "# smallchains: not disk-cached (calls a function of a module not importable)"
# A generated chain's per-layer steps: C functions over raw pointers, called through a
# table of addresses from the chain's kernels (see smallchains.compiler.linking).
CFUNC_OPTIONS = dict(nopython=True, fastmath=FASTMATH, error_model="numpy", cache=True)


def cache_dir(create: bool = True) -> Path:
    """Directory of the on-disk kernel cache, as configured.

    ``$SMALLCHAINS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/smallchains/kernels``
    (``~/.cache/smallchains/kernels``). Created on first use (``create=True``; raises
    ``OSError`` if that fails). When it cannot be written, new kernel modules go to
    :func:`fallback_cache_dir` instead (see :mod:`smallchains.compiler.cache`).
    """
    env = os.environ.get("SMALLCHAINS_CACHE_DIR")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "smallchains" / "kernels"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def fallback_cache_dir() -> Path:
    """The per-user temporary kernel cache used when :func:`cache_dir` cannot be written:
    ``<tempfile.gettempdir()>/smallchains-<uid>/kernels`` (not created here)."""
    user = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    return Path(tempfile.gettempdir()) / f"smallchains-{user}" / "kernels"
