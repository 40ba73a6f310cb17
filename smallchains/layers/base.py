"""The layer interface: static shapes, a parameter slice, and code emission.

A layer is a small immutable description (sizes, activation). It knows

* ``output_shape(input_shape)``: per-sample shape inference (no batch axis);
* ``param_shapes(input_shape)``: named parameter arrays it owns in the flat ``p``;
* ``init_params(views, input_shape, rng)``: how to fill them;
* ``saved_size(input_shape)``: per-sample scratch it keeps from forward to pullback
  (beyond its own output, which the compiler always keeps);
* ``state_shapes(input_shape)``: named arrays of layer state outside ``p`` (none so far:
  the slot for BatchNorm's running statistics, see docs/design-core-extension.md);
* ``emit_forward(ctx)`` / ``emit_pullback(ctx)``: the lines of Python (loops over one
  block of samples) that the compiler pastes into the generated chain kernels; each
  layer's forward and pullback code lives next to the layer class;
* ``emit_forward_reference(ctx)`` / ``emit_pullback_reference(ctx)``: the same
  computation as plain scalar loop nests (no tiles, no fusion; :mod:`.reference`), used
  for ``SimpleChain(..., kernels="reference")`` and as the oracle of the variant tests.

Kernels work on *blocks* of samples stored feature-major: feature ``f`` of sample ``s``
of a block lives at ``work[off + f * B + s]``, so every inner loop runs over the block's
samples and vectorizes whatever the layer sizes. Image features are flattened in CHW
order, i.e. ``f = (c * H + y) * W + x``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod


#: A line of its own in a layer's emitted code: the compiler makes the lines before and
#: after it separate step functions (numba's compile time grows faster than linearly with
#: a function's size; containers put one between their sub-layers).
STEP_BREAK = "# --- step break ---"


def at(base, k: int) -> str:
    """Source of the index ``base + k`` (``base`` a name or an int) with the constant folded
    away.

    Emitters fold constants into one term per index: numba types and lowers every ``+`` and
    ``*`` of the source separately, so index arithmetic is most of a layer step's compile
    time (measured: ``p[156 + ((cd * 6 + cs) * 5 + 1) * 5 + 2]`` style indices took about
    a third of it)."""
    if isinstance(base, int):
        return str(base + k)
    return base if k == 0 else f"{base} + {k}"


@dataclass
class EmitContext:
    """Everything a layer needs to emit its calls inside a generated kernel.

    Offsets are element offsets into the flat parameter vector ``p`` (``p_off``) or the
    per-thread workspace ``work`` (all others). ``B`` is the block capacity (a literal in
    the generated source) and ``nb`` the name of the runtime block length.
    """

    in_shape: tuple
    out_shape: tuple
    p_off: int
    in_off: int          # layer input  (B * prod(in_shape))
    out_off: int         # layer output (B * prod(out_shape))
    saved_off: int       # layer-private scratch (B * saved_size)
    gout_off: int = -1   # dL/d(output), may be overwritten by the pullback
    gin_off: int = -1    # dL/d(input), written by the pullback when need_gin
    need_gin: bool = False
    training: bool = True  # training mode (Dropout masks) or inference
    B: int = 1
    dt: str = "np.float32"  # constant constructor for the kernel dtype
    registers: int = 16  # vector register budget the tuned tiles are sized for (16 or 32)
    layer_index: int = 0  # position in the chain (part of a random layer's counter)
    state_off: int = 0  # offset of the layer's slice of the state array
    red_off: int = 0  # batch-statistics layers: per-thread partial sums (in work)
    scratch_off: int = 0  # ... and the step's batch statistics (in state, after the layers')
    rows_off: int = -1  # the input rows sample-major (B rows of n_in), if the kernels load them
    rows_ld: int = 0  # ... and the elements from one row to the next
    rows_in: bool = False  # the forward reads the input from those rows (training kernels)


class Layer:
    """Base class of all layers. Subclasses are frozen dataclasses."""

    #: ``{module: (names, ...)}`` of numba functions the emitted code calls, if any.
    kernel_imports: dict = {}
    #: True if the layer's output IS its input (same workspace; e.g. Flatten).
    aliases_input: bool = False
    #: True if the layer's code at blocks of 16 samples costs well under twice as much per
    #: sample as at its default block, so that a full small block beats a half-empty
    #: default one: then :func:`~smallchains.train_batched` may train at such blocks when
    #: a minibatch is small for the threads (``SimpleChain._train_block``). Dense layers
    #: (one-vector tiles), dropout, shape layers, and conv, maxpool and BatchNorm (scalar
    #: tiles at 16 float32 samples with 32 registers: network 3 of ``bench/cifar_cnn.py``
    #: on a Zen 5, one thread, 1.14 s per 5,000 images at blocks of 16 against 0.82 at 32;
    #: at 2 threads, batch 32, 0.59 against 1.21). Recurrent layers are not (their tiles
    #: need whole pairs of vectors; other blocks run the reference loops).
    small_blocks: bool = False

    def output_shape(self, input_shape: tuple) -> tuple:
        raise NotImplementedError

    def param_shapes(self, input_shape: tuple) -> dict:
        """Ordered ``{name: shape}`` of the parameters this layer owns (may be empty)."""
        return {}

    def n_params(self, input_shape: tuple) -> int:
        return sum(prod(s) for s in self.param_shapes(input_shape).values())

    def init_params(self, views: dict, input_shape: tuple, rng) -> None:
        """Fill ``views`` (the arrays named by :meth:`param_shapes`) in place."""

    def saved_size(self, input_shape: tuple) -> int:
        return 0

    def state_shapes(self, input_shape: tuple) -> dict:
        """Ordered ``{name: shape}`` of layer state outside ``p`` (may be empty)."""
        return {}

    def n_state(self, input_shape: tuple) -> int:
        return sum(prod(s) for s in self.state_shapes(input_shape).values())

    def emit_forward(self, ctx: EmitContext) -> list:
        """Lines computing the layer's output block from its input block."""
        raise NotImplementedError

    def emit_pullback(self, ctx: EmitContext) -> list:
        """Lines that, given ``dL/d(output)`` at ``ctx.gout_off`` (may be overwritten), add
        the parameter gradient into ``g[ctx.p_off:]`` and, if ``ctx.need_gin``, write
        ``dL/d(input)`` at ``ctx.gin_off``."""
        raise NotImplementedError

    def emit_forward_reference(self, ctx: EmitContext) -> list:
        """:meth:`emit_forward` as the plainest correct code (the debugging fallback and the
        variant tests' oracle). A layer without one cannot be used with
        ``kernels="reference"``."""
        raise NotImplementedError(f"{type(self).__name__} has no reference kernels")

    def emit_pullback_reference(self, ctx: EmitContext) -> list:
        """:meth:`emit_pullback` as the plainest correct code (see
        :meth:`emit_forward_reference`)."""
        raise NotImplementedError(f"{type(self).__name__} has no reference kernels")

    def spec(self) -> str:
        """Stable text identifying the layer's compiled behaviour (part of the cache key)."""
        return repr(self)
