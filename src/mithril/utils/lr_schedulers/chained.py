"""Multiplicative composition of schedulers: :class:`ChainedScheduler`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import (
    ChildrenState,
    LRScheduler,
    SupportsLearningRate,
    _check_child,
    _check_step,
)
from .per_group import _snapshot

__all__ = ["ChainedScheduler"]


class ChainedScheduler(ChildrenState, LRScheduler):
    """Several schedulers at once, their effects multiplied, as PyTorch's ``ChainedScheduler``.

    Every child runs on the common step counter ``t``; the first one gives a learning rate and
    each further child multiplies it by its own rate *relative to its base*:

    .. math:: \\eta_t = s_0(t) \\prod_{i \\ge 1} \\frac{s_i(t)}{s_i.\\text{base\\_lr}}

    Every child is re-based (as in :class:`SequentialLR`) to ``schedulers[0].base_lr``, the
    optimizer's learning rate before the first child was constructed (constructing a child may
    already have changed it). :meth:`step` steps every child in order (each sets the optimizer,
    as in PyTorch), then sets the product; if the optimizer refuses any rate, every child and
    the optimizer are put back as they were.

    PyTorch chains by letting each child update the optimizer's current rate in turn, so this
    product is exactly PyTorch's result when every child is one that PyTorch evaluates
    recursively, as a factor of the current rate: :class:`StepLR`, :class:`MultiStepLR`,
    :class:`ExponentialLR`, :class:`ConstantLR`, :class:`LinearLR`, :class:`PolynomialLR`,
    :class:`MultiplicativeLR` (and :class:`CosineAnnealingLR` with ``eta_min=0`` up to
    ``T_max``) - the chains PyTorch documents. A child that PyTorch evaluates in closed form
    (``LambdaLR``, ``CyclicLR``, ``OneCycleLR``, ``CosineAnnealingWarmRestarts``) *overwrites*
    the rate there at every step, so in PyTorch the children before it are lost and the
    recursive ones after it only apply their ratio of one step (``ExponentialLR`` then scales
    by ``gamma``, not ``gamma**t``). Here every child multiplies by its whole schedule, so the
    chain does not depend on that accident of order (intended difference).

    Like PyTorch, a :class:`ReduceLROnPlateau` child (or one containing it) is refused.
    Every child after the first needs ``base_lr > 0`` (its factor is relative to it).

    Args:
        schedulers: at least one distinct scheduler, all on the same optimizer.
        optimizer: that optimizer (default: the first child's). PyTorch's argument order;
            ``ChainedScheduler(optimizer, schedulers)``, the order of :class:`SequentialLR`,
            is accepted too.
    """

    _LANEWISE = True
    _LANE_CHILDREN = ("schedulers",)
    _OPTIMIZER_ARG = "optimizer"

    @classmethod
    def _normalize_arguments(cls, arguments: dict[str, Any]) -> None:
        schedulers, optimizer = arguments.get("schedulers"), arguments.get("optimizer")
        if isinstance(optimizer, Sequence) and not isinstance(schedulers, Sequence):
            arguments["schedulers"], arguments["optimizer"] = optimizer, schedulers
        children = arguments.get("schedulers")
        if (arguments.get("optimizer") is None and isinstance(children, Sequence) and children
                and isinstance(children[0], LRScheduler)):
            arguments["optimizer"] = children[0].optimizer

    def __init__(
        self,
        schedulers: Sequence[LRScheduler],
        optimizer: SupportsLearningRate | None = None,
    ) -> None:
        if isinstance(optimizer, Sequence) and not isinstance(schedulers, Sequence):
            schedulers, optimizer = optimizer, schedulers  # (optimizer, schedulers)
        if isinstance(schedulers, (str, bytes)) or not isinstance(schedulers, Sequence):
            raise TypeError(
                f"schedulers must be a sequence of LRScheduler, got {type(schedulers).__name__}"
            )
        children = list(schedulers)
        if not children:
            raise ValueError("schedulers must contain at least one scheduler")
        if optimizer is None:
            if not isinstance(children[0], LRScheduler):
                raise TypeError(
                    f"ChainedScheduler: schedulers[0] must be an LRScheduler, got "
                    f"{type(children[0]).__name__}"
                )
            optimizer = children[0].optimizer
        super().__init__(optimizer)
        for i, child in enumerate(children):
            _check_child(type(self).__name__, optimizer, child, f"schedulers[{i}]")
            if child.requires_metric:
                raise ValueError(
                    f"ChainedScheduler: schedulers[{i}] ({type(child).__name__}) needs a metric "
                    f"in step(); a chain cannot drive it (as in PyTorch)"
                )
        if len({id(c) for c in children}) != len(children):
            raise ValueError("schedulers must be distinct objects")
        self.schedulers: list[LRScheduler] = children
        self._rebase(children[0].base_lr)
        self._check_bases()
        self._restart()

    def _configure(self) -> None:
        return None

    def _check_bases(self) -> None:
        for i, child in enumerate(self.schedulers[1:], start=1):
            if not child.base_lr > 0:
                raise ValueError(
                    f"ChainedScheduler: schedulers[{i}] has base_lr {child.base_lr}; every "
                    f"scheduler after the first needs base_lr > 0 (it contributes its learning "
                    f"rate relative to base_lr)"
                )

    def _lr_at(self, t: int) -> float:
        first, *rest = self.schedulers
        lr = first.get_lr_at(t)
        for child in rest:
            lr *= child.get_lr_at(t) / child.base_lr
        return lr

    def _rebase(self, lr: float) -> None:
        old = (self.base_lr, [child.base_lr for child in self.schedulers])
        self.base_lr = float(lr)
        for child in self.schedulers:
            child._rebase(lr)
        # why: a parent re-basing the chain to 0 (a warm-up's end_lr = 0) left children that
        # every later step divides by (ZeroDivisionError); refuse it by name, changing nothing
        try:
            self._check_bases()
        except ValueError:
            self.base_lr = old[0]
            for child, base in zip(self.schedulers, old[1], strict=True):
                child._rebase(base)
            raise

    def _extra_targets(self, t: int) -> list[tuple[Any, float]]:
        # why: the children's cycled momentum at step t, so that load_state_dict and a restart
        # (a milestone of a SequentialLR) set it as they set the learning rate (it was left
        # as it was until the next step: a resumed run's first update used another momentum)
        return [x for child in self.schedulers for x in child._extra_targets(t)]

    def _reset_state(self) -> None:
        for child in self.schedulers:
            child._reset_state()
        self._last_lr = self.get_lr_at(0)
        self._last_step = 0

    def step(self) -> None:
        """Step every child (in order), then set the optimizer to the product."""
        t = _check_step(self.last_step + 1)
        lr = self.get_lr_at(t)  # may raise; nothing changed yet
        backup = self.state_dict()
        old_lr = self.optimizer.get_learning_rate()
        # why: a child cycling the momentum sets it before a later child may be refused; the
        # snapshot puts it back too (the learning rate alone was restored)
        restore = _snapshot(self.optimizer)
        try:
            for child in self.schedulers:
                child._advance(None)
            self.optimizer.set_learning_rate(lr)
        except Exception:
            restore()
            self._load(backup)
            self.optimizer.set_learning_rate(old_lr)
            raise
        self._last_step = t
        self._last_lr = lr

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        super()._load_extra(state)
        self._check_bases()
