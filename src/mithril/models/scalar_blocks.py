"""The published ``ToTensor`` and ``Item``, for a model whose every connection is an array.

The published Mithril has scalar connections (ints, floats, tuples: a ``Shape`` output, a
number given to ``connect``) beside tensors; ``ToTensor`` makes a tensor of one and ``Item``
a Python number of a one-element tensor. Here a ``Shape`` / ``Size`` output and a number
given to ``connect`` are already arrays (integer ones stay integer), so:

* ``ToTensor(input=TBD, dtype=None)`` passes its input on as an array, in ``dtype`` when
  given (``ToTensor([1, 2, 3])`` or ``ToTensor().connect(input=[1, 2, 3])``: the constant's
  values, int64 here as an int tensor of the published). No gradient flows through it (the
  published input is a scalar, which has none);
* ``Item()`` is the 0-d array of a one-element input (its gradient reshaped back); an input
  of another size is a ``ShapeError`` naming it;
* ``Slice(start, stop, step)`` is a static slice (ints, None or shape wires, in the
  constructor or ``connect``) for ``Indexer().connect(input=x, index=slice_block.output)``,
  as published; the index is fixed when that ``Indexer`` is connected, and the ``Slice``
  block computes nothing (its output, if exposed, is an empty int64 array).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .connection_types import TBD
from .operator import Operator, ShapeError, fmt, stop_gradient, torch_of
from .primitives import Cast


class ToTensor(Operator):
    """Its input as an array, in ``dtype`` if given (see the module). No gradient."""

    any_dtype_inputs = frozenset({"input"})
    positional = ("input", "dtype", "output")

    def __init__(self, input: Any = TBD, dtype: Any = None) -> None:
        self._cast = None if dtype is None else Cast(dtype)
        self.dtype = None if dtype is None else self._cast.dtype
        if input is not TBD and not isinstance(input, (bool, int, float, list, tuple,
                                                        np.ndarray, np.generic)):
            raise TypeError(f"ToTensor: input must be a number, a list / tuple of numbers or an "
                            f"array (or given in connect), got {type(input).__name__}")
        self._value = input

    @property
    def output_dtype(self) -> str | None:
        return self.dtype

    def connect(self, *args: Any, **connections: Any) -> Any:
        """As published, ``connect(input, dtype, output)``; ``dtype`` is set here and the
        constructor's ``input`` is the default input."""
        connections = self._named(args, connections)
        before = (self._cast, self.dtype)
        if connections.get("dtype") is not None:
            self._cast = Cast(connections["dtype"])
            self.dtype = self._cast.dtype
        connections.pop("dtype", None)
        if "input" not in connections and self._value is not TBD:
            connections["input"] = self._value
        try:
            return super().connect(**connections)
        except BaseException:
            self._cast, self.dtype = before
            raise

    def infer_shape(self, shapes):
        return shapes.get("input")

    def forward(self, xp: Any, input: Any) -> Any:
        # (no gradient on every backend: autograd would otherwise flow through a tensor input
        # on torch and JAX, as NumPy's absent VJP does not)
        return stop_gradient(xp, input if self._cast is None else self._cast.forward(xp, input))

    def passes_value(self, values: Any) -> Any:
        """A known value as it is (an integer one stays one without a cast)."""
        v = values.get("input")
        return v if self._cast is None else None

    def vjp(self, g, out, args, wrt):
        return {}

    def __repr__(self) -> str:
        return "ToTensor()" if self.dtype is None else f"ToTensor(dtype={self.dtype!r})"


class Item(Operator):
    """The one element of its input as a 0-d array (``tensor.item()``, kept an array here);
    its gradient is the cotangent in the input's shape."""

    any_dtype_inputs = frozenset({"input"})

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is not None and all(d is not None for d in s) and int(np.prod(s)) != 1:
            raise ShapeError(f"Item: 'input' has shape {fmt(s)}, not one element")
        return None if s is None else ()

    def forward(self, xp: Any, input: Any) -> Any:
        if int(np.prod(input.shape)) != 1:
            raise ShapeError(f"Item: 'input' has shape {list(input.shape)}, not one element")
        return input.reshape(())

    def vjp(self, g, out, args, wrt):
        return {"input": np.reshape(g, args["input"].shape)}


class Slice(Operator):
    """A static slice for ``Indexer``'s index (see the module)."""

    inputs: tuple = ()
    positional = ("start", "stop", "step", "output")

    def __init__(self, start: Any = None, stop: Any = None, step: Any = None) -> None:
        self._set(start, stop, step)

    def _set(self, start: Any, stop: Any, step: Any) -> None:
        from .shape_wires import ShapeWire

        for v, what in ((start, "start"), (stop, "stop"), (step, "step")):
            if v is not None and v is not TBD and not (isinstance(v, ShapeWire) and v.kind == "int") \
                    and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))):
                raise TypeError(f"Slice: {what} must be an int, None or a shape wire (x.shape[0]), "
                                f"got {v!r}")
        if step is not None and step is not TBD and not isinstance(step, ShapeWire) and step == 0:
            raise ValueError("Slice: step must not be 0")
        self.start, self.stop, self.step = (None if v is TBD else v for v in (start, stop, step))

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop, self.step)

    def connect(self, *args: Any, **connections: Any) -> Any:
        """``connect(start, stop, step, output)`` as published: the ends are set here."""
        connections = self._named(args, connections)
        ends = {k: connections.pop(k) for k in ("start", "stop", "step") if k in connections}
        before = (self.start, self.stop, self.step)
        self._set(*(ends.get(k, v) for k, v in zip(("start", "stop", "step"), before, strict=True)))
        try:
            return super().connect(**connections)
        except BaseException:
            self.start, self.stop, self.step = before
            raise

    __call__ = connect

    output_dtype = "int64"

    def infer_shape(self, shapes):
        return (0,)

    def forward(self, xp: Any) -> Any:
        t = torch_of(xp)  # (nothing: the slice lives in the Indexer it was given to)
        return t.zeros((0,), dtype=t.int64) if t is not None else xp.zeros((0,), dtype=np.int64)

    def vjp(self, g, out, args, wrt):
        return {}

    def __repr__(self) -> str:
        return f"Slice({self.start!r}, {self.stop!r}, {self.step!r})"
