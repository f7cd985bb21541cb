"""The name patterns that ``param_groups``' ``"params"``, ``weight_decay_mask`` and the
weight-decay exclusions take, and what a parameter name matches: a regex (searched in the
name), a list of names, a function of one name returning a bool, or a dict of name -> bool
(optax's ``mask`` pytree of bools: nested dicts name their leaves by key path,
``{"dense": {"kernel": True}}`` is ``"dense/kernel"``, as ``optax_transformation`` names a
pytree's; every parameter must have an entry)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: what a pattern becomes: a predicate, the names it lists, or the flat name -> bool dict
Matcher = Callable[[str], bool] | list[str] | dict[str, bool]


def _flat_bools(spec: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, bool]:
    out = {}
    for k, v in spec.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat_bools(v, where, name + "/"))
        elif isinstance(v, (bool, np.bool_)):
            out[name] = bool(v)
        else:
            raise TypeError(f"{where}['{name}'] must be a bool (True: it matches), got "
                            f"{type(v).__name__}")
    return out


def _matcher(spec: Any, where: str) -> Matcher:
    """A predicate for a name pattern (regex searched in the name, or callable), the list
    of names it lists, or a dict's flat name -> bool (see the module docs)."""
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{where}: {spec!r} is not a valid regular expression: {e}") from None
        return lambda name: rx.search(name) is not None
    if isinstance(spec, Mapping):
        return _flat_bools(spec, where)
    if callable(spec):
        return spec
    if isinstance(spec, Sequence) and all(isinstance(n, str) for n in spec):
        return list(spec)
    raise TypeError(f"{where} must be a regex string, a list of names or a callable(name) -> "
                    f"bool, or a dict of name -> bool, got {type(spec).__name__}")


def _matches(m: Matcher, name: str, where: str) -> bool:
    if isinstance(m, list):
        return name in m
    if isinstance(m, dict):
        if name not in m:
            raise KeyError(f"{where} has no entry for parameter '{name}' (a dict needs a bool "
                           f"for every parameter, as optax's mask pytree)")
        return m[name]
    # (optax's mask functions take the whole params pytree: ours get one name)
    why = (f"({where} functions take one parameter name (str) and return a bool; optax's "
           f"take the whole params pytree)")
    try:
        hit = m(name)
    except Exception as e:  # noqa: BLE001 - the user's callable: name it
        raise ValueError(f"{where}: the callable raised on parameter '{name}': {e!r} {why}") from e
    if not isinstance(hit, (bool, np.bool_)):
        raise TypeError(f"{where}: the callable must return a bool, got {type(hit).__name__} "
                        f"for '{name}' {why}")
    return bool(hit)


def check_mask(opt: Any, names: Sequence[str]) -> None:
    """``opt``'s ``weight_decay_mask`` tried on each of ``names`` (an ``init``'s): a dict
    naming all of them, a function returning a bool for each, else the error
    :func:`_matches` gives, before anything is built."""
    mask = getattr(opt, "weight_decay_mask", None)
    if mask is not None:
        m = _matcher(mask, "weight_decay_mask")
        for n in names:
            _matches(m, n, "weight_decay_mask")
