"""Yogi, optax conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive, check_unit
from .elementwise import sign, sqrt


def _yogi(p, g, m, v, lr, b1, b1c, b2c, bc1, bc2, eps_root, eps):
    m = b1 * m + b1c * g
    g2 = g * g
    v = v - b2c * sign(v - g2) * g2
    return p - lr * ((m / bc1) / (sqrt(v / bc2 + eps_root) + eps)), m, v


class Yogi(Optimizer):
    """Yogi (Zaheer et al., 2018) as optax.yogi / optax.scale_by_yogi::

        m ← β₁·m + (1−β₁)·g
        v ← v − (1−β₂)·sign(v − g²)·g²          (additive, not Adam's multiplicative, v)
        p ← p − lr · m̂ / (√(v̂ + ε_root) + ε),   m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)

    Both m and v start at ``initial_accumulator_value`` (1e-6, as optax; m too, as optax),
    and both are bias-corrected (optax).
    Default ε = 1e-3 (optax, paper); ``eps_root`` (0) is only exposed by
    optax.scale_by_yogi. optax.yogi has no weight decay: ``weight_decay`` here is coupled L2
    (``g ← g + wd·p``, optax.add_decayed_weights chained in front); torch has no Yogi.
    """

    slots = ("m", "v")

    def __init__(self, learning_rate: float = 1e-2, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-3, eps_root: float = 0.0,
                 initial_accumulator_value: float = 1e-6, weight_decay: float = 0.0,
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.eps_root = check_positive("eps_root", eps_root)
        self.initial_accumulator_value = check_positive("initial_accumulator_value",
                                                        initial_accumulator_value)

    def slot_init(self, slot: str) -> float:
        return self.initial_accumulator_value

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate, self.beta1, 1 - self.beta1, 1 - self.beta2,
                1 - self.beta1**step, 1 - self.beta2**step, self.eps_root, self.epsilon)

    def kernel_math(self) -> Any:
        return _yogi
