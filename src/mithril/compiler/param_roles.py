"""Parameters named by their compiled names in ``compile(constant_keys=..., data_keys=...,
trainable_keys=...)``, as a published-Mithril program names the keys the compiled model
reports: ``constant_keys={"linear_0.weight": w}`` folds that weight in, ``data_keys=
{"linear_0.weight"}`` makes it a data input of ``evaluate``, and ``trainable_keys`` naming a
parameter changes nothing (it is trainable already).

A parameter is made by its operator when the role (``weight``, ``bias``) is left unconnected;
naming it here connects the role to a new wire of that name, the way
``connect(weight="linear_0.weight")`` would have.

The model's own declarations (``IOKey(differentiable=...)``, ``Model.set_differentiability``)
add to these sets, as published, where the compile's sets do not name the key (those win):
a differentiable input is trainable, a parameter role fed by a connection declared not
differentiable is a data input. The model's ``IOKey(type=...)`` declarations are checked here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import KeyMismatchError
from ..models.connection_types import check_model_types
from ..models.model import param_keys


def name_param_roles(b: Any, terminals: Mapping[str, int], constant_keys: Mapping[str, Any] | None,
                     data_keys: Iterable[str], trainable_keys: Iterable[str], model: Any = None,
                     shape_keys: Iterable[str] = (),
                     ) -> tuple[dict[str, int], tuple[str, ...], tuple[str, ...]]:
    """For a flattened model (``b``: the program builder, with its nodes and wires) and its
    top-level ``terminals`` (name -> wire): the new top-level wires feeding the parameter
    roles that ``constant_keys`` / ``data_keys`` / ``shape_keys`` (the compile's ``shapes``:
    a parameter under its compiled name, its shape given) name (``"<block path>.<role>"``), and
    ``data_keys`` and ``trainable_keys`` as tuples (the latter without the names of
    parameters). A key naming neither a terminal nor a parameter is a ``KeyMismatchError``.
    ``model`` (the top-level model): its declared differentiabilities join the sets (see
    the module docstring)."""
    data, trainable = tuple(data_keys), tuple(trainable_keys)
    if model is not None:
        check_model_types(model)
        data, trainable = _declared(b, model, terminals, constant_keys, data, trainable)
    roles = {f"{n.path}.{k}": (n, k) for n in b.nodes for k in param_keys(n.op)
             if k not in n.ins and k not in (getattr(n.op, "param_names", None) or {})}
    # a parameter role's unnamed wire declared not differentiable by object
    # (set_differentiability({lin.weight: False})): a data input under the wire's name
    declared = {b.names[w]: w for n in b.nodes for k, w in n.ins.items()
                if k in param_keys(n.op) and w in b.frozen and b.names[w] not in terminals}
    frozen = {k: w for k, w in declared.items() if k not in trainable}  # (the compile's win)
    data = (*data, *(k for k in frozen if k not in data and k not in (constant_keys or {})))
    for what, keys in (("constant_keys", tuple(constant_keys or ())), ("data_keys", data),
                       ("trainable_keys", trainable)):
        for key in keys:
            if key not in terminals and key not in roles and key not in declared:
                raise KeyMismatchError(
                    f"compile({what}=...): '{key}' is not an input or a parameter; the "
                    f"terminals are {sorted(terminals)} and the parameters {sorted(roles)}")
    wires: dict[str, int] = dict(frozen)
    for key in (*(constant_keys or ()), *data, *shape_keys):
        if key in roles and key not in terminals and key not in wires:
            node, role = roles[key]
            wires[key] = node.ins[role] = b.wire(key, None)
    # a wire feeding a parameter role (connect(weight="w")) is a parameter already
    role_wires = {w for n in b.nodes for k, w in n.ins.items() if k in param_keys(n.op)}
    return wires, data, tuple(k for k in trainable if (k not in roles or k in terminals)
                              and terminals.get(k) not in role_wires and k not in declared)


def _declared(b: Any, model: Any, terminals: Mapping[str, int], constant_keys: Mapping[str, Any] | None,
              data: tuple[str, ...], trainable: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``data`` and ``trainable`` with the model's declared differentiabilities added: a
    top-level input declared differentiable is trainable (a parameter role's wire is a
    parameter already), a parameter role's wire declared not differentiable is data. Keys the
    compile's sets name keep their role there; a wire some block computes is left alone."""
    named = {*(constant_keys or ()), *data, *trainable}
    produced = {n.out for n in b.nodes}
    roles = {w for n in b.nodes for k, w in n.ins.items() if k in param_keys(n.op)}
    more_data, more_trainable = [], []
    for name, c in model.conns.items():
        w = terminals.get(name)
        if c.differentiable is None or w is None or name in named or w in produced \
                or c.value is not None:
            continue
        if c.differentiable and w not in roles:
            more_trainable.append(name)
        elif not c.differentiable and w in roles:
            more_data.append(name)
    return (*data, *more_data), (*trainable, *more_trainable)
