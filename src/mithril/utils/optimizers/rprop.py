"""Rprop with torch.optim conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive, describe
from .elementwise import maximum, minimum, sign, where


def _rprop(p, g, prev, step, lr, eta_minus, eta_plus, step_min, step_max):
    step = where(step < 0, lr, step)       # an element's first step: the step size is lr
    s = g * prev
    step = minimum(maximum(where(s > 0, step * eta_plus, where(s < 0, step * eta_minus, step)),
                           step_min), step_max)
    g = where(s < 0, 0.0, g)               # a sign flip: no move, and prev ← 0 (torch)
    return p - sign(g) * step, g, step


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers, got {describe(value)}") from None
    return check_positive(f"{name}[0]", a), check_positive(f"{name}[1]", b)


class Rprop(Optimizer):
    """Rprop (resilient backpropagation, Riedmiller & Braun) as torch.optim.Rprop, per
    element with s = g·g_prev::

        s > 0:  step ← min(step·η₊, step_max)
        s < 0:  step ← max(step·η₋, step_min);  g ← 0      (no move this step, and g_prev = 0,
                                                          so the next step counts as s = 0)
        s = 0:  step ← clamp(step, step_min, step_max)
        p ← p − sign(g)·step;   g_prev ← g

    ``etas = (η₋, η₊)`` with 0 < η₋ < 1 < η₊, ``step_sizes = (step_min, step_max)`` with
    0 ≤ step_min ≤ step_max; defaults are torch's: lr 1e-2, (0.5, 1.2), (1e-6, 50). Slots
    ``prev`` and ``step_size`` (torch's names). Only the gradient's sign matters: the
    method is meant for full-batch training.

    The learning rate is only the initial step size of each element: as in torch, changing
    it (``set_learning_rate``, a schedule) after an element's first step has no effect on
    it. ``step_size`` holds −1 until the element's first step (then the lr of that step, as
    torch, which creates its state at a parameter's first step). optax.rprop differs in
    details (it leaves the step size unclamped where s = 0 and keeps the signed step as its
    state); Keras has no Rprop. torch's Rprop has
    no weight decay; ``weight_decay`` here is the usual coupled L2 (``g ← g + wd·p``), i.e.
    torch's Rprop given ``g + wd·p``.

    optax.rprop's ``eta_minus``/``eta_plus`` and ``min_step_size``/``max_step_size`` are
    ``etas`` and ``step_sizes`` here. Its update (0.2.8) is the *previous* step's signed step
    (the first update is 0: google-deepmind/optax#1725, "one-step-stale"), not reproduced.
    torch's ``maximize`` / ``foreach`` / ``capturable`` / ``differentiable`` are not
    arguments: negate the loss to maximise; the fused kernels choose the loop.
    """

    slots = ("prev", "step_size")

    def __init__(self, learning_rate: float = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50.0), weight_decay: float = 0.0,
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        eta_minus, eta_plus = _pair("etas", etas)
        if not 0 < eta_minus < 1 < eta_plus:
            raise ValueError(f"etas must be (eta_minus, eta_plus) with 0 < eta_minus < 1 < "
                             f"eta_plus, got {describe(etas)}")
        step_min, step_max = _pair("step_sizes", step_sizes)
        if not step_min <= step_max:
            raise ValueError(f"step_sizes must be (min, max) with 0 <= min <= max, got "
                             f"{describe(step_sizes)}")
        self.etas = (eta_minus, eta_plus)
        self.step_sizes = (step_min, step_max)

    def slot_init(self, slot: str) -> float:
        return -1.0 if slot == "step_size" else 0.0

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate, *self.etas, *self.step_sizes)

    def kernel_math(self) -> Any:
        return _rprop
