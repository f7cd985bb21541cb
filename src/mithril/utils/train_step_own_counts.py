"""Each parameter's own step count in the one-program JAX step for a tensorwise optimizer
(Muon, Adafactor: :class:`~mithril.utils.optimizers.tensorwise.TensorwiseOptimizer`).

An elementwise optimizer's transformation takes ``update(..., missed=m)`` itself (a row of
scalars per leaf). A tensorwise one's runs each tensor's ``tensor_update`` with its row's
scalars of the step ``t``: :func:`own_counts` gives it ``missed=`` too, through a second
transformation of the same optimizer whose rows are one per tensor
(``TensorwiseOptimizer._rows_per_tensor``), each row then reading its tensor's own step
(``t − missed``, a traced vector: the program compiles once whatever the counts; the NumPy /
torch step's ``OptimizerState.note_missed`` rows), while what is the whole step's stays
one: the gradient clipping by the global norm, the ``nonfinite="skip"`` decision, the
learning rate, and what counts the optimizer's steps (the weight averages' weights, a
group's ``step_offset`` joining). The optimizer's count then moves on as one. Without
``missed`` the update is the plain transformation's, the very program of a step that
reaches every parameter."""

from __future__ import annotations

import copy
from typing import Any


def own_counts(tx: Any, optimizer: Any, traced: tuple[str, ...]) -> Any:
    """``tx`` (the transformation of the tensorwise ``optimizer``, its ``traced``
    hyperparameters) whose ``update`` also takes ``missed=`` (per leaf, in flattening order,
    int32: the applied steps it had no gradient at), each tensor's rules then counting
    ``t − missed`` (module docs)."""
    from ..interop.optax_transform import optax_transformation

    opt = copy.copy(optimizer)
    opt._rows_per_tensor = True
    per_tensor = optax_transformation(opt, traced_hyperparams=traced)  # (copies opt)

    def update(updates: Any, state: Any, params: Any = None, *, missed: Any = None,
               **kw: Any) -> tuple[Any, Any]:
        if missed is None or not params:
            return tx.update(updates, state, params, **kw)
        return per_tensor.update(updates, state, params, missed=missed, **kw)

    update.host_kernel = getattr(tx.update, "host_kernel", False)  # type: ignore[attr-defined]
    return tx._replace(update=update)
