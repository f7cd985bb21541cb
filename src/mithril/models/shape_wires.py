"""Shape wires: the published Mithril's ``conn.shape``, ``Shape`` and ``Size``, static here.

``conn.shape`` (``model.input.shape``, ``lin.output.shape``) is a :class:`ShapeWire`: the shape
of that connection, known once the compiled model's input shapes are (as the published one
is on its backends: shapes are static there too). It indexes and slices like a tuple
(``x.shape[0]``, ``x.shape[:3]``, ``x.shape[-1]``) and its entries take ``+``, ``-``, ``*``,
``//`` and ``%`` with ints and with each other (``B * L``, ``w // 2``). A shape wire is given
where a block takes a size: ``Reshape(shape=(B, T, -1))``, ``x.reshape(shp[:3])``,
``Reshape().connect(shape=...)``, ``Arange(stop=x.shape[0])``.

How it is computed: a block given a shape wire reads the connections it refers to as
extra inputs (``shape_ref0``, ...; wired by the model the block is added to, which must reach
them). Its shape rule evaluates the wire from their shapes at compile time, and its forward
from the arrays' own shapes (static under ``jax.jit`` too); no gradient flows through them.
An entry that is a free dimension at compile time (``shapes={"x": [None, 5]}``) is a free
dimension of the result; an index out of range is a ``ShapeError`` naming the wire.

``Shape()`` and ``Size(dim)`` are the published blocks: their outputs are integer arrays
(``Size``: a 0-d one) whose values the compiler knows from the input's shape; ``Arange``
takes them as ``start`` / ``stop`` / ``step`` (the published GPT's ``Size(dim=1)`` then
``Arange()``)."""

from __future__ import annotations

import operator as _ops
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .operator import Operator, ShapeError, fmt, torch_of

#: (id of a referred connection object) -> its shape (entries int or None), or None unknown
Lookup = Callable[[Any], "tuple | None"]


_OPS: dict[str, Callable[[int, int], int]] = {
    "+": _ops.add, "-": _ops.sub, "*": _ops.mul, "//": _ops.floordiv, "%": _ops.mod}


class ShapeWire:
    """A value computed from the shapes of connections (see the module): ``kind`` is
    ``"shape"`` (a tuple of sizes) or ``"int"`` (one size). ``refs`` are the connection
    objects it reads; ``evaluate(lookup)`` gives its value, ``None`` where a shape it reads is
    not known (an entry of a tuple may be ``None``: a free dimension). A tree of plain data
    (``how``: ``("shape", conn)``, ``("item", wire, i)``, ``("slice", wire, slice)`` or
    ``(symbol, a, b)``), so a deep copy of a block copies it with the connections it reads."""

    __slots__ = ("kind", "refs", "how", "text")

    def __init__(self, kind: str, refs: tuple, how: tuple, text: str) -> None:
        self.kind, self.refs, self.how, self.text = kind, refs, how, text

    def evaluate(self, lookup: Lookup) -> Any:
        what, a, b = (*self.how, None)[:3]
        if what == "shape":
            return lookup(a)
        if what in ("item", "slice"):
            s = a.evaluate(lookup)
            if s is None or what == "slice":
                return None if s is None else tuple(s[b])
            if not -len(s) <= b < len(s):
                raise ShapeError(f"{self.text}: index {b} is out of range for a shape of rank "
                                 f"{len(s)} ({fmt(s)})")
            return s[b]
        x, y = (v.evaluate(lookup) if isinstance(v, ShapeWire) else v for v in (a, b))
        if x is None or y is None:
            return None
        if y == 0 and what in ("//", "%"):  # (an empty dimension: not Python's bare error)
            raise ShapeError(f"{self.text}: {_text(b)} is 0, so {x} {what} 0 is a division by "
                             "zero")
        return int(_OPS[what](x, y))

    def __repr__(self) -> str:
        return self.text

    #: not iterable: its length is known at compile time only (``iter`` would never stop)
    __iter__ = None

    def __len__(self) -> int:
        raise TypeError(f"len({self.text}): the rank of a shape wire is known at compile time "
                        "only; index it (x.shape[0]) or slice it (x.shape[:2])")

    # -- indexing -----------------------------------------------------------------------
    def __getitem__(self, index: Any) -> ShapeWire:
        if self.kind != "shape":
            raise TypeError(f"{self.text}[{index!r}]: one size cannot be indexed")
        if isinstance(index, slice):
            for f in (index.start, index.stop, index.step):
                if f is not None and (isinstance(f, bool) or not isinstance(f, (int, np.integer))):
                    raise TypeError(f"{self.text}[...]: a slice of ints, got {index!r}")
            return ShapeWire("shape", self.refs, ("slice", self, index),
                             f"{self.text}[{_slice_text(index)}]")
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"{self.text}[{index!r}]: an index of a shape is an int or a slice")
        return ShapeWire("int", self.refs, ("item", self, int(index)), f"{self.text}[{int(index)}]")

    # -- integer arithmetic of sizes ------------------------------------------------------
    def _binary(self, other: Any, symbol: str, reflected: bool = False) -> ShapeWire:
        if isinstance(other, ShapeWire):
            if other.kind != "int":
                raise TypeError(f"'{symbol}' of {self.text} and {other.text}: a whole shape "
                                "takes no arithmetic; index it first (x.shape[0])")
        elif isinstance(other, bool) or not isinstance(other, (int, np.integer)):
            return NotImplemented
        else:
            other = int(other)
        if self.kind != "int":
            raise TypeError(f"'{symbol}' with {self.text}: a whole shape takes no arithmetic; "
                            "index it first (x.shape[0])")
        a, b = (other, self) if reflected else (self, other)
        refs = self.refs + (other.refs if isinstance(other, ShapeWire) else ())
        return ShapeWire("int", refs, (symbol, a, b), f"({_text(a)} {symbol} {_text(b)})")

    def __add__(self, other: Any) -> ShapeWire:
        return self._binary(other, "+")

    def __radd__(self, other: Any) -> ShapeWire:
        return self._binary(other, "+", True)

    def __sub__(self, other: Any) -> ShapeWire:
        return self._binary(other, "-")

    def __rsub__(self, other: Any) -> ShapeWire:
        return self._binary(other, "-", True)

    def __mul__(self, other: Any) -> ShapeWire:
        return self._binary(other, "*")

    def __rmul__(self, other: Any) -> ShapeWire:
        return self._binary(other, "*", True)

    def __floordiv__(self, other: Any) -> ShapeWire:
        return self._binary(other, "//")

    def __rfloordiv__(self, other: Any) -> ShapeWire:
        return self._binary(other, "//", True)

    def __mod__(self, other: Any) -> ShapeWire:
        return self._binary(other, "%")

    def __rmod__(self, other: Any) -> ShapeWire:
        return self._binary(other, "%", True)


def _text(v: Any) -> str:
    return v.text if isinstance(v, ShapeWire) else repr(int(v))


def _slice_text(s: slice) -> str:
    parts = ["" if p is None else str(p) for p in (s.start, s.stop)]
    return ":".join(parts) + ("" if s.step is None else f":{s.step}")


def shape_of(conn: Any) -> ShapeWire:
    """``conn.shape``: the shape of a connection object as a :class:`ShapeWire`."""
    return ShapeWire("shape", (conn,), ("shape", conn), f"{conn!r}.shape")


def is_symbolic(value: Any) -> bool:
    """``value`` is a shape wire or a tuple / list holding one."""
    if isinstance(value, ShapeWire):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, ShapeWire) for v in value)


class ShapeArgs:
    """The shape wires given to one operator and the inputs they read: ``keys`` are its
    extra inputs (``shape_ref0`` ...), ``refs`` the connection objects bound to them (the
    model the operator is added to wires them: :meth:`Model._bind_shape_refs`)."""

    def __init__(self, wires: Sequence[ShapeWire], prefix: str = "shape_ref") -> None:
        refs: list[Any] = []
        for w in wires:
            for r in w.refs:
                if not any(r is q for q in refs):
                    refs.append(r)
        self.refs = tuple(refs)
        self.keys = tuple(f"{prefix}{i}" for i in range(len(refs)))

    def lookup(self, shapes: Mapping[str, Any]) -> Lookup:
        """``lookup(ref)``: the shape of the input a ref is bound to, from ``shapes`` (compile
        time: a wire's inferred shape) or from arrays (run time: ``x.shape``)."""
        keys = {id(r): k for r, k in zip(self.refs, self.keys, strict=True)}

        def get(ref: Any) -> Any:
            s = shapes.get(keys[id(ref)])
            return None if s is None else tuple(s if isinstance(s, tuple) else s.shape)
        return get


def array_shapes(args: Mapping[str, Any], keys: Sequence[str]) -> dict[str, tuple]:
    """The runtime shapes of the ref inputs (``x.shape`` of each array, as ints)."""
    return {k: tuple(int(d) for d in args[k].shape) for k in keys}


def resolve_sizes(spec: Sequence[Any], lookup: Lookup, where: str) -> tuple | None:
    """A size tuple whose entries may be ints, ``-1`` / ``None`` or shape wires (an
    ``"int"`` one is one entry, a ``"shape"`` one is spliced in): the ints, with ``None``
    for an entry not known yet (and ``-1`` kept); ``None`` when a spliced shape's rank is not
    known. A size below 0 that a wire gives is a ``ShapeError`` naming ``where``."""
    out: list[Any] = []
    for d in spec:
        if isinstance(d, ShapeWire):
            v = d.evaluate(lookup)
            if d.kind == "shape":
                if v is None:
                    return None
                out.extend(v)
                continue
            if v is not None and v < 0:
                raise ShapeError(f"{where}: {d.text} is {v}, a size below 0")
            out.append(v)
        else:
            out.append(-1 if d is None else int(d))
    return tuple(out)


def bind_shape_refs(model: Any, start: int) -> None:
    """Wire the inputs that shape wires read (``Reshape(shape=(x.shape[0], -1))``: the
    connection ``x``) of the operators ``model`` got since its block ``start`` (expressions'
    blocks too) to the wires of ``model`` they refer to (its ``_add`` undoes this if it
    raises)."""
    from .connections import Terminal
    from .expressions import Expression, wire_expression

    i = start
    while i < len(model.blocks):  # (an expression a wire reads may add blocks)
        block, mapping = model.blocks[i]
        refs = getattr(block, "shape_args", None) if isinstance(block, Operator) else None
        for key, ref in zip(refs.keys, refs.refs, strict=True) if refs is not None else ():
            if key in mapping:
                continue
            where = f"{type(block).__name__}: the shape wire's {ref!r}"
            if isinstance(ref, Expression):
                mapping[key] = wire_expression(model, ref, where)
            elif isinstance(ref, Terminal):
                mapping[key] = model._resolve(ref, where)
            else:
                mapping[key] = model._given(ref, False)
        i += 1


class Shape(Operator):
    """The published ``Shape()``: the input's shape as a 1-d integer array (its values known
    at compile time). No gradient."""

    any_dtype_inputs = frozenset({"input"})
    output_dtype = "int64"

    def infer_shape(self, shapes):
        s = shapes.get("input")
        return None if s is None else (len(s),)

    def static_value(self, shapes: Mapping[str, Any]) -> Any:
        s = shapes.get("input")
        return None if s is None or None in s else np.asarray(s, dtype=np.int64)

    def forward(self, xp: Any, input: Any) -> Any:
        return _ints(xp, tuple(int(d) for d in input.shape))

    def vjp(self, g, out, args, wrt):
        return {}


class Size(Operator):
    """The published ``Size(dim)``: the size of axis ``dim`` of the input (a 0-d integer
    array), the sizes of several axes (``dim`` a tuple: a 1-d array) or the number of
    elements (``dim=None``), known at compile time. No gradient."""

    any_dtype_inputs = frozenset({"input"})
    output_dtype = "int64"

    def __init__(self, dim: int | Sequence[int] | None = None) -> None:
        self.dim = _as_dim(dim)

    def connect(self, *args: Any, **connections: Any) -> Any:
        """As any block's; ``dim=`` (published: a terminal) sets the axis here."""
        if "dim" not in connections:
            return super().connect(*args, **connections)
        before, self.dim = self.dim, _as_dim(connections.pop("dim"))
        try:
            return super().connect(*args, **connections)
        except BaseException:
            self.dim = before
            raise

    def _value(self, s: tuple) -> Any:
        if self.dim is None:
            return None if None in s else int(np.prod(s, dtype=np.int64))
        dims = self.dim if isinstance(self.dim, tuple) else (self.dim,)
        for d in dims:
            if not -len(s) <= d < len(s):
                raise ShapeError(f"Size: dim {d} is out of range for the input's rank {len(s)}")
        vals = tuple(s[d] for d in dims)
        if None in vals:
            return None
        return vals if isinstance(self.dim, tuple) else vals[0]

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        self._value(s)  # (checks dim against the rank)
        return (len(self.dim),) if isinstance(self.dim, tuple) else ()

    def static_value(self, shapes: Mapping[str, Any]) -> Any:
        s = shapes.get("input")
        v = None if s is None else self._value(s)
        return None if v is None else np.asarray(v, dtype=np.int64)

    def forward(self, xp: Any, input: Any) -> Any:
        return _ints(xp, self._value(tuple(int(d) for d in input.shape)))

    def vjp(self, g, out, args, wrt):
        return {}

    def __repr__(self) -> str:
        return f"Size({self.dim!r})"


def _as_dim(dim: Any) -> Any:
    if isinstance(dim, (tuple, list)):
        if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in dim):
            raise TypeError(f"Size: dim must be an int, a tuple of ints or None, got {dim!r}")
        return tuple(int(d) for d in dim)
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer))):
        raise TypeError(f"Size: dim must be an int, a tuple of ints or None, got {dim!r}")
    return dim if dim is None else int(dim)


def _ints(xp: Any, value: Any) -> Any:
    """An integer array of ``value`` made from static sizes: a NumPy array on NumPy and JAX
    (a constant under ``jax.jit``: a block reading it, ``Arange``, gets its value, not a
    tracer), a torch tensor on torch."""
    t = torch_of(xp)
    if t is not None:
        return t.tensor(value, dtype=t.int64)
    return np.asarray(value, dtype=np.int64)


def as_expression(wire: ShapeWire, key: str) -> Any:
    """A shape wire given as a connection (the published T5's ``bias.connect(query_length=
    input.shape[1])`` into a sub-model's input): ``x.shape`` is ``Shape()`` of ``x`` and
    ``x.shape[i]`` is ``Size(i)`` of ``x``, an integer array whose value the compiler knows
    (so an ``Arange`` inside the sub-model takes it as an end), ``x.shape[2:]`` that slice of
    ``Shape()`` (known too). Other wires (``B * L``) are a ``TypeError`` naming ``key``: give
    them where a block takes a size."""
    from .expressions import Expression

    what, a, b = (*wire.how, None)[:3]
    if what == "shape":
        return Expression(Shape(), {"input": a}, wire.text)
    if what == "item" and a.how[0] == "shape":
        return Expression(Size(b), {"input": a.how[1]}, wire.text)
    if what == "slice" and a.how[0] == "shape":  # (x.shape[2:]: its sizes, known too)
        from .shaping import Indexer

        return Expression(Indexer(b), {"input": as_expression(a, key)}, wire.text)
    raise TypeError(f"connection for '{key}': the shape wire {wire.text} is given as a connection "
                    "only as x.shape or x.shape[i] (or x.shape[i:j]); give it where a block "
                    "takes a size (Reshape(shape=...), Arange(stop=...)), or compute it with "
                    "Size / Shape")


def as_operand(wire: ShapeWire, symbol: str) -> Any:
    """A shape wire met with a connection in arithmetic (the published segformer's
    ``H_in / H_out``, ``x.clamp(0, H_in - 1)``): ``x.shape[i]`` is ``Size(i)`` of ``x`` (as
    :func:`as_expression`), ``+``, ``-``, ``*`` of those integer expressions of them."""
    what, a, b = (*wire.how, None)[:3]
    if what in ("+", "-", "*"):
        x, y = (as_operand(v, symbol) if isinstance(v, ShapeWire) else v for v in (a, b))
        return _OPS[what](x, y)
    return as_expression(wire, symbol)
