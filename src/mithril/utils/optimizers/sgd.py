"""Stochastic gradient descent with optional (Nesterov) momentum, torch.optim conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit


def _plain(p, g, lr):
    return (p - lr * g,)


def _momentum(p, g, b, lr, mu_t, c_t):
    b = mu_t * b + c_t * g
    return p - lr * b, b


def _nesterov(p, g, b, lr, mu_t, c_t, mu):
    b = mu_t * b + c_t * g
    return p - lr * (g + mu * b), b


class SGD(Optimizer):
    """SGD: ``p ← p − lr·u`` with, for momentum μ > 0 and dampening τ,

    ``b₁ = g`` on the first step (no dampening, as torch), then ``b ← μ·b + (1−τ)·g``;
    ``u = g + μ·b`` (Nesterov) or ``u = b``. ``weight_decay`` adds ``wd·p`` to ``g`` first.
    lr stays outside the buffer (torch), so changing lr mid-run rescales the whole step.

    "First step" is the optimizer's first step (one step count per state, as for every
    optimizer here): a parameter whose first gradient arrives later starts from ``b = 0``,
    so with dampening its first buffer is ``(1−τ)·g`` where torch, which counts per
    parameter, takes ``g``. Without dampening the two agree.
    """

    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.momentum = check_unit("momentum", momentum)
        self.dampening = check_positive("dampening", dampening)
        if self.dampening > 1:
            raise ValueError(f"dampening must be in [0, 1], got {dampening!r}")
        if check_flag("nesterov", nesterov) and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        self.nesterov = bool(nesterov)

    def slot_names(self) -> tuple[str, ...]:
        return ("momentum",) if self.momentum else ()

    def scalars(self, step: int) -> tuple[float, ...]:
        if not self.momentum:
            return (self.learning_rate,)
        first = step == 1
        mu_t, c_t = (0.0, 1.0) if first else (self.momentum, 1.0 - self.dampening)
        return (self.learning_rate, mu_t, c_t, self.momentum) if self.nesterov else \
            (self.learning_rate, mu_t, c_t)

    def kernel_math(self) -> Any:
        return _nesterov if self.nesterov else _momentum if self.momentum else _plain
