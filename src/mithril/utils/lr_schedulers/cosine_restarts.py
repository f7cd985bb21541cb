"""Keras's cosine decay with restarts: :class:`CosineDecayRestarts`."""

from __future__ import annotations

import math
import numbers

from .base import LRScheduler, SupportsLearningRate, _check_real

__all__ = ["CosineDecayRestarts"]


class CosineDecayRestarts(LRScheduler):
    """Cosine decay with warm restarts (SGDR), longer and lower cycles: Keras's
    ``CosineDecayRestarts(initial_learning_rate=base, first_decay_steps, t_mul, m_mul,
    alpha)``.

    Cycle ``i = 0, 1, ...`` lasts ``first_decay_steps * t_mul**i`` steps (real numbers: a cycle
    may end between two steps) and peaks at ``base * m_mul**i``; inside it, at the fraction
    ``f`` of the cycle,

    .. math:: \\eta_t = \\eta_{base} \\left((1 - \\alpha)\\, m_{mul}^i \\,
              \\tfrac12 (1 + \\cos(\\pi f)) + \\alpha\\right)

    (``alpha`` is the floor as a fraction of ``base``; it is *not* scaled by ``m_mul``). The
    arithmetic is Keras's. Keras finds the cycle with ``floor(log(1 - c (1 - t_mul)) /
    log(t_mul))``, which rounding can put one cycle off at a restart; here the cycle is then
    corrected to the one whose start is ``<= t`` (in the tests, on 300 steps in float64, Keras
    and this agree everywhere). Unlike :class:`CosineAnnealingWarmRestarts` (PyTorch), the
    multipliers may be real and the peaks may shrink.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        first_decay_steps: length of the first cycle, real ``> 0``.
        t_mul: cycle-length multiplier, real ``>= 1``.
        m_mul: peak multiplier per cycle, ``>= 0``.
        alpha: floor as a fraction of the base learning rate, ``>= 0``.
    """

    _HPARAMS = ("first_decay_steps", "t_mul", "m_mul", "alpha")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        first_decay_steps: float,
        t_mul: float = 2.0,
        m_mul: float = 1.0,
        alpha: float = 0.0,
    ) -> None:
        super().__init__(optimizer)
        self._configure(first_decay_steps=first_decay_steps, t_mul=t_mul, m_mul=m_mul,
                        alpha=alpha)
        self._restart()

    def _configure(self, *, first_decay_steps: float, t_mul: float, m_mul: float,
                   alpha: float) -> None:
        first = _check_real("first_decay_steps", first_decay_steps, gt=0.0)
        if isinstance(first_decay_steps, numbers.Integral):
            first = int(first_decay_steps)
        t_mul = _check_real("t_mul", t_mul, ge=1.0)
        m_mul = _check_real("m_mul", m_mul, ge=0.0)
        alpha = _check_real("alpha", alpha, ge=0.0)
        self.first_decay_steps, self.t_mul, self.m_mul, self.alpha = first, t_mul, m_mul, alpha

    def cycle_position(self, t: int) -> tuple[int, float]:
        """``(i, f)``: the cycle of step ``t`` and the fraction of it completed."""
        cf = t / self.first_decay_steps
        q = self.t_mul
        if q == 1.0:
            i = math.floor(cf)
            return i, cf - i
        i = math.floor(math.log(1.0 - cf * (1.0 - q)) / math.log(q))

        def start(k: int) -> float:  # Keras's sum_r: cycle k starts at cf = start(k)
            return (1.0 - q**k) / (1.0 - q)

        while start(i + 1) <= cf:  # correct the rounding of the logarithm at a restart
            i += 1
        while i > 0 and start(i) > cf:
            i -= 1
        return i, (cf - start(i)) / q**i

    def _lr_at(self, t: int) -> float:
        i, frac = self.cycle_position(t)
        m_fac = self.m_mul**i
        cosine_decayed = 0.5 * m_fac * (1.0 + math.cos(math.pi * frac))
        decayed = (1 - self.alpha) * cosine_decayed + self.alpha
        return self.base_lr * decayed
