"""Parameter penalties added to a model's loss: L1 (lasso), L2 (ridge) and both (elastic
net), as SimpleChains.jl's ``L1Penalty`` / ``L2Penalty`` (src/penalty.jl).

A penalized model is a :class:`~smallchains.SimpleChainWithLoss` whose value is the mean
loss plus ``l1 * sum |p| + l2 * sum p^2`` over every parameter (weights and biases; the
gradient adds ``l1 * sign(p) + 2 l2 p``, with ``sign(0) = 0``). ``valgrad``, the
``train_*`` loops, ``fit_many`` and the loss history all see the penalized objective;
the penalty is applied inside the compiled training step after the gradient sum.

Our losses are means over the samples while SimpleChains.jl's are sums, so a
SimpleChains ``λ`` corresponds to ``λ / N`` here. ``L2Penalty(model, wd / 2)`` with plain
SGD is torch's ``SGD(weight_decay=wd)``; for Adam prefer decoupled decay,
:class:`~smallchains.AdamW`.
"""

from __future__ import annotations

from ._validate import check_real
from .chain import SimpleChainWithLoss


class _Penalty(SimpleChainWithLoss):
    """A model with one more penalty weight (``_weight``: the attribute it sets)."""

    _weight = ""

    def __new__(cls, model, lam):
        if not isinstance(model, SimpleChainWithLoss):
            raise TypeError(f"{cls.__name__} expects a model with a loss (sc.add_loss(chain, "
                            f"loss)), got {type(model).__name__}")
        lam = check_real(cls.__name__, "lam", lam, 0.0)
        new = object.__new__(cls)
        new.__dict__.update(model.__dict__)
        new.l1, new.l2 = model.l1, model.l2
        setattr(new, cls._weight, lam)
        new._inner = model
        return new

    def __init__(self, model, lam):  # all done in __new__
        pass

    def __repr__(self):
        return f"{type(self).__name__}({self._inner!r}, {getattr(self, self._weight)!r})"

    def __reduce__(self):
        return type(self), (self._inner, getattr(self, self._weight))


class L1Penalty(_Penalty):
    """``model`` with ``lam * sum |p|`` added to its loss (other penalties of ``model``
    kept, so ``L1Penalty(L2Penalty(model, a), b)`` is the elastic net).

    Parameters
    ----------
    model : SimpleChainWithLoss
    lam : float -- finite, >= 0.

    Raises
    ------
    TypeError
        ``model`` has no loss; ``lam`` is not a real number.
    ValueError
        ``lam`` is negative or not finite.
    """

    _weight = "l1"


class L2Penalty(_Penalty):
    """``model`` with ``lam * sum p^2`` added to its loss (gradient ``2 lam p``); other
    penalties of ``model`` kept.

    Parameters
    ----------
    model : SimpleChainWithLoss
    lam : float -- finite, >= 0.

    Raises
    ------
    TypeError, ValueError
        As :class:`L1Penalty`.
    """

    _weight = "l2"
