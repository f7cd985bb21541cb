"""Kernel matrices of the published Mithril: ``RBFKernel`` and ``PolynomialKernel``, between
the rows of ``input1`` (N, d) and ``input2`` (M, d), each (N, M), with learnable scalars
((1,) inputs)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .distance_models import _full, _safe_pow
from .half_precision import float32_forward, float32_vjp
from .operator import Operator, ShapeError, fmt, unify
from .primitives import _abs
from .probability_losses import tiny


def _pair_shape(who: str, shapes: Any, scalars: tuple[str, ...]) -> tuple | None:
    a, b = shapes.get("input1"), shapes.get("input2")
    for key, s in (("input1", a), ("input2", b)):
        if s is not None and len(s) != 2:
            raise ShapeError(f"{who}: '{key}' must be (points, features), got shape {fmt(s)}")
    for key in scalars:
        s = shapes.get(key)
        if s is not None and math.prod(d or 1 for d in s) != 1:
            raise ShapeError(f"{who}: '{key}' must hold one number, got shape {fmt(s)}")
    if a is None or b is None:
        return None
    unify(a[1:], b[1:], "input1 (features)", "input2 (features)")
    return (a[0], b[0])


class RBFKernel(Operator):
    """The Gaussian (RBF) kernel l²·exp(−‖x_i − y_j‖² / (2σ²)) of the rows x_i of ``input1``
    and y_j of ``input2``, with ``l_scale`` l and ``sigma`` σ each of shape (1,), as the
    published Mithril's ``RBFKernel``. Every input is differentiable."""

    inputs = ("input1", "input2", "l_scale", "sigma")

    def infer_shape(self, shapes):
        return _pair_shape("RBFKernel", shapes, ("l_scale", "sigma"))

    # (‖x − y‖² in float32, rounded once: over 1024 features of 10 it passes float16's 65504)
    @float32_forward(on_torch=True)
    def forward(self, xp: Any, input1: Any, input2: Any, l_scale: Any, sigma: Any) -> Any:
        xp = _full(xp)
        diff = input1[:, None, :] - input2[None, :, :]
        s = (diff * diff).sum(-1)
        sig, el = sigma.reshape(()), l_scale.reshape(())
        # (÷σ twice, not ÷σ²: σ² of σ < 1e-154 is subnormal, which JAX's XLA flushes to 0 (s /
        # σ / σ too: it rewrites that to s / σ²), a NaN gradient where torch's is 0)
        return (el * el) * xp.exp(s * (-0.5 / sig) / sig)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x1, x2, el, sig = args["input1"], args["input2"], args["l_scale"], args["sigma"]
        el0, sig0 = el.reshape(()), sig.reshape(())
        diff = x1[:, None, :] - x2[None, :, :]
        s = (diff * diff).sum(-1)
        e = np.exp(s * -0.5 / sig0 / sig0)
        ge = g * e
        gs = ge * (el0 * el0) * -0.5 / sig0 / sig0  # d out / d s (0, not 0·inf, at e = 0)
        gdiff = 2 * gs[:, :, None] * diff
        res = {"input1": gdiff.sum(1), "input2": -gdiff.sum(0),
               "l_scale": np.full(el.shape, np.sum(ge) * 2 * el0, dtype=el.dtype),
               "sigma": np.full(sig.shape, np.sum(ge * s) * el0 * el0 / sig0**3, dtype=sig.dtype)}
        return {k: v for k, v in res.items() if k in wrt}


class PolynomialKernel(Operator):
    """The polynomial kernel (x_i · y_j + coef)^degree of the rows x_i of ``input1`` and y_j
    of ``input2``, with ``poly_coef`` and ``degree`` each of shape (1,) (both
    differentiable), as the published Mithril's ``PolynomialKernel(robust=True)``: the power
    is the published robust power, of the base's absolute value |b| (so a negative base
    gives |b|^degree), continued as |b|/c where |b| < c and degree < 1 − log c / log |b|
    (c the dtype's smallest normal number); ``robust=False`` takes |b|^degree throughout.
    The gradient in ``degree`` is out·log |b| (0 where b = 0); |b|'s gradient at b = 0 is 0
    on every backend (``Absolute``'s), so a zero base in the line has gradient 0."""

    inputs = ("input1", "input2", "poly_coef", "degree")

    def __init__(self, robust: bool = True) -> None:
        if not isinstance(robust, (bool, np.bool_)):
            raise TypeError(f"PolynomialKernel: robust must be a bool, got {robust!r}")
        self.robust = bool(robust)

    def infer_shape(self, shapes):
        return _pair_shape("PolynomialKernel", shapes, ("poly_coef", "degree"))

    def _linear(self, xp: Any, ab: Any, deg: Any) -> Any:
        """Where the robust power is the line |b|/c (all False without ``robust``)."""
        c = tiny(ab.dtype)
        with np.errstate(divide="ignore"):
            return (deg < 1 - math.log(c) / xp.log(ab)) & (ab < c) if self.robust else ab < 0

    def forward(self, xp: Any, input1: Any, input2: Any, poly_coef: Any, degree: Any) -> Any:
        xp = _full(xp)
        ab = _abs(xp, input1 @ input2.T + poly_coef.reshape(()))  # (gradient 0 at 0 on JAX too)
        deg = degree.reshape(())
        lin = self._linear(xp, ab, deg)
        return xp.where(lin, xp.where(lin, ab, 0.0) / tiny(ab.dtype), _safe_pow(xp, ab, deg))

    def vjp(self, g, out, args, wrt):
        x1, x2, coef, degree = args["input1"], args["input2"], args["poly_coef"], args["degree"]
        b = x1 @ x2.T + coef.reshape(())
        ab, deg = np.abs(b), degree.reshape(())
        lin = self._linear(np, ab, deg)
        pos = ab != 0
        logb = np.log(np.where(pos, ab, 1.0))
        pw = np.where(pos, np.exp(deg * logb), 0.0)
        slope = np.where(lin, 1 / tiny(ab.dtype), np.where(pos, deg * pw / np.where(pos, ab, 1.0), 0.0))
        gb = g * slope * np.sign(b)
        res = {"input1": gb @ x2, "input2": gb.T @ x1,
               "poly_coef": np.full(coef.shape, gb.sum(), dtype=coef.dtype),
               "degree": np.full(degree.shape, np.sum(np.where(lin, 0.0, g * pw * logb)),
                                 dtype=degree.dtype)}
        return {k: v for k, v in res.items() if k in wrt}

    def __repr__(self) -> str:
        return "PolynomialKernel()" if self.robust else "PolynomialKernel(robust=False)"
