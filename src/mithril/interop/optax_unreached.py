"""The weight averages of parameters a step gives no gradient (``update(...,
average_only=names)`` of :func:`~mithril.interop.optax_transformation`): what the one-program
JAX step (``make_train_step``) does for the parameters its loss does not reach. The update
is given every parameter (so that the param groups match as in the step that reaches them:
a group naming only unreached ones is no unknown group) and changes those ``names`` only.

The optimizer's own ``update`` leaves such a parameter and its own slots as they were
(torch.optim passing over a ``.grad`` None), but its averages (``ema_decay``, ``swa_start``)
take the step as every parameter's do: ``avg ← avg + w·(p − avg)`` with ``p`` its unchanged
value and ``w`` the weight of the optimizer's step ``t`` (not its own count: the averages
count the optimizer's steps, as torch's ``AveragedModel.update_parameters(model)`` averages
every parameter of the model). Everything else of the state stays: the count, the own slots,
the tensor slots, the values."""

from __future__ import annotations

from typing import Any


def averaged(p: Any, a: Any, w: Any) -> Any:
    """One averaging step of :func:`mithril.utils.optimizers.averaging.average` on JAX
    values: ``a + w·(p − a)``, exactly ``p`` where ``w`` is 1, ``a`` where it is 0."""
    import jax.numpy as jnp

    w = jnp.asarray(w).astype(a.dtype)
    return jnp.where(w == 1, p, jnp.where(w != 0, a + w * (p - a), a))


def averages_only(state: Any, treedef: Any, leaves: list[Any], names: list[str],
                  only: Any, slot_leaves: dict[str, list], averaged_slots: tuple[str, ...],
                  weights: Any, late: list[Any] | None, new_params: bool) -> tuple[Any, Any]:
    """(updates or the params themselves, new state) of a step that gives the leaves named
    in ``only`` (of ``names``) no gradient: each averaged slot of ``averaged_slots`` of those
    moved toward its leaf by ``weights(i)`` (leaf ``i``'s weights, one per averaged slot,
    for the optimizer's step), except where ``late[i]`` says its group has not joined yet;
    nothing else changes."""
    import jax.numpy as jnp

    slots = dict(state.slots)
    for j, s in enumerate(averaged_slots):
        new = []
        for i, (p, a) in enumerate(zip(leaves, slot_leaves[s])):
            if names[i] not in only:
                new.append(a)
                continue
            v = averaged(p, a, weights(i)[j])
            if late is not None and late[i] is not None:
                v = jnp.where(late[i], v, a)
            new.append(v)
        slots[s] = treedef.unflatten(new)
    out = treedef.unflatten(leaves if new_params else [jnp.zeros_like(p) for p in leaves])
    return out, state._replace(slots=slots)
