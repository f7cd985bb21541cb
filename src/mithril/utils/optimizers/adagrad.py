"""AdaGrad with torch.optim conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive
from .elementwise import sqrt


def _adagrad(p, g, s, clr, eps):
    s = s + g * g
    return p - clr * (g / (sqrt(s) + eps)), s


class AdaGrad(Optimizer):
    """AdaGrad as torch.optim.Adagrad::

        s ← s + g²;   p ← p − lr/(1 + (t−1)·lr_decay) · g / (√s + ε)

    ε outside the sqrt; ``initial_accumulator_value`` defaults to 0 (torch, MLX; optax and
    Keras start at 0.1 with ε inside the sqrt). Default ε here is the guide's 1e-8
    (torch 1e-10).
    """

    def __init__(self, learning_rate: float = 0.01, epsilon: float = 1e-8,
                 initial_accumulator_value: float = 0.0, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.initial_accumulator_value = check_positive("initial_accumulator_value",
                                                        initial_accumulator_value)
        self.lr_decay = check_positive("lr_decay", lr_decay)

    slots = ("sum",)

    def slot_init(self, slot: str) -> float:
        return self.initial_accumulator_value

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate / (1 + (step - 1) * self.lr_decay), self.epsilon)

    def kernel_math(self) -> Any:
        return _adagrad
