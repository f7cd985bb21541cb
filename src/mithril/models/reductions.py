"""Reductions over axes: Mean, Sum, Max, Min (``axis``: None for all, an int or a tuple;
``keepdim`` keeps the reduced axes with size 1, as torch). Max and Min share the gradient
evenly among tied entries, as torch's ``amax`` / ``amin`` and JAX do."""

from __future__ import annotations

from typing import Any

import numpy as np

from .half_precision import float32_forward
from .operator import Operator, ShapeError, div_count, fmt, torch_of


class _Reduce(Operator):
    def __init__(self, axis: int | tuple[int, ...] | list[int] | None = None,
                 keepdim: bool = False) -> None:
        # a NumPy integer is an int axis (it was iterated: a raw TypeError); a bool is no axis
        if isinstance(axis, (bool, np.bool_)) or (isinstance(axis, (tuple, list)) and any(
                isinstance(a, (bool, np.bool_)) for a in axis)):
            raise TypeError(f"{type(self).__name__}: axis must be None, an int or a tuple of "
                            f"ints, got {axis!r}")
        if isinstance(axis, (int, np.integer)):
            axis = int(axis)
        elif axis is not None:
            axis = tuple(int(a) for a in axis)
        self.axis, self.keepdim = axis, bool(keepdim)

    def _axes(self, ndim: int) -> tuple[int, ...]:
        """The reduced axes, non-negative and sorted (a ShapeError if out of range)."""
        if self.axis is None:
            return tuple(range(ndim))
        axes = (self.axis,) if isinstance(self.axis, int) else self.axis
        if any(not -ndim <= a < ndim for a in axes):
            raise ShapeError(f"axis {self.axis} is out of range for rank {ndim}")
        out = tuple(sorted(a % ndim for a in axes))
        if len(set(out)) != len(out):
            raise ShapeError(f"axis {self.axis} repeats an axis")
        return out

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        axes = self._axes(len(s))
        if self.keepdim:
            return tuple(1 if i in axes else d for i, d in enumerate(s))
        return tuple(d for i, d in enumerate(s) if i not in axes)

    def _np_axis(self, ndim: int) -> tuple[int, ...] | None:
        return None if self.axis is None else self._axes(ndim)

    def _keep(self, g: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``g`` with the reduced axes put back (size 1), so it broadcasts against ``x``."""
        return g if self.keepdim else np.expand_dims(g, self._axes(x.ndim))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axis={self.axis}, keepdim={self.keepdim})"


class Sum(_Reduce):
    """Σ over ``axis``."""

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        torch = torch_of(xp)
        if torch is not None:
            dims = self._axes(input.ndim)
            return torch.sum(input, dim=dims, keepdim=self.keepdim) if dims else input.clone()
        return xp.sum(input, axis=self._np_axis(input.ndim), keepdims=self.keepdim)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        return {"input": np.broadcast_to(self._keep(g, x), x.shape).copy()}


class Mean(_Reduce):
    """Mean over ``axis``."""

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        torch = torch_of(xp)
        if torch is not None:
            dims = self._axes(input.ndim)
            return torch.mean(input, dim=dims, keepdim=self.keepdim) if dims else input.clone()
        return xp.mean(input, axis=self._np_axis(input.ndim), keepdims=self.keepdim)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        n = int(np.prod([x.shape[a] for a in self._axes(x.ndim)], dtype=np.int64))
        return {"input": np.broadcast_to(div_count(self._keep(g, x), n), x.shape).copy()}


class _Extreme(_Reduce):
    _name: str  # "max" or "min"

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is not None:  # no identity: an empty axis was a raw NumPy / torch / JAX error
            empty = [a for a in self._axes(len(s)) if s[a] == 0]
            if empty:
                raise ShapeError(f"{type(self).__name__} over axis {empty[0]} of size 0 "
                                 f"(shape {fmt(s)}): the {self._name}imum of no values is "
                                 "undefined")
        return super().infer_shape(shapes)

    def forward(self, xp: Any, input: Any) -> Any:
        torch = torch_of(xp)
        if torch is not None:
            dims = self._axes(input.ndim)
            f = getattr(torch, "a" + self._name)
            return f(input, dim=dims, keepdim=self.keepdim) if dims else input.clone()
        f = getattr(xp, self._name)
        return f(input, axis=self._np_axis(input.ndim), keepdims=self.keepdim)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        axes = self._axes(x.ndim)
        mask = (x == self._keep(out, x)).astype(x.dtype)
        return {"input": mask * self._keep(g, x) / mask.sum(axis=axes, keepdims=True)}


class Max(_Extreme):
    """Maximum over ``axis``."""

    _name = "max"


class Min(_Extreme):
    """Minimum over ``axis``."""

    _name = "min"

