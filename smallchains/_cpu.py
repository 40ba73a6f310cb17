"""Let LLVM use 512-bit vectors on AVX-512 CPUs (imported before numba).

LLVM's tuning for recent Intel cores sets ``prefer-256-bit``, so numba loops use ymm
registers even where zmm doubles the FMA width (measured on this project's 2-core Xeon:
peak fp32 FMA loop 82 GFLOP/s with ymm, 127-151 with zmm). If numba has not been imported
yet and ``NUMBA_CPU_FEATURES`` is unset, we set it to the host's features plus
``-prefer-256-bit``. This applies to all numba code in the process (it only changes the
vector-width preference, not the instruction set). Opt out with
``SMALLCHAINS_PREFER_512=0``; import numba first or set ``NUMBA_CPU_FEATURES`` yourself to
keep numba's default.
"""

from __future__ import annotations

import functools
import os
import sys


@functools.lru_cache(maxsize=None)
def _host_features() -> frozenset:
    try:
        import llvmlite.binding as llvm

        return frozenset(llvm.get_host_cpu_features().flatten().split(","))
    except Exception:  # pragma: no cover - llvmlite always present with numba
        return frozenset()


def vector_registers() -> int:
    """SIMD registers the generated kernels can count on: 32 with AVX-512, else 16.
    Register tiles are sized from it (a tile whose accumulators do not fit spills)."""
    return 32 if "+avx512f" in _host_features() else 16


def _prefer_512() -> bool:
    if os.environ.get("SMALLCHAINS_PREFER_512", "1") == "0":
        return False
    if "numba" in sys.modules or "NUMBA_CPU_FEATURES" in os.environ or "NUMBA_CPU_NAME" in os.environ:
        return False
    if vector_registers() < 32:
        return False
    os.environ["NUMBA_CPU_FEATURES"] = ",".join(sorted(_host_features())) + ",-prefer-256-bit"
    return True


PREFER_512 = _prefer_512()
