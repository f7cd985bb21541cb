"""Adamax; torch.optim conventions by default (optax's are the same), Keras's or MLX's on
request."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive, check_unit
from .elementwise import abs_, maximum
from .sgd import BY_CONVENTION, CONVENTIONS, check_convention, check_decoupled


def _adamax(p, g, m, u, lr, b1c, b2, eps, clr):
    m = m + b1c * (g - m)                  # torch: m.lerp_(g, 1 − β₁)
    u = maximum(u * b2, abs_(g) + eps)     # torch: max(β₂·u, |g| + ε)
    return p - clr * m / u, m, u           # torch: p.addcdiv_(m, u, −clr): (−clr·m)/u


def _adamax_keras(p, g, m, u, lr, b1c, b2, eps, clr):
    m = m + b1c * (g - m)
    u = maximum(u * b2, abs_(g))           # Keras: ε out of the max, added to u below
    return p - clr * m / (u + eps), m, u


def _adamax_mlx(p, g, m, u, lr, b1, b1c, b2, eps):
    m = b1 * m + b1c * g                   # MLX's order of operations
    u = maximum(b2 * u, abs_(g))
    return p - lr * m / (u + eps), m, u    # MLX: no bias correction


class Adamax(Optimizer):
    """Adamax (Kingma & Ba, the ∞-norm variant of Adam) as torch.optim.Adamax::

        m ← β₁·m + (1−β₁)·g        u ← max(β₂·u, |g| + ε)
        p ← p − lr/(1−β₁ᵗ) · m / u

    Slots ``m`` and ``u`` (torch's ``exp_avg`` and ``exp_inf``). ε is added to |g| inside
    the max, as torch and optax.adamax. ``weight_decay`` is coupled L2 (``g ← g + wd·p``,
    torch; optax: ``add_decayed_weights`` in front). Defaults are torch's: lr 2e-3,
    β = (0.9, 0.999), ε = 1e-8 (optax has no default lr; Keras: lr 1e-3, ε 1e-7).

    ``convention="keras"`` (``keras.optimizers.Adamax``): ``u ← max(β₂·u, |g|)`` and
    ``p ← p − lr/(1−β₁ᵗ) · m / (u + ε)`` (apart where |g| is about ε or smaller), with
    Keras's decoupled ``weight_decay``,
    ``p ← p − lr·wd·p`` before the step. ``"optax"`` is the default's update.
    ``convention="mlx"`` (``mlx.optimizers.Adamax``): Keras's ε outside the max and **no bias
    correction**, ``p ← p − lr·m/(u + ε)`` (larger first steps: m starts at 0), coupled
    ``weight_decay`` (MLX's Adamax has none).

    ``decoupled_weight_decay=True`` (default: True for ``"keras"`` only; False is refused
    there) is optax.adamaxw: ``p ← p − lr·(m̂/u + wd·p)``, i.e. ``p ← p·(1 − lr·wd)`` then
    the step, on every tensor unless ``weight_decay_mask`` / parameter groups say otherwise
    (optax's ``mask=None``: all, biases and scalars too). optax.adamaxw's default
    ``weight_decay`` is 1e-4: pass it (0 here, the plain Adamax's). torch has no AdamaxW.

    torch's ``maximize`` / ``foreach`` / ``capturable`` / ``differentiable`` are not
    arguments: negate the loss to maximise; the fused kernels choose the loop.
    """

    slots = ("m", "u")

    def __init__(self, learning_rate: float = 2e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float = 0.0, convention: str = "torch",
                 decoupled_weight_decay: bool = BY_CONVENTION, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.convention = check_convention(convention, (*CONVENTIONS, "mlx"))
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        # an instance attribute: the engines read opt.decoupled_weight_decay
        self.decoupled_weight_decay = check_decoupled(self.convention, decoupled_weight_decay)

    def scalars(self, step: int) -> tuple[float, ...]:
        lr = self.learning_rate
        if self.convention == "mlx":
            return (lr, self.beta1, 1 - self.beta1, self.beta2, self.epsilon)
        return (lr, 1 - self.beta1, self.beta2, self.epsilon, lr / (1 - self.beta1**step))

    def kernel_math(self) -> Any:
        return {"keras": _adamax_keras, "mlx": _adamax_mlx}.get(self.convention, _adamax)
