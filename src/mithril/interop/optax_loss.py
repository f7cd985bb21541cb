"""Loss-aware optimizers (``needs_loss``: PolyakSGD, Momo, MomoAdam) as optax
transformations: an ``optax.GradientTransformationExtraArgs`` whose
``update(updates, state, params, value=loss)`` takes the loss as optax's ``polyak_sgd`` and
``contrib.momo`` do, also inside ``optax.chain`` (which passes every extra argument to
each member: the others are ignored). The loss becomes the state value ``"loss"`` for the
step (:mod:`mithril.utils.optimizers.loss_aware`), traced or not."""

from __future__ import annotations

from typing import Any

#: the keyword arguments of the transformation's own ``update`` (the rest are ignored)
_OWN = ("new_params", "hyper", "missed", "average_only", "value", "host_kernel")


def with_loss(opt: Any, state: Any, value: Any) -> Any:
    """``state`` with ``value`` as its :data:`~mithril.utils.optimizers.loss_aware.LOSS`
    value, for an optimizer that ``needs_loss`` (others: ``state`` as it is). ``TypeError``
    when it is missing or not a real number, ``ValueError`` when it is not 0-d or (a
    concrete value) not finite, raised before anything runs."""
    if not opt.needs_loss:
        return state
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ..utils.optimizers.loss_aware import LOSS, check_loss

    name = type(opt).__name__
    if value is None:
        raise TypeError(f"{name} as an optax transformation needs the loss: "
                        f"update(updates, state, params, value=loss)")
    if not isinstance(value, jax.core.Tracer):
        check_loss(name, np.asarray(value) if isinstance(value, jax.Array) else value, "value")
    elif jnp.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.number) or \
            jnp.issubdtype(value.dtype, jnp.complexfloating):
        raise ValueError(f"{name}.update: value (the loss) must be a real scalar (0-d), "
                         f"got {value.dtype}{list(jnp.shape(value))}")
    old = state.values.get(LOSS)
    return state._replace(values={**state.values, LOSS: jnp.asarray(value, getattr(
        old, "dtype", jnp.result_type(float)))})


def extra_args(init: Any, update: Any) -> Any:
    """``optax.GradientTransformationExtraArgs(init, update)``, its ``update`` passing on
    the keyword arguments ``update`` takes and ignoring the others (optax's contract)."""
    import optax

    def update_extra(updates: Any, state: Any, params: Any = None, **kw: Any) -> tuple:
        return update(updates, state, params, **{k: v for k, v in kw.items() if k in _OWN})

    update_extra.takes_value = True  # type: ignore[attr-defined]  (the train step's test)
    update_extra.host_kernel = getattr(update, "host_kernel", False)  # type: ignore[attr-defined]
    return optax.GradientTransformationExtraArgs(init, update_extra)
