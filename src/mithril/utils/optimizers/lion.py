"""Lion (EvoLved Sign Momentum), optax conventions by default, MLX's on request."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba.extending import overload

from .base import Optimizer
from .checks import check_choice, check_mu_dtype, check_positive, check_unit
from .elementwise import abs_, sign, where
from .sgd import BY_CONVENTION, check_convention

_MODES = ("hard", "smooth", "refined")


def tanh(x: Any) -> Any:
    """``tanh`` of a NumPy, torch or JAX array (and in numba kernels), for ``mode="smooth"``
    (elementwise.py has no tanh: it is Lion's only use)."""
    mod = type(x).__module__.split(".", 1)[0]
    if mod == "torch":
        import torch

        return torch.tanh(x)
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.tanh(x)
    return np.tanh(x)


@overload(tanh)
def _tanh_nb(x):  # pragma: no cover - compiled by numba
    return lambda x: np.tanh(x)


def _lion(p, g, m, lr, b1, b1c, b2, b2c):
    u = sign(b1c * g + b1 * m)      # interpolate with the *old* momentum, then take the sign
    m = b2 * m + b2c * g
    return p - lr * u, m


def _lion_smooth(p, g, m, lr, b1, b1c, b2, b2c, sb):
    u = tanh(sb * (b1c * g + b1 * m))
    m = b2 * m + b2c * g
    return p - lr * u, m


def _lion_refined(p, g, m, lr, b1, b1c, b2, b2c):
    x = b1c * g + b1 * m
    u = where(abs_(x) < 1.0, x, sign(x))  # linear below 1, the sign above (optax's)
    m = b2 * m + b2c * g
    return p - lr * u, m


def _lion_mu(p, g, m, lr, b1, b1c, b2, b2c, wd):
    u = sign(b1c * g + b1 * m)
    m = b2 * m + b2c * g
    return p + (-lr) * (u + wd * p), m             # optax.lion: −lr·(u + wd·p)


def _lion_smooth_mu(p, g, m, lr, b1, b1c, b2, b2c, sb, wd):
    u = tanh(sb * (b1c * g + b1 * m))
    m = b2 * m + b2c * g
    return p + (-lr) * (u + wd * p), m


def _lion_refined_mu(p, g, m, lr, b1, b1c, b2, b2c, wd):
    x = b1c * g + b1 * m
    u = where(abs_(x) < 1.0, x, sign(x))
    m = b2 * m + b2c * g
    return p + (-lr) * (u + wd * p), m


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
    ``mu_dtype`` (optax's; None: the parameters' dtype): ``m`` kept in that dtype between
    steps (``optax.tree.cast``), computed in the promoted dtype in optax's order (β·m in
    m's own dtype, a weak-typed scalar), the decay as optax's ``−lr·(u + wd·p)``; such a
    state takes the per-tensor array engine (see :class:`~.adam.Adam`).

    ``mode`` (optax.scale_by_lion's, default ``"hard"``, the above): ``"smooth"`` takes
    u ← tanh(``smooth_beta``·x) for x = β₁·m + (1−β₁)·g, ``"refined"`` u ← x where |x| < 1,
    else sign(x) (i.e. x clipped to [−1, 1]).

    ``convention`` (default ``"optax"``, the above) or ``"mlx"`` (``mlx.optimizers.Lion``):
    the same update, MLX's defaults (``weight_decay=0``; MLX has no default learning rate),
    ``mode="hard"`` only (MLX has no other; refused).
    """

    decoupled_weight_decay = True
    slots = ("m",)
    step_wide = ("mu_dtype",)  # (one dtype per slot buffer: not a group's)

    def __init__(self, learning_rate: float = 1e-4, beta1: float = 0.9, beta2: float = 0.99,
                 weight_decay: float = BY_CONVENTION, mode: str = "hard",
                 smooth_beta: float = 1.0, convention: str = "optax", mu_dtype: Any = None,
                 **options: Any) -> None:
        convention = check_convention(convention, ("optax", "mlx"))
        if weight_decay is BY_CONVENTION:
            weight_decay = 0.0 if convention == "mlx" else 1e-3
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.mu_dtype = check_mu_dtype(mu_dtype)
        self.convention = convention
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.mode = check_choice("mode", mode, _MODES)
        if convention == "mlx" and self.mode != "hard":
            raise ValueError(f"mode={mode!r}: MLX's Lion has only the sign (mode='hard', "
                             f"convention='mlx')")
        self.smooth_beta = check_positive("smooth_beta", smooth_beta, allow_zero=False)

    def rule(self) -> tuple[Any, ...]:
        return (*super().rule(), self.mu_dtype)  # (the dtype of m's buffer: not changed live)

    @property
    def weight_decay_in_math(self) -> bool:  # type: ignore[override]
        """optax's decay inside the step (``−lr·(u + wd·p)``), with ``mu_dtype``."""
        return self.mu_dtype is not None and self.convention == "optax"

    def scalars(self, step: int) -> tuple[float, ...]:
        head = (self.learning_rate, self.beta1, 1 - self.beta1, self.beta2, 1 - self.beta2)
        head = (*head, self.smooth_beta) if self.mode == "smooth" else head
        return (*head, self.weight_decay) if self.weight_decay_in_math else head

    def kernel_math(self) -> Any:
        if self.weight_decay_in_math:
            return {"hard": _lion_mu, "smooth": _lion_smooth_mu,
                    "refined": _lion_refined_mu}[self.mode]
        return {"hard": _lion, "smooth": _lion_smooth, "refined": _lion_refined}[self.mode]
