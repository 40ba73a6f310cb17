"""Learning-rate schedules for ``train_unbatched(..., lr_schedule=)`` (a function of the step
``k = 0, 1, ...`` of the call) and ``train_batched(..., lr_schedule=)`` (of the epoch).

Each returns a plain function ``k -> lr``; any other Python function of ``k`` works the
same. They follow ``torch.optim.lr_scheduler`` with the scheduler stepped once per step
(or epoch): the value at ``k`` is torch's ``get_last_lr()`` after ``k`` calls of
``scheduler.step()``.
"""

from __future__ import annotations

import math

from ._validate import check_count, check_real

__all__ = ["constant", "cosine", "exponential", "linear_warmup", "step"]


def _lr(lr):
    return check_real("schedule", "lr", lr, 0.0, low_open=True)


def constant(lr):
    """``lr`` at every ``k``."""
    lr = _lr(lr)
    return lambda k: lr


def step(lr, step_size, gamma=0.1):
    """``lr * gamma ** (k // step_size)`` (torch ``StepLR``)."""
    lr, step_size = _lr(lr), check_count(step_size, "step_size", 1)
    gamma = check_real("step", "gamma", gamma, 0.0, low_open=True)
    return lambda k: lr * gamma ** (k // step_size)


def exponential(lr, gamma):
    """``lr * gamma ** k`` (torch ``ExponentialLR``)."""
    lr, gamma = _lr(lr), check_real("exponential", "gamma", gamma, 0.0, low_open=True)
    return lambda k: lr * gamma ** k


def cosine(lr, total, min_lr=0.0):
    """``min_lr + (lr - min_lr) * (1 + cos(pi * k / total)) / 2`` for ``k <= total``, then
    ``min_lr`` (torch ``CosineAnnealingLR(T_max=total, eta_min=min_lr)`` over its first
    half-period). ``min_lr`` must be > 0 if ``k`` reaches ``total`` (a zero learning rate
    is refused by the training loops)."""
    lr, total = _lr(lr), check_count(total, "total", 1)
    min_lr = check_real("cosine", "min_lr", min_lr, 0.0)
    return lambda k: min_lr + (lr - min_lr) * (1 + math.cos(math.pi * min(k, total) / total)) / 2


def linear_warmup(schedule, warmup, start_factor=1.0 / 3):
    """``schedule(k)`` scaled by a factor rising linearly from ``start_factor`` at ``k = 0``
    to 1 at ``k = warmup`` (torch ``LinearLR(start_factor, total_iters=warmup)`` chained with
    ``schedule``). ``schedule`` may be a number (a constant learning rate)."""
    if not callable(schedule):
        schedule = constant(schedule)
    warmup = check_count(warmup, "warmup", 1)
    start = check_real("linear_warmup", "start_factor", start_factor, 0.0, 1.0 + 1e-12, low_open=True)
    return lambda k: schedule(k) * (start + (1 - start) * min(k, warmup) / warmup)
