"""Logical models: what is connected to what.

A :class:`Model` holds blocks (operators or other models) wired by named
connections. ``model |= block`` adds a block wired as its ``connect(...)`` call
says; ``model += block`` also wires the block's first input to the output of the
block added before it. A block's terminal left unnamed becomes a terminal of
the model under the same key (made unique with a suffix if taken); with ``+=`` the
newest block's output takes over the name ``"output"`` from the previous one.
Named connections that some block produces are the model's outputs; the others
are its inputs. Nothing here knows about backends: see :mod:`mithril.compile`.

Names given explicitly win over names made up for outputs left unnamed: an
explicit ``output="output"`` takes the name from the output an earlier block got
by default, which becomes an internal wire (as in the published Mithril, where
an output left unnamed is not a terminal). A nested model's named wire that it
both produces and consumes itself stays inside it: it is reachable from the
parent only when named in ``child.connect(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np

from ..errors import KeyMismatchError
from .operator import Operator, Shape, fmt, unify


class IOKey:
    """A terminal described in ``connect(...)``: its ``name`` (None: an internal wire, or a
    made-up name for a constant), a constant ``value`` (folded in at compile time: the
    terminal is no longer an input), a ``shape`` (``None`` entries are free dimensions)
    and ``expose`` (``False``: a named wire that other blocks of the same model can bind
    to by name but that is not a terminal of the model)."""

    __slots__ = ("name", "value", "shape", "expose")

    def __init__(self, name: str | None = None, value: Any = None,
                 shape: Sequence[int | None] | None = None, expose: bool | None = None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"IOKey name must be a str, got {type(name).__name__}")
        self.name, self.expose = name, expose
        self.value = None if value is None else np.asarray(value)
        self.shape = None if shape is None else _as_shape(name or "IOKey", shape)
        if self.value is not None:
            self.shape = unify(self.shape, self.value.shape, f"{name} (shape)", f"{name} (value)")

    def __repr__(self) -> str:
        return f"IOKey(name={self.name!r}, shape={fmt(self.shape)})"


class Connection:
    """A wire inside one model. ``name`` is ``None`` for internal wires."""

    __slots__ = ("name", "shape", "auto_output", "value", "exposed")

    def __init__(self, name: str | None, shape: Shape | None = None) -> None:
        self.name = name
        self.shape = shape
        self.auto_output = False  # exposed only because a block's output was left unnamed
        self.value: np.ndarray | None = None  # a constant (IOKey(value=...))
        self.exposed = True  # False: named in its model, but not one of its terminals

    def __repr__(self) -> str:
        return f"Connection({self.name!r}, {fmt(self.shape)})"


class Bound:
    """A block together with how its terminals connect (what ``block.connect(...)`` returns)."""

    def __init__(self, block: Block, connections: dict[str, str | IOKey]) -> None:
        unknown = set(connections) - set(block.terminals)
        if unknown:
            raise KeyMismatchError(f"{type(block).__name__} has no terminal(s) {sorted(unknown)}; "
                           f"its terminals are {list(block.terminals)}")
        for k, v in connections.items():
            if not isinstance(v, (str, IOKey)):
                raise TypeError(f"connection for '{k}' must be a str name or an IOKey, "
                                f"got {type(v).__name__}")
            if isinstance(v, IOKey) and v.value is not None and k in block.output_keys:
                raise ValueError(f"'{k}' is an output of {type(block).__name__}: it cannot take a value")
        self.block, self.connections = block, connections


Block = Union[Operator, "Model"]


class Model:
    """A composition of operators and models with named terminals."""

    def __init__(self) -> None:
        self.blocks: list[tuple[Block, dict[str, Connection]]] = []
        self.conns: dict[str, Connection] = {}
        self._last_output: Connection | None = None
        self._used = False

    # -- terminals -----------------------------------------------------------------
    def _produced(self) -> set[int]:
        return {id(m[k]) for b, m in self.blocks for k in b.output_keys}

    def _consumed(self) -> set[int]:
        return {id(m[k]) for b, m in self.blocks for k in b.terminals if k not in b.output_keys}

    @property
    def input_keys(self) -> tuple[str, ...]:
        produced = self._produced()
        return tuple(n for n, c in self.conns.items()
                     if c.exposed and c.value is None and id(c) not in produced)

    @property
    def output_keys(self) -> tuple[str, ...]:
        produced = self._produced()
        return tuple(n for n, c in self.conns.items() if c.exposed and id(c) in produced)

    @property
    def terminals(self) -> tuple[str, ...]:
        return tuple(n for n, c in self.conns.items() if c.exposed and c.value is None)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.input_keys

    def connect(self, **connections: str | IOKey) -> Bound:
        return Bound(self, connections)

    __call__ = connect

    # -- composition -------------------------------------------------------------
    def _named(self, name: str) -> Connection:
        c = self.conns.get(name)
        if c is None:
            c = self.conns[name] = Connection(name)
        return c

    def _demote(self, c: Connection) -> None:
        """``c`` (an output named by default) becomes an internal wire: its name is freed."""
        if c.name is not None and self.conns.get(c.name) is c:
            del self.conns[c.name]
        c.name, c.auto_output = None, False

    def _given(self, given: str | IOKey, is_output: bool) -> Connection:
        """The connection for a name given in ``connect(...)``. An explicit output name takes
        the name from an output that only had it by default (it becomes an internal wire)."""
        key = given if isinstance(given, IOKey) else IOKey(given)
        if key.name is None:
            c = Connection(None)
        else:
            prev = self.conns.get(key.name)
            if is_output and prev is not None and prev.auto_output:
                self._demote(prev)
            c = self._named(key.name)
        if key.shape is not None:
            c.shape = unify(c.shape, key.shape, f"{key.name} (declared before)", f"{key.name} (IOKey)")
        if key.value is not None:
            if is_output:
                raise ValueError(f"'{key.name}' is an output: it cannot take a value")
            c.value = key.value
        if key.expose is not None:
            c.exposed = bool(key.expose)
        return c

    def _fresh_name(self, key: str) -> str:
        if key not in self.conns:
            return key
        i = 1
        while f"{key}_{i}" in self.conns:
            i += 1
        return f"{key}_{i}"

    def _add(self, item: Block | Bound, chain: bool) -> Model:
        bound = item if isinstance(item, Bound) else Bound(item, {})
        block = bound.block
        if block is self:
            raise ValueError("a model cannot contain itself")
        if getattr(block, "_used", False) or any(b is block for b, _ in self.blocks):
            raise ValueError(f"{block!r} is already part of a model; create a new instance")
        if isinstance(block, Model):
            block._used = True
        mapping: dict[str, Connection] = {}
        outs = block.output_keys
        ins = [k for k in block.terminals if k not in outs]
        # a nested model's named wires that it produces and consumes itself stay inside it
        hidden = set()
        if isinstance(block, Model):
            consumed = block._consumed()
            hidden = {k for k in outs if id(block.conns[k]) in consumed and k not in bound.connections}
        if chain and self._last_output is not None and ins and ins[0] not in bound.connections:
            mapping[ins[0]] = self._last_output
        for key in block.terminals:
            if key in mapping:
                continue
            if key in bound.connections:
                mapping[key] = self._given(bound.connections[key], key in outs)
            elif key in hidden:
                mapping[key] = Connection(None)
            elif key in outs:
                prev = self.conns.get(key)
                if chain and prev is not None and prev.auto_output and prev is self._last_output:
                    del self.conns[key]  # demote the previous block's auto-named output
                    prev.name, prev.auto_output = None, False
                c = self._named(self._fresh_name(key))
                c.auto_output = True
                mapping[key] = c
            else:
                mapping[key] = self._named(self._fresh_name(key))
        self.blocks.append((block, mapping))
        shown = [k for k in outs if k not in hidden]
        if shown:
            self._last_output = mapping["output"] if "output" in shown else mapping[shown[0]]
        return self

    def __ior__(self, item: Block | Bound) -> Model:
        return self._add(item, chain=False)

    def __iadd__(self, item: Block | Bound) -> Model:
        return self._add(item, chain=True)

    # -- shapes ------------------------------------------------------------------
    def set_shapes(self, **shapes: Sequence[int | None]) -> Model:
        """Declare terminal shapes, e.g. ``set_shapes(input=[None, 784])`` (None: free dim)."""
        for key, shape in shapes.items():
            if key not in self.conns:
                raise KeyMismatchError(f"set_shapes: model has no terminal '{key}'; "
                               f"its terminals are {list(self.conns)}")
            c = self.conns[key]
            c.shape = unify(c.shape, _as_shape(key, shape), f"{key} (declared before)", key)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inputs={list(self.input_keys)}, outputs={list(self.output_keys)})"


def _as_shape(key: str, shape: Any) -> Shape:
    try:
        s = tuple(None if d is None else int(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape of '{key}' must be a sequence of int or None, got {shape!r}") from None
    if any(d is not None and d < 0 for d in s):
        raise ValueError(f"shape of '{key}' has a negative dimension: {shape!r}")
    return s
