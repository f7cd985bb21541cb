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
  of another size is a ``ShapeError`` naming it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .connection_types import TBD
from .operator import Operator, ShapeError, fmt
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
        for key, v in zip(self.positional, args, strict=False):
            if key in connections:
                raise TypeError(f"ToTensor.connect got two values for {key!r}")
            connections[key] = v
        if len(args) > 3:
            raise TypeError(f"ToTensor.connect takes at most 3 positional connections (input, "
                            f"dtype, output), got {len(args)}")
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
        return input if self._cast is None else self._cast.forward(xp, input)

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
