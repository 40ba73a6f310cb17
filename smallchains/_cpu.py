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

import os
import sys


def _prefer_512() -> bool:
    if os.environ.get("SMALLCHAINS_PREFER_512", "1") == "0":
        return False
    if "numba" in sys.modules or "NUMBA_CPU_FEATURES" in os.environ or "NUMBA_CPU_NAME" in os.environ:
        return False
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features().flatten()
    except Exception:  # pragma: no cover - llvmlite always present with numba
        return False
    if "+avx512f" not in feats.split(","):
        return False
    os.environ["NUMBA_CPU_FEATURES"] = feats + ",-prefer-256-bit"
    return True


PREFER_512 = _prefer_512()
