"""Saving and loading a chain with its parameters, layer state and optimizer.

One file is a zip archive (readable with any unzip tool) of

* ``spec.json``: a human-readable, versioned description: the format name and version, the
  chain as its constructor expression (``repr(chain)``, e.g. ``"SimpleChain(4,
  TurboDense(32, 'tanh'), TurboDense(4, 'identity'))"``), dtype, sizes, and the optimizer
  as its constructor expression with its step count;
* ``p.npy``, and ``state.npy`` / ``optimizer_state.npy`` when present: numpy's ``.npy``
  format, read with ``allow_pickle=False``.

Loading never executes code from the file: the constructor expressions are parsed with
:mod:`ast` and only calls of smallchains' own layer, chain and optimizer classes (and
``slice``) with literal arguments are evaluated. A chain is saved only if it can be
rebuilt exactly from its description (a custom activation, for example, cannot).
"""

from __future__ import annotations

import ast
import io
import json
import zipfile
from dataclasses import dataclass

import numpy as np

from . import __version__

FORMAT = "smallchains-model"
#: format version written; files of a later version are refused
VERSION = 1

__all__ = ["Checkpoint", "load", "save"]


@dataclass
class Checkpoint:
    """What :func:`load` returns; unpacks as ``chain, p, state, optimizer = sc.load(path)``.

    Attributes: ``chain`` (SimpleChain), ``p`` (ndarray ``(n_params,)``), ``state``
    (ndarray ``(n_state,)`` or None), ``optimizer`` (an Optimizer with its state and step
    count, or None)."""

    chain: object
    p: np.ndarray
    state: np.ndarray | None
    optimizer: object | None

    def __iter__(self):
        return iter((self.chain, self.p, self.state, self.optimizer))


def _constructors():
    from . import layers, optim
    from .chain import SimpleChain

    names = {"SimpleChain": SimpleChain, "slice": slice}
    for name in layers.__all__:
        obj = getattr(layers, name)
        if isinstance(obj, type) and issubclass(obj, layers.Layer) and obj is not layers.Layer:
            names[name] = obj
    for cls in (optim.Adam, optim.AdamW, optim.SGD, optim.RMSProp):
        names[cls.__name__] = cls
    return names


def _literal(node, names, where):
    """Evaluate ``node`` of a constructor expression: literals, tuples, lists and calls of
    ``names`` with such arguments; anything else is refused."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)):
        return -node.operand.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_literal(e, names, where) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
        args = [_literal(a, names, where) for a in node.args]
        kwargs = {k.arg: _literal(k.value, names, where) for k in node.keywords if k.arg is not None}
        if len(kwargs) != len(node.keywords):
            raise ValueError(f"{where}: '**' arguments are not allowed")
        try:
            return names[node.func.id](*args, **kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {node.func.id}(...) cannot be built: {e}") from None
    what = ast.unparse(node) if hasattr(ast, "unparse") else type(node).__name__
    raise ValueError(f"{where}: only smallchains constructors and literals are allowed, got {what!r}")


def _build(text, where):
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"{where}: not a constructor expression ({e.msg})") from None
    return _literal(tree.body, _constructors(), where)


def _signature(chain):
    return (chain.input_shape, tuple(layer.spec() for layer in chain.layers), chain.options,
            chain.block_size)


def _check_array(a, name, shape, dtype):
    if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype:
        raise ValueError(f"{name} must be a {np.dtype(dtype).name} array of shape {shape}, got "
                         f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")


def save(path, chain, p, state=None, optimizer=None) -> None:
    """Write ``chain``, its parameters ``p`` and, optionally, its layer ``state`` and the
    ``optimizer`` (hyperparameters, moments, step count) to one file at ``path``.

    Parameters
    ----------
    path : str or os.PathLike -- overwritten (``.sc`` is a good suffix; any name works).
    chain : SimpleChain or SimpleChainWithLoss -- a model's loss (its targets are data) is
        not saved: attach it again with :func:`add_loss` after loading.
    p : ndarray, shape ``(n_params,)``, float32 or float64
    state : ndarray, shape ``(n_state,)``, dtype of ``p``, optional -- required if the chain
        has layer state (BatchNorm), so the running statistics are never lost.
    optimizer : Optimizer, optional -- its state must belong to ``p`` (or be empty).

    Raises
    ------
    TypeError, ValueError
        Arrays of the wrong shape, dtype or with NaN/Inf; a missing ``state``; a chain that
        cannot be rebuilt exactly from its description (a custom activation); nothing is
        written then.
    """
    from .chain import remove_loss
    from .optim import Optimizer

    chain = remove_loss(chain)
    p = np.asarray(p)
    if p.dtype not in (np.float32, np.float64):
        raise TypeError(f"p must be float32 or float64, got {p.dtype}")
    _check_array(p, "p", (chain.n_params,), p.dtype)
    if chain.n_state:
        if state is None:
            raise ValueError(f"this chain has layer state ({chain.n_state} values: BatchNorm running "
                             "statistics): pass state= so it is saved with the parameters")
        _check_array(state, "state", (chain.n_state,), p.dtype)
    elif state is not None and np.asarray(state).size:
        raise ValueError("this chain has no layer state, but a non-empty state was given")
    description = repr(chain)
    try:
        rebuilt = _build(description, "chain")
    except ValueError as e:
        raise ValueError(f"this chain cannot be saved: its description {description!r} does not "
                         f"rebuild it ({e})") from None
    if _signature(rebuilt) != _signature(chain):
        raise ValueError(f"this chain cannot be saved: its description {description!r} rebuilds a "
                         "different chain (a custom activation or layer is only known by name)")
    arrays = {"p": p}
    if chain.n_state:
        arrays["state"] = state
    spec = {"format": FORMAT, "version": VERSION, "smallchains": __version__, "chain": description,
            "dtype": p.dtype.name, "n_params": chain.n_params, "n_state": chain.n_state,
            "optimizer": None}
    if optimizer is not None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a smallchains optimizer, got {type(optimizer).__name__}")
        optimizer._hyper()  # validates the hyperparameters
        spec["optimizer"] = {"constructor": repr(optimizer), "t": int(optimizer.t)}
        if optimizer.state is not None:
            _check_array(optimizer.state, "optimizer.state", (optimizer.n_state, chain.n_params), p.dtype)
            arrays["optimizer_state"] = optimizer.state
    spec["arrays"] = {k: {"shape": list(a.shape), "dtype": a.dtype.name} for k, a in arrays.items()}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("spec.json", json.dumps(spec, indent=2) + "\n")
        for name, a in arrays.items():
            b = io.BytesIO()
            np.save(b, np.ascontiguousarray(a), allow_pickle=False)
            z.writestr(f"{name}.npy", b.getvalue())
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def load(path) -> Checkpoint:
    """Read a file written by :func:`save`: ``chain, p, state, optimizer = sc.load(path)``.

    The chain is rebuilt from its description (no code from the file is executed); its
    kernels compile (or load from the kernel cache) on first use as usual. ``state`` and
    ``optimizer`` are None when they were not saved. The optimizer has its moments and
    step count, so training continues where it stopped.

    Raises
    ------
    ValueError
        The file is not a smallchains model file, is truncated or corrupt, was written by a
        newer format version, or its arrays do not match its chain (the message says which).
    FileNotFoundError
        No file at ``path``.
    """
    with open(path, "rb") as f:
        data = f.read()
    where = f"{path}"
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        names = set(z.namelist())
        if "spec.json" not in names:
            raise ValueError(f"{where}: not a smallchains model file (no spec.json)")
        spec = json.loads(z.read("spec.json").decode("utf-8"))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, UnicodeDecodeError,
            json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not a smallchains model file, or truncated ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{where}: not a smallchains model file (format {spec.get('format')!r} "
                         f"if a dict, expected {FORMAT!r})" if isinstance(spec, dict) else
                         f"{where}: not a smallchains model file")
    version = spec.get("version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: bad format version {version!r}")
    if version > VERSION:
        raise ValueError(f"{where} was written in format version {version} (smallchains "
                         f"{spec.get('smallchains')}); this smallchains ({__version__}) reads "
                         f"versions up to {VERSION}: upgrade smallchains")
    try:
        chain = _build(str(spec["chain"]), f"{where}: chain")
        dtype = np.dtype(spec["dtype"])
        arrays = {}
        for name, meta in spec["arrays"].items():
            if name not in ("p", "state", "optimizer_state") or f"{name}.npy" not in names:
                raise ValueError(f"{where}: array {name!r} is missing or unknown")
            a = np.load(io.BytesIO(z.read(f"{name}.npy")), allow_pickle=False)
            if list(a.shape) != list(meta["shape"]) or a.dtype.name != meta["dtype"] or a.dtype != dtype:
                raise ValueError(f"{where}: array {name!r} is {a.dtype} {a.shape}, its description says "
                                 f"{meta['dtype']} {tuple(meta['shape'])}")
            arrays[name] = a
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: incomplete description ({e!r} missing or malformed)") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{where}: truncated or corrupt ({e})") from None
    from .chain import SimpleChain

    if not isinstance(chain, SimpleChain):
        raise ValueError(f"{where}: the description is not a SimpleChain")
    if chain.n_params != spec.get("n_params") or "p" not in arrays \
            or arrays["p"].shape != (chain.n_params,):
        raise ValueError(f"{where}: the chain has {chain.n_params} parameters but the file holds "
                         f"{arrays['p'].shape if 'p' in arrays else 'no'} p")
    state = arrays.get("state")
    if chain.n_state and (state is None or state.shape != (chain.n_state,)):
        raise ValueError(f"{where}: the chain has {chain.n_state} state values but the file holds "
                         f"{None if state is None else state.shape}")
    optimizer = None
    if spec.get("optimizer") is not None:
        o = spec["optimizer"]
        optimizer = _build(str(o["constructor"]), f"{where}: optimizer")
        from .optim import Optimizer
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"{where}: the optimizer description is not a smallchains optimizer")
        optimizer.t = int(o["t"])
        if "optimizer_state" in arrays:
            st = arrays["optimizer_state"]
            if st.shape != (optimizer.n_state, chain.n_params):
                raise ValueError(f"{where}: optimizer state has shape {st.shape}, expected "
                                 f"{(optimizer.n_state, chain.n_params)}")
            optimizer.state = st.copy()
    return Checkpoint(chain, np.ascontiguousarray(arrays["p"]),
                      None if state is None else np.ascontiguousarray(state), optimizer)
