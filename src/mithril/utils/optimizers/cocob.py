"""COCOB-Backprop (continuous coin betting, learning-rate free), optax conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive
from .elementwise import abs_, maximum, where


def _cocob(p, g, p0, c, scale, sub, reward, lr, alpha):
    # the starting point: p itself until a gradient moves it (G = 0 until then, and a zero
    # gradient leaves p exactly where it is), so p₀ is the initial value, as optax's copy
    p0 = where(sub == 0.0, p, p0)
    d = lr * g                               # optax scales the gradient by lr first
    scale = maximum(scale, abs_(d))          # L: the largest |gradient| seen (from ε)
    sub = sub + abs_(d)                      # G: the sum of |gradient|
    reward = maximum(reward - d * (p - p0), 0.0)
    c = c - d                                # θ: minus the sum of gradients
    x = p0 + c / (scale * maximum(sub + scale, alpha * scale)) * (scale + reward)
    return p + (-p + x), p0, c, scale, sub, reward   # (optax's update, then apply_updates)


class COCOB(Optimizer):
    """COCOB-Backprop (Orabona & Tommasi, 2017) as optax.contrib.cocob, per element::

        c ← lr·g              (optax scales the gradient first; lr = 1 is the method)
        L ← max(L, |c|)       G ← G + |c|       R ← max(R − c·(p − p₀), 0)       θ ← θ − c
        p ← p₀ + θ / (L·max(G + L, α·L)) · (L + R)

    Slots ``p0`` (the starting point, optax's ``init_particles``: each element's value
    when its first non-zero gradient comes, which is its initial value: until then the step
    leaves it exactly in place), ``c`` (θ, optax's ``cumulative_gradients``), ``scale``
    (L, starting at ε), ``sub`` (G, ``subgradients``) and ``reward`` (R). Defaults are
    optax's: lr 1, α 100, ε 1e-8, no decay. ``weight_decay`` is coupled L2 (optax
    chains ``add_decayed_weights`` in front: ``g ← g + wd·p``, then × lr), on every tensor
    unless ``weight_decay_mask`` / parameter groups say otherwise (optax's ``mask=None``).
    torch 2.x and Keras 3 have none.
    """

    slots = ("p0", "c", "scale", "sub", "reward")

    def __init__(self, learning_rate: float = 1.0, alpha: float = 100.0, epsilon: float = 1e-8,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.alpha = check_positive("alpha", alpha, allow_zero=False)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)

    def slot_init(self, slot: str) -> float:
        return self.epsilon if slot == "scale" else 0.0

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate, self.alpha)

    def kernel_math(self) -> Any:
        return _cocob
