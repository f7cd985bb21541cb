"""Setting a scheduler's attribute after construction (``sched.gamma = 0.5``).

A hyperparameter (a name of the class's ``_HPARAMS``, the momentum bounds of a cycling
scheduler) is checked as the constructor checks it and set on every lane of a scheduler
acting per parameter group, all or nothing: a refused value changes nothing, and a scheduler
never steps with a value its ``state_dict`` could not be loaded back with. A list sets one
value per lane for the arguments the constructor takes per group (``OneCycleLR``'s
``max_lr``). The schedule stays a closed form of the step: from the next :meth:`step` on,
the rate is the formula's with the new value (torch's chainable schedulers instead apply
it to the decays still to come).

A new attribute that looks meant for one the scheduler has - torch's ``base_lrs``, a
misspelling - is refused, naming it: it would change no step. So is replacing what the
scheduler was built on (:data:`FIXED`). The step counter ``last_step`` (torch's
``last_epoch``) is read-only: only :meth:`step` and ``load_state_dict`` move it, with the
rate. Any other new name (a user's own tag) is set as usual.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from typing import Any

from ..optimizers.checks import describe

#: torch's names of what ours call otherwise
OTHER_NAMES = {"last_epoch": "last_step", "base_lrs": "base_lr", "max_lrs": "max_lr",
               "get_lr": "get_last_lr() or get_lr_at(t)"}

#: set once, at construction: what the scheduler drives (its lanes, its children's targets
#: and its momentum handle were built for it) and the children it steps
FIXED = ("optimizer", "cycle_momentum", "schedulers", "after_scheduler")


def lanes_of(sched: Any) -> list[Any]:
    """``sched`` and the schedulers stepping the other parameter groups with it: its own
    group lanes, or, for the child of a composite acting per group, the children of the
    composite's other lanes."""
    d = sched.__dict__
    return [sched, *(d.get("_siblings") or d.get("_lane_mates", ()))]


#: the functions a scheduler calls (``LambdaLR``'s ``lr_lambda``, ``CyclicLR``'s
#: ``scale_fn``): set as the hyperparameters are, on every lane, though no state dict holds them
FUNCTIONS = ("lr_lambda", "scale_fn")


def settable(sched: Any) -> tuple[str, ...]:
    """The attributes set through :func:`set_hyperparameter`."""
    extra = ("base_momentum", "max_momentum") if hasattr(sched, "_set_momentum_bounds") else ()
    own = ("base_lr",) if "base_lr" in sched._GROUP_ARGS else ()  # (CyclicLR's lower bound)
    return (*sched._HPARAMS, *extra, *own, *(n for n in FUNCTIONS if n in sched.__dict__))


def meant(sched: Any, name: str) -> str:
    """What a new attribute ``name`` looks meant for; "" for a name of the user's own."""
    known = sorted({*settable(sched), "base_lr", "last_step"})
    other = OTHER_NAMES.get(name)
    return other or " or ".join(difflib.get_close_matches(name, known, 2, cutoff=0.8))


def refuse_step(sched: Any, name: str, value: Any) -> None:
    """Refuse setting the step counter ``last_step`` (or torch's ``last_epoch``): it would
    move no rate (torch's own moves the counter only, its next rate chained from the current)."""
    owner = type(sched).__name__
    raise AttributeError(
        f"{owner}.last_step (torch's last_epoch) is read-only, {name} = {describe(value)} "
        f"refused: step() advances it with the rate, get_last_lr() and any child scheduler; "
        f"to go on from a saved run, build the {owner} with the same arguments and "
        f"load_state_dict(saved_state) (without one: build it with last_step=n)")


def set_attribute(sched: Any, name: str, value: Any) -> None:
    """``setattr(sched, name, value)`` as this module's docstring says."""
    owner = type(sched).__name__
    if name in FIXED and name in sched.__dict__:
        raise AttributeError(f"{owner}.{name} is fixed at construction: build a new {owner} "
                             f"(with {name}={value!r}) to change it")
    if name == "last_epoch":
        refuse_step(sched, name, value)
    if name in settable(sched):
        set_hyperparameter(sched, name, value)
        return
    if name == "base_lr":  # (each lane's own: its group's starting value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                math.isfinite(value) and value >= 0):
            raise ValueError(f"{owner}.base_lr must be a finite real number >= 0, got "
                             f"{describe(value)}")
        value = float(value)
    elif name not in sched.__dict__ and not hasattr(type(sched), name) and (
            m := meant(sched, name)):
        raise AttributeError(f"{owner} has no attribute {name!r}: setting it would change "
                             f"no step (did you mean {m}?)")
    object.__setattr__(sched, name, value)


def set_hyperparameter(sched: Any, name: str, value: Any) -> None:
    """Check ``value`` and set ``name`` on every lane of ``sched``, all or nothing."""
    lanes = lanes_of(sched)
    values = [value] * len(lanes)
    if (len(lanes) > 1 and name in sched._GROUP_ARGS and isinstance(value, Sequence)
            and not isinstance(value, (str, bytes))):
        if len(value) != len(lanes):
            raise ValueError(f"{type(sched).__name__}.{name}: {len(value)} values given; it "
                             f"takes one, or one per parameter group ({len(lanes)} here: the "
                             f"optimizer's own parameters first)")
        values = list(value)
    backups = [(lane.state_dict(), {n: lane.__dict__[n] for n in FUNCTIONS if n in lane.__dict__})
               for lane in lanes]
    try:
        for lane, v in zip(lanes, values, strict=True):
            lane.__dict__["_inside"] = True  # (its own checks set the attributes)
            try:
                lane._set_hyperparameter(name, v)
            finally:
                del lane.__dict__["_inside"]
    except Exception:
        for lane, (b, functions) in zip(lanes, backups, strict=True):
            lane.__dict__.update(functions)  # (first: CyclicLR's state names its scale_fn)
            if "_memo" in lane.__dict__:  # (MultiplicativeLR's products of the other one)
                lane.__dict__["_memo"] = None
            lane._load(b)
        raise
