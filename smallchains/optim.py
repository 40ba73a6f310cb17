"""Optimizers: a small Python object holding hyperparameters and state arrays, plus a
numba update kernel ``update(p, g, state, hyper, t, lo, hi)`` that the compiled training
loops call after each gradient step (``t`` is the 1-based step count) on the entries
``lo <= j < hi`` of ``p`` and its state: elementwise, so the threads of a step each update
a slice (:func:`smallchains.compiler.loops._step`).

The state lives in the optimizer object (``opt.state``), allocated on first use for a
given parameter vector and reused; :meth:`Optimizer.reset` clears it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._config import JIT_OPTIONS
from ._validate import check_real
from ._numba_utils import like

#: optimizer kind -> (module, update kernel name); the generated training loops call these.
UPDATE_KERNELS = {
    "adam": ("smallchains.optim", "adam_update"),
    "sgd": ("smallchains.optim", "sgd_update"),
    "rmsprop": ("smallchains.optim", "rmsprop_update"),
    "adamw": ("smallchains.optim", "adamw_update"),
}


class Optimizer:
    """Base class. Subclasses set ``kind``, ``n_state`` and :meth:`_hyper`."""

    kind = ""
    n_state = 0

    def __init__(self):
        self.state = None
        self.t = 0  # number of steps taken

    def _hyper(self) -> list:
        """The hyperparameters as floats, in the order the update kernel reads them.
        Validates them (called by ``__init__`` and by :meth:`prepare`, so values assigned
        to the attributes later are checked too); raises TypeError / ValueError naming the
        parameter and its valid range."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the state (moments and step count)."""
        self.state = None
        self.t = 0

    def prepare(self, p: np.ndarray):
        """Return ``(state, hyper)`` arrays for ``p``; allocates state on first use.

        Raises
        ------
        ValueError
            The optimizer already holds state for a parameter vector of another length or
            dtype (call :meth:`reset` or use a new optimizer), or a hyperparameter is out
            of range.
        """
        hyper = self._hyper()
        shape = (self.n_state, p.shape[0])
        if self.state is None:
            self.state = np.zeros(shape, dtype=p.dtype)
        elif self.state.shape != shape or self.state.dtype != p.dtype:
            raise ValueError(
                f"{type(self).__name__} holds state for {self.state.shape[1]} {self.state.dtype} "
                f"parameters, got p of length {p.shape[0]} and dtype {p.dtype}; call opt.reset()"
            )
        return self.state, np.asarray(hyper, dtype=p.dtype)

    def update_kernel(self):
        """The numba update kernel ``update(p, g, state, hyper, t, lo, hi)`` of this
        optimizer (entries ``lo <= j < hi``)."""
        return globals()[UPDATE_KERNELS[self.kind][1]]

    def step(self, p: np.ndarray, g: np.ndarray) -> None:
        """Apply one update to ``p`` in place from gradient ``g`` (same shape and dtype)."""
        if p.shape != g.shape or p.dtype != g.dtype or p.ndim != 1:
            raise ValueError(f"p and g must be 1-D with equal shape and dtype, got {p.shape} {p.dtype} "
                             f"and {g.shape} {g.dtype}")
        state, hyper = self.prepare(p)
        self.t += 1
        self.update_kernel()(p, g, state, hyper, self.t, 0, p.shape[0])


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015), with the update of ``torch.optim.Adam`` (no weight decay).

    ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
    ``p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    Parameters
    ----------
    lr : float, default 1e-3 -- finite, > 0.
    betas : (float, float), default (0.9, 0.999) -- each in [0, 1).
    eps : float, default 1e-8 -- finite, > 0.

    Raises
    ------
    TypeError, ValueError
        A hyperparameter that is not a real number or lies outside its range (NaN too).

    State: ``opt.state`` of shape ``(2, n_params)`` (first and second moments), ``opt.t``.
    SimpleChains.jl: ``ADAM(η)`` in src/optimize.jl.
    """

    kind = "adam"
    n_state = 2

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__()
        self.lr, self.betas, self.eps = lr, betas, eps
        self.lr, b1, b2, self.eps = self._hyper()[:4]
        self.betas = (b1, b2)

    def __repr__(self):
        return f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps})"

    def _hyper(self):
        betas = self.betas
        try:
            betas = tuple(betas)
        except TypeError:
            betas = ()
        if len(betas) != 2:
            raise TypeError(f"Adam: betas must be a pair (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(betas):
            try:
                check_real("Adam", f"betas[{i}]", b, 0.0, 1.0)
            except ValueError:
                raise ValueError(f"Adam: betas must lie in [0, 1), got betas[{i}] = {b!r}") from None
        return [check_real("Adam", "lr", self.lr, 0.0, low_open=True), float(betas[0]),
                float(betas[1]), check_real("Adam", "eps", self.eps, 0.0, low_open=True)]


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), the update of
    ``torch.optim.AdamW``: first ``p *= 1 - lr * weight_decay``, then the Adam step.

    Parameters
    ----------
    lr : float, default 1e-3 -- finite, > 0.
    betas : (float, float), default (0.9, 0.999) -- each in [0, 1).
    eps : float, default 1e-8 -- finite, > 0.
    weight_decay : float, default 1e-2 (torch's default) -- finite, >= 0. Decays every
        parameter, biases included (as torch with one parameter group).

    Raises
    ------
    TypeError, ValueError
        As :class:`Adam`; ``weight_decay`` negative or not finite.

    State: as :class:`Adam`.
    """

    kind = "adamw"

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        self.weight_decay = weight_decay
        super().__init__(lr, betas, eps)
        self.weight_decay = check_real("AdamW", "weight_decay", weight_decay, 0.0)

    def __repr__(self):
        return (f"AdamW(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay})")

    def _hyper(self):
        return super()._hyper() + [check_real("AdamW", "weight_decay", self.weight_decay, 0.0)]


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and dampening: the
    update of ``torch.optim.SGD`` (no weight decay, not ``maximize``).

    With ``momentum == 0``: ``p -= lr g``. Otherwise a buffer ``b`` (``opt.state[0]``) is
    ``b = g`` at step 1 and ``b = momentum b + (1 - dampening) g`` after; the update is
    ``u = b``, or ``u = g + momentum b`` with ``nesterov=True``; ``p -= lr u``.

    Parameters
    ----------
    lr : float, default 1e-2 -- finite, > 0.
    momentum : float, default 0.0 -- finite, >= 0.
    dampening : float, default 0.0 -- in [0, 1]. Ignored when ``momentum == 0``.
    nesterov : bool, default False -- needs ``momentum > 0`` and ``dampening == 0``.

    Raises
    ------
    TypeError
        A hyperparameter that is not a real number (``nesterov``: not a bool).
    ValueError
        A hyperparameter outside its range (NaN too), or ``nesterov=True`` with
        ``momentum == 0`` or ``dampening != 0`` (``torch.optim.SGD`` raises then too).
        Checked at construction and again whenever the optimizer is used, so values
        assigned to the attributes later are checked as well.

    State: ``opt.state`` of shape ``(1, n_params)`` (the momentum buffer, unused without
    momentum), ``opt.t``. The update allocates nothing.
    """

    kind = "sgd"
    n_state = 1

    def __init__(self, lr: float = 1e-2, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False):
        super().__init__()
        self.lr, self.momentum, self.dampening, self.nesterov = lr, momentum, dampening, nesterov
        self.lr, self.momentum, self.dampening, nest = self._hyper()
        self.nesterov = bool(nest)

    def __repr__(self):
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, dampening={self.dampening}, "
                f"nesterov={self.nesterov})")

    def _hyper(self):
        lr = check_real("SGD", "lr", self.lr, 0.0, low_open=True)
        mu = check_real("SGD", "momentum", self.momentum, 0.0)
        try:
            damp = check_real("SGD", "dampening", self.dampening, 0.0)
            if damp > 1.0:
                raise ValueError
        except ValueError:
            raise ValueError(f"SGD: dampening must be in [0, 1], got {self.dampening!r}") from None
        if not isinstance(self.nesterov, (bool, np.bool_)):
            raise TypeError(f"SGD: nesterov must be a bool, got {type(self.nesterov).__name__} "
                            f"{self.nesterov!r}")
        if self.nesterov and (mu == 0.0 or damp != 0.0):
            raise ValueError(
                "SGD: Nesterov momentum requires a momentum > 0 and zero dampening (as "
                f"torch.optim.SGD), got momentum={self.momentum!r}, dampening={self.dampening!r}")
        return [lr, mu, damp, 1.0 if self.nesterov else 0.0]


class RMSProp(Optimizer):
    """RMSprop with the defaults and update of ``torch.optim.RMSprop`` (not centered,
    no momentum): ``v = a v + (1-a) g^2``; ``p -= lr g / (sqrt(v) + eps)``.

    Parameters
    ----------
    lr : float, default 1e-2 -- finite, > 0.
    alpha : float, default 0.99 -- in [0, 1).
    eps : float, default 1e-8 -- finite, > 0.

    Raises
    ------
    TypeError, ValueError
        A hyperparameter that is not a real number or lies outside its range (NaN too).
    """

    kind = "rmsprop"
    n_state = 1

    def __init__(self, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8):
        super().__init__()
        self.lr, self.alpha, self.eps = lr, alpha, eps
        self.lr, self.alpha, self.eps = self._hyper()

    def __repr__(self):
        return f"RMSProp(lr={self.lr}, alpha={self.alpha}, eps={self.eps})"

    def _hyper(self):
        return [check_real("RMSProp", "lr", self.lr, 0.0, low_open=True),
                check_real("RMSProp", "alpha", self.alpha, 0.0, 1.0),
                check_real("RMSProp", "eps", self.eps, 0.0, low_open=True)]


# Each update reads and writes its slice through views (p[lo:hi]): a loop over
# range(lo, hi) indexes with a signed j that numba must check for negative wraparound, and
# LLVM then does not vectorize it (measured: SGD over 101,770 float32, 59 against 9 us).


@njit(**JIT_OPTIONS)
def adam_update(p, g, state, hyper, t, lo, hi):
    lr, b1, b2, eps = hyper[0], hyper[1], hyper[2], hyper[3]
    # bias corrections in float64 like torch (Python floats), then cast
    bc1 = 1.0 - float(b1) ** t
    bc2 = 1.0 - float(b2) ** t
    step = like(lr, float(lr) / bc1)
    bc2_sqrt = like(lr, math.sqrt(bc2))
    one = like(lr, 1.0)
    pp, gg, m, v = p[lo:hi], g[lo:hi], state[0, lo:hi], state[1, lo:hi]
    for j in range(pp.shape[0]):
        gj = gg[j]
        m[j] = b1 * m[j] + (one - b1) * gj
        v[j] = b2 * v[j] + (one - b2) * gj * gj
        pp[j] -= step * (m[j] / (math.sqrt(v[j]) / bc2_sqrt + eps))


@njit(**JIT_OPTIONS)
def adamw_update(p, g, state, hyper, t, lo, hi):
    # hyper: lr, beta1, beta2, eps, weight_decay; torch.optim.AdamW decays first
    decay = like(hyper[0], 1.0) - hyper[0] * hyper[4]
    pp = p[lo:hi]
    for j in range(pp.shape[0]):
        pp[j] *= decay
    adam_update(p, g, state, hyper, t, lo, hi)


@njit(**JIT_OPTIONS)
def sgd_update(p, g, state, hyper, t, lo, hi):
    # hyper: lr, momentum, dampening, nesterov (0 or 1); the branches are hoisted out of
    # the loops so each loop is a plain vectorizable stream
    lr, mu, damp, nesterov = hyper[0], hyper[1], hyper[2], hyper[3]
    pp, gg, buf = p[lo:hi], g[lo:hi], state[0, lo:hi]
    n = pp.shape[0]
    if mu == 0:
        for j in range(n):
            pp[j] -= lr * gg[j]
        return
    keep = like(lr, 1.0) - damp
    if t == 1:  # torch: the buffer starts as a copy of the first gradient (no dampening)
        for j in range(n):
            buf[j] = gg[j]
    else:
        for j in range(n):
            buf[j] = mu * buf[j] + keep * gg[j]
    if nesterov != 0:
        for j in range(n):
            pp[j] -= lr * (gg[j] + mu * buf[j])
    else:
        for j in range(n):
            pp[j] -= lr * buf[j]


@njit(**JIT_OPTIONS)
def rmsprop_update(p, g, state, hyper, t, lo, hi):
    lr, a, eps = hyper[0], hyper[1], hyper[2]
    one = like(lr, 1.0)
    pp, gg, v = p[lo:hi], g[lo:hi], state[0, lo:hi]
    for j in range(pp.shape[0]):
        gj = gg[j]
        v[j] = a * v[j] + (one - a) * gj * gj
        pp[j] -= lr * gj / (math.sqrt(v[j]) + eps)
