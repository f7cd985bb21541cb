"""Logical models: what is connected to what.

A :class:`Model` holds blocks (operators or other models) wired by named
connections. ``model |= block`` adds a block wired as its ``connect(...)`` call
says; ``model += block`` also wires the block's first input to the output of the
block added before it. A block's terminal left unnamed becomes a terminal of
the model under the same key (made unique with a suffix if taken); with ``+=`` the
newest block's output takes over the name ``"output"`` from the previous one.
Named connections that some block produces are the model's outputs; the others
are its inputs. Nothing here knows about backends: see :mod:`mithril.compile`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

from ..errors import KeyMismatchError
from .operator import Operator, Shape, fmt, unify


class Connection:
    """A wire inside one model. ``name`` is ``None`` for internal wires."""

    __slots__ = ("name", "shape", "auto_output")

    def __init__(self, name: str | None, shape: Shape | None = None) -> None:
        self.name = name
        self.shape = shape
        self.auto_output = False  # exposed only because a block's output was left unnamed

    def __repr__(self) -> str:
        return f"Connection({self.name!r}, {fmt(self.shape)})"


class Bound:
    """A block together with how its terminals connect (what ``block.connect(...)`` returns)."""

    def __init__(self, block: Block, connections: dict[str, str]) -> None:
        unknown = set(connections) - set(block.terminals)
        if unknown:
            raise KeyMismatchError(f"{type(block).__name__} has no terminal(s) {sorted(unknown)}; "
                           f"its terminals are {list(block.terminals)}")
        for k, v in connections.items():
            if not isinstance(v, str):
                raise TypeError(f"connection for '{k}' must be a str name, got {type(v).__name__}")
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

    @property
    def input_keys(self) -> tuple[str, ...]:
        produced = self._produced()
        return tuple(n for n, c in self.conns.items() if id(c) not in produced)

    @property
    def output_keys(self) -> tuple[str, ...]:
        produced = self._produced()
        return tuple(n for n, c in self.conns.items() if id(c) in produced)

    @property
    def terminals(self) -> tuple[str, ...]:
        return tuple(self.conns)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.input_keys

    def connect(self, **connections: str) -> Bound:
        return Bound(self, connections)

    __call__ = connect

    # -- composition -------------------------------------------------------------
    def _named(self, name: str) -> Connection:
        c = self.conns.get(name)
        if c is None:
            c = self.conns[name] = Connection(name)
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
        ins = [k for k in block.terminals if k not in block.output_keys]
        if chain and self._last_output is not None and ins and ins[0] not in bound.connections:
            mapping[ins[0]] = self._last_output
        for key in block.terminals:
            if key in mapping:
                continue
            if key in bound.connections:
                mapping[key] = self._named(bound.connections[key])
            elif key in block.output_keys:
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
        outs = block.output_keys
        if outs:
            self._last_output = mapping["output"] if "output" in outs else mapping[outs[0]]
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
