"""Optimistic gradient descent and optimistic Adam (a slot for the previous direction),
optax conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit
from .elementwise import helper, sqrt


@helper
def _optimism(d, prev, ab, b, first):
    q = prev + first * d       # the first step's "previous" direction is d itself (optax)
    return ab * d - b * q      # (α+β)·d − β·d_prev, in optax's order


def _ogd(p, g, prev, lr, ab, b, first):
    return p - lr * _optimism(g, prev, ab, b, first), g


@helper
def _adam_direction(g, m, v, b1, b1c, b2, b2c, bc1, bc1_next, bc2, eps_root, eps):
    m = b1 * m + b1c * g
    v = b2 * v + b2c * g * g
    return m, v, (m / bc1) / (sqrt(v / bc2 + eps_root) + eps)


def _oadam(p, g, m, v, prev, lr, b1, b1c, b2, b2c, bc1, bc1_next, bc2, eps_root, eps,
           ab, b, first):
    m, v, u = _adam_direction(g, m, v, b1, b1c, b2, b2c, bc1, bc1_next, bc2, eps_root, eps)
    return p - lr * _optimism(u, prev, ab, b, first), m, v, u


def _oadam_nesterov(p, g, m, v, prev, lr, b1, b1c, b2, b2c, bc1, bc1_next, bc2, eps_root, eps,
                    ab, b, first):
    m = b1 * m + b1c * g
    v = b2 * v + b2c * g * g
    mh = b1 * (m / bc1_next) + b1c * (g / bc1)   # optax.scale_by_adam(nesterov=True)
    u = mh / (sqrt(v / bc2 + eps_root) + eps)
    return p - lr * _optimism(u, prev, ab, b, first), m, v, u


def _first(step: int) -> float:
    # (arithmetic, not if: the step may be traced in an optax transformation's program)
    return (step == 1) * 1.0


class OptimisticGD(Optimizer):
    """Optimistic gradient descent (Mokhtari et al., 2019) as
    optax.optimistic_gradient_descent::

        p ← p − lr·((α+β)·g − β·g_prev)       (g_prev: the previous step's g; g itself at t = 1)

    Slot ``prev`` (optax's ``previous_gradient``). At the first step the previous gradient
    is taken to be the current one, so the step is ``lr·α·g`` (optax, issue #1082).
    Defaults α = β = 1 (optax); lr 1e-3 (optax has none). optax has no weight decay:
    ``weight_decay`` here is coupled L2 (``g ← g + wd·p``, optax.add_decayed_weights
    chained in front; ``prev`` keeps that decayed gradient). torch 2.x and Keras 3 have none.
    """

    slots = ("prev",)

    def __init__(self, learning_rate: float = 1e-3, alpha: float = 1.0, beta: float = 1.0,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.alpha = check_positive("alpha", alpha)
        self.beta = check_positive("beta", beta)

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate, self.alpha + self.beta, self.beta, _first(step))

    def kernel_math(self) -> Any:
        return _ogd


class OptimisticAdam(Optimizer):
    """Optimistic Adam (Daskalakis et al., 2018) as optax.optimistic_adam_v2: Adam's
    direction ``u``, then the optimistic step on it::

        m ← β₁·m + (1−β₁)·g        v ← β₂·v + (1−β₂)·g²
        u ← m̂ / (√(v̂ + ε_root) + ε),   m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)
        p ← p − lr·((α+β)·u − β·u_prev)      (u_prev: the previous step's u; u itself at t = 1)

    ``nesterov`` (default True, as optax): m̂ = β₁·m/(1−β₁ᵗ⁺¹) + (1−β₁)·g/(1−β₁ᵗ). Slots
    ``m``, ``v`` and ``prev`` (the previous u). Defaults are optax's: α = β = 1,
    β = (0.9, 0.999), ε = 1e-8, ε_root = 0; lr 1e-3 (optax has none). The deprecated
    ``optax.optimistic_adam(lr, optimism)`` is ``p ← p − ((lr+o)·u − o·u_prev)``:
    here ``learning_rate=lr, alpha=1, beta=o/lr`` (equal up to rounding). optax has no
    weight decay: ``weight_decay`` here is coupled L2 (``g ← g + wd·p``,
    optax.add_decayed_weights chained in front). torch 2.x and Keras 3 have none.
    """

    slots = ("m", "v", "prev")

    def __init__(self, learning_rate: float = 1e-3, alpha: float = 1.0, beta: float = 1.0,
                 beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8,
                 eps_root: float = 0.0, nesterov: bool = True, weight_decay: float = 0.0,
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.alpha = check_positive("alpha", alpha)
        self.beta = check_positive("beta", beta)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon)
        self.eps_root = check_positive("eps_root", eps_root)
        self.nesterov = check_flag("nesterov", nesterov)

    def scalars(self, step: int) -> tuple[float, ...]:
        b1, b2 = self.beta1, self.beta2
        return (self.learning_rate, b1, 1 - b1, b2, 1 - b2, 1 - b1**step, 1 - b1**(step + 1),
                1 - b2**step, self.eps_root, self.epsilon, self.alpha + self.beta, self.beta,
                _first(step))

    def kernel_math(self) -> Any:
        return _oadam_nesterov if self.nesterov else _oadam
