"""Lion (EvoLved Sign Momentum), optax conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_unit
from .elementwise import sign


def _lion(p, g, m, lr, b1, b1c, b2, b2c):
    u = sign(b1c * g + b1 * m)      # interpolate with the *old* momentum, then take the sign
    m = b2 * m + b2c * g
    return p - lr * u, m


class Lion(Optimizer):
    """Lion (Chen et al., 2023) as optax.lion::

        u ← sign(β₁·m + (1−β₁)·g)      (sign(0) = 0)
        m ← β₂·m + (1−β₂)·g
        p ← p·(1 − lr·wd) − lr·u

    Weight decay is decoupled and multiplied by the learning rate (optax: the update is
    ``−lr·(u + wd·p)``; Keras' Lion and lucidrains' lion-pytorch also apply
    ``p ← p·(1 − lr·wd)``). Default ``weight_decay=1e-3`` as optax (Keras: none).
    optax has no default learning rate; 1e-4 here (the paper's advice: 3-10× smaller than
    AdamW's; Keras defaults to 1e-3). Defaults β₁ = 0.9, β₂ = 0.99 as optax and Keras.
    optax's ``mu_dtype`` is not offered: ``m`` is kept in the parameters' dtype.
    """

    decoupled_weight_decay = True
    slots = ("m",)

    def __init__(self, learning_rate: float = 1e-4, beta1: float = 0.9, beta2: float = 0.99,
                 weight_decay: float = 1e-3, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate, self.beta1, 1 - self.beta1, self.beta2, 1 - self.beta2)

    def kernel_math(self) -> Any:
        return _lion
