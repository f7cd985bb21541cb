"""Statistics of a tensor along axes: ``Variance``, as ``torch.var`` and the published
Mithril's block of that name."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .half_precision import float32_forward, float32_vjp
from .operator import backend_of, stop_gradient
from .pointwise_losses import check_number
from .reductions import _Reduce


class Variance(_Reduce):
    """The variance of ``input`` over ``axis`` (None: every element; an int or a tuple of
    ints), sum((x − mean)²) / (N − correction) with N the number of elements reduced, as
    ``torch.var(input, dim=axis, correction=correction, keepdim=keepdim)``. The default
    ``correction`` is 0 (the population variance), as the published Mithril's and NumPy's
    ``ddof``; torch's default is 1 (pass ``correction=1`` for it). ``keepdim`` keeps the
    reduced axes with size 1. Where N − correction <= 0 the result is inf or NaN, as torch's.
    The gradient is 2·(x − mean) / (N − correction) times the output's cotangent."""

    def __init__(self, axis: int | tuple[int, ...] | None = None, keepdim: bool = False,
                 correction: float = 0.0) -> None:
        super().__init__(axis, keepdim)  # (axis and keepdim checked, as Sum's)
        self.correction = check_number("Variance", "correction", correction, 0.0)

    @float32_forward  # (a half-precision statistic accumulates in float32, as torch's)
    def forward(self, xp: Any, input: Any) -> Any:
        axes = self._axes(input.ndim)
        kind = backend_of(xp)
        if kind == "torch":
            if not axes:  # (torch's dim=() reduces every axis: here none, as NumPy's axis=())
                return xp.t.var(input.unsqueeze(-1), dim=-1, correction=self.correction)
            return xp.t.var(input, dim=axes, correction=self.correction, keepdim=self.keepdim)
        n = math.prod(input.shape[a] for a in axes)
        if kind == "jax" and n <= self.correction:  # (jnp.var: NaN where torch's is inf)
            # (the mean held: its gradient, Σ(x − mean) = 0, would be inf − inf here)
            centered = input - stop_gradient(xp, xp.mean(input, axis=axes, keepdims=True))
            ss = xp.sum(centered * centered, axis=axes, keepdims=self.keepdim)
            if n == self.correction:
                return ss / 0.0
            # the value ss / 0 (inf, or NaN at ss = 0), the gradient torch's 2·(x − mean) / (N − c)
            return ss / (n - self.correction) + stop_gradient(
                xp, ss / 0.0 - ss / (n - self.correction))
        with np.errstate(divide="ignore", invalid="ignore"):
            return xp.var(input, axis=axes, ddof=self.correction, keepdims=self.keepdim)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x = args["input"]
        axes = self._axes(x.ndim)
        n = math.prod(x.shape[a] for a in axes)
        g = self._keep(g, x)
        with np.errstate(divide="ignore", invalid="ignore"):
            # (the forward divides by max(0, N − correction), as torch's and NumPy's; torch's
            # gradient by N − correction, so 2 / (N − c) < 0 where N < c: 0 at one element)
            scale = 2.0 / (n - self.correction) if n != self.correction else np.inf
            return {"input": (g * scale) * (x - x.mean(axis=axes, keepdims=True))}

    def __repr__(self) -> str:
        return (f"Variance(axis={self.axis}, keepdim={self.keepdim}, "
                f"correction={self.correction})")

