"""List-valued terminals of a created model: the published ``Model.create(hidden_states=
ToTuple(n)(*hs))`` (the segformer encoder's stage outputs).

A wire carries one array here (:mod:`mithril.models.list_wires`), so a model's list output is
its elements, each an output of its own, named ``<key>_0`` .. ``<key>_<n-1>``: what a compiled
model returns and what its gradients are given for. The model remembers the list
(``_list_outputs``: key -> (kind, element keys)), so that a call of it returns the list as one
output, as published: ``last, hs = encoder(input=x)`` unpacks two outputs, ``hs`` a list of the
parent's wires (indexed ``hs[0]``, fed to ``Concat()`` or given to ``Model.create`` as a list
output again).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .list_wires import ListWire

if TYPE_CHECKING:
    from .model import Model


def list_outputs(block: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``block``'s list outputs: key -> (kind, element output keys); none for most blocks."""
    return block.__dict__.get("_list_outputs") or {}


def call_outputs(block: Any) -> tuple[str, ...]:
    """The outputs a call of ``block`` returns: its output keys, each list output's elements
    given as the list's key, where its first element is."""
    lists = list_outputs(block)
    if not lists:
        return tuple(block.output_keys)
    first = {elems[0]: key for key, (_, elems) in lists.items() if elems}
    inside = {e for _, elems in lists.values() for e in elems}
    return tuple(first.get(k, k) for k in block.output_keys if k in first or k not in inside)


def list_of_call(block: Any, key: str, mapping: dict[str, Any]) -> ListWire | None:
    """The list output ``key`` of ``block`` in its parent (``mapping``: the block's terminals
    bound to the parent's wires), or ``None`` when ``key`` is no list output."""
    got = list_outputs(block).get(key)
    if got is None:
        return None
    kind, elems = got
    return ListWire(None, tuple(mapping[e] for e in elems), kind)


def expose_list(model: Model, key: str, lw: ListWire, where: str) -> Any:
    """``Model.create(key=a list)``: each element an output ``key_i`` of ``model`` (see the
    module); returns the first element's connection. The caller undoes it if this raises."""
    from .functional import _expose

    lw.check_flat(where, ": a list output is a list of arrays here")
    names = tuple(f"{key}_{i}" for i in range(len(lw.elements)))
    taken = [k for k in (key, *names) if k in model.conns or k in model._lists]
    if taken:
        raise ValueError(f"{where}: its elements are outputs {list(names)}, but '{taken[0]}' "
                         "names another connection of the model")
    shown = [_expose(model, k, c) for k, c in zip(names, lw.elements, strict=True)]
    lw.read = True
    model.__dict__.setdefault("_list_outputs", {})[key] = (lw.kind, names)
    return shown[0]


# -- list inputs: the published IOKey("input", value=tuple(Tensor() ...)) -------------------
def is_list_value(value: Any) -> bool:
    """An ``IOKey`` value that declares a tuple of inputs: a tuple of values to be determined
    (``tuple(TBD for _ in range(n))``; published ``tuple(Tensor() ...)``), as an object array."""
    from .connection_types import TBD

    return value is not None and value.dtype == object and value.ndim == 1 and \
        value.size > 0 and all(v is TBD for v in value)


def list_input(model: Model, key: Any, is_output: bool) -> ListWire:
    """The tuple input ``key`` (an ``IOKey`` whose value :func:`is_list_value`) of ``model``:
    its elements are inputs ``<name>_0`` .. (what a compiled model takes), the tuple a
    ``ListWire`` named ``<name>`` (indexed ``hidden_states[i]``) and, for a created model, a
    list input its calls take whole (``head(input=encoder_call_hidden_states)``)."""
    if is_output or key.name is None:
        raise ValueError(f"{key!r}: a tuple of inputs (value=tuple(TBD ...)) is a named input")
    got = model._lists.get(key.name)
    if got is not None:  # (the same IOKey read twice: hidden_states[0], hidden_states[i])
        if len(got.elements) != key.value.size or got.kind != "tuple":
            raise ValueError(f"{key!r}: '{key.name}' names a {got.kind} of "
                             f"{len(got.elements)} already")
        return got
    if key.name in model.conns:
        raise ValueError(f"{key!r}: '{key.name}' names another connection of the model")
    names = tuple(model._fresh_name(f"{key.name}_{i}") for i in range(key.value.size))
    lw = ListWire(key.name, tuple(model._named(n) for n in names), "tuple")
    model._lists[key.name] = lw
    model.__dict__.setdefault("_list_inputs", {})[key.name] = ("tuple", names)
    return lw


def list_inputs(block: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``block``'s tuple inputs: key -> (kind, element input keys) (those a refused call
    left behind are not: their list is gone from ``_lists``)."""
    got = block.__dict__.get("_list_inputs") or {}
    lists = block.__dict__.get("_lists") or {}
    return {k: v for k, v in got.items() if k in lists}


def bind_list_inputs(model: Model, block: Any, given: dict[str, Any],
                     mapping: dict[str, Any]) -> None:
    """``block(input=a_list)`` in ``model``: the list's elements bound to ``block``'s tuple
    input's elements (in ``mapping``), checked to be a list of as many arrays."""
    for key, (kind, elems) in list_inputs(block).items():
        if key not in given:
            continue
        what = f"{type(block).__name__}.connect({key}=...)"
        lw = model._given(given[key], False, (block, key))
        if not isinstance(lw, ListWire):
            raise TypeError(f"{what}: '{key}' is a {kind} of {len(elems)} inputs: give it a "
                            f"ToTuple / ToList output or a created model's list output")
        nested = [e for e in lw.elements if isinstance(e, ListWire)]
        if nested or len(lw.elements) != len(elems):
            raise ValueError(f"{what}: '{key}' takes a {kind} of {len(elems)} arrays, got a "
                             f"{lw.kind} of {len(lw.elements)}" + (" holding a list" if nested
                                                                   else ""))
        lw.read = True
        mapping.update(zip(elems, lw.elements, strict=True))
