"""The checks of what an optax transformation's ``init`` / ``update`` is given, shared by
:mod:`.optax_transform` and :mod:`.optax_tensorwise`: the params flattened (floating point),
the gradients of the params' structure and shapes, the state's slots of the params'
structure, shapes and dtypes, and the ``hyper`` rows; each a clear error naming the key
(raised while tracing, before a buffer is donated)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .optax_transform import OptaxState

__all__: list[str] = []


def _key_name(path: Any) -> str:
    import jax

    return jax.tree_util.keystr(path, simple=True, separator="/")


def _check_hyper(opt_name: str, traced: tuple[str, ...], hyper: Any) -> None:
    """``update(hyper=...)`` holds a ``[hi, lo]`` row per traced hyperparameter."""
    got = (0, 2) if hyper is None else tuple(np.shape(hyper))
    if got != (len(traced), 2):
        raise ValueError(f"{opt_name}: update(hyper=...) must be the [hi, lo] pairs of "
                         f"the traced hyperparameters {list(traced)} (shape "
                         f"({len(traced)}, 2)), got shape {got}")


def _flatten(params: Any, opt_name: str) -> tuple[list[Any], Any, list[str]]:
    """The leaves (floating point, checked), the tree structure and the key paths."""
    import jax
    import jax.numpy as jnp

    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [jnp.asarray(x) for _, x in with_path]
    for (path, _), x in zip(with_path, leaves):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{opt_name}: params['{_key_name(path)}'] has dtype {x.dtype}; "
                            f"optimizers need floating-point parameters")
    return leaves, treedef, [_key_name(p) for p, _ in with_path]


def _state_leaves(opt_name: str, state: OptaxState, kind: str, expected: tuple[str, ...],
                  treedef: Any, names: list[str], leaves: list[Any],
                  shape_of: Any = None) -> dict[str, list[Any]]:
    """The leaves of ``state``'s slots of ``kind`` (``"slots"`` or ``"tensor_slots"``), each
    slot a tree of the params' structure whose leaf for parameter ``p`` has shape
    ``shape_of(slot, p.shape, name)`` (default: ``p``'s; ``()`` for tensor slots); a
    ``ValueError`` naming the slot (and key) for a state of another optimizer or other params
    (raised while tracing, before a buffer is donated)."""
    held = getattr(state, kind)
    if not isinstance(held, dict) or set(held) != set(expected):
        got = sorted(held) if isinstance(held, dict) else type(held).__name__
        raise ValueError(f"{opt_name}: the state's {kind.replace('_', ' ')} are {got}, this "
                         f"transformation's {sorted(expected)}: a state of another optimizer?")
    out = {}
    for s in expected:
        try:
            out[s] = treedef.flatten_up_to(held[s])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{opt_name}: the state's slot '{s}' does not have the params' "
                             f"structure (a state of other params?): {e}") from None
        for n, x, p in zip(names, out[s], leaves):
            want = (() if kind == "tensor_slots" else p.shape) if shape_of is None else \
                shape_of(s, p.shape, n)
            if tuple(getattr(x, "shape", ())) != tuple(want):
                raise ValueError(f"{opt_name}: the state's slot '{s}' for '{n}' has shape "
                                 f"{tuple(getattr(x, 'shape', ()))}, expected {tuple(want)} (a "
                                 f"state of other params?)")
            # (elementwise: init makes each slot in its param's dtype; a param cast since
            # would silently turn the slot into the new dtype, where optax keeps the state's)
            if shape_of is None and getattr(x, "dtype", p.dtype) != p.dtype:
                raise ValueError(f"{opt_name}: the state's slot '{s}' for '{n}' has dtype "
                                 f"{x.dtype}, the parameter {p.dtype} (params cast after "
                                 f"init? init the state from the params as they are now)")
    return out


def _gradients(opt_name: str, updates: Any, treedef: Any, leaves: list[Any],
               names: list[str]) -> list[Any]:
    import jax.numpy as jnp

    try:
        given = treedef.flatten_up_to(updates)
    except (ValueError, TypeError, KeyError) as e:  # JAX's message names the keys
        raise ValueError(f"{opt_name}: the updates (gradients) do not have the params' "
                         f"structure: {e}") from None
    for g, n in zip(given, names):
        if g is None:
            raise ValueError(f"{opt_name}: the update for '{n}' is None (give zeros for a "
                             f"parameter without a gradient)")
    grads = [jnp.asarray(g) for g in given]
    for g, p, n in zip(grads, leaves, names):
        if g.shape != p.shape:
            raise ValueError(f"{opt_name}: the update for '{n}' has shape {g.shape}, the "
                             f"parameter {p.shape}")
    return grads
