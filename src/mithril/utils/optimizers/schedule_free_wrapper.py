"""Schedule-free learning (Defazio et al., 2024) around any base optimizer, as
``optax.contrib.schedule_free``: the base optimizer steps the sequence ``z`` and the
parameters are the interpolation ``y`` of ``z`` and the average ``x``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import _without_none
from .checks import describe, to_float, unwrapped
from .outer_wrapper import OuterWrapper, array, check_base, check_grads, copied
from .schedule_free import _check_b1, _ScheduleFree, host_flat, per_param
from .state import OptimizerState

#: the wrapper's optimizer-wide values (state.values), as the fused schedule-free optimizers'
VALUES = ("weight_sum", "max_lr")


def _check_lr(value: Any) -> float | None:
    if value is None:
        return None
    v = to_float("averaging_lr", value)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"averaging_lr must be a finite number >= 0 (or None: the base "
                         f"optimizer's learning rate), got {describe(value)}")
    return v


def _check_b1_named(value: Any) -> float:
    try:
        return _check_b1(value)
    except (TypeError, ValueError) as e:  # (the fused optimizers' beta1 is b1 here)
        raise type(e)(str(e).replace("beta1", "b1")) from None


def _check_power(value: Any) -> float:
    v = to_float("weight_lr_power", value)
    if not math.isfinite(v):
        raise ValueError(f"weight_lr_power must be finite, got {describe(value)}")
    return v


def averaging_weight(weight_sum: float, max_lr: float, lr: float, power: float
                     ) -> tuple[float, float, float]:
    """``(c, weight_sum', max_lr')``: optax's averaging weight ``c = max_lr'^power /
    weight_sum'`` for a step at ``lr``; NaN stays NaN, 0/0 (no positive lr yet) and inf/inf
    give 0 (optax's ``nan_to_num``)."""
    max_lr = max(max_lr, lr) if not math.isnan(max_lr) else max_lr
    with np.errstate(all="ignore"):
        weight = float(np.float64(max_lr) ** power)
    total = weight_sum + weight
    if math.isnan(weight) or math.isnan(total):
        return math.nan, total, max_lr
    ratio = weight / total if total != 0 else math.nan
    return (0.0 if math.isnan(ratio) else ratio), total, max_lr


class ScheduleFree(OuterWrapper):
    """Schedule-free learning around ``base_optimizer`` (any optimizer here but LBFGS: give
    it no momentum, e.g. ``Adam(lr, beta1=0)``, as optax advises), equal to
    ``optax.contrib.schedule_free(base, learning_rate, b1, weight_lr_power)`` around the same
    base. The parameters you hold and take gradients at are optax's ``y``; the slot ``"z"``
    (starting as the parameters) is the sequence the base optimizer steps; the average
    ``x``, the one to evaluate with, is derived: :meth:`eval_params`. Per step::

        u = base(y, g) − y                  (the base's step, taken at y: its decay reads y)
        z' = z + u
        lr = averaging_lr, or the base optimizer's learning rate at this step when None
        max_lr ← max(max_lr, lr)    w = max_lr^weight_lr_power
        weight_sum ← weight_sum + w    c = w / weight_sum      (0/0 → 0)
        x = (y − (1−β₁)·z) / β₁    x ← (1−c)·x + c·z'    y ← β₁·x + (1−β₁)·z'    z ← z'

    ``b1`` is optax's ``b1`` (β₁, the interpolation: the fused optimizers' ``beta1``; named
    apart from the base's ``beta1``, which a scheduler's ``cycle_momentum`` and the CLI's
    ``beta1=`` keep reaching). ``averaging_lr`` is optax's ``learning_rate``: the lr the
    averaging weight reads (``learning_rate``, ``set_learning_rate`` and the CLI's ``lr=``
    are the base's, which carries its own as optax's does). None (the default) reads the base's
    learning rate, which ``set_learning_rate`` and the schedulers drive: optax's
    ``schedule_free(base(schedule), schedule)`` for a constant lr. With a schedule optax
    calls the wrapper's with its count from 1 and the base's from 0 (one step ahead);
    here both read the lr of the step, i.e. optax's ``schedule_free(base(schedule),
    lambda count: schedule(count - 1))``: the weights of a warm-up lag one step.

    ``weight_sum`` and ``max_lr`` are optimizer-wide values (``state.values``, float64 on
    the host: optax keeps them in the params' dtype), saved with ``z`` and the base's state
    by ``state_dict`` and checkpoints. A parameter left out of ``gradients`` keeps its
    ``y`` and ``z`` (the base leaves it out too). The base's ``nonfinite`` policy holds: a
    step it skips is skipped here too; its EMA / SWA (``ema_decay``, ``swa_start``) would
    average its own output ``y + u``, not the ``y`` returned here (as under Mechanize):
    evaluate with :meth:`eval_params`. ``loss=``: passed to a loss-aware base (PolyakSGD,
    Momo). A call that raises changes neither the params nor the state.
    """

    OWN = ("averaging_lr", "b1", "weight_lr_power")
    own_slots = ("z",)

    def __init__(self, base_optimizer: Any, averaging_lr: float | None = None,
                 b1: float = 0.9, weight_lr_power: float = 2.0) -> None:
        base = check_base(base_optimizer, "ScheduleFree")
        if isinstance(base, (_ScheduleFree, ScheduleFree)):
            raise TypeError(f"ScheduleFree: base_optimizer {type(base).__name__} is "
                            f"schedule-free already (wrap one without momentum: SGD, Adam(beta1=0))")
        self.__dict__["base_optimizer"] = base
        self.averaging_lr = _check_lr(averaging_lr)
        self.b1 = _check_b1_named(b1)
        self.weight_lr_power = _check_power(weight_lr_power)
        self._backend = base._backend

    def check_own(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        checks = {"averaging_lr": _check_lr, "b1": _check_b1_named,
                  "weight_lr_power": _check_power}
        return {k: checks[k](v) for k, v in hp.items() if k in checks}

    def own_values(self) -> tuple[str, ...]:
        return VALUES

    def init(self, params: Mapping[str, Any]) -> OptimizerState:
        """The base optimizer's state plus ``z`` (a copy of ``params``, which are not
        modified) and ``weight_sum = max_lr = 0``."""
        state = super().init(params)
        eng, lay = state.engine, state.layout
        state.slots["z"] = eng.from_numpy(lay.flatten_numpy(
            {n: np.array(eng.to_numpy(p)) for n, p in params.items()}))
        state.values.update(dict.fromkeys(VALUES, 0.0))
        return state

    def update(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
               state: OptimizerState, *, loss: Any = None
               ) -> tuple[dict[str, Any], OptimizerState]:
        """One schedule-free step (class docs); on any error neither ``params`` nor
        ``state`` has changed."""
        gradients = _without_none(gradients)  # (None: no gradient this step)
        check_grads(self, params, gradients, state, "gradients")
        missing = [k for k in VALUES if k not in state.values]
        if missing:
            raise ValueError(f"state lacks ScheduleFree's values {missing} (not made by "
                             f"ScheduleFree.init?)")
        lr = (self.averaging_lr if self.averaging_lr is not None
              else to_float("learning_rate", self.base_optimizer.get_learning_rate()))
        v = state.values
        c, total, max_lr = averaging_weight(v["weight_sum"], v["max_lr"], lr,
                                            self.weight_lr_power)
        b1, omb1 = self.b1, 1.0 - self.b1
        z = state.slot("z")
        old = {n: copied(p) for n, p in params.items()}  # (the base step may write them)
        x = {n: (params[n] - omb1 * z[n]) / b1 for n in gradients}
        new, state = self.base_update(params, gradients, state,
                                      **({} if loss is None else {"loss": loss}))
        if state.last_step_skipped:  # (the base skipped: nothing changed, nor here)
            return old, state
        out = dict(old)
        z_new = {}
        for n in gradients:
            z_new[n] = z[n] + (new[n] - old[n])
            y = b1 * ((1.0 - c) * x[n] + c * z_new[n]) + omb1 * z_new[n]
            out[n] = array(old[n] + (y - old[n]))  # (optax: y' − y, then apply_updates)
        _write(state, "z", z_new)
        state.values = {**state.values, "weight_sum": total, "max_lr": max_lr}
        return out, state

    def eval_params(self, state: OptimizerState, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters to evaluate with, ``x = (y − (1 − β₁)·z) / β₁`` from the training
        parameters ``y`` (``params``, those the last update returned) and the state's ``z``,
        as new arrays of the state's backend (optax's ``schedule_free_eval_params``);
        ``state`` may also be the one-program JAX train step's (``step.init``'s)."""
        who = "ScheduleFree.eval_params"
        state = unwrapped(state)  # (an Accumulate's state: its wrapped one)
        if type(state).__name__ == "OptaxState" and "z" in getattr(state, "slots", {}):
            return self._fused_eval_params(state, params, who)
        if not isinstance(state, OptimizerState) or state.kind != "ScheduleFree" \
                or "z" not in state.slots:
            raise ValueError(f"{who}: state must be what ScheduleFree.init / update returned, "
                             f"got {getattr(state, 'kind', None) or type(state).__name__}'s")
        if params is None:  # (the base's last output is not y: no default here)
            raise TypeError(f"{who} needs params: the training parameters the last update "
                            f"returned")
        y = host_flat(state, params, who)
        z = np.asarray(state.engine.to_numpy(state.slots["z"]))
        if y.dtype != z.dtype:
            raise TypeError(f"{who}: params must have dtype {state.layout.dtype}, got {y.dtype}")
        return per_param(state, (y - (1.0 - self.b1) * z) / self.b1)


    def _fused_eval_params(self, state: Any, params: Mapping[str, Any], who: str
                           ) -> dict[str, Any]:
        """:meth:`eval_params` of the one-program JAX train step's state (an ``OptaxState``
        holding ``z`` per parameter): new JAX arrays, each of its parameter's dtype."""
        import jax.numpy as jnp

        z = state.slots["z"]
        if not isinstance(params, Mapping) or set(params) != set(z):
            got = sorted(params) if isinstance(params, Mapping) else describe(params)
            raise ValueError(f"{who}: params must be the training parameters of this state, "
                             f"{sorted(z)}; got {got}")
        b1 = self.b1
        out = {}
        for n, y in params.items():
            y = jnp.asarray(y)
            if tuple(y.shape) != tuple(z[n].shape) or y.dtype != z[n].dtype:
                raise ValueError(f"{who}: params[{n!r}] has shape {tuple(y.shape)} and dtype "
                                 f"{y.dtype}, the state's z {tuple(z[n].shape)} {z[n].dtype}")
            out[n] = ((y - (1.0 - b1) * z[n]) / b1).astype(y.dtype)
        return out


def _write(state: OptimizerState, slot: str, arrays: Mapping[str, Any]) -> None:
    """``arrays`` (some parameters') into ``state``'s flat ``slot``: in place where it is a
    NumPy / torch buffer, a new JAX array otherwise."""
    flat = state.slots[slot]
    if isinstance(flat, np.ndarray) or hasattr(flat, "copy_"):
        views = state.slot(slot)
        for n, a in arrays.items():
            views[n][...] = a
        return
    lay = state.slot_layout(slot)
    for n, a0, b0, _shape in lay.spans():
        if n in arrays:
            flat = flat.at[a0:b0].set(arrays[n].reshape(-1))
    state.slots[slot] = flat


# the base optimizer's loss need (make_train_step and torch_optimizer read it): after the
# class, as Optimizer.__init_subclass__ reads needs_loss as a class constant
ScheduleFree.needs_loss = property(  # type: ignore[assignment]
    lambda self: self.base_optimizer.needs_loss, doc="The base optimizer's ``needs_loss``.")
