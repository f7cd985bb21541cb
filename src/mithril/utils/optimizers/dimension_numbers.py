"""optax's ``weight_dimension_numbers`` for Muon and GaLore: which axes of a parameter are
the rows (``reduction_axis``, fan-in) and which the columns (``output_axis``, fan-out) of
the matrix they treat it as. The tensor is transposed to ``(batch…, reduction…, output…)``
and reshaped to ``(B, fan_in, fan_out)``; the axes named in neither are batch axes (Muon:
each slice orthogonalised alone; GaLore takes none)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .checks import describe


class DimensionNumbers(NamedTuple):
    """optax's ``MuonDimensionNumbers`` / ``GaLoreDimensionNumbers``: the parameter's
    axis or axes that are the matrix's rows (``reduction_axis``: the fan-in, as in
    ``y = x·W``) and those that are its columns (``output_axis``: the fan-out). Negative
    axes count from the end. optax's own instances are taken too (and any object with
    these two fields), and a plain pair ``(reduction_axis, output_axis)``."""

    reduction_axis: int | Sequence[int] = 0
    output_axis: int | Sequence[int] = 1


#: what ``weight_dimension_numbers`` takes: None, one spec, ``{name: spec or None}`` or a
#: callable returning such a dict
Spec = DimensionNumbers | Mapping[str, Any] | Callable[[Mapping[str, Any]], Any] | None


class Axes(NamedTuple):
    """One parameter's resolved dimension numbers: non-negative axes, each tuple in the
    order given (the batch axes ascending, as optax)."""

    batch: tuple[int, ...]
    reduction: tuple[int, ...]
    output: tuple[int, ...]


def _axes(value: Any, what: str) -> tuple[int, ...]:
    """An axis or a sequence of axes, as a tuple of ints (unchecked against a shape)."""
    items = [value] if isinstance(value, (int, np.integer)) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items or any(
            isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in items):
        raise TypeError(f"{what} must be an axis (int) or a non-empty sequence of axes, got "
                        f"{describe(value)}")
    return tuple(int(a) for a in items)


def check_spec(spec: Any, what: str) -> DimensionNumbers:
    """``spec`` (ours, optax's, duck-typed by its two fields, or a pair) as a
    :class:`DimensionNumbers` of int tuples; an axis named twice is refused."""
    if hasattr(spec, "reduction_axis") and hasattr(spec, "output_axis"):
        pair = (spec.reduction_axis, spec.output_axis)
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        pair = tuple(spec)
    else:
        raise TypeError(f"{what} must be a DimensionNumbers(reduction_axis, output_axis) "
                        f"(or optax's), got {describe(spec)}")
    red, out = _axes(pair[0], f"{what}.reduction_axis"), _axes(pair[1], f"{what}.output_axis")
    if len(set(red + out)) < len(red + out):  # (as given: -1 and 2 are checked per shape)
        raise ValueError(f"{what}: an axis is named twice in reduction_axis={red} / "
                         f"output_axis={out}")
    return DimensionNumbers(red, out)


def check_dimension_numbers(value: Any, what: str = "weight_dimension_numbers") -> Any:
    """The constructor's argument checked: None, one spec, a dict ``{name: spec or None}``
    or a callable (called per parameter: :func:`resolve`)."""
    if value is None or (callable(value) and not isinstance(value, (tuple, list))
                         and not hasattr(value, "reduction_axis")):
        return value
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"{what} keys must be parameter names, got {describe(k)}")
        return {k: None if v is None else check_spec(v, f"{what}['{k}']")
                for k, v in value.items()}
    return check_spec(value, what)


def plain(value: Any) -> Any:
    """``value`` in plain Python (lists), as a state dict keeps it (a NamedTuple would need
    its class to load: ``torch.load(weights_only=True)`` refuses it)."""
    if isinstance(value, DimensionNumbers):
        return [list(value.reduction_axis), list(value.output_axis)]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def normalize(spec: DimensionNumbers, shape: Sequence[int], name: str, what: str,
              batch: bool = True) -> Axes:
    """``spec`` against the parameter ``name`` of ``shape``: each axis in range (negative
    from the end), none in both, a tensor of 2 or more axes; ``batch=False`` (GaLore):
    every axis named."""
    nd = len(shape)
    where = f"{what} for '{name}' (shape {tuple(shape)})"
    if nd < 2:
        raise ValueError(f"{where}: a spec needs a tensor of 2 or more axes (give None)")
    for a in spec.reduction_axis + spec.output_axis:
        if not -nd <= a < nd:
            raise ValueError(f"{where}: axis {a} is out of range for {nd} axes")
    red = tuple(a % nd for a in spec.reduction_axis)
    out = tuple(a % nd for a in spec.output_axis)
    if len(set(red + out)) < len(red + out):
        raise ValueError(f"{where}: reduction axes {red} and output axes {out} overlap")
    rest = tuple(a for a in range(nd) if a not in red + out)
    if rest and not batch:
        raise ValueError(f"{where}: axes {rest} are in neither reduction_axis nor output_axis "
                         f"(GaLore takes no batch axes: name every axis)")
    return Axes(rest, red, out)


def resolve(value: Any, name: str, shape: Sequence[int], default: Axes | None,
            what: str = "weight_dimension_numbers", batch: bool = True,
            cache: dict[Any, Any] | None = None) -> Axes | None:
    """The parameter ``name``'s :class:`Axes`, or None (not a matrix: the fallback).
    ``value``: None gives ``default`` for a 2-D tensor; one spec holds for every tensor of
    2 or more axes; a dict must name every parameter; a callable is called with
    ``{name: array}`` for each parameter alone (read-only zeros of its shape) and returns
    such a dict (or the spec / None itself)."""
    shape = tuple(shape)
    if value is None:
        return default if len(shape) == 2 else None
    if isinstance(value, DimensionNumbers):
        return normalize(value, shape, name, what, batch) if len(shape) >= 2 else None
    if isinstance(value, Mapping):
        if name not in value:
            raise KeyError(f"{what} has no entry for '{name}': give every parameter a spec or "
                           f"None (or a callable)")
        spec = value[name]
        return None if spec is None else normalize(spec, shape, name, f"{what}['{name}']",
                                                   batch)
    key = (value, name, shape)
    if cache is not None and key in cache:
        return cache[key]
    got = value({name: np.broadcast_to(np.zeros((), np.float32), shape)})
    if isinstance(got, Mapping):
        if name not in got:
            raise KeyError(f"{what}: the callable's dict has no entry for '{name}'")
        got = got[name]
    spec = None if got is None else check_spec(got, f"{what}(params)['{name}']")
    axes = None if spec is None else normalize(spec, shape, name, f"{what}(params)['{name}']",
                                               batch)
    if cache is not None:
        cache[key] = axes
    return axes


def check_names(value: Any, names: Sequence[str], what: str = "weight_dimension_numbers"
                ) -> None:
    """A dict naming a parameter there is not is refused (a typo would leave one out)."""
    if isinstance(value, Mapping):
        extra = sorted(set(value) - set(names))
        if extra:
            raise KeyError(f"{what} names {extra}, not parameters here")


def matrix_shape(shape: Sequence[int], axes: Axes) -> tuple[int, int, int]:
    """``(B, fan_in, fan_out)`` of a tensor of ``shape`` under ``axes``."""
    def size(ax: tuple[int, ...]) -> int:
        return math.prod(shape[a] for a in ax)
    return size(axes.batch), size(axes.reduction), size(axes.output)


def to_matrices(xp: Any, x: Any, axes: Axes) -> Any:
    """``x`` transposed to (batch…, reduction…, output…) and reshaped to
    ``(B, fan_in, fan_out)``."""
    order = axes.batch + axes.reduction + axes.output
    t = x.permute(*order) if xp.name == "torch" else x.transpose(order)
    return t.reshape(matrix_shape(tuple(x.shape), axes))


def from_matrices(xp: Any, m: Any, axes: Axes, shape: Sequence[int]) -> Any:
    """:func:`to_matrices` undone: ``m`` (B, fan_in, fan_out) back to ``shape``."""
    order = axes.batch + axes.reduction + axes.output
    t = m.reshape(tuple(shape[a] for a in order))
    back = tuple(int(i) for i in np.argsort(order))
    return t.permute(*back) if xp.name == "torch" else t.transpose(back)
