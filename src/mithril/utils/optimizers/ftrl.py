"""FTRL-Proximal, Keras 3 conventions."""

from __future__ import annotations

import math
from typing import Any

from .base import Optimizer
from .checks import check_positive, describe, to_float
from .elementwise import maximum, sqrt


def _ftrl(p, g, n, z, lr, power, l1, l2x2, shrink2):
    n_new = n + g * g
    pn = n_new ** power
    z = z + ((g + shrink2 * p) - (pn - n ** power) / lr * p)
    zc = -maximum(-maximum(z, -l1), -l1)       # clip(z, −l1, l1), exactly
    return (zc - z) / (pn / lr + l2x2), n_new, z


def _ftrl_sqrt(p, g, n, z, lr, power, l1, l2x2, shrink2):
    """:func:`_ftrl` for the default power ½: a square root (correctly rounded, as the
    power is to within an ulp) instead of a general power, ~10x cheaper."""
    n_new = n + g * g
    pn = sqrt(n_new)
    z = z + ((g + shrink2 * p) - (pn - sqrt(n)) / lr * p)
    zc = -maximum(-maximum(z, -l1), -l1)       # clip(z, −l1, l1), exactly
    return (zc - z) / (pn / lr + l2x2), n_new, z


class Ftrl(Optimizer):
    """FTRL-Proximal (McMahan et al., 2013) as keras.optimizers.Ftrl (Keras 3)::

        n' ← n + g²
        z ← z + (g + 2·λ_shrink·p) − (n'^(−c) − n^(−c))/lr · p     (c = learning_rate_power)
        p ← (clip(z, ±λ₁) − z) / (n'^(−c)/lr + 2·(λ₂ + β/(2·lr)))

    (``n`` is the ``accumulator`` slot, ``z`` the ``linear`` one; λ₁, λ₂, λ_shrink the
    ``l1_``, ``l2_`` and ``l2_shrinkage_regularization_strength``.) The parameters are
    recomputed from z and n each step, not moved by a step. ``learning_rate_power`` must be
    ≤ 0 (0: a fixed learning rate). Defaults as Keras (lr 1e-3, c = −0.5, accumulator
    0.1). ``weight_decay`` is decoupled, ``p ← p·(1 − lr·wd)`` before the step, as Keras'
    ``weight_decay``; the shrinkage term is Keras' magnitude penalty. Changing lr mid-run
    follows Keras (the new lr enters z's increment and the denominator). optax and torch
    have no FTRL; TF1's FtrlOptimizer is the same algorithm.
    """

    decoupled_weight_decay = True
    slots = ("accumulator", "linear")

    def __init__(self, learning_rate: float = 1e-3, learning_rate_power: float = -0.5,
                 initial_accumulator_value: float = 0.1, l1_regularization_strength: float = 0.0,
                 l2_regularization_strength: float = 0.0,
                 l2_shrinkage_regularization_strength: float = 0.0, beta: float = 0.0,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self._check_lr(self.learning_rate)
        power = to_float("learning_rate_power", learning_rate_power)
        if not (math.isfinite(power) and power <= 0):
            raise ValueError(f"learning_rate_power must be <= 0 and finite, got "
                             f"{describe(learning_rate_power)}")
        self.learning_rate_power = power
        self.initial_accumulator_value = check_positive("initial_accumulator_value",
                                                        initial_accumulator_value)
        self.l1_regularization_strength = check_positive("l1_regularization_strength",
                                                         l1_regularization_strength)
        self.l2_regularization_strength = check_positive("l2_regularization_strength",
                                                         l2_regularization_strength)
        self.l2_shrinkage_regularization_strength = check_positive(
            "l2_shrinkage_regularization_strength", l2_shrinkage_regularization_strength)
        self.beta = check_positive("beta", beta)

    @staticmethod
    def _check_lr(lr: float) -> None:
        if lr == 0:  # FTRL divides by lr
            raise ValueError("learning_rate must be > 0 for Ftrl (it divides by it), got 0.0")

    def set_learning_rate(self, lr: float) -> None:
        self._check_lr(check_positive("learning_rate", lr))
        super().set_learning_rate(lr)

    def slot_init(self, slot: str) -> float:
        return self.initial_accumulator_value if slot == "accumulator" else 0.0

    def scalars(self, step: int) -> tuple[float, ...]:
        lr = self.learning_rate
        l2 = self.l2_regularization_strength + self.beta / (2.0 * lr)
        return (lr, -self.learning_rate_power, self.l1_regularization_strength, 2 * l2,
                2 * self.l2_shrinkage_regularization_strength)

    def kernel_math(self) -> Any:
        # (a parameter group cannot set its own power: it changes the update rule)
        return _ftrl_sqrt if self.learning_rate_power == -0.5 else _ftrl
