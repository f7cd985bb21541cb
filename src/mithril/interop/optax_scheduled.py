"""The warning :func:`~.optax_transform.optax_transformation` gives when a Mithril scheduler
(:mod:`mithril.utils.lr_schedulers`) drives the optimizer it copied.

The transformation copies the optimizer's hyperparameters when it is made (the learning rate
then lives in ``state.hyperparams``): a scheduler stepping the optimizer afterwards changes
nothing in it. So that this is not silent, a scheduler whose target is the optimizer (its
learning rate, a handle ``opt.hyperparameter(name, group)``, a per-group lane, a composite's
child; a Lookahead's inner optimizer, a Muon's fallback) gives one ``UserWarning`` per
transformation, saying what to use instead. It is looked for when the transformation is made and at each ``init`` and each ``update``
that runs in Python (not jitted, or a jitted one's tracing), among the live schedulers
(:mod:`mithril.utils.lr_schedulers.base` keeps them in a ``WeakSet``: a short list). Not
seen: a scheduler made after the transformation and first stepped after the jitted update
was traced and its state made.

Not warned about: a hyperparameter the transformation is given (``learning_rate=``,
``schedules=``, ``traced_hyperparams=``, a keyword hyperparameter), and a transformation
that Mithril itself makes (``make_train_step``'s program reads the optimizer's rate at
every call, so it follows the scheduler).
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Collection
from typing import Any

__all__ = ["SchedulerWatch", "watch_schedulers"]

_BASE = "mithril.utils.lr_schedulers.base"


def _module(frame: Any) -> str:
    return frame.f_globals.get("__name__", "") if frame is not None else ""


def _is_mithril(name: str) -> bool:
    return name == "mithril" or name.startswith("mithril.")


def _user_level() -> int:
    """The ``stacklevel`` of the first frame outside mithril, for a ``warnings.warn`` in the
    caller of this function (the user's call, through optax's combinators if any)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _is_mithril(_module(frame)):
        frame, level = frame.f_back, level + 1
    return level


def _live_schedulers() -> list[Any]:
    """Every live scheduler (:mod:`mithril.utils.lr_schedulers.base` keeps them weakly; none
    before it is imported)."""
    base = sys.modules.get(_BASE)
    return [] if base is None else list(base._made)


def _held(opt: Any, seen: list[Any] | None = None) -> list[Any]:
    """``opt`` and the optimizers it holds (a Lookahead's inner, a Muon's fallback),
    recursively: the transformation copied them all."""
    from ..utils.optimizers.base import Optimizer

    seen = [] if seen is None else seen
    seen.append(opt)
    for v in vars(opt).values():
        if isinstance(v, Optimizer) and all(v is not s for s in seen):
            _held(v, seen)
    return seen


def _driven(schedulers: list[Any], opt: Any, given: Collection[str]) -> dict[str, list[str]]:
    """Scheduler class name -> the names of ``opt``'s hyperparameters it drives (a group's as
    ``param_groups[g].name``), those in ``given`` left out."""
    from ..utils.lr_schedulers.lanes import _target_key

    ids = {id(o) for o in _held(opt)}
    out: dict[str, list[str]] = {}
    for sched in schedulers:
        for lane in (sched, *getattr(sched, "_siblings", ())):
            try:
                where, name, group = _target_key(lane.optimizer)
            except Exception:  # noqa: BLE001 - an odd target is not this optimizer's
                continue
            shown = name if group is None else f"param_groups[{group}].{name}"
            if where not in ids or shown in given or (
                    name == "learning_rate" and "learning_rate" in given):
                continue
            names = out.setdefault(type(sched).__name__, [])
            if shown not in names:
                names.append(shown)
    return out


def _message(name: str, driven: dict[str, list[str]]) -> str:
    what = "; ".join(f"{k}: {', '.join(v)}" for k, v in driven.items())
    return (f"optax_transformation({name}): a Mithril scheduler drives the optimizer ({what}), "
            f"but the transformation copied its hyperparameters when it was made, so the "
            f"scheduler's steps do not reach it. Schedule it in optax instead: "
            f"optax_transformation(opt, learning_rate=schedule), an optax schedule of the step "
            f"count (other hyperparameters: schedules={{name: schedule}}), or "
            f"optax.inject_hyperparams(optax_transformation)(opt, learning_rate=...); or set "
            f"state.hyperparams['learning_rate'] between steps (make_train_step follows the "
            f"optimizer's scheduler itself)")


class SchedulerWatch:
    """The look for schedulers on one transformation's optimizer (module docs): warns once,
    then looks no more; holds the optimizer weakly (once it is gone, none can drive it)."""

    def __init__(self, optimizer: Any, given: Collection[str]) -> None:
        self._ref = weakref.ref(optimizer)
        self._name = type(optimizer).__name__
        self._given = frozenset(given)
        self.done = False

    def check(self) -> None:
        """Warn if a live scheduler drives the optimizer."""
        if self.done:
            return
        opt = self._ref()
        if opt is None:
            self.done = True
            return
        schedulers = _live_schedulers()
        driven = _driven(schedulers, opt, self._given) if schedulers else {}
        if driven:
            self.done = True
            warnings.warn(_message(self._name, driven), UserWarning, stacklevel=_user_level())


def watch_schedulers(optimizer: Any, given: Collection[str]) -> SchedulerWatch | None:
    """The watch of ``optimizer`` for :func:`~.optax_transform.optax_transformation` (called
    from it: it looks past the :mod:`mithril.interop` frames for its caller), after a first
    look at every live scheduler; None where Mithril itself made the call (a program that
    follows the optimizer's hyperparameters). ``given``: the names the transformation is
    given (``"learning_rate"`` for ``learning_rate=``)."""
    frame = sys._getframe(1)
    while frame is not None and _module(frame).startswith("mithril.interop"):
        frame = frame.f_back
    if _is_mithril(_module(frame)):
        return None
    watch = SchedulerWatch(optimizer, given)
    watch.check()
    return watch
