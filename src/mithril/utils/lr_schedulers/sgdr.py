"""optax's ``sgdr_schedule`` (cosine cycles, each with its own peak): :func:`sgdr_schedule`."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from ..optimizers.checks import describe
from . import start as start_mod
from .base import SupportsLearningRate, _check_int, _check_real
from .join import JoinSchedules
from .per_group import _apply, _group_lanes, _snapshot
from .wsd import WSD

__all__ = ["sgdr_schedule"]

_REQUIRED = ("init_value", "peak_value", "warmup_steps", "decay_steps")
_DEFAULTS = {"end_value": 0.0, "exponent": 1.0}


def sgdr_schedule(optimizer: SupportsLearningRate, cosine_kwargs: Iterable[Any],
                  per_group: bool = False, *, last_step: int | None = None,
                  last_epoch: int | None = None) -> JoinSchedules:
    """SGD with warm restarts as ``optax.sgdr_schedule(cosine_kwargs)``: one cycle per dict,
    each optax's ``warmup_cosine_decay_schedule(**kwargs)`` with its own values.

    Cycle ``i`` (``I = init_value``, ``P = peak_value``, ``W = warmup_steps``, ``D =
    decay_steps``, ``E = end_value``, default 0, ``p = exponent``, default 1) starts at
    ``B_i = D_0 + ... + D_{i-1}`` and, at ``s = t - B_i``, has the rate

    .. math::
        \\eta = \\begin{cases}
            I + (P - I)\\, s / W & s < W \\\\
            E + (P - E) \\bigl(\\tfrac{1}{2}(1 + \\cos(\\pi \\tfrac{s - W}{D - W}))\\bigr)^p
                & W \\le s < D
        \\end{cases}

    (optax's ``P·((1 − α)·c^p + α)`` with ``α = E / P``); after the last cycle the rate
    stays at its ``E``. Step ``t`` is optax's ``count``: optax evaluates the schedule at the
    count before incrementing it (0 for the first update), and this scheduler, stepped after
    each update, gives update ``t`` the rate of step ``t``.

    It is ``JoinSchedules(optimizer, [WSD(optimizer, W, 0, D - W, I, E, "cosine", p,
    base_lr=P) for each cycle], [B_1, ..., B_{k-1}])`` (returned as such, so its
    ``state_dict`` is a ``JoinSchedules``'; rebuild with the same dicts to load it). The
    optimizer's own learning rate is not used: every cycle has its peak.

    **Per parameter group** (a mithril optimizer with ``param_groups``), as the other
    schedulers act per group (:class:`~.base.LRScheduler`): one *lane* for the optimizer's
    own parameters (those in no group), then one per ``param_groups[i]``, each driving its
    own rate (not following the optimizer's in proportion), stepped together and set all or
    nothing; :meth:`~.base.LRScheduler.get_last_lrs` gives every lane's rate and the state
    dict holds the groups' lanes under ``"groups"``. As optax's
    ``multi_transform({label: sgd(sgdr_schedule(kwargs_of_label))}, labels)``:

    * ``per_group=True``: every lane runs these cycles (the values are absolute rates, so
      each group gets the same ones);
    * a cycle value given as a list, one per lane (as torch takes ``OneCycleLR``'s
      ``max_lr``): ``dict(peak_value=[0.1, 0.01], ...)`` peaks at 0.1 for the optimizer's
      own parameters and at 0.01 for ``param_groups[0]``;
    * ``cosine_kwargs`` a list of cycle lists, one per lane: each lane its own schedule
      (its own number of cycles and boundaries).

    Where optax turns a setting into an odd schedule, this raises a :class:`ValueError` naming
    ``cosine_kwargs[i]['key']``: ``decay_steps <= warmup_steps`` (optax raises too), a
    negative value, ``peak_value == 0`` with ``end_value != 0`` (optax's ``α`` is then 0:
    the cycle stays at 0), an unknown or missing key, a per-lane list of the wrong length.
    Everything is checked before the optimizer is touched.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate`` (per group: a
            mithril optimizer, or a handle on one of its own hyperparameters).
        cosine_kwargs: at least one mapping with ``init_value``, ``peak_value``,
            ``warmup_steps``, ``decay_steps`` and optionally ``end_value``, ``exponent``
            (per group: values as lists, one per lane, or one such list of mappings per
            lane).
        per_group: act on every parameter group (see above).
        last_step: build it at this step (torch's ``last_epoch=k`` is ``last_step=k+1``), as
            every scheduler (:mod:`.start`).
    """
    given = {k: v for k, v in (("last_step", last_step), ("last_epoch", last_epoch))
             if v is not None}
    n = start_mod.start_step(JoinSchedules, given, None)
    if not n:
        return _sgdr(optimizer, cosine_kwargs, per_group)
    restore = _snapshot(optimizer)
    sched = _sgdr(optimizer, cosine_kwargs, per_group)
    try:
        start_mod.go_to(sched, n)
    except Exception:
        restore()
        raise
    return sched


def _sgdr(optimizer: SupportsLearningRate, cosine_kwargs: Iterable[Any],
          per_group: bool) -> JoinSchedules:
    """:func:`sgdr_schedule` built at step 0."""
    if not isinstance(per_group, bool):
        raise TypeError(f"per_group must be a bool, got {describe(per_group)}")
    spec = _as_list(cosine_kwargs)
    nested = bool(spec) and all(_is_list(c) for c in spec)
    listed = not nested and any(_is_list(v) for c in spec if isinstance(c, Mapping)
                                for v in c.values())
    if not (per_group or nested or listed):
        cycles = [_check_cycle(f"cosine_kwargs[{i}]", kw) for i, kw in enumerate(spec)]
        if not cycles:
            raise ValueError("cosine_kwargs must hold at least one cycle")
        old = optimizer.get_learning_rate()
        try:
            return _join(optimizer, cycles)
        except Exception:
            optimizer.set_learning_rate(old)  # (a refused rate: put the first one back)
            raise
    lanes = _group_lanes("sgdr_schedule", optimizer)
    per_lane = _lane_cycles(spec, nested, len(lanes))  # (all checked before anything is set)
    restore = _snapshot(optimizer)
    try:
        # the groups' lanes first, the optimizer's own last, then every lane's rate once more
        # in order (the optimizer's rate moves the groups' in proportion): as per_group.py
        siblings = [_join(lane, cycles) for lane, cycles in zip(lanes[1:], per_lane[1:])]
        main = _join(lanes[0], per_lane[0])
        main._siblings = siblings
        _apply(main._current_targets())
    except Exception:
        restore()
        raise
    return main


def _join(optimizer: SupportsLearningRate, cycles: list[dict[str, Any]]) -> JoinSchedules:
    """The checked ``cycles`` as one ``JoinSchedules`` of ``WSD`` on ``optimizer``."""
    schedules = [WSD(optimizer, c["warmup_steps"], 0, c["decay_steps"] - c["warmup_steps"],
                     c["init_value"], c["end_value"], "cosine", c["exponent"],
                     base_lr=c["peak_value"]) for c in cycles]
    boundaries, step = [], 0
    for c in cycles[:-1]:
        step += c["decay_steps"]
        boundaries.append(step)
    return JoinSchedules(optimizer, schedules, boundaries)


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _lane_cycles(spec: list[Any], nested: bool, n: int) -> list[list[dict[str, Any]]]:
    """Each lane's checked cycles: ``spec`` one cycle list per lane (``nested``), or cycles
    whose list values hold one value per lane."""
    lanes_hint = (f"one per parameter group, {n} here: the optimizer's own parameters (in no "
                  f"group) first, then param_groups[0..{n - 2}]")
    if nested:
        if len(spec) != n:
            raise ValueError(f"cosine_kwargs has {len(spec)} cycle lists; per group it needs "
                             f"{lanes_hint}")
        out = []
        for j, cycles in enumerate(spec):
            if not cycles:
                raise ValueError(f"cosine_kwargs[{j}] must hold at least one cycle")
            out.append([_check_cycle(f"cosine_kwargs[{j}][{i}]", kw)
                        for i, kw in enumerate(cycles)])
        return out
    if not spec:
        raise ValueError("cosine_kwargs must hold at least one cycle")
    for i, kw in enumerate(spec):
        if not isinstance(kw, Mapping):
            _check_cycle(f"cosine_kwargs[{i}]", kw)  # (raises, naming it)
        for key, v in kw.items():
            if _is_list(v) and len(v) != n:
                raise ValueError(f"cosine_kwargs[{i}][{key!r}] has {len(v)} values; it needs "
                                 f"{lanes_hint}")
    return [[_check_cycle(f"cosine_kwargs[{i}]" + (f" (lane {j})" if n > 1 else ""),
                          {k: v[j] if _is_list(v) else v for k, v in kw.items()})
             for i, kw in enumerate(spec)] for j in range(n)]


def _as_list(cosine_kwargs: Any) -> list[Any]:
    if isinstance(cosine_kwargs, (str, bytes, Mapping)) or not isinstance(cosine_kwargs,
                                                                        Iterable):
        raise ValueError(f"cosine_kwargs must be a list of dicts (one per cycle), got "
                         f"{describe(cosine_kwargs)}")
    return list(cosine_kwargs)


def _check_cycle(where: str, kwargs: Any) -> dict[str, Any]:
    """A cycle's values (``where``: how to name it), checked, under optax's keys (defaults
    filled in)."""
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{where} must be a dict of optax's warmup_cosine_decay_schedule "
                         f"arguments, got {describe(kwargs)}")
    unknown = sorted(map(str, set(kwargs) - {*_REQUIRED, *_DEFAULTS}))
    missing = [k for k in _REQUIRED if k not in kwargs]
    if unknown or missing:
        raise ValueError(f"{where}: " + "; ".join(
            ([f"unknown key(s) {unknown}"] if unknown else [])
            + ([f"missing key(s) {missing}"] if missing else []))
            + f" (keys: {[*_REQUIRED, *_DEFAULTS]})")
    c = {**_DEFAULTS, **kwargs}
    out: dict[str, Any] = {}
    for key in ("init_value", "peak_value", "end_value", "exponent"):
        out[key] = _check_real(f"{where}[{key!r}]", _number(c[key]), ge=0.0)
    out["warmup_steps"] = _check_int(f"{where}['warmup_steps']", c["warmup_steps"], minimum=0)
    out["decay_steps"] = _check_int(f"{where}['decay_steps']", c["decay_steps"],
                                    minimum=out["warmup_steps"] + 1)
    if out["peak_value"] == 0 and out["end_value"] != 0:
        raise ValueError(f"{where}['end_value'] is {out['end_value']} with peak_value 0: optax "
                         f"then keeps the cycle at 0 after its warm-up (end_value / peak_value "
                         f"is taken as 0); give end_value 0")
    return out


def _number(value: Any) -> Any:
    """A 0-d array's number (optax's values may be JAX or NumPy scalars)."""
    if not isinstance(value, numbers.Real) and getattr(value, "shape", None) == ():
        return value.item()
    return value
