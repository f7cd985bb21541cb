"""``Arange``: the published Mithril's integer range block (positions of a sequence).

``Arange(start=0, stop, step=1)`` is ``[start, start + step, ...)`` below ``stop`` (above it
for a negative step), as ``torch.arange`` / ``numpy.arange``: ceil((stop − start) / step)
values (none if that is not positive), in int64 for integer ends. As published, the ends
may be floats (``Arange(0.0, 1.0, 0.1)``): the values are start + i·step computed in float64,
as ``torch.arange``, in the model's float dtype (or ``dtype=``: ``ml.float32``,
``"float64"``, ...); an integer range takes a float ``dtype`` too.
Each of ``start``, ``stop`` and ``step`` is an int (or float), a shape wire (``Arange(stop=x.shape[1])``, see
:mod:`mithril.models.shape_wires`) or, as published, a connection whose value the compiler
knows: the output of a ``Size`` / ``Shape`` block (``model += Size(dim=1)`` then ``model +=
Arange()``: ``stop`` is the canonical input). Its length is then known at compile time;
a connection whose value is computed at run time is a ``ShapeError`` naming it. No gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .connection_types import TBD
from .connections import IOKey
from .operator import Operator, ShapeError, torch_of
from .shape_wires import ShapeArgs, ShapeWire, array_shapes

_ENDS = ("start", "stop", "step")


def _length(start: float, stop: float, step: float) -> int:
    if all(isinstance(v, int) for v in (start, stop, step)):
        return max(0, -(-(stop - start) // step))
    return max(0, math.ceil((stop - start) / step))  # (in float64, as torch and NumPy)


class Arange(Operator):
    """See the module. ``start`` / ``stop`` / ``step`` left out (``TBD``) are inputs."""

    positional = ("start", "stop", "step", "dtype", "output")  # (the published connect's)

    def __init__(self, start: Any = 0, stop: Any = TBD, step: Any = 1, dtype: Any = None) -> None:
        self.dtype = _check_dtype(dtype)
        self._float_like = IOKey(value=np.zeros(()))
        self.ends: dict[str, Any] = {}
        for key, v in (("start", start), ("stop", stop), ("step", step)):
            self._set(key, v)
        self._update()

    def _set(self, key: str, v: Any) -> None:
        if v is TBD:
            self.ends.pop(key, None)
            return
        if not isinstance(v, ShapeWire) and (isinstance(v, (bool, np.bool_)) or not isinstance(
                v, (int, np.integer, float, np.floating))):
            raise TypeError(f"Arange: {key} must be an int, a float, a shape wire (x.shape[0]) or "
                            f"a connection (a Size block's output), got {v!r}")
        if isinstance(v, (float, np.floating)) and not math.isfinite(v):
            raise ValueError(f"Arange: {key} must be finite, got {v!r}")
        if isinstance(v, ShapeWire) and v.kind != "int":
            raise TypeError(f"Arange: {key}={v!r} is a whole shape; index it (x.shape[0])")
        self.ends[key] = v if isinstance(v, ShapeWire) else \
            float(v) if isinstance(v, (float, np.floating)) else int(v)
        if key == "step" and self.ends[key] == 0:
            raise ValueError("Arange: step must not be 0")

    def _update(self) -> None:
        wires = [v for v in self.ends.values() if isinstance(v, ShapeWire)]
        self.shape_args = ShapeArgs(wires) if wires else None
        if self.dtype is None and any(isinstance(v, float) for v in self.ends.values()):
            # float ends: the values take the model's float dtype, read from a float
            # constant the model wires in (the backend gives constants its dtype)
            if self.shape_args is None:
                self.shape_args = ShapeArgs([])
            self.shape_args.refs += (self._float_like,)
            self.shape_args.keys += ("float_like",)
        # (stop first: the canonical input, as published, that ``+=`` wires)
        self.wired = tuple(k for k in ("stop", "start", "step") if k not in self.ends)
        self.inputs = (*self.wired, *(self.shape_args.keys if self.shape_args is not None else ()))
        self.any_dtype_inputs = frozenset(self.inputs)
        self.value_inputs = frozenset(self.wired)

    def connect(self, *args: Any, **connections: Any) -> Any:
        """As any block's; an int or a shape wire given for ``start`` / ``stop`` / ``step``
        is fixed in the block (the others are connections)."""
        connections = self._named(args, connections)
        dtype = connections.pop("dtype", TBD)
        before, before_dtype = dict(self.ends), self.dtype
        if dtype is not TBD:
            self.dtype = _check_dtype(dtype)
        try:
            for key in _ENDS:
                v = connections.get(key)
                if isinstance(v, (ShapeWire, int, np.integer, float, np.floating)) and \
                        not isinstance(v, (bool, np.bool_)):
                    self._set(key, connections.pop(key))
            self._update()
            for key in _ENDS:
                if key in connections and key not in self.wired:
                    raise TypeError(f"Arange: {key} is given twice (Arange({key}=...) and "
                                    "connect)")
            return super().connect(**connections)
        except BaseException:
            self.ends, self.dtype = before, before_dtype
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
                    if v.shape != () or v.dtype.kind not in "iuf":
                        raise ShapeError(f"Arange: {key} must be one number, got {v!r}")
                    v = int(v) if v.dtype.kind in "iu" else float(v)
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
        like = args.get("float_like")
        dtype = str(like.dtype).rsplit(".", 1)[-1] if like is not None else \
            self._out_dtype((start, stop, step))
        if dtype == "int64":
            if t is not None:  # (torch refuses an empty range whose ends face the step's way)
                n = _length(start, stop, step)
                return t.arange(start, start + n * step, step, dtype=t.int64)
            return np.arange(start, stop, step, dtype=np.int64)  # (a constant under jax.jit)
        # start + i·step in float64, then cast (torch.arange's float values)
        values64 = start + np.arange(_length(start, stop, step), dtype=np.float64) * step
        if t is not None:  # (on the model's device: the constant's)
            return t.tensor(values64, dtype=getattr(t, dtype),
                            device=None if like is None else like.device)
        if dtype == "bfloat16":
            import ml_dtypes

            return values64.astype(ml_dtypes.bfloat16)
        return values64.astype(dtype)

    @property
    def output_dtype(self) -> str | None:
        """The output's dtype when it is not the model's float dtype (None: it is)."""
        if self.dtype is not None:
            return self.dtype
        return None if any(isinstance(v, float) for v in self.ends.values()) else "int64"

    def _out_dtype(self, ends: tuple) -> str:
        """``dtype``, else int64 (float ends read the model's dtype: see ``_update``)."""
        return self.dtype if self.dtype is not None else "int64"

    def vjp(self, g, out, args, wrt):
        return {}

    def __repr__(self) -> str:
        ends = [f"{k}={v!r}" for k, v in self.ends.items()]
        return "Arange(" + ", ".join(ends + ([f"dtype={self.dtype!r}"] if self.dtype else [])) + ")"


_DTYPES = ("int64", "float16", "bfloat16", "float32", "float64")


def _check_dtype(dtype: Any) -> str | None:
    """The output dtype's name (None: int64 for integer ends, float32 otherwise)."""
    if dtype is None:
        return None
    name = str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1]
    if name in ("int32", "int16", "int8", "int"):
        name = "int64"  # (integers: the positions' int64, as before)
    if name not in _DTYPES:
        raise TypeError(f"Arange: dtype must be an integer dtype or one of {_DTYPES[1:]}, got "
                        f"dtype={dtype!r}")
    return name


def _concrete(v: Any, key: str) -> Any:
    try:
        return np.asarray(v) if not hasattr(v, "item") else np.asarray(v.item())
    except Exception as e:  # (a JAX tracer: a value computed inside the jitted program)
        raise ShapeError(f"Arange: '{key}' must be known before the run (a Size / Shape "
                         "block's output or a shape wire), not computed by it") from e
