"""Factor schedules of PyTorch: :class:`ConstantLR`, :class:`LinearLR`, :class:`PolynomialLR`."""

from __future__ import annotations

import numbers
from typing import Any

from .base import LRScheduler, SupportsLearningRate, _check_int, _check_real

__all__ = ["ConstantLR", "LinearLR", "PolynomialLR"]


def _check_total_iters(value: Any, torch_with_zero: str) -> int:
    """``total_iters``, an integer ``>= 1``; torch takes 0, and ``torch_with_zero`` says
    what it then does (nothing a schedule of 0 steps means)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value == 0:
        raise ValueError(f"total_iters must be an integer >= 1, got 0 (torch's {torch_with_zero})")
    return _check_int("total_iters", value, minimum=1)


class ConstantLR(LRScheduler):
    """The base learning rate times ``factor`` for the first ``total_iters`` steps, then the
    base learning rate, as PyTorch's ``ConstantLR``.

    .. math:: \\eta_t = \\eta_{base} \\cdot (\\text{factor} \\text{ if } t < \\text{total\\_iters}
              \\text{ else } 1)

    PyTorch evaluates this recursively (``lr * factor`` at step 0, ``lr / factor`` at
    ``total_iters``); the values agree to rounding. Unlike PyTorch, ``factor = 0`` works (PyTorch
    divides by it) and ``total_iters = 0`` is refused (PyTorch would then keep the factor
    forever, contradicting its own closed form).

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        factor: in ``[0, 1]``.
        total_iters: number of steps at the reduced rate, integer ``>= 1``.
    """

    _HPARAMS = ("factor", "total_iters")

    def __init__(
        self, optimizer: SupportsLearningRate, factor: float = 1.0 / 3, total_iters: int = 5
    ) -> None:
        super().__init__(optimizer)
        self._configure(factor=factor, total_iters=total_iters)
        self._restart()

    def _configure(self, *, factor: float, total_iters: int) -> None:
        factor = _check_real("factor", factor, ge=0.0, le=1.0)
        total_iters = _check_total_iters(
            total_iters, "ConstantLR keeps factor forever on step(), where its closed form "
                         "never applies it")
        self.factor, self.total_iters = factor, total_iters

    def _lr_at(self, t: int) -> float:
        # torch's _get_closed_form_lr
        return self.base_lr * (self.factor + (t >= self.total_iters) * (1 - self.factor))


class LinearLR(LRScheduler):
    """The base learning rate times a factor that moves linearly from ``start_factor`` to
    ``end_factor`` over ``total_iters`` steps, then stays, as PyTorch's ``LinearLR``.

    .. math:: \\eta_t = \\eta_{base} \\left(s + (e - s)
              \\frac{\\min(t, \\text{total\\_iters})}{\\text{total\\_iters}}\\right)

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        start_factor: factor at step 0, in ``(0, 1]`` (as PyTorch).
        end_factor: factor from step ``total_iters`` on, in ``[0, 1]`` (as PyTorch).
        total_iters: length of the ramp, integer ``>= 1`` (PyTorch takes 0, then keeps
            ``start_factor`` forever, its closed form dividing by zero: refused).
    """

    _HPARAMS = ("start_factor", "end_factor", "total_iters")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
    ) -> None:
        super().__init__(optimizer)
        self._configure(start_factor=start_factor, end_factor=end_factor, total_iters=total_iters)
        self._restart()

    def _configure(self, *, start_factor: float, end_factor: float, total_iters: int) -> None:
        start_factor = _check_real("start_factor", start_factor, gt=0.0, le=1.0)
        end_factor = _check_real("end_factor", end_factor, ge=0.0, le=1.0)
        total_iters = _check_total_iters(
            total_iters, "LinearLR keeps start_factor forever on step(), never reaching "
                         "end_factor, and its closed form divides by zero")
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters

    def _lr_at(self, t: int) -> float:
        s, e, n = self.start_factor, self.end_factor, self.total_iters
        return self.base_lr * (s + (e - s) * min(n, t) / n)


class PolynomialLR(LRScheduler):
    """Polynomial decay to 0 over ``total_iters`` steps, as PyTorch's ``PolynomialLR``.

    .. math:: \\eta_t = \\eta_{base} \\left(1 - \\frac{\\min(t, \\text{total\\_iters})}
              {\\text{total\\_iters}}\\right)^{\\text{power}}

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        total_iters: decay length, integer ``>= 1`` (PyTorch takes 0, then never decays, its
            closed form dividing by zero: refused).
        power: exponent, ``>= 0``.
    """

    _HPARAMS = ("total_iters", "power")

    def __init__(
        self, optimizer: SupportsLearningRate, total_iters: int = 5, power: float = 1.0
    ) -> None:
        super().__init__(optimizer)
        self._configure(total_iters=total_iters, power=power)
        self._restart()

    def _configure(self, *, total_iters: int, power: float) -> None:
        total_iters = _check_total_iters(
            total_iters, "PolynomialLR never decays on step(), and its closed form divides "
                         "by zero")
        power = _check_real("power", power, ge=0.0)
        self.total_iters, self.power = total_iters, power

    def _lr_at(self, t: int) -> float:
        n = self.total_iters
        return self.base_lr * (1.0 - min(n, t) / n) ** self.power
