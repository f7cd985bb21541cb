"""Indexing by connections: ``x[rows, cols]`` where the indices are computed by the model.

The published CLIP text model pools its last hidden state at each sequence's end token:
``last_hidden_state[arange_out, argmax_out]`` (an ``Arange`` over the batch and an ``ArgMax``
of the token ids). :class:`GatherIndexer` is that NumPy / torch advanced indexing: the index
items that are connections are integer arrays (``index0``, ``index1``, ... in order), read when
the model runs; the other items are static ints, full slices (``:``) or one ``...``. The index
arrays broadcast together, and, as in NumPy, their broadcast shape takes the place of the first
of them when they (and the ints) are adjacent, else it comes first. An index out of range is
the backend's error (torch and NumPy raise, JAX clamps, as ``jnp`` indexing does).

The gradient is the scatter-add of the output cotangent onto the input (``np.add.at``: an
element read twice gets both), as torch's; the indices get none.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .operator import Operator, ShapeError, backend_of, broadcast_shapes, fmt

#: the marker of a connection's place in a :class:`GatherIndexer` template
SLOT = "<index>"


class GatherIndexer(Operator):
    """``input[template]`` with the connections of ``template`` given as the integer inputs
    ``index0``, ``index1``, ... (see the module). ``template`` holds :data:`SLOT` where an
    index connection goes, and static ints, full slices and at most one ``...``."""

    any_dtype_inputs = frozenset({"input"})

    def __init__(self, template: tuple[Any, ...]) -> None:
        n = sum(1 for t in template if isinstance(t, str) and t == SLOT)
        if n == 0:
            raise ValueError("GatherIndexer: the index holds no connection")
        for t in template:
            ok = (isinstance(t, str) and t == SLOT) or t is Ellipsis or (
                isinstance(t, slice) and t == slice(None)) or (
                isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)))
            if not ok:
                raise TypeError(f"an index with connections takes, besides them, ints, full "
                                f"slices (:) and one ..., got {t!r}")
        if sum(t is Ellipsis for t in template) > 1:
            raise TypeError("an index holds at most one ...")
        self.template = tuple(template)
        self.index_keys = tuple(f"index{i}" for i in range(n))
        self.inputs = ("input", *self.index_keys)
        self.int_inputs = frozenset(self.index_keys)

    def _items(self, rank: int) -> list[Any]:
        """The template with ``...`` expanded to full slices for an input of ``rank``."""
        given = [t for t in self.template if t is not Ellipsis]
        if len(given) > rank:
            raise ShapeError(f"GatherIndexer: {len(given)} indices for an input of rank {rank}")
        if Ellipsis not in self.template:
            return given + [slice(None)] * (rank - len(given))
        at = self.template.index(Ellipsis)
        return given[:at] + [slice(None)] * (rank - len(given)) + given[at:]

    def infer_shape(self, shapes):
        s = shapes.get("input")
        idx = [shapes.get(k) for k in self.index_keys]
        if s is None or any(i is None for i in idx):
            return None
        items = self._items(len(s))
        adv = [shapes.get(k) for k in self.index_keys]
        b: tuple = ()
        for k, shape in zip(self.index_keys, adv, strict=True):
            b = broadcast_shapes(b, shape, f"GatherIndexer: '{k}' {fmt(shape)}")
        for d, t in zip(s, items, strict=True):
            if isinstance(t, (int, np.integer)) and d is not None and not -d <= t < d:
                raise ShapeError(f"GatherIndexer: index {t} is out of range for an axis of size {d}")
        where = [i for i, t in enumerate(items) if not isinstance(t, slice)]
        kept = [d for d, t in zip(s, items, strict=True) if isinstance(t, slice)]
        if where == list(range(where[0], where[-1] + 1)):  # adjacent: in place of the first
            first = where[0]
            return (*s[:first], *b, *[d for d, t in zip(s[first:], items[first:], strict=True)
                                      if isinstance(t, slice)])
        return (*b, *kept)

    def _index(self, rank: int, idx: dict[str, Any]) -> tuple[Any, ...]:
        keys = iter(self.index_keys)
        return tuple(idx[next(keys)] if isinstance(t, str) else t for t in self._items(rank))

    def forward(self, xp: Any, input: Any, **idx: Any) -> Any:
        if backend_of(xp) == "torch":  # (torch reads uint8 as a mask, refuses int8 / int16)
            idx = {k: v.long() for k, v in idx.items()}
        return input[self._index(len(input.shape), idx)]

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        gx = np.zeros_like(x)
        np.add.at(gx, self._index(x.ndim, args), g)
        return {"input": gx}

    def __repr__(self) -> str:
        keys = iter(self.index_keys)
        return "GatherIndexer[" + ", ".join(next(keys) if isinstance(t, str) else
                                            "..." if t is Ellipsis else ":" if isinstance(t, slice)
                                            else repr(t) for t in self.template) + "]"
