"""Elementwise primitives of the published Mithril: ``Sine``, ``Cosine``, ``StopGradient``,
``StableReciprocal`` and ``NormModifier``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .operator import Operator, backend_of, stop_gradient
from .pointwise_losses import check_number
from .primitives import _abs

#: the published Mithril's stable-reciprocal threshold per float dtype (about sqrt of the
#: smallest normal number: 1/threshold² stays finite)
_THRESHOLDS = {"float64": 1.4916681462400413e-153, "float32": 1.0842021951e-19,
               "float16": 0.007812809993849843}


def _full(xp: Any) -> Any:
    """The array module for ``xp``: torch itself on the torch backend (its forwards'
    namespace has only a few NumPy names), else ``xp`` (NumPy or ``jax.numpy``)."""
    return xp.t if backend_of(xp) == "torch" else xp


class Sine(Operator):
    """sin(x) elementwise, as ``torch.sin``; the gradient is cos(x)."""

    vjp_ignores = frozenset({"output"})

    def forward(self, xp: Any, input: Any) -> Any:
        return _full(xp).sin(input)

    def vjp(self, g, out, args, wrt):
        return {"input": g * np.cos(args["input"])}


class Cosine(Operator):
    """cos(x) elementwise, as ``torch.cos``; the gradient is −sin(x)."""

    vjp_ignores = frozenset({"output"})

    def forward(self, xp: Any, input: Any) -> Any:
        return _full(xp).cos(input)

    def vjp(self, g, out, args, wrt):
        return {"input": -g * np.sin(args["input"])}


class StopGradient(Operator):
    """The input as is, with a gradient of 0: ``torch.Tensor.detach`` /
    ``jax.lax.stop_gradient``. What is computed from its output does not differentiate into
    what it was computed from."""

    vjp_ignores = frozenset({"output"})

    def forward(self, xp: Any, input: Any) -> Any:
        return stop_gradient(xp, input)

    def vjp(self, g, out, args, wrt):
        return {"input": np.zeros_like(args["input"])}


class StableReciprocal(Operator):
    """1/x, continued linearly inside (−c, c) so that it stays finite at 0, as the published
    Mithril's ``StableReciprocal``: for |x| >= c it is 1/x; for |x| < c it is the tangent of
    1/x at c (for x >= 0, 0 included) or at −c (for x < 0):

        2/c − x/c²  (0 <= x < c)        −2/c − x/c²  (−c < x < 0)

    whose gradient is −1/c² (−1/x² outside). ``threshold`` c > 0 defaults to the published
    one of the input's dtype (1.4916681462400413e-153 in float64, about 10·sqrt of its
    smallest normal number; 1.0842e-19 in float32). Outside (−c, c) it equals
    ``torch.reciprocal``; at 0 it is 2/c, jumping to −2/c just below 0."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = None if threshold is None else check_number(
            "StableReciprocal", "threshold", threshold, 0.0, open_lo=True)

    def _c(self, dtype: Any) -> float:
        if self.threshold is not None:
            return self.threshold
        name = str(dtype).rsplit(".", 1)[-1]
        return _THRESHOLDS.get(name, _THRESHOLDS["float32"])

    def forward(self, xp: Any, input: Any) -> Any:
        c, xp = self._c(input.dtype), _full(xp)
        inside = xp.abs(input) < c
        one = xp.ones_like(input)  # (torch makes float32 of two bare numbers: 2/c overflows)
        side = xp.where(input < 0, -one, one) * (2.0 / c)
        # (the reciprocal of 1 inside: its unpicked gradient stays finite on JAX and torch;
        # the unpicked x/c² of a large x overflows)
        with np.errstate(over="ignore"):
            return xp.where(inside, side - input / (c * c), 1 / xp.where(inside, 1.0, input))

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        c = self._c(x.dtype)
        inside = np.abs(x) < c
        with np.errstate(divide="ignore", over="ignore"):
            d = np.where(inside, -1 / (c * c), -1 / np.square(np.where(inside, 1.0, x)))
        return {"input": g * d.astype(x.dtype, copy=False)}

    def __repr__(self) -> str:
        return "StableReciprocal()" if self.threshold is None else \
            f"StableReciprocal(threshold={self.threshold})"



class NormModifier(Operator):
    """The published Mithril's ``NormModifier``: a norm order n mapped into [1, 5] by a
    triangle wave of period 8,

        4·(1 − 2·|u|) + 1,   u = ((n − 1) mod 8)/8 − ½

    (1 at n = 1, 5 at n = 5, modulo as Python's and ``torch.remainder``: the sign of the
    divisor). The gradient is −sign(u): 0 at the peaks n = 5 + 8k, as torch's |·|."""

    vjp_ignores = frozenset({"output"})

    def forward(self, xp: Any, input: Any) -> Any:
        u = ((input - 1.0) % 8) / 8 - 0.5
        return 4.0 * (1.0 - 2.0 * _abs(xp, u)) + 1.0

    def vjp(self, g, out, args, wrt):
        return {"input": -g * np.sign(((args["input"] - 1.0) % 8) / 8 - 0.5)}
