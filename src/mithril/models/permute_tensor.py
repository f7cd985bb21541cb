"""``PermuteTensor``: the published Mithril's reordering of a tensor's first axis by an index
vector, ``input[indices]`` (torch's ``input[indices]`` / ``index_select(input, 0, indices)``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputValueError
from .operator import Operator, Shape, ShapeError, backend_of, fmt


class PermuteTensor(Operator):
    """``output[i] = input[indices[i]]`` along the first axis, as the published Mithril's
    ``PermuteTensor`` and torch's ``input[indices]``: ``indices`` is an integer vector as long
    as that axis (a permutation in the published use; a repeated index is allowed, and its
    rows' gradients add up). Negative indices count from the end, as torch's. The gradient
    of ``input`` scatters the output's cotangent back (``index_add``); ``indices`` is not
    differentiable. An index outside [−N, N) is an ``InputValueError`` naming the key, before
    the backend runs; one the model computes is an ``IndexError`` (NumPy, torch) or a NaN row
    (JAX, which cannot raise under jit)."""

    inputs = ("input", "indices")
    int_inputs = frozenset({"indices"})
    value_checked_inputs = frozenset({"indices"})

    def infer_shape(self, shapes):
        s, i = shapes.get("input"), shapes.get("indices")
        if s is not None and not s:
            raise ShapeError("PermuteTensor: 'input' needs at least one axis, got shape []")
        if i is not None and len(i) != 1:
            raise ShapeError(f"PermuteTensor: 'indices' must be a vector, got shape {fmt(i)}")
        if s is not None and i is not None and None not in (s[0], i[0]) and s[0] != i[0]:
            raise ShapeError(f"PermuteTensor: 'indices' {fmt(i)} must be as long as the first "
                             f"axis of 'input' {fmt(s)}")
        if s is None:
            return None
        return (s[0] if s[0] is not None or i is None else i[0], *s[1:])

    def check_inputs(self, shapes: Mapping[str, Shape | None], dtypes: Mapping[str, str],
                     arrays: Mapping[str, Any], names: Mapping[str, str]) -> None:
        """Each index in [−N, N) for an input of N rows (the compiler checks the dtype)."""
        idx, s = arrays.get("indices"), shapes.get("input")
        if idx is None or s is None or not np.prod(idx.shape):
            return
        n, lo, hi = s[0], int(idx.min()), int(idx.max())
        if lo < -n or hi >= n:
            raise InputValueError(f"PermuteTensor: indices '{names['indices']}': index "
                                  f"{hi if hi >= n else lo} is out of range for {n} rows")

    def forward(self, xp: Any, input: Any, indices: Any) -> Any:
        if backend_of(xp) == "torch":
            return input[indices.long()]
        if backend_of(xp) == "jax":  # (indices the model computes: JAX cannot raise under jit,
            # so a row out of range is NaN rather than a clamped one; negatives count from the end)
            return input.at[indices].get(mode="fill", fill_value=xp.nan)
        return input[indices]

    def vjp(self, g, out, args, wrt):
        gx = np.zeros_like(g)
        np.add.at(gx, args["indices"], g)
        return {"input": gx}
