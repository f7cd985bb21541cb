"""RMSProp with torch.optim conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit
from .elementwise import maximum, sqrt


def _plain(p, g, v, lr, a, ac, eps):
    v = a * v + ac * g * g
    return p - lr * (g / (sqrt(v) + eps)), v


def _centered(p, g, v, ga, lr, a, ac, eps):
    v = a * v + ac * g * g
    ga = ga + ac * (g - ga)
    return p - lr * (g / (sqrt(maximum(v - ga * ga, 0.0)) + eps)), v, ga


def _momentum(p, g, v, b, lr, a, ac, eps, mu):
    v = a * v + ac * g * g
    b = mu * b + g / (sqrt(v) + eps)
    return p - lr * b, v, b


def _centered_momentum(p, g, v, ga, b, lr, a, ac, eps, mu):
    v = a * v + ac * g * g
    ga = ga + ac * (g - ga)
    b = mu * b + g / (sqrt(maximum(v - ga * ga, 0.0)) + eps)
    return p - lr * b, v, ga, b


class RMSProp(Optimizer):
    """RMSProp as torch.optim.RMSprop (with ``decay`` = torch's α)::

        v ← α·v + (1−α)·g²          (centered: ḡ ← α·ḡ + (1−α)·g, denominator √max(v − ḡ², 0))
        d = √v + ε                  (ε outside the sqrt, as torch; optax default puts it inside)
        momentum μ > 0:  b ← μ·b + g/d;  p ← p − lr·b   (lr outside the buffer, as torch)
        otherwise:       p ← p − lr·g/d

    Default ``decay=0.9`` as the guide, optax and Keras (torch defaults to 0.99).
    Centered: ``v − ḡ²`` is clamped at 0 - once the gradient is (nearly) constant it cancels
    to rounding noise, and torch's ``sqrt`` of a slightly negative value gives NaN parameters
    (e.g. after ~330 steps of a constant gradient at α=0.9); otherwise identical to torch.
    """

    def __init__(self, learning_rate: float = 1e-3, decay: float = 0.9, epsilon: float = 1e-8,
                 momentum: float = 0.0, centered: bool = False, weight_decay: float = 0.0,
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.decay = check_unit("decay", decay)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.momentum = check_unit("momentum", momentum)
        self.centered = check_flag("centered", centered)

    def slot_names(self) -> tuple[str, ...]:
        return ("v",) + (("grad_avg",) if self.centered else ()) + (("momentum",) if self.momentum else ())

    def scalars(self, step: int) -> tuple[float, ...]:
        # 1 − α passed in (torch computes it in Python too; an int literal in the kernel
        # would also promote float32 math to float64)
        s = (self.learning_rate, self.decay, 1 - self.decay, self.epsilon)
        return s + (self.momentum,) if self.momentum else s

    def kernel_math(self) -> Any:
        return {(False, False): _plain, (True, False): _centered, (False, True): _momentum,
                (True, True): _centered_momentum}[(self.centered, bool(self.momentum))]
