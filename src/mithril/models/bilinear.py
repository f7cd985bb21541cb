"""``Bilinear``, as ``torch.nn.Bilinear``: its layout, initialisation and shapes."""

from __future__ import annotations

from typing import Any

import numpy as np

from .half_precision import float32_forward, float32_vjp
from .operator import Operator, ShapeError, fmt, functional_of, unify


def _positive(v: Any, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"Bilinear: {name} must be a positive int, got {v!r}")
    return int(v)


class Bilinear(Operator):
    """y[..., o] = Σ_ij x1[..., i] · weight[o, i, j] · x2[..., j] + bias[o], as
    ``torch.nn.Bilinear(in1_features, in2_features, out_features, bias=True)`` /
    ``F.bilinear``: ``weight`` (out, in1, in2) and ``bias`` (out,) in torch's layout (a
    ``state_dict`` copies in), both drawn from U(±1/√in1_features) as torch's
    ``reset_parameters``. ``input1`` (..., in1) and ``input2`` (..., in2) have the same
    leading axes (none: one pair of vectors)."""

    inputs = ("input1", "input2")

    def __init__(self, in1_features: int, in2_features: int, out_features: int,
                 bias: bool = True) -> None:
        self.in1 = _positive(in1_features, "in1_features")
        self.in2 = _positive(in2_features, "in2_features")
        self.out = _positive(out_features, "out_features")
        if not isinstance(bias, (bool, np.bool_)):
            raise ValueError(f"Bilinear: bias must be a bool, got {bias!r}")
        self.use_bias = bool(bias)

    @property
    def param_init(self) -> dict[str, str]:  # type: ignore[override]
        kind = f"fan_in_uniform:{self.in1}"  # torch: U(±1/√in1) for both
        return {"weight": kind, "bias": kind} if self.use_bias else {"weight": kind}

    def param_shapes(self, shapes):
        ps = {"weight": (self.out, self.in1, self.in2)}
        return {**ps, "bias": (self.out,)} if self.use_bias else ps

    def infer_shape(self, shapes):
        a, b = shapes.get("input1"), shapes.get("input2")
        for key, s, n in (("input1", a, self.in1), ("input2", b, self.in2)):
            if s is not None and (not s or s[-1] not in (None, n)):
                raise ShapeError(f"Bilinear: '{key}' must be (..., {n}), got shape {fmt(s)}")
        if a is None or b is None:
            return None
        lead = unify(a[:-1], b[:-1], "input1 (leading axes)", "input2 (leading axes)")
        return (*lead, self.out)

    @float32_forward  # (accumulated in float32, as torch's; NumPy has no bfloat16 einsum)
    def forward(self, xp: Any, input1: Any, input2: Any, weight: Any, bias: Any = None) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.bilinear(input1, input2, weight, bias)
        y = xp.einsum("...i,oij,...j->...o", input1, weight, input2)
        return y if bias is None else y + bias

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x1, x2, w = args["input1"], args["input2"], args["weight"]
        res = {}
        if "input1" in wrt:
            res["input1"] = np.einsum("...o,oij,...j->...i", g, w, x2)
        if "input2" in wrt:
            res["input2"] = np.einsum("...o,oij,...i->...j", g, w, x1)
        if "weight" in wrt:
            rows = (-1, self.out), (-1, self.in1), (-1, self.in2)
            g2, a, b = (v.reshape(r) for v, r in zip((g, x1, x2), rows, strict=True))
            res["weight"] = np.einsum("no,ni,nj->oij", g2, a, b)
        if "bias" in wrt:
            res["bias"] = g.reshape(-1, self.out).sum(0)
        return res

    def __repr__(self) -> str:
        return f"Bilinear({self.in1}, {self.in2}, {self.out}, bias={self.use_bias})"
