"""The element kind each top-level input of a program takes (``Program.input_kinds``: "float",
"int", "bool" or "any") and the checks that follow from it at compile time: a trainable input
must be a float one, reached directly or through blocks that move its elements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..models.connection_types import type_name
from ..models.model import Model
from ..models.operator import Operator

Consumers = Mapping[int, list[tuple[Any, str]]]  # wire -> (node, input key) reading it


def consumers_of(nodes: list[Any]) -> dict[int, list[tuple[Any, str]]]:
    """Each wire's readers: (node, input key)."""
    out: dict[int, list[tuple[Any, str]]] = {}
    for node in nodes:
        for k, w in node.ins.items():
            out.setdefault(w, []).append((node, k))
    return out


def _moves(node: Any, key: str) -> bool:
    """``node`` passes input ``key``'s elements on unchanged in dtype (``Buffer``,
    ``Reshape``, an indexer: their output keeps its dtype, see ``output_dtypes``)."""
    from ..models.primitives import Cast

    op = node.op
    return (key == "input" and tuple(op.inputs) == ("input",) and not isinstance(op, Cast)
            and getattr(op, "output_dtype", None) is None)


def moved_to(w: int, consumers: Consumers) -> set[str]:
    """The kinds of the inputs that wire ``w`` reaches through blocks that move its elements:
    ``{"float"}`` for an input reshaped into a ``Linear``, so its data takes the float rule
    on every backend; ``{"any"}`` where it reaches no such input, or inputs of both kinds."""
    kinds: set[str] = set()
    for n, k in consumers.get(w, []):
        if k in n.op.int_inputs or k not in n.op.any_dtype_inputs:
            kinds.add("int" if k in n.op.int_inputs else "float")
        elif _moves(n, k):
            kinds |= moved_to(n.out, consumers)
    return kinds if len(kinds) == 1 else {"any"}


def int_inputs_reached(w: int, consumers: Consumers) -> list[str]:
    """The integer inputs (``"<path>.<key>"``: an ``Embedding`` index) that wire ``w`` feeds,
    directly or through blocks that move its elements (a ``Reshape``, a ``Buffer``, a slice)."""
    found: list[str] = []
    for n, k in consumers.get(w, []):
        if k in n.op.int_inputs:
            found.append(f"{n.path}.{k}")
        elif k in n.op.any_dtype_inputs and _moves(n, k):
            found += int_inputs_reached(n.out, consumers)
    return found


def declared_kinds(model: Model | Operator, key: str) -> frozenset[str] | None:
    """The element kinds the top-level connection ``key`` is declared with
    (``IOKey(type=...)``), or None."""
    c = model.conns.get(key) if isinstance(model, Model) else None
    return None if c is None else c.kinds


def check_float_trainable(model: Model | Operator, key: str, w: int, consumers: Consumers) -> None:
    """A trainable input gets a float array and a gradient: one that feeds an integer input
    (an ``Embedding`` index, also through a ``Reshape`` / ``Buffer`` / indexer) or is declared
    without float is a ``TypeError``, as torch refuses ``requires_grad`` on an integer tensor."""
    ints = int_inputs_reached(w, consumers)
    kinds = declared_kinds(model, key)
    if ints or (kinds is not None and "float" not in kinds):
        what = f"feeds the integer input(s) {ints}" if ints else f"is declared {type_name(kinds)}"
        raise TypeError(f"compile(trainable_keys=...): '{key}' {what}; only a float input is "
                        "trainable (gets a gradient), as torch's requires_grad")


def input_kind(model: Model | Operator, name: str, w: int, consumers: Consumers) -> str:
    """The kind input ``name`` (wire ``w``) takes at ``evaluate``: that of the operator inputs
    it feeds, directly or through blocks that move its elements; where those take any kind,
    the one kind it is declared with (``IOKey("x", type=Tensor[int])``: float or bool data
    is a ``DTypeError`` naming it, not passed on). A declaration the inputs it reaches refuse
    (an ``IOKey`` of ``Tensor[int]`` reshaped into a ``Linear``) is a ``TypeError``."""
    kinds = {"int" if k in n.op.int_inputs else "any" if k in n.op.any_dtype_inputs else "float"
             for n, k in consumers.get(w, [])}
    if len(kinds - {"any"}) > 1:
        raise TypeError(f"input '{name}' feeds both integer and float inputs")
    moved = kinds == {"any"}
    if moved:  # (only blocks that move elements: what their outputs feed)
        kinds = moved_to(w, consumers)
    kind = next(iter(kinds - {"any"}), "any" if kinds else "float")
    declared = declared_kinds(model, name)
    if declared is None:
        return kind
    if kind == "any":  # ("int|bool" for Tensor[int | bool]: data of another kind refused)
        return "|".join(sorted(declared))
    if moved and kind not in declared:
        raise TypeError(f"input '{name}' is declared {type_name(declared)}, but it reaches "
                        f"{kind} inputs through blocks that move its elements (a Reshape, a "
                        "Buffer, an indexer); declare the kind they take, or Cast it")
    return kind
