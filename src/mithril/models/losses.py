"""Losses. ``reduction`` is "mean" (default for the scalar losses), "sum" or "none"."""

from __future__ import annotations

from typing import Any

import numpy as np

from .operator import Operator, ShapeError, fmt, unify

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(r: str) -> str:
    if r not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {r!r}")
    return r


class SquaredError(Operator):
    """(input − target)², elementwise by default; ``reduction="mean"`` gives the MSE."""

    inputs = ("input", "target")

    def __init__(self, reduction: str = "none") -> None:
        self.reduction = _check_reduction(reduction)

    def infer_shape(self, shapes):
        s = unify(shapes.get("input"), shapes.get("target"), "input", "target")
        return s if self.reduction == "none" else ()

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        d = input - target
        sq = d * d
        if self.reduction == "none":
            return sq
        return xp.mean(sq) if self.reduction == "mean" else xp.sum(sq)

    def vjp(self, g, out, args, wrt):
        d = args["input"] - args["target"]
        scale = 2.0 / d.size if self.reduction == "mean" else 2.0
        gi = (g * scale) * d
        return {k: gi if k == "input" else -gi for k in wrt}


class MeanSquaredError(SquaredError):
    """mean((input − target)²) over every element."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction)


class CrossEntropy(Operator):
    """Softmax cross-entropy from logits ``input`` (..., C).

    ``target`` is either integer class indices of shape (...) or one-hot / probability
    rows of shape (..., C) (told apart by dtype). Reduced over the leading dims.
    """

    inputs = ("input", "target")
    any_dtype_inputs = frozenset({"target"})

    def __init__(self, reduction: str = "mean") -> None:
        self.reduction = _check_reduction(reduction)

    def infer_shape(self, shapes):
        s, t = shapes.get("input"), shapes.get("target")
        if s is not None and t is not None:
            if len(t) == len(s):
                s = unify(s, t, "input", "target")
            elif len(t) == len(s) - 1:
                s = (*unify(s[:-1], t, "input (without its class axis)", "target"), s[-1])
            else:
                raise ShapeError(f"'target' shape {fmt(t)} fits neither 'input' {fmt(s)} "
                                 f"(one-hot) nor {fmt(s[:-1])} (class indices)")
        if s is None:
            return None
        return () if self.reduction != "none" else s[:-1]

    @staticmethod
    def _is_index(xp: Any, target: Any) -> bool:
        return not getattr(target.dtype, "is_floating_point", None) and "int" in str(target.dtype)

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        m = xp.max(input, axis=-1, keepdims=True)
        logp = input - (m + xp.log(xp.sum(xp.exp(input - m), axis=-1, keepdims=True)))
        if self._is_index(xp, target):
            nll = -xp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        else:
            nll = -xp.sum(target * logp, axis=-1)
        if self.reduction == "none":
            return nll
        return xp.mean(nll) if self.reduction == "mean" else xp.sum(nll)

    def vjp(self, g, out, args, wrt):
        x, t = args["input"], args["target"]
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        if self._is_index(np, t):
            onehot = np.zeros_like(p)
            np.put_along_axis(onehot, t[..., None], 1.0, axis=-1)
            grad = p - onehot
        else:
            grad = p * t.sum(axis=-1, keepdims=True) - t
        n = x.size // x.shape[-1]
        if self.reduction == "none":
            grad = grad * g[..., None]
        else:
            grad = grad * (g / n if self.reduction == "mean" else g)
        res = {"input": grad}
        if "target" in wrt and not self._is_index(np, t):
            m = x.max(axis=-1, keepdims=True)
            logp = x - m - np.log(e.sum(axis=-1, keepdims=True))
            gt = g[..., None] if self.reduction == "none" else (g / n if self.reduction == "mean" else g)
            res["target"] = -logp * gt
        return {k: v for k, v in res.items() if k in wrt}
