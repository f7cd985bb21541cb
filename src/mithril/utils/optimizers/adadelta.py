"""Adadelta; torch.optim conventions by default (optax's are the same), Keras's or MLX's on
request."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive
from .elementwise import sqrt
from .sgd import CONVENTIONS, check_convention


def _adadelta(p, g, v, u, lr, rho, rhoc, eps):
    v = v * rho + rhoc * g * g                 # torch: square_avg.mul_(ρ).addcmul_(g, g, 1 − ρ)
    d = sqrt(u + eps) / sqrt(v + eps) * g      # RMS[Δ]/RMS[g] · g
    u = u * rho + rhoc * d * d                 # torch: acc_delta
    return p - lr * d, v, u


def _adadelta_mlx(p, g, v, u, lr, rho, rhoc, eps):
    v = rho * v + rhoc * (g * g)               # MLX's order of operations
    d = sqrt(u + eps) / sqrt(v + eps) * g
    u = rho * u + rhoc * (d * d)
    return p - lr * d, v, u


class Adadelta(Optimizer):
    """Adadelta (Zeiler, 2012) as torch.optim.Adadelta::

        v ← ρ·v + (1−ρ)·g²
        Δ = √(u + ε) / √(v + ε) · g
        u ← ρ·u + (1−ρ)·Δ²
        p ← p − lr·Δ

    Slots ``square_avg`` (v) and ``acc_delta`` (u), torch's names. ε is inside both square
    roots, as torch, optax.adadelta and Keras (the same update). The paper has no learning
    rate (lr = 1, torch's default); optax has no default lr, Keras defaults to lr 1e-3,
    ρ = 0.95, ε = 1e-7. ``rho`` may be anything in [0, 1] as in torch (ρ = 1 freezes both
    averages at 0: Δ = g).
    ``weight_decay`` is coupled L2 (``g ← g + wd·p``, torch and optax.adadelta), or with
    ``convention="keras"`` Keras's decoupled ``p ← p − lr·wd·p`` before the step (the
    update is the same in all three).

    ``convention="mlx"`` (``mlx.optimizers.AdaDelta``): the same update and defaults (ρ 0.9,
    ε 1e-6) in MLX's order of operations; MLX has no weight decay (coupled here) and no
    default learning rate (pass one: 1.0 here).
    """

    slots = ("square_avg", "acc_delta")

    def __init__(self, learning_rate: float = 1.0, rho: float = 0.9, epsilon: float = 1e-6,
                 weight_decay: float = 0.0, convention: str = "torch", **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.convention = check_convention(convention, (*CONVENTIONS, "mlx"))
        self.rho = check_positive("rho", rho)
        if self.rho > 1:
            raise ValueError(f"rho must be in [0, 1], got {rho!r}")
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)

    @property
    def decoupled_weight_decay(self) -> bool:  # type: ignore[override]
        return self.convention == "keras"

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate, self.rho, 1 - self.rho, self.epsilon)

    def kernel_math(self) -> Any:
        return _adadelta_mlx if self.convention == "mlx" else _adadelta
