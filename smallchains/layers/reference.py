"""Reference kernels: every layer's forward and pullback as the plainest correct code.

One scalar loop nest per layer and pass: no register tiles, no vectors, no fused delta, no
padded copies (convolution borders are bounds checks), no skipped rows. They work on the
same feature-major blocks and the same workspace plan as the tuned emitters (feature ``f``
of lane ``s`` at ``work[off + f * B + s]``), so a whole chain can run on them:
``SimpleChain(..., kernels="reference")`` is the debugging fallback when a tuned kernel is
suspected, and the variant tests (tests/test_variants.py) compare every tuned variant with
these. Activations use the same scalar expressions as the tuned kernels
(:func:`smallchains.activations.value_expr`, :func:`~smallchains.activations.grad_expr`),
which are tested against numpy and torch on their own (tests/test_fastmath.py, the
gradient tests).

Each function returns source lines for a layer step, with the contract of
:meth:`smallchains.layers.base.Layer.emit_forward` / ``emit_pullback``: the forward
overwrites the output block (and ``z`` at ``z_off`` if the activation needs it); the
pullback reads ``dL/da`` at ``ctx.gout_off`` (overwriting it with ``dL/dz``), adds
``dL/dp`` into ``g`` and, if ``ctx.need_gin``, overwrites ``dL/dx`` at ``ctx.gin_off``.
"""

from __future__ import annotations

from ..activations import grad_expr, needs_z, value_expr


def _act_lines(act, dt, pad, q, z_off, a_off):
    """Store ``zz`` (if ``f'`` needs it) and ``f(zz)`` at offset expression ``q``."""
    L = [f"{pad}work[{z_off} + {q}] = zz"] if needs_z(act) else []
    return L + [f"{pad}work[{a_off} + {q}] = {value_expr(act, 'zz', dt)}"]


def _delta_lines(act, dt, pad, q, go, z_off, a_off):
    """``d = dL/da * f'(z)`` at offset expression ``q``, written over ``dL/da``."""
    L = [f"{pad}zz = work[{z_off} + {q}]"] if needs_z(act) else []
    L += [f"{pad}aa = work[{a_off} + {q}]",
          f"{pad}d = work[{go} + {q}] * {grad_expr(act, 'zz', 'aa', dt)}",
          f"{pad}work[{go} + {q}] = d"]
    return L


def dense_forward(ctx, n_in, n_out, w_off, b_off, act, z_off):
    """``a[o, s] = f(b[o] + sum_i W[o, i] x[i, s])``, ``W (n_out, n_in)`` row-major at
    ``p[w_off]``, ``b`` at ``p[b_off]`` (or none)."""
    B, dt, x, a = ctx.B, ctx.dt, ctx.in_off, ctx.out_off
    L = [f"# reference dense {n_in} -> {n_out} ({act.name})",
         f"for o in range({n_out}):",
         f"    for s in range({B}):",
         f"        zz = p[{b_off} + o]" if b_off is not None else f"        zz = {dt}(0.0)",
         f"        for i in range({n_in}):",
         f"            zz += p[{w_off} + o * {n_in} + i] * work[{x} + i * {B} + s]"]
    return L + _act_lines(act, dt, " " * 8, f"o * {B} + s", z_off, a)


def dense_pullback(ctx, n_in, n_out, w_off, b_off, act, z_off):
    """delta, ``dL/dW[o, i] += sum_s delta[o, s] x[i, s]``, ``dL/db``, and
    ``dL/dx[i, s] = sum_o W[o, i] delta[o, s]``."""
    B, dt, x, go, gi = ctx.B, ctx.dt, ctx.in_off, ctx.gout_off, ctx.gin_off
    L = [f"# reference pullback of dense {n_in} -> {n_out} ({act.name})",
         f"for o in range({n_out}):",
         f"    for s in range({B}):"]
    L += _delta_lines(act, dt, " " * 8, f"o * {B} + s", go, z_off, ctx.out_off)
    L += [f"        g[{b_off} + o] += d"] if b_off is not None else []
    L += [f"        for i in range({n_in}):",
          f"            g[{w_off} + o * {n_in} + i] += d * work[{x} + i * {B} + s]"]
    if ctx.need_gin is False:
        return L
    return L + [f"if {ctx.need_gin}:",
                f"    for i in range({n_in}):",
                f"        for s in range({B}):",
                f"            acc = {dt}(0.0)",
                f"            for o in range({n_out}):",
                f"                acc += p[{w_off} + o * {n_in} + i] * work[{go} + o * {B} + s]",
                f"            work[{gi} + i * {B} + s] = acc"]


def _conv_dims(C, H, W, K, P):
    (KH, KW), (PH, PW) = K, P
    return KH, KW, PH, PW, H + 2 * PH - KH + 1, W + 2 * PW - KW + 1


def _conv_taps(C, H, W, K, P, B, pad, body):
    """Loops over ``ci, ky, kx`` whose input pixel ``(iy, ix)`` lies inside the image
    (zero padding: taps outside read zeros, so they are skipped), around ``body``; the
    input element is ``work[<in> + xi]``, the weight ``p[<w> + wt]`` with
    ``wt = ((co * C + ci) * KH + ky) * KW + kx``."""
    KH, KW, PH, PW, _, _ = _conv_dims(C, H, W, K, P)
    L = [f"{pad}for ci in range({C}):",
         f"{pad}    for ky in range({KH}):",
         f"{pad}        iy = y + ky - {PH}",
         f"{pad}        if iy >= 0 and iy < {H}:",
         f"{pad}            for kx in range({KW}):",
         f"{pad}                ix = x + kx - {PW}",
         f"{pad}                if ix >= 0 and ix < {W}:",
         f"{pad}                    xi = ((ci * {H} + iy) * {W} + ix) * {B} + s",
         f"{pad}                    wt = ((co * {C} + ci) * {KH} + ky) * {KW} + kx"]
    return L + [f"{pad}                    {ln}" for ln in body]


def _conv_pixels(Co, Ho, Wo, B):
    return [f"for co in range({Co}):", "    for y in range({}):".format(Ho),
            f"        for x in range({Wo}):", f"            for s in range({B}):",
            f"                q = ((co * {Ho} + y) * {Wo} + x) * {B} + s"]


def conv_forward(ctx, C, H, W, Co, K, P, bias, act, z_off):
    """``z[co, y, x] = b[co] + sum_{ci, ky, kx} W[co, ci, ky, kx] x[ci, y + ky - PH,
    x + kx - PW]`` (zero outside the image), ``a = f(z)``; ``K = (KH, KW)``,
    ``P = (PH, PW)``, ``W`` at ``p[ctx.p_off]`` in torch layout, then ``b``."""
    B, dt, w = ctx.B, ctx.dt, ctx.p_off
    KH, KW, PH, PW, Ho, Wo = _conv_dims(C, H, W, K, P)
    b0 = f"p[{w + Co * C * KH * KW} + co]" if bias else f"{dt}(0.0)"
    L = [f"# reference conv {C}x{H}x{W} -> {Co}x{Ho}x{Wo}, {KH}x{KW}, padding {PH}x{PW} ({act.name})"]
    L += _conv_pixels(Co, Ho, Wo, B) + [f"                zz = {b0}"]
    L += _conv_taps(C, H, W, K, P, B, " " * 16,
                    [f"zz += p[{w} + wt] * work[{ctx.in_off} + xi]"])
    return L + _act_lines(act, dt, " " * 16, "q", z_off, ctx.out_off)


def conv_pullback(ctx, C, H, W, Co, K, P, bias, act, z_off):
    """delta, ``dL/db``, ``dL/dW`` and (scattered from every output pixel) ``dL/dx``."""
    B, dt, w, go, gi = ctx.B, ctx.dt, ctx.p_off, ctx.gout_off, ctx.gin_off
    KH, KW, PH, PW, Ho, Wo = _conv_dims(C, H, W, K, P)
    zo = z_off if needs_z(act) else ctx.out_off
    L = [f"# reference pullback of conv {C}x{H}x{W} -> {Co}x{Ho}x{Wo}, {KH}x{KW}, padding {PH}x{PW}"]
    L += _conv_pixels(Co, Ho, Wo, B)
    L += _delta_lines(act, dt, " " * 16, "q", go, zo, ctx.out_off)
    L += [f"                g[{w + Co * C * KH * KW} + co] += d"] if bias else []
    L += _conv_taps(C, H, W, K, P, B, " " * 16, [f"g[{w} + wt] += d * work[{ctx.in_off} + xi]"])
    if ctx.need_gin is False:
        return L
    body = [f"for j in range({C * H * W * B}):", f"    work[{gi} + j] = {dt}(0.0)"]
    body += _conv_pixels(Co, Ho, Wo, B) + [f"                d = work[{go} + q]"]
    body += _conv_taps(C, H, W, K, P, B, " " * 16, [f"work[{gi} + xi] += p[{w} + wt] * d"])
    return L + [f"if {ctx.need_gin}:"] + ["    " + ln for ln in body]


def _windows(C, H, W, KH, KW, B):
    Ho, Wo = H // KH, W // KW
    return [f"for c in range({C}):", f"    for oy in range({Ho}):", f"        for ox in range({Wo}):",
            f"            for s in range({B}):",
            f"                q = ((c * {Ho} + oy) * {Wo} + ox) * {B} + s"]


def _window_taps(H, W, KH, KW, B, pad):
    return [f"{pad}for dy in range({KH}):", f"{pad}    for dx in range({KW}):",
            f"{pad}        xi = ((c * {H} + oy * {KH} + dy) * {W} + ox * {KW} + dx) * {B} + s"]


def maxpool_forward(ctx, C, H, W, KH, KW):
    """``y[c, oy, ox] = max over the KH x KW window at (oy KH, ox KW)``."""
    i, B = ctx.in_off, ctx.B
    L = [f"# reference maxpool {KH}x{KW}: {C}x{H}x{W}"] + _windows(C, H, W, KH, KW, B)
    L += [f"                m = work[{i} + ((c * {H} + oy * {KH}) * {W} + ox * {KW}) * {B} + s]"]
    L += _window_taps(H, W, KH, KW, B, " " * 16)
    L += [f"                        v = work[{i} + xi]", "                        if v > m:",
          "                            m = v", f"                work[{ctx.out_off} + q] = m"]
    return L


def maxpool_pullback(ctx, C, H, W, KH, KW):
    """``dL/dx`` is ``dL/dy`` at the first maximal element of each window (row-major order,
    as torch), zero elsewhere (also outside every window)."""
    if ctx.need_gin is False:
        return []
    i, B, dt, gi = ctx.in_off, ctx.B, ctx.dt, ctx.gin_off
    body = [f"for j in range({C * H * W * B}):", f"    work[{gi} + j] = {dt}(0.0)"]
    body += _windows(C, H, W, KH, KW, B)
    body += [f"                m = work[{ctx.out_off} + q]", "                found = False"]
    body += _window_taps(H, W, KH, KW, B, " " * 16)
    body += [f"                        if not found and work[{i} + xi] == m:",
             f"                            work[{gi} + xi] = work[{ctx.gout_off} + q]",
             "                            found = True"]
    return [f"# reference pullback of maxpool {KH}x{KW}", f"if {ctx.need_gin}:"] + ["    " + ln for ln in body]
