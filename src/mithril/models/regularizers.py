"""Regularizers for :meth:`TrainModel.add_regularization`: ``L1`` (Σ|x|) and ``L2`` (½·Σx²),
each a scalar of one ``input``, as in the published Mithril. The gradient of ``L1`` at
exactly 0 is 0 on every backend (torch's ``abs``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .operator import Operator, torch_of


class L2(Operator):
    """½·Σ input² (the coefficient is given to ``add_regularization``)."""

    def infer_shape(self, shapes):
        return ()

    def forward(self, xp: Any, input: Any) -> Any:
        return 0.5 * xp.sum(input * input)

    def vjp(self, g, out, args, wrt):
        return {"input": g * args["input"]}


class L1(Operator):
    """Σ |input| (the coefficient is given to ``add_regularization``)."""

    def infer_shape(self, shapes):
        return ()

    def forward(self, xp: Any, input: Any) -> Any:
        if xp is np or torch_of(xp) is not None:
            return xp.sum(abs(input))
        return xp.sum(input * xp.sign(input))  # jnp.abs has gradient 1 at 0; sign(0) = 0

    def vjp(self, g, out, args, wrt):
        return {"input": g * np.sign(args["input"])}
