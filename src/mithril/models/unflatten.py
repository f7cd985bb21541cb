"""``Unflatten``, as ``torch.nn.Unflatten``: one axis split into several."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .operator import Operator, ShapeError, fmt


class Unflatten(Operator):
    """The input with axis ``dim`` replaced by the axes ``unflattened_size``, as
    ``torch.nn.Unflatten(dim, unflattened_size)`` / ``Tensor.unflatten``: their product must
    be that axis's size; one entry may be -1 (the size left over, as torch). The gradient is
    reshaped back."""

    any_dtype_inputs = frozenset({"input"})

    def __init__(self, dim: int, unflattened_size: Sequence[int]) -> None:
        if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"Unflatten: dim must be an int, got {dim!r}")
        sizes = tuple(unflattened_size) if isinstance(unflattened_size, (tuple, list)) else None
        if not sizes or any(isinstance(d, (bool, np.bool_)) or not isinstance(
                d, (int, np.integer)) or d < -1 for d in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"Unflatten: unflattened_size must be a non-empty tuple of sizes "
                             f">= 0 with at most one -1, got {unflattened_size!r}")
        self.dim, self.sizes = int(dim), tuple(int(d) for d in sizes)

    def _split(self, s: tuple) -> tuple[int, tuple]:
        """The axis (non-negative) and the sizes it becomes (None where unknown)."""
        if not -len(s) <= self.dim < len(s):
            raise ShapeError(f"Unflatten: dim {self.dim} is out of range for 'input' of shape "
                             f"{fmt(s)}")
        ax, n = self.dim % len(s), s[self.dim]
        known = math.prod(d for d in self.sizes if d != -1)
        if n is None:
            return ax, tuple(None if d == -1 else d for d in self.sizes)
        if -1 in self.sizes and known and n % known == 0:
            return ax, tuple(n // known if d == -1 else d for d in self.sizes)
        if -1 not in self.sizes and known == n:
            return ax, self.sizes
        raise ShapeError(f"Unflatten: axis {self.dim} of 'input' {fmt(s)} has size {n}, which "
                         f"cannot be split into {list(self.sizes)}")

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        ax, sizes = self._split(tuple(s))
        return (*s[:ax], *sizes, *s[ax + 1:])

    def forward(self, xp: Any, input: Any) -> Any:
        ax, sizes = self._split(tuple(int(d) for d in input.shape))
        return input.reshape((*input.shape[:ax], *sizes, *input.shape[ax + 1:]))

    def vjp(self, g, out, args, wrt):
        return {"input": g.reshape(args["input"].shape)}

    def __repr__(self) -> str:
        return f"Unflatten(dim={self.dim}, unflattened_size={self.sizes})"
