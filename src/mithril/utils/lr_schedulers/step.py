"""Step-wise decay schedules: :class:`StepLR`, :class:`MultiStepLR`, :class:`ExponentialLR`."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from .base import LRScheduler, SupportsLearningRate, _check_int, _check_milestones, _check_real

__all__ = ["ExponentialLR", "MultiStepLR", "StepLR"]


class StepLR(LRScheduler):
    """Decay by ``gamma`` every ``step_size`` steps.

    .. math:: \\eta_t = \\eta_{base} \\cdot \\gamma^{\\lfloor t / \\text{step\\_size} \\rfloor}

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        step_size: period of the decay, integer ``>= 1``.
        gamma: multiplicative factor, ``>= 0`` (0: the rate is 0 from the first decay on).
    """

    _HPARAMS = ("step_size", "gamma")

    def __init__(self, optimizer: SupportsLearningRate, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(optimizer)
        self._configure(step_size=step_size, gamma=gamma)
        self._restart()

    def _configure(self, *, step_size: int, gamma: float) -> None:
        step_size = _check_int("step_size", step_size, minimum=1)
        gamma = _check_real("gamma", gamma, ge=0.0)
        self.step_size, self.gamma = step_size, gamma

    def _lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma ** (t // self.step_size)


class MultiStepLR(LRScheduler):
    """Decay by ``gamma`` at each milestone.

    .. math:: \\eta_t = \\eta_{base} \\cdot \\gamma^{\\#\\{m \\in \\text{milestones} : m \\le t\\}}

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        milestones: integers ``>= 0`` in any order, as PyTorch's; a repeated one decays by
            ``gamma`` once per repeat (PyTorch's ``Counter``); kept sorted.
        gamma: multiplicative factor, ``>= 0``.
    """

    _HPARAMS = ("milestones", "gamma")

    def __init__(
        self, optimizer: SupportsLearningRate, milestones: Sequence[int], gamma: float = 0.1
    ) -> None:
        super().__init__(optimizer)
        self._configure(milestones=milestones, gamma=gamma)
        self._restart()

    def _configure(self, *, milestones: Sequence[int], gamma: float) -> None:
        ms = _check_milestones("milestones", milestones, any_order=True)
        gamma = _check_real("gamma", gamma, ge=0.0)
        self.milestones, self.gamma = ms, gamma

    def _lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma ** bisect_right(self.milestones, t)


class ExponentialLR(LRScheduler):
    """Decay by ``gamma`` every step.

    .. math:: \\eta_t = \\eta_{base} \\cdot \\gamma^{t}

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        gamma: multiplicative factor, ``>= 0`` (0: the rate is 0 from the first decay on).
    """

    _HPARAMS = ("gamma",)

    def __init__(self, optimizer: SupportsLearningRate, gamma: float) -> None:
        super().__init__(optimizer)
        self._configure(gamma=gamma)
        self._restart()

    def _configure(self, *, gamma: float) -> None:
        self.gamma = _check_real("gamma", gamma, ge=0.0)

    def _lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma**t
