"""Reductions over axes: Mean, Sum, Max, Min (``axis``: None for all, an int or a tuple;
``keepdim`` keeps the reduced axes with size 1, as torch). Max and Min share the gradient
evenly among tied entries, as torch's ``amax`` / ``amin`` and JAX do."""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np

from .connection_types import TBD
from .half_precision import float32_forward, float32_vjp
from .operator import Operator, ShapeError, div_count, fmt, torch_of


def axes_arg(who: str, axis: Any) -> int | tuple[int, ...] | None:
    """``axis`` checked: None, an int, or a tuple / list of distinct ints (a NumPy integer is
    an int; a bool is none). A TypeError or ValueError naming ``who`` otherwise."""
    if axis is None:
        return None
    is_int = lambda a: isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))  # noqa: E731
    if is_int(axis):
        return int(axis)
    if not isinstance(axis, (tuple, list)) or not all(is_int(a) for a in axis):
        raise TypeError(f"{who}: axis must be None, an int or a tuple of ints, got {axis!r}")
    if len(set(int(a) for a in axis)) != len(axis):
        raise ValueError(f"{who}: axis must not repeat an axis, got {axis!r}")
    return tuple(int(a) for a in axis)


class _Reduce(Operator):
    """A reduction over ``axis`` (None: every axis; an int or a tuple of ints, negative ones
    counted from the end), keeping the reduced axes with size 1 if ``keepdim``.

    As published, ``axis=TBD`` makes the axis an input, ``axis``, connected to a connection
    whose value the compiler knows (``Size`` / ``Shape`` output, an integer constant: see
    :mod:`mithril.models.size_values`); one the run computes is a ``ShapeError`` at compile
    time. Its forward and gradient are those of the block with that axis given."""

    def __init__(self, axis: Any = None, keepdim: bool = False) -> None:
        self.axis = axis if axis is TBD else axes_arg(type(self).__name__, axis)
        if axis is TBD:  # (read for its value: value_inputs; no gradient)
            self.inputs = ("input", "axis")
            self.any_dtype_inputs = frozenset({"axis"})
            self.value_inputs = frozenset({"axis"})
        if not isinstance(keepdim, (bool, np.bool_)):
            raise TypeError(f"{type(self).__name__}: keepdim must be a bool, got {keepdim!r}")
        self.keepdim = bool(keepdim)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("forward", "vjp", "infer_shape"):
            if name in cls.__dict__:
                setattr(cls, name, _given_axis(cls.__dict__[name], name))

    def _with(self, value: Any) -> _Reduce:
        """This block with the axis ``value`` (an axis input's value) given."""
        a = np.asarray(value)
        if a.ndim > 1 or a.dtype.kind not in "iu":
            raise ShapeError(f"{type(self).__name__}: 'axis' must hold integers (an int or a "
                             f"1-d array of them), got {a!r}")
        op = copy.copy(self)
        op.axis = axes_arg(type(self).__name__, int(a) if a.ndim == 0 else a.tolist())
        return op

    def _axes(self, ndim: int) -> tuple[int, ...]:
        """The reduced axes, non-negative and sorted (a ShapeError if out of range)."""
        if self.axis is None:
            return tuple(range(ndim))
        axes = (self.axis,) if isinstance(self.axis, int) else self.axis
        bad = [a for a in axes if not -ndim <= a < ndim]
        if bad:
            raise ShapeError(f"{type(self).__name__}: axis {bad[0]} is out of range for an input "
                             f"of rank {ndim}")
        out = tuple(sorted(a % ndim for a in axes))
        if len(set(out)) != len(out):
            raise ShapeError(f"{type(self).__name__}: axis {self.axis} names one axis twice for "
                             f"rank {ndim}")
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


def _given_axis(f: Any, name: str) -> Any:
    """``f`` (a reduction's forward, vjp or shape rule) for a block whose axis is an input
    (``axis=TBD``): run on a copy with the axis's value given."""
    @functools.wraps(f)
    def forward(self: _Reduce, xp: Any, input: Any, axis: Any = None) -> Any:
        if self.axis is not TBD:
            return f(self, xp, input)
        try:
            value = axis.tolist() if hasattr(axis, "tolist") else axis
        except Exception as e:  # (a JAX tracer: computed inside the jitted program)
            raise ShapeError(f"{type(self).__name__}: 'axis' must be known before the run (a "
                             "Size / Shape output or an integer constant), not computed by "
                             "it") from e
        return f(self._with(value), xp, input)

    @functools.wraps(f)
    def vjp(self: _Reduce, g: Any, out: Any, args: Any, wrt: Any) -> Any:
        op = self if self.axis is not TBD else self._with(args["axis"])
        return {k: v for k, v in f(op, g, out, args, wrt).items() if k == "input"}

    @functools.wraps(f)
    def infer_shape(self: _Reduce, shapes: Any, values: Any = None) -> Any:
        if self.axis is not TBD:
            return f(self, shapes)
        if "axis" not in (values or {}):
            raise ShapeError(f"{type(self).__name__}: the value of 'axis' is computed by the "
                             "run, so the output's shape is not known at compile time: connect "
                             "it to a value known when compiling (a Size / Shape output, an "
                             "integer constant) or give the axis (an int or a tuple)")
        v = values["axis"]
        return None if v is None else f(self._with(v), shapes)

    return {"forward": forward, "vjp": vjp, "infer_shape": infer_shape}[name]


# (_Reduce's own shape rule, which Sum and Mean inherit; subclasses' are wrapped as defined)
_Reduce.infer_shape = _given_axis(  # type: ignore[method-assign]
    _Reduce.__dict__["infer_shape"], "infer_shape")


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



def _exclusive_products(x: np.ndarray) -> np.ndarray:
    """Π_{j≠i} x_j along the last axis, from prefix and suffix products: exact where x holds
    zeros (one zero: the others' product there, 0 elsewhere; two: 0 everywhere), where
    out / x divides 0 by 0."""
    ones = np.ones_like(x[..., :1])
    before = np.cumprod(np.concatenate([ones, x[..., :-1]], axis=-1), axis=-1)
    after = np.cumprod(np.concatenate([ones, x[..., :0:-1]], axis=-1), axis=-1)[..., ::-1]
    return before * after


class Prod(_Reduce):
    """Π over ``axis``, as the published Mithril's ``Prod`` and ``torch.prod``. The
    gradient of each entry is the product of the others in its slice (times the output's
    cotangent), exact where the input holds zeros, as torch's and JAX's (not out / x)."""

    # (a half-precision product in float32, rounded once: torch.autocast's float32 op, and
    # torch's CPU half prod rounds each partial product, 2+ ulps over 64 entries)
    @float32_forward(on_torch=True)
    def forward(self, xp: Any, input: Any) -> Any:
        torch = torch_of(xp)
        if torch is not None:  # (torch.prod takes one dim: the highest first keeps the others)
            out = input
            for d in reversed(self._axes(input.ndim)):
                out = torch.prod(out, dim=d, keepdim=self.keepdim)
            return out if self._axes(input.ndim) else input.clone()
        return xp.prod(input, axis=self._np_axis(input.ndim), keepdims=self.keepdim)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x = args["input"]
        axes = self._axes(x.ndim)
        rest = [a for a in range(x.ndim) if a not in axes]
        # the reduced axes last, flattened into one: (kept..., n)
        moved = np.transpose(x, rest + list(axes))
        n = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
        flat = moved.reshape(*moved.shape[:len(rest)], n)
        others = _exclusive_products(flat).reshape(moved.shape)
        gx = np.transpose(others, np.argsort(rest + list(axes)))
        return {"input": gx * self._keep(g, x)}
