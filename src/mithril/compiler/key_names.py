"""Connection objects as the keys of ``compile(...)``: the published Mithril takes
``trainable_keys={model.input}``, ``shapes={model.input: [3, 4]}`` and the like, so each
key set may name a terminal by object as well as by name."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..errors import KeyMismatchError
from ..models.model import IOKey, Model, Terminal, param_keys


def key_name(model: Any, key: Any, what: str) -> Any:
    """The name ``key`` gives in ``compile(what=...)``: a string as is, an ``IOKey`` its
    name, a connection object (``model.input``, ``child.output``) the name of the model's
    wire it refers to. Anything else is returned unchanged, for the key checks to refuse."""
    if isinstance(key, IOKey) and key.name is not None:
        return key.name
    if not isinstance(key, Terminal):
        return key
    role = _param_role_name(model, key)
    if role is not None:
        return role
    if key.block is model:
        conn = key.conn
    elif isinstance(model, Model) and key.conn is not None and model._owns(key.conn):
        conn = key.conn
    else:
        # a direct child's terminal: the wire it is bound to in this model (looked up only,
        # so that a refused key leaves the model as it was)
        mapping = next((m for b, m in getattr(model, "blocks", ()) if b is key.block), None)
        conn = None if mapping is None else mapping.get(key.key)
        if conn is None:
            raise KeyMismatchError(f"compile({what}=...): {key!r} is not a connection of the "
                                   "compiled model or of one of its direct children")
    name = key.key if conn is None else conn.name
    if name is None:
        raise KeyMismatchError(f"compile({what}=...): {key!r} is an internal connection of the "
                               "model; name it (connect(...) or expose_keys) to use it here")
    return name


def _param_role_name(model: Any, key: Terminal) -> str | None:
    """The compiled name of a parameter role given as an object (``constant_keys={lin.weight:
    w}``, as published) that no wire of the model carries: ``<child path>.<role>`` for a direct
    child ``lin`` (or for the compiled operator itself); None for anything else."""
    from .program import _child_names, _snake

    if key.key not in param_keys(key.block):
        return None
    if key.block is model:  # an operator compiled alone: the one child of its wrapper model
        return f"{_snake(type(model).__name__)}.{key.key}"
    blocks = getattr(model, "blocks", ())
    idx = next((i for i, (b, _) in enumerate(blocks) if b is key.block), None)
    if idx is None or key.key in blocks[idx][1]:  # (a role bound to a wire: named by the wire)
        return None
    return f"{_child_names(model, '')[idx]}.{key.key}"


def key_names(model: Any, keys: Iterable[Any] | None, what: str) -> tuple[Any, ...]:
    """``key_name`` of each key of a key set (a single name is one key), each once: a key
    given by name and by object (``["x", model.x]``) is one key."""
    if keys is None:  # (as the published compile's defaults)
        return ()
    if isinstance(keys, (str, IOKey, Terminal)):
        keys = (keys,)
    elif not isinstance(keys, Iterable):
        raise TypeError(f"compile({what}=...) must be a key or a set of keys, got "
                        f"{type(keys).__name__}")
    return tuple(dict.fromkeys(key_name(model, k, what) for k in keys))


def keyed_by_name(model: Any, mapping: Mapping[Any, Any] | None, what: str) -> dict[Any, Any] | None:
    """``mapping`` with its keys as ``key_name`` gives them. Two keys naming one connection
    (``{"x": ..., model.x: ...}``) with different values are a ``KeyMismatchError`` naming
    both, not the last one silently winning."""
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise TypeError(f"compile({what}=...) must be a dict, got {type(mapping).__name__}")
    out: dict[Any, Any] = {}
    given: dict[Any, Any] = {}
    for k, v in mapping.items():
        name = key_name(model, k, what)
        if name in out and not _same_value(out[name], v):
            vals = f" ({out[name]!r} and {v!r})" if what == "shapes" else ""
            raise KeyMismatchError(f"compile({what}=...): {given[name]!r} and {k!r} both name "
                                   f"'{name}', with different values{vals}; give it once")
        out[name], given[name] = v, given.get(name, k)
    return out


def _same_value(a: Any, b: Any) -> bool:
    """``a`` and ``b`` (shapes, constants) are the same value: of one shape and dtype, equal
    element by element (NaN equal to NaN)."""
    if a is b:
        return True
    try:
        x, y = np.asarray(a), np.asarray(b)
        return x.shape == y.shape and x.dtype == y.dtype and \
            bool(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"))
    except (TypeError, ValueError, RuntimeError):
        return False
