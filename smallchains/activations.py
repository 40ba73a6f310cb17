"""Scalar activation functions and their derivatives, used inside fused kernels.

Generated kernels paste each activation in as a Python expression
(:func:`value_expr`, :func:`grad_expr`), so the surrounding loop is one piece of code that
LLVM vectorizes, with no call or dispatch per element.

For float32 chains ``tanh`` (and the functions built on it: sigmoid, gelu) use a
rational approximation (max abs error < 5e-7, see ``smallchains._fastmath``) because
llvmlite has no vector math library and ``math.tanh`` would be a scalar call per element.
float64 chains use the exact ``math`` functions, so float64 gradient checks are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from numba import njit

from ._config import INLINE_OPTIONS
from ._numba_utils import like

IDENTITY, TANH, RELU, SIGMOID, SOFTPLUS, GELU, SILU, ELU, LEAKY_RELU = range(9)


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``a = f(z)``.

    Attributes
    ----------
    name : str
        Canonical name (``"tanh"``, ``"relu"``, ...).
    code : int
        Small integer id, the one :data:`Activation.CODES` gives for ``name``.

    Raises
    ------
    TypeError
        ``name`` is not a str or ``code`` not an int.
    ValueError
        ``name`` and ``code`` are not one of the built-in pairs (the message lists them).
        Use :func:`get_activation` to get an activation by name.
    """

    name: str
    code: int

    #: the valid ``(name, code)`` pairs (not annotated: a class attribute, not a field)
    CODES = {"identity": IDENTITY, "tanh": TANH, "relu": RELU, "sigmoid": SIGMOID,
             "softplus": SOFTPLUS, "gelu": GELU, "silu": SILU, "elu": ELU,
             "leaky_relu": LEAKY_RELU}

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"Activation: name must be a str, got {type(self.name).__name__}")
        if isinstance(self.code, bool) or not isinstance(self.code, int):
            raise TypeError(f"Activation: code must be an int, got {type(self.code).__name__}")
        if self.CODES.get(self.name) != self.code:
            pairs = ", ".join(f"({n!r}, {c})" for n, c in self.CODES.items())
            raise ValueError(f"Activation({self.name!r}, {self.code!r}): name and code do not "
                             f"match; valid (name, code) pairs are {pairs} "
                             "(or use get_activation(name))")

    def __repr__(self) -> str:
        return self.name


_ALL = {
    "identity": Activation("identity", IDENTITY),
    "tanh": Activation("tanh", TANH),
    "relu": Activation("relu", RELU),
    "sigmoid": Activation("sigmoid", SIGMOID),
    "softplus": Activation("softplus", SOFTPLUS),
    "gelu": Activation("gelu", GELU),
    "silu": Activation("silu", SILU),
    "elu": Activation("elu", ELU),
    "leaky_relu": Activation("leaky_relu", LEAKY_RELU),
}
_ALIASES = {"swish": "silu", "linear": "identity", "none": "identity", "σ": "sigmoid"}

identity = _ALL["identity"]
tanh = _ALL["tanh"]
relu = _ALL["relu"]
sigmoid = _ALL["sigmoid"]
softplus = _ALL["softplus"]
gelu = _ALL["gelu"]
silu = swish = _ALL["silu"]
elu = _ALL["elu"]
leaky_relu = _ALL["leaky_relu"]


def get_activation(act) -> Activation:
    """Resolve an activation given by name, ``None`` or :class:`Activation`.

    Raises
    ------
    ValueError
        Unknown name; the message lists the known names.
    TypeError
        Neither a string, ``None`` nor an :class:`Activation`.
    """
    if act is None:
        return identity
    if isinstance(act, Activation):
        return act
    if isinstance(act, str):
        key = _ALIASES.get(act.lower(), act.lower())
        if key in _ALL:
            return _ALL[key]
        raise ValueError(
            f"unknown activation {act!r}; expected one of {sorted(_ALL) + sorted(_ALIASES)}"
        )
    raise TypeError(f"activation must be a name (str) or smallchains Activation, got {type(act).__name__}")


def available_activations() -> list[str]:
    """Names accepted by :func:`get_activation` (aliases excluded)."""
    return sorted(_ALL)


# --- code emission -------------------------------------------------------------------
# Generated kernels inline activations as expressions. ``dt`` is the numpy scalar type
# name used for constants ("np.float32" / "np.float64"), so float32 code stays float32.
# gelu is the tanh approximation (as NNlib/SimpleChains.jl and torch's
# ``GELU(approximate="tanh")``): 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))).
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715
_LEAKY = 0.01


def _tanh_expr(x: str, dt: str) -> str:
    return f"tanh_f32({x})" if dt == "np.float32" else f"tanh_f64({x})"


def value_expr(act: Activation, z: str, dt: str) -> str:
    """Python expression for ``f(z)`` (``z`` is a variable name)."""
    c = lambda v: f"{dt}({v!r})"  # noqa: E731
    t = lambda x: _tanh_expr(x, dt)  # noqa: E731
    n = act.name
    if n == "identity":
        return z
    if n == "tanh":
        return t(z)
    if n == "relu":
        return f"max({z}, {c(0.0)})"
    if n == "sigmoid":
        return f"({c(0.5)} + {c(0.5)} * {t(f'{c(0.5)} * {z}')})"
    if n == "softplus":  # log(1 + e^z) without overflow
        return f"(max({z}, {c(0.0)}) + math.log1p(math.exp(-abs({z}))))"
    if n == "gelu":
        u = f"{c(_GELU_C)} * ({z} + {c(_GELU_K)} * {z} * {z} * {z})"
        return f"({c(0.5)} * {z} * ({c(1.0)} + {t(u)}))"
    if n == "silu":
        return f"({z} * ({c(0.5)} + {c(0.5)} * {t(f'{c(0.5)} * {z}')}))"
    if n == "elu":
        return f"({z} if {z} > {c(0.0)} else math.expm1({z}))"
    if n == "leaky_relu":
        return f"({z} if {z} > {c(0.0)} else {c(_LEAKY)} * {z})"
    raise NotImplementedError(n)


def needs_z(act: Activation) -> bool:
    """Whether ``f'`` must see ``z``; otherwise :func:`grad_expr` uses ``a = f(z)`` only
    (for relu, leaky_relu and elu, ``z > 0`` is tested as ``a > 0``)."""
    return act.name in ("softplus", "gelu", "silu")


def grad_expr(act: Activation, z: str, a: str, dt: str) -> str:
    """Python expression for ``f'(z)`` given ``a = f(z)`` (``z`` only if :func:`needs_z`)."""
    c = lambda v: f"{dt}({v!r})"  # noqa: E731
    t = lambda x: _tanh_expr(x, dt)  # noqa: E731
    n = act.name
    one = c(1.0)
    if n == "identity":
        return one
    if n == "tanh":
        return f"({one} - {a} * {a})"
    if n == "relu":
        return f"({one} if {a} > {c(0.0)} else {c(0.0)})"
    if n == "sigmoid":
        return f"({a} * ({one} - {a}))"
    if n == "softplus":
        return f"({c(0.5)} + {c(0.5)} * {t(f'{c(0.5)} * {z}')})"
    if n == "gelu":
        u = f"{c(_GELU_C)} * ({z} + {c(_GELU_K)} * {z} * {z} * {z})"
        du = f"{c(_GELU_C)} * ({one} + {c(3 * _GELU_K)} * {z} * {z})"
        return (f"gelu_grad({z}, {t(u)}, {du})")
    if n == "silu":
        sg = f"({c(0.5)} + {c(0.5)} * {t(f'{c(0.5)} * {z}')})"
        return f"silu_grad({z}, {sg})"
    if n == "elu":
        return f"({one} if {a} > {c(0.0)} else {a} + {one})"
    if n == "leaky_relu":
        return f"({one} if {a} > {c(0.0)} else {c(_LEAKY)})"
    raise NotImplementedError(n)


def emit_delta(act: Activation, dt: str, g: str, z: str, a: str, pad: str, k: str = "",
               store: bool = True) -> list:
    """Lines, for the inside of a loop, that compute ``d{k} = delta = dL/da * f'(z)``, add it
    to ``gb{k}`` and, if ``store``, overwrite ``work[g]`` (``dL/da``) with it. ``g``, ``z``,
    ``a`` are index expressions of ``dL/da``, ``z`` and ``a = f(z)``; only the loads ``f'``
    needs are emitted, and identity only loads (``delta`` is ``dL/da``)."""
    if act.name == "identity":
        return [f"{pad}d{k} = work[{g}]", f"{pad}gb{k} += d{k}"]
    deriv = grad_expr(act, f"zz{k}", f"aa{k}", dt)
    L = [f"{pad}zz{k} = work[{z}]"] * needs_z(act) + [f"{pad}aa{k} = work[{a}]"] * (f"aa{k}" in deriv)
    L += [f"{pad}d{k} = work[{g}] * {deriv}"]
    return L + [f"{pad}work[{g}] = d{k}"] * store + [f"{pad}gb{k} += d{k}"]


@njit(**INLINE_OPTIONS)
def gelu_grad(z, t, du):
    """d/dz of 0.5 z (1 + t(z)) with t = tanh(u(z)), du = u'(z)."""
    h = like(z, 0.5)
    one = like(z, 1.0)
    return h * (one + t) + h * z * (one - t * t) * du


@njit(**INLINE_OPTIONS)
def silu_grad(z, s):
    """d/dz of z sigmoid(z), given s = sigmoid(z)."""
    one = like(z, 1.0)
    return s * (one + z * (one - s))
