"""Statistics of a tensor along axes: ``Variance``, as ``torch.var`` and the published
Mithril's block of that name."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .operator import Operator, ShapeError, backend_of
from .pointwise_losses import check_number


def _axes_arg(who: str, axis: Any) -> tuple[int, ...] | None:
    """``axis`` (None, an int or a sequence of distinct ints) as a tuple, or None."""
    if axis is None:
        return None
    items = (axis,) if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) else axis
    if not isinstance(items, (tuple, list)) or any(
            isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in items):
        raise TypeError(f"{who}: axis must be None, an int or a tuple of ints, got {axis!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"{who}: axis must not repeat an axis, got {axis!r}")
    return tuple(int(a) for a in items)


class Variance(Operator):
    """The variance of ``input`` over ``axis`` (None: every element; an int or a tuple of
    ints), sum((x − mean)²) / (N − correction) with N the number of elements reduced, as
    ``torch.var(input, dim=axis, correction=correction, keepdim=keepdim)``. The default
    ``correction`` is 0 (the population variance), as the published Mithril's and NumPy's
    ``ddof``; torch's default is 1 (pass ``correction=1`` for it). ``keepdim`` keeps the
    reduced axes with size 1. Where N − correction <= 0 the result is inf or NaN, as torch's.
    The gradient is 2·(x − mean) / (N − correction) times the output's cotangent."""

    def __init__(self, axis: int | tuple[int, ...] | None = None, keepdim: bool = False,
                 correction: float = 0.0) -> None:
        self.axis = _axes_arg("Variance", axis)
        if not isinstance(keepdim, (bool, np.bool_)):
            raise TypeError(f"Variance: keepdim must be a bool, got {keepdim!r}")
        self.keepdim = bool(keepdim)
        self.correction = check_number("Variance", "correction", correction, 0.0)

    def _axes(self, rank: int) -> tuple[int, ...]:
        if self.axis is None:
            return tuple(range(rank))
        bad = [a for a in self.axis if not -rank <= a < rank]
        if bad:
            raise ShapeError(f"Variance: axis {bad[0]} is out of range for an input of rank {rank}")
        axes = tuple(sorted(a % rank for a in self.axis))
        if len(set(axes)) != len(axes):
            raise ShapeError(f"Variance: axis {self.axis} names one axis twice for rank {rank}")
        return axes

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        axes = self._axes(len(s))
        if self.keepdim:
            return tuple(1 if i in axes else d for i, d in enumerate(s))
        return tuple(d for i, d in enumerate(s) if i not in axes)

    def forward(self, xp: Any, input: Any) -> Any:
        axes = self._axes(input.ndim)
        if backend_of(xp) == "torch":
            return xp.t.var(input, dim=axes, correction=self.correction, keepdim=self.keepdim)
        with np.errstate(divide="ignore", invalid="ignore"):
            return xp.var(input, axis=axes, ddof=self.correction, keepdims=self.keepdim)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        axes = self._axes(x.ndim)
        n = math.prod(x.shape[a] for a in axes)
        if not self.keepdim:
            g = np.expand_dims(g, axes)
        with np.errstate(divide="ignore", invalid="ignore"):
            # (the divisor max(0, N − correction), as torch's and NumPy's)
            scale = 2.0 / (n - self.correction) if n > self.correction else np.inf
            return {"input": (g * scale) * (x - x.mean(axis=axes, keepdims=True))}

    def __repr__(self) -> str:
        return (f"Variance(axis={self.axis}, keepdim={self.keepdim}, "
                f"correction={self.correction})")

