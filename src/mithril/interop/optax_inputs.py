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
                  shape_of: Any = None, dtypes: dict[str, Any] | None = None
                  ) -> dict[str, list[Any]]:
    """The leaves of ``state``'s slots of ``kind`` (``"slots"`` or ``"tensor_slots"``), each
    slot a tree of the params' structure whose leaf for parameter ``p`` has shape
    ``shape_of(slot, p.shape, name)`` (default: ``p``'s; ``()`` for tensor slots); a
    ``ValueError`` naming the slot (and key) for a state of another optimizer or other params
    (raised while tracing, before a buffer is donated); ``dtypes``: the slots kept in a dtype
    of their own (:func:`slot_dtypes`), the others in their parameter's."""
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
            own = (dtypes or {}).get(s)
            if shape_of is None and getattr(x, "dtype", p.dtype) != (own or p.dtype):
                why = (f"expected {own} (its slot_dtypes / mu_dtype)" if own is not None else
                       f"the parameter {p.dtype} (params cast after init? init the state "
                       f"from the params as they are now)")
                raise ValueError(f"{opt_name}: the state's slot '{s}' for '{n}' has dtype "
                                 f"{x.dtype}, {why}")
    return out


def _gradients(opt_name: str, updates: Any, treedef: Any, leaves: list[Any],
               names: list[str]) -> list[Any]:
    import jax.numpy as jnp

    try:
        given = treedef.flatten_up_to(updates)
    except (ValueError, TypeError, KeyError) as e:  # JAX's message names the keys
        raise ValueError(f"{opt_name}: the updates (gradients) do not have the params' "
                         f"structure: {e}{_where(names, updates)}") from None
    for g, n in zip(given, names):
        if g is None:
            raise ValueError(f"{opt_name}: the update for '{n}' is None (give zeros for a "
                             f"parameter without a gradient)")
    grads = [jnp.asarray(g) for g in given]
    for g, p, n in zip(grads, leaves, names):
        if g.shape != p.shape:
            raise ValueError(f"{opt_name}: the update for '{n}' has shape {g.shape}, the "
                             f"parameter {p.shape}")
        # (cast to the parameter's dtype later: a complex one would lose its imaginary part
        # silently, where optax steps with it; a bool one is no gradient)
        if jnp.issubdtype(g.dtype, jnp.complexfloating) or g.dtype == jnp.bool_:
            raise TypeError(f"{opt_name}: the update for '{n}' has dtype {g.dtype}, the "
                            f"parameter {p.dtype}: give a real gradient of the parameter's "
                            f"kind (complex parameters are refused)")
    return grads


def _where(names: list[str], updates: Any) -> str:
    """Which key a mismatched updates tree lacks or has beyond the params (JAX's message
    names the node's type or keys, not where it is: "List arity mismatch: 2 != 1")."""
    import jax

    try:
        got = [_key_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
    except Exception:  # noqa: BLE001 - only a better message at stake
        return ""
    missing = [n for n in names if n not in set(got)]
    extra = [n for n in got if n not in set(names)]
    parts = ([f"no update for '{missing[0]}'"] if missing else []) + \
        ([f"an update for '{extra[0]}', which is no parameter"] if extra else [])
    return f" -- {'; '.join(parts)}" if parts else ""


# -- optax's mask functions ------------------------------------------------------------------
def optax_mask(opt: Any, params: Any, names: list[str]) -> dict[str, bool] | None:
    """The flat name -> bool dict of ``opt``'s ``weight_decay_mask`` where it is an optax
    mask function (of the whole params pytree, as ``optax.masked`` / ``optax.adamw(mask=)``
    call it: ``lambda p: jax.tree.map(lambda x: x.ndim > 1, p)``), returning a pytree of
    bools of the params' structure or a prefix of it (a dict for some subtrees, as optax
    takes); None for any other mask (ours: a function of one name, a regex, a list, a dict;
    :mod:`~mithril.utils.optimizers.name_patterns`). Which kind a function is: called with
    the params, one that returns a pytree (not a single bool) is optax's; else it is ours
    and gets one name at a time (``lambda p: tree_map_with_path(...)`` returns a bool for a
    string, ``lambda n: "bias" not in n`` one for a dict: neither call alone tells them
    apart). Its bools must be Python's or concrete (``x.ndim > 1``; not traced values)."""
    import jax

    mask = getattr(opt, "weight_decay_mask", None)
    if params is None or not callable(mask) or isinstance(mask, (str, list, dict)):
        return None
    try:
        tree = mask(params)
    except Exception:  # noqa: BLE001 - a function of one name: the groups call it
        return None
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)):
        return None  # (a bool, or anything else, for the whole params: ours, by name)
    where = f"{type(opt).__name__}: weight_decay_mask (an optax mask function of the params)"
    try:  # (a bool for a whole subtree: optax's mask may be a prefix of the params')
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree, params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where} returned a pytree that is not the params' structure nor a "
                         f"prefix of it: {e}") from None
    out = {}
    for path, v in jax.tree_util.tree_flatten_with_path(full)[0]:
        name = _key_name(path)
        if isinstance(v, jax.core.Tracer):
            raise TypeError(f"{where} gave a traced value for '{name}': it must be a bool "
                            f"known while tracing (x.ndim > 1, a key path), as optax.masked "
                            f"needs")
        if np.ndim(v) != 0 or np.asarray(v).dtype != np.bool_:
            raise TypeError(f"{where} gave {type(v).__name__} for '{name}', not a bool")
        out[name] = bool(v)
    return out


def with_mask(opt: Any, mask: dict[str, bool] | None) -> Any:
    """``opt``, or a copy whose ``weight_decay_mask`` is ``mask`` (:func:`optax_mask`'s)."""
    import copy

    if mask is None:
        return opt
    view = copy.copy(opt)
    view.__dict__["_wd_mask"] = mask
    return view


# -- slots of their own dtype (optax's mu_dtype) ---------------------------------------------
#: the first-moment slots optax's ``mu_dtype`` names (Adam's ``m``, AdEMAMix's two EMAs)
MU_SLOTS = ("m", "m1", "m2")


def slot_dtypes(opt: Any, copied: tuple[str, ...], mu_dtype: Any,
                given: Any) -> dict[str, Any]:
    """Slot name -> the dtype it is kept in, for the slots ``mu_dtype`` (optax's: the
    first moment, :data:`MU_SLOTS`) and ``given`` (``slot_dtypes=``) name; the others
    keep their parameter's dtype. ``ValueError`` / ``TypeError`` naming the slot or dtype."""
    import jax.numpy as jnp

    name = type(opt).__name__
    own = tuple(opt.slot_names())
    out: dict[str, Any] = {}
    if given is not None:
        if not isinstance(given, dict):
            raise TypeError(f"{name}: slot_dtypes must be a dict of slot name -> dtype, got "
                            f"{type(given).__name__}")
        out.update(given)
    if mu_dtype is not None:
        mu = [s for s in own if s in MU_SLOTS]
        if not mu:
            raise ValueError(f"{name}: mu_dtype: no first-moment slot {list(MU_SLOTS)} among "
                             f"its slots {list(own)}; name one in slot_dtypes=")
        out.update({s: out.get(s, mu_dtype) for s in mu})
    checked = {}
    for s, dt in out.items():
        if s not in own:
            raise ValueError(f"{name}: slot_dtypes['{s}']: no such slot (its slots: "
                             f"{list(own)})")
        if s in copied:
            raise ValueError(f"{name}: slot_dtypes['{s}']: the slot starts as a copy of the "
                             f"params, in their dtype")
        if dt is None:
            continue
        if not isinstance(dt, (type, str, np.dtype)) and hasattr(dt, "dtype"):
            dt = dt.dtype  # (inject_hyperparams calls jnp.bfloat16 as a schedule: its value)
        try:
            dt = jnp.dtype(dt)
        except TypeError as e:
            raise TypeError(f"{name}: slot_dtypes['{s}']: {dt!r} is not a dtype ({e})") from None
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{name}: slot_dtypes['{s}']: {dt} is not a floating-point dtype")
        checked[s] = dt
    return checked
