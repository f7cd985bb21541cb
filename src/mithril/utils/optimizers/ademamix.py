"""AdEMAMix, optax (optax.contrib.ademamix) conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive, check_unit
from .elementwise import sqrt


def _ademamix(p, g, m1, m2, v, lr, b1, b1c, b2, b2c, b3, b3c, alpha, bc1, bc2, eps_root, eps):
    m1 = b1 * m1 + b1c * g
    m2 = b3 * m2 + b3c * g
    v = b2 * v + b2c * g * g
    return p - lr * ((m1 / bc1 + alpha * m2) / (sqrt(v / bc2 + eps_root) + eps)), m1, m2, v


class AdEMAMix(Optimizer):
    """AdEMAMix (Pagliardini et al., 2024) as optax.contrib.ademamix::

        m₁ ← β₁·m₁ + (1−β₁)·g    (fast EMA)      m₂ ← β₃·m₂ + (1−β₃)·g    (slow EMA)
        v ← β₂·v + (1−β₂)·g²
        p ← p·(1 − lr·wd) − lr · (m₁/(1−β₁ᵗ) + α·m₂) / (√(v/(1−β₂ᵗ) + ε_root) + ε)

    The slow EMA m₂ is not bias-corrected (optax, paper). Weight decay is decoupled and
    multiplied by lr (optax: update ``−lr·(u + wd·p)``). Defaults as optax.contrib.ademamix
    (α = 5; its scale_by_ademamix defaults to 6).

    **Scheduling α and β₃** (optax accepts schedules of both, evaluated at the 0-based
    count t−1; the paper warms both up): drive ``opt.hyperparameter("alpha")`` /
    ``opt.hyperparameter("beta3")`` with any scheduler. On an optimizer built with
    ``alpha=0.0, beta3=b``, ``PolynomialDecay(opt.hyperparameter("alpha"), T, end_value=α)``
    is ``alpha=optax.linear_schedule(0.0, α, T)`` and ``PolynomialDecay(
    opt.hyperparameter("beta3"), T, end_value=β₃, power=p)`` is ``b3=optax.polynomial_schedule(
    b, β₃, p, T)`` (a scheduler sets step 0's value when made and step k's at its k-th
    ``step()``, after the k-th update: optax's count). Both are per-step kernel scalars:
    changing them recompiles nothing. As an optax transformation:
    ``optax_transformation(opt, schedules={"alpha": ..., "beta3": ...})``.
    """

    decoupled_weight_decay = True
    slots = ("m1", "m2", "v")

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 beta3: float = 0.9999, alpha: float = 5.0, epsilon: float = 1e-8,
                 eps_root: float = 0.0, weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.beta3 = check_unit("beta3", beta3)
        self.alpha = check_positive("alpha", alpha)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.eps_root = check_positive("eps_root", eps_root)

    def scalars(self, step: int) -> tuple[float, ...]:
        b1, b2, b3 = self.beta1, self.beta2, self.beta3
        return (self.learning_rate, b1, 1 - b1, b2, 1 - b2, b3, 1 - b3, self.alpha,
                1 - b1**step, 1 - b2**step, self.eps_root, self.epsilon)

    def kernel_math(self) -> Any:
        return _ademamix
