"""AdaBelief, optax conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit
from .elementwise import sqrt


def _adabelief(p, g, m, s, lr, b1, b1c, b2, b2c, bc1, bc1_next, bc2, eps_root, eps):
    m = b1 * m + b1c * g
    d = g - m                                  # the "belief": g against the new m
    s = b2 * s + b2c * d * d + eps_root        # ε_root is accumulated into s (optax, paper)
    return p - lr * ((m / bc1) / (sqrt(s / bc2) + eps)), m, s


def _adabelief_nesterov(p, g, m, s, lr, b1, b1c, b2, b2c, bc1, bc1_next, bc2, eps_root, eps):
    m = b1 * m + b1c * g
    d = g - m
    s = b2 * s + b2c * d * d + eps_root
    mh = b1 * (m / bc1_next) + b1c * (g / bc1)
    return p - lr * (mh / (sqrt(s / bc2) + eps)), m, s


class AdaBelief(Optimizer):
    """AdaBelief (Zhuang et al., 2020) as optax.adabelief::

        m ← β₁·m + (1−β₁)·g
        s ← β₂·s + (1−β₂)·(g − m)² + ε_root
        p ← p − lr · m̂ / (√ŝ + ε),   m̂ = m/(1−β₁ᵗ), ŝ = s/(1−β₂ᵗ)

    ``nesterov``: m̂ = β₁·m/(1−β₁ᵗ⁺¹) + (1−β₁)·g/(1−β₁ᵗ) (optax). ε_root is added to s
    itself each step, so it accumulates (optax). Defaults ε = ε_root = 1e-16 (optax; the paper suggests
    ε=1e-8, ε_root=0): with float16 parameters both round to 0, which is refused. optax
    has no weight decay: ``weight_decay`` here is coupled L2 (``g ← g + wd·p``,
    optax.add_decayed_weights chained in front). torch 2.x and Keras 3 have no AdaBelief.
    """

    slots = ("m", "s")

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-16, eps_root: float = 1e-16, nesterov: bool = False,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.eps_root = check_positive("eps_root", eps_root)
        self.nesterov = check_flag("nesterov", nesterov)

    def scalars(self, step: int) -> tuple[float, ...]:
        b1, b2 = self.beta1, self.beta2
        return (self.learning_rate, b1, 1 - b1, b2, 1 - b2, 1 - b1**step, 1 - b1**(step + 1),
                1 - b2**step, self.eps_root, self.epsilon)

    def kernel_math(self) -> Any:
        return _adabelief_nesterov if self.nesterov else _adabelief
