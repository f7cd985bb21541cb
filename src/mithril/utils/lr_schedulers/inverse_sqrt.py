"""Inverse square root decay with linear warm-up: :class:`InverseSqrt`."""

from __future__ import annotations

import math

from .base import LRScheduler, SupportsLearningRate, _check_int, _check_real

__all__ = ["InverseSqrt"]


class InverseSqrt(LRScheduler):
    """Linear warm-up, then decay proportional to ``1 / sqrt(step)`` ("Noam"/rsqrt schedule).

    With ``W = warmup_steps`` and ``tau = timescale`` (default ``W``):

    .. math::
        \\eta_t = \\begin{cases}
            \\text{start\\_lr} + (\\eta_{base} - \\text{start\\_lr})\\, t / W & t < W \\\\
            \\eta_{base} \\sqrt{\\tau / (t - W + \\tau)} & t \\ge W
        \\end{cases}

    With the default ``timescale`` the decay is ``base * sqrt(W / t)``, continuous at ``t = W``:

    * fairseq's ``inverse_sqrt`` (``warmup_init_lr = start_lr``, ``lr = base``,
      ``warmup_updates = W``);
    * the Transformer ("Noam") schedule ``d^-0.5 min(t^-0.5, t W^-1.5)``: ``start_lr = 0`` and
      ``base = (d W)^-0.5``;
    * T5's ``1 / sqrt(max(t, W))``: ``start_lr = base = W^-0.5`` (constant during the warm-up);
    * ``timescale`` is the parameter of Hugging Face's ``get_inverse_sqrt_schedule``
      (``base / sqrt((t + timescale - W) / timescale)``).

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate`` (its learning rate
            is the peak, reached at ``t = W``).
        warmup_steps: integer ``>= 0``.
        start_lr: learning rate at step 0 (when ``warmup_steps > 0``), ``>= 0``.
        timescale: real ``> 0``; ``None`` means ``warmup_steps`` (which must then be ``>= 1``).
    """

    _HPARAMS = ("warmup_steps", "start_lr", "timescale")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        warmup_steps: int,
        start_lr: float = 0.0,
        timescale: float | None = None,
    ) -> None:
        super().__init__(optimizer)
        self._configure(warmup_steps=warmup_steps, start_lr=start_lr, timescale=timescale)
        self._restart()

    def _configure(self, *, warmup_steps: int, start_lr: float, timescale: float | None) -> None:
        w = _check_int("warmup_steps", warmup_steps, minimum=0)
        start_lr = _check_real("start_lr", start_lr, ge=0.0)
        if timescale is None:
            if w == 0:
                raise ValueError("timescale must be given (> 0) when warmup_steps is 0 (it "
                                 "defaults to warmup_steps)")
        else:
            timescale = _check_real("timescale", timescale, gt=0.0)
        self.warmup_steps, self.start_lr, self.timescale = w, start_lr, timescale

    def _lr_at(self, t: int) -> float:
        w = self.warmup_steps
        if t < w:
            return self.start_lr + (self.base_lr - self.start_lr) * t / w
        tau = w if self.timescale is None else self.timescale
        return self.base_lr * math.sqrt(tau / (t - w + tau))
