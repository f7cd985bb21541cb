"""``AlphaDropout`` and ``FeatureAlphaDropout``, as torch's: dropout that keeps a SELU
network's zero mean and unit variance.

Training mode, with m ∈ {0, 1} drawn per element (``FeatureAlphaDropout``: per (n, c),
shared by every position of that channel), P(m = 0) = p, α' = 1.7580993408473766 (SELU's
λ·α) and a = ((α'² p + 1)(1 − p))^(−1/2), as torch's ``_dropout_impl``:

    y = a·m·x + α'·a·(m − 1 + p)

(a dropped element becomes SELU's saturation value −α', and the affine map restores the mean
and variance); the gradient is a·m·g. Inference mode and p = 0: the identity; p = 1 in
training: zeros (torch's). The draws are Mithril's (the same on every backend,
:mod:`mithril.models.context`), not torch's generator's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .dropout import _scaled_mask
from .operator import Operator, ShapeError, fmt

#: SELU's λ·α, torch's ``alpha`` in ``_dropout_impl``
ALPHA = 1.7580993408473766


class AlphaDropout(Operator):
    """``nn.AlphaDropout(p=0.5)``: the module docstring's map with one draw per element."""

    context = True
    random = True
    feature = False

    def __init__(self, p: float = 0.5) -> None:
        who = type(self).__name__
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(p)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{who}: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.a = 1.0 / math.sqrt((ALPHA * ALPHA * self.p + 1) * (1 - self.p)) if self.p < 1 else 0.0

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if self.feature and s is not None and len(s) < 2:
            raise ShapeError(f"{type(self).__name__}: 'input' needs a channel axis (N, C, *), "
                             f"got {fmt(s)}")
        return s

    def _keep(self, xp: Any, input: Any, ctx: Any) -> Any:
        """m (1 kept, 0 dropped) in the input's dtype: per element, or per (n, c)."""
        like = input[(slice(None), slice(None), *(slice(0, 1),) * (input.ndim - 2))] \
            if self.feature else input
        return _scaled_mask(xp, ctx.keep_mask(like, self.p), 1.0, input)

    def _active(self, ctx: Any) -> bool:
        return ctx.training and self.p > 0.0

    def forward(self, xp: Any, input: Any, *, ctx: Any) -> Any:
        if not self._active(ctx):
            return input
        if self.p == 1.0:
            return input * 0.0
        m = self._keep(xp, input, ctx)
        return input * (m * self.a) + (m - (1 - self.p)) * (ALPHA * self.a)

    def vjp(self, g, out, args, wrt):
        ctx = args["ctx"]
        if not self._active(ctx):
            return {"input": g}
        if self.p == 1.0:
            return {"input": g * 0.0}
        return {"input": g * (self._keep(np, args["input"], ctx) * self.a)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class FeatureAlphaDropout(AlphaDropout):
    """``nn.FeatureAlphaDropout(p=0.5)``: the module docstring's map with one draw per
    channel of (N, C, *) (every position of a dropped channel gets −α'·a·(1 − p))."""

    feature = True
