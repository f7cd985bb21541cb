"""AdaGrad; torch.optim conventions by default, optax's, Keras's or MLX's on request."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive
from .elementwise import sqrt
from .sgd import BY_CONVENTION, CONVENTIONS, check_convention


def _adagrad(p, g, s, clr, eps):
    s = s + g * g
    return p - clr * (g / (sqrt(s) + eps)), s


def _adagrad_in(p, g, s, clr, eps):  # optax / Keras: ε inside the square root
    s = s + g * g
    return p - clr * g / sqrt(s + eps), s


def _adagrad_mlx(p, g, s, clr, eps):
    s = s + g * g
    return p - clr * g / (sqrt(s) + eps), s    # MLX: (lr·g)/(√s + ε)


class AdaGrad(Optimizer):
    """AdaGrad as torch.optim.Adagrad::

        s ← s + g²;   p ← p − lr/(1 + (t−1)·lr_decay) · g / (√s + ε)

    ε outside the sqrt; ``initial_accumulator_value`` defaults to 0 (torch, MLX; optax and
    Keras start at 0.1 with ε inside the sqrt). Default ε here is the guide's 1e-8
    (torch 1e-10).

    ``convention`` (default ``"torch"``, the above); ``"optax"`` (``optax.adagrad``) and
    ``"keras"`` (``keras.optimizers.Adagrad``) share one update, **ε inside the square root**
    and an **accumulator starting at 0.1** (the default of ``initial_accumulator_value``
    follows the convention)::

        s ← s + g²;   p ← p − lr · g / √(s + ε)

    Neither has ``lr_decay`` (refused). ``weight_decay``: coupled for optax (as
    ``optax.chain(add_decayed_weights(wd), adagrad(...))``), Keras's decoupled
    ``p ← p − lr·wd·p`` before the step for Keras. Their default ε is 1e-7.

    ``"mlx"`` (``mlx.optimizers.Adagrad``) is torch's update (ε outside the root, ``s`` from
    0) in MLX's order of operations; MLX has no ``lr_decay`` nor
    ``initial_accumulator_value`` (refused) and no weight decay (coupled here, as torch's).
    """

    def __init__(self, learning_rate: float = 0.01, epsilon: float = 1e-8,
                 initial_accumulator_value: float = BY_CONVENTION, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, convention: str = "torch", **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.convention = check_convention(convention, (*CONVENTIONS, "mlx"))
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        if initial_accumulator_value is BY_CONVENTION:
            initial_accumulator_value = 0.0 if convention in ("torch", "mlx") else 0.1
        self.initial_accumulator_value = check_positive("initial_accumulator_value",
                                                        initial_accumulator_value)
        if self.initial_accumulator_value and convention == "mlx":
            raise ValueError(f"initial_accumulator_value={initial_accumulator_value!r}: MLX's "
                             f"Adagrad starts its sum at 0 (convention='mlx')")
        self.lr_decay = check_positive("lr_decay", lr_decay)
        if self.lr_decay and convention != "torch":
            raise ValueError(f"lr_decay={lr_decay!r}: {convention} AdaGrad has no lr_decay "
                             f"(convention='torch' has)")

    slots = ("sum",)

    @property
    def decoupled_weight_decay(self) -> bool:  # type: ignore[override]
        return self.convention == "keras"

    def slot_init(self, slot: str) -> float:
        return self.initial_accumulator_value

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate / (1 + (step - 1) * self.lr_decay), self.epsilon)

    def kernel_math(self) -> Any:
        return {"torch": _adagrad, "mlx": _adagrad_mlx}.get(self.convention, _adagrad_in)
