"""The 1cycle policy: :class:`OneCycleLR`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from .base import (
    LRScheduler,
    SupportsLearningRate,
    _check_choice,
    _check_int,
    _check_real,
)
from .momentum import MomentumCycle

__all__ = ["OneCycleLR"]


class OneCycleLR(MomentumCycle, LRScheduler):
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
    extrapolates the last phase) and any later step raises :class:`ValueError`. Unlike
    PyTorch, ``'linear'`` holds the last phase's end value there (``min_lr``; the momentum
    ``max_momentum``): its extrapolation passes ``min_lr``, to a negative rate with the
    default ``final_div_factor``, which PyTorch sets (a loop that steps the scheduler after
    each of its ``total_steps`` batches never uses it) and an optimizer here refuses.

    Like PyTorch, the optimizer is set to ``initial_lr`` at construction and ``base_lr`` is set
    to ``initial_lr`` (the optimizer's previous learning rate is irrelevant). A phase may have
    no steps, as in PyTorch: ``pct_start = 0`` (or ``pct_start * total_steps < 1``) starts
    part-way down the anneal from ``max_lr``, never reached; ``pct_start = 1`` with
    ``three_phase`` ends on the way back down. Where a step ``0 .. total_steps`` falls in a
    phase of length 0, PyTorch divides by zero (``pct_start * total_steps = 1``; two-phase
    ``pct_start = 1`` at step ``total_steps``), and this raises :class:`ValueError`.

    ``cycle_momentum=True`` cycles the momentum inversely to the rate, as PyTorch: annealed
    (same strategy, same phases) from ``max_momentum`` down to ``base_momentum`` while the
    rate rises, back up while it falls (three-phase: up in the second phase, then flat). It
    drives the optimizer's ``momentum`` if it has one (SGD, RMSProp), else its ``beta1`` (the
    Adam family: torch's ``betas[0]``); an optimizer with neither raises :class:`ValueError`,
    as in PyTorch, and so does one whose momentum is 0 (a momentum buffer would have to
    appear: build it with momentum > 0). The momentum is a per-step scalar of the fused
    kernel: changing it every step never recompiles. The default is ``False`` (PyTorch's is
    ``True``), as before momentum cycling existed here.

    Per parameter group (``per_group=True``, or a list for ``max_lr``, ``base_momentum`` or
    ``max_momentum`` with one entry for the optimizer's own parameters, then one per
    ``param_groups[i]``): every group gets its own cycle, equal to PyTorch's on the same
    groups. Without it, the optimizer's rate follows the cycle and the groups follow in
    proportion (their ``lr_scale``), and the momentum cycled is the optimizer's (a group that
    sets its own momentum keeps it).

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        max_lr: peak learning rate, ``>= 0`` (0: the rate held at 0, as torch's).
        total_steps: number of steps in the cycle, integer ``>= 1``; or, as PyTorch,
            ``epochs`` and ``steps_per_epoch``, whose product it then is (the arguments in
            PyTorch's order, positional ones included).
        pct_start: fraction of the cycle spent increasing the rate, in ``[0, 1]``.
        anneal_strategy: ``'cos'`` or ``'linear'``.
        cycle_momentum: cycle the optimizer's momentum (or beta1) inversely to the rate.
        base_momentum: lowest momentum of the cycle (at the peak rate); default 0.85.
        max_momentum: highest momentum of the cycle (at the start and end); default 0.95.
        div_factor: ``initial_lr = max_lr / div_factor``, ``> 0``.
        final_div_factor: ``min_lr = initial_lr / final_div_factor``, ``> 0``.
        three_phase: use the symmetric three-phase variant.
        per_group: act on every parameter group with its own values (see above).
    """

    _GROUP_ARGS = ("max_lr", "base_momentum", "max_momentum")

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
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        cycle_momentum: bool = False,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
    ) -> None:
        # (torch's order: OneCycleLR(opt, 0.1, None, 10, 100) is 10 epochs of 100 steps)
        total_steps = _total_steps(total_steps, epochs, steps_per_epoch)
        super().__init__(optimizer)
        self._init_momentum(optimizer, cycle_momentum, base_momentum, max_momentum)
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
        max_lr = _check_real("max_lr", max_lr, ge=0.0)  # 0: a frozen group, as torch's
        total_steps = _check_int("total_steps", total_steps, minimum=1)
        pct_start = _check_real("pct_start", pct_start, ge=0.0, le=1.0)
        anneal_strategy = _check_choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        div_factor = _check_real("div_factor", div_factor, gt=0.0)
        final_div_factor = _check_real("final_div_factor", final_div_factor, gt=0.0)
        if not isinstance(three_phase, bool):
            raise ValueError(f"three_phase must be a bool, got {three_phase!r}")

        initial_lr = max_lr / div_factor
        min_lr = initial_lr / final_div_factor
        if not (math.isfinite(initial_lr) and math.isfinite(min_lr)):
            raise ValueError(
                f"max_lr={max_lr}, div_factor={div_factor} and final_div_factor="
                f"{final_div_factor} give initial_lr={initial_lr} and min_lr={min_lr}; both "
                f"must be finite"
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
        # why: torch's phases as they are, one of no steps included (pct_start 0 or 1); a
        # step 0..total_steps landing in a phase of length 0 is refused: torch divides by
        # zero there (in one of negative length, only step total_steps, torch runs it back)
        start, before, last = 0.0, -math.inf, len(phases) - 1
        for i, (end, _, _) in enumerate(phases):
            first = 0 if i == 0 else max(0, math.floor(before) + 1)  # its first step
            if end == start and first <= (total_steps if i == last else min(end, total_steps)):
                raise ValueError(
                    f"pct_start={pct_start} and total_steps={total_steps} give phase {i} a "
                    f"length of 0 steps (from step {start} to {end}) and step {first} falls "
                    f"in it: torch's OneCycleLR divides by zero there; change pct_start or "
                    f"total_steps")
            start, before = end, max(before, end)

        self.max_lr, self.total_steps, self.pct_start = max_lr, total_steps, pct_start
        self.anneal_strategy, self.div_factor = anneal_strategy, div_factor
        self.final_div_factor, self.three_phase = final_div_factor, three_phase
        self.initial_lr, self.min_lr = initial_lr, min_lr
        self._phases = phases

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            cos_out = math.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        # (past the end, pct > 1: held at the end, see the class doc)
        return (end - start) * min(pct, 1.0) + start

    def _phase(self, t: int) -> tuple[int, float]:
        """The phase of step ``t`` and the fraction of it done (torch's arithmetic)."""
        if t > self.total_steps:
            raise ValueError(
                f"Tried to step {t} times. The specified number of total steps is "
                f"{self.total_steps}"
            )
        start_step = 0.0
        last = len(self._phases) - 1
        for i, (end_step, _, _) in enumerate(self._phases):
            if t <= end_step or i == last:
                return i, (t - start_step) / (end_step - start_step)
            start_step = end_step
        raise AssertionError("unreachable")  # pragma: no cover

    def _lr_at(self, t: int) -> float:
        i, pct = self._phase(t)
        _, start_lr, end_lr = self._phases[i]
        return self._anneal(start_lr, end_lr, pct)

    def _momentum_at(self, t: int) -> float:
        i, pct = self._phase(t)
        low, high = self.base_momentum, self.max_momentum
        if self.three_phase:
            start, end = ((high, low), (low, high), (high, high))[i]
        else:
            start, end = ((high, low), (low, high))[i]
        return self._anneal(start, end, pct)

    def _extra_state(self) -> dict[str, Any]:
        return self._momentum_state()

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        self._load_momentum(state)

    def _rebase(self, lr: float) -> None:
        """No-op: the one-cycle schedule is defined by ``max_lr``, not by ``base_lr``."""


def _total_steps(total_steps: int | None, epochs: int | None,
                 steps_per_epoch: int | None) -> int:
    """``total_steps``, or PyTorch's ``epochs * steps_per_epoch`` (both given and
    disagreeing: refused, where PyTorch silently keeps ``total_steps``)."""
    if epochs is None and steps_per_epoch is None:
        if total_steps is None:
            raise ValueError("OneCycleLR needs total_steps, or epochs and steps_per_epoch")
        return total_steps
    if epochs is None or steps_per_epoch is None:
        raise ValueError("OneCycleLR: give epochs and steps_per_epoch together (or total_steps)")
    n = _check_int("epochs", epochs, minimum=1) * _check_int("steps_per_epoch", steps_per_epoch,
                                                             minimum=1)
    if total_steps is not None and total_steps != n:
        raise ValueError(f"OneCycleLR: total_steps={total_steps} but epochs * steps_per_epoch "
                         f"= {n}; give one of the two")
    return n
