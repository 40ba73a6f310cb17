"""Which kernels a chain is compiled into: tuned or reference, and the register budget.

Part of every generated module's key, so chains that differ only in these options get
their own kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .._cpu import vector_registers

#: ``kernels=`` choices of :class:`smallchains.SimpleChain`
KERNELS = ("tuned", "reference")
#: register budgets the tuned tiles know: AVX2 (16 vector registers), AVX-512 (32)
REGISTER_BUDGETS = (16, 32)


@dataclass(frozen=True)
class KernelOptions:
    """``kernels``: ``"tuned"`` (register tiles, fused passes; the default) or
    ``"reference"`` (:mod:`smallchains.layers.reference`: plain loop nests, the debugging
    fallback). ``registers``: the vector register budget the tuned tiles are sized for;
    it changes only tile shapes, so every budget runs correctly on every CPU (a budget
    above the CPU's only spills registers)."""

    kernels: str = "tuned"
    registers: int = 16

    @property
    def reference(self) -> bool:
        return self.kernels == "reference"


def default_registers() -> int:
    """``$SMALLCHAINS_VECTOR_REGISTERS`` (16 or 32) if set, else the host's: 32 with
    AVX-512, 16 otherwise."""
    env = os.environ.get("SMALLCHAINS_VECTOR_REGISTERS")
    if env is None:
        return vector_registers()
    try:
        value = int(env)
    except ValueError:
        value = None
    if value not in REGISTER_BUDGETS:
        raise ValueError(f"SMALLCHAINS_VECTOR_REGISTERS must be one of {REGISTER_BUDGETS}, got {env!r}")
    return value


def kernel_options(kernels="tuned", registers=None) -> KernelOptions:
    """Validated :class:`KernelOptions` (``registers=None``: :func:`default_registers`).

    Raises
    ------
    ValueError
        ``kernels`` not in :data:`KERNELS`, ``registers`` not in :data:`REGISTER_BUDGETS`.
    """
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if registers is None:
        registers = default_registers()
    elif (isinstance(registers, bool) or not isinstance(registers, (int, np.integer))
          or registers not in REGISTER_BUDGETS):
        raise ValueError(f"registers must be one of the ints {REGISTER_BUDGETS} (vector "
                         f"registers the tiles are sized for), got {registers!r}")
    if kernels == "reference":  # the reference code has no tiles: one module for any budget
        registers = REGISTER_BUDGETS[0]
    return KernelOptions(kernels, int(registers))
