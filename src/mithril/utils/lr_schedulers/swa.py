"""``torch.optim.swa_utils``' counterparts beside the optimizers' own averages
(:mod:`mithril.utils.optimizers.averaging`): :class:`SWALR`, which anneals to a constant
learning rate for weight averaging (SWA), :func:`update_bn`, which recomputes a model's
BatchNorm running statistics for averaged weights, and :func:`average_state`, the average of
a model's state beside the optimizer's average of its weights (``AveragedModel(
use_buffers=True)``, timm's ``ModelEmaV3``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .base import (
    LRScheduler,
    SupportsLearningRate,
    _check_choice,
    _check_int,
    _check_real,
    _check_step,
    _to_float,
)

__all__ = ["SWALR", "average_state", "update_bn"]


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


def _batch_norms(compiled: Any) -> list[tuple[str, float | None, dict[str, str]]]:
    """Each BatchNorm of ``compiled`` that keeps running statistics: its path, momentum and
    state names (key -> name)."""
    from ...models.norms import _BatchNorm

    return [(node.path, node.op.momentum, dict(node.state)) for node in compiled.program.nodes
            if isinstance(node.op, _BatchNorm) and node.state]


def update_bn(batches: Iterable[Mapping[str, Any]], compiled: Any, params: Mapping[str, Any],
              state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model state (``compiled.initial_state_dict``'s keys) with every BatchNorm's
    running statistics recomputed for ``params`` over ``batches``, as
    ``torch.optim.swa_utils.update_bn(loader, model)``: each BatchNorm's statistics reset,
    then one training-mode forward pass per batch (a dict of inputs, as ``evaluate``
    takes), each BatchNorm keeping the cumulative average of the batches' statistics
    (torch's ``momentum=None`` during the pass, whatever the layer's own momentum)::

        running_mean = mean over batches of the batch means
        running_var  = mean over batches of the unbiased batch variances
        num_batches_tracked = the number of batches

    Use it with averaged weights, whose statistics no forward pass computed:
    ``state = update_bn(batches, compiled, opt.swa_params(opt_state))`` (or
    ``opt.ema_params``; torch's ``AveragedModel(use_buffers=False)`` recipe). ``state``: the
    state the rest of the model (anything but BatchNorm statistics) starts from (default
    the initial one); it evolves through the passes as in training. Without batches the
    statistics are the reset ones (torch's ``reset_running_stats``); a model without
    BatchNorm statistics gets ``state`` back. Nothing given is changed (a new dict).

    Each pass runs the layer's own momentum ``m`` from zeroed statistics, so it returns
    ``m · μ`` and the batch statistic is that divided by ``m`` (exact for ``momentum=None``,
    within an ulp otherwise); a layer with ``momentum=0`` never reads a batch and is
    refused, naming it."""
    bns = _batch_norms(compiled)
    initial = compiled.initial_state_dict
    start = dict(initial if state is None else state)
    if start.keys() != initial.keys():
        from ...errors import KeyMismatchError

        raise KeyMismatchError(f"update_bn: state does not match the model's: missing "
                               f"{sorted(set(initial) - set(start))}, unknown "
                               f"{sorted(set(start) - set(initial))}")
    for path, m, _ in bns:
        if m == 0:
            raise ValueError(f"update_bn: BatchNorm '{path}' has momentum=0: its running "
                             f"statistics never take a batch's, so they cannot be recomputed")
    if not bns:
        return start
    if not isinstance(batches, Iterable) or isinstance(batches, Mapping):
        raise TypeError(f"update_bn: batches must be an iterable of input dicts, got "
                        f"{type(batches).__name__}")
    stats = {n for _, _, names in bns for n in names.values()}
    zeros = {k: v * 0 for k, v in initial.items() if k in stats}
    rest = {k: v for k, v in start.items() if k not in stats}
    running = {k: initial[k] for k in stats}  # (zeros, ones, 0: torch's reset)
    count = 0
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise TypeError(f"update_bn: batch {i} must be a dict of inputs (as evaluate "
                            f"takes), got {type(batch).__name__}")
        _, out = compiled.evaluate(params, batch, state={**rest, **zeros}, training=True)
        count += 1
        f = 1.0 / count  # (torch's momentum=None: a cumulative average)
        for _, m, names in bns:
            for key in ("running_mean", "running_var"):
                if key in names:
                    k = names[key]
                    b = out[k] if m is None else out[k] / m
                    running[k] = b if count == 1 else (1 - f) * running[k] + f * b
            if "num_batches_tracked" in names:
                n = zeros[names["num_batches_tracked"]] + count
                running[names["num_batches_tracked"]] = np.asarray(n) if np.isscalar(n) else n
        rest = {k: out[k] for k in rest}
    return {k: running[k] if k in stats else rest[k] for k in start}


_FLOATS = ("float16", "bfloat16", "float32", "float64")


def average_state(average: Mapping[str, Any] | None, state: Mapping[str, Any],
                  weight: float) -> dict[str, Any]:
    """A model state's average (BatchNorm's running statistics) one update on: for each
    floating-point entry ``average + weight·(state − average)``, integer entries
    (``num_batches_tracked``) copied from ``state``; ``average`` None (the first update)
    or ``weight`` 1: a copy of ``state``. New arrays; nothing given is changed.

    The optimizer averages the weights (``ema_decay=``, ``swa_start=``); the model's state
    is not the optimizer's, so average it beside, after each step that updates the
    optimizer's average, with its weight: ``1 − ema_decay`` for an EMA (torch's
    ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)``,
    timm's ``ModelEmaV3``), ``1/(n+1)`` after ``n`` updates for SWA (``AveragedModel(model,
    use_buffers=True)``); then evaluate ``opt.ema_params(opt_state)`` with it. Integer
    entries are copied as timm does; torch's ``AveragedModel`` blends them too and
    truncates (no inference reads them). :func:`update_bn` is the other way: statistics
    recomputed for the averaged weights."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) \
            or not 0 <= weight <= 1:
        raise ValueError(f"average_state: weight must be a number in [0, 1], got {weight!r}")
    if average is not None and average.keys() != state.keys():
        from ...errors import KeyMismatchError

        raise KeyMismatchError(f"average_state: average and state do not match: missing "
                               f"{sorted(set(state) - set(average))}, unknown "
                               f"{sorted(set(average) - set(state))}")
    for k, v in state.items():
        if average is not None and tuple(average[k].shape) != tuple(v.shape):
            from ...errors import ShapeError

            raise ShapeError(f"average_state: average['{k}'] has shape "
                             f"{tuple(average[k].shape)}, state['{k}'] {tuple(v.shape)}")
    out = {}
    for k, v in state.items():
        a = None if average is None else average[k]
        if a is None or weight == 1 or str(v.dtype).removeprefix("torch.") not in _FLOATS:
            out[k] = v * 1  # (a new array, the same values)
        else:
            out[k] = a + weight * (v - a)
    return out
