"""The published ``TensorToList``: a tensor's values as a (nested) list, kept an array here.

Published, ``TensorToList().connect(input=x)`` is ``x.tolist()``: a nested Python list of
the same values, for what takes numbers rather than a tensor (``Sum(axis=TBD)``'s axis,
``x.reshape(to_list.output)``) or, through ``to_list.output.tensor()``, a tensor again. A list
is a Python value, so no gradient flows through it: torch's ``x.tolist()`` leaves the graph.

Here a wire carries one array, and numbers given where a block takes them are already arrays
(as a ``Shape`` output is; see :mod:`~mithril.models.scalar_blocks`). So the output is the
input's array as is (same values, shape and dtype: an int tensor's list is ints, a float
tensor's floats), and its gradient is 0 on the three backends:

    output = x,    d output / d x = 0   (torch ``x.tolist()``, ``jax.lax.stop_gradient``)

What is computed from the output therefore does not differentiate into ``x``;
``TensorToList().connect(x)`` then ``Multiply()`` by ``x`` has the gradient ``x`` (torch's
``x * torch.tensor(x.tolist())``), not ``2x``. Unlike the published operator it needs no
``jit=False`` (the published compile refuses ``jit=True`` here: there is nothing to refuse).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .connection_types import TBD
from .operator import Operator, stop_gradient

__all__ = ["TensorToList"]


class TensorToList(Operator):
    """The published ``TensorToList(input=TBD)``: terminals ``input`` and ``output``; the
    output is the input's values (any dtype) with no gradient (see the module)."""

    any_dtype_inputs = frozenset({"input"})
    vjp_ignores = frozenset({"output"})

    def __init__(self, input: Any = TBD) -> None:
        if input is not TBD and not isinstance(input, (bool, int, float, list, tuple,
                                                        np.ndarray, np.generic)):
            raise TypeError(f"TensorToList: input must be a tensor's values (a number, a list "
                            f"of numbers or an array) or given in connect, got "
                            f"{type(input).__name__}")
        self._value = input

    def connect(self, *args: Any, **connections: Any) -> Any:
        """As published, ``connect(input, output)``; the constructor's ``input`` is the
        default input."""
        connections = self._named(args, connections)
        if "input" not in connections and self._value is not TBD:
            connections["input"] = self._value
        return super().connect(**connections)

    __call__ = connect

    def infer_shape(self, shapes):
        return shapes.get("input")

    @property
    def output_dtype(self) -> str | None:
        return None  # the input's (an int tensor's list is ints)

    def forward(self, xp: Any, input: Any) -> Any:
        return stop_gradient(xp, input)

    def passes_value(self, values: Any) -> Any:
        return values.get("input")  # (the list of a known value: sizes for a Reshape)

    def vjp(self, g, out, args, wrt):
        return {"input": np.zeros_like(args["input"])}

    def __repr__(self) -> str:
        return "TensorToList()"
