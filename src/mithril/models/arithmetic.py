"""Binary arithmetic with numpy broadcasting."""

from __future__ import annotations

from typing import Any

from .operator import Operator, ShapeError, broadcast_shapes, fmt, promote, unbroadcast


class _Binary(Operator):
    """Operands of two dtypes meet by :func:`~.operator.promote` (torch's rule)."""

    inputs = ("left", "right")

    def infer_shape(self, shapes):
        a, b = shapes.get("left"), shapes.get("right")
        if a is None or b is None:
            return None
        return broadcast_shapes(a, b, "'left' and 'right'")


class Add(_Binary):
    """left + right."""

    canonical_inputs = ("left", "right")  # (published: either is the canonical input)

    def forward(self, xp: Any, left: Any, right: Any) -> Any:
        left, right = promote(left, right)
        return left + right

    def vjp(self, g, out, args, wrt):
        return {k: unbroadcast(g, args[k].shape) for k in wrt}


class Multiply(_Binary):
    """left · right (elementwise)."""

    canonical_inputs = ("left", "right")  # (published: either is the canonical input)

    def forward(self, xp: Any, left: Any, right: Any) -> Any:
        left, right = promote(left, right)
        return left * right

    def vjp(self, g, out, args, wrt):
        other = {"left": "right", "right": "left"}
        return {k: unbroadcast(g * promote(g, args[other[k]])[1], args[k].shape) for k in wrt}


class MatrixMultiply(_Binary):
    """left @ right (batched over leading dimensions)."""

    def infer_shape(self, shapes):
        a, b = shapes.get("left"), shapes.get("right")
        if a is None or b is None:
            return None
        if len(a) < 2 or len(b) < 2:
            raise ShapeError(f"needs rank >= 2, got 'left' {fmt(a)} and 'right' {fmt(b)}")
        if a[-1] is not None and b[-2] is not None and a[-1] != b[-2]:
            raise ShapeError(f"inner dims of 'left' {fmt(a)} and 'right' {fmt(b)} differ")
        batch = broadcast_shapes(a[:-2], b[:-2], "batch dims of 'left' and 'right'") if len(a) > 2 or len(b) > 2 else ()
        return (*batch, a[-2], b[-1])

    def forward(self, xp: Any, left: Any, right: Any) -> Any:
        left, right = promote(left, right)
        return left @ right

    def vjp(self, g, out, args, wrt):
        left, right = promote(args["left"], args["right"])
        res = {}
        if "left" in wrt:
            res["left"] = unbroadcast(g @ right.swapaxes(-1, -2), left.shape)
        if "right" in wrt:
            res["right"] = unbroadcast(left.swapaxes(-1, -2) @ g, right.shape)
        return res
