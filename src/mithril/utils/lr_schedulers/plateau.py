"""The metric-driven :class:`ReduceLROnPlateau` and its missing-metric warning."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from ..optimizers.checks import to_float
from .base import (
    LRScheduler,
    SupportsLearningRate,
    _check_choice,
    _check_int,
    _check_real,
    _check_step,
    _decode_float,
    _encode_float,
    _to_float,
)

__all__ = ["ReduceLROnPlateau"]

_HERE = os.path.dirname(os.path.abspath(__file__))


class ReduceLROnPlateau(LRScheduler):
    """Reduce the learning rate when a monitored metric stops improving.

    Semantics are exactly PyTorch's. On ``step(metric)``:

    * ``metric`` is *better* than ``best`` if, for ``threshold_mode='rel'``,
      ``metric < best * (1 - threshold)`` (``mode='min'``) or
      ``metric > best * (1 + threshold)`` (``mode='max'``); for ``threshold_mode='abs'``,
      ``metric < best - threshold`` / ``metric > best + threshold``. ``best`` starts at
      ``+inf`` (min) / ``-inf`` (max). A better metric becomes ``best`` and zeroes
      ``num_bad_epochs``; otherwise ``num_bad_epochs += 1``.
    * While in cooldown (``cooldown_counter > 0``) the counter is decremented and bad epochs are
      ignored (``num_bad_epochs = 0``).
    * If ``num_bad_epochs > patience``: ``new = max(lr * factor, min_lr)`` where ``lr`` is the
      optimizer's current learning rate; the optimizer is updated only if ``lr - new > eps``.
      Then ``cooldown_counter = cooldown`` and ``num_bad_epochs = 0``.

    The optimizer is not touched at construction (``base_lr`` is its current learning rate).
    This scheduler has no closed form: :meth:`get_lr_at` raises :class:`NotImplementedError`.

    From optax and Keras (both reduce when the bad evaluations *reach* ``patience``, and have
    no ``eps``): ``optax.contrib.reduce_on_plateau(factor, patience, rtol, atol=0, cooldown,
    min_scale)`` is ``ReduceLROnPlateau(opt, "min", factor, patience - 1, threshold=rtol,
    cooldown=cooldown, min_lr=min_scale * base, eps=0)`` (``rtol=0, atol``:
    ``threshold=atol, threshold_mode="abs"``); Keras's callback ``ReduceLROnPlateau(factor,
    patience, min_delta, cooldown, min_lr)`` (``mode="min"``) is the same with
    ``threshold=min_delta, threshold_mode="abs"``, ``max(patience - 1, 0)`` (its
    ``patience=0`` acts as its 1) and ``max(cooldown - 1, 0)`` (Keras counts the evaluation
    of the reduction in its cooldown). Equal step for step in the tests.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        mode: ``'min'`` or ``'max'``.
        factor: reduction factor, ``0 <= factor < 1``.
        patience: number of tolerated bad steps, integer ``>= 0``.
        threshold: improvement threshold, ``>= 0`` (``< 1`` for ``mode='min'`` with
            ``threshold_mode='rel'``).
        threshold_mode: ``'rel'`` or ``'abs'``.
        cooldown: steps to wait after a reduction, integer ``>= 0``.
        min_lr: lower bound of the learning rate, ``>= 0``.
        eps: minimal effective reduction, ``>= 0``.
    """

    _HPARAMS = (
        "mode",
        "factor",
        "patience",
        "threshold",
        "threshold_mode",
        "cooldown",
        "min_lr",
        "eps",
    )
    _GROUP_ARGS = ("min_lr",)
    _LANEWISE = True
    _STEPS_FROM_CURRENT = True
    _METRIC_DRIVEN = True

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        mode: Literal["min", "max"] = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        min_lr: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(optimizer)
        self._configure(
            mode=mode,
            factor=factor,
            patience=patience,
            threshold=threshold,
            threshold_mode=threshold_mode,
            cooldown=cooldown,
            min_lr=min_lr,
            eps=eps,
        )
        self._reset_state()

    def _configure(
        self,
        *,
        mode: str,
        factor: float,
        patience: int,
        threshold: float,
        threshold_mode: str,
        cooldown: int,
        min_lr: float,
        eps: float,
    ) -> None:
        mode = _check_choice("mode", mode, ("min", "max"))
        threshold_mode = _check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
        factor = _check_real("factor", factor, ge=0.0, lt=1.0)
        patience = _check_int("patience", patience, minimum=0)
        if mode == "min" and threshold_mode == "rel":
            threshold = _check_real("threshold", threshold, ge=0.0, lt=1.0)
        else:
            threshold = _check_real("threshold", threshold, ge=0.0)
        cooldown = _check_int("cooldown", cooldown, minimum=0)
        min_lr = _check_real("min_lr", min_lr, ge=0.0)
        eps = _check_real("eps", eps, ge=0.0)
        self.mode, self.threshold_mode = mode, threshold_mode
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.cooldown, self.min_lr, self.eps = cooldown, min_lr, eps

    @property
    def requires_metric(self) -> bool:
        return True

    @property
    def mode_worse(self) -> float:
        """Initial value of ``best``: ``+inf`` for ``'min'``, ``-inf`` for ``'max'``."""
        return math.inf if self.mode == "min" else -math.inf

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _lr_at(self, t: int) -> float:
        raise NotImplementedError(
            "ReduceLROnPlateau depends on the observed metrics and has no closed form"
        )

    def _reset_state(self) -> None:
        self._last_step = 0
        self.best: float = self.mode_worse
        self.num_bad_epochs: int = 0
        self.cooldown_counter: int = 0
        self._last_lr = self.base_lr

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def step(self, metric: float | None = None,  # type: ignore[override]
             epoch: None = None, *, metrics: float | None = None) -> None:
        """Observe ``metric`` (a number: anything ``float()`` accepts but a string) and maybe
        reduce the learning rate. ``metrics=`` is torch's name of it; torch's deprecated
        ``epoch`` is refused (a ``TypeError`` changing nothing).

        Without a metric there is nothing to observe: a ``RuntimeWarning`` says so and
        nothing changes (no epoch is counted). A loop written for epoch-driven schedulers
        thus keeps running, visibly, instead of crashing or silently decaying.

        A metric that is not a number (``TypeError``) or too large for a float
        (``ValueError``) changes nothing; neither does a learning rate the optimizer refuses.
        """
        if epoch is not None:
            raise TypeError(f"ReduceLROnPlateau.step() takes no epoch (got {epoch!r}): it counts "
                            f"its own steps; to jump to a step, load_state_dict")
        if metrics is not None:  # (torch's keyword)
            if metric is not None:
                raise TypeError("ReduceLROnPlateau.step() got metric and metrics (torch's name "
                                "of it): pass one")
            metric = metrics
        if metric is None:
            _warn_no_metric()
            return
        current = _metric_value(metric)
        last_step = _check_step(self.last_step + 1)
        # the new counters first; the scheduler is written only once the optimizer took the lr
        best, bad, cooldown_counter = self.best, self.num_bad_epochs, self.cooldown_counter
        if self._is_better(current, best):
            best, bad = current, 0
        else:
            bad += 1

        if cooldown_counter > 0:
            cooldown_counter -= 1
            bad = 0  # ignore any bad epochs in cooldown

        if bad > self.patience:
            old_lr = _to_float("the optimizer's learning rate", self.optimizer.get_learning_rate())
            new_lr = max(old_lr * self.factor, self.min_lr)
            if old_lr - new_lr > self.eps:
                self.optimizer.set_learning_rate(new_lr)  # may raise: nothing written yet
            cooldown_counter = self.cooldown
            bad = 0

        self._last_step, self.best = last_step, best
        self.num_bad_epochs, self.cooldown_counter = bad, cooldown_counter
        self._last_lr = float(self.optimizer.get_learning_rate())

    def _advance(self, metric: float | None) -> None:
        self.step(metric)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "best": _encode_float(self.best),
            "num_bad_epochs": self.num_bad_epochs,
            "cooldown_counter": self.cooldown_counter,
        }

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        try:
            self.best = _decode_float(state["best"], "best")
            self.num_bad_epochs = _check_int("num_bad_epochs", state["num_bad_epochs"], minimum=0)
            self.cooldown_counter = _check_int(
                "cooldown_counter", state["cooldown_counter"], minimum=0
            )
        except KeyError as exc:
            raise ValueError(f"ReduceLROnPlateau state_dict is missing key {exc}") from None


def _metric_value(metric: Any) -> float:
    """The metric as a float (``checks.to_float``: named ``TypeError``/``ValueError``)."""
    return to_float("metric", metric)


def _warn_no_metric(stacklevel: int | None = None) -> None:
    """Warn that a step got no metric, pointing at the caller's line: the first frame outside
    this package (``stacklevel``, if given, counts from here as ``warnings.warn``'s)."""
    if stacklevel is None:
        # why: a fixed stacklevel pointed into lanes.py (every plateau / composite step runs
        # inside the lanewise wrapper), never at the user's call
        level, frame = 2, sys._getframe(1)
        while frame is not None and os.path.dirname(
                os.path.abspath(frame.f_code.co_filename)) == _HERE:
            frame, level = frame.f_back, level + 1
        stacklevel = level
    warnings.warn(
        "ReduceLROnPlateau.step() called without the monitored metric; learning rate "
        "unchanged (call scheduler.step(val_loss))",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def _drive_child(child: Any, local: int, metric: float | None) -> bool:
    """Move a combinator's active child to its step ``local`` (0: its first step, a restart).

    Returns False, after a warning, when a metric-driven child gets no metric: there is
    nothing to observe, so nothing (the combinator included) advances."""
    if local == 0:
        child._restart()
        return True
    if metric is None and _needs_metric(child):
        _warn_no_metric()
        return False
    if child.last_step == local - 1 or child.requires_metric:
        child._advance(metric)
        return True
    # why: out of step, after a phase boundary was set mid-run (``seq.milestones = ...``, a
    # new ``warmup_steps``, attributes.py): put a closed-form child at ``local - 1`` first,
    # where a combinator built with the new value has it, so the step gives ``get_lr_at``
    # (it used to continue the child from where it stopped); all or nothing
    backup = child.state_dict()
    try:
        lr = child.get_lr_at(local - 1)
        child._last_step, child._last_lr = local - 1, lr
        child._advance(metric)
    except Exception:
        child._load(backup)
        raise
    return True


def _needs_metric(child: Any) -> bool:
    """Whether ``child``'s next step observes a metric. A composite holding a plateau
    scheduler (``requires_metric``) needs none while its next step is a warm-up step, or in
    a phase before the plateau's, or the plateau's restart."""
    # why: the static requires_metric stalled such a child, nested in a SequentialLR, in its
    # warm-up (with a warning) where the same scheduler alone steps without a metric
    if isinstance(child, ReduceLROnPlateau):
        return True
    upcoming = getattr(child, "_next_needs_metric", None)
    return upcoming() if upcoming is not None else bool(child.requires_metric)
