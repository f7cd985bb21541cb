"""LARS (layer-wise adaptive rate scaling), optax conventions: a two-pass optimizer."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit
from .elementwise import where
from .lamb import trust_ratio


def _lars_reduce(p, g, m, lr, mu, nesterov, c, eps):
    return p * p, g * g


def _lars(p, g, m, lr, mu, nesterov, c, eps, ratio):
    u = -lr * (ratio * g)
    m = u + mu * m
    # a select, not p + x·n + m·(1 − n): numba typed 1 − n as float64 (an int and a float32)
    # and ran the whole float32 step in float64, unvectorised (2x slower). engines/literals
    # now mends such math, but built-in math stays literal-free (tests/test_kernels.py), so
    # its kernels need no rewrite
    return where(nesterov != 0, p + (u + mu * m), p + m), m


class LARS(Optimizer):
    """LARS (You et al., 2017) as optax.lars::

        u ← g + wd·p
        u ← c·‖p‖ / (‖u‖ + ε) · u          (per tensor; ratio 1 if a norm is 0)
        m ← −lr·u + μ·m                     p ← p + m  (Nesterov: p ← p − lr·u + μ·m)

    The first pass sums ‖p‖² and ‖u‖² per tensor, the second applies the update. optax's
    conventions: the trust coefficient ``c`` (default 0.001) multiplies the ratio, the
    momentum buffer holds lr-scaled updates (``trace`` after ``scale_by_learning_rate``),
    weight decay is coupled (added to the gradient before the ratio). Exclude biases and
    norms from decay and from the ratio with parameter groups, e.g.
    ``param_groups=[{"params": r"bias|norm", "weight_decay": 0.0, "trust_coefficient":
    None}]`` (``trust_coefficient=None``: no trust ratio for that group, optax's
    ``trust_ratio_mask``; optax's ``weight_decay_mask`` is ``weight_decay_mask`` here).
    """

    slots = ("m",)
    reductions = 2
    #: ε is in the trust ratio of two norms (ratio 1 where one is 0), not in a float16
    #: element's denominator (checks.check_update)
    epsilon_elementwise = False

    def __init__(self, learning_rate: float = 1e-3, momentum: float = 0.9,
                 trust_coefficient: float | None = 0.001, epsilon: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.momentum = check_unit("momentum", momentum)
        self.trust_coefficient = (None if trust_coefficient is None else
                                  check_positive("trust_coefficient", trust_coefficient, False))
        self.epsilon = check_positive("epsilon", epsilon)
        self.nesterov = check_flag("nesterov", nesterov)

    def scalars(self, step: int) -> tuple[float, ...]:
        # a negative coefficient marks "no trust ratio" (None) in the per-tensor table
        c = -1.0 if self.trust_coefficient is None else self.trust_coefficient
        return (self.learning_rate, self.momentum, float(self.nesterov), c, self.epsilon)

    def reduce_math(self) -> Any:
        return _lars_reduce

    def kernel_math(self) -> Any:
        return _lars

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        c, eps = scalars[3], scalars[4]
        return (where(c < 0, 1.0, trust_ratio(sums[0], sums[1], c, eps)),), tensors, values
