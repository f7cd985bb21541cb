"""Regression losses less sensitive to outliers than the squared error: ``HuberLoss`` and
``SmoothL1Loss``, as ``torch.nn.HuberLoss`` / ``F.huber_loss`` and ``torch.nn.SmoothL1Loss`` /
``F.smooth_l1_loss``. Both take ``input`` and ``target`` of one shape (both differentiable)
and ``reduction`` "mean" (default), "sum" or "none"."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .half_precision import accumulate
from .operator import Operator, div_count, functional_of, pair_shape, unbroadcast

_REDUCTIONS = ("mean", "sum", "none")


def _check(who: str, reduction: Any, name: str, value: Any, positive: bool) -> float:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating)) and math.isfinite(value) and (
        value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{who}: {name} must be a finite number {'>' if positive else '>='} 0, "
                         f"got {value!r}")
    return float(value)


class _ElementwiseLoss(Operator):
    """A loss of d = input − target per element, reduced by ``reduction``; subclasses give
    the elementwise loss and its derivative in d."""

    inputs = ("input", "target")
    reduction: str = "mean"

    def infer_shape(self, shapes):
        s = pair_shape(shapes, type(self).__name__)
        return s if self.reduction == "none" else ()

    def _elementwise(self, xp: Any, d: Any) -> Any:
        raise NotImplementedError

    def _slope(self, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        loss = self._elementwise(xp, input - target)
        if self.reduction == "none":
            return loss
        # (the elementwise loss in the input dtype, its reduction in float32: as torch)
        return accumulate(xp.mean if self.reduction == "mean" else xp.sum, loss)

    def vjp(self, g, out, args, wrt):
        d = args["input"] - args["target"]
        if self.reduction == "mean":
            g = div_count(g, max(d.size, 1))
        gi = self._slope(d) * g  # (the broadcast shape: summed back to each input's)
        return {k: unbroadcast(gi if k == "input" else -gi, np.shape(args[k])) for k in wrt}


class HuberLoss(_ElementwiseLoss):
    """Huber loss, as ``torch.nn.HuberLoss(reduction, delta)`` / ``F.huber_loss``: per element,
    with z = |input − target|,

        ½·z²               if z < delta
        delta·(z − ½·delta) otherwise

    quadratic near 0, linear (slope delta) beyond: the gradient in input is
    clip(input − target, −delta, delta). ``delta`` > 0 (a ``ValueError`` otherwise, as torch's
    RuntimeError). ``HuberLoss(delta=b) = b · SmoothL1Loss(beta=b)``."""

    def __init__(self, delta: float = 1.0, reduction: str = "mean") -> None:
        self.delta = _check("HuberLoss", reduction, "delta", delta, positive=True)
        self.reduction = reduction

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)
        return super().forward(xp, input, target)

    def _elementwise(self, xp: Any, d: Any) -> Any:
        z = xp.abs(d)
        return xp.where(z < self.delta, 0.5 * z * z, self.delta * (z - 0.5 * self.delta))

    def _slope(self, d: np.ndarray) -> np.ndarray:
        return np.clip(d, -self.delta, self.delta)

    def __repr__(self) -> str:
        return f"HuberLoss(delta={self.delta}, reduction={self.reduction!r})"


class SmoothL1Loss(_ElementwiseLoss):
    """Smooth L1 loss, as ``torch.nn.SmoothL1Loss(reduction, beta)`` / ``F.smooth_l1_loss``:
    per element, with z = |input − target|,

        ½·z² / beta   if z < beta
        z − ½·beta    otherwise

    the gradient in input clip((input − target) / beta, −1, 1). ``beta=0`` is the L1 loss z,
    gradient sign(input − target) (0 where they are equal), as torch; ``beta`` >= 0 (a
    ``ValueError`` otherwise, as torch's RuntimeError)."""

    def __init__(self, beta: float = 1.0, reduction: str = "mean") -> None:
        self.beta = _check("SmoothL1Loss", reduction, "beta", beta, positive=False)
        self.reduction = reduction

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)
        return super().forward(xp, input, target)

    def _elementwise(self, xp: Any, d: Any) -> Any:
        if self.beta == 0:  # L1 (the quadratic part's z²/0 would be NaN, its gradient too);
            return d * xp.sign(d)  # |d| with gradient sign(d): JAX's abs has 1 at 0, torch's 0
        z = xp.abs(d)
        return xp.where(z < self.beta, 0.5 * z * z / self.beta, z - 0.5 * self.beta)

    def _slope(self, d: np.ndarray) -> np.ndarray:
        if self.beta == 0:
            return np.sign(d)
        return np.where(d < -self.beta, -1.0, np.where(d > self.beta, 1.0, d / self.beta))

    def __repr__(self) -> str:
        return f"SmoothL1Loss(beta={self.beta}, reduction={self.reduction!r})"
