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
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def same_target(a: Any, b: Any) -> bool:
    """Whether two schedulers' targets are the same value: the same object, or handles on
    the same hyperparameter of the same optimizer and group."""
    if a is b:
        return True
    from ..optimizers.groups import Hyperparameter

    return (isinstance(a, Hyperparameter) and isinstance(b, Hyperparameter)
            and a.optimizer is b.optimizer and a.name == b.name and a.group == b.group)


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
