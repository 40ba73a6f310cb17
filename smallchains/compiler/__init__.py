"""Turns a :class:`~smallchains.SimpleChain` into numba kernels (see :mod:`.codegen`)."""

from .codegen import ChainPlan, get_kernels, plan_chain

__all__ = ["ChainPlan", "get_kernels", "plan_chain"]
