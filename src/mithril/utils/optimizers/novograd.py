"""NovoGrad (layer-wise second moments), optax conventions: a two-pass optimizer."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive, check_unit
from .elementwise import sqrt, where


def _novograd_reduce(p, g, m, lr, b1, wd, b2, eps_root, eps):
    return (g * g,)


def _novograd(p, g, m, lr, b1, wd, b2, eps_root, eps, denom):
    m = b1 * m + (g / denom + wd * p)
    return p - lr * m, m


class Novograd(Optimizer):
    """NovoGrad (Ginsburg et al., 2019) as optax.novograd::

        ν ← ‖g‖²  (first step)       ν ← β₂·ν + (1−β₂)·‖g‖²   (one ν per tensor)
        m ← β₁·m + g / (√(ν + ε_root) + ε) + wd·p
        p ← p − lr·m

    ``ν`` is a tensor slot (one value per parameter tensor): the first pass sums g² per
    tensor, the second applies the update. optax's conventions, kept: no bias correction,
    no (1−β₁) factor on the new term, and weight decay inside the moment (so it is scaled
    by lr and carried by the momentum). Defaults are optax's (β₂ 0.25, ε 1e-6).
    """

    slots = ("m",)
    tensor_slots = ("nu",)
    reductions = 1
    weight_decay_in_math = True

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.9, beta2: float = 0.25,
                 epsilon: float = 1e-6, eps_root: float = 0.0, weight_decay: float = 0.0,
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon)
        self.eps_root = check_positive("eps_root", eps_root)

    def scalars(self, step: int) -> tuple[float, ...]:
        # β₂ and the ε's are columns read between the passes (not self's): a parameter
        # group's own apply to its tensors (they were silently the optimizer's)
        return (self.learning_rate, self.beta1, self.weight_decay, self.beta2, self.eps_root,
                self.epsilon)

    def reduce_math(self) -> Any:
        return _novograd_reduce

    def kernel_math(self) -> Any:
        return _novograd

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        (sq,) = sums
        b2, eps_root, eps = scalars[3], scalars[4], scalars[5]
        nu = where(step == 1, sq, b2 * tensors["nu"] + (1 - b2) * sq)
        return (sqrt(nu + eps_root) + eps,), {"nu": nu}, values
