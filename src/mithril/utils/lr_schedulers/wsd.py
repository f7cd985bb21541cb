"""Warmup-stable-decay: :class:`WSD`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from .base import LRScheduler, SupportsLearningRate, _check_choice, _check_int, _check_real

__all__ = ["WSD"]

_DECAYS = ("linear", "cosine", "1-sqrt")


class WSD(LRScheduler):
    """Warmup-stable-decay ("trapezoidal") schedule: a warm-up to the base learning rate, a
    constant phase, then a decay to ``final_lr``.

    With ``W = warmup_steps``, ``S = stable_steps``, ``D = decay_steps`` and ``p = (t - W - S) /
    D`` during the decay:

    .. math::
        \\eta_t = \\begin{cases}
            \\text{start\\_lr} + (\\eta_{base} - \\text{start\\_lr})\\, w(t / W) & t < W \\\\
            \\eta_{base} & W \\le t < W + S \\\\
            \\text{final\\_lr} + (\\eta_{base} - \\text{final\\_lr})\\, d(p)
                & W + S \\le t < W + S + D \\\\
            \\text{final\\_lr} & t \\ge W + S + D
        \\end{cases}

    with ``d(p) = 1 - p`` (``'linear'``), ``(1 + cos(pi p)) / 2`` (``'cosine'``) or
    ``1 - sqrt(p)`` (``'1-sqrt'``, the cool-down of Hägele et al., 2024, "Scaling Laws and
    Compute-Optimal Training Beyond Fixed Training Durations"; WSD itself: Hu et al., 2024,
    MiniCPM), raised to the power ``exponent`` (1 by default: optax's ``cosine_decay_schedule``
    has it for the cosine; ``'linear'`` with it is a polynomial decay). The warm-up's shape
    ``w(q)`` is ``q`` (``warmup_type='linear'``, the default), ``(1 - cos(pi q)) / 2``
    (``'cosine'``) or ``1 - sqrt(1 - q)`` (``'1-sqrt'``): the warm-ups of Hugging Face's
    ``get_wsd_schedule``.

    Hugging Face's ``get_wsd_schedule(opt, W, D, num_stable_steps=S, warmup_type=wt,
    decay_type=dt, min_lr_ratio=m)`` (``num_cycles`` left at 0.5) is ``WSD(opt, W, S, D,
    m * base, m * base, dt, warmup_type=wt)``; its ``get_linear_schedule_with_warmup(opt, W,
    T)`` is ``WSD(opt, W, 0, T - W)`` and ``get_cosine_schedule_with_warmup(opt, W, T)`` is
    ``WSD(opt, W, 0, T - W, decay_type='cosine')`` up to step ``T`` (past it Hugging Face's
    cosine rises again, as torch's ``CosineAnnealingLR`` does: ``SequentialLR(opt, [WSD(opt,
    W, 0, 0), CosineAnnealingLR(opt, T - W)], [W])`` follows it there too).

    optax 0.2 has no WSD schedule; the ``'linear'`` and ``'cosine'`` variants equal
    ``optax.join_schedules([linear_schedule(start_lr, base, W), constant_schedule(base),
    linear_schedule(base, final_lr, D)  # or cosine_decay_schedule(base, D, final_lr / base,
    exponent)], [W, W + S])``, and ``warmup_cosine_decay_schedule(init_value, peak_value, W,
    decay_steps, end_value, exponent)`` is ``WSD(opt, W, 0, decay_steps - W, init_value,
    end_value, 'cosine', exponent)`` on an optimizer at ``peak_value``. Keras's
    ``CosineDecay(initial, D, alpha, warmup_target, W)`` is the ``'cosine'`` one with
    ``S = 0``, ``start_lr=initial``, ``final_lr=alpha·warmup_target`` on an optimizer whose
    learning rate is ``warmup_target`` (without a warm-up: ``W = 0``, the rate ``initial``,
    ``final_lr=alpha·initial``).

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate`` (its learning rate
            is the peak).
        warmup_steps: integer ``>= 0``.
        stable_steps: integer ``>= 0``.
        decay_steps: integer ``>= 0``.
        start_lr: learning rate at step 0 (when ``warmup_steps > 0``), ``>= 0``.
        final_lr: learning rate at the end of the decay and after, ``>= 0``.
        decay_type: ``'linear'``, ``'cosine'`` or ``'1-sqrt'``.
        exponent: the power of the decay's shape ``d(p)``, real ``>= 0``.
        warmup_type: ``'linear'``, ``'cosine'`` or ``'1-sqrt'``: the warm-up's shape ``w``.
    """

    _HPARAMS = ("warmup_steps", "stable_steps", "decay_steps", "start_lr", "final_lr",
                "decay_type", "exponent", "warmup_type")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        warmup_steps: int,
        stable_steps: int,
        decay_steps: int,
        start_lr: float = 0.0,
        final_lr: float = 0.0,
        decay_type: Literal["linear", "cosine", "1-sqrt"] = "linear",
        exponent: float = 1.0,
        warmup_type: Literal["linear", "cosine", "1-sqrt"] = "linear",
    ) -> None:
        super().__init__(optimizer)
        self._configure(
            warmup_steps=warmup_steps,
            stable_steps=stable_steps,
            decay_steps=decay_steps,
            start_lr=start_lr,
            final_lr=final_lr,
            decay_type=decay_type,
            exponent=exponent,
            warmup_type=warmup_type,
        )
        self._restart()

    def _configure(
        self,
        *,
        warmup_steps: int,
        stable_steps: int,
        decay_steps: int,
        start_lr: float,
        final_lr: float,
        decay_type: str,
        exponent: float,
        warmup_type: str = "linear",
    ) -> None:
        w = _check_int("warmup_steps", warmup_steps, minimum=0)
        s = _check_int("stable_steps", stable_steps, minimum=0)
        d = _check_int("decay_steps", decay_steps, minimum=0)
        start_lr = _check_real("start_lr", start_lr, ge=0.0)
        final_lr = _check_real("final_lr", final_lr, ge=0.0)
        decay_type = _check_choice("decay_type", decay_type, _DECAYS)
        exponent = _check_real("exponent", exponent, ge=0.0)
        warmup_type = _check_choice("warmup_type", warmup_type, _DECAYS)
        self.warmup_steps, self.stable_steps, self.decay_steps = w, s, d
        self.start_lr, self.final_lr, self.decay_type = start_lr, final_lr, decay_type
        self.exponent, self.warmup_type = exponent, warmup_type

    def _load_checked(self, state: Mapping[str, Any]) -> None:
        if isinstance(state, Mapping):  # saved before these existed: their defaults
            state = {"exponent": 1.0, "warmup_type": "linear", **state}
        super()._load_checked(state)

    @property
    def total_steps(self) -> int:
        """``warmup_steps + stable_steps + decay_steps``: the first step at ``final_lr``."""
        return self.warmup_steps + self.stable_steps + self.decay_steps

    def _lr_at(self, t: int) -> float:
        base = self.base_lr
        if t < self.warmup_steps:
            q = t / self.warmup_steps
            if self.warmup_type == "cosine":
                q = 0.5 * (1.0 - math.cos(math.pi * q))
            elif self.warmup_type == "1-sqrt":
                q = 1.0 - math.sqrt(1.0 - q)
            else:  # (the linear rates stay bit for bit those of (base - start) * t / W)
                return self.start_lr + (base - self.start_lr) * t / self.warmup_steps
            return self.start_lr + (base - self.start_lr) * q
        t -= self.warmup_steps
        if t < self.stable_steps:
            return base
        t -= self.stable_steps
        if t >= self.decay_steps:
            return self.final_lr
        p = t / self.decay_steps
        if self.decay_type == "linear":
            d = 1.0 - p
        elif self.decay_type == "cosine":
            d = 0.5 * (1.0 + math.cos(math.pi * p))
        else:
            d = 1.0 - math.sqrt(p)
        if self.exponent != 1.0:  # (d ** 1 is d: the rates without it stay bit for bit)
            d = d**self.exponent
        return self.final_lr + (base - self.final_lr) * d
