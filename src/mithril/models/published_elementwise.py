"""More of the published Mithril's primitives, as torch's: ``Floor``, ``Clamp(min_val,
max_val)``, ``IsNan``, ``NanToNum(nan, posinf, neginf)`` (elementwise), ``Squeeze`` (every
axis of size 1 removed), ``SwapAxes(axis1, axis2)``, ``AtLeast1D`` and ``Eye(N, M, dtype)``.

Gradients are torch autograd's: 0 for ``Floor``; for ``Clamp`` the cotangent where
min_val <= x <= max_val (both ends included), 0 outside; for ``NanToNum`` the cotangent
where the input is finite, 0 where it was replaced; the shaping blocks move it back. ``IsNan``
gives bools and ``Eye`` a constant (the model's float dtype unless ``dtype`` is given)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .connections import IOKey
from .operator import Operator, ShapeError, torch_of
from .shape_wires import ShapeArgs
from .tensor_creation import _dtype_name


def _number(v: Any, who: str, key: str, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{who}: {key} must be a number{' or None' if optional else ''}, got {v!r}")
    return float(v)


class Floor(Operator):
    """⌊x⌋ (``torch.floor``); gradient 0, as torch's."""

    def forward(self, xp: Any, input: Any) -> Any:
        t = torch_of(xp)
        return t.floor(input) if t is not None else xp.floor(input)

    def vjp(self, g, out, args, wrt):
        return {"input": np.zeros_like(g)}


class Clamp(Operator):
    """min(max(x, min_val), max_val) (``torch.clamp``); gradient 1 where min_val <= x <=
    max_val, else 0 (torch's)."""

    def __init__(self, min_val: float | None = None, max_val: float | None = None) -> None:
        self.min_val = _number(min_val, "Clamp", "min_val", optional=True)
        self.max_val = _number(max_val, "Clamp", "max_val", optional=True)
        if self.min_val is None and self.max_val is None:
            raise ValueError("Clamp: give min_val, max_val or both")

    def forward(self, xp: Any, input: Any) -> Any:
        t = torch_of(xp)
        if t is not None:
            return t.clamp(input, min=self.min_val, max=self.max_val)
        clipped = xp.clip(input, self.min_val, self.max_val)
        if xp is np:
            return clipped
        # (JAX: the input itself at the ends too, so its gradient there is torch's 1)
        keep = (input >= (-np.inf if self.min_val is None else self.min_val)) & \
            (input <= (np.inf if self.max_val is None else self.max_val))
        return xp.where(keep, input, clipped)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        keep = np.ones(x.shape, dtype=bool)
        if self.min_val is not None:
            keep &= x >= self.min_val
        if self.max_val is not None:
            keep &= x <= self.max_val
        return {"input": np.where(keep, g, 0).astype(g.dtype, copy=False)}

    def __repr__(self) -> str:
        return f"Clamp(min_val={self.min_val!r}, max_val={self.max_val!r})"


class IsNan(Operator):
    """x is NaN (bool; ``torch.isnan``). No gradient."""

    any_dtype_inputs = frozenset({"input"})
    output_dtype: ClassVar[str] = "bool"

    def forward(self, xp: Any, input: Any) -> Any:
        t = torch_of(xp)
        return t.isnan(input) if t is not None else xp.isnan(input)

    def vjp(self, g, out, args, wrt):
        return {}


class NanToNum(Operator):
    """NaN → ``nan``, +inf → ``posinf``, −inf → ``neginf`` (None: the dtype's largest /
    smallest finite value), as ``torch.nan_to_num``; gradient where the input is finite."""

    def __init__(self, nan: float = 0.0, posinf: float | None = None, neginf: float | None = None) -> None:
        self.nan = _number(nan, "NanToNum", "nan")
        self.posinf = _number(posinf, "NanToNum", "posinf", optional=True)
        self.neginf = _number(neginf, "NanToNum", "neginf", optional=True)

    def forward(self, xp: Any, input: Any) -> Any:
        t = torch_of(xp)
        if t is not None:
            return t.nan_to_num(input, nan=self.nan, posinf=self.posinf, neginf=self.neginf)
        return xp.nan_to_num(input, nan=self.nan, posinf=self.posinf, neginf=self.neginf)

    def vjp(self, g, out, args, wrt):
        return {"input": np.where(np.isfinite(args["input"]), g, 0).astype(g.dtype, copy=False)}

    def __repr__(self) -> str:
        return f"NanToNum(nan={self.nan!r}, posinf={self.posinf!r}, neginf={self.neginf!r})"


class Squeeze(Operator):
    """The input without its axes of size 1 (``torch.squeeze``, all of them)."""

    any_dtype_inputs = frozenset({"input"})

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        if any(d is None for d in s):
            raise ShapeError(f"Squeeze: which axes have size 1 is not known for an input of shape "
                             f"{list(s)}: declare its free sizes")
        return tuple(d for d in s if d != 1)

    def forward(self, xp: Any, input: Any) -> Any:
        return input.reshape(tuple(d for d in input.shape if d != 1))

    def vjp(self, g, out, args, wrt):
        return {"input": g.reshape(args["input"].shape)}


class SwapAxes(Operator):
    """The input with axes ``axis1`` and ``axis2`` exchanged (``torch.swapaxes``)."""

    any_dtype_inputs = frozenset({"input"})

    def __init__(self, axis1: int, axis2: int) -> None:
        for key, v in (("axis1", axis1), ("axis2", axis2)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"SwapAxes: {key} must be an int, got {v!r}")
        self.axis1, self.axis2 = int(axis1), int(axis2)

    def _axes(self, rank: int) -> tuple[int, int]:
        for a in (self.axis1, self.axis2):
            if not -rank <= a < rank:
                raise ShapeError(f"SwapAxes: axis {a} is out of range for the input's rank {rank}")
        return self.axis1 % rank, self.axis2 % rank

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        a, b = self._axes(len(s))
        out = list(s)
        out[a], out[b] = out[b], out[a]
        return tuple(out)

    def forward(self, xp: Any, input: Any) -> Any:
        t = torch_of(xp)
        a, b = self._axes(input.ndim)
        return t.swapaxes(input, a, b) if t is not None else xp.swapaxes(input, a, b)

    def vjp(self, g, out, args, wrt):
        a, b = self._axes(g.ndim)
        return {"input": np.swapaxes(g, a, b)}

    def __repr__(self) -> str:
        return f"SwapAxes({self.axis1}, {self.axis2})"


class AtLeast1D(Operator):
    """The input, a 0-d one as shape (1,) (``torch.atleast_1d``)."""

    any_dtype_inputs = frozenset({"input"})

    def infer_shape(self, shapes):
        s = shapes.get("input")
        return None if s is None else (s if len(s) else (1,))

    def forward(self, xp: Any, input: Any) -> Any:
        return input.reshape((1,)) if input.ndim == 0 else input

    def vjp(self, g, out, args, wrt):
        return {"input": g.reshape(args["input"].shape)}


class Eye(Operator):
    """The N × M identity (M = N by default; ``torch.eye``), in ``dtype`` (default: the
    model's float dtype, read from a float constant the model wires in, as ``Ones``)."""

    positional = ("output",)  # (N, M and dtype are fixed in the constructor)

    def __init__(self, N: int, M: int | None = None, dtype: Any = None) -> None:  # noqa: N803
        for key, v in (("N", N), ("M", M)):
            if v is None and key == "M":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise TypeError(f"Eye: {key} must be an int >= 0, got {v!r}")
        self.n, self.m = int(N), int(N if M is None else M)
        self.dtype = _dtype_name(dtype, "Eye")
        self.shape_args = ShapeArgs([])
        self.shape_args.refs, self.shape_args.keys = (IOKey(value=np.zeros(())),), ("float_like0",)
        self.inputs = ("float_like0",)
        self.any_dtype_inputs = frozenset(self.inputs)

    @property
    def output_dtype(self) -> str | None:
        return self.dtype

    def infer_shape(self, shapes):
        return (self.n, self.m)

    def forward(self, xp: Any, float_like0: Any) -> Any:
        name = self.dtype or str(float_like0.dtype).rsplit(".", 1)[-1]
        t = torch_of(xp)
        if t is not None:
            return t.eye(self.n, self.m, dtype=getattr(t, name), device=float_like0.device)
        if name == "bfloat16":
            import ml_dtypes

            return np.eye(self.n, self.m, dtype=ml_dtypes.bfloat16)
        return xp.eye(self.n, self.m, dtype=name)

    def vjp(self, g, out, args, wrt):
        return {}

    def __repr__(self) -> str:
        return f"Eye({self.n}, {self.m}" + (f", dtype={self.dtype!r})" if self.dtype else ")")
