"""The connection objects of :mod:`mithril.models.model`: :class:`IOKey` (a terminal described
in ``connect(...)``), :class:`Connection` (a wire inside one model) and :class:`Terminal` (a
block's terminal as an object: ``lin.input``, ``model.cout``).

``IOKey``, ``Terminal`` and expressions take Python's operators and indexing
(:mod:`mithril.models.expressions`), and their ``shape`` is, as published, a shape wire
(:mod:`mithril.models.shape_wires`): ``IOKey("queries").shape[0]`` is the first size of the
connection named ``queries``, known at compile time. A shape an ``IOKey`` declares
(``IOKey("x", shape=[None, 784])``) is its ``value_shape``, the published attribute's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .connection_types import TBD, kinds_of, type_name, value_kind
from .declarations import _as_shape
from .expressions import ConnectionOps
from .operator import Shape, fmt, unify

if TYPE_CHECKING:
    from .model import Block
    from .shape_wires import ShapeWire

builtins_type = type  # (IOKey's ``type`` argument shadows it there)


class IOKey(ConnectionOps):
    """A terminal described in ``connect(...)``: its ``name`` (None: an internal wire, or a
    made-up name for a constant), a constant ``value`` (folded in at compile time: the
    terminal is no longer an input), a declared shape (``shape=[None, 784]``, kept as
    ``value_shape``: ``None`` entries are free dimensions) and ``expose`` (``False``: a named
    wire that other blocks of the same model can bind to by name but that is not a terminal
    of the model). Operators on it build an expression over the named connection
    (``IOKey("x") * 2``); ``IOKey("x").shape`` is, as published, a shape wire of that
    connection (``B, L = queries.shape[0], queries.shape[1]``), whatever shape was declared.

    As published, ``type`` constrains the element kinds (``Tensor[float]``, ``Tensor[int |
    float | bool]``: see :mod:`mithril.models.connection_types`; checked against the inputs
    the connection feeds and against ``value``) and ``differentiable`` says whether an input
    gets a gradient: ``True`` makes it trainable (given in ``params``, as with
    ``compile(trainable_keys=...)``; its type becomes ``Tensor[float]``), ``False`` keeps it
    a data input (a parameter role connected to it, ``connect(weight=IOKey("w",
    differentiable=False))``, is then a data input, as with ``compile(data_keys=...)``).
    ``compile``'s ``trainable_keys`` / ``data_keys`` / ``constant_keys`` win over it, as
    published. On a connection some block computes it means nothing (its gradient follows
    from its inputs') and is refused when given for an output."""

    __slots__ = ("name", "value", "value_shape", "expose", "kinds", "differentiable")

    def __init__(self, name: str | None = None, value: Any = None,
                 shape: Sequence[int | None] | None = None, expose: bool | None = None,
                 type: Any = None, differentiable: bool | None = None) -> None:  # noqa: A002
        if name is not None and not isinstance(name, str):
            raise TypeError(f"IOKey name must be a str, got {builtins_type(name).__name__}")
        value = None if value is TBD else value  # (published: TBD, no value yet)
        if expose is not None and not isinstance(expose, (bool, np.bool_)):  # (4th: type= published)
            raise TypeError(f"IOKey '{name}': expose must be a bool or None, got {expose!r}; "
                            "give a type as IOKey(..., type=...)")
        if differentiable is not None and not isinstance(differentiable, (bool, np.bool_)):
            raise TypeError(f"IOKey '{name}': differentiable must be a bool or None, got "
                            f"{differentiable!r}")
        self.name, self.expose = name, expose
        self.differentiable = None if differentiable is None else bool(differentiable)
        self.kinds = None if type is None else kinds_of(type, str(name))
        if self.differentiable:  # (published: a differentiable connection is Tensor[float])
            if self.kinds is not None and "float" not in self.kinds:
                raise TypeError(f"IOKey '{name}': a differentiable connection is Tensor[float], "
                                f"got type={type_name(self.kinds)}")
            self.kinds = frozenset({"float"})
            if value is not None:
                raise ValueError(f"IOKey '{name}': a constant value gets no gradient; give "
                                 "value= or differentiable=True, not both")
        self.value = None if value is None else np.asarray(value)
        self.value_shape: Shape | None = None if shape is None else _as_shape(name or "IOKey", shape)
        if self.value is not None:
            self.value_shape = unify(self.value_shape, self.value.shape, f"{name} (shape)",
                                     f"{name} (value)")
            if self.kinds is not None and value_kind(self.value) not in self.kinds:
                raise TypeError(f"IOKey '{name}': its value holds {value_kind(self.value)} "
                                f"elements, but its type is {type_name(self.kinds)}")

    @property
    def shape(self) -> ShapeWire:
        """As published: the shape of the connection this key names, as a shape wire
        (``queries.shape[0]``), known at compile time. The shape declared with
        ``IOKey(shape=...)`` is :attr:`value_shape`."""
        if self.name is None and self.value is None:
            raise TypeError("IOKey().shape: an unnamed IOKey is a new internal wire wherever it "
                            "is connected, so it names no one connection to read a shape from; "
                            "name it (IOKey(\"x\").shape) or read the connection it was given to "
                            "(block.input.shape)")
        return super().shape

    def __repr__(self) -> str:
        args = [] if self.name is None else [repr(self.name)]
        if self.value is not None and self.name is None:
            args.append(f"value={self.value.item()!r}" if self.value.ndim == 0 else
                        f"value=array{list(self.value.shape)}")
        elif self.value_shape is not None:
            args.append(f"shape={fmt(self.value_shape)}")
        return f"IOKey({', '.join(args)})"


class Connection:
    """A wire inside one model. ``name`` is ``None`` for internal wires."""

    __slots__ = ("name", "shape", "auto_output", "value", "exposed", "kinds", "differentiable")

    def __init__(self, name: str | None, shape: Shape | None = None) -> None:
        self.name = name
        self.shape = shape
        self.auto_output = False  # exposed only because a block's output was left unnamed
        self.value: np.ndarray | None = None  # a constant (IOKey(value=...))
        self.exposed = True  # False: named in its model, but not one of its terminals
        self.kinds: frozenset[str] | None = None  # IOKey(type=...): the element kinds allowed
        self.differentiable: bool | None = None  # IOKey(differentiable=...), set_differentiability

    def __repr__(self) -> str:
        return f"Connection({self.name!r}, {fmt(self.shape)})"


class Terminal(ConnectionOps):
    """A terminal of a block as an object: ``lin.input``, ``lin.weight``, ``model.cout``.
    Give it to another block's ``connect(...)`` (binds to that wire, named or not), to
    ``expose_keys`` (makes it an output) or to ``set_cin`` / ``set_cout``, or combine it with
    operators into an expression (``lin.output + 1``); its ``shape`` is a shape wire
    (``x.shape[0]``). ``key`` is the terminal's name on ``block``; ``conn`` the wire itself
    when ``block`` is the model that owns it (``model.cout``, ``model.input``)."""

    __slots__ = ("block", "key", "conn")

    def __init__(self, block: Block, key: str | None, conn: Connection | None = None) -> None:
        self.block, self.key, self.conn = block, key, conn

    def __repr__(self) -> str:
        return f"{type(self.block).__name__}.{self.key or '<internal>'}"
