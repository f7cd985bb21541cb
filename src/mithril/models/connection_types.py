"""``IOKey(type=...)``: the published Mithril's tensor types, as constraints on a connection.

``Tensor[float]``, ``Tensor[int]``, ``Tensor[bool]``, ``Tensor[int | float | bool]`` (and
``Tensor`` alone, the last) say which element kinds a connection may carry. Every
connection carries an array here, so the published scalar types (``int``, ``float``,
``list[int]``, ...: connections that are not tensors) are refused by name.

A type is checked against what the connection feeds: an operator input that computes in
floats takes arrays of the model's float dtype (``"float"``), an integer input (class
labels, indices: ``Operator.int_inputs``) integers, and some (``any_dtype_inputs``: Where's
``cond``, Cast, the shaping primitives) any kind. A connection declared ``Tensor[int]`` that
feeds a float input is a ``TypeError`` naming it and the input, when the block is added and
again at compile time (connections typed or wired later are checked there); so is a constant
``value`` of another kind, when the ``IOKey`` is made.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any

import numpy as np


class ToBeDetermined:
    """The published ``ml.TBD``: "no value yet" where a value may be given
    (``IOKey("w", value=TBD)``, ``connect(weight=TBD)``, a block's default arguments); the
    same as leaving it out."""

    _instance: ToBeDetermined | None = None

    def __new__(cls) -> ToBeDetermined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "TBD"


TBD = ToBeDetermined()
KINDS = ("int", "float", "bool")
_KIND_OF = {int: "int", float: "float", bool: "bool"}


class TensorType:
    """``Tensor[...]``: the element kinds (a subset of int, float, bool) a connection may
    carry."""

    __slots__ = ("kinds",)

    def __init__(self, kinds: frozenset[str]) -> None:
        self.kinds = kinds

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorType) and other.kinds == self.kinds

    def __hash__(self) -> int:
        return hash(self.kinds)

    def __repr__(self) -> str:
        return type_name(self.kinds)


class Tensor:
    """The published Mithril's tensor type, for ``IOKey(type=Tensor[float])``:
    ``Tensor[float]``, ``Tensor[int]``, ``Tensor[bool]`` or a union of them
    (``Tensor[int | float | bool]``, the same as ``Tensor``). As published, ``Tensor(value)``
    is a constant where a connection is given (``Where().connect(cond=m, input1=Tensor(0.0),
    ...)``): it is ``IOKey(value=value)`` (``type=`` checks the value's kind)."""

    def __class_getitem__(cls, item: Any) -> TensorType:
        args = typing.get_args(item) if isinstance(item, types.UnionType) or \
            typing.get_origin(item) is typing.Union else (item,)
        kinds = [_KIND_OF.get(a) for a in args]
        if not args or None in kinds:
            raise TypeError(f"Tensor[...] takes int, float, bool or a union of them, got {item!r}")
        return TensorType(frozenset(k for k in kinds if k is not None))

    def __new__(cls, value: Any = TBD, type: Any = None, shape: Any = None,  # noqa: A002
                differentiable: bool | None = None) -> Any:
        from .connections import IOKey

        if (value is TBD or value is None) and type is None and shape is None \
                and differentiable is None:
            return TBD  # (the published placeholder: IOKey(name, value=tuple(Tensor(), ...)))
        if value is TBD or value is None:
            raise TypeError("Tensor() without a value is not offered: an input is a name or "
                            "IOKey(name, type=Tensor[...]); a constant is Tensor(value); a "
                            "tuple of inputs (published IOKey(name, value=tuple(Tensor() ...))) "
                            "is IOKey(name, value=tuple(TBD for _ in range(n)))")
        if shape is not None:
            raise TypeError("Tensor(value, shape=...): the shape is the value's here")
        if differentiable:
            raise TypeError("Tensor(value, differentiable=True) is not offered: a trainable "
                            "input with a starting value is IOKey(name, differentiable=True), "
                            "given at evaluate or in compile(constant_keys=...)")
        if type is None:
            return IOKey(value=value)
        return IOKey(value=value, type=type)


def type_name(kinds: frozenset[str]) -> str:
    """``Tensor[int | float]`` for ``{"float", "int"}`` (kinds in the published order)."""
    return "Tensor[" + " | ".join(k for k in KINDS if k in kinds) + "]"


#: the published scalar types: connections of arrays of that kind here
_SCALARS: dict[Any, frozenset[str]] = {int: frozenset({"int"}), float: frozenset({"float"}),
                                        bool: frozenset({"bool"})}


def kinds_of(typ: Any, key: str) -> frozenset[str]:
    """The element kinds ``IOKey(type=typ)`` allows; a ``TypeError`` naming ``key`` for a
    type that is no tensor type."""
    if typ is Tensor:
        return frozenset(KINDS)
    if isinstance(typ, TensorType):
        return typ.kinds
    if typ in _SCALARS:  # the published scalar connection (T5's IOKey("key_length", type=int)):
        return _SCALARS[typ]  # here an array of that kind (a Size output, a number)
    import typing

    elems = {a for a in typing.get_args(typ) if a is not Ellipsis}
    if typing.get_origin(typ) in (tuple, list) and len(elems) == 1 and \
            next(iter(elems)) in _SCALARS:  # (tuple[int, ...]: the 1-d array of a Shape output)
        return _SCALARS[next(iter(elems))]
    raise TypeError(f"IOKey '{key}': type={typ!r} is not offered: every connection carries an "
                    "array here, so its type is a tensor type (Tensor[float], Tensor[int], "
                    "Tensor[bool] or a union, e.g. Tensor[int | float | bool]), int, float or "
                    "bool (an array of that kind) or a tuple / list of one of those "
                    "(tuple[int, ...]: a 1-d array); mixed tuples and slices have no connection "
                    "here")


def value_kind(value: np.ndarray) -> str:
    """The kind of a constant's elements."""
    return "bool" if value.dtype.kind == "b" else "int" if value.dtype.kind in "iu" else "float"


def merged(a: frozenset[str] | None, b: frozenset[str] | None, key: str) -> frozenset[str] | None:
    """Two type declarations of one connection: both hold (their intersection), or a
    ``TypeError`` naming ``key`` when they share no kind."""
    if a is None or b is None:
        return b if a is None else a
    both = a & b
    if not both:
        raise TypeError(f"connection '{key}' is declared {type_name(a)} and {type_name(b)}: "
                        "no element kind satisfies both")
    return both


def fed_kinds(block: Any, key: str) -> Iterator[tuple[str, str]]:
    """(kind, where) for each operator input that terminal ``key`` of ``block`` feeds, down
    through nested models: kind is "float", "int" or "any" (see the module docstring)."""
    from .model import Model

    if not isinstance(block, Model):
        if key in getattr(block, "inputs", ()):
            kind = ("int" if key in block.int_inputs else
                    "any" if key in block.any_dtype_inputs else "float")
            yield kind, f"{type(block).__name__}.{key}"
        elif key in (getattr(block, "param_init", None) or {}):  # a parameter role
            yield "float", f"{type(block).__name__}.{key}"
        return
    c = block.conns.get(key)
    if c is None:
        return
    for child, mapping in block.blocks:
        for k, v in mapping.items():
            if v is c and k not in child.output_keys:
                yield from fed_kinds(child, k)


def check_fed(kinds: frozenset[str] | None, name: str | None, block: Any, key: str) -> None:
    """A ``TypeError`` when a connection declared ``kinds`` feeds an input of ``block``
    (through terminal ``key``) that takes no array of those kinds."""
    if kinds is None:
        return
    for kind, where in fed_kinds(block, key):
        if kind != "any" and kind not in kinds:
            raise TypeError(f"connection '{name or key}' is declared {type_name(kinds)}, but it "
                            f"feeds {where}, which takes {kind} arrays here")


def check_model_types(model: Any) -> None:
    """Every typed connection of ``model`` and of its nested models against the inputs it
    feeds (what ``compile`` checks: connections typed or wired after their blocks were added
    are checked here)."""
    from .model import Model

    for block, mapping in model.blocks:
        for key, c in mapping.items():
            if key not in block.output_keys:
                check_fed(c.kinds, c.name, block, key)
        if isinstance(block, Model):
            check_model_types(block)
