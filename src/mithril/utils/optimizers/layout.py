"""Where each parameter lives in an optimizer's flat buffers.

Built-in optimizers keep every parameter (and each state slot) of one dtype in a single
flat buffer: one fused kernel then touches each byte once, whatever the number of tensors.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np


class Layout:
    """Names, shapes and offsets of parameters packed into one flat buffer."""

    def __init__(self, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], dtype: str,
                 align: int = 1) -> None:
        """``align``: every offset is a multiple of this many elements (zero-copy aliasing
        of slices by JAX needs 64-byte aligned buffers); the gaps are never touched."""
        self.names, self.shapes, self.dtype, self.align = names, shapes, dtype, align
        self.index = {n: i for i, n in enumerate(names)}
        self.name_list, self.shape_list = list(names), list(shapes)  # for C-speed comparisons
        self.sizes = np.array([int(np.prod(s, dtype=np.int64)) for s in shapes], dtype=np.int64)
        padded = -(-self.sizes // align) * align
        self.offsets = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
        self.total = int(padded.sum())

    @classmethod
    def of(cls, params: Mapping[str, Any], dtype_name: Any) -> Layout:
        return cls(tuple(params), tuple(tuple(int(d) for d in p.shape) for p in params.values()),
                   dtype_name(next(iter(params.values()))) if params else "float32")

    def aligned(self, align: int) -> Layout:
        return self if align == self.align else Layout(self.names, self.shapes, self.dtype, align)

    def flatten_numpy(self, per_param: Mapping[str, Any]) -> np.ndarray:
        """A flat host buffer holding ``per_param`` arrays at this layout's offsets."""
        flat = np.zeros(self.total, dtype=np.asarray(next(iter(per_param.values()))).dtype
                        if per_param else np.float32)
        for n, a, b, _ in self.spans():
            flat[a:b] = np.asarray(per_param[n]).reshape(-1)
        return flat

    def spans(self) -> Any:
        """(name, start, stop, shape) of every parameter."""
        for n, o, s, shp in zip(self.names, self.offsets, self.sizes, self.shapes):
            yield n, int(o), int(o + s), shp

    def unflatten(self, flat: Any) -> dict[str, Any]:
        """Per-parameter views (NumPy/torch) or slices (JAX) of a flat buffer."""
        return {n: flat[a:b].reshape(shp) for n, a, b, shp in self.spans()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and (self.names, self.shapes, self.dtype, self.align) == (
            other.names, other.shapes, other.dtype, other.align)

    def __hash__(self) -> int:
        return hash((self.names, self.shapes, self.dtype, self.align))


def slot_shape_of(opt: Any, slot: str, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """``opt.slot_shape(slot, shape, name)``, or without ``name`` for an override written
    before it was passed (a user's ``slot_shape(self, slot, shape)``)."""
    f = type(opt).slot_shape
    takes = _TAKES_NAME.get(f)
    if takes is None:
        takes = _TAKES_NAME[f] = "name" in inspect.signature(f).parameters
    return opt.slot_shape(slot, shape, name) if takes else opt.slot_shape(slot, shape)


_TAKES_NAME: dict[Any, bool] = {}
