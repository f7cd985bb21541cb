"""Per-group schedulers that are not closed forms: composites, plateau and SWALR.

A scheduler acting per parameter group keeps one *lane* per group (:class:`~.base.LRScheduler`,
``_siblings``). A closed form steps its lanes in :meth:`~.base.LRScheduler._set_step`; a
scheduler with its own ``step`` (one that reads the current rate, a metric, or its children)
gets it wrapped by :func:`lanewise`, which runs it on every lane, all or nothing. A composite
acts per group when its children do: lane ``i`` of the composite drives lane ``i`` of each
child (:func:`child_lanes`), as torch's ``SequentialLR`` / ``ChainedScheduler`` drive every
group of per-group children.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def _target_key(target: Any) -> tuple[int, str, int | None]:
    """The value a scheduler's target sets: ``(id(optimizer), name, group)`` of the optimizer
    that holds it. An optimizer stands for its learning rate, as its handle
    ``hyperparameter("learning_rate")`` does; a wrapper that forwards the rate (an
    ``Accumulate``'s ``.optimizer``, a ``Lookahead``'s inner optimizer, whose handles are the
    inner one's) stands for the wrapped optimizer's."""
    from ..optimizers.groups import Hyperparameter
    from .per_group import _hyperparameter_owner

    if not isinstance(target, Hyperparameter):
        owner = _hyperparameter_owner(target)
        try:
            handle = owner.hyperparameter("learning_rate")
        except Exception:  # noqa: BLE001 - not a mithril optimizer: the object itself
            return (id(target), "learning_rate", None)
        target = handle if isinstance(handle, Hyperparameter) else target
        if not isinstance(target, Hyperparameter):
            return (id(owner), "learning_rate", None)
    return (id(target.optimizer), target.name, target.group)


def same_target(a: Any, b: Any) -> bool:
    """Whether two schedulers' targets are the same value: the same object, handles on
    the same hyperparameter of the same optimizer and group, an optimizer and the handle
    on its learning rate, or a wrapper forwarding its rate and the wrapped optimizer."""
    return a is b or _target_key(a) == _target_key(b)


def children_of(value: Any) -> list[Any]:
    """The schedulers an argument holds (one, or a sequence of them)."""
    from .base import LRScheduler

    if isinstance(value, LRScheduler):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [c for c in value if isinstance(c, LRScheduler)]
    return []


def per_group_children(cls: type, arguments: Mapping[str, Any]) -> bool:
    """Whether any child scheduler among ``cls``'s child arguments acts per group (then the
    composite does too)."""
    return any(c._siblings for name in cls._LANE_CHILDREN
               for c in children_of(arguments.get(name)))


def child_lanes(owner: str, cls: type, arguments: Mapping[str, Any], lanes: int
                ) -> Callable[[int], dict[str, Any]]:
    """A function giving, for lane ``i``, ``cls``'s child arguments with each child replaced
    by its lane ``i`` (lane 0: the child itself). Every child must act per group, with
    ``lanes`` lanes (one per group of the same optimizer, plus its own)."""
    from .base import LRScheduler

    for name in cls._LANE_CHILDREN:
        for c in children_of(arguments.get(name)):
            if len(c._siblings) != lanes - 1:
                raise ValueError(
                    f"{owner}: {name} holds a {type(c).__name__} with {len(c._siblings) + 1} "
                    f"lane(s); acting per parameter group, every child needs {lanes} (build "
                    f"each with per_group=True on the same optimizer)")

    def lane(i: int) -> dict[str, Any]:
        out = {}
        for name in cls._LANE_CHILDREN:
            value = arguments.get(name)
            pick = (lambda c: c if i == 0 else c._siblings[i - 1])  # noqa: E731
            if isinstance(value, LRScheduler):
                out[name] = pick(value)
            elif children_of(value):
                out[name] = [pick(c) for c in value]
        return out

    return lane


def detach(cls: type, arguments: Mapping[str, Any]) -> None:
    """Hand the children's group lanes over to the composite: each child then drives its own
    lane only, and the composite steps every lane."""
    for name in cls._LANE_CHILDREN:
        for c in children_of(arguments.get(name)):
            c._lane_mates = c._siblings  # (an attribute set reaches them: attributes.py)
            c._siblings = []


def lanewise(step: Callable) -> Callable:
    """``step`` run on every lane of a per-group scheduler, all or nothing.

    The groups' lanes step first, each reading and setting its own group's value; then the
    scheduler's own lane, which sets the optimizer's learning rate and so moves every group's
    in proportion; then each lane's value is set again, in that order, so every group ends
    at its own. If any lane raises, the scheduler and every value are put back."""

    @functools.wraps(step)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._siblings:
            return step(self, *args, **kwargs)
        from .per_group import _apply, _snapshot

        backup = self.state_dict()
        restore = _snapshot(self.optimizer)
        try:
            for lane in self._siblings:
                step(lane, *args, **kwargs)
            out = step(self, *args, **kwargs)
            _apply(self._current_targets())
        except Exception:
            restore()
            self._load(backup)
            raise
        return out

    wrapper.__wrapped_lanes__ = True  # type: ignore[attr-defined]
    return wrapper


#: the schedulers stepped by the user (not a composite's children), by their last step
_stepped: list[weakref.ref[Any]] = []


def alone(step: Callable) -> Callable:
    """``step``, refused (``RuntimeError``, nothing changed) where another scheduler stepped
    by the user on the same target has stepped since this one's last step and moved the
    rate this one set: two schedulers stepped back to back on one optimizer, as torch chains
    them (this step would discard the other's change)."""

    @functools.wraps(step)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.__dict__.get("_owned"):
            _note_step(self)
        return step(self, *args, **kwargs)

    return wrapper


def _note_step(sched: Any) -> None:
    # why: torch documents "chaining" schedulers by stepping each in turn (each scales the rate
    # the one before left); ours set closed-form values, so the last one stepped silently won
    live = [s for s in (r() for r in _stepped) if s is not None]
    mine = next((i for i, s in enumerate(live) if s is sched), None)
    if mine is not None and not sched._STEPS_FROM_CURRENT:  # (those keep the other's change)
        other = next((s for s in live[mine + 1:] if _share_a_target(s, sched)), None)
        if other is not None and _moved(sched):
            raise RuntimeError(
                f"{type(sched).__name__}.step(): {type(other).__name__} on the same optimizer "
                f"stepped since this scheduler's last step and moved its rate. torch chains "
                f"schedulers stepped back to back (each scales the rate the other left); here "
                f"each sets its own value, and this step would discard the other's: combine "
                f"them in one scheduler, ChainedScheduler([a, b]) (their product, as torch's "
                f"chain; not with a ReduceLROnPlateau) or SequentialLR(optimizer, [a, b], "
                f"milestones) (one after the other)")
    _stepped[:] = [weakref.ref(s) for s in live if s is not sched] + [weakref.ref(sched)]


def _share_a_target(a: Any, b: Any) -> bool:
    """Whether two schedulers set a value in common: their own targets, or those of their
    group lanes (a per-group scheduler and one on a group's handle)."""
    keys = {_target_key(lane.optimizer) for lane in (a, *a._siblings)}
    return any(_target_key(lane.optimizer) in keys for lane in (b, *b._siblings))


def _moved(sched: Any) -> bool:
    """Whether a lane's value is no longer the one ``sched`` set last."""
    for lane in (sched, *sched._siblings):
        now, mine = float(lane.optimizer.get_learning_rate()), lane._last_lr
        if abs(now - mine) > 1e-12 * max(abs(now), abs(mine)):
            return True
    return False
