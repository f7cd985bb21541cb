"""What an ``IOKey`` (or a child model) declares on a connection of a
:class:`~mithril.models.model.Model`: its types and differentiability (merged with what the
connection had, conflicts refused naming the key) and its shape (``[None, 784]``,
``("N", 3)``: ints, with ``None`` or a symbolic name for a free dimension)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .connection_types import merged
from .operator import Shape

if TYPE_CHECKING:
    from .model import Connection

__all__: list[str] = []


def _declare(c: Connection, kinds: frozenset[str] | None, differentiable: bool | None,
             key: str, is_output: bool, log: list | None) -> None:
    """Add an ``IOKey``'s (or a child model's) type and differentiability to ``c``: types
    intersect; two different differentiabilities, or one given for an output or a constant,
    are errors naming ``key``. ``log`` gets what ``c`` had, to put back if ``_add`` fails."""
    if kinds is None and differentiable is None:
        return
    if log is not None:
        log.append((c, c.kinds, c.differentiable))
    c.kinds = merged(c.kinds, kinds, key)
    if differentiable is None:
        return
    if is_output:
        raise ValueError(f"'{key}' is an output: its gradient follows from its inputs', it takes "
                         "no differentiable=")
    if c.differentiable is not None and c.differentiable != differentiable:
        raise ValueError(f"connection '{key}' is declared differentiable={c.differentiable} and "
                         f"differentiable={differentiable}")
    if differentiable and c.value is not None:
        raise ValueError(f"connection '{key}' is a constant: it gets no gradient")
    if differentiable:
        c.kinds = merged(c.kinds, frozenset({"float"}), key)
    c.differentiable = differentiable


def _as_dim(key: str, shape: Any, d: Any) -> int | None:
    """One declared dimension: an int, or ``None`` / a symbolic name (``"N"``) for a free one.
    Anything else (a bool, a float, a numeric string) is refused, not rounded."""
    if d is None:
        return None
    if isinstance(d, str):
        if d.isidentifier():
            return None  # a symbolic name is a free dimension (names are not shared here)
        raise TypeError(f"shape of '{key}': dimension {d!r} is not an int, None or a symbolic "
                        f"name such as 'N', in {shape!r}")
    if isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)):
        if d < 0:
            raise ValueError(f"shape of '{key}' has a negative dimension: {shape!r}")
        return int(d)
    raise TypeError(f"shape of '{key}': dimension {d!r} ({type(d).__name__}) must be an int, "
                    f"None or a symbolic name such as 'N', in {shape!r}")


def _as_shape(key: str, shape: Any) -> Shape:
    """A declared shape (``[None, 784]``, ``("N", 3)``) as a tuple of ints and ``None``."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape of '{key}' must be a sequence of int or None, got {shape!r}")
    return tuple(_as_dim(key, shape, d) for d in shape)


def check_block_name(name: Any, who: str) -> str | None:
    """A block's ``name=``: None, or a non-empty str without '.' (the path separator)."""
    if name is not None and (not isinstance(name, str) or not name or "." in name):
        raise ValueError(f"{who}: name must be a non-empty str without '.', got {name!r}")
    return name
