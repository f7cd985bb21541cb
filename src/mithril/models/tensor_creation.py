"""The published Mithril's small tensor blocks its examples use (CLIP, Flux, T5): ``ZerosLike``,
``Ones(shape, dtype)``, ``BroadcastTo(shape)``, ``ArgMax`` / ``ArgMin(axis, keepdim)`` and
``Minimum`` / ``Maximum`` (``left``, ``right``), as torch's ``zeros_like``, ``ones``,
``broadcast_to``, ``argmax`` / ``argmin``, ``minimum`` / ``maximum``.

A shape (``Ones``, ``BroadcastTo``) holds ints and shape wires (``x.shape[0]``, see
:mod:`mithril.models.shape_wires`). ``Ones`` without ``dtype`` is in the model's float dtype
(read from a float constant the model wires in, as a float ``Arange``). Gradients: none
through ``ZerosLike``, ``Ones`` and the arg-reductions (their outputs are int64); the sum
over the broadcast axes for ``BroadcastTo``; and for ``Minimum`` / ``Maximum`` torch's, the
cotangent split in halves where the two are equal."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from .connections import IOKey
from .operator import Operator, ShapeError, backend_of, fmt, promote, torch_of, unbroadcast
from .primitives import _Broadcasting
from .shape_wires import ShapeArgs, ShapeWire, array_shapes, resolve_sizes

_DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64", "bool")


def _dtype_name(dtype: Any, who: str) -> str | None:
    if dtype is None:
        return None
    name = str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1]
    if name not in _DTYPES:
        raise TypeError(f"{who}: dtype must be one of {_DTYPES}, got {dtype!r}")
    return name


def _sizes(shape: Any, who: str) -> tuple:
    if isinstance(shape, ShapeWire):
        shape = (shape,)
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or any(
            not isinstance(d, ShapeWire) and (isinstance(d, bool) or not isinstance(d, (int, np.integer))
                                              or d < 0) for d in shape):
        raise TypeError(f"{who}: shape must be a tuple of sizes (ints >= 0 or shape wires such "
                        f"as x.shape[0]), got {shape!r}")
    return tuple(d if isinstance(d, ShapeWire) else int(d) for d in shape)


class _Sized(Operator):
    """An operator with a static ``shape`` that may hold shape wires (read as extra inputs)."""

    shape: tuple | None

    def _set_shape(self, shape: Any, who: str, *extra: Any) -> None:
        self.shape = None if shape is None else _sizes(shape, who)
        wires = [d for d in self.shape or () if isinstance(d, ShapeWire)]
        self.shape_args = ShapeArgs(wires) if wires or extra else None
        for i, ref in enumerate(extra):  # (constants the model wires in: the float dtype)
            assert self.shape_args is not None
            self.shape_args.refs += (ref,)
            self.shape_args.keys += (f"float_like{i}",)

    def _target(self, shapes: Any) -> tuple | None:
        if self.shape is None:
            raise ShapeError(f"{type(self).__name__}: no shape given: {type(self).__name__}"
                             "(shape=...) or connect(shape=...)")
        if self.shape_args is None:
            return self.shape
        return resolve_sizes(self.shape, self.shape_args.lookup(shapes), type(self).__name__)

    def _run_shape(self, refs: dict) -> tuple:
        if self.shape_args is None:
            return self.shape  # type: ignore[return-value]
        return self._target(array_shapes(refs, self.shape_args.keys))  # type: ignore[return-value]

    def connect(self, *args: Any, **connections: Any) -> Any:
        """As any block's; ``shape=`` (and ``Ones``'s ``dtype=``), as published, set them here;
        positionally in the published order (``positional``)."""
        connections = self._named(args, connections)
        args = ()
        if "shape" not in connections and "dtype" not in connections:
            return super().connect(*args, **connections)
        before = dict(self.__dict__)
        try:
            self._configure(connections.pop("shape", self.shape), connections.pop("dtype", None))
            return super().connect(*args, **connections)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _configure(self, shape: Any, dtype: Any) -> None:
        raise NotImplementedError


class ZerosLike(Operator):
    """Zeros of the input's shape and dtype (``torch.zeros_like``). No gradient."""

    any_dtype_inputs = frozenset({"input"})

    def forward(self, xp: Any, input: Any) -> Any:
        t = torch_of(xp)
        return t.zeros_like(input) if t is not None else xp.zeros_like(input)

    def vjp(self, g, out, args, wrt):
        return {}


class Ones(_Sized):
    """Ones of ``shape`` (``torch.ones``), in ``dtype`` (default: the model's float dtype)."""

    positional = ("shape", "dtype", "output")
    inputs: tuple = ()

    def __init__(self, shape: Sequence[Any] | None = None, dtype: Any = None) -> None:
        self._configure(shape, dtype)

    def _configure(self, shape: Any, dtype: Any) -> None:
        self.dtype = _dtype_name(dtype, "Ones")
        self._float_like = IOKey(value=np.zeros(()))
        # (the float constant gives the model's dtype, and on torch its device)
        self._set_shape(shape, "Ones", self._float_like)
        self.inputs = tuple(self.shape_args.keys) if self.shape_args is not None else ()
        self.any_dtype_inputs = frozenset(self.inputs)

    @property
    def output_dtype(self) -> str | None:
        """The output's dtype when it is not the model's float dtype (None: it is)."""
        return self.dtype

    def infer_shape(self, shapes):
        return self._target(shapes)

    def forward(self, xp: Any, **refs: Any) -> Any:
        shape = self._run_shape(refs)
        like = refs.get("float_like0")
        name = self.dtype or str(like.dtype).rsplit(".", 1)[-1]
        t = torch_of(xp)
        if t is not None:
            return t.ones(shape, dtype=getattr(t, name), device=like.device)
        if name == "bfloat16":
            import ml_dtypes

            return np.ones(shape, dtype=ml_dtypes.bfloat16)
        return xp.ones(shape, dtype=name)

    def vjp(self, g, out, args, wrt):
        return {}

    def __repr__(self) -> str:
        return f"Ones({self.shape!r}" + (f", dtype={self.dtype!r})" if self.dtype else ")")


class BroadcastTo(_Sized):
    """The input broadcast to ``shape`` (``torch.broadcast_to``, NumPy's rule); its gradient
    is the cotangent summed over the broadcast axes."""

    positional = ("input", "shape", "output")

    def __init__(self, shape: Sequence[Any] | None = None) -> None:
        self._configure(shape, None)

    def _configure(self, shape: Any, dtype: Any) -> None:
        if dtype is not None:
            raise TypeError("BroadcastTo takes no dtype")
        self._set_shape(shape, "BroadcastTo")
        self.inputs = ("input", *(self.shape_args.keys if self.shape_args is not None else ()))
        self.any_dtype_inputs = frozenset(self.inputs)

    def infer_shape(self, shapes):
        s, target = shapes.get("input"), self._target(shapes)
        if s is None or target is None:
            return target
        if len(s) > len(target) or any(
                a is not None and b is not None and a not in (1, b)
                for a, b in zip(s[::-1], target[::-1], strict=False)):
            raise ShapeError(f"BroadcastTo: the input {fmt(s)} does not broadcast to {list(target)}")
        return tuple(target)

    def forward(self, xp: Any, input: Any, **refs: Any) -> Any:
        shape = self._run_shape(refs)
        t = torch_of(xp)
        return t.broadcast_to(input, shape) if t is not None else xp.broadcast_to(input, shape)

    def vjp(self, g, out, args, wrt):
        return {"input": unbroadcast(g, np.shape(args["input"]))}

    def __repr__(self) -> str:
        return f"BroadcastTo({self.shape!r})"


class _ArgReduce(Operator):
    any_dtype_inputs = frozenset({"input"})
    output_dtype: ClassVar[str] = "int64"
    _fn: ClassVar[str]

    def __init__(self, axis: int | None = None, keepdim: bool = False) -> None:
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))):
            raise TypeError(f"{type(self).__name__}: axis must be an int or None, got {axis!r}")
        if not isinstance(keepdim, bool):
            raise TypeError(f"{type(self).__name__}: keepdim must be a bool, got {keepdim!r}")
        self.axis, self.keepdim = None if axis is None else int(axis), keepdim

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        if self.axis is None:
            return tuple(1 for _ in s) if self.keepdim else ()
        if not -len(s) <= self.axis < len(s):
            raise ShapeError(f"{type(self).__name__}: axis {self.axis} is out of range for the "
                             f"input's rank {len(s)}")
        a = self.axis % len(s)
        return tuple(1 if i == a else d for i, d in enumerate(s)) if self.keepdim else \
            tuple(d for i, d in enumerate(s) if i != a)

    def forward(self, xp: Any, input: Any) -> Any:
        t = torch_of(xp)
        if t is not None:  # (torch has no bool argmax: as uint8, the first True / False)
            input = input.to(t.uint8) if input.dtype == t.bool else input
            return getattr(t, self._fn)(input, dim=self.axis, keepdim=self.keepdim)
        out = getattr(xp, self._fn)(input, axis=self.axis, keepdims=self.keepdim)
        return out.astype(np.int64) if xp is np else out

    def vjp(self, g, out, args, wrt):
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axis={self.axis!r}, keepdim={self.keepdim!r})"


class ArgMax(_ArgReduce):
    """The index of the largest value along ``axis`` (None: of the flattened input), the
    first one at ties (``torch.argmax``), int64. No gradient."""

    _fn = "argmax"


class ArgMin(_ArgReduce):
    """The index of the smallest value along ``axis`` (``torch.argmin``), int64."""

    _fn = "argmin"


class _Extremum(_Broadcasting):
    inputs = ("left", "right")
    canonical_inputs = ("left", "right")  # (published: either is the canonical input)
    _fn: ClassVar[str]
    _sign: ClassVar[int]

    def forward(self, xp: Any, left: Any, right: Any) -> Any:
        left, right = promote(left, right)
        t = torch_of(xp)
        if backend_of(xp) == "jax" and xp.issubdtype(left.dtype, xp.inexact):
            # (jnp's own gradient is 0 for both operands where one is NaN; torch's is whole)
            return _jax_extremum(self._fn, self._sign)(*xp.broadcast_arrays(left, right))
        return getattr(t if t is not None else xp, self._fn)(left, right)

    def vjp(self, g, out, args, wrt):
        share = _shares(np, args["left"], args["right"], self._sign)
        return {k: unbroadcast((g * share[k]).astype(g.dtype, copy=False), np.shape(args[k]))
                for k in wrt}


def _shares(xp: Any, left: Any, right: Any, sign: int) -> dict[str, Any]:
    """torch's shares of the cotangent: half each at a tie (infinities too), nothing for the
    operand that loses, the whole to both where either is NaN (neither loses)."""
    win, lose = (left > right, left < right) if sign > 0 else (left < right, left > right)
    tie = left == right
    return {"left": xp.where(tie, 0.5, xp.where(lose, 0.0, 1.0)),
            "right": xp.where(tie, 0.5, xp.where(win, 0.0, 1.0))}


@functools.lru_cache(maxsize=2)
def _jax_extremum(fn: str, sign: int) -> Any:
    """``jnp.maximum`` / ``jnp.minimum`` of two arrays of one shape with torch's gradient."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def op(left: Any, right: Any) -> Any:
        return getattr(jnp, fn)(left, right)

    def fwd(left: Any, right: Any) -> tuple[Any, Any]:
        return op(left, right), (left, right)

    def bwd(res: tuple, g: Any) -> tuple:
        share = _shares(jnp, *res, sign)
        return tuple((g * share[k]).astype(x.dtype) for k, x in zip(share, res, strict=True))

    op.defvjp(fwd, bwd)
    return op


class Minimum(_Extremum):
    """The smaller of ``left`` and ``right``, elementwise (``torch.minimum``); at a tie each
    gets half the cotangent, as torch."""

    _fn, _sign = "minimum", -1


class Maximum(_Extremum):
    """The larger of ``left`` and ``right``, elementwise (``torch.maximum``); at a tie each
    gets half the cotangent, as torch."""

    _fn, _sign = "maximum", 1
