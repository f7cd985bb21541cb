"""Indices of expressions (``x[0]``, ``x[:, 1:3]``, ``x[mask]``): how they read in an
expression's text and which the ``Indexer`` operator takes (see
:mod:`mithril.models.expressions`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .expressions import ConnectionOps


def _index_text(index: Any) -> str:
    def one(i: Any) -> str:
        if i is Ellipsis:
            return "..."
        if isinstance(i, slice):
            parts = ["" if p is None else str(p) for p in (i.start, i.stop)]
            return ":".join(parts) + ("" if i.step is None else f":{i.step}")
        if isinstance(i, np.ndarray):
            return repr(i.tolist())
        return repr(i)

    items = index if isinstance(index, tuple) else (index,)
    return ", ".join(one(i) for i in items) + ("," if isinstance(index, tuple) and len(index) == 1 else "")


def _check_index(index: Any, receiver: ConnectionOps) -> None:
    """Indices the ``Indexer`` operator takes: ints, slices of ints, None, ``...``, integer
    lists / arrays and boolean masks (lists / arrays of bools), or a tuple of those; a lone
    boolean is refused (NumPy would read it as a new axis)."""
    from .expressions import _static
    from .shape_wires import ShapeWire

    def size(f: Any) -> bool:  # (a shape wire's size too: x[:q.shape[2]], as published)
        return (isinstance(f, ShapeWire) and f.kind == "int") or (
            isinstance(f, (int, np.integer)) and not isinstance(f, (bool, np.bool_)))

    _static(index, f"[{index!r}]", receiver)
    for i in index if isinstance(index, tuple) else (index,):
        if i is None or i is Ellipsis:
            continue
        if isinstance(i, slice):
            if all(f is None or size(f) for f in (i.start, i.stop, i.step)) and i.step != 0:
                continue
        elif size(i):
            continue
        elif isinstance(i, (list, np.ndarray)) and (np.asarray(i).dtype.kind in "iu" or (
                np.asarray(i).dtype.kind == "b" and np.ndim(i) > 0)):
            continue
        raise TypeError(f"{receiver!r}[...]: unsupported index {i!r}; an index is an int, a slice "
                        "of ints (step not 0), None, ..., an integer list or array, a boolean "
                        "mask (a list or array of bools), or a tuple of those")
