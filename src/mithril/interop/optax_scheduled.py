"""The warning :func:`~.optax_transform.optax_transformation` gives when a Mithril scheduler
(:mod:`mithril.utils.lr_schedulers`) drives the optimizer it copied.

The transformation copies the optimizer's hyperparameters when it is made (the learning rate
then lives in ``state.hyperparams``): a scheduler stepping the optimizer afterwards changes
nothing in it. So that this is not silent, a scheduler whose target is the optimizer (its
learning rate, a handle ``opt.hyperparameter(name, group)``, a per-group lane, a composite's
child; a Lookahead's inner optimizer, a Muon's fallback) gives one ``UserWarning`` per
transformation, saying what to use instead. It is looked for

* when the transformation is made, among the live objects (one pass of
  ``gc.get_objects()``, ~10-40 ms, and only once :mod:`mithril.utils.lr_schedulers` is
  imported: before, no scheduler can exist);
* after that, at each ``init`` and each ``update`` that runs in Python (not jitted, or a
  jitted one's tracing), among the schedulers stepped so far (a short list: cheap).
  Not seen: a scheduler made after the transformation and first stepped after the jitted
  update was traced (seen at ``init`` once the schedulers register themselves:
  :func:`_registered`).

Not warned about: a hyperparameter the transformation is given (``learning_rate=``,
``schedules=``, ``traced_hyperparams=``, a keyword hyperparameter), and a transformation
that Mithril itself makes (``make_train_step``'s program reads the optimizer's rate at
every call, so it follows the scheduler).
"""

from __future__ import annotations

import gc
import itertools
import sys
import warnings
import weakref
from collections.abc import Collection
from typing import Any

__all__ = ["SchedulerWatch", "watch_schedulers"]

_BASE = "mithril.utils.lr_schedulers.base"
_LANES = "mithril.utils.lr_schedulers.lanes"


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


def _subclasses(cls: type) -> set[type]:
    out = {cls}
    for sub in cls.__subclasses__():
        out |= _subclasses(sub)
    return out


def _registered() -> list[Any] | None:
    """Every live scheduler, where :mod:`mithril.utils.lr_schedulers.base` keeps them (a
    ``WeakSet`` ``_made``, proposed: then every look is cheap); None where it does not."""
    made = getattr(sys.modules.get(_BASE), "_made", None)
    return None if made is None else list(made)


def _live_schedulers() -> list[Any]:
    """Every live scheduler (none before :mod:`mithril.utils.lr_schedulers` is imported):
    the registered ones, else one pass over the objects the collector tracks (at C speed
    but for the schedulers)."""
    base = sys.modules.get(_BASE)
    if base is None:
        return []
    if (made := _registered()) is not None:
        return made
    kinds = frozenset(_subclasses(base.LRScheduler))
    objects = gc.get_objects()
    try:
        return list(itertools.compress(objects, map(kinds.__contains__, map(type, objects))))
    finally:
        del objects


def _stepped_schedulers() -> list[Any]:
    """The live schedulers stepped so far by the user (their ``step`` keeps them, to refuse
    two stepped back to back on one optimizer: :mod:`mithril.utils.lr_schedulers.lanes`);
    every registered one where they are (:func:`_registered`)."""
    if (made := _registered()) is not None:
        return made
    lanes = sys.modules.get(_LANES)
    if lanes is None:
        return []
    return [s for s in (r() for r in getattr(lanes, "_stepped", ())) if s is not None]


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

    def check(self, live: bool = False) -> None:
        """Warn if a scheduler drives the optimizer: among every live one (``live``, a pass
        over the heap) or the stepped ones (cheap)."""
        if self.done:
            return
        opt = self._ref()
        if opt is None:
            self.done = True
            return
        schedulers = _live_schedulers() if live else _stepped_schedulers()
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
    watch.check(live=True)
    return watch
