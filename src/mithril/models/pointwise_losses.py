"""Elementwise losses of the published Mithril: ``AbsoluteError``, ``QuantileLoss``,
``HingeLoss`` and ``QuadHingeLoss``. Each takes ``input`` and ``target`` of one shape (both
differentiable) and ``reduction``: "none" (default, as the published Mithril: one loss per
element), "mean" or "sum".

Where a loss is a maximum of two branches that meet (the hinge's margin exactly 1, the
quantile loss's error exactly 0), the gradient there is the mean of the two branches' slopes,
as ``torch.maximum`` and ``jnp.maximum`` split a tie, and as the published Mithril's
results give."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .half_precision import accumulate
from .operator import Operator, backend_of, div_count, functional_of, pair_shape, unbroadcast

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(who: str, reduction: Any) -> str:
    """``reduction`` if it is one of :data:`REDUCTIONS`, else a ``ValueError`` naming it."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{who}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_number(who: str, name: str, value: Any, lo: float | None = None,
                 hi: float | None = None, open_lo: bool = False) -> float:
    """``value`` as a float if it is a finite real number in the range given, else a
    ``ValueError`` naming ``name``."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if open_lo else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rng = "" if lo is None else (f" {'>' if open_lo else '>='} {lo:g}" if hi is None
                                     else f" in [{lo:g}, {hi:g}]")
        raise ValueError(f"{who}: {name} must be a finite number{rng}, got {value!r}")
    return float(value)


def reduce(xp: Any, loss: Any, reduction: str) -> Any:
    """The elementwise ``loss`` reduced by ``reduction`` (a half-precision mean or sum is
    accumulated in float32, as torch's)."""
    if reduction == "none":
        return loss
    return accumulate(xp.mean if reduction == "mean" else xp.sum, loss)


def elementwise_cotangent(g: Any, shape: tuple[int, ...], reduction: str) -> Any:
    """The cotangent of each element of the unreduced loss (of ``shape``) for the
    cotangent ``g`` of the reduced one."""
    if reduction == "none":
        return g
    n = math.prod(shape)
    return np.broadcast_to(div_count(g, max(n, 1)) if reduction == "mean" else g, shape)


def maximum(xp: Any, a: Any, b: Any) -> Any:
    """max(a, b) elementwise with the gradient of a tie split in half on every backend
    (torch.maximum's and jnp.maximum's rule); ``b`` may be a Python number."""
    if backend_of(xp) == "torch" and not isinstance(b, xp.t.Tensor):
        b = xp.t.full_like(a, b)  # (the namespace's maximum with a number is clamp_min)
    return xp.maximum(a, b)


def tie_slope(m: np.ndarray) -> np.ndarray:
    """d max(m, 0) / dm: 1 above 0, 0 below, ½ at 0."""
    return np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0)).astype(m.dtype, copy=False)


class _PairLoss(Operator):
    """A loss of ``input`` and ``target`` (one shape), elementwise, then reduced."""

    inputs = ("input", "target")
    reduction: str = "none"

    def infer_shape(self, shapes):
        s = pair_shape(shapes, type(self).__name__)
        return s if self.reduction == "none" else ()

    def _elementwise(self, xp: Any, input: Any, target: Any) -> Any:
        raise NotImplementedError

    def _partials(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """d loss / d input and d loss / d target, elementwise (NumPy)."""
        raise NotImplementedError

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        return reduce(xp, self._elementwise(xp, input, target), self.reduction)

    def vjp(self, g, out, args, wrt):
        x, t = args["input"], args["target"]
        shape = np.broadcast_shapes(np.shape(x), np.shape(t))  # (the target may broadcast)
        ge = elementwise_cotangent(g, shape, self.reduction)
        dx, dt = self._partials(x, t)
        return {k: unbroadcast(np.broadcast_to(ge * (dx if k == "input" else dt), shape),
                               np.shape(args[k])) for k in wrt}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"


class AbsoluteError(_PairLoss):
    """|input − target| per element, as ``F.l1_loss(input, target, reduction="none")``
    (``reduction="mean"`` is torch's default L1 loss). The gradient in ``input`` is
    sign(input − target), 0 where they are equal (as torch and the published NumPy / torch
    backends; the published JAX backend gives 1 there)."""

    def __init__(self, reduction: str = "none") -> None:
        self.reduction = check_reduction("AbsoluteError", reduction)

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.l1_loss(input, target, reduction=self.reduction)
        return super().forward(xp, input, target)

    def _elementwise(self, xp, input, target):
        d = input - target
        return d * xp.sign(d)  # |d| whose gradient is sign(d): JAX's abs has 1 at 0

    def _partials(self, x, t):
        s = np.sign(x - t)
        return s, -s


class QuantileLoss(_PairLoss):
    """The pinball loss of quantile q: with e = target − input, per element,

        max(q·e, (q − 1)·e)   (q·e for e >= 0, (q − 1)·e for e < 0)

    as the published Mithril's ``QuantileLoss(quantile=0.5)``; torch has none (a direct
    expression with ``torch.maximum`` is the reference). The gradient in ``input`` is −q for
    e > 0, 1 − q for e < 0, and ½ − q at e = 0 (the tie split). ``quantile`` is a number
    in [0, 1]."""

    def __init__(self, quantile: float = 0.5, reduction: str = "none") -> None:
        self.quantile = check_number("QuantileLoss", "quantile", quantile, 0.0, 1.0)
        self.reduction = check_reduction("QuantileLoss", reduction)

    def _elementwise(self, xp, input, target):
        e = target - input
        return maximum(xp, self.quantile * e, (self.quantile - 1) * e)

    def _partials(self, x, t):
        q, e = self.quantile, t - x
        # d/de: q where q·e wins (e > 0), q − 1 where (q − 1)·e wins, their mean at a tie
        de = np.where(e > 0, q, np.where(e < 0, q - 1, q - 0.5)).astype(x.dtype, copy=False)
        return -de, de

    def __repr__(self) -> str:
        return f"QuantileLoss(quantile={self.quantile}, reduction={self.reduction!r})"


class HingeLoss(_PairLoss):
    """The hinge loss max(0, 1 − target·input) per element, for targets ±1, as the
    published Mithril's ``HingeLoss`` (torch's ``F.hinge_embedding_loss`` is a different
    loss; a direct expression with ``torch.maximum`` is the reference). The gradient in
    ``input`` is −target where the margin target·input < 1, 0 where it is > 1, and
    −target/2 at exactly 1 (the tie split)."""

    def __init__(self, reduction: str = "none") -> None:
        self.reduction = check_reduction(type(self).__name__, reduction)

    def _elementwise(self, xp, input, target):
        return maximum(xp, 1.0 - target * input, 0.0)

    def _partials(self, x, t):
        s = tie_slope(1.0 - t * x)
        return -t * s, -x * s


class QuadHingeLoss(HingeLoss):
    """The squared hinge loss max(0, 1 − target·input)² per element, as the published
    Mithril's ``QuadHingeLoss``; the gradient in ``input`` is −2·target·max(0, 1 −
    target·input) (0 at the kink, where both sides' slopes are 0)."""

    def _elementwise(self, xp, input, target):
        h = super()._elementwise(xp, input, target)
        return h * h

    def _partials(self, x, t):
        h2 = 2 * np.maximum(1.0 - t * x, 0.0)
        return -t * h2, -x * h2
