"""The published ``ToList(n)`` / ``ToTuple(n)``: list-valued wires, resolved when a model is built.

A wire carries one array here, so a list is not a wire of the compiled program: it is a
:class:`ListWire` of the model it is added to, which holds its elements (the connections bound
to ``input1`` .. ``input<n>``, in order; an element may be another list). Used as published:

* fed to ``Concat()``'s list ``input`` (``Concat().connect(input=to_list.output)``, by the
  list's name, or ``model += Concat()`` right after it): that ``Concat`` becomes ``Concat(n)``
  over the elements, as ``Concat().connect(input=[a, b, ...])`` does;
* indexed with an int (the element: a connection, or a nested list) or a slice (a list, or a
  tuple for ``ToTuple``, of those elements): ``to_list.output[-2:]``, ``lst[0][0]``.

Anything else a list might feed (a block's input that takes one array, arithmetic, a model
output) is refused when it is connected, with the block and terminal named, and the model left
as it was. A list is not an output of a compiled model (the published segformer encoder's
``hidden_states`` tuple): expose its elements instead (``expose_keys(h0=lst_elem_block.output)``).
Unconnected inputs become model inputs, named ``input1`` .. as any block's terminals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .operator import Operator

if TYPE_CHECKING:
    from .model import Bound, Model

__all__ = ["ListWire", "ToList", "ToTuple"]


class ListWire:
    """A list (``kind="list"``) or tuple of connections inside one model (see the module).
    ``name`` is its name in that model (``None``: unnamed); ``elements`` are connections of that
    model or other :class:`ListWire` s."""

    __slots__ = ("name", "elements", "kind", "read")

    def __init__(self, name: str | None, elements: tuple[Any, ...], kind: str) -> None:
        self.name, self.elements, self.kind = name, elements, kind
        self.read = False  # fed to a Concat, indexed or an element of another list

    def index(self, index: Any, where: str) -> Any:
        """``self[index]``: an int gives the element, a slice a list (tuple) of the elements."""
        import numpy as np

        n = len(self.elements)
        if isinstance(index, (int, np.integer)) and not isinstance(index, (bool, np.bool_)):
            if not -n <= index < n:
                raise IndexError(f"{where}: index {int(index)} is out of range for a {self.kind} "
                                 f"of {n} elements")
            self.read = True
            return self.elements[int(index)]
        if isinstance(index, slice):
            self.read = True
            return ListWire(None, self.elements[index], self.kind)
        raise TypeError(f"{where}: a {self.kind} (ToList / ToTuple output) is indexed with an int "
                        f"or a slice here, got {index!r}")

    def check_flat(self, where: str, why: str) -> None:
        """Refuse, naming ``where``, a wire holding another list (tuple) wire (``why``: the
        refusal's reason, its separator first) or nothing: a list of arrays is wanted."""
        nested = [e for e in self.elements if isinstance(e, ListWire)]
        if nested:
            named = f" {self.name}" if self.name else ""
            raise TypeError(f"{where}: the {self.kind}{named} holds a {nested[0].kind}{why}")
        if not self.elements:
            raise ValueError(f"{where}: the {self.kind} is empty")

    def __repr__(self) -> str:
        return f"ListWire({self.name!r}, {self.kind} of {len(self.elements)})"


class ToList(Operator):
    """The published ``ToList(n)``: a list of its inputs ``input1`` .. ``input<n>`` (see the
    module). A value given here (``ToList(2, input1=x)``) is a constant element, as published."""

    kind = "list"

    def __init__(self, n: int, **values: Any) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{type(self).__name__}: n must be a positive int, got {n!r}")
        self.n = n
        self.inputs = tuple(f"input{i + 1}" for i in range(n))
        unknown = sorted(set(values) - set(self.inputs))
        if unknown:
            raise TypeError(f"{type(self).__name__}({n}): no input(s) {unknown}; its inputs are "
                            f"input1 .. input{n}")
        self.values = values

    def connect(self, *args: Any, **connections: Any) -> Bound:
        """Bind ``input1`` .. ``input<n>`` (also positionally, as published) and ``output``."""
        return super().connect(*args, **{**{k: v for k, v in self.values.items()
                                            if k not in connections}, **connections})

    __call__ = connect

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n})"


class ToTuple(ToList):
    """The published ``ToTuple(n)``: as :class:`ToList`, a tuple (its slices are tuples)."""

    kind = "tuple"


def add_list_block(model: Model, bound: Bound, chain: bool) -> None:
    """Add a ``ToList`` / ``ToTuple`` to ``model``: its elements' connections (new model inputs
    where none is given; with ``+=`` ``input1`` is the previous output) and its list, named
    when ``output`` is given. The caller restores ``model`` if this raises."""
    from .connections import IOKey, Terminal

    block = bound.block
    assert isinstance(block, ToList)
    # (constructor values hold also for a block added without connect: model |= ToList(2, ...))
    given = {**{k: IOKey(value=v) for k, v in block.values.items()}, **bound.connections}
    prev_out = model._cout if model._cout is not None else model._last_output
    elements = []
    for i, key in enumerate(block.inputs):
        if key in given:
            elements.append(model._given(given[key], False, (block, key)))
        elif chain and i == 0 and prev_out is not None:
            elements.append(prev_out)
        else:
            elements.append(model._named(model._fresh_name(key)))
    name = None
    out = given.get("output")
    if out is not None:
        if isinstance(out, Terminal):
            raise TypeError(f"{block!r}.connect(output={out!r}): name its list (a str or "
                            "IOKey(name)); it cannot be bound to another connection")
        name = out.name if isinstance(out, IOKey) else out
        if not isinstance(name, str):
            raise TypeError(f"{block!r}.connect(output=...): a list's name is a str, got {out!r}")
        if name in model.conns or name in model._lists:
            raise ValueError(f"{block!r}.connect(output={name!r}): '{name}' names another "
                             "connection of this model")
    lw = ListWire(name, tuple(elements), block.kind)
    for e in elements:
        if isinstance(e, ListWire):
            e.read = True
    if name is not None:
        model._lists[name] = lw
    model._list_blocks.append((block, lw))
    model._last_output = lw
    if chain:
        model._cout = None


def expand_lists(model: Model, block: Any, mapping: dict[str, Any]) -> None:
    """Resolve the lists among ``block``'s connections: a list fed to ``Concat()``'s ``input``
    makes it ``Concat(n)`` over the list's elements; a list anywhere else is a ``TypeError``."""
    from .shaping import Concat

    for key, c in list(mapping.items()):
        if not isinstance(c, ListWire):
            continue
        what = f"{type(block).__name__}.{key}"
        if isinstance(block, Concat) and block.n is None and key == "input":
            c.check_flat(what, "; Concat joins arrays")
            block._set_n(len(c.elements))
            c.read = True
            del mapping[key]
            mapping.update({f"input{i + 1}": e for i, e in enumerate(c.elements)})
            continue
        raise TypeError(f"{what}: a {c.kind} (ToList / ToTuple output) feeds it, which takes one "
                        "array; a list feeds Concat() or is indexed (lst[0], lst[1:])")


def check_lists_read(model: Model) -> None:
    """Before compiling: a list no block reads (``ToTuple(...).connect(output="hidden_states")``
    meant as a model output, or ``ToList`` compiled alone) is a ``TypeError`` naming it, not an
    output silently left out. Nested models are checked too."""
    from .model import Model

    for block, lw in model._list_blocks:
        if not lw.read:
            what = f"'{lw.name}'" if lw.name is not None else "unnamed"
            raise TypeError(f"{block!r}: its {lw.kind} ({what}) is read by no block: a {lw.kind} is "
                            "not an output of a compiled model here (a wire carries one array); "
                            "feed it to Concat() or index it (lst[0]), or expose its elements")
    for block, _ in model.blocks:
        if isinstance(block, Model):
            check_lists_read(block)
