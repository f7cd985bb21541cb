"""``Arange``: the published Mithril's integer range block (positions of a sequence).

``Arange(start=0, stop, step=1)`` is ``[start, start + step, ...)`` below ``stop`` (above it
for a negative step), as ``torch.arange`` / ``numpy.arange``, in int64. Each of ``start``,
``stop`` and ``step`` is an int, a shape wire (``Arange(stop=x.shape[1])``, see
:mod:`mithril.models.shape_wires`) or, as published, a connection whose value the compiler
knows: the output of a ``Size`` / ``Shape`` block (``model += Size(dim=1)`` then ``model +=
Arange()``: ``stop`` is the canonical input). Its length is then known at compile time;
a connection whose value is computed at run time is a ``ShapeError`` naming it. No gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .connection_types import TBD
from .operator import Operator, ShapeError, torch_of
from .shape_wires import ShapeArgs, ShapeWire, array_shapes

_ENDS = ("start", "stop", "step")


def _length(start: int, stop: int, step: int) -> int:
    return max(0, -(-(stop - start) // step))


class Arange(Operator):
    """See the module. ``start`` / ``stop`` / ``step`` left out (``TBD``) are inputs."""

    positional = ("start", "stop", "step", "dtype", "output")  # (the published connect's)

    def __init__(self, start: Any = 0, stop: Any = TBD, step: Any = 1, dtype: Any = None) -> None:
        _check_dtype(dtype)
        self.ends: dict[str, Any] = {}
        for key, v in (("start", start), ("stop", stop), ("step", step)):
            self._set(key, v)
        self._update()

    def _set(self, key: str, v: Any) -> None:
        if v is TBD:
            self.ends.pop(key, None)
            return
        if not isinstance(v, ShapeWire) and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise TypeError(f"Arange: {key} must be an int, a shape wire (x.shape[0]) or a "
                            f"connection (a Size block's output), got {v!r}")
        if isinstance(v, ShapeWire) and v.kind != "int":
            raise TypeError(f"Arange: {key}={v!r} is a whole shape; index it (x.shape[0])")
        self.ends[key] = v if isinstance(v, ShapeWire) else int(v)
        if key == "step" and self.ends[key] == 0:
            raise ValueError("Arange: step must not be 0")

    def _update(self) -> None:
        wires = [v for v in self.ends.values() if isinstance(v, ShapeWire)]
        self.shape_args = ShapeArgs(wires) if wires else None
        # (stop first: the canonical input, as published, that ``+=`` wires)
        self.wired = tuple(k for k in ("stop", "start", "step") if k not in self.ends)
        self.inputs = (*self.wired, *(self.shape_args.keys if self.shape_args is not None else ()))
        self.any_dtype_inputs = frozenset(self.inputs)
        self.value_inputs = frozenset(self.wired)

    def connect(self, *args: Any, **connections: Any) -> Any:
        """As any block's; an int or a shape wire given for ``start`` / ``stop`` / ``step``
        is fixed in the block (the others are connections)."""
        if len(args) > len(self.positional):
            raise TypeError(f"Arange.connect takes at most 5 positional connections (start, "
                            f"stop, step, dtype, output), got {len(args)}")
        for key, v in zip(self.positional, args, strict=False):
            if key in connections:
                raise TypeError(f"Arange.connect got two values for {key!r}")
            connections[key] = v
        if connections.get("dtype", TBD) is not TBD:
            _check_dtype(connections["dtype"])
        connections.pop("dtype", None)
        before = dict(self.ends)
        try:
            for key in _ENDS:
                v = connections.get(key)
                if isinstance(v, (ShapeWire, int, np.integer)) and not isinstance(v, bool):
                    self._set(key, connections.pop(key))
            self._update()
            for key in _ENDS:
                if key in connections and key not in self.wired:
                    raise TypeError(f"Arange: {key} is given twice (Arange({key}=...) and "
                                    "connect)")
            return super().connect(**connections)
        except BaseException:
            self.ends = before
            self._update()
            raise

    def _ends(self, values: Mapping[str, Any], shapes: Mapping[str, Any]) -> tuple | None:
        lookup = self.shape_args.lookup(shapes) if self.shape_args is not None else None
        got = []
        for key in _ENDS:
            v = self.ends.get(key)
            if isinstance(v, ShapeWire):
                v = v.evaluate(lookup)  # type: ignore[arg-type]
            elif v is None:
                v = values.get(key)
                if v is not None:
                    v = np.asarray(v)
                    if v.shape != () or v.dtype.kind not in "iu":
                        raise ShapeError(f"Arange: {key} must be one integer, got {v!r}")
                    v = int(v)
            if v is None:
                return None
            got.append(v)
        if got[2] == 0:
            raise ShapeError("Arange: step is 0")
        return tuple(got)

    def infer_shape(self, shapes, values: Mapping[str, Any] | None = None):
        """``values``: the compile-time values of the connected ends (``None``: known once
        the input shapes are; left out: a value the run computes, refused)."""
        values = values or {}
        never = [k for k in self.wired if k not in values]
        if never:
            raise ShapeError(f"Arange: the value of '{never[0]}' is computed by the run, so its "
                             "length is not known at compile time: give an int, a shape wire "
                             "(x.shape[0]) or a Size / Shape block's output")
        ends = self._ends(values, shapes)
        return (None,) if ends is None else (_length(*ends),)

    def forward(self, xp: Any, **args: Any) -> Any:
        shapes = array_shapes(args, self.shape_args.keys) if self.shape_args is not None else {}
        values = {k: _concrete(args[k], k) for k in self.wired}
        start, stop, step = self._ends(values, shapes)  # type: ignore[misc]
        t = torch_of(xp)
        if t is not None:
            return t.arange(start, stop, step, dtype=t.int64)
        return np.arange(start, stop, step, dtype=np.int64)  # (a constant under jax.jit)

    def vjp(self, g, out, args, wrt):
        return {}

    def __repr__(self) -> str:
        return "Arange(" + ", ".join(f"{k}={v!r}" for k, v in self.ends.items()) + ")"


def _check_dtype(dtype: Any) -> None:
    if dtype is not None and np.dtype(str(dtype).rsplit(".", 1)[-1]).kind not in "iu":
        raise TypeError(f"Arange: only an integer range is offered here (dtype int64), got "
                        f"dtype={dtype!r}; scale it as an expression for floats")


def _concrete(v: Any, key: str) -> int:
    try:
        return int(np.asarray(v) if not hasattr(v, "item") else v.item())
    except Exception as e:  # (a JAX tracer: a value computed inside the jitted program)
        raise ShapeError(f"Arange: '{key}' must be known before the run (a Size / Shape "
                         "block's output or a shape wire), not computed by it") from e
