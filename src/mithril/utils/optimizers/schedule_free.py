"""Schedule-free SGD and AdamW (Defazio et al., 2024), as ``optax.contrib``'s
``schedule_free_sgd`` / ``schedule_free_adamw``: one fused pass per step, the averaging
weight an optimizer-wide value kept in ``state.values``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import KeyMismatchError, ShapeError
from .base import Optimizer
from .checks import check_int, check_positive, check_unit, describe, is_array, to_float, unwrapped
from .elementwise import helper, maximum, minimum, sqrt, where
from .state import OptimizerState


@helper
def _interpolate(y, z, z_new, b1, omb1, ck, omck):
    """optax's step from the base optimizer's new ``z``: x is recomputed from y and the old
    z (not stored), moved towards the new z by ck, and y is interpolated between them."""
    x = (y - omb1 * z) / b1
    x = omck * x + ck * z_new
    y_new = b1 * x + omb1 * z_new
    return y + (y_new - y), z_new  # optax: updates = y_new - y, then apply_updates


def _sf_sgd(p, g, z, lr, b1, omb1, wd, ck, omck):
    z_new = z + -lr * (g + wd * p)
    return _interpolate(p, z, z_new, b1, omb1, ck, omck)


def _sf_adamw(p, g, z, nu, lr, b1, omb1, b2, omb2, bc2, eps, wd, ck, omck):
    nu = omb2 * (g * g) + b2 * nu
    z_new = z + -lr * (g / (sqrt(nu / bc2) + eps) + wd * p)
    p, z = _interpolate(p, z, z_new, b1, omb1, ck, omck)
    return p, z, nu


def _sf_adamw_keras(p, g, z, nu, lr, b1, omb1, b2, omb2, bc2, eps, wd, lr_wd, ck, omck):
    p = p - p * wd * lr_wd  # Keras's decoupled decay of y (raw lr) before the step
    nu = omb2 * (g * g) + b2 * nu
    z_new = z + -lr * (g / (sqrt(nu / bc2) + eps))
    p, z = _interpolate(p, z, z_new, b1, omb1, ck, omck)
    return p, z, nu


def warmup(lr: float, count: int, steps: int | None) -> float:
    """optax ``warmup_constant_schedule(0, lr, steps)`` at ``count``: ``lr·count/steps``
    below ``steps``, then ``lr``; ``lr`` throughout without warm-up (None or 0). Computed as
    optax does, ``(0 − lr)·frac + lr`` with ``frac = 1 − count/steps`` rounded to float32
    (optax divides its int32 step count in float32, even with ``jax_enable_x64``): optax's
    numbers run eagerly with a float64 lr (``inject_hyperparams``). Jitted, XLA turns that
    float32 division into a multiplication and fuses a multiply-add (~1e-8 relative in the
    lr); with a Python-float lr optax's whole warm-up schedule is float32. A traced
    ``count`` or ``steps`` (inside a jitted program) gets optax's own traced arithmetic."""
    if steps is None:
        return lr
    if not isinstance(count, (int, np.integer)) or not isinstance(steps, (int, np.integer)):
        import jax.numpy as jnp  # traced: no Python branch on a value

        count = jnp.asarray(count)  # (the optax transformation's step: its JAX value)
        frac = 1.0 - jnp.maximum(count, 0).astype(jnp.float32) / jnp.asarray(steps, jnp.float32)
        return jnp.where((steps == 0) | (count >= steps), lr, (0.0 - lr) * frac + lr)
    if not steps or count >= steps:
        return lr
    frac = np.float32(1) - np.float32(max(count, 0)) / np.float32(steps)
    return (0.0 - lr) * float(frac) + lr


def init_from_params(opt: Optimizer, params: Mapping[str, Any], slot: str) -> OptimizerState:
    """``Optimizer.init``, then ``slot`` set to a copy of ``params`` (as the averaged slots
    are: ``params`` are not modified)."""
    state = Optimizer.init(opt, params)
    lay, eng = state.layout, state.engine
    flat = lay.flatten_numpy({n: eng.to_numpy(p) for n, p in params.items()})
    state.slots[slot] = eng.from_numpy(flat)
    return state


def per_param(state: OptimizerState, flat: np.ndarray) -> dict[str, Any]:
    """New arrays of the state's backend holding ``flat`` (a host buffer at the state's
    layout), one per parameter."""
    eng, lay = state.engine, state.layout
    out = eng.from_numpy(flat)
    if eng.backend.name == "jax" and isinstance(out, np.ndarray):  # JAX-on-CPU host buffer
        import jax.numpy as jnp

        return {n: jnp.array(out[a:b].reshape(shp)) for n, a, b, shp in lay.spans()}
    return lay.unflatten(out)


def host_flat(state: OptimizerState, params: Mapping[str, Any], what: str) -> np.ndarray:
    """``params`` checked against ``state``'s layout, as one host buffer at its offsets."""
    lay, eng = state.layout, state.engine
    if not isinstance(params, Mapping):
        raise TypeError(f"{what}: params must be a dict of arrays, got {type(params).__name__}")
    if params.keys() != lay.index.keys():
        raise KeyMismatchError(f"{what}: params do not match the optimizer state: missing "
                               f"{sorted(set(lay.names) - set(params))}, unknown "
                               f"{sorted(set(params) - set(lay.names))}")
    for name, p in params.items():
        shape = lay.shapes[lay.index[name]]
        if not is_array(p) or tuple(p.shape) != shape:
            raise ShapeError(f"{what}: params['{name}'] must be an array of shape {shape}, "
                             f"got {type(p).__name__} {tuple(getattr(p, 'shape', ()))}")
    return lay.flatten_numpy({n: np.asarray(eng.to_numpy(p)) for n, p in params.items()})


class _Default(float):
    """optax's ``weight_lr_power`` default, 2.0, told apart from a 2.0 given: Keras's
    convention replaces it by its 0."""


_WEIGHT_LR_POWER = _Default(2.0)


def _check_b1(value: Any) -> float:
    v = to_float("beta1", value)
    if not (0 < v <= 1):  # also refuses NaN; x is recovered dividing by beta1
        raise ValueError(f"beta1 must be in (0, 1], got {describe(value)}")
    return v


class _ScheduleFree(Optimizer):
    """What both schedule-free optimizers share: the z slot (starting as the parameters),
    the weight sum and largest learning rate (``state.values``), the interpolation step
    and :meth:`eval_params`."""

    state_values = ("weight_sum", "max_lr")
    weight_decay_in_math = True
    # a parameter without a gradient skips its z and y update, but not the count: the
    # reference counts per group (its k: warm-up, bias correction), optax per optimizer
    counts_missed = False
    # the weight sum and largest lr are optimizer-wide: they read the optimizer's step,
    # not a late group's own count (a group's step_offset)
    tensor_scalars_step = "optimizer"

    def _common(self, beta1: Any, warmup_steps: Any, weight_lr_power: Any) -> None:
        self.beta1 = _check_b1(beta1)
        self.warmup_steps = None if warmup_steps is None else check_int(
            "warmup_steps", warmup_steps, minimum=0)
        self.weight_lr_power = to_float("weight_lr_power", weight_lr_power)
        if not math.isfinite(self.weight_lr_power):
            raise ValueError(f"weight_lr_power must be finite, got {describe(weight_lr_power)}")

    def _base_lr(self, step: int) -> float:
        """The base optimizer's learning rate at ``step`` (1-based): optax's inner schedule
        counts from 0, so the warm-up is one step behind the averaging weight's."""
        return warmup(self.learning_rate, step - 1, self.warmup_steps)

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        # arithmetic only (no Python branch on a value; the warm-up's a where when traced):
        # it also runs in the jitted JAX engine's program and the optax transformation's
        lr = warmup(self.learning_rate, step, self.warmup_steps)
        max_lr = maximum(values["max_lr"], lr)
        weight = max_lr ** self.weight_lr_power
        total = values["weight_sum"] + weight
        ratio = weight / total
        # optax: NaN stays NaN, 0/0 (a zero learning rate so far) and inf/inf are 0
        ck = where((weight != weight) | (total != total), math.nan,
                   where(ratio != ratio, 0.0, ratio))
        return (ck, 1.0 - ck), tensors, {"weight_sum": total, "max_lr": max_lr}

    def eval_params(self, state: OptimizerState, params: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
        """The parameters to evaluate with (the averaged sequence ``x``; optax's
        ``schedule_free_eval_params``), per parameter, as new arrays of the state's backend:
        ``x = (y − (1 − β₁)·z) / β₁`` from the training parameters ``y`` and the state's
        ``z``. ``params``: the training parameters ``y``; by default the arrays the last
        :meth:`update` returned with this state (a state fresh from :meth:`init` gives the
        parameters it started from; one restored from a state dict or checkpoint, not yet
        updated, needs ``params``). A state of another optimizer raises ``ValueError``."""
        cls = type(self).__name__
        state = unwrapped(state)  # (an Accumulate's state: its wrapped one)
        if not isinstance(state, OptimizerState):
            raise TypeError(f"eval_params: state must be what {cls}.init returned, got "
                            f"{type(state).__name__}")
        if state.kind != cls or "z" not in state.slots:
            raise ValueError(f"eval_params: state was made by {state.kind}, not by this {cls}: "
                             f"only a schedule-free state of the same kind keeps its z")
        if state.swapped is not None:
            raise ValueError(f"eval_params: the {state.swapped.upper()} is swapped in "
                             f"(swap_ema): swap it back first")
        z = np.asarray(state.engine.to_numpy(state.slots["z"]))
        if params is None:
            if state.param_views:
                params = state.param_views
            elif state.step == 0:  # y = z = x at the start
                return per_param(state, z.copy())
            else:
                raise ValueError("eval_params: this state was not updated since it was "
                                 "restored, so it does not know the training parameters: "
                                 "pass them, eval_params(state, params)")
        y = host_flat(state, params, "eval_params")
        if y.dtype != z.dtype:
            raise TypeError(f"eval_params: params must have dtype {state.layout.dtype}, got "
                            f"{y.dtype}")
        b1 = self.beta1
        return per_param(state, (y - (1.0 - b1) * z) / b1)


class ScheduleFreeSGD(_ScheduleFree):
    """Schedule-free SGD (Defazio et al., 2024), as ``optax.contrib.schedule_free_sgd``.

    The parameters you hold and take gradients at are optax's ``y``; the state keeps ``z``
    (slot ``"z"``, starting as the parameters) and the averaged sequence ``x``, which is the
    one to evaluate with, is derived: :meth:`eval_params`. Each step (t = 1, 2, ...)::

        z' ← z − lr_t·(g + wd·y)                     (plain SGD on z, coupled decay)
        max_lr ← max(max_lr, lr'_t)    w ← max_lr^weight_lr_power
        weight_sum ← weight_sum + w    c ← w / weight_sum
        x ← (y − (1−β₁)·z) / β₁        x ← (1−c)·x + c·z'
        y ← β₁·x + (1−β₁)·z'           z ← z'

    ``weight_sum`` and ``max_lr`` are optimizer-wide values (``state.values``, saved with
    state dicts and checkpoints). ``warmup_steps``: optax's linear warm-up from 0
    (``warmup_constant_schedule``), with optax's counting kept: the SGD step on ``z`` uses
    ``lr_t = lr·min(t−1, W)/W`` and the averaging weight ``lr'_t = lr·min(t, W)/W`` (without
    warm-up both are ``lr``; the warm-up fraction is rounded to float32 as optax computes
    it, see :func:`warmup`). A learning-rate change (``set_learning_rate``, a scheduler)
    acts as optax's ``inject_hyperparams``; ``max_lr`` then keeps the largest so far. With
    parameter groups, each group's lr scales its own ``z`` step; the averaging weight uses
    the optimizer's learning rate and step count. A parameter without a gradient
    (``note_missed``: ``torch_optimizer``, ``make_train_step``) keeps its ``y`` and ``z``
    but not its count: its warm-up and bias correction read its group's step, as the
    reference's per-group ``k`` does (a group that joined later counts from its join).

    Conventions (optax's): ``beta1`` is the interpolation ``β₁`` (no momentum buffer),
    ``weight_decay`` is added to the gradient (``add_decayed_weights`` before ``sgd``, so it
    is multiplied by the lr, as torch's L2). The PyTorch reference package (``schedulefree``)
    differs in details: per-group weight sums, and a warm-up giving ``lr·min(t, W)/W`` to
    both the step and the weight. torch.optim has no schedule-free optimizer.
    Defaults are optax's (lr 1.0, β₁ 0.9, weight_lr_power 2, no warm-up, no decay).
    """

    slots = ("z",)

    def __init__(self, learning_rate: float = 1.0, warmup_steps: int | None = None,
                 beta1: float = 0.9, weight_decay: float = 0.0, weight_lr_power: float = 2.0,
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self._common(beta1, warmup_steps, weight_lr_power)

    def scalars(self, step: int) -> tuple[float, ...]:
        b1 = self.beta1
        return (self._base_lr(step), b1, 1.0 - b1, self.weight_decay)

    def kernel_math(self) -> Any:
        return _sf_sgd


class ScheduleFreeAdamW(_ScheduleFree):
    """Schedule-free AdamW (Defazio et al., 2024), as ``optax.contrib.schedule_free_adamw``.

    As :class:`ScheduleFreeSGD` (``y`` the parameters you hold, ``z`` a slot, ``x`` from
    :meth:`eval_params`, the same averaging weight and warm-up), with an RMS-scaled step on
    ``z`` (Adam without momentum: ``β₁`` is the interpolation)::

        ν ← β₂·ν + (1−β₂)·g²                      (slot "nu")
        z' ← z − lr_t·(g / (√(ν/(1−β₂ᵗ)) + ε) + wd·y)

    Conventions (optax's): weight decay evaluated at ``y``, added after the RMS scaling and
    multiplied by the lr (AdamW's, ``add_decayed_weights`` after ``scale_by_rms``); ε
    outside the root; the second moment bias-corrected. The PyTorch reference package
    (``schedulefree.AdamWScheduleFree``) differs in details (per-group weight sums, its
    warm-up, where the bias correction enters).
    Defaults are optax's (lr 0.0025, β₁ 0.9, β₂ 0.999, ε 1e-8, weight_lr_power 2, no
    warm-up, no decay).

    ``convention="keras"`` is ``keras.optimizers.ScheduleFreeAdamW`` (its ``beta_1``,
    ``beta_2`` are ``beta1``, ``beta2``): the warm-up ``lr_t = lr·min(t/W, 1)`` from step 1
    (optax's is one step behind), every step weighted alike (``c = 1/t``:
    ``weight_lr_power`` is 0, another value is refused) and ``weight_decay`` Keras's
    decoupled ``y ← y − lr·wd·y`` (the raw lr) before the step, nothing added to z's.
    """

    slots = ("z", "nu")

    def __init__(self, learning_rate: float = 0.0025, warmup_steps: int | None = None,
                 beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8,
                 weight_decay: float = 0.0, weight_lr_power: float = _WEIGHT_LR_POWER,
                 convention: str = "optax", **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        if convention not in ("optax", "keras"):
            raise ValueError(f"convention must be 'optax' or 'keras', got {describe(convention)}")
        self.convention = convention
        keras = convention == "keras"
        if keras and weight_lr_power is _WEIGHT_LR_POWER:
            weight_lr_power = 0.0
        self._common(beta1, warmup_steps, weight_lr_power)
        if keras and self.weight_lr_power != 0:  # (Keras's weight is 1/t)
            raise ValueError(f"weight_lr_power={describe(weight_lr_power)}: Keras's "
                             f"ScheduleFreeAdamW weights every step alike (convention='keras' "
                             f"takes 0 only)")
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon)

    def _base_lr(self, step: int) -> float:
        if self.convention == "optax":
            return super()._base_lr(step)
        w = self.warmup_steps  # Keras: lr·min(t/W, 1), t the 1-based step
        if w is None or (isinstance(w, (int, np.integer)) and w == 0):
            return self.learning_rate
        return self.learning_rate * minimum(step / w, 1.0)  # (a traced W = 0: t/0 = inf)

    def scalars(self, step: int) -> tuple[float, ...]:
        b1, b2 = self.beta1, self.beta2
        keras = (self.learning_rate,) if self.convention == "keras" else ()
        return (self._base_lr(step), b1, 1.0 - b1, b2, 1.0 - b2, 1.0 - b2**step, self.epsilon,
                self.weight_decay, *keras)

    def kernel_math(self) -> Any:
        return _sf_adamw_keras if self.convention == "keras" else _sf_adamw


def _init(self: _ScheduleFree, params: Mapping[str, Any]) -> OptimizerState:
    """A fresh state: the slots zeroed, except ``z``, a copy of ``params`` (which are not
    modified); ``weight_sum`` and ``max_lr`` 0."""
    return init_from_params(self, params, "z")


# assigned after the class, so that Optimizer.__init_subclass__ does not wrap it (the wrapper
# binds the backend before init runs, and would keep an inferred one when init refuses)
_ScheduleFree.init = _init  # type: ignore[method-assign]
