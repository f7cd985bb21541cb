"""Cosine annealing: :class:`CosineAnnealingLR` and :class:`CosineAnnealingWarmRestarts`."""

from __future__ import annotations

import math
import numbers

from .base import LRScheduler, SupportsLearningRate, _check_int, _check_real, _check_step

__all__ = ["CosineAnnealingLR", "CosineAnnealingWarmRestarts"]


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing, optionally with warm restarts (SGDR).

    Without restarts (``warm_restarts=False``, the default):

    .. math::
        \\eta_t = \\eta_{min} + \\tfrac12 (\\eta_{base} - \\eta_{min})
                  \\left(1 + \\cos\\left(\\pi \\frac{t}{T_{max}}\\right)\\right)

    for *all* ``t >= 0``. Past ``T_max`` this keeps following the cosine: the rate rises back to
    ``base_lr`` at ``t = 2 T_max`` and is periodic with period ``2 T_max``. This is exactly what
    PyTorch's recursive ``CosineAnnealingLR`` produces (its special case at
    ``(t - 1 - T_max) % (2 T_max) == 0`` exists precisely to continue the cosine through the
    minimum); the two agree to about ``1e-13`` relative (verified numerically in the tests).
    optax's and Keras's ``CosineDecay`` stay at the minimum instead: that is :class:`WSD`
    with ``decay_type="cosine"``.
    For a non-integer ``T_max`` within ~1e-7 of an integer (with ``eta_min > 0``), PyTorch's
    recursion is ill-conditioned (relative drift up to ~1e-4, or a ``ZeroDivisionError``);
    ours stays the closed form, equal to PyTorch's ``_get_closed_form_lr``.

    With ``warm_restarts=True`` the schedule matches PyTorch's
    ``CosineAnnealingWarmRestarts(T_0=T_max, T_mult, eta_min)`` exactly:

    .. math::
        \\eta_t = \\eta_{min} + \\tfrac12 (\\eta_{base} - \\eta_{min})
                  \\left(1 + \\cos\\left(\\pi \\frac{T_{cur}}{T_i}\\right)\\right)

    where the first cycle has length ``T_i = T_max``, each later cycle is ``T_mult`` times
    longer, and ``T_cur`` is the number of steps since the last restart.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        T_max: half-period (no restarts; real ``> 0``) or first cycle length (restarts;
            integer ``>= 1``).
        eta_min: minimum learning rate, ``>= 0``.
        warm_restarts: restart the cosine at ``base_lr`` at the end of every cycle.
        T_mult: cycle-length multiplier (integer ``>= 1``; ``None`` means 1). Values other than 1
            require ``warm_restarts=True``.
    """

    _HPARAMS = ("T_max", "eta_min", "warm_restarts", "T_mult")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        T_max: float,
        eta_min: float = 0.0,
        warm_restarts: bool = False,
        T_mult: int | None = 1,
    ) -> None:
        super().__init__(optimizer)
        self._configure(T_max=T_max, eta_min=eta_min, warm_restarts=warm_restarts, T_mult=T_mult)
        self._restart()

    def _configure(
        self, *, T_max: float, eta_min: float, warm_restarts: bool, T_mult: int | None
    ) -> None:
        if not isinstance(warm_restarts, bool):
            raise ValueError(f"warm_restarts must be a bool, got {warm_restarts!r}")
        t_mult = 1 if T_mult is None else _check_int("T_mult", T_mult, minimum=1)
        if warm_restarts:
            t_max: float = _check_int("T_max", T_max, minimum=1)
        else:
            t_max = _check_real("T_max", T_max, gt=0.0)
            if isinstance(T_max, numbers.Integral):
                t_max = int(T_max)
            if t_mult != 1:
                raise ValueError(f"T_mult={t_mult} requires warm_restarts=True")
        eta = _check_real("eta_min", eta_min, ge=0.0)
        self.T_max, self.eta_min, self.warm_restarts, self.T_mult = (
            t_max,
            eta,
            warm_restarts,
            t_mult,
        )

    def cycle_position(self, t: int) -> tuple[int, int]:
        """``(T_cur, T_i)`` of step ``t`` for the warm-restart schedule."""
        t = _check_step(t)
        t_i = int(self.T_max)
        if self.T_mult == 1:
            return t % t_i, t_i
        start = 0
        while t - start >= t_i:
            start += t_i
            t_i *= self.T_mult
        return t - start, t_i

    def _lr_at(self, t: int) -> float:
        if self.warm_restarts:
            t_cur, t_i = self.cycle_position(t)
            # same evaluation order as torch's CosineAnnealingWarmRestarts.get_lr
            return (
                self.eta_min
                + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2
            )
        phase = math.pi * t / self.T_max
        if not math.isfinite(phase):  # a tiny T_max: math.cos(inf) would be a domain error
            raise ValueError(f"{type(self).__name__}: step {t} / T_max={self.T_max} overflows")
        # same evaluation order as torch's CosineAnnealingLR._get_closed_form_lr
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(phase)) / 2


class CosineAnnealingWarmRestarts(CosineAnnealingLR):
    """PyTorch-compatible spelling of ``CosineAnnealingLR(..., warm_restarts=True)``.

    .. math::
        \\eta_t = \\eta_{min} + \\tfrac12 (\\eta_{base} - \\eta_{min})
                  \\left(1 + \\cos\\left(\\pi \\frac{T_{cur}}{T_i}\\right)\\right),
        \\quad T_0 = \\text{T\\_0},\\ T_{i+1} = \\text{T\\_mult} \\cdot T_i

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        T_0: length of the first cycle, integer ``>= 1``.
        T_mult: cycle-length multiplier, integer ``>= 1``.
        eta_min: minimum learning rate, ``>= 0``.
    """

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        T_0: int,
        T_mult: int = 1,
        eta_min: float = 0.0,
    ) -> None:
        super().__init__(optimizer, T_max=T_0, eta_min=eta_min, warm_restarts=True, T_mult=T_mult)

    def _configure(
        self, *, T_max: float, eta_min: float, warm_restarts: bool, T_mult: int | None
    ) -> None:
        if warm_restarts is not True:
            raise ValueError("CosineAnnealingWarmRestarts requires warm_restarts=True")
        try:
            super()._configure(T_max=T_max, eta_min=eta_min, warm_restarts=True, T_mult=T_mult)
        except ValueError as exc:  # report torch's parameter name
            raise ValueError(str(exc).replace("T_max", "T_0")) from None

    @property
    def T_0(self) -> int:
        """Length of the first cycle (alias of ``T_max``; setting it sets that)."""
        return int(self.T_max)

    @T_0.setter
    def T_0(self, value: int) -> None:
        self.T_max = value
