"""Muon's routing of tensors between its matrix path and its fallback by name
(``exclude_layers``, ``exclude_embeddings``, ``weight_dimension_numbers``): its ``init``,
which lays the slots out by it, and the check that a state was laid out alike; and the
fallback's learning rate, which follows Muon's."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ...errors import ShapeError
from . import dimension_numbers as _dn
from .base import Optimizer
from .checks import describe
from .layout import Layout
from .state import OptimizerState

if TYPE_CHECKING:
    from .muon import Muon


def _check_layers(exclude_layers: Any) -> list[str]:
    """Keras's ``exclude_layers``: None or regexes (a bare string is refused: Keras would
    search each of its characters)."""
    if exclude_layers is None:
        return []
    if isinstance(exclude_layers, (str, bytes)) or not isinstance(exclude_layers, Sequence):
        raise TypeError(f"exclude_layers must be a list of regexes (searched in each "
                        f"parameter's name), got {describe(exclude_layers)}")
    for i, e in enumerate(exclude_layers):
        if not isinstance(e, str):
            raise TypeError(f"exclude_layers[{i}] must be a regex string, got {describe(e)}")
        try:
            re.compile(e)
        except re.error as err:
            raise ValueError(f"exclude_layers[{i}] = {e!r} is not a regex: {err}") from None
    return list(exclude_layers)


def _check_routing(self: Muon, state: Any, others: set[str]) -> None:
    """A state laid out for another routing (a Muon with other exclusions, or without) is
    refused, naming the first parameter it differs on (its slots would not fit)."""
    if not hasattr(state, "slot_layout"):  # (an optax transformation's rows: its init
        return  # laid them out)
    lay = state.slot_layout("momentum_buffer")
    for n, s, m in zip(lay.names, state.layout.shapes, lay.shapes):
        if (m == (0,)) != (n in others) and 0 not in s:
            by = "the fallback" if n in others else "Muon"
            raise ValueError(f"this Muon state was initialised with other exclusions "
                             f"(exclude_layers / exclude_embeddings / weight_dimension_numbers):"
                             f" '{n}' is updated by {by} here; init a state with this Muon")


def _reroute(self: Muon, state: OptimizerState) -> OptimizerState:
    """The momentum and fallback slots laid out by name (``exclude_layers`` /
    ``exclude_embeddings``): :meth:`.Optimizer.init` asks their shapes by shape alone."""
    lay, engine = state.layout, state.engine
    for s in self.slot_names():
        shapes = tuple(tuple(self.slot_shape(s, shp, n)) for n, shp in zip(lay.names, lay.shapes))
        if shapes == state.slot_layout(s).shapes:
            continue
        new = lay if shapes == lay.shapes else Layout(lay.names, shapes, lay.dtype)
        state.slots[s] = engine.full(new.total, self.slot_init(s))
        if new is lay:
            state.slot_layouts.pop(s, None)
        else:
            state.slot_layouts[s] = new
    return state


def _init(self: Muon, params: Mapping[str, Any]) -> OptimizerState:
    """As :meth:`.Optimizer.init`; ``weight_dimension_numbers`` checked against the
    parameters first, and without a fallback a parameter that is not a matrix refused, each
    by name; with exclusions or dimension numbers the slots laid out by name
    (:func:`_reroute`)."""
    dims = self.weight_dimension_numbers
    if dims is not None and isinstance(params, Mapping):  # (each refused by name, first)
        _dn.check_names(dims, list(params))
        for name, p in params.items():
            if getattr(p, "shape", None) is not None:
                self.matrix_axes(name, tuple(p.shape))
    if self.fallback is None and not self.owns_all() and isinstance(params, Mapping):
        for name, p in params.items():
            shape = getattr(p, "shape", None)
            if shape is not None and self.matrix_axes(name, tuple(shape)) is None:
                raise ShapeError(f"Muon(fallback=None) updates 2-D parameters only (as "
                                 f"torch.optim.Muon; or those weight_dimension_numbers gives "
                                 f"axes); params['{name}'] has shape {tuple(shape)}: give "
                                 f"Muon a fallback (e.g. fallback=AdamW()) for the others")
    if not (self.exclude_layers or self.exclude_embeddings or dims is not None):
        return Optimizer.init(self, params)
    self.__dict__["_shapes_alone"] = True  # (shape-rule slots, laid out by name after)
    try:
        state = Optimizer.init(self, params)
    finally:
        del self.__dict__["_shapes_alone"]
    return _reroute(self, state)


def _fallback_rate(name: str, value: Any, own: Mapping[str, Any]) -> Any:
    """The fallback's rate once Muon's ``name`` is ``value`` (Muon's times the ratio); no
    number (None, a string, a list, an int too large) is refused before anything is set (a
    traced value, a step's hyperparameter in a JAX program, multiplies as it is)."""
    lr, ratio = (value, own["fallback_lr_ratio"]) if name == "learning_rate" else (
        own["learning_rate"], value)
    why = "must be a number"
    if value is None or isinstance(value, (str, bytes, Sequence, Mapping)):
        why = f"{why}, got {describe(value)}"
    else:
        try:
            return lr * ratio
        except (TypeError, OverflowError) as e:
            why = f"{why} ({e})"
    raise (ValueError if "too large" in why else TypeError)(
        f"Muon: {name}={describe(value)} refused: {name} {why} (the fallback's learning "
        f"rate is Muon's times fallback_lr_ratio)")
