"""The hyperparameters an :func:`~mithril.interop.optax_transformation` made with
``traced_hyperparams=`` reads at every update instead of baking them in: their names, the
check of them, their values on the host, and each row of scalars' share of them.

A name is an optimizer-wide hyperparameter (``"beta1"``, ``"weight_decay"``, ``"clip_norm"``)
or one of a parameter group, ``"param_groups[1].beta1"`` (``"param_groups[1].lr_scale"``: the
group's learning rate as its ratio to the optimizer's, as the optimizer keeps it), or one
of an optimizer it holds under that one's prefix (:meth:`hyper_children`: a Muon's
fallback's ``"fallback.beta1"``, ``"fallback.param_groups[0].beta1"``). Only
float hyperparameters are traced: an integer (``ns_steps``, ``swa_start``), a flag or a
string changes the program itself.

Each is passed to ``update(..., hyper=...)`` as a pair of numbers ``(hi, lo)`` of the
scalars' dtype whose sum is its float64 value (:func:`pair`): in float32, ``β₂ = 0.999``
alone is 0.99900001, and ``1 − β₂`` from it is 1.3e-5 off in relative terms, a difference
the optimizer's bias corrections would carry into every step (see
:class:`~mithril.interop.optax_scalars._Hyper`)."""

from __future__ import annotations

import functools
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

_GROUP = re.compile(r"param_groups\[(\d+)\]\.(\w+)$")
#: what cannot be traced: the learning rate (the state's own), what holds a step's shape,
#: the per-tensor clipping's bounds (read where each tensor's factors are made) and the
#: global clip's floor (a convention, torch's or optax's, not a value to schedule)
_NOT_TRACED = frozenset({"learning_rate", "nonfinite", "param_groups", "weight_decay_mask",
                         "exclude_weight_decay", "strict", "adaptive_clip", "adaptive_clip_eps",
                         "clip_tensor_norm", "clip_block_rms", "max_consecutive_skips",
                         "clip_eps", "centralize", "normalize_grad", "normalize_eps"})


def parse(key: str) -> tuple[int | None, str]:
    """``(group index or None, attribute name)`` of a traced hyperparameter's name."""
    m = _GROUP.match(key)
    return (int(m.group(1)), m.group(2)) if m else (None, key)


def is_float(value: Any) -> bool:
    """Whether ``value`` is a float hyperparameter (what a constructor stores a continuous
    one as; integers, flags and None shape the program)."""
    return isinstance(value, (float, np.floating))


def child(opt: Any, key: str) -> tuple[Any, str] | None:
    """``(held optimizer, its name)`` where ``key`` names a hyperparameter of an optimizer
    ``opt`` holds (``"fallback.beta1"``: a Muon's fallback's ``beta1``); else None."""
    for prefix, held in opt.hyper_children().items():
        if key.startswith(prefix):
            return held, key[len(prefix):]
    return None


def value(opt: Any, key: str) -> float:
    """The value of ``key`` (see the module docs) on ``opt``."""
    if (c := child(opt, key)) is not None:
        return value(*c)
    g, name = parse(key)
    if name == "lr_scale":
        return opt._group(g).get(name, 1.0)
    return opt._hyperparameter_value(name, g)


def check(opt: Any, names: Sequence[str]) -> tuple[str, ...]:
    """``names`` (sorted, each once), each checked: a float hyperparameter of ``opt`` or of
    one of its groups that may be traced. ``KeyError`` / ``TypeError`` / ``ValueError``
    naming it otherwise."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"traced_hyperparams must be a sequence of names, got {names!r}")
    where = type(opt).__name__
    for key in names:
        if not isinstance(key, str):
            raise TypeError(f"traced_hyperparams: {key!r} is not a hyperparameter name")
        if (c := child(opt, key)) is not None:
            try:
                check(*c[:1], [c[1]])
            except (KeyError, TypeError, ValueError) as e:
                msg = str(e.args[0] if e.args else e).removeprefix("traced_hyperparams: ")
                raise type(e)(f"traced_hyperparams: {where}'s {key!r}: {msg}") from None
            continue
        g, name = parse(key)
        if name in _NOT_TRACED:
            raise ValueError(f"traced_hyperparams: {where}'s {key!r} cannot be traced (the "
                             f"learning rate is the state's own; the others shape the step)")
        if g is not None and name == "lr_scale":
            opt._group(g)  # (KeyError naming the group)
        else:
            opt._drivable(name, g)
        allowed = _tensorwise_traceable(opt)
        if allowed is not None and (g is not None or name not in allowed):
            raise TypeError(f"traced_hyperparams: {where}'s per-tensor update bakes {key!r} "
                            f"in; it takes {sorted(allowed)} traced (optimizer-wide), the "
                            f"others need the transformation built again")
        v = value(opt, key)
        if not is_float(v):
            raise TypeError(f"traced_hyperparams: {where}'s {key}={v!r} is not a float "
                            f"hyperparameter (an integer, flag or None shapes the program)")
        if name != "lr_scale" and _picks_rule(opt, g, name, float(v)):
            raise ValueError(f"traced_hyperparams: {where}'s {key}={v!r} picks its update "
                             f"rule or slots (a value next to it picks others), which the "
                             f"program bakes in: it cannot be traced at this value")
    return tuple(sorted(set(names)))


def _tensorwise_traceable(opt: Any) -> frozenset[str] | None:
    """What a tensorwise optimizer (Muon, Adafactor) may have traced: its
    ``traced_in_update``, the clipping's bounds and a decoupled weight decay (applied
    outside its ``tensor_update``); None for any other optimizer."""
    from ..utils.optimizers.tensorwise import TensorwiseOptimizer

    if not isinstance(opt, TensorwiseOptimizer):
        return None
    extra = {"clip_norm", "clip_value"}
    if opt.hyper_children():  # (a Muon's fallback: its rows' learning rate factor)
        extra.add("fallback_lr_ratio")
    if not opt.weight_decay_in_math:
        extra.add("weight_decay")
    return frozenset(opt.traced_in_update) | extra


def _picks_rule(opt: Any, group: int | None, name: str, v: float) -> bool:
    """Whether a value next to ``v`` gives ``opt`` (its group ``group``'s rows) other slots
    or another elementwise function: ``v`` is then a special point (Ftrl's
    ``learning_rate_power = -0.5`` picks a square root, SGD's ``momentum = 0`` no slot),
    which a traced value could not leave without the program going wrong silently."""
    from ..utils.optimizers.groups import views

    row = {} if group is None else {k: x for k, x in opt._group(group).items()
                                    if k != "params"}
    near = v + 2.0 ** -20 * max(abs(v), 1.0)
    here, there = views(opt, [row, {**row, name: near}])
    return here.rule() != there.rule()


def traceable(opt: Any, key: str) -> bool:
    """Whether :func:`check` takes ``key`` for ``opt`` now."""
    try:
        check(opt, [key])
    except (KeyError, TypeError, ValueError):
        return False
    return True


def floats(opt: Any) -> tuple[str, ...]:
    """The names (sorted) of every hyperparameter of ``opt`` and of its groups that
    :func:`check` takes now and whose value is not 0: what a step whose hyperparameters
    have begun to change traces all at once (``make_train_step``'s JAX program), so that a
    schedule starting on another one later compiles nothing more. A group's are all it may
    override, not only those it does (its value is then the optimizer's): a schedule
    that begins on a group's own value later compiles nothing either. A 0 is left out: it
    often switches a term off (``weight_decay``, ``momentum``), and a traced 0 would keep
    the term (``0 · inf`` is NaN); such a one is traced at its own first change."""
    wide = {k for h in opt.hyper_holders() for k in h.hyperparameters()}
    names = set(wide)
    for g, group in enumerate(opt.param_groups):
        names.update(f"param_groups[{g}].{k}" for k in ("lr_scale", *group, *wide)
                     if k not in ("params", "learning_rate"))
    names.update(p + k for p, held in opt.hyper_children().items() for k in floats(held))
    return tuple(sorted(k for k in names if traceable(opt, k) and value(opt, k) != 0))


def row_attrs(owners: Sequence[tuple[int | None, bool]], overrides: Sequence[set[str]],
              driven: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each row's attributes from ``driven`` (name -> value): an optimizer-wide one on every
    row whose group does not override it, a group's on that group's rows (the rows it
    excludes from weight decay keep their 0). ``owners``: each row's (group, decays)."""
    out = []
    for (gi, decays), over in zip(owners, overrides):
        a: dict[str, Any] = {}
        for key, v in driven.items():
            g, name = parse(key)
            if g is None and name not in over:
                a.setdefault(name, v)
            elif g is not None and g == gi and (decays or name != "weight_decay"):
                a[name] = v  # (the group's own value wins over the optimizer's)
        out.append(a)
    return out


def pair(x: float, dtype: Any) -> np.ndarray:
    """``[hi, lo]`` of ``dtype`` with ``hi + lo`` = ``x`` to float64 precision."""
    dt = np.dtype(dtype)
    hi = np.asarray(x, np.float64).astype(dt)
    return np.array([hi, np.float64(x) - np.float64(hi)], dtype=np.float64).astype(dt)


def check_schedules(opt: Any, schedules: Any, traced: tuple[str, ...]) -> dict[str, Callable]:
    """``schedules`` of ``optax_transformation`` (hyperparameter name -> optax schedule)
    checked: each name one that ``traced_hyperparams`` would take (:func:`check`) and not
    also in ``traced``, each value a callable; ``TypeError`` / ``KeyError`` / ``ValueError``
    naming the name otherwise."""
    if schedules is None:
        return {}
    if not isinstance(schedules, Mapping):
        raise TypeError(f"schedules must be a dict of hyperparameter name -> optax schedule "
                        f"(a function of the 0-based step count), got "
                        f"{type(schedules).__name__}")
    where = type(opt).__name__
    for key, fn in schedules.items():
        if key in ("learning_rate", "lr"):
            raise ValueError(f"schedules: {where}'s learning rate takes its schedule as "
                             f"learning_rate=, not in schedules")
        if not callable(fn):
            raise TypeError(f"schedules[{key!r}] must be an optax schedule (a function of the "
                            f"0-based step count), got {type(fn).__name__}; a constant is the "
                            f"optimizer's own value")
        if key in traced:
            raise ValueError(f"schedules: {where}'s {key!r} is in traced_hyperparams too: its "
                             f"value comes from one of them, not both")
        try:
            check(opt, [key])
        except (KeyError, TypeError, ValueError) as e:
            msg = str(e.args[0] if e.args else e).replace("traced_hyperparams", "schedules", 1)
            raise type(e)(msg) from None
    return dict(schedules)


def scheduled(schedules: Mapping[str, Callable] | None, count: Any,
              held: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Each scheduled hyperparameter's value at the 0-based step ``count`` (as optax calls
    its ``ScalarOrSchedule`` hyperparameters: ademamix's ``alpha(count)``); one given as a
    Python number is read from ``held`` (the state's ``hyperparams``) where it is there, as
    ``optax.inject_hyperparams`` keeps its numeric ones: a value written there between steps
    is the one used (and kept)."""
    import jax.numpy as jnp

    return {k: jnp.asarray(held[k] if _is_held(fn) and held is not None and k in held
                           else fn(count)) for k, fn in (schedules or {}).items()}


def not_kept(schedules: Mapping[str, Callable] | None, kept: Any = ()) -> frozenset[str]:
    """The hyperparameters given as a fixed array (what ``optax.inject_hyperparams`` passes
    its factory), not kept in ``state.hyperparams`` (as a fixed learning rate: the injecting
    state holds it, and ``optax.tree_utils.tree_get`` finds one); ``kept``: those the
    optimizer's state needs anyway."""
    return frozenset(k for k, fn in (schedules or {}).items()
                     if isinstance(fn, functools.partial) and fn.func is _constant
                     and not _is_held(fn) and k not in kept)


def _is_held(fn: Callable) -> bool:
    return isinstance(fn, functools.partial) and fn.func is _constant and \
        isinstance(fn.args[0], numbers.Real)


def as_schedules(opt: Any, schedules: Mapping[str, Callable] | None,
                 values: dict[str, Any]) -> Mapping[str, Callable] | None:
    """``schedules`` with ``values`` (:func:`optax_transformation`'s ``**hyperparameters``)
    added, a number as a constant schedule; ``TypeError`` / ``ValueError`` naming the
    keyword for one that is neither, or also in ``schedules``."""
    held = values.get("hyperparameters")
    if isinstance(held, dict) and not held:  # (inject_hyperparams passes **kw on so)
        values = {k: v for k, v in values.items() if k != "hyperparameters"}
    if not values:
        return schedules
    if isinstance(values.get("hyperparameters"), dict):
        given = ", ".join(values["hyperparameters"])
        raise TypeError(f"optax.inject_hyperparams(optax_transformation)(opt, {given}=...): "
                        f"inject_hyperparams sees only named arguments, not **hyperparameters; name them in a factory: inject_hyperparams("
                        f"lambda learning_rate, beta1: optax_transformation(opt, learning_rate="
                        f"learning_rate, beta1=beta1))(learning_rate=..., beta1=...)")
    out = dict(schedules or {})
    for k, v in values.items():
        where = f"optax_transformation({type(opt).__name__}, {k}=...)"
        if k in out:
            raise ValueError(f"{where}: {k!r} is in schedules too: give it once")
        if not callable(v):
            if isinstance(v, (bool, str)) or not (isinstance(v, numbers.Real) or
                                                 getattr(v, "shape", None) == ()):
                raise TypeError(f"{where}: unexpected keyword argument or value: a "
                                f"hyperparameter's value must be a number, a 0-d array or a "
                                f"schedule, got {type(v).__name__}")
            v = functools.partial(_constant, v)
        out[k] = v
    return out


def _constant(value: Any, count: Any) -> Any:
    return value
