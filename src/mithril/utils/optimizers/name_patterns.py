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


def _flat_bools(spec: Mapping[str, Any] | Sequence[Any], where: str, prefix: str = ""
                ) -> dict[str, bool]:
    """A pytree of bools (optax's mask) by flat name: dict keys and list / tuple indices
    joined with ``/`` (``head/0``), as params pytrees are named; a None leaf (optax: no
    parameter there) names nothing."""
    out = {}
    items = spec.items() if isinstance(spec, Mapping) else enumerate(spec)
    for k, v in items:
        name = f"{prefix}{k}"
        if v is None:
            continue
        if isinstance(v, (Mapping, list, tuple)):
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
    :func:`_matches` gives, before anything is built; and no name a group lists claimed by
    an earlier group's pattern (:func:`claimed_earlier`)."""
    mask = getattr(opt, "weight_decay_mask", None)
    if mask is not None:
        m = _matcher(mask, "weight_decay_mask")
        for n in names:
            _matches(m, n, "weight_decay_mask")
    groups = getattr(opt, "param_groups", None) or []
    if any(listed(g["params"]) for g in groups[1:]):  # (a name listed, claimed earlier)
        ms = [_matcher(g["params"], f"param_groups[{i}]['params']") for i, g in enumerate(groups)]
        owner = [next((i for i, m in enumerate(ms)
                       if _matches(m, n, f"param_groups[{i}]['params']")), None) for n in names]
        claimed_earlier(groups, owner, names)


def listed(spec: Any) -> list[str]:
    """The names a pattern lists by name: a list's, or a dict's ``True`` entries (none for a
    regex or a callable, which match rather than list)."""
    if isinstance(spec, str) or callable(spec):
        return []
    if isinstance(spec, Mapping):
        return [n for n, hit in _flat_bools(spec, "params").items() if hit]
    return list(spec)


def check_disjoint(groups: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a parameter name two groups list by name (torch: "some parameters appear in
    more than one parameter group"); patterns that overlap are first-match by design."""
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        for n in dict.fromkeys(listed(g["params"])):
            j = seen.setdefault(n, i)
            if j != i:
                raise ValueError(f"param_groups[{j}] and param_groups[{i}] both list parameter "
                                 f"'{n}': a parameter belongs to one group (torch refuses one "
                                 f"in two); drop it from one of them")


def claimed_earlier(groups: Sequence[Mapping[str, Any]], owner: Sequence[int | None],
                    names: Sequence[str]) -> None:
    """Refuse a parameter that ``param_groups[j]`` lists by name but an earlier group's
    pattern claims first (``owner``: each name's first matching group): it would silently
    take the earlier group's hyperparameters, not those it was listed with."""
    at = {n: i for i, n in enumerate(names)}
    for j, g in enumerate(groups):
        for n in listed(g["params"]):
            gi = owner[at[n]] if n in at else j
            if gi is not None and gi != j:
                raise ValueError(f"param_groups[{j}] lists parameter '{n}', but "
                                 f"param_groups[{gi}] ({groups[gi]['params']!r:.60}) matches "
                                 f"it first: a parameter belongs to one group (the first that "
                                 f"matches); narrow param_groups[{gi}]'s pattern or drop '{n}' "
                                 f"from param_groups[{j}]")
