"""RAdam with torch.optim conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit
from .elementwise import sqrt, where


def _radam(p, g, m, v, lr, b1c, b2, b2c, bc1, bc2_sqrt, eps, rect):
    m = m + b1c * (g - m)                  # torch: m.lerp_(g, 1 − β₁)
    v = v * b2 + b2c * g * g
    u = m / bc1 * lr
    # rect > 0 exactly when ρₜ > 5 (a per-step scalar: every element takes the same branch)
    return p - where(rect > 0, u * (bc2_sqrt / (sqrt(v) + eps)) * rect, u), m, v


class RAdam(Optimizer):
    """RAdam (Liu et al., 2019, rectified Adam) as torch.optim.RAdam::

        m ← β₁·m + (1−β₁)·g        v ← β₂·v + (1−β₂)·g²        m̂ = m/(1−β₁ᵗ)
        ρ∞ = 2/(1−β₂) − 1          ρₜ = ρ∞ − 2t·β₂ᵗ/(1−β₂ᵗ)
        ρₜ > 5:  rₜ = √((ρₜ−4)(ρₜ−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρₜ))
                 p ← p − lr·m̂ · √(1−β₂ᵗ)/(√v + ε) · rₜ
        else:    p ← p − lr·m̂                                (SGD with momentum)

    Slots ``m`` and ``v`` (torch's ``exp_avg``/``exp_avg_sq``). ε is added to the raw √v
    and the threshold is ρₜ > 5 (torch); optax.radam adds ε to the bias-corrected √v̂ and
    rectifies from ρₜ ≥ 5 (``threshold=5.0``). Keras has no RAdam. ``weight_decay`` is
    coupled L2 (``g ← g + wd·p``, torch's default), or with ``decoupled_weight_decay=True``
    ``p ← p·(1 − lr·wd)`` first (torch's option, AdamW style). Defaults are torch's: lr 1e-3,
    β = (0.9, 0.999), ε = 1e-8.
    """

    slots = ("m", "v")

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        # an instance attribute: the engines read opt.decoupled_weight_decay
        self.decoupled_weight_decay = check_flag("decoupled_weight_decay", decoupled_weight_decay)

    def rho(self, step: int) -> float:
        """ρₜ, the length of the approximated simple moving average (torch's formula)."""
        b2 = self.beta2
        rho_inf = 2 / (1 - b2) - 1
        return rho_inf - 2 * step * (b2**step) / (1 - b2**step)

    def scalars(self, step: int) -> tuple[float, ...]:
        b1, b2 = self.beta1, self.beta2
        bc2 = 1 - b2**step
        rho_inf = 2 / (1 - b2) - 1
        rho_t = self.rho(step)
        rect = 0.0
        if rho_t > 5.0:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                    / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        return (self.learning_rate, 1 - b1, b2, 1 - b2, 1 - b1**step, bc2**0.5,
                self.epsilon, rect)

    def kernel_math(self) -> Any:
        return _radam
