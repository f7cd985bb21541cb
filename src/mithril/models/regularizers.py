"""Regularizers for :meth:`TrainModel.add_regularization`: ``L1`` (Σ|x|) and ``L2`` (½·Σx²),
each a scalar of one ``input``, as in the published Mithril. The gradient of ``L1`` at
exactly 0 (and at NaN) is 0 on every backend (torch's ``abs``). A half-precision input is
summed in float32 and the result rounded once (``half_precision``), so ½·Σx² of float16
values does not overflow at 65504."""

from __future__ import annotations

from typing import Any

import numpy as np

from .half_precision import float32_forward
from .operator import Operator, stop_gradient, torch_of


class L2(Operator):
    """½·Σ input² (the coefficient is given to ``add_regularization``)."""

    def infer_shape(self, shapes):
        return ()

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        return 0.5 * xp.sum(input * input)

    def vjp(self, g, out, args, wrt):
        return {"input": g * args["input"]}


class L1(Operator):
    """Σ |input| (the coefficient is given to ``add_regularization``)."""

    def infer_shape(self, shapes):
        return ()

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        if xp is np or torch_of(xp) is not None:
            return xp.sum(abs(input))
        # jnp.abs has gradient 1 at 0 (sign(0) = 0), and sign(NaN) NaN (torch's sgn 0)
        return xp.sum(input * stop_gradient(xp, xp.where(input == input, xp.sign(input), 0)))

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        return {"input": g * np.where(x == x, np.sign(x), 0)}  # torch's: 0 at NaN too
