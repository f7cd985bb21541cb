"""Dropout, as ``torch.nn.Dropout``, with masks that are the same on every backend."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .operator import Operator, backend_of


def _scaled_mask(xp: Any, keep: Any, scale: float, like: Any) -> Any:
    """``scale`` where ``keep``, 0 elsewhere, in ``like``'s dtype."""
    kind = backend_of(xp)
    if kind == "torch":
        return keep.to(like.dtype) * scale
    if kind == "jax":
        return keep.astype(like.dtype) * xp.asarray(scale, like.dtype)
    return keep.astype(like.dtype) * like.dtype.type(scale)


class Dropout(Operator):
    """Training mode: y = x · m / (1 − p), with m ∈ {0, 1} drawn per element, P(m = 0) = p;
    inference mode: y = x. The gradient is g · m / (1 − p), with the same mask.

    ``p = 0`` is the identity in both modes and ``p = 1`` gives zeros in training mode (x · 0,
    as torch). The mask is a hash of (seed, step, block path, element index)
    (:mod:`mithril.models.context`): the same for a given seed and step on NumPy, JAX and
    torch, and ``P(m = 0)`` is ``p`` rounded to a multiple of 2⁻²⁴. No parameters, no state.
    """

    context = True
    random = True

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(p)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def mask(self, xp: Any, input: Any, ctx: Any) -> Any:
        """The factor y / x: 1/(1 − p) on kept elements, 0 on dropped ones."""
        return _scaled_mask(xp, ctx.keep_mask(input, self.p), 1.0 / (1.0 - self.p), input)

    def forward(self, xp: Any, input: Any, *, ctx: Any) -> Any:
        if not ctx.training or self.p == 0.0:
            return input
        if self.p == 1.0:
            return input * 0.0
        return input * self.mask(xp, input, ctx)

    def vjp(self, g, out, args, wrt):
        ctx = args["ctx"]
        if not ctx.training or self.p == 0.0:
            return {"input": g}
        if self.p == 1.0:
            return {"input": g * 0.0}
        return {"input": g * self.mask(np, args["input"], ctx)}

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"
