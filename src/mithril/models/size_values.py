"""Sizes given by connections: ``x.reshape((B, C, height, width))`` where ``height`` is a
connection (an ``IOKey`` input of a sub-model, a block's output, an expression) whose value
the compiler knows when it compiles, as published in the segformer encoder.

Such a connection is an extra input of the block (``shape_value0``, ...; wired as the shape
wires' inputs are, by the model the block is added to) that is read for its value, not its
array: the value of a ``Size`` / ``Shape`` output (also through ``Buffer`` s and sub-model
boundaries, which are wires of one program once compiled) or of an integer constant
(``IOKey("h", value=4)``, ``compile(constant_keys={"h": 4})``). A 0-d value is one size, a
1-d one (a ``Shape`` output) its sizes spliced in. The compiler hands those values to the
block's shape rule (``value_inputs``), so the output's shape is known at compile time; the
forward reads the same values from the arrays it gets (NumPy arrays under ``jax.jit``: static
there too). A connection whose value only the run computes (a data input) is a
``ShapeError`` at compile time naming the size. No gradient flows into them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .operator import ShapeError


class SizeValue:
    """One entry of a size tuple given by a connection: ``key`` is the block input that
    reads it, ``ref`` the connection object (wired when the block is added to a model),
    ``text`` how it reads in messages (``IOKey('height')``), ``position`` its index in
    the tuple the user gave."""

    __slots__ = ("key", "ref", "text", "position")

    def __init__(self, key: str, ref: Any, position: int) -> None:
        self.key, self.ref, self.position = key, ref, position
        self.text = repr(ref)

    def __repr__(self) -> str:
        return self.text


def is_connection(d: Any) -> bool:
    """``d`` is a connection object (a terminal, an ``IOKey``, an expression)."""
    from .expressions import ConnectionOps

    return isinstance(d, ConnectionOps)


def size_values(spec: tuple, prefix: str = "shape_value") -> tuple:
    """``spec`` with each connection entry as a :class:`SizeValue` keyed ``<prefix>0``, ..."""
    out, n = [], 0
    for i, d in enumerate(spec):
        if is_connection(d):
            d = SizeValue(f"{prefix}{n}", d, i)
            n += 1
        out.append(d)
    return tuple(out)


def check_known(entries: tuple, values: Mapping[str, Any] | None, where: str) -> None:
    """A ``ShapeError`` naming the first connection size whose value the run computes (not
    among ``values``, the values the compiler knows; ``None`` there: known once shapes are)."""
    for d in entries:
        if isinstance(d, SizeValue) and d.key not in (values or {}):
            raise ShapeError(
                f"{where}: size {d.position} of the shape, {d.text}, is a connection whose value "
                "is computed by the run, so the output's shape is not known at compile time: "
                "connect it to a value known when compiling (a Size / Shape output such as "
                "x.shape[2], an integer constant: IOKey(value=4) or compile(constant_keys=...)), "
                "or give an int or a shape wire")


def as_sizes(v: Any, d: SizeValue, where: str) -> tuple[int, ...]:
    """The sizes a connection's value holds (0-d: one size, 1-d: several), checked."""
    a = np.asarray(v)
    if a.ndim > 1 or a.dtype.kind not in "iu":
        raise ShapeError(f"{where}: size {d.position} of the shape, {d.text}, must hold integers "
                         f"(a Size / Shape output or an integer constant), got {a!r}")
    sizes = tuple(int(s) for s in a.reshape(-1))
    if any(s < -1 for s in sizes):
        raise ShapeError(f"{where}: size {d.position} of the shape, {d.text}, is "
                         f"{list(sizes) if a.ndim else sizes[0]}, a size below -1")
    return sizes


def resolve(entries: tuple, lookup: Callable[[Any], Any] | None, shapes: Mapping[str, Any],
            values: Mapping[str, Any], where: str) -> tuple | None:
    """The sizes of ``entries`` (ints, ``-1``, shape wires, :class:`SizeValue` s): ints, with
    ``None`` for a size not known yet; ``None`` when the number of sizes is not known (a
    spliced shape of unknown rank). ``shapes`` gives the value inputs' own shapes (0-d or
    1-d: how many sizes an unknown value stands for)."""
    from .shape_wires import ShapeWire, resolve_sizes

    out: list[Any] = []
    for d in entries:
        if isinstance(d, SizeValue):
            v = values.get(d.key)
            if v is not None:
                out.extend(as_sizes(v, d, where))
                continue
            s = shapes.get(d.key)
            s = None if s is None else tuple(s if isinstance(s, tuple) else s.shape)
            if s is None or len(s) > 1 or (len(s) == 1 and s[0] is None):
                return None
            out.extend([None] * (s[0] if s else 1))
        elif isinstance(d, ShapeWire):
            got = resolve_sizes((d,), lookup, where)  # type: ignore[arg-type]
            if got is None:
                return None
            out.extend(got)
        else:
            out.append(d)
    return tuple(out)


def run_values(args: Mapping[str, Any], entries: tuple, where: str) -> dict[str, Any]:
    """The values the connection sizes hold at run time, as NumPy arrays (a JAX tracer, a
    value computed inside a jitted program, is a ``ShapeError``: the sizes must be static)."""
    got = {}
    for d in entries:
        if isinstance(d, SizeValue):
            v = args[d.key]
            try:
                got[d.key] = np.asarray(v.tolist() if hasattr(v, "tolist") else v)
            except Exception as e:
                raise ShapeError(f"{where}: size {d.position} of the shape, {d.text}, must be "
                                 "known before the run (a Size / Shape output or an integer "
                                 "constant), not computed by it") from e
    return got
