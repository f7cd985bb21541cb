"""``Split``: equal pieces of an array along an axis, one output per piece (and, as published,
one ``output`` holding them all), built from the ``_Chunk`` operator."""

from __future__ import annotations

from typing import Any

import numpy as np

from .model import IOKey, Model
from .operator import Operator, ShapeError


class _Chunk(Operator):
    """Piece ``i`` of ``n`` equal pieces of the input along ``axis`` (see :class:`Split`)."""

    any_dtype_inputs = frozenset({"input"})

    def __init__(self, i: int, n: int, axis: int) -> None:
        self.i, self.n, self.axis = i, n, axis

    def _slice(self, ndim: int, size: int) -> tuple:
        ax = self.axis % ndim
        k = size // self.n
        return (*(slice(None),) * ax, slice(self.i * k, (self.i + 1) * k))

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        if not -len(s) <= self.axis < len(s):
            raise ShapeError(f"axis {self.axis} is out of range for rank {len(s)}")
        ax = self.axis % len(s)
        d = s[ax]
        if d is not None and d % self.n:
            raise ShapeError(f"axis {self.axis} of size {d} does not split into {self.n} equal parts")
        return (*s[:ax], None if d is None else d // self.n, *s[ax + 1:])

    def forward(self, xp: Any, input: Any) -> Any:
        return input[self._slice(input.ndim, input.shape[self.axis])]

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        gx = np.zeros_like(x)
        gx[self._slice(x.ndim, x.shape[self.axis])] = g
        return {"input": gx}


class Split(Model):
    """``split_size`` equal pieces of ``input`` along ``axis``, as outputs ``output_0`` ..
    ``output_<split_size - 1>``. The published Mithril returns them as one list ``output``:
    ``connect(output="split_out")`` (or ``connect(input, "split_out")``) gives that output
    too, the pieces stacked on a new first axis, so ``model.split_out[i]`` is piece i, as
    published (the published GPT's ``model.split_out[0].reshape(...)``)."""

    def __init__(self, split_size: int, axis: int = 0) -> None:
        super().__init__()
        if not isinstance(split_size, int) or split_size < 1:
            raise ValueError(f"Split: split_size must be a positive int, got {split_size!r}")
        self.split_size, self.axis = split_size, axis
        for i in range(split_size):
            self |= _Chunk(i, split_size, axis)(input="input", output=f"output_{i}")

    def connect(self, *args: Any, **connections: Any) -> Any:
        """As any model's; positionally ``input``, ``output`` (published); ``output=`` adds
        the stacked pieces as the output ``output`` (see the class)."""
        if len(args) > 2:
            raise TypeError(f"Split.connect takes at most 2 positional connections (input, "
                            f"output), got {len(args)}")
        for key, v in zip(("input", "output"), args, strict=False):
            if key in connections:
                raise TypeError(f"Split.connect got two values for {key!r}")
            connections[key] = v
        if "output" not in connections or "output" in self.conns:
            return super().connect(**connections)
        from .shaping import Concat, Indexer

        snap = self._snapshot()
        try:
            rows = []
            for i in range(self.split_size):
                row = Indexer((None,))  # (piece i with a new first axis of 1)
                self |= row.connect(input=f"output_{i}", output=IOKey())
                rows.append(row.output)
            self |= Concat(self.split_size, axis=0).connect(
                **{f"input{i + 1}": r for i, r in enumerate(rows)}, output="output")
            return super().connect(**connections)
        except BaseException:
            self._restore(snap)
            raise
        finally:
            self._new_roles = self._declared = None
