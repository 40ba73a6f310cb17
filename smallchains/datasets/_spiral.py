"""The spiral ODE of torchdiffeq's ``examples/ode_demo.py`` (Chen et al., 2018)."""

from __future__ import annotations

import numpy as np
from numba import njit

#: dy/dt = (y**3) @ SPIRAL_A for a row vector y
SPIRAL_A = np.array([[-0.1, 2.0], [-2.0, -0.1]])


@njit(nogil=True, cache=True)
def _spiral_rhs(t, u, p, du, work):
    for i in range(0, u.shape[0], 2):
        a, b = u[i] ** 3, u[i + 1] ** 3
        du[i] = -0.1 * a - 2.0 * b
        du[i + 1] = 2.0 * a - 0.1 * b


def spiral(n_points: int = 1000, t_max: float = 25.0, y0=(2.0, 0.0), rtol=1e-7, atol=1e-9):
    """Trajectory of ``dy/dt = (y^3) A``, ``A = [[-0.1, 2], [-2, -0.1]]``, ``y(0) = y0``.

    The data of torchdiffeq's ``ode_demo.py``: ``t = linspace(0, t_max, n_points)`` and the
    adaptive Dormand-Prince 5(4) solution at those times (:class:`smallchains.ode.Dopri5`
    with torchdiffeq's default tolerances).

    Returns ``(t, y)``: float64 arrays of shapes ``(n_points,)`` and ``(n_points, 2)``.
    """
    from ..ode import Dopri5, ODEFunction

    t = np.linspace(0.0, float(t_max), int(n_points))
    f = ODEFunction(_spiral_rhs, None, 2, 0, 0, np.float64)
    y = Dopri5(f, rtol=rtol, atol=atol).solve(np.asarray(y0, dtype=np.float64), t, np.zeros(0))
    return t, y
