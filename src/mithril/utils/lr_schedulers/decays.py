"""The decay schedules of optax and Keras: :class:`ExponentialDecay`, :class:`PolynomialDecay`
and :class:`InverseTimeDecay`.

Each takes the optimizer's learning rate as optax's ``init_value`` / Keras's
``initial_learning_rate``, and step ``t`` is optax's ``count`` and Keras's ``iterations``:
the update a scheduler stepped after each update drives is the one the peer's schedule
drives at that count (both evaluate it before incrementing, the first update at 0).

Where a peer turns a degenerate setting into a constant schedule or a non-finite or negative
rate (optax's ``transition_steps <= 0``, ``decay_rate == 0`` or a negative
``transition_begin``; Keras's ``ExponentialDecay`` with ``decay_rate == 0``, which drops to 0
after step 0; negative decay rates in both), these raise a :class:`ValueError` naming the
argument instead. Step counts (``transition_begin``) are
integers; ``transition_steps`` / ``decay_steps`` may be any real ``> 0``, as both peers allow.
"""

from __future__ import annotations

import math

from .base import LRScheduler, SupportsLearningRate, _check_int, _check_real

__all__ = ["ExponentialDecay", "InverseTimeDecay", "PolynomialDecay"]


class ExponentialDecay(LRScheduler):
    """Exponential decay after an optional delay, clamped at ``end_value``: optax's
    ``exponential_decay`` and Keras's ``ExponentialDecay``.

    With ``T = transition_steps``, ``r = decay_rate`` and ``b = transition_begin``:

    .. math::
        \\eta_t = \\operatorname{clamp}\\bigl(\\eta_{base} \\, r^{p}\\bigr), \\quad
        p = \\frac{t - b}{T} \\ \\text{(} \\lfloor\\cdot\\rfloor \\text{ if staircase)}
        \\text{ for } t > b, \\quad \\eta_t = \\operatorname{clamp}(\\eta_{base})
        \\text{ for } t \\le b

    where ``clamp`` is ``max(·, end_value)`` when ``r < 1`` and ``min(·, end_value)`` when
    ``r >= 1`` (optax's rule, applied at every step, the delay included), nothing when
    ``end_value`` is ``None``.

    * optax: ``exponential_decay(init_value=base, transition_steps, decay_rate,
      transition_begin, staircase, end_value)``, exactly;
    * Keras: ``ExponentialDecay(initial_learning_rate=base, decay_steps, decay_rate,
      staircase)`` is ``ExponentialDecay(opt, decay_steps, decay_rate, staircase=staircase)``.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        transition_steps: real ``> 0`` (Keras's ``decay_steps``).
        decay_rate: real ``> 0``; above 1 the rate grows.
        transition_begin: integer ``>= 0``: the rate stays at the base until then.
        staircase: decay in whole steps of ``transition_steps``.
        end_value: ``None`` or a real ``>= 0``: a floor when ``decay_rate < 1``, else a ceiling.
    """

    _HPARAMS = ("transition_steps", "decay_rate", "transition_begin", "staircase", "end_value")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        transition_steps: float,
        decay_rate: float,
        transition_begin: int = 0,
        staircase: bool = False,
        end_value: float | None = None,
    ) -> None:
        super().__init__(optimizer)
        self._configure(transition_steps=transition_steps, decay_rate=decay_rate,
                        transition_begin=transition_begin, staircase=staircase,
                        end_value=end_value)
        self._restart()

    def _configure(self, *, transition_steps: float, decay_rate: float, transition_begin: int,
                   staircase: bool, end_value: float | None) -> None:
        steps = _check_real("transition_steps", transition_steps, gt=0.0)
        rate = _check_real("decay_rate", decay_rate, gt=0.0)
        begin = _check_int("transition_begin", transition_begin, minimum=0)
        staircase = _check_flag("staircase", staircase)
        if end_value is not None:
            end_value = _check_real("end_value", end_value, ge=0.0)
        self.transition_steps, self.decay_rate, self.transition_begin = steps, rate, begin
        self.staircase, self.end_value = staircase, end_value

    def _lr_at(self, t: int) -> float:
        lr = self.base_lr
        if t > self.transition_begin:
            p = (t - self.transition_begin) / self.transition_steps
            if self.staircase:
                p = math.floor(p)
            try:
                lr = lr * self.decay_rate**p
            except OverflowError:  # r > 1 far out: inf, which a ceiling brings back
                lr = math.inf
        end = self.end_value
        if end is None:
            return lr
        return max(lr, end) if self.decay_rate < 1.0 else min(lr, end)


class PolynomialDecay(LRScheduler):
    """Polynomial decay from the base learning rate to ``end_value``, after an optional
    delay, optionally restarted (longer each time): optax's ``polynomial_schedule`` /
    ``linear_schedule`` and Keras's ``PolynomialDecay``.

    With ``T = transition_steps``, ``b = transition_begin`` and ``s = max(t - b, 0)``:

    .. math::
        \\eta_t = (\\eta_{base} - \\text{end\\_value})\\,(1 - s / T_s)^{\\text{power}}
            + \\text{end\\_value}

    where, without ``cycle``, ``s`` is first clipped to ``T`` and ``T_s = T`` (the rate stays
    at ``end_value`` from ``t = b + T``); with ``cycle`` (Keras), ``T_s = T·ceil(s / T)``
    (``T`` at ``s = 0``): the decay starts again from the base after each multiple of ``T``,
    stretched to the next multiple. ``end_value`` may exceed the base (a linear warm-up).

    * optax: ``polynomial_schedule(init_value=base, end_value, power, transition_steps,
      transition_begin)``; ``linear_schedule`` is ``power=1``; ``warmup_constant_schedule(
      init_value, peak_value, warmup_steps)`` is ``PolynomialDecay(opt, warmup_steps,
      peak_value)`` on an optimizer at ``init_value``;
    * Keras: ``PolynomialDecay(initial_learning_rate=base, decay_steps, end_learning_rate,
      power, cycle)``. Keras's ``end_learning_rate`` defaults to ``1e-4``; here
      ``end_value`` has no default (optax's has none either): pass it.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        transition_steps: real ``> 0`` (Keras's ``decay_steps``).
        end_value: the learning rate at the end of the decay, ``>= 0``.
        power: real ``>= 0`` (1: linear).
        transition_begin: integer ``>= 0``: the rate stays at the base until then.
        cycle: restart the decay after every ``transition_steps`` (Keras's ``cycle``).
    """

    _HPARAMS = ("transition_steps", "end_value", "power", "transition_begin", "cycle")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        transition_steps: float,
        end_value: float,
        power: float = 1.0,
        transition_begin: int = 0,
        cycle: bool = False,
    ) -> None:
        super().__init__(optimizer)
        self._configure(transition_steps=transition_steps, end_value=end_value, power=power,
                        transition_begin=transition_begin, cycle=cycle)
        self._restart()

    def _configure(self, *, transition_steps: float, end_value: float, power: float,
                   transition_begin: int, cycle: bool) -> None:
        steps = _check_real("transition_steps", transition_steps, gt=0.0)
        end_value = _check_real("end_value", end_value, ge=0.0)
        power = _check_real("power", power, ge=0.0)
        begin = _check_int("transition_begin", transition_begin, minimum=0)
        cycle = _check_flag("cycle", cycle)
        self.transition_steps, self.end_value, self.power = steps, end_value, power
        self.transition_begin, self.cycle = begin, cycle

    def _lr_at(self, t: int) -> float:
        s = max(t - self.transition_begin, 0)
        steps = self.transition_steps
        if self.cycle:
            steps = steps * (1 if s == 0 else math.ceil(s / steps))
        else:
            s = min(s, steps)
        return (self.base_lr - self.end_value) * (1 - s / steps) ** self.power + self.end_value


class InverseTimeDecay(LRScheduler):
    """Inverse-time decay: Keras's ``InverseTimeDecay``.

    .. math::
        \\eta_t = \\frac{\\eta_{base}}{1 + r\\, p}, \\quad p = t / T \\
        \\text{(} \\lfloor\\cdot\\rfloor \\text{ if staircase)}

    with ``T = decay_steps`` and ``r = decay_rate``: Keras's ``InverseTimeDecay(
    initial_learning_rate=base, decay_steps, decay_rate, staircase)``, exactly (Keras accepts
    a negative ``decay_rate``, which gives negative or infinite rates; here it raises).

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        decay_steps: real ``> 0``.
        decay_rate: real ``>= 0``.
        staircase: decay in whole steps of ``decay_steps``.
    """

    _HPARAMS = ("decay_steps", "decay_rate", "staircase")

    def __init__(self, optimizer: SupportsLearningRate, decay_steps: float, decay_rate: float,
                 staircase: bool = False) -> None:
        super().__init__(optimizer)
        self._configure(decay_steps=decay_steps, decay_rate=decay_rate, staircase=staircase)
        self._restart()

    def _configure(self, *, decay_steps: float, decay_rate: float, staircase: bool) -> None:
        steps = _check_real("decay_steps", decay_steps, gt=0.0)
        rate = _check_real("decay_rate", decay_rate, ge=0.0)
        staircase = _check_flag("staircase", staircase)
        self.decay_steps, self.decay_rate, self.staircase = steps, rate, staircase

    def _lr_at(self, t: int) -> float:
        p = t / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.base_lr / (1 + self.decay_rate * p)


def _check_flag(name: str, value: object) -> bool:
    """A ``bool`` (``ValueError`` naming ``name`` otherwise: ``"False"`` would be true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
