"""Where each parameter lives in an optimizer's flat buffers.

Built-in optimizers keep every parameter (and each state slot) of one dtype in a single
flat buffer: one fused kernel then touches each byte once, whatever the number of tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class Layout:
    """Names, shapes and offsets of parameters packed into one flat buffer."""

    def __init__(self, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], dtype: str) -> None:
        self.names, self.shapes, self.dtype = names, shapes, dtype
        self.index = {n: i for i, n in enumerate(names)}
        self.sizes = np.array([int(np.prod(s, dtype=np.int64)) for s in shapes], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.total = int(self.sizes.sum())

    @classmethod
    def of(cls, params: Mapping[str, Any], dtype_name: Any) -> Layout:
        return cls(tuple(params), tuple(tuple(int(d) for d in p.shape) for p in params.values()),
                   dtype_name(next(iter(params.values()))) if params else "float32")

    def spans(self) -> Any:
        """(name, start, stop, shape) of every parameter."""
        for n, o, s, shp in zip(self.names, self.offsets, self.sizes, self.shapes):
            yield n, int(o), int(o + s), shp

    def unflatten(self, flat: Any) -> dict[str, Any]:
        """Per-parameter views (NumPy/torch) or slices (JAX) of a flat buffer."""
        return {n: flat[a:b].reshape(shp) for n, a, b, shp in self.spans()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and (self.names, self.shapes, self.dtype) == (
            other.names, other.shapes, other.dtype)

    def __hash__(self) -> int:
        return hash((self.names, self.shapes, self.dtype))
