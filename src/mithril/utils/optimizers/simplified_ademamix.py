"""Simplified AdEMAMix, optax (optax.contrib.simplified_ademamix) conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive, check_unit
from .elementwise import sqrt


def _simplified_ademamix(p, g, m, n, lr, b1, b2, alpha, bc2, eps_root, eps):
    m = g + b1 * m                 # an accumulator, not an EMA: no (1−β₁) (optax, paper)
    g2 = g * g
    n = g2 + b2 * (n - g2)         # optax's lerp(β₂, g², n) = (1−β₂)·g² + β₂·n
    return p - lr * ((m + alpha * g) / (sqrt(n / bc2 + eps_root) + eps)), m, n


class SimplifiedAdEMAMix(Optimizer):
    """Simplified AdEMAMix (Morwani et al., 2024, "Connections between schedule-free
    optimizers, AdEMAMix, and accelerated SGD variants") as
    optax.contrib.simplified_ademamix::

        m ← β₁·m + g                       (no (1−β₁): a discounted sum, not bias-corrected)
        n ← β₂·n + (1−β₂)·g²
        p ← p·(1 − lr·wd) − lr · (m + α·g) / (√(n/(1−β₂ᵗ) + ε_root) + ε)

    Weight decay is decoupled and multiplied by lr (optax: update ``−lr·(u + wd·p)``, on
    every tensor unless ``weight_decay_mask`` / parameter groups say otherwise: optax's
    ``mask=None``). Defaults are optax's: β₁ 0.99, β₂ 0.95, α 0, ε 1e-8, ε_root 0, no
    decay; lr 1e-3 (optax has none; with β₁ = 0.99, m grows to ~100·g: the paper's lr is
    correspondingly smaller than Adam's). torch 2.x and Keras 3 have none.

    **Scheduling α** (optax's ``alpha`` may be a schedule of the 0-based count): drive
    ``opt.hyperparameter("alpha")`` with any scheduler, e.g. on an optimizer built with
    ``alpha=0.0``, ``PolynomialDecay(opt.hyperparameter("alpha"), transition_steps=T,
    end_value=α)`` is ``alpha=optax.linear_schedule(0.0, α, T)`` (a scheduler sets step
    0's value when made and step k's at its k-th ``step()``, after the k-th update: the value
    of update k+1 is the schedule's at count k, as optax's). α is a per-step kernel scalar:
    changing it recompiles nothing. As an optax transformation:
    ``optax_transformation(opt, schedules={"alpha": schedule})``.
    """

    decoupled_weight_decay = True
    slots = ("m", "n")

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.99, beta2: float = 0.95,
                 alpha: float = 0.0, epsilon: float = 1e-8, eps_root: float = 0.0,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.alpha = check_positive("alpha", alpha)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.eps_root = check_positive("eps_root", eps_root)

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate, self.beta1, self.beta2, self.alpha, 1 - self.beta2**step,
                self.eps_root, self.epsilon)

    def kernel_math(self) -> Any:
        return _simplified_ademamix
