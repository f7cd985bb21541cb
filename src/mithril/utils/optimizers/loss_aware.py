"""Optimizers whose step needs the loss at the current parameters (optax's
``GradientTransformationExtraArgs`` with ``value=``: ``polyak_sgd``, ``contrib.momo``).

A class states ``needs_loss = True``; ``update(params, gradients, state, loss=f)`` then checks
``f`` (a finite real scalar: a Python or NumPy number, a 0-d NumPy / torch / JAX array) and
puts it in the state as the value ``"loss"`` (one of its ``state_values``, added by the base
class) for this step, where :meth:`~.base.Optimizer.tensor_scalars` reads it (and
:meth:`~.base.Optimizer.scalars`, listed in ``scalar_values``). It stays there as the loss
of the last applied step (saved with the state); a refused or skipped step leaves the
state's values as they were. Every engine, ``optax_transformation`` (its ``value=``) and
the one-program JAX train step (the loss it computes) take it as they take any state
value: nothing of this is engine-specific.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .checks import describe

#: the state value that holds the step's loss
LOSS = "loss"
#: ``Optimizer.update(..., loss=WRITTEN)``: the loss is in the state's values already
WRITTEN = object()


def check_loss(name: str, loss: Any, arg: str = "loss") -> float:
    """``loss`` as a Python float; ``TypeError`` when it is missing or not a real number,
    ``ValueError`` when it is not a scalar (0-d) or not finite, naming the argument
    (``arg``: optax's ``value``)."""
    if loss is None:
        raise TypeError(f"{name}.update needs loss=: its step uses the loss at params (the "
                        f"value the gradients are of), e.g. update(params, grads, state, "
                        f"loss=float(loss))")
    x = loss.detach() if callable(getattr(loss, "detach", None)) else loss
    shape = tuple(getattr(x, "shape", ()))
    if shape != ():
        raise ValueError(f"{name}.update: {arg} must be a scalar (0-d), got shape {shape}")
    kind = getattr(x, "dtype", None)
    real = isinstance(x, (int, float, np.integer, np.floating)) or (
        kind is not None and str(kind).replace("torch.", "").startswith(
            ("float", "bfloat", "int", "uint")))
    if isinstance(x, (bool, np.bool_)) or not real:
        raise TypeError(f"{name}.update: {arg} must be a real number, got {describe(loss)}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{name}.update: {arg}={value} is not finite (the step needs a finite "
                         f"loss; nothing was changed)")
    return value


def loss_step(opt: Any, params: Mapping[str, Any], gradients: Mapping[str, Any], state: Any,
              loss: Any) -> tuple[dict[str, Any], Any]:
    """``opt.update(params, gradients, state, loss=loss)``: the loss checked, then the step
    with it as the state value :data:`LOSS`; the values as they were if the step is refused
    or skipped."""
    from .state import OptimizerState

    name = type(opt).__name__
    if not opt.needs_loss:
        raise TypeError(f"{name}.update takes no loss= (its step does not use the loss; "
                        f"optimizers whose step does have needs_loss = True)")
    value = check_loss(name, loss)
    from .base import Optimizer

    if not isinstance(state, OptimizerState):  # (the step's own check refuses it)
        return Optimizer.update(opt, params, gradients, state, loss=WRITTEN)
    before = state.values  # (on JAX, values held on the device are brought back)
    state.values = {**before, LOSS: value}
    try:
        new_params, state = Optimizer.update(opt, params, gradients, state, loss=WRITTEN)
    except BaseException:
        state.values = before
        raise
    if state.last_step_skipped:
        state.values = before
    return new_params, state


def wrapped_loss(where: str, opt: Any, loss: Any) -> dict[str, float]:
    """What a wrapper (``Accumulate``, ``DataParallel``) passes on to ``opt.update``:
    ``{"loss": f}`` (``loss`` checked) for a loss-aware ``opt``, ``{}`` for one that takes
    none; ``TypeError`` for a missing loss, or one given to an ``opt`` that takes none
    (``where``: the wrapper's method, named in the error)."""
    name = type(opt).__name__
    if not getattr(opt, "needs_loss", False):
        if loss is not None:
            raise TypeError(f"{where}: {name} takes no loss= (its step does not use the loss)")
        return {}
    return {LOSS: check_loss(name, loss)}
