"""Negative log-likelihood losses of torch: ``PoissonNLLLoss`` and ``GaussianNLLLoss``, as
``torch.nn.functional``'s ``poisson_nll_loss`` and ``gaussian_nll_loss``. Each takes
``reduction``: "mean" (default, as torch), "sum" or "none"."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputValueError, ShapeError
from .operator import (
    Operator,
    Shape,
    backend_of,
    fmt,
    functional_of,
    stop_gradient,
    unbroadcast,
    unify,
)
from .pointwise_losses import check_number, check_reduction, elementwise_cotangent, reduce

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _flag(who: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{who}: {name} must be a bool, got {value!r}")
    return bool(value)


class PoissonNLLLoss(Operator):
    """The Poisson negative log-likelihood of a count ``target`` t under a rate λ, per
    element, as ``F.poisson_nll_loss(input, target, log_input, full, eps)``:

        e^x − t·x             with ``log_input=True`` (default: ``input`` x is log λ)
        x − t·log(x + eps)     with ``log_input=False`` (``input`` x is λ itself)

    and with ``full=True`` the Stirling term t·log t − t + ½·log(2π·t) added where t > 1
    (0 where t <= 1, as torch). ``input`` and ``target`` have one shape; both are
    differentiable (d/dt = −x, or −log(x + eps), plus log t + 1/(2t) where the Stirling
    term counts; 0 where it does not, also at t = 0, where torch's own gradient is NaN).
    ``eps`` is a finite number >= 0 (torch's default 1e−8)."""

    inputs = ("input", "target")

    def __init__(self, log_input: bool = True, full: bool = False, eps: float = 1e-8,
                 reduction: str = "mean") -> None:
        self.log_input = _flag("PoissonNLLLoss", "log_input", log_input)
        self.full = _flag("PoissonNLLLoss", "full", full)
        self.eps = check_number("PoissonNLLLoss", "eps", eps, 0.0)
        self.reduction = check_reduction("PoissonNLLLoss", reduction)

    def infer_shape(self, shapes):
        try:
            s = unify(shapes.get("input"), shapes.get("target"), "input", "target")
        except ShapeError as e:
            raise ShapeError(f"PoissonNLLLoss: {e}") from None
        return s if self.reduction == "none" or s is None else ()

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        # (torch's own kernel too: the Stirling term's target gradient at t = 0 is NaN there)
        if self.log_input:
            loss = xp.exp(input) - target * input
        else:
            loss = input - target * xp.log(input + self.eps)
        if self.full:
            big = target > 1  # the inner where keeps the unpicked logs' gradients finite
            tb = xp.where(big, target, 2.0)
            loss = loss + xp.where(big, tb * xp.log(tb) - tb + 0.5 * xp.log(2 * math.pi * tb),
                                   0.0)
        return reduce(xp, loss, self.reduction)

    def vjp(self, g, out, args, wrt):
        x, t = args["input"], args["target"]
        ge = elementwise_cotangent(g, x.shape, self.reduction)
        res = {}
        if "input" in wrt:
            res["input"] = ge * (np.exp(x) - t if self.log_input else 1 - t / (x + self.eps))
        if "target" in wrt:
            dt = -x if self.log_input else -np.log(x + self.eps)
            if self.full:
                tb = np.where(t > 1, t, 2.0)
                dt = dt + np.where(t > 1, np.log(tb) + 0.5 / tb, 0.0)
            res["target"] = ge * dt
        return res

    def __repr__(self) -> str:
        return (f"PoissonNLLLoss(log_input={self.log_input}, full={self.full}, eps={self.eps}, "
                f"reduction={self.reduction!r})")


def var_layout(input: Shape, var: Shape) -> Shape:
    """The shape ``var`` takes against ``input`` (torch's rule): ``input``'s own; or
    ``input``'s without its last axis (a trailing axis of 1 is added); or ``input``'s rank
    with exactly one axis of 1 where ``input``'s differs. A ``ShapeError`` otherwise.
    Free dimensions (None) match anything."""
    def same(a: Any, b: Any) -> bool:
        return a is None or b is None or a == b

    if len(var) == len(input) and all(map(same, input, var)):
        return var
    if len(var) == len(input) - 1 and all(map(same, input[:-1], var)):
        return (*var, 1)
    if len(var) == len(input):
        off = [v for i, v in zip(input, var, strict=True) if not same(i, v)]
        if off == [1]:
            return var
    raise ShapeError(f"GaussianNLLLoss: var has shape {fmt(var)}, which fits input {fmt(input)} "
                     "neither as the same shape, nor as it without its last axis, nor with one "
                     "axis of 1 (torch's 'var is of incorrect size')")


class GaussianNLLLoss(Operator):
    """The Gaussian negative log-likelihood of ``target`` t under mean ``input`` x and
    variance ``var`` v, per element, as ``F.gaussian_nll_loss(input, target, var, full, eps)``:

        ½·(log max(v, eps) + (x − t)² / max(v, eps))   (+ ½·log 2π with ``full=True``)

    The clamp at ``eps`` (a finite number >= 0, torch's default 1e−6) is torch's: made
    without gradient, so v's gradient there is the clamped value's, ½·(1/eps − (x − t)²/eps²),
    not 0. ``input`` and ``target`` have one shape; ``var`` that shape, or it without its
    last axis (one variance per row), or it with one axis of 1 (shared along it), as torch.
    All three are differentiable. A negative variance is a ``ValueError`` (torch's "var has
    negative entry/entries") when ``var`` is a model input or on NumPy and torch; inside a
    jitted JAX program nothing can raise, and it is clamped to eps."""

    inputs = ("input", "target", "var")
    value_checked_inputs = numpy_checked_inputs = frozenset({"var"})

    def __init__(self, full: bool = False, eps: float = 1e-6, reduction: str = "mean") -> None:
        self.full = _flag("GaussianNLLLoss", "full", full)
        self.eps = check_number("GaussianNLLLoss", "eps", eps, 0.0)
        self.reduction = check_reduction("GaussianNLLLoss", reduction)

    def infer_shape(self, shapes):
        try:
            s = unify(shapes.get("input"), shapes.get("target"), "input", "target")
        except ShapeError as e:
            raise ShapeError(f"GaussianNLLLoss: {e}") from None
        v = shapes.get("var")
        if s is not None and v is not None:
            var_layout(s, v)
        return s if self.reduction == "none" or s is None else ()

    def check_inputs(self, shapes: Mapping[str, Shape | None], dtypes: Mapping[str, str],
                     arrays: Mapping[str, Any], names: Mapping[str, str]) -> None:
        """No negative variance (a ``ValueError`` naming the data key)."""
        v = arrays.get("var")
        if v is not None and math.prod(v.shape) and bool((v < 0).any()):
            raise InputValueError(f"GaussianNLLLoss: var '{names['var']}' has negative "
                                  "entries: a variance must be >= 0")

    def _var(self, input: Any, var: Any) -> Any:
        """``var`` with the trailing axis of 1 torch adds when it lacks the last one."""
        return var[..., None] if var.ndim == input.ndim - 1 else var

    def forward(self, xp: Any, input: Any, target: Any, var: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.gaussian_nll_loss(input, target, var, full=self.full, eps=self.eps,
                                       reduction=self.reduction)
        v = self._var(input, var)
        if backend_of(xp) == "numpy":
            if (v < 0).any():
                raise InputValueError("GaussianNLLLoss: var has negative entries: a variance "
                                      "must be >= 0")
            vc = np.maximum(v, self.eps)
        else:  # the clamp without gradient (torch's clamp_ under no_grad)
            vc = v + stop_gradient(xp, xp.maximum(v, self.eps) - v)
        d = input - target
        loss = 0.5 * (xp.log(vc) + d * d / vc)
        return reduce(xp, loss + _HALF_LOG_2PI if self.full else loss, self.reduction)

    def vjp(self, g, out, args, wrt):
        x, t, var = args["input"], args["target"], args["var"]
        vc = np.maximum(self._var(x, var), self.eps)
        d = x - t
        ge = elementwise_cotangent(g, x.shape, self.reduction)
        gx = ge * d / vc
        res = {}
        if "input" in wrt:
            res["input"] = gx
        if "target" in wrt:
            res["target"] = -gx
        if "var" in wrt:
            gv = ge * (0.5 / vc - 0.5 * d * d / (vc * vc))
            res["var"] = unbroadcast(gv, vc.shape).reshape(var.shape)
        return res

    def __repr__(self) -> str:
        return f"GaussianNLLLoss(full={self.full}, eps={self.eps}, reduction={self.reduction!r})"
