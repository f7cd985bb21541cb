"""PyTorch's :class:`SWALR`: anneal to a constant learning rate for weight averaging (SWA)."""

from __future__ import annotations

import math

from .base import (
    LRScheduler,
    SupportsLearningRate,
    _check_choice,
    _check_int,
    _check_real,
    _check_step,
    _to_float,
)

__all__ = ["SWALR"]


class SWALR(LRScheduler):
    """Anneal the learning rate to ``swa_lr`` over ``anneal_epochs`` steps, then keep it, as
    ``torch.optim.swa_utils.SWALR`` (use it with an optimizer built with ``swa_start=``, see
    :mod:`mithril.utils.optimizers.averaging`).

    Like torch's, each :meth:`step` starts from the optimizer's *current* learning rate
    ``lr`` (so it takes over from whatever set it before, e.g. another scheduler until the
    SWA phase): with ``α(x)`` = ``x`` (``"linear"``) or ``(1 − cos πx)/2`` (``"cos"``),
    ``a = α(clamp((t − 1)/max(1, n), 0, 1))`` and ``b = α(clamp(t/max(1, n), 0, 1))``
    (``t`` the step, ``n = anneal_epochs``; with ``n = 0``, ``t`` counts from 1)::

        lr₀ = swa_lr if a == 1 else (lr − a·swa_lr) / (1 − a)       (the rate before annealing)
        lr  ← swa_lr·b + lr₀·(1 − b)

    evaluated in torch's order, so the values are torch's bit for bit. :meth:`get_lr_at`
    is the closed form of the same schedule from ``base_lr``, ``swa_lr·b + base_lr·(1 − b)``
    (what :meth:`step` gives when nothing else changes the rate, to rounding). Restarted by
    a parent at its milestone (``SequentialLR([CosineAnnealingLR(...), SWALR(...)],
    [swa_start])``), it is re-based to the rate the optimizer has then, as torch's.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        swa_lr: the learning rate to anneal to, ``>= 0``.
        anneal_epochs: steps of the annealing phase, integer ``>= 0`` (0: ``swa_lr`` at once).
        anneal_strategy: ``"cos"`` or ``"linear"``.
    """

    _HPARAMS = ("swa_lr", "anneal_epochs", "anneal_strategy")
    _GROUP_ARGS = ("swa_lr",)
    _LANEWISE = True
    _STARTS_FROM_CURRENT = True
    _STEPS_FROM_CURRENT = True

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        swa_lr: float,
        anneal_epochs: int = 10,
        anneal_strategy: str = "cos",
    ) -> None:
        super().__init__(optimizer)
        self._configure(swa_lr=swa_lr, anneal_epochs=anneal_epochs,
                        anneal_strategy=anneal_strategy)
        self._restart()

    def _configure(self, *, swa_lr: float, anneal_epochs: int, anneal_strategy: str) -> None:
        swa_lr = _check_real("swa_lr", swa_lr, ge=0.0)
        anneal_epochs = _check_int("anneal_epochs", anneal_epochs, minimum=0)
        anneal_strategy = _check_choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        self.swa_lr, self.anneal_epochs, self.anneal_strategy = (
            swa_lr, anneal_epochs, anneal_strategy)

    def _alpha(self, x: float) -> float:
        if self.anneal_strategy == "linear":
            return x
        return (1 - math.cos(math.pi * x)) / 2

    def _alphas(self, t: int) -> tuple[float, float]:
        """(a, b) of step ``t``: the annealing fraction of the step before and of this one
        (torch's ``prev_alpha`` and ``alpha``)."""
        step = max(1, t) if self.anneal_epochs == 0 else t
        n = max(1, self.anneal_epochs)
        prev = self._alpha(max(0, min(1, (step - 1) / n)))
        return prev, self._alpha(max(0, min(1, step / n)))

    def _lr_at(self, t: int) -> float:
        return self._lr_at_from(t, self.base_lr)

    def _lr_at_from(self, t: int, start: float) -> float:
        _, b = self._alphas(_check_step(t))
        return self.swa_lr * b + start * (1 - b)

    def _next_lr(self, t: int, lr: float) -> float:
        a, b = self._alphas(t)
        start = self.swa_lr if a == 1 else (lr - a * self.swa_lr) / (1 - a)
        return self.swa_lr * b + start * (1 - b)

    def _restart(self) -> None:
        # why: a parent restarting it at its milestone (SequentialLR, a warm-up) had re-based
        # it to the rate before the whole schedule, so the SWA phase jumped back up to it;
        # torch's SWALR anneals from the rate the previous schedule left (step 0 keeps it)
        lanes = (self, *self._siblings)
        rates = [_to_float("the optimizer's learning rate", lane.optimizer.get_learning_rate())
                 for lane in lanes]
        bases = [lane.base_lr for lane in lanes]
        try:
            for lane, lr in zip(lanes, rates, strict=True):
                lane._rebase(lr)
            super()._restart()
        except Exception:
            for lane, lr in zip(lanes, bases, strict=True):
                lane._rebase(lr)
            raise

    def step(self) -> None:
        """Advance one step from the optimizer's current learning rate (as torch)."""
        t = _check_step(self.last_step + 1)
        current = _to_float("the optimizer's learning rate", self.optimizer.get_learning_rate())
        lr = self._next_lr(t, current)
        if not math.isfinite(lr):
            raise ValueError(f"SWALR: the learning rate at step {t} is {lr}")
        self.optimizer.set_learning_rate(lr)  # checks first: a refused lr changes nothing
        self._last_step, self._last_lr = t, lr
