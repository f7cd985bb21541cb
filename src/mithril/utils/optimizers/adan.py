"""Adan (adaptive Nesterov momentum), optax conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive, check_unit
from .elementwise import sqrt, where


def _adan(p, g, m, v, n, g_prev, lr, b1, b1c, b2, b2c, b3, b3c, first, bc1, bc2, bc3,
          eps_root, eps):
    d = first * (g - g_prev)                   # gradient difference; 0 on the first step
    m = b1 * m + b1c * g
    v = b2 * v + b2c * d
    q = g + b2c * d
    n = b3 * n + b3c * q * q
    u = (m / bc1 + b2c * (v / bc2)) / (sqrt(n / bc3 + eps_root) + eps)
    return p - lr * u, m, v, n, g


class Adan(Optimizer):
    """Adan (Xie et al., 2022) as optax.adan::

        d ← g − g_prev (0 on the first step)
        m ← β₁·m + (1−β₁)·g          v ← β₂·v + (1−β₂)·d
        n ← β₃·n + (1−β₃)·(g + (1−β₂)·d)²
        p ← p·(1 − lr·wd) − lr · (m̂ + (1−β₂)·v̂) / (√(n̂ + ε_root) + ε)

    with m̂, v̂, n̂ bias-corrected by 1−β₁ᵗ, 1−β₂ᵗ, 1−β₃ᵗ. The betas weigh the *old* value
    (optax and the official PyTorch Adan, defaults 0.98, 0.92, 0.99); the paper's β's are
    one minus these. Weight decay is decoupled and multiplied by lr (optax: update
    ``−lr·(u + wd·p)``; the official PyTorch Adan with ``no_prox=True``). optax's docstring
    shows ``(p − lr·u)/(1 + lr·wd)`` instead (the official PyTorch Adan's default proximal
    form), but its code multiplies. The first step's gradient difference is 0 (optax and
    the official code). The previous gradient is a slot (``g_prev``): Adan keeps four
    buffers per parameter.
    """

    decoupled_weight_decay = True
    slots = ("m", "v", "n", "g_prev")

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.98, beta2: float = 0.92,
                 beta3: float = 0.99, epsilon: float = 1e-8, eps_root: float = 1e-8,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.beta3 = check_unit("beta3", beta3)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.eps_root = check_positive("eps_root", eps_root)

    def scalars(self, step: int) -> tuple[float, ...]:
        b1, b2, b3 = self.beta1, self.beta2, self.beta3
        return (self.learning_rate, b1, 1 - b1, b2, 1 - b2, b3, 1 - b3,
                where(step == 1, 0.0, 1.0), 1 - b1**step, 1 - b2**step, 1 - b3**step,
                self.eps_root, self.epsilon)

    def kernel_math(self) -> Any:
        return _adan
