"""Branching: :class:`Parallel` and :class:`SkipConnection`, containers of sub-chains.

A chain is a line of layers; a container is one layer of that line whose inside is
several short lines (branches) that all read the container's input and whose outputs are
joined, by concatenation along the first per-sample axis (features of vectors, channels of
images) or by a sum. The names follow Flux (``Parallel(connection, layers...)``,
``SkipConnection(layers, connection)``); Lux calls the first a ``BranchLayer`` plus a join.

To the compiler a container is an ordinary layer: it lays its branches out inside its own
saved area (each sub-layer's output and saved blocks, two gradient buffers) and emits each
sub-layer's own tuned code with that layout, one step function per sub-layer
(:data:`~smallchains.layers.base.STEP_BREAK`). Parameters stay one flat slice, the
sub-layers' in branch order; ``param_views`` names them ``"<branch>.<layer>.<name>"`` like
torch's ``state_dict`` (``"1.0.W"``: branch 1, its first layer, the weight).

Concatenation costs nothing in the feature-major block layout: branch ``k``'s last layer
writes straight into rows ``F_0 + ... + F_{k-1}`` onwards of the container's output. The
pullback hands each branch its rows of ``dL/dy`` (concat) or a copy of all of it (sum),
and ``dL/dx`` is the sum of the branches' input gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

from .base import STEP_BREAK, EmitContext, Layer

CONNECTIONS = ("concat", "sum")


def _branch(k, b):
    layers = (b,) if isinstance(b, Layer) else b
    if not isinstance(layers, (tuple, list)):
        raise TypeError(f"Parallel: branch {k} must be a layer or a tuple of layers, got {b!r}")
    for j, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"Parallel: branch {k}, layer {j} must be a smallchains layer, "
                            f"got {type(layer).__name__}")
        if getattr(layer, "reduces_batch", False) or layer.state_shapes.__func__ is not Layer.state_shapes:
            raise TypeError(f"Parallel: branch {k}, layer {j} ({layer!r}) has batch statistics or "
                            "state, which is not supported inside a branch")
    return tuple(layers)


@dataclass(frozen=True)
class _Sub:
    """One sub-layer's layout inside a container, offsets in elements per lane (times the
    block size ``B`` in the workspace). ``where`` of an activation: ``"in"`` (the
    container's input), ``"out"`` (its output) or ``"sv"`` (its saved area)."""

    layer: Layer
    k: int
    j: int
    in_shape: tuple
    out_shape: tuple
    p_off: int
    src: tuple  # (where, offset) of the input
    dst: tuple  # (where, offset) of the output
    saved: int  # offset of the sub-layer's own saved area (in "sv")


@dataclass(frozen=True, init=False, repr=False)
class Parallel(Layer):
    """Branches that read the same input, joined by ``connection``.

    Parameters in ``p``: the branches' in order, named ``"<branch>.<layer>.<name>"`` in
    ``param_views``. A Dropout inside gets its own random counter (distinct for up to 32
    branches of up to 32 layers at chain positions below 1024).

    Parameters
    ----------
    connection : {"concat", "sum"}
        ``"concat"``: outputs stacked along the first per-sample axis (all other axes
        equal), like ``torch.cat(dim=1)``; ``"sum"``: outputs of equal shape added.
    *branches : Layer or tuple of Layers
        Each branch a layer or a sub-chain (a tuple, run left to right); an empty tuple
        is the identity. No BatchNorm (or other layer with state) inside a branch.

    Raises
    ------
    TypeError
        A branch that is not a layer or a tuple of layers, or holds a layer with state.
    ValueError
        An unknown ``connection``, no branches, or branch outputs that cannot be joined
        (the message names each branch's output shape).
    """

    connection: str
    branches: tuple

    def __init__(self, connection, *branches):
        if connection not in CONNECTIONS:
            raise ValueError(f"Parallel: connection must be one of {CONNECTIONS}, got {connection!r}")
        if not branches:
            raise ValueError("Parallel needs at least one branch")
        object.__setattr__(self, "connection", connection)
        object.__setattr__(self, "branches", tuple(_branch(k, b) for k, b in enumerate(branches)))

    def __repr__(self) -> str:
        def one(b):
            return repr(b[0]) if len(b) == 1 else "(" + ", ".join(map(repr, b)) + ")"
        return f"{type(self).__name__}({self.connection!r}, " + ", ".join(one(b) for b in self.branches) + ")"

    def spec(self) -> str:
        inner = "; ".join(", ".join(layer.spec() for layer in b) for b in self.branches)
        return f"{type(self).__name__}({self.connection}: {inner})"

    @property
    def kernel_imports(self):
        out = {}
        for b in self.branches:
            for layer in b:
                for mod, names in layer.kernel_imports.items():
                    out[mod] = tuple(dict.fromkeys(out.get(mod, ()) + tuple(names)))
        return out

    def _pname(self, k, j, name):
        return f"{k}.{j}.{name}"

    # --- shapes and layout -------------------------------------------------------------
    def _plan(self, input_shape):
        """``(subs, branch outputs, join offsets, saved size, buffers)``: the layout of every
        sub-layer (per-lane offsets), each branch's output ``(where, offset)`` and shape,
        where each branch's output goes in the joined output, and the saved area size."""
        input_shape = tuple(input_shape)
        subs, outs, shapes, sv, p = [], [], [], 0, 0
        for k, branch in enumerate(self.branches):
            cur, shape = ("in", 0), input_shape
            for j, layer in enumerate(branch):
                try:
                    out = tuple(layer.output_shape(shape))
                except ValueError as e:
                    raise ValueError(f"{type(self).__name__} branch {k}, layer {j} ({layer!r}) "
                                     f"with input shape {shape}: {e}") from None
                if getattr(layer, "aliases_input", False):
                    dst = cur
                else:
                    dst = ("sv", sv)
                    sv += prod(out)
                subs.append(_Sub(layer, k, j, shape, out, p, cur, dst, sv))
                sv += layer.saved_size(shape)
                p += layer.n_params(shape)
                cur, shape = dst, out
            outs.append(cur)
            shapes.append(shape)
        out_shape = self._join(shapes)
        # concat: where each branch's rows start in the output
        starts, r = [], 0
        for s in shapes:
            starts.append(r)
            r += prod(s)
        maxf = max([prod(input_shape), prod(out_shape)] + [prod(s.out_shape) for s in subs])
        bufs = (sv, sv + maxf)  # two gradient buffers for the branches' pullbacks
        return subs, outs, shapes, starts, out_shape, sv + 2 * maxf, bufs, p

    def _join(self, shapes):
        listing = ", ".join(f"branch {k}: {s}" for k, s in enumerate(shapes))
        if self.connection == "sum":
            if any(s != shapes[0] for s in shapes):
                raise ValueError(f"{type(self).__name__}('sum') needs branch outputs of equal "
                                 f"shape, got {listing}")
            return shapes[0]
        if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(f"{type(self).__name__}('concat') joins along the first axis and needs "
                             f"the other axes equal, got {listing}")
        return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])

    def output_shape(self, input_shape):
        return self._plan(input_shape)[4]

    def param_shapes(self, input_shape):
        out = {}
        for s in self._plan(input_shape)[0]:
            for name, shape in s.layer.param_shapes(s.in_shape).items():
                out[self._pname(s.k, s.j, name)] = shape
        return out

    def init_params(self, views, input_shape, rng):
        for s in self._plan(input_shape)[0]:
            sub = {name: views[self._pname(s.k, s.j, name)] for name in s.layer.param_shapes(s.in_shape)}
            s.layer.init_params(sub, s.in_shape, rng)

    def saved_size(self, input_shape):
        return self._plan(input_shape)[5]

    # --- emitted code ------------------------------------------------------------------
    def _addr(self, ctx, loc):
        where, off = loc
        base = {"in": ctx.in_off, "out": ctx.out_off, "sv": ctx.saved_off}[where]
        return base + off * ctx.B

    def _sub_ctx(self, ctx, s, **kw):
        return replace(ctx, in_shape=s.in_shape, out_shape=s.out_shape, p_off=ctx.p_off + s.p_off,
                       in_off=self._addr(ctx, s.src), out_off=self._addr(ctx, s.dst),
                       saved_off=ctx.saved_off + s.saved * ctx.B,
                       layer_index=(1 << 20) + (ctx.layer_index << 10) + (s.k << 5) + s.j, **kw)

    def _forward(self, ctx, reference):
        subs, outs, shapes, starts, out_shape, _, _, _ = self._plan(ctx.in_shape)
        B, L = ctx.B, []
        for s in subs:
            c = self._sub_ctx(ctx, s)
            L += [STEP_BREAK] + (s.layer.emit_forward_reference(c) if reference
                                 else s.layer.emit_forward(c))
        L.append(STEP_BREAK)
        srcs = [self._addr(ctx, o) for o in outs]
        if self.connection == "sum":
            n = prod(out_shape) * B
            L += [f"# {self.connection} of {len(srcs)} branches", f"for i in range({n}):",
                  f"    work[{ctx.out_off} + i] = " + " + ".join(f"work[{a} + i]" for a in srcs)]
        else:
            for k, a in enumerate(srcs):
                L += [f"# branch {k} -> rows {starts[k]}.. of the output",
                      f"for i in range({prod(shapes[k]) * B}):",
                      f"    work[{ctx.out_off + starts[k] * B} + i] = work[{a} + i]"]
        return L

    def _pullback(self, ctx, reference):
        subs, _, shapes, starts, out_shape, _, (ga, gb), _ = self._plan(ctx.in_shape)
        B, L = ctx.B, []
        ga, gb = ctx.saved_off + ga * B, ctx.saved_off + gb * B
        n_in = prod(ctx.in_shape) * B
        K = len(self.branches)
        for k in range(K):
            # dL/d(branch output): its rows (concat) or a copy of all of dL/dy (sum; the last
            # branch takes dL/dy itself, which a sub-layer's pullback may overwrite)
            if self.connection == "concat":
                src = ctx.gout_off + starts[k] * B
            elif k == K - 1:
                src = ctx.gout_off
            else:
                src = ga
                L += [STEP_BREAK, f"for i in range({prod(out_shape) * B}):",
                      f"    work[{ga} + i] = work[{ctx.gout_off} + i]"]
            mine = [s for s in subs if s.k == k]
            for idx in range(len(mine) - 1, -1, -1):
                s = mine[idx]
                if getattr(s.layer, "aliases_input", False):
                    continue
                need = ctx.need_gin or idx > 0
                dst = gb if src == ga else ga
                c = self._sub_ctx(ctx, s, gout_off=src, gin_off=dst, need_gin=need)
                L += [STEP_BREAK] + (s.layer.emit_pullback_reference(c) if reference
                                     else s.layer.emit_pullback(c))
                src = dst
            if ctx.need_gin:  # the branch's dL/dx is at src
                op = "=" if k == 0 else "+="
                L += [STEP_BREAK, f"for i in range({n_in}):",
                      f"    work[{ctx.gin_off} + i] {op} work[{src} + i]"]
        return L

    def emit_forward(self, ctx: EmitContext):
        return self._forward(ctx, False)

    def emit_pullback(self, ctx: EmitContext):
        return self._pullback(ctx, False)

    def emit_forward_reference(self, ctx: EmitContext):
        return self._forward(ctx, True)

    def emit_pullback_reference(self, ctx: EmitContext):
        return self._pullback(ctx, True)


@dataclass(frozen=True, init=False, repr=False)
class SkipConnection(Parallel):
    """``layers(x)`` joined with ``x`` itself: ``connection="sum"`` gives the residual
    ``layers(x) + x`` (He et al. 2016), ``"concat"`` stacks ``[layers(x), x]`` along the
    first axis (DenseNet style). Flux's ``SkipConnection(layers, connection)``.

    Parameters in ``p`` are the branch's, named ``"<layer>.<name>"`` in ``param_views``.

    Parameters
    ----------
    layers : Layer or tuple of Layers
        The branch (a sub-chain run left to right).
    connection : {"sum", "concat"}, default "sum"

    Raises
    ------
    TypeError, ValueError
        As :class:`Parallel`; with ``"sum"``, a branch whose output shape differs from its
        input's.
    """

    def __init__(self, layers, connection="sum"):
        super().__init__(connection, layers, ())

    def __repr__(self) -> str:
        b = self.branches[0]
        inner = repr(b[0]) if len(b) == 1 else "(" + ", ".join(map(repr, b)) + ")"
        return f"SkipConnection({inner}, {self.connection!r})"

    def _pname(self, k, j, name):
        return f"{j}.{name}"
