"""The 1cycle policy: :class:`OneCycleLR`."""

from __future__ import annotations

import math
from typing import Literal

from .base import LRScheduler, SupportsLearningRate, _check_choice, _check_int, _check_real

__all__ = ["OneCycleLR"]


class OneCycleLR(LRScheduler):
    """The 1cycle policy, with learning-rate values identical to PyTorch's ``OneCycleLR``.

    With ``initial_lr = max_lr / div_factor`` and ``min_lr = initial_lr / final_div_factor``,
    the schedule is piecewise annealed between phase boundaries (PyTorch's, including the
    ``- 1`` offsets; the rate peaks at step ``pct_start * total_steps - 1``):

    * two phases: ``initial_lr -> max_lr`` on ``[0, pct_start*total_steps - 1]``, then
      ``max_lr -> min_lr`` until ``total_steps - 1``;
    * ``three_phase=True``: ``initial_lr -> max_lr -> initial_lr`` (the second phase ends at
      ``2*pct_start*total_steps - 2``), then ``initial_lr -> min_lr`` until ``total_steps - 1``.

    Inside a phase from step ``s`` to ``e`` with ``p = (t - s) / (e - s)``, the ``'cos'``
    strategy gives ``end + (start - end) / 2 * (cos(pi p) + 1)`` and ``'linear'`` gives
    ``(end - start) * p + start``. As in PyTorch, step ``total_steps`` is still allowed (it
    extrapolates the last phase) and any later step raises :class:`ValueError`.

    Like PyTorch, the optimizer is set to ``initial_lr`` at construction and ``base_lr`` is set
    to ``initial_lr`` (the optimizer's previous learning rate is irrelevant). Momentum is not
    cycled (the optimizer interface only exposes the learning rate). Unlike PyTorch,
    configurations with an empty or negative-length phase (e.g. ``pct_start * total_steps <=
    1``), which PyTorch turns into a division by zero or a schedule that never reaches
    ``max_lr``, raise :class:`ValueError`.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        max_lr: peak learning rate, ``> 0``.
        total_steps: number of steps in the cycle, integer ``>= 1``.
        pct_start: fraction of the cycle spent increasing the rate, in ``[0, 1]``.
        anneal_strategy: ``'cos'`` or ``'linear'``.
        div_factor: ``initial_lr = max_lr / div_factor``, ``> 0``.
        final_div_factor: ``min_lr = initial_lr / final_div_factor``, ``> 0``.
        three_phase: use the symmetric three-phase variant.
    """

    _HPARAMS = (
        "max_lr",
        "total_steps",
        "pct_start",
        "anneal_strategy",
        "div_factor",
        "final_div_factor",
        "three_phase",
    )

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        max_lr: float,
        total_steps: int,
        pct_start: float = 0.3,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
    ) -> None:
        super().__init__(optimizer)
        self._configure(
            max_lr=max_lr,
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy=anneal_strategy,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            three_phase=three_phase,
        )
        self.base_lr = self.initial_lr
        self._restart()

    def _configure(
        self,
        *,
        max_lr: float,
        total_steps: int,
        pct_start: float,
        anneal_strategy: str,
        div_factor: float,
        final_div_factor: float,
        three_phase: bool,
    ) -> None:
        max_lr = _check_real("max_lr", max_lr, gt=0.0)
        total_steps = _check_int("total_steps", total_steps, minimum=1)
        pct_start = _check_real("pct_start", pct_start, ge=0.0, le=1.0)
        anneal_strategy = _check_choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        div_factor = _check_real("div_factor", div_factor, gt=0.0)
        final_div_factor = _check_real("final_div_factor", final_div_factor, gt=0.0)
        if not isinstance(three_phase, bool):
            raise ValueError(f"three_phase must be a bool, got {three_phase!r}")

        initial_lr = max_lr / div_factor
        min_lr = initial_lr / final_div_factor
        if not (math.isfinite(initial_lr) and initial_lr > 0 and min_lr > 0):
            raise ValueError(
                f"max_lr={max_lr}, div_factor={div_factor} and final_div_factor="
                f"{final_div_factor} give initial_lr={initial_lr} and min_lr={min_lr}; both "
                f"must be finite and > 0"
            )
        # (end_step, start_lr, end_lr) with torch's exact arithmetic for the boundaries
        if three_phase:
            phases = [
                (float(pct_start * total_steps) - 1, initial_lr, max_lr),
                (float(2 * pct_start * total_steps) - 2, max_lr, initial_lr),
                (float(total_steps - 1), initial_lr, min_lr),
            ]
        else:
            phases = [
                (float(pct_start * total_steps) - 1, initial_lr, max_lr),
                (float(total_steps - 1), max_lr, min_lr),
            ]
        start = 0.0
        for i, (end, _, _) in enumerate(phases):
            if not end > start:
                raise ValueError(
                    f"pct_start={pct_start} and total_steps={total_steps} give an empty or "
                    f"negative-length phase {i} (from step {start} to {end}); increase "
                    f"total_steps or choose pct_start so that every phase lasts > 0 steps"
                )
            start = end

        self.max_lr, self.total_steps, self.pct_start = max_lr, total_steps, pct_start
        self.anneal_strategy, self.div_factor = anneal_strategy, div_factor
        self.final_div_factor, self.three_phase = final_div_factor, three_phase
        self.initial_lr, self.min_lr = initial_lr, min_lr
        self._phases = phases

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            cos_out = math.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        return (end - start) * pct + start

    def _lr_at(self, t: int) -> float:
        if t > self.total_steps:
            raise ValueError(
                f"Tried to step {t} times. The specified number of total steps is "
                f"{self.total_steps}"
            )
        start_step = 0.0
        last = len(self._phases) - 1
        for i, (end_step, start_lr, end_lr) in enumerate(self._phases):
            if t <= end_step or i == last:
                pct = (t - start_step) / (end_step - start_step)
                return self._anneal(start_lr, end_lr, pct)
            start_step = end_step
        raise AssertionError("unreachable")  # pragma: no cover

    def _rebase(self, lr: float) -> None:
        """No-op: the one-cycle schedule is defined by ``max_lr``, not by ``base_lr``."""
