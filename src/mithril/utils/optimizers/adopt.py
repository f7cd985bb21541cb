"""ADOPT, optax (optax.contrib.adopt) conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_mu_dtype, check_positive, check_unit
from .elementwise import maximum, sqrt


def _adopt(p, g, m, v, lr, b1, b1c, b2, b2c, eps, clip):
    u = g / maximum(sqrt(v), eps)              # normalised by the *previous* v
    m = b1 * m + b1c * u
    v = b2 * v + b2c * g * g
    return p - lr * m, m, v


def _adopt_clip(p, g, m, v, lr, b1, b1c, b2, b2c, eps, clip):
    u = g / maximum(sqrt(v), eps)
    u = -maximum(-maximum(u, -clip), -clip)    # clip(u, −c, c), exactly
    m = b1 * m + b1c * u
    v = b2 * v + b2c * g * g
    return p - lr * m, m, v


def _adopt_nesterov(p, g, m, v, lr, b1, b1c, b2, b2c, eps, clip):
    u = g / maximum(sqrt(v), eps)
    u = -maximum(-maximum(u, -clip), -clip)
    m = b1 * m + b1c * u
    v = b2 * v + b2c * g * g
    return p - lr * (b1 * m + b1c * u), m, v


class ADOPT(Optimizer):
    """ADOPT (Taniguchi et al., 2024) as optax.contrib.adopt::

        u ← clip(g / max(√v, ε), ±(t−1)^¼)    (v of the previous step; clipping optional)
        m ← β₁·m + (1−β₁)·u
        v ← β₂·v + (1−β₂)·g²
        p ← p − lr·m                           (nesterov: p ← p − lr·(β₁·m + (1−β₁)·u))

    First step (t = 1, optax's convention): only ``v ← g²``; m stays 0 and the parameters
    do not move (β₁ and β₂ act as 1 and 0). The clip bound is optax's default
    ``clip_value_fn`` evaluated at the 0-based count, (t−1)^¼; other clip functions are not
    offered. ε is a floor on √v (``max``), not added. optax's ADOPT has no weight decay:
    ``weight_decay`` here is coupled L2 (``g ← g + wd·p``, optax.add_decayed_weights chained
    in front). torch 2.x has no ADOPT. optax's ``clip_value_fn`` is its default only
    (``use_clipping``). ``mu_dtype`` (optax's; None: the parameters' dtype): ``m`` kept in
    that dtype between steps, computed in optax's order (β₁·m in m's own dtype, a
    weak-typed scalar, then promoted), stored rounded; the per-tensor array engine (see
    :class:`~.adam.Adam`).
    """

    slots = ("m", "v")
    step_wide = ("mu_dtype",)  # (one dtype per slot buffer: not a group's)

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.9, beta2: float = 0.9999,
                 epsilon: float = 1e-6, use_clipping: bool = True, nesterov: bool = False,
                 weight_decay: float = 0.0, mu_dtype: Any = None, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.mu_dtype = check_mu_dtype(mu_dtype)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.use_clipping = check_flag("use_clipping", use_clipping)
        self.nesterov = check_flag("nesterov", nesterov)

    def rule(self) -> tuple[Any, ...]:
        return (*super().rule(), self.mu_dtype)  # (the dtype of m's buffer: not changed live)

    def scalars(self, step: int) -> tuple[float, ...]:
        # (arithmetic, not if: the step and the betas may be traced, in an optax
        # transformation's program; each the same on the host: x · 1.0 is x, x + 0.0 is x)
        # (each complement from the float64 setting: 1 − β₂ after β₂'s float32 rounding
        # would lose ~1e-4 of its precision for β₂ = 0.9999)
        later = (step != 1) * 1.0
        first = 1.0 - later
        b1, b2 = self.beta1 * later + first, self.beta2 * later
        b1c, b2c = (1 - self.beta1) * later, (1 - self.beta2) * later + first
        return (self.learning_rate, b1, b1c, b2, b2c, self.epsilon, (step - 1) ** 0.25)

    def kernel_math(self) -> Any:
        if self.nesterov:
            return _adopt_nesterov if self.use_clipping else _adopt_nesterov_noclip
        return _adopt_clip if self.use_clipping else _adopt


def _adopt_nesterov_noclip(p, g, m, v, lr, b1, b1c, b2, b2c, eps, clip):
    u = g / maximum(sqrt(v), eps)
    m = b1 * m + b1c * u
    v = b2 * v + b2c * g * g
    return p - lr * (b1 * m + b1c * u), m, v
