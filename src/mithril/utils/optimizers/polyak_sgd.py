"""SGD with the Polyak step size (``optax.polyak_sgd``): a loss-aware two-pass optimizer
(``needs_loss``, :mod:`.loss_aware`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Optimizer
from .checks import check_choice, check_positive, describe, to_float
from .elementwise import maximum, minimum, where

_VARIANTS = ("sps", "sps+")
#: optax's guard against a zero denominator: ``jnp.finfo(float).eps``
FLOAT_EPS = float(np.finfo(float).eps)


def _polyak_reduce(p, g, lr):
    return (g * g,)


def _polyak(p, g, lr, step):
    return (p - step * (lr * g),)


class PolyakSGD(Optimizer):
    """SGD with the Polyak step size (Loizou et al., 2021) as ``optax.polyak_sgd``; the
    step needs the loss: ``update(params, grads, state, loss=f)``, ``f`` the loss at
    ``params`` (optax's ``value=``)::

        u ← lr · g                                  (optax's sgd(learning_rate=scaling))
        γ ← min((f − f_min) / (‖u‖² + ε), max_learning_rate)    (0 where ‖u‖² + ε ≤ 2⁻⁵²)
        p ← p − γ · u

    ``learning_rate`` is optax's ``scaling`` (schedule it as any learning rate). As optax's
    code computes it, the norm is of the *scaled* update ``u``, over every parameter (a
    first, read-only pass; optax's docstring states ``s·min((f − f*)/(‖g‖² + ε), γ_max)``,
    which differs from its code unless s = 1): with ε = 0 and the cap not reached, the step
    is ``(f − f_min)/(lr·‖g‖²)·g``. ``variant="sps+"`` (Garrigos et al., 2023) takes
    ``max(f − f_min, 0)``. Defaults are optax's (all 1, f_min 0, ε 0; ``eps=`` is accepted
    for ``epsilon``). Parameter groups: each group's learning rate scales its ``u`` (as
    ``optax.chain(optax.multi_transform({...: optax.sgd(s_i)}), optax.scale_by_polyak())``),
    one γ for all. ``weight_decay`` is coupled L2 in front (``g ← g + wd·p``). torch 2.x and
    Keras 3 have none. The loss given is ``state.values["loss"]`` after the step.
    """

    needs_loss = True
    reductions = 1
    #: one γ for every parameter, computed between the passes from the optimizer's own
    step_wide = ("max_learning_rate", "f_min", "epsilon", "variant")

    def __init__(self, learning_rate: float = 1.0, max_learning_rate: float = 1.0,
                 f_min: float = 0.0, epsilon: float = 0.0, variant: str = "sps",
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.max_learning_rate = check_positive("max_learning_rate", max_learning_rate)
        self.f_min = to_float("f_min", f_min)
        if not np.isfinite(self.f_min):
            raise ValueError(f"f_min must be finite, got {describe(f_min)}")
        self.epsilon = check_positive("epsilon", epsilon)
        self.variant = check_choice("variant", variant, _VARIANTS)

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate,)

    def reduce_math(self) -> Any:
        return _polyak_reduce

    def kernel_math(self) -> Any:
        return _polyak

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        # arithmetic only: it also runs traced (the jitted JAX engine, optax_transformation)
        lr = scalars[0]
        sq = (lr * lr * sums[0]).sum() + self.epsilon  # ‖u‖² + ε, u = lr·g per tensor
        gap = values["loss"] - self.f_min
        if self.variant == "sps+":
            gap = maximum(gap, 0.0)
        small = sq <= FLOAT_EPS
        gamma = where(small, 0.0, minimum(gap / where(small, 1.0, sq), self.max_learning_rate))
        return (gamma,), tensors, dict(values)
