"""NAdam with torch.optim conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit
from .elementwise import sqrt


def _nadam(p, g, m, v, lr, b1c, b2, b2c, bc2, eps, cg, cm):
    m = m + b1c * (g - m)                  # torch: m.lerp_(g, 1 − β₁)
    v = v * b2 + b2c * g * g
    d = sqrt(v / bc2) + eps
    return p + cg * (g / d) + cm * (m / d), m, v   # torch: two addcdiv_, g's first


class NAdam(Optimizer):
    """NAdam (Dozat, 2016) as torch.optim.NAdam, with its momentum schedule::

        μₜ = β₁·(1 − ½·0.96^(t·ψ))        Πₜ = μ₁·μ₂·…·μₜ        (ψ = momentum_decay)
        m ← β₁·m + (1−β₁)·g              v ← β₂·v + (1−β₂)·g²
        d = √(v / (1−β₂ᵗ)) + ε
        p ← p − lr·(1−μₜ)/(1−Πₜ) · g/d − lr·μₜ₊₁/(1−Πₜ·μₜ₊₁) · m/d

    Slots ``m`` and ``v`` (torch's ``exp_avg``/``exp_avg_sq``). Πₜ is a function of t only,
    computed from the step count (the running product is cached, and recomputed from
    scratch for a state resumed at another step), so a restored state continues exactly.
    Πₜ is kept in float64: torch keeps its ``mu_product`` in its default dtype, i.e. rounded
    to float32 each step unless ``torch.set_default_dtype(torch.float64)`` (the two then
    differ by ~1e-8 relative in float64).

    ``weight_decay``: coupled L2 ``g ← g + wd·p`` (torch's default), or with
    ``decoupled_weight_decay=True`` ``p ← p·(1 − lr·wd)`` first (torch's NAdamW option).
    ``momentum_decay=0`` gives a constant μ = β₁/2 (torch). Keras' Nadam is this update with
    ψ = 1 fixed (μₜ = β₁·(1 − ½·0.96ᵗ)), ε 1e-7 and lr 1e-3. optax.nadam differs: Adam's
    bias corrections with a Nesterov look-ahead and a constant β₁ (no μ schedule). Defaults
    are torch's: lr 2e-3, β = (0.9, 0.999), ε = 1e-8, ψ = 4e-3.
    """

    slots = ("m", "v")

    def __init__(self, learning_rate: float = 2e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float = 0.0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.momentum_decay = check_positive("momentum_decay", momentum_decay)
        # an instance attribute: the engines read opt.decoupled_weight_decay
        self.decoupled_weight_decay = check_flag("decoupled_weight_decay", decoupled_weight_decay)
        self._products: tuple = ()  # (beta1, momentum_decay, t, Π_t): the last one computed

    def _mu(self, t: int) -> float:
        return self.beta1 * (1.0 - 0.5 * (0.96 ** (t * self.momentum_decay)))

    def mu_product(self, step: int) -> float:
        """Πₜ = μ₁·…·μₜ, multiplied in the order torch does (from the cached Πₜ₋₁ when the
        previous step's is cached, else from scratch: exact for any resumed step)."""
        key = (self.beta1, self.momentum_decay)
        cached = self._products
        t, prod = (cached[2], cached[3]) if cached[:2] == key and cached[2] <= step else (0, 1.0)
        while t < step:
            t += 1
            prod *= self._mu(t)
        self._products = (*key, t, prod)
        return prod

    def scalars(self, step: int) -> tuple[float, ...]:
        lr, b1, b2 = self.learning_rate, self.beta1, self.beta2
        mu, mu_next = self._mu(step), self._mu(step + 1)
        prod = self.mu_product(step)
        # as torch computes them, in Python floats
        cg = -lr * (1.0 - mu) / (1.0 - prod)
        cm = (-lr * mu_next) / (1.0 - prod * mu_next)
        return (lr, 1 - b1, b2, 1 - b2, 1 - b2**step, self.epsilon, cg, cm)

    def kernel_math(self) -> Any:
        return _nadam
