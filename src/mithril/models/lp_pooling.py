"""``LPPool1D`` / ``LPPool2D`` / ``LPPool3D``, as torch's ``nn.LPPool1d/2d/3d``: the power-p
norm of each window, (Σ x^p)^(1/p), computed as torch does: the windows' average of x^p
(:class:`~mithril.models.pooling.AvgPool2D`, no padding, ``ceil_mode`` as given) times the
kernel's size K, raised to 1/p. With ``ceil_mode`` a window cut by the input's end is so
averaged over its covered part and multiplied by the full K, as torch's. A window whose sum
is 0 gives 0 with gradient 0 (torch's sign·relu before the root); a negative sum (odd p,
negative inputs) or a negative input to a fractional p gives NaN, as torch's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ShapeError
from .half_precision import float32_forward, float32_vjp
from .operator import Operator, functional_of
from .pooling import AvgPool1D, AvgPool2D, AvgPool3D


class _LPPool(Operator):
    nd: int = 2

    def __init__(self, norm_type: float, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] | None = None, ceil_mode: bool = False) -> None:
        who = type(self).__name__
        number = (int, float, np.integer, np.floating)
        if isinstance(norm_type, (bool, np.bool_)) or not isinstance(norm_type, number) or \
                not 0 < norm_type < math.inf:
            raise ValueError(f"{who}: norm_type must be a finite number > 0, got {norm_type!r}")
        self.norm_type = float(norm_type)
        avg = (AvgPool1D, AvgPool2D, AvgPool3D)[self.nd - 1]
        try:
            self.avg = avg(kernel_size, stride, 0, ceil_mode=ceil_mode)
        except (TypeError, ValueError) as e:
            raise type(e)(str(e).replace(avg.__name__, who)) from None
        self.kernel_size, self.stride = self.avg.kernel_size, self.avg.stride
        self.ceil_mode = self.avg.ceil_mode

    def infer_shape(self, shapes):
        try:
            return self.avg.infer_shape(shapes)
        except ShapeError as e:
            raise ShapeError(str(e).replace(type(self.avg).__name__, type(self).__name__)) from None

    # (x^p, its window sums and the root in float32, rounded once: 3·3 values of 100 squared
    # pass float16's 65504, torch's kernel too; torch's lp_pool3d has no CPU half avg_pool3d)
    @float32_forward(on_torch=True)
    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        p = self.norm_type
        if F is not None:
            fn = (F.lp_pool1d, F.lp_pool2d, F.lp_pool3d)[self.nd - 1]
            return fn(input, p, self.kernel_size[0] if self.nd == 1 else self.kernel_size,
                      self.stride, self.ceil_mode)
        with np.errstate(invalid="ignore"):  # NumPy: a negative base's fractional power is NaN
            s = self.avg.forward(xp, input=input ** p)
            nz = s != 0
            root = (xp.where(nz, s, 1.0) * math.prod(self.kernel_size)) ** (1 / p)
        return xp.where(nz, root, 0.0)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x, p, k = args["input"], self.norm_type, math.prod(self.kernel_size)
        xp_ = x ** p
        s = self.avg.forward(np, input=xp_)
        with np.errstate(divide="ignore", invalid="ignore"):
            gs = np.where(s != 0, g * (s * k) ** (1 / p - 1) * (k / p), 0.0)
            gx = self.avg.vjp(gs, s, {"input": xp_}, frozenset({"input"}))["input"]
            return {"input": gx * p * x ** (p - 1)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.norm_type}, {self.kernel_size}, "
                f"stride={self.stride}, ceil_mode={self.ceil_mode})")


class LPPool1D(_LPPool):
    """(Σ_window x^p)^(1/p) over windows of (N, C, L) or (C, L), as
    ``nn.LPPool1d(norm_type, kernel_size, stride=None, ceil_mode=False)`` (module docstring)."""

    nd = 1


class LPPool2D(_LPPool):
    """(Σ_window x^p)^(1/p) over windows of (N, C, H, W) or (C, H, W), as
    ``nn.LPPool2d(norm_type, kernel_size, stride=None, ceil_mode=False)`` (module docstring)."""


class LPPool3D(_LPPool):
    """(Σ_window x^p)^(1/p) over windows of (N, C, D, H, W) or (C, D, H, W), as
    ``nn.LPPool3d(norm_type, kernel_size, stride=None, ceil_mode=False)`` (module docstring;
    as torch's avg_pool3d, an input smaller than the kernel is refused)."""

    nd = 3
