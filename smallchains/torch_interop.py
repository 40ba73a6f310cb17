"""PyTorch interop: a ``torch.nn.Sequential`` to a chain with its parameters, and back.

:func:`from_torch` maps each module to a smallchains layer and copies the weights (torch's
``Linear.weight (out, in)`` and ``Conv2d.weight (out, in, KH, KW)`` are smallchains'
``W`` as they are), then checks that both compute the same outputs on random inputs.
:func:`to_torch` goes the other way. torch is imported only when they are called.
"""

from __future__ import annotations

import numpy as np

from ._validate import check_dtype, check_params

__all__ = ["from_torch", "to_torch", "RecurrentOutput"]

_recurrent_output = None


def _recurrent_output_class():
    """:class:`RecurrentOutput`, defined on first use (torch is imported only then)."""
    global _recurrent_output
    if _recurrent_output is None:
        import torch.nn as nn

        class RecurrentOutput(nn.Module):
            """A batch-first ``nn.GRU`` / ``nn.LSTM`` as one ``nn.Sequential`` step: its
            output sequence ``(N, T, hidden)`` (``return_sequences=True``) or the last step
            ``(N, hidden)``; torch's recurrent modules return a tuple, which
            ``nn.Sequential`` cannot pass on. ``smallchains.GRU(hidden,
            return_sequences)`` / ``LSTM`` in torch."""

            def __init__(self, rnn, return_sequences=False):
                super().__init__()
                self.rnn, self.return_sequences = rnn, bool(return_sequences)

            def forward(self, x):
                y = self.rnn(x)[0]
                return y if self.return_sequences else y[:, -1]

        RecurrentOutput.__module__, RecurrentOutput.__qualname__ = __name__, "RecurrentOutput"
        _recurrent_output = RecurrentOutput
    return _recurrent_output


def __getattr__(name):
    # PEP 562: smallchains.torch_interop.RecurrentOutput (also what unpickling looks up)
    if name == "RecurrentOutput":
        return _recurrent_output_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _act_name(m):
    """The smallchains activation of torch activation module ``m``; None if ``m`` is not an
    activation; ValueError for one whose settings smallchains does not compute."""
    nn = __import__("torch").nn
    simple = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.SiLU: "silu",
              nn.Identity: "identity"}
    for cls, name in simple.items():
        if type(m) is cls:
            return name
    if type(m) is nn.GELU:
        if m.approximate != "tanh":
            raise ValueError("GELU(approximate='none') (the erf form) is not available: smallchains' "
                             "gelu is the tanh approximation, GELU(approximate='tanh')")
        return "gelu"
    if type(m) is nn.Softplus:
        if m.beta != 1 or m.threshold != 20:
            raise ValueError(f"Softplus(beta={m.beta}, threshold={m.threshold}): only beta=1, "
                             "threshold=20 (torch's default) is available")
        return "softplus"
    if type(m) is nn.ELU:
        if m.alpha != 1.0:
            raise ValueError(f"ELU(alpha={m.alpha}): only alpha=1 is available")
        return "elu"
    if type(m) is nn.LeakyReLU:
        if m.negative_slope != 0.01:
            raise ValueError(f"LeakyReLU(negative_slope={m.negative_slope}): only 0.01 (torch's "
                             "default) is available")
        return "leaky_relu"
    return None


def _flat_modules(module):
    nn = __import__("torch").nn
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"from_torch expects a torch.nn.Sequential, got {type(module).__name__}")
    out = []
    for m in module:
        out.extend(_flat_modules(m) if isinstance(m, nn.Sequential) else [m])
    return out


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _layers(mods, input_shape):
    """``[(smallchains layer, the torch module it takes the parameters of)]``."""
    out, shape, i = [], input_shape, 0
    while i < len(mods):
        where = f"module {i} ({mods[i]!r})"
        try:
            layer, nxt = _layer(mods, i, shape, where)
            shape = tuple(layer.output_shape(shape))
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith("module ") else f"{where}: {msg}") from None
        out.append((layer, mods[i]))
        i += 2 if nxt is not None else 1
    return out


def _layer(mods, i, shape, where):
    """The smallchains layer of ``mods[i]`` and the activation name it takes from
    ``mods[i + 1]`` (None if it takes none)."""
    import torch.nn as nn

    from . import layers as L

    m = mods[i]
    nxt = _act_name(mods[i + 1]) if i + 1 < len(mods) else None
    if isinstance(m, nn.Linear) and len(shape) == 2 and shape[1] == m.in_features:
        # on a sequence (N, T, F) torch applies it at every step
        layer = L.TimeDistributed(L.TurboDense(m.out_features, nxt or "identity",
                                               bias=m.bias is not None))
    elif isinstance(m, nn.Linear):
        if len(shape) != 1 or shape[0] != m.in_features:
            raise ValueError(f"{where}: takes {m.in_features} features, gets shape {shape} "
                             "(a multi-dimensional input needs nn.Flatten() before it)")
        layer = L.TurboDense(m.out_features, nxt or "identity", bias=m.bias is not None)
    elif isinstance(m, (nn.GRU, nn.LSTM)) or type(m).__name__ == "RecurrentOutput" \
            and isinstance(m, _recurrent_output_class()):
        rnn, seq = (m, True) if isinstance(m, (nn.GRU, nn.LSTM)) else (m.rnn, m.return_sequences)
        if not isinstance(rnn, (nn.GRU, nn.LSTM)) or type(rnn) not in (nn.GRU, nn.LSTM):
            raise ValueError(f"{where}: RecurrentOutput must wrap an nn.GRU or nn.LSTM")
        if (not rnn.batch_first or rnn.num_layers != 1 or rnn.bidirectional or not rnn.bias
                or getattr(rnn, "proj_size", 0)):
            raise ValueError(f"{where}: only batch_first=True, num_layers=1, "
                             "bidirectional=False, bias=True (and proj_size=0) are available "
                             "(stack layers as separate modules)")
        if len(shape) != 2 or shape[1] != rnn.input_size:
            raise ValueError(f"{where}: takes sequences (T, {rnn.input_size}), gets shape {shape}")
        cls = L.GRU if isinstance(rnn, nn.GRU) else L.LSTM
        layer, nxt = cls(rnn.hidden_size, return_sequences=seq), None
    elif isinstance(m, nn.Conv2d):
        bad = {k: v for k, v in (("stride", _pair(m.stride)), ("dilation", _pair(m.dilation)))
               if v != (1, 1)}
        if bad or m.groups != 1 or m.padding_mode != "zeros":
            raise ValueError(f"{where}: only stride 1, dilation 1, groups 1 and zero padding are "
                             f"available, got {bad or ''} groups={m.groups} "
                             f"padding_mode={m.padding_mode!r}")
        if len(shape) != 3 or shape[0] != m.in_channels:
            raise ValueError(f"{where}: takes {m.in_channels} channels, gets shape {shape}")
        pad = m.padding if isinstance(m.padding, str) else _pair(m.padding)
        layer = L.Conv(m.out_channels, _pair(m.kernel_size), nxt or "identity", padding=pad,
                       bias=m.bias is not None)
    elif isinstance(m, nn.MaxPool2d):
        k = _pair(m.kernel_size)
        stride = k if m.stride is None else _pair(m.stride)
        if stride != k or _pair(m.padding) != (0, 0) or _pair(m.dilation) != (1, 1) \
                or m.ceil_mode or m.return_indices:
            raise ValueError(f"{where}: only non-overlapping windows (stride = kernel size), no "
                             "padding, dilation 1 and ceil_mode=False are available")
        layer, nxt = L.MaxPool(k), None
    elif isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise ValueError(f"{where}: only Flatten(start_dim=1, end_dim=-1) is available")
        layer, nxt = L.Flatten(), None
    elif isinstance(m, nn.Dropout) and type(m) is nn.Dropout:
        layer, nxt = L.Dropout(m.p), None
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        dims = 1 if isinstance(m, nn.BatchNorm1d) else 3
        if len(shape) != dims or shape[0] != m.num_features:
            raise ValueError(f"{where}: normalizes {m.num_features} channels of a "
                             f"{'(C,)' if dims == 1 else '(C, H, W)'} input, gets shape {shape}")
        if not m.affine or not m.track_running_stats or m.momentum is None:
            raise ValueError(f"{where}: only affine=True, track_running_stats=True and a numeric "
                             "momentum are available")
        layer, nxt = L.BatchNorm(momentum=m.momentum, eps=m.eps), None
    elif _act_name(m) is not None:
        raise ValueError(f"{where}: an activation must follow a Linear or Conv2d directly "
                         "(smallchains applies it inside that layer)")
    else:
        raise ValueError(f"{where}: {type(m).__name__} is not supported (supported: Linear, "
                         "Conv2d, MaxPool2d, Flatten, Dropout, BatchNorm1d/2d, GRU, LSTM (bare: "
                         "the output sequence; or in smallchains.torch_interop.RecurrentOutput) "
                         "and the activations "
                         "Tanh, ReLU, Sigmoid, Softplus, GELU('tanh'), SiLU, ELU, LeakyReLU, "
                         "Identity after a Linear or Conv2d)")
    return layer, nxt


def from_torch(module, input_shape=None, *, dtype=np.float32, check=True):
    """A ``torch.nn.Sequential`` as a smallchains chain with the same parameters.

    Parameters
    ----------
    module : torch.nn.Sequential (nested Sequentials are flattened)
        Of ``Linear``, ``Conv2d`` (stride 1, dilation 1, groups 1, zero padding: an int, a
        pair, ``"valid"`` or ``"same"`` with odd kernels), ``MaxPool2d`` (stride = kernel
        size), ``Flatten``, ``Dropout``, ``BatchNorm1d`` / ``BatchNorm2d`` (affine, with
        running statistics), ``GRU`` / ``LSTM`` (batch-first, one layer, unidirectional,
        with biases: a bare one stands for its output sequence, the first item of the
        tuple it returns; wrapped in :class:`RecurrentOutput` for the last step), a
        ``Linear`` on a sequence (every step: ``TimeDistributed(TurboDense)``), and
        activations right after a ``Linear`` or ``Conv2d``:
        ``Tanh``, ``ReLU``, ``Sigmoid``, ``Softplus`` (default settings), ``GELU
        (approximate="tanh")``, ``SiLU``, ``ELU`` (alpha 1), ``LeakyReLU`` (slope 0.01),
        ``Identity``. Not modified (its train/eval mode is restored).
    input_shape : int or tuple, optional
        Shape of one sample, NCHW without N. Default: the first ``Linear``'s
        ``in_features``; required when the first module is a ``Conv2d``.
    dtype : np.float32 or np.float64 -- of ``p`` and ``state``.
    check : bool, default True
        Run both on 5 random samples in inference mode and raise if the outputs differ by
        more than rounding (float64: 1e-9, float32: 1e-4 relative to the largest output).
        This compiles the chain's kernels, which training would compile anyway.

    Returns
    -------
    (chain, p, state)
        The :class:`~smallchains.SimpleChain`, its parameters ``(n_params,)`` and its
        layer state (the BatchNorm running statistics; None without BatchNorm).

    Raises
    ------
    TypeError
        ``module`` is not an ``nn.Sequential``.
    ValueError
        A module that has no smallchains equivalent (the message names it and its
        position), a shape that does not fit, a failed output check.
    """
    import torch

    dtype = check_dtype(dtype)
    mods = _flat_modules(module)
    if not mods:
        raise ValueError("from_torch: the Sequential is empty")
    if input_shape is None:
        if not isinstance(mods[0], torch.nn.Linear):
            raise ValueError(f"from_torch: give input_shape (the first module, {mods[0]!r}, does not "
                             "say the size of a sample)")
        input_shape = (mods[0].in_features,)
    input_shape = (int(input_shape),) if np.ndim(input_shape) == 0 else tuple(int(d) for d in input_shape)
    pairs = _layers(mods, input_shape)
    from .chain import SimpleChain, init_params, init_state

    chain = SimpleChain(input_shape, *[layer for layer, _ in pairs])
    p = init_params(chain, seed=0, dtype=np.float64)
    state = init_state(chain, np.float64) if chain.n_state else None
    sviews = chain.state_views(state) if state is not None else [{}] * len(pairs)
    for (layer, m), views, sv in zip(pairs, chain.param_views(p), sviews):
        m = getattr(m, "rnn", m)  # RecurrentOutput
        for name, v in views.items():
            if name.startswith(("weight_", "bias_")):  # GRU / LSTM, torch's layout
                src = getattr(m, name + "_l0")
            else:
                src = {"W": m.weight, "b": getattr(m, "bias", None),
                       "weight": getattr(m, "weight", None), "bias": getattr(m, "bias", None)}[name]
            v[...] = src.detach().cpu().double().numpy().reshape(v.shape)
        for name, v in sv.items():
            v[...] = getattr(m, name).detach().cpu().double().numpy()
    p = p.astype(dtype)
    state = None if state is None else state.astype(dtype)
    if check:
        _check_same(module, chain, p, state, dtype)
    return chain, p, state


def _check_same(module, chain, p, state, dtype):
    import copy

    import torch

    X = np.random.default_rng(0).standard_normal((5,) + chain.input_shape)
    ref = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        x = torch.from_numpy(X)
        for m in _flat_modules(ref):  # a bare GRU / LSTM passes on its output sequence
            x = m(x)
            x = x[0] if isinstance(x, tuple) else x
        want = x.numpy().reshape(5, -1)
    got = chain(X.astype(dtype), p, state=state).reshape(5, -1).astype(np.float64)
    tol = 1e-9 if dtype == np.float64 else 1e-4
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
    if not err <= tol:
        raise ValueError(f"from_torch: the chain's outputs differ from the module's by {err:.3g} "
                         f"(relative to the largest output; tolerance {tol:g}): {chain!r}")


def to_torch(chain, p, state=None):
    """The ``torch.nn.Sequential`` computing ``chain`` at parameters ``p`` (and layer state
    ``state``), in eval mode, in the dtype of ``p``; the inverse of :func:`from_torch`.

    Each ``TurboDense`` becomes ``Linear`` (+ its activation module), ``Conv`` ``Conv2d``
    (+ activation), ``MaxPool`` ``MaxPool2d``, ``Flatten``, ``Dropout``, ``BatchNorm``
    ``BatchNorm1d`` / ``BatchNorm2d`` with ``state``'s running statistics, ``GRU`` /
    ``LSTM`` a batch-first ``nn.GRU`` / ``nn.LSTM`` in a :class:`RecurrentOutput`, and
    ``TimeDistributed(TurboDense)`` a ``Linear`` (+ activation) on the sequence.

    Raises
    ------
    ValueError
        A layer without a plain torch module (branches, shape layers, attention, Conv1D),
        named in the message; a missing ``state`` for BatchNorm; bad ``p``.
    """
    import torch
    import torch.nn as nn

    from . import layers as L
    from .chain import remove_loss

    chain = remove_loss(chain)
    p = check_params(chain.n_params, p)
    if chain.n_state:
        state = chain._check_state(state, p.dtype)
    tdt = torch.float64 if p.dtype == np.float64 else torch.float32
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus,
            "gelu": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU, "elu": nn.ELU,
            "leaky_relu": lambda: nn.LeakyReLU(0.01)}
    sviews = chain.state_views(state) if chain.n_state else [{}] * len(chain.layers)
    mods = []

    def t(a):
        return torch.from_numpy(np.array(a)).to(tdt)

    for k, (layer, (ins, _), views, sv) in enumerate(zip(chain.layers, chain._shapes,
                                                         chain.param_views(p), sviews)):
        if isinstance(layer, L.TurboDense):
            m = nn.Linear(ins[0], layer.out, bias=layer.bias, dtype=tdt)
        elif isinstance(layer, L.Conv):
            m = nn.Conv2d(ins[0], layer.out_channels, layer.kernel_size, padding=layer.padding,
                          bias=layer.bias, dtype=tdt)
        elif isinstance(layer, L.MaxPool):
            m = nn.MaxPool2d(layer.k)
        elif isinstance(layer, L.Flatten):
            m = nn.Flatten()
        elif isinstance(layer, L.Dropout):
            m = nn.Dropout(layer.rate)
        elif isinstance(layer, L.BatchNorm):
            cls = nn.BatchNorm1d if len(ins) == 1 else nn.BatchNorm2d
            m = cls(ins[0], eps=layer.eps, momentum=layer.momentum, dtype=tdt)
        elif isinstance(layer, (L.GRU, L.LSTM)):
            cls = nn.GRU if isinstance(layer, L.GRU) else nn.LSTM
            rnn = cls(ins[1], layer.hidden, batch_first=True, dtype=tdt)
            with torch.no_grad():
                for name, v in views.items():
                    getattr(rnn, name + "_l0").copy_(t(v))
            mods.append(_recurrent_output_class()(rnn, layer.return_sequences))
            continue
        elif isinstance(layer, L.TimeDistributed) and isinstance(layer.layer, L.TurboDense):
            layer = layer.layer  # nn.Linear applies to the last axis of (N, T, F)
            m = nn.Linear(ins[-1], layer.out, bias=layer.bias, dtype=tdt)
        else:
            raise ValueError(f"to_torch: layer {k} ({layer!r}) has no plain torch module")
        with torch.no_grad():
            for name, v in views.items():
                getattr(m, {"W": "weight", "b": "bias"}.get(name, name)).copy_(t(v))
            for name, v in sv.items():
                getattr(m, name).copy_(t(v))
        mods.append(m)
        act = getattr(layer, "activation", None)
        if act is not None and act.name != "identity":
            mods.append(acts[act.name]())
    return nn.Sequential(*mods).eval()
