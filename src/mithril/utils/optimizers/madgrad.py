"""MADGRAD (momentumized, adaptive, dual averaged gradient), optax
(optax.contrib.madgrad) conventions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Optimizer
from .checks import check_positive, check_unit
from .schedule_free import init_from_params
from .state import OptimizerState


def _madgrad(p, g, x0, s, v, lr, lamb, mom, omm, eps, third):
    v = v + lamb * (g * g)                       # optax's grad_sum_sq
    s = s + lamb * g
    # the dual-averaged point (∛ of v; ⅓ a scalar of the step's dtype: a float64 literal
    # would run a float32 kernel in float64)
    z = x0 - s / (v ** third + eps)
    return p + (omm * z + mom * p - p), x0, s, v  # (optax's update x_new − p, then applied)


class MADGRAD(Optimizer):
    """MADGRAD (Defazio & Jelassi, 2021) as ``optax.contrib.madgrad``, per element
    (t = 1, 2, ...)::

        λ ← (lr + ε)·√t
        v ← v + λ·g²          s ← s + λ·g
        z ← x₀ − s / (∛v + ε)
        p ← (1 − μ)·z + μ·p                  (μ: ``momentum``)

    ``x₀`` is the starting point (slot ``"x0"``, a copy of the parameters ``init`` gets);
    slots ``s`` and ``v`` (optax's ``s`` and ``grad_sum_sq``). ε is added to the learning
    rate as well (optax, after the PyTorch reference). ``weight_decay`` is coupled L2
    (``g ← g + wd·p``: optax.contrib.madgrad chains ``add_decayed_weights`` in front).
    Defaults: momentum 0.9, ε 1e-6, no decay (optax's); lr 1e-2 (the PyTorch ``madgrad``
    package's; optax has none). torch 2.x and Keras 3 have none.
    """

    slots = ("x0", "s", "v")
    #: the slots ``init`` fills with a copy of the params (read by the optax transformation)
    params_copy_slots = ("x0",)

    def __init__(self, learning_rate: float = 1e-2, momentum: float = 0.9,
                 epsilon: float = 1e-6, weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.momentum = check_unit("momentum", momentum)
        self.epsilon = check_positive("epsilon", epsilon)

    def scalars(self, step: int) -> tuple[float, ...]:
        lr, eps = self.learning_rate, self.epsilon
        return (lr, (lr + eps) * (step * 1.0) ** 0.5, self.momentum, 1 - self.momentum, eps,
                1.0 / 3.0)

    def kernel_math(self) -> Any:
        return _madgrad


def _init(self: MADGRAD, params: Mapping[str, Any]) -> OptimizerState:
    """A fresh state: ``s``, ``v`` zero, ``x0`` a copy of ``params`` (not modified)."""
    return init_from_params(self, params, "x0")


# assigned after the class, so that Optimizer.__init_subclass__ does not wrap it (as Prodigy's)
MADGRAD.init = _init  # type: ignore[method-assign]
