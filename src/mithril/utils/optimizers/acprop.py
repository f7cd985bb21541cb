"""ACProp, optax (optax.contrib.acprop) conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive, check_unit
from .elementwise import sqrt


def _acprop(p, g, m, v, lr, b1, b1c, b2, b2c, bcd, later, first, eps, eps_root):
    v_hat = v / bcd * later + first   # the previous step's v, bias-corrected (1 at t = 1)
    u = g / (sqrt(v_hat) + eps)       # the gradient itself, not m (asynchronous update)
    e = g - m                         # prediction error against the previous m
    m = b1 * m + b1c * g
    v = b2 * v + b2c * (e * e) + eps_root
    return p - lr * u, m, v


class AcProp(Optimizer):
    """ACProp (Zhuang et al., 2021, "Momentum Centering and Asynchronous Update") as
    optax.contrib.acprop, per element (t = 1, 2, ...)::

        v̂ ← v / (1 − β₂ᵗ⁻¹)                   (v of the previous step; v̂ = 1 at t = 1)
        p ← p − lr · g / (√v̂ + ε)
        m ← β₁·m + (1−β₁)·g
        v ← β₂·v + (1−β₂)·(g − m_prev)² + ε_root

    As optax's ``scale_by_acprop``: the step divides the gradient itself (not ``m``) by the
    root of the *previous* centred second moment (the asynchronous update); ``m`` only centres
    ``v``. Slots ``m`` and ``v`` (optax's ``mu`` and ``nu``). ``weight_decay`` is decoupled,
    as optax's ``add_decayed_weights`` between the scaling and the learning rate:
    ``p ← p − lr·(u + wd·p)``, on every tensor unless ``weight_decay_mask`` / parameter
    groups say otherwise (optax's ``mask=None``). Defaults are optax's (β 0.9/0.999,
    ε = ε_root = 1e-16, no decay; optax has no default lr: 1e-3 here). torch 2.x and Keras 3
    have none.
    """

    slots = ("m", "v")
    decoupled_weight_decay = True

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-16, eps_root: float = 1e-16, weight_decay: float = 0.0,
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.eps_root = check_positive("eps_root", eps_root)

    def scalars(self, step: int) -> tuple[float, ...]:
        # (arithmetic, not if: the step may be traced in an optax transformation's program)
        later = (step != 1) * 1.0
        first = 1.0 - later
        bcd = (1.0 - self.beta2 ** (step - 1)) * later + first  # (1 at t = 1: no 0/0)
        return (self.learning_rate, self.beta1, 1 - self.beta1, self.beta2, 1 - self.beta2,
                bcd, later, first, self.epsilon, self.eps_root)

    def kernel_math(self) -> Any:
        return _acprop
