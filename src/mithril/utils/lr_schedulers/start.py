"""Building a scheduler at a given step: ``last_step=n``, or torch's ``last_epoch=k``.

Every scheduler's constructor takes ``last_step=n`` (an integer ``>= 0``) or torch's
``last_epoch=k`` (an integer ``>= -1``; ``last_epoch=k`` is ``last_step=k + 1``, as torch's
constructor steps once from ``k``). The scheduler is then exactly the one built at step 0 and
stepped ``n`` times: ``last_step == n``, the optimizer holds the schedule's value of step
``n`` (a cycled momentum too), and ``state_dict()`` is that scheduler's. The base is what it is
at step 0: the optimizer's rate at construction (torch's ``initial_lr``) or ``base_lr=``. For
a user resuming a torch run without the scheduler's state: torch's ``StepLR(opt, 30,
last_epoch=k)`` with ``initial_lr`` in the groups is ``StepLR(opt, 30, last_epoch=k)`` here on
an optimizer at that ``initial_lr`` (or ``base_lr=initial_lr``).

torch 2.13's numbers, and where they come from: its constructor steps once from ``k``, by the
chained formula from the group's ``lr`` for :class:`StepLR`, :class:`MultiStepLR` and
:class:`ConstantLR` (the resumed run's when ``lr`` is the rate of step ``k``), keeping
``lr`` for :class:`ExponentialLR`, :class:`LinearLR`, :class:`PolynomialLR`,
:class:`CosineAnnealingLR` and :class:`MultiplicativeLR` (the resumed run's when ``lr`` is
the rate of step ``k + 1``), by a closed form of ``initial_lr`` for :class:`LambdaLR`,
:class:`CyclicLR`, :class:`OneCycleLR` and :class:`CosineAnnealingWarmRestarts`. Ours are
that resumed run's in every case (tests/test_sched_last_epoch.py). Where torch's gives no
resumed run, ours still do: its ``SequentialLR`` restarts its first child at any
``last_epoch``, its ``SWALR`` anneals from its own step count, its
``CosineAnnealingWarmRestarts`` with ``T_mult > 1`` takes ``T_0`` for the cycle of step
``k``; its ``ChainedScheduler`` takes no ``last_epoch``.

A closed form jumps to step ``n`` at once; a scheduler with its own ``step`` (a composite,
:class:`SWALR`) is stepped ``n`` times. Refused (nothing built, nothing changed): a
metric-driven scheduler (:class:`ReduceLROnPlateau`, a composite with one: its state follows
the metrics seen, not the step; torch's takes no ``last_epoch`` either), both names at once,
and a value that is no integer in range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import lanes as lanes_mod

if TYPE_CHECKING:
    from .base import LRScheduler

#: the constructor's keywords naming the step to start at (ours, torch's)
NAMES = ("last_step", "last_epoch")

#: a scheduler with its own ``step`` is stepped one by one: more steps than this are refused
#: (a composite's step costs about 0.1 ms, so this is a minute or two; a closed form jumps to
#: any step at once)
MAX_STEPPED = 10**6


def start_step(cls: type, given: Mapping[str, Any], arguments: Mapping[str, Any] | None) -> int:
    """The step to start at (``0``: as built) from the ``last_step`` / ``last_epoch`` keywords
    ``given``, checked against ``cls`` and its child schedulers among ``arguments``."""
    from .base import _check_int

    if not given:
        return 0
    owner = cls.__name__
    if len(given) == 2:
        raise TypeError(f"{owner}: give last_step= or torch's last_epoch=, not both "
                        f"(last_epoch=k is last_step=k+1)")
    ((name, value),) = given.items()
    try:
        n = _check_int(name, value, minimum=0 if name == "last_step" else -1)
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}") from None
    n += name == "last_epoch"
    children = [c for a in cls._LANE_CHILDREN
                for c in lanes_mod.children_of((arguments or {}).get(a))]
    if n and (cls._METRIC_DRIVEN or any(c.requires_metric for c in children)):
        what = "it" if cls._METRIC_DRIVEN else "its ReduceLROnPlateau child"
        raise TypeError(f"{owner}: no {name}= ({what} follows the metrics it is given, not "
                        f"the step count; torch's ReduceLROnPlateau takes none either): build "
                        f"it at step 0, or load_state_dict(saved) to resume")
    # (_VALUE_PER_STEP: a product over every past step, MultiplicativeLR's: a call a step)
    if n > MAX_STEPPED and (not _jumps(cls) or getattr(cls, "_VALUE_PER_STEP", False)):
        raise ValueError(f"{owner}: {name}={value} is too large: a {owner} is stepped one "
                         f"step at a time to get there (at most {MAX_STEPPED} steps)")
    return n


def _jumps(cls: type) -> bool:
    """Whether ``cls`` reaches a step at once (a closed form set by the base class)."""
    from .base import LRScheduler

    return (not cls._LANEWISE and cls.step is LRScheduler.step
            and cls._set_step is LRScheduler._set_step)


def go_to(sched: LRScheduler, n: int) -> None:
    """Move a scheduler just built to step ``n`` as ``n`` calls of ``step()`` would (a
    closed form at once), or, if that raises, put the optimizer and the child schedulers
    back as they were before the constructor ran and re-raise."""
    if not _jumps(type(sched)):
        # why: the step under lanes.alone, which would count these as the user's own steps
        # (they are the construction's, as torch's initial step)
        step: Callable[[], None] = type(sched).step.__wrapped__.__get__(sched)  # type: ignore[attr-defined]
        for _ in range(n):
            step()
    else:
        sched._set_step(n)


def snapshot(cls: type, optimizer: Any, arguments: Mapping[str, Any] | None) -> Callable[[], None]:
    """A function putting ``optimizer``'s hyperparameters and the child schedulers among
    ``arguments`` back as they are now (for a constructor that fails at its start step)."""
    from .per_group import _snapshot

    restore_opt = _snapshot(optimizer)
    children = [c for a in cls._LANE_CHILDREN
                for c in lanes_mod.children_of((arguments or {}).get(a))]
    states = [(c, c.state_dict(), dict(c.__dict__)) for c in children]

    def restore() -> None:
        for child, state, attrs in states:
            child.__dict__.clear()
            child.__dict__.update(attrs)
            child._load(state)
        restore_opt()

    return restore
