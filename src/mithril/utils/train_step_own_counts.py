"""Each parameter's own step count in the one-program JAX step for a tensorwise optimizer
(Muon, Adafactor: :class:`~mithril.utils.optimizers.tensorwise.TensorwiseOptimizer`).

An elementwise optimizer's transformation takes ``update(..., missed=m)`` itself (a row of
scalars per leaf). A tensorwise one's runs each tensor's ``tensor_update`` with its row's
scalars of the step ``t``: :func:`own_counts` gives it ``missed=`` too, as a second
transformation of the same optimizer whose rows are one per tensor
(``TensorwiseOptimizer._rows_per_tensor``) and whose state's count is a vector, each
tensor's ``count − missed`` (traced: the program compiles once whatever the counts). Its
table of scalars then reads each row's own step (``t − missed``, the NumPy / torch step's
``OptimizerState.note_missed`` rows), while what is the whole step's stays one: the
gradient clipping by the global norm, the ``nonfinite="skip"`` decision, the learning rate.
The optimizer's count then moves on as one. Without ``missed`` the update is the plain
transformation's, the very program of a step that reaches every parameter.

Not for the options that read the step count outside the rows (the weight averages'
``ema_decay`` / ``swa_start``, a group's ``step_offset``): :func:`why_not` names them, and
the step takes the separate calls (or the sharded step refuses)."""

from __future__ import annotations

import copy
from typing import Any


def why_not(optimizer: Any) -> str | None:
    """Why the program cannot count each parameter's own steps for the tensorwise
    ``optimizer`` (None: it can): an option that reads the step count per tensor outside
    its row of scalars."""
    held = [optimizer, *(o for o in (getattr(optimizer, "fallback", None),) if o is not None)]
    for o in held:
        for k in ("ema_decay", "swa_start"):
            if getattr(o, k, None) is not None:
                return f"{type(o).__name__}'s {k} (weight averaging counts the optimizer's steps)"
        if any("step_offset" in g for g in o.param_groups):
            return f"{type(o).__name__}'s param group with a step_offset"
    return None


def own_counts(tx: Any, optimizer: Any, traced: tuple[str, ...]) -> Any:
    """``tx`` (the transformation of the tensorwise ``optimizer``, its ``traced``
    hyperparameters) whose ``update`` also takes ``missed=`` (per leaf, in flattening order,
    int32: the applied steps it had no gradient at), each tensor's rules then counting
    ``t − missed`` (module docs)."""
    import jax.numpy as jnp

    from ..interop.optax_scalars import _INT32_MAX
    from ..interop.optax_transform import optax_transformation

    opt = copy.copy(optimizer)
    opt._rows_per_tensor = True
    per_tensor = optax_transformation(opt, traced_hyperparams=traced)  # (copies opt)
    why = why_not(opt)

    def update(updates: Any, state: Any, params: Any = None, *, missed: Any = None,
               **kw: Any) -> tuple[Any, Any]:
        if missed is None or not params:
            return tx.update(updates, state, params, **kw)
        if why is not None:  # (set after the step was made: it was checked then)
            raise ValueError(f"make_train_step: {why} cannot count each parameter's own "
                             f"steps in the program; make the step anew (it then takes the "
                             f"separate calls)")
        count = state.count
        own = state._replace(count=count - jnp.asarray(missed).astype(count.dtype))
        new, out = per_tensor.update(updates, own, params, **kw)
        first = own.count[0]  # (applied: its count moved, or was at the int32 limit)
        applied = (out.count[0] != first) | (first == _INT32_MAX)
        return new, out._replace(count=jnp.where(
            applied, jnp.minimum(count, _INT32_MAX - 1) + 1, count))

    return tx._replace(update=update)
