"""Schedules given by a user function: :class:`LambdaLR` and :class:`MultiplicativeLR`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from ..optimizers.checks import describe
from .base import LRScheduler, SupportsLearningRate, _check_step, _to_float

__all__ = ["LambdaLR", "MultiplicativeLR"]


def _check_callable(name: str, fn: Any) -> Callable[[int], float]:
    if not callable(fn):
        raise TypeError(f"{name} must be a callable, got {describe(fn)}")
    return fn


def _call_number(name: str, fn: Callable[[Any], Any], arg: Any) -> float:
    """``float(fn(arg))``: ``TypeError`` naming ``name`` if the result is not a real number
    (a string or a bool included), ``ValueError`` if it is too large for a float."""
    value = fn(arg)
    if isinstance(value, (str, bytes, bool)) or (
        isinstance(value, numbers.Number) and not isinstance(value, numbers.Real)
    ):
        raise TypeError(f"{name}({arg!r}) must return a real number, got {describe(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}({arg!r}) returned a number too large for a float: "
                         f"{describe(value)}") from None
    except Exception:  # TypeError, ValueError, torch's RuntimeError for a many-element tensor
        raise TypeError(f"{name}({arg!r}) must return a real number, got "
                        f"{describe(value)}") from None


class _NewLambda:
    """``sched.lr_lambda = f`` after construction: checked as the constructor checks it, on
    every lane (a list: one per lane, as the constructor's), and what was cached for the old
    function (MultiplicativeLR's product) dropped."""

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if name == "lr_lambda" and ("_made" not in d or "_inside" in d):  # (else: attributes.py)
            value = _check_callable("lr_lambda", value)
            object.__setattr__(self, "_memo", None)
        super().__setattr__(name, value)

    def _set_hyperparameter(self, name: str, value: Any) -> None:
        if name == "lr_lambda":
            self.lr_lambda = value
        else:
            super()._set_hyperparameter(name, value)  # type: ignore[misc]


class LambdaLR(_NewLambda, LRScheduler):
    """The base learning rate times a user function of the step, as PyTorch's ``LambdaLR``.

    .. math:: \\eta_t = \\eta_{base} \\cdot \\text{lr\\_lambda}(t)

    ``lr_lambda`` receives the integer step ``t`` and must return a real number; it must be a
    pure function of ``t`` (:meth:`get_lr_at` may call it for any step). A result that is not a
    number raises :class:`TypeError`; a non-finite learning rate raises :class:`ValueError`, and
    a negative one is the optimizer's to refuse (the scheduler then stays where it was).

    ``state_dict`` does **not** contain ``lr_lambda`` (a function is not JSON data; PyTorch
    omits plain functions and lambdas too): construct the scheduler with the same function,
    then ``load_state_dict`` restores the step counter, ``base_lr`` and ``last_lr``.
    As in PyTorch, ``lr_lambda`` may be a list with one callable per parameter group (the
    optimizer's own parameters first, then ``param_groups[i]``): the scheduler then acts per
    group, each from its own base rate (see :class:`LRScheduler`).

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        lr_lambda: ``t -> factor``, or a list of them (one per parameter group).
    """

    _GROUP_ARGS = ("lr_lambda",)

    def __init__(self, optimizer: SupportsLearningRate, lr_lambda: Callable[[int], float]) -> None:
        super().__init__(optimizer)
        self.lr_lambda = _check_callable("lr_lambda", lr_lambda)
        self._configure()
        self._restart()

    def _configure(self) -> None:
        return None

    def _lr_at(self, t: int) -> float:
        return self.base_lr * _call_number("lr_lambda", self.lr_lambda, t)


class MultiplicativeLR(_NewLambda, LRScheduler):
    """Multiply the learning rate by a user function of the step at every step, as PyTorch's
    ``MultiplicativeLR``.

    .. math:: \\eta_0 = \\eta_{base}, \\qquad \\eta_t = \\eta_{t-1} \\cdot \\text{lr\\_lambda}(t)

    This is the one schedule here that is a product over all past steps. :meth:`step` costs one
    call of ``lr_lambda`` (it continues from ``last_lr``, with PyTorch's arithmetic, so the
    values are bit for bit PyTorch's); :meth:`get_lr_at` for an arbitrary step multiplies
    forward from the nearest known point (step ``0``, ``last_step`` or the last step asked
    for). ``lr_lambda`` must be a pure function of ``t`` returning a real number.

    ``state_dict`` does **not** contain ``lr_lambda`` (as PyTorch for plain functions): build
    the scheduler with the same function, then ``load_state_dict`` restores the step counter and
    ``last_lr``, which carries the product so far.

    Restarted by a parent (a later child of :class:`SequentialLR` / :class:`JoinSchedules`, the
    ``after_scheduler`` of a warm-up) it goes on multiplying the rate it finds there, as
    torch's in its ``SequentialLR``: the restart step is ``lr·lr_lambda(0)`` (as torch 2.13,
    whose restart is not its initial step; older releases keep ``lr`` there), then
    ``·lr_lambda(1)``, ... (given ``base_lr=``, it restarts from that base).

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        lr_lambda: ``t -> factor`` applied at step ``t >= 1``, or a list of them, one per
            parameter group (as :class:`LambdaLR`).
    """

    _GROUP_ARGS = ("lr_lambda",)
    _STARTS_FROM_CURRENT = True
    #: its value at step n takes n calls of lr_lambda: a start step past
    #: start.MAX_STEPPED is refused
    _VALUE_PER_STEP = True

    def __init__(self, optimizer: SupportsLearningRate, lr_lambda: Callable[[int], float]) -> None:
        super().__init__(optimizer)
        self.lr_lambda = _check_callable("lr_lambda", lr_lambda)
        self._memo: tuple[float, int, float] | None = None  # (base_lr, t, lr): a cache only
        self._configure()
        LRScheduler._restart(self)  # (built: from base_lr; a parent's restart is _restart)

    def _configure(self) -> None:
        return None

    def _lr_at(self, t: int) -> float:
        return self._product(self.base_lr, t)

    def _lr_at_from(self, t: int, start: float) -> float:
        if "_base_given" in self.__dict__:
            return self.get_lr_at(t)
        return self._product(start * _call_number("lr_lambda", self.lr_lambda, 0), _check_step(t))

    def _restart(self) -> None:
        # why: restarted by a parent at its milestone it jumped back to the base (re-based to
        # the first child's); torch's goes on from the rate it finds, times lr_lambda(0)
        if "_base_given" in self.__dict__:
            super()._restart()
            return
        lanes = (self, *self._siblings)
        bases = [lane.base_lr for lane in lanes]
        starts = []
        for lane in lanes:
            lr = _to_float("the optimizer's learning rate", lane.optimizer.get_learning_rate())
            factor = _call_number("lr_lambda", lane.lr_lambda, 0)
            if not (math.isfinite(lr * factor) and lr * factor >= 0):
                raise ValueError(f"MultiplicativeLR restarted at the rate {lr}: times "
                                 f"lr_lambda(0) = {factor} it is {lr * factor}")
            starts.append(lr * factor)
        try:
            for lane, lr in zip(lanes, starts, strict=True):
                lane._rebase(lr)
            super()._restart()
        except Exception:
            for lane, lr in zip(lanes, bases, strict=True):
                lane._rebase(lr)
            raise

    def _product(self, base: float, t: int) -> float:
        """``base · lr_lambda(1) ⋯ lr_lambda(t)``, from the nearest known point."""
        start, lr = 0, base
        if base == self.base_lr and 0 < self.last_step <= t:
            start, lr = self.last_step, self._last_lr
        memo = self._memo
        if memo is not None and memo[0] == base and start < memo[1] <= t:
            start, lr = memo[1], memo[2]
        for k in range(start + 1, t + 1):
            lr = lr * _call_number("lr_lambda", self.lr_lambda, k)
            if not math.isfinite(lr):
                break  # get_lr_at reports it
        if math.isfinite(lr):
            self._memo = (base, t, lr)
        return lr
