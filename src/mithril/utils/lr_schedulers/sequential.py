"""Composition of schedulers: :class:`SequentialLR`."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from .base import (
    ChildrenState,
    LRScheduler,
    SupportsLearningRate,
    _check_child,
    _check_milestones,
    _check_step,
)
from .plateau import _drive_child, _metric_value, _needs_metric

__all__ = ["SequentialLR"]


class SequentialLR(ChildrenState, LRScheduler):
    """Run several schedulers one after another, switching at the given milestones.

    Like PyTorch's ``SequentialLR``: with ``milestones = [m_1, ..., m_{k-1}]`` (non-decreasing
    integers ``>= 0``), child ``i`` is active for ``m_i <= t < m_{i+1}`` (``m_0 = 0``) and
    restarts its own step counter at ``0`` on its milestone, so

    .. math:: \\eta_t = \\text{child}_i.\\text{get\\_lr\\_at}(t - m_i).

    As in PyTorch (where every scheduler on an optimizer shares the optimizer's ``initial_lr``),
    every child is **re-based to** ``schedulers[0].base_lr`` (the learning rate the optimizer
    had before the first child was constructed, or the first child's own ``base_lr=``; a
    later child given ``base_lr=`` keeps it, as in :class:`JoinSchedules`), because constructing a child may already have
    changed the optimizer's learning rate (e.g. a warm-up sets ``start_lr``). One exception:
    torch's ``OneCycleLR`` overwrites that shared ``initial_lr`` with ``max_lr / div_factor``,
    so in torch the children *before* it start from that value; here they keep
    ``schedulers[0].base_lr`` (the OneCycleLR child still cycles from its own ``max_lr``).
    A later child that goes on from the rate it finds, as torch's (:class:`SWALR`,
    :class:`MultiplicativeLR`), starts from the rate of step ``m_i - 1`` instead (at ``m_i =
    0`` as built, from ``base_lr``). A repeated milestone, or ``0``, gives a child no steps,
    as in PyTorch.

    Unlike PyTorch, a child may be a :class:`ReduceLROnPlateau` (or a composite containing
    one). ``step(metric)`` forwards ``metric`` to the active child if it needs one (otherwise
    the metric is ignored). On its milestone a plateau child restarts like any other child: its
    learning rate becomes ``base_lr``, ``best``/``num_bad_epochs``/``cooldown_counter`` are
    reset, and the metric passed on that step is *not* observed (it measures the previous
    phase). On every later step it needs the metric: ``step()`` without one issues a
    ``RuntimeWarning`` and changes nothing (neither the child nor this scheduler advances,
    ``last_step`` and the learning rate stay as they were), as ``ReduceLROnPlateau.step()``.
    :meth:`get_lr_at` raises :class:`NotImplementedError` for steps in a plateau phase.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        schedulers: at least one distinct scheduler, all on ``optimizer``.
        milestones: ``len(schedulers) - 1`` non-decreasing integers ``>= 0``.
    """

    _HPARAMS = ("milestones",)
    _LANEWISE = True
    _LANE_CHILDREN = ("schedulers",)

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        schedulers: Sequence[LRScheduler],
        milestones: Sequence[int],
    ) -> None:
        super().__init__(optimizer)
        children = list(schedulers)
        if not children:
            raise ValueError("schedulers must contain at least one scheduler")
        for i, child in enumerate(children):
            _check_child(type(self).__name__, optimizer, child, f"schedulers[{i}]")
        if len({id(c) for c in children}) != len(children):
            raise ValueError("schedulers must be distinct objects")
        self.schedulers: list[LRScheduler] = children
        self._configure(milestones=milestones)
        self._rebase(children[0].base_lr)
        self._restart()

    def _configure(self, *, milestones: Sequence[int]) -> None:
        ms = _check_milestones("milestones", milestones)
        if len(ms) != len(self.schedulers) - 1:
            raise ValueError(
                f"milestones must have len(schedulers) - 1 = {len(self.schedulers) - 1} "
                f"entries, got {len(ms)}"
            )
        self.milestones = ms

    @property
    def requires_metric(self) -> bool:
        return any(c.requires_metric for c in self.schedulers)

    def _next_needs_metric(self) -> bool:
        """Whether the next step observes a metric (see :func:`.plateau._needs_metric`)."""
        idx, local = self._locate(self.last_step + 1)
        return local > 0 and _needs_metric(self.schedulers[idx])

    def _locate(self, t: int) -> tuple[int, int]:
        idx = bisect_right(self.milestones, t)
        start = self.milestones[idx - 1] if idx > 0 else 0
        return idx, t - start

    def _lr_at(self, t: int) -> float:
        idx, local = self._locate(t)
        child = self.schedulers[idx]
        m = self.milestones[idx - 1] if idx else 0
        if m and child._STARTS_FROM_CURRENT:  # (from the rate the phase before left; at 0
            return child._lr_at_from(local, self._lr_at(m - 1))  # it starts as built)
        return child.get_lr_at(local)

    def _extra_targets(self, t: int) -> list[tuple[Any, float]]:
        # why: the active child's cycled momentum (OneCycleLR / CyclicLR with
        # cycle_momentum=True) at its step, so that load_state_dict and a restart set it as
        # they set the learning rate (a resumed run's first update used another momentum)
        idx, local = self._locate(t)
        return self.schedulers[idx]._extra_targets(local)

    def _rebase(self, lr: float) -> None:
        self.base_lr = float(lr)
        for child in self.schedulers:
            child._rebase(lr)

    def _reset_state(self) -> None:
        self._last_step = 0
        for child in self.schedulers:
            child._reset_state()
        self._last_lr = self.schedulers[self._locate(0)[0]].get_last_lr()

    def step(self, metric: float | None = None) -> None:  # type: ignore[override]
        """Advance one step; ``metric`` goes to the active child if it is metric-driven (a
        metric that is not a number raises, and changes nothing, even when ignored)."""
        if metric is not None:
            _metric_value(metric)
        t = _check_step(self.last_step + 1)
        idx, local = self._locate(t)
        child = self.schedulers[idx]
        if not _drive_child(child, local, metric):
            return
        self._last_step = t
        self._last_lr = child.get_last_lr()

    def _advance(self, metric: float | None) -> None:
        self.step(metric)

