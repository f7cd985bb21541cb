"""The published Mithril's regression models: ``PolynomialFeatures``, ``PolynomialRegression``
and ``LogisticRegression``."""

from __future__ import annotations

import math
from itertools import combinations_with_replacement
from typing import Any

import numpy as np

from .activations import Sigmoid
from .layers import Linear
from .model import Model
from .operator import Operator, ShapeError, backend_of, fmt


class PolynomialFeatures(Operator):
    """Every monomial of the columns of a (N, d) ``input`` of degree 1 to ``degree``: with
    x_0 = 1 prepended, the product x_i1·...·x_ik for each i1 <= ... <= ik (k = ``degree``)
    but the all-ones one, in ``itertools.combinations_with_replacement`` order, as the
    published Mithril's ``PolynomialFeatures(degree=2)`` and scikit-learn's
    ``PolynomialFeatures(degree, include_bias=False)``: for d = 2, degree 2, the columns are
    x1, x2, x1², x1·x2, x2². The output is (N, C(d + degree, degree) − 1). Each monomial is
    a product of columns (no powers), so its gradient is exact at 0 too."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, degree: int = 2) -> None:
        if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
            raise ValueError(f"PolynomialFeatures: degree must be an int >= 1, got {degree!r}")
        self.degree = int(degree)

    def _combos(self, d: int) -> np.ndarray:
        """(F, degree) column indices into [1, x_1 .. x_d] of each monomial."""
        combos = list(combinations_with_replacement(range(d + 1), self.degree))[1:]
        return np.array(combos, dtype=np.int64).reshape(len(combos), self.degree)

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        if len(s) != 2:
            raise ShapeError(f"PolynomialFeatures: 'input' must be (N, d), got shape {fmt(s)}")
        d = s[1]
        return (s[0], None if d is None else math.comb(d + self.degree, self.degree) - 1)

    def forward(self, xp: Any, input: Any) -> Any:
        combos = self._combos(input.shape[1])
        if backend_of(xp) == "torch":
            torch = xp.t
            data = torch.cat([torch.ones_like(input[:, :1]), input], dim=1)
            idx = [torch.as_tensor(combos[:, k], device=input.device) for k in range(self.degree)]
        else:
            data = xp.concatenate([xp.ones_like(input[:, :1]), input], axis=1)
            idx = [combos[:, k] for k in range(self.degree)]
        out = data[:, idx[0]]
        for k in range(1, self.degree):
            out = out * data[:, idx[k]]
        return out

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        combos = self._combos(x.shape[1])
        data = np.concatenate([np.ones_like(x[:, :1]), x], axis=1)
        cols = [data[:, combos[:, k]] for k in range(self.degree)]
        gd = np.zeros_like(data)
        for k in range(self.degree):
            part = g
            for j, c in enumerate(cols):
                if j != k:
                    part = part * c
            np.add.at(gd, (slice(None), combos[:, k]), part)
        return {"input": gd[:, 1:]}

    def __repr__(self) -> str:
        return f"PolynomialFeatures(degree={self.degree})"


class PolynomialRegression(Model):
    """``Linear(dimension)`` of ``PolynomialFeatures(degree)`` of the input, as the published
    Mithril's ``PolynomialRegression(degree, dimension)``; its parameters are
    ``linear.weight`` (dimension, F) and ``linear.bias`` (the published ``weight`` and
    ``bias``)."""

    def __init__(self, degree: int, dimension: int, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self += PolynomialFeatures(degree)
        self += Linear(dimension)


class LogisticRegression(Model):
    """``Linear(1)`` of the input, with its sigmoid: outputs ``output`` (the logit, (N, 1))
    and ``probs_output`` (its probability), as the published Mithril's
    ``LogisticRegression``; its parameters are ``linear.weight`` (1, d) and ``linear.bias``
    (the published ``weight`` and ``bias``)."""

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self |= Linear(1).connect(input="input", output="output")
        self |= Sigmoid().connect(input="output", output="probs_output")
