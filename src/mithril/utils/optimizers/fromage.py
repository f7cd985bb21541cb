"""Fromage (Frobenius matched gradient descent), optax conventions: a two-pass optimizer."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive
from .elementwise import sqrt, where


def _fromage_reduce(p, g, lr, step_scale, shrink, min_norm):
    return p * p, g * g


def _fromage(p, g, lr, step_scale, shrink, min_norm, ratio):
    # optax's chain: trust ratio, × −lr/√(1+lr²), + (1/√(1+lr²) − 1)·p, then p + u
    return (p + (step_scale * (g * ratio) + shrink * p),)


def _safe_norm(sq: Any, min_norm: float) -> Any:
    """optax ``numerics.safe_norm``: the norm, ``min_norm`` where it is not above it."""
    n = sqrt(sq)
    return where(n <= min_norm, min_norm, n)


class Fromage(Optimizer):
    """Fromage (Bernstein et al., 2020) as optax.fromage, per tensor::

        r ← max(‖p‖, m) / max(‖g‖, m)       (m = min_norm; r = 1 if a norm is 0, m = 0 only)
        p ← (p − lr·r·g) / √(1 + lr²)

    i.e. optax's ``scale_by_trust_ratio(min_norm)``, ``× −lr/√(1+lr²)`` and
    ``add_decayed_weights(1/√(1+lr²) − 1)``: the step keeps ‖p‖ from growing. The ratio
    needs each tensor's ‖p‖ and ‖g‖: a first, read-only pass sums their squares (see
    ``Optimizer.reductions``). A learning-rate schedule enters both factors, as optax's.
    Defaults: ``min_norm`` 1e-6 (optax); lr 0.01 (the paper's; optax has none).
    optax has no other weight decay: ``weight_decay`` here is coupled L2 (``g ← g + wd·p``
    before the ratio, optax.add_decayed_weights chained in front). torch 2.x and Keras 3
    have none.
    """

    reductions = 2

    def __init__(self, learning_rate: float = 0.01, min_norm: float = 1e-6,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.min_norm = check_positive("min_norm", min_norm)

    def scalars(self, step: int) -> tuple[float, ...]:
        lr = self.learning_rate
        root = sqrt(1 + lr * lr)
        # 1/√(1+lr²) − 1 without the cancellation of optax's ``mult − 1`` (it differs from
        # optax's by an ulp of 1, not of the result: the same step), so that the traced
        # scalars (an optax transformation's) agree with the host's to their precision
        # min_norm is a scalar column (not read from self): a parameter group's own applies
        return (lr, -1 * (lr * (1 / root)), -(lr * lr) / (root * (1 + root)), self.min_norm)

    def reduce_math(self) -> Any:
        return _fromage_reduce

    def kernel_math(self) -> Any:
        return _fromage

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        pn, un = (_safe_norm(s, scalars[3]) for s in sums)  # (each tensor's group's min_norm)
        ratio = where((pn == 0) | (un == 0), 1.0, 1.0 * pn / (un + 0.0))
        return (ratio,), tensors, values
