"""Shape layers without parameters: :class:`Reshape`, :class:`Permute`, :class:`Slice`.

All act on the per-sample axes (the batch axis is never named), in C order like numpy and
torch. ``Reshape`` costs nothing (the block layout is already flat: its output shares the
input's workspace, as ``Flatten``). ``Permute`` and ``Slice`` are strided views of the
input: the forward step copies the viewed elements into the output block, the pullback
writes ``dL/dy`` back to their places (and zeros elsewhere for a ``Slice``); every inner
loop runs over the block's lanes.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from .base import EmitContext, Layer


def _c_strides(shape):
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= n
    return tuple(reversed(st))


def _emit_view(B, base, dims, src, dst, pullback):
    """Lines copying the strided view ``in[base + sum_k i_k * stride_k]`` (``dims`` a tuple
    of ``(n_k, stride_k)``) to the contiguous ``out`` block (forward), or back (pullback:
    ``src`` is then ``dL/dy`` and ``dst`` ``dL/dx``)."""
    idx = [f"a{k}" for k in range(len(dims))]
    L, pad = [], ""
    for k, (n, _) in enumerate(dims):
        L.append(f"{pad}for a{k} in range({n}):")
        pad += "    "
    view = " + ".join([str(base)] + [f"a{k} * {st}" for k, (_, st) in enumerate(dims)])
    flat, mult = [], 1
    for k in reversed(range(len(dims))):
        flat.append(f"a{k} * {mult}")
        mult *= dims[k][0]
    flat = " + ".join(reversed(flat)) if idx else "0"
    v, o = (f"({view}) * {B}", f"({flat}) * {B}")
    L += [f"{pad}vi = {v}", f"{pad}oi = {o}", f"{pad}for s in range({B}):"]
    if pullback:
        L.append(f"{pad}    work[{dst} + vi + s] = work[{src} + oi + s]")
    else:
        L.append(f"{pad}    work[{dst} + oi + s] = work[{src} + vi + s]")
    return L


class _View(Layer):
    """A strided view of the input (subclasses define :meth:`_view`)."""

    def _view(self, input_shape):
        """``(base, ((n_k, stride_k), ...), output shape)`` of the view."""
        raise NotImplementedError

    def output_shape(self, input_shape):
        return self._view(tuple(input_shape))[2]

    def emit_forward(self, ctx: EmitContext):
        base, dims, _ = self._view(ctx.in_shape)
        return [f"# {self!r}"] + _emit_view(ctx.B, base, dims, ctx.in_off, ctx.out_off, False)

    def emit_pullback(self, ctx: EmitContext):
        if not ctx.need_gin:
            return []
        base, dims, out = self._view(ctx.in_shape)
        L = [f"# {self!r} pullback"]
        if prod(out) < prod(ctx.in_shape):  # elements outside the view get no gradient
            L += [f"for i in range({prod(ctx.in_shape) * ctx.B}):", f"    work[{ctx.gin_off} + i] = 0"]
        return L + _emit_view(ctx.B, base, dims, ctx.gout_off, ctx.gin_off, True)

    # plain loop nests already: their own reference
    emit_forward_reference = emit_forward
    emit_pullback_reference = emit_pullback


def _int_tuple(name, v):
    try:
        t = tuple(v)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints, got {v!r}") from None
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in t):
        raise TypeError(f"{name} must be a tuple of ints, got {v!r}")
    return t


@dataclass(frozen=True, init=False, repr=False)
class Reshape(Layer):
    """Per-sample reshape in C order (``x.reshape(N, *shape)`` in torch); one entry may be
    ``-1``. Free: the output shares the input's workspace.

    Raises
    ------
    TypeError
        ``shape`` not a tuple of ints.
    ValueError
        A size that does not match the input's element count, or more than one ``-1``.
    """

    shape: tuple
    aliases_input = True

    def __init__(self, shape):
        shape = _int_tuple("Reshape: shape", (shape,) if isinstance(shape, int) else shape)
        if not shape or shape.count(-1) > 1 or any(d < 1 and d != -1 for d in shape):
            raise ValueError(f"Reshape: shape must be positive ints with at most one -1, got {shape}")
        object.__setattr__(self, "shape", shape)

    def __repr__(self):
        return f"Reshape({self.shape})"

    def output_shape(self, input_shape):
        n = prod(input_shape)
        known = prod(d for d in self.shape if d != -1)
        out = tuple(n // known if d == -1 else d for d in self.shape)
        if prod(out) != n:
            raise ValueError(f"Reshape{self.shape}: cannot reshape {tuple(input_shape)} "
                             f"({n} elements) to {self.shape}")
        return out

    def emit_forward(self, ctx):
        return []

    def emit_pullback(self, ctx):
        return []

    emit_forward_reference = emit_forward
    emit_pullback_reference = emit_pullback


@dataclass(frozen=True, init=False, repr=False)
class Permute(_View):
    """Permute the per-sample axes: output axis ``k`` is input axis ``perm[k]`` (torch's
    ``x.permute(0, *[d + 1 for d in perm])``; Flux's ``permutedims``). For example
    ``Permute((1, 0))`` turns a ``(C, T)`` convolution output into a ``(T, C)`` sequence.

    Raises
    ------
    TypeError
        ``perm`` not a tuple of ints.
    ValueError
        ``perm`` not a permutation of the input's axes.
    """

    perm: tuple

    def __init__(self, perm):
        object.__setattr__(self, "perm", _int_tuple("Permute: perm", perm))

    def __repr__(self):
        return f"Permute({self.perm})"

    def _view(self, input_shape):
        if sorted(self.perm) != list(range(len(input_shape))):
            raise ValueError(f"Permute{self.perm}: not a permutation of the {len(input_shape)} "
                             f"axes of input shape {input_shape}")
        st = _c_strides(input_shape)
        dims = tuple((input_shape[a], st[a]) for a in self.perm)
        return 0, dims, tuple(input_shape[a] for a in self.perm)


@dataclass(frozen=True, init=False, repr=False)
class Slice(_View):
    """Basic indexing of the per-sample axes: ``Slice(i_0, i_1, ...)`` is ``x[:, i_0, i_1,
    ...]`` in numpy, each ``i_k`` an int (the axis is dropped) or a ``slice`` (any step but
    0); axes not named are kept whole. For example ``Slice(slice(-4, None), 0)`` takes the
    last 4 time steps of feature 0 of a ``(T, F)`` sequence, shape ``(4,)``.

    The pullback writes ``dL/dx`` as zero outside the slice.

    Raises
    ------
    TypeError
        An index that is neither an int nor a slice.
    ValueError
        More indices than axes, an int out of range, or an empty slice.
    """

    index: tuple

    def __init__(self, *index):
        for i in index:
            if not isinstance(i, slice) and (not isinstance(i, int) or isinstance(i, bool)):
                raise TypeError(f"Slice: each index must be an int or a slice, got {i!r}")
            if isinstance(i, slice) and i.step == 0:
                raise ValueError("Slice: slice step cannot be zero")
        object.__setattr__(self, "index", tuple(index))

    def __repr__(self):
        def one(i):
            if isinstance(i, int):
                return repr(i)
            return "slice(" + ", ".join(repr(v) for v in (i.start, i.stop, i.step)) + ")"
        return "Slice(" + ", ".join(one(i) for i in self.index) + ")"

    def spec(self):
        return repr(self)

    def _view(self, input_shape):
        if len(self.index) > len(input_shape):
            raise ValueError(f"{self!r}: {len(self.index)} indices for input shape {input_shape}")
        st = _c_strides(input_shape)
        base, dims = 0, []
        for k, n in enumerate(input_shape):
            i = self.index[k] if k < len(self.index) else slice(None)
            if isinstance(i, int):
                if not -n <= i < n:
                    raise ValueError(f"{self!r}: index {i} out of range for axis {k} of size {n}")
                base += (i % n) * st[k]
                continue
            r = range(*i.indices(n))
            if len(r) == 0:
                raise ValueError(f"{self!r}: empty slice of axis {k} (size {n})")
            base += r.start * st[k]
            dims.append((len(r), r.step * st[k]))
        if not dims:
            raise ValueError(f"{self!r}: must keep at least one axis of {input_shape} (use a "
                             "slice of length 1)")
        dims = tuple(dims)
        return base, dims, tuple(n for n, _ in dims)
