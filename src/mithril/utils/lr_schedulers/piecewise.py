"""Piecewise schedules of optax and Keras: :class:`PiecewiseConstant`,
:class:`PiecewiseInterpolate`."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ..optimizers.checks import describe
from .base import (
    LRScheduler,
    SupportsLearningRate,
    _check_choice,
    _check_int,
    _check_real,
    _entries,
)

__all__ = ["PiecewiseConstant", "PiecewiseInterpolate"]


def _split_mapping(name: str, mapping: Any) -> tuple[list[int], list[float]]:
    """``(boundaries, scales)`` of optax's ``boundaries_and_scales``, sorted by boundary."""
    if mapping is None:
        return [], []
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{name} must be a mapping {{step: scale}}, got {describe(mapping)}")
    pairs = []
    for key, scale in mapping.items():
        b = _check_int(f"{name} key {describe(key)}", key, minimum=0)
        s = _check_real(f"{name}[{b}]", scale, ge=0.0)
        pairs.append((b, s))
    pairs.sort()
    return [b for b, _ in pairs], [s for _, s in pairs]


def _check_boundaries(name: str, boundaries: Any) -> list[int]:
    # (a NumPy array as Keras takes it: np.array([3, 7]) was refused as no sequence)
    out = [_check_int(f"{name}[{i}]", b, minimum=0)
           for i, b in enumerate(_entries(name, boundaries, "integers"))]
    for prev, cur in zip(out, out[1:], strict=False):
        if cur <= prev:
            raise ValueError(f"{name} must be strictly increasing, got {out}")
    return out


def _check_reals(name: str, values: Any, length: int) -> list[float]:
    values = _entries(name, values, "numbers")
    if len(values) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(values)}")
    return [_check_real(f"{name}[{i}]", v, ge=0.0) for i, v in enumerate(values)]


class PiecewiseConstant(LRScheduler):
    """A piecewise-constant learning rate, in either of two spellings.

    * optax's ``piecewise_constant_schedule(init_value=base, boundaries_and_scales)``: from step
      ``b`` on (``t >= b``), the rate is multiplied by ``boundaries_and_scales[b]``:

      .. math:: \\eta_t = \\eta_{base} \\prod_{b \\le t} s_b

    * Keras's ``PiecewiseConstantDecay(boundaries, values)`` (keyword arguments): explicit
      rates, ``values[0]`` while ``t <= boundaries[0]``, ``values[i]`` while ``boundaries[i-1] <
      t <= boundaries[i]``, ``values[-1]`` after the last boundary. Mind the off-by-one
      between the two libraries: optax switches *at* a boundary, Keras one step *after* it.
      These rates are explicit, so parents do not re-base them.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        boundaries_and_scales: ``{step: scale}``, steps integers ``>= 0``, scales ``>= 0``
            (``None`` or empty: constant ``base_lr``).
        boundaries: Keras form: strictly increasing integers ``>= 0``.
        values: Keras form: ``len(boundaries) + 1`` learning rates ``>= 0``.
    """

    _HPARAMS = ("boundaries", "scales", "values")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        boundaries_and_scales: Mapping[int, float] | None = None,
        *,
        boundaries: Sequence[int] | None = None,
        values: Sequence[float] | None = None,
    ) -> None:
        if values is not None and "_base_given" in self.__dict__:  # (it would change nothing)
            raise TypeError("PiecewiseConstant: base_lr= has no effect with values (the Keras "
                            "form's rates are explicit); scale the optax form instead")
        super().__init__(optimizer)
        if values is None and boundaries is None:
            bounds, scales = _split_mapping("boundaries_and_scales", boundaries_and_scales)
            self._configure(boundaries=bounds, scales=scales, values=None)
        elif boundaries_and_scales is not None:
            raise ValueError("give either boundaries_and_scales (optax) or boundaries and "
                             "values (Keras), not both")
        elif values is None or boundaries is None:
            raise ValueError("the Keras form needs both boundaries and values")
        else:
            self._configure(boundaries=boundaries, scales=None, values=values)
        self._restart()

    def _configure(
        self, *, boundaries: Sequence[int], scales: Sequence[float] | None,
        values: Sequence[float] | None,
    ) -> None:
        bounds = _check_boundaries("boundaries", boundaries)
        if (scales is None) == (values is None):
            raise ValueError("exactly one of scales (optax form) and values (Keras form) must "
                             "be given")
        if scales is not None:
            sc: list[float] | None = _check_reals("scales", scales, len(bounds))
            vals = None
        else:
            sc, vals = None, _check_reals("values", values, len(bounds) + 1)
        self.boundaries, self.scales, self.values = bounds, sc, vals

    def _lr_at(self, t: int) -> float:
        if self.values is not None:  # Keras: values[number of boundaries b with t > b]
            return self.values[bisect_left(self.boundaries, t)]
        lr = self.base_lr
        assert self.scales is not None
        for b, s in zip(self.boundaries, self.scales, strict=True):
            if t >= b:
                lr = lr * s  # optax's order: scale * v
        return lr


class PiecewiseInterpolate(LRScheduler):
    """optax's ``piecewise_interpolate_schedule(interpolate_type, init_value=base,
    boundaries_and_scales)``.

    With the sorted boundaries ``0 = b_0, b_1, ..., b_k`` and the values ``v_0 = base``,
    ``v_i = v_{i-1} * s_i``, the rate moves from ``v_i`` at ``t = b_i`` to ``v_{i+1}`` at
    ``t = b_{i+1}``, linearly (``'linear'``: ``(v_{i+1} - v_i) p + v_i``) or along a half
    cosine (``'cosine'``: ``v_{i+1} + (v_i - v_{i+1}) (cos(pi p) + 1) / 2``), with
    ``p = (t - b_i) / (b_{i+1} - b_i)``; it is ``v_k`` from ``b_k`` on.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        interpolate_type: ``'linear'`` or ``'cosine'``.
        boundaries_and_scales: ``{step: scale}``, steps integers ``>= 0``, scales ``>= 0``
            (``None`` or empty: constant ``base_lr``).
    """

    _HPARAMS = ("interpolate_type", "boundaries", "scales")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        interpolate_type: Literal["linear", "cosine"],
        boundaries_and_scales: Mapping[int, float] | None = None,
    ) -> None:
        super().__init__(optimizer)
        bounds, scales = _split_mapping("boundaries_and_scales", boundaries_and_scales)
        self._configure(interpolate_type=interpolate_type, boundaries=bounds, scales=scales)
        self._restart()

    def _configure(
        self, *, interpolate_type: str, boundaries: Sequence[int], scales: Sequence[float]
    ) -> None:
        kind = _check_choice("interpolate_type", interpolate_type, ("linear", "cosine"))
        bounds = _check_boundaries("boundaries", boundaries)
        sc = _check_reals("scales", scales, len(bounds))
        self.interpolate_type, self.boundaries, self.scales = kind, bounds, sc

    def _lr_at(self, t: int) -> float:
        bounds = [0, *self.boundaries]
        values = [self.base_lr]
        for s in self.scales:
            values.append(values[-1] * s)
        if t >= bounds[-1]:
            return values[-1]
        i = bisect_right(bounds, t) - 1
        start, end = values[i], values[i + 1]
        pct = (t - bounds[i]) / max(bounds[i + 1] - bounds[i], 1)
        if self.interpolate_type == "linear":
            return (end - start) * pct + start
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
