"""The elementwise update of :func:`~.optax_transform.optax_transformation` as one call of
the engines' fused CPU loop (:mod:`~mithril.utils.optimizers.engines.xla_ffi`), for the
one-program train step on a CPU: XLA then compiles one custom call instead of the math and
the finiteness probe of every tensor (a 50-layer MLP's first step: ~0.8 s less on two
cores). The table of scalars holds what the NumPy engine's holds (its ``prologue``: global
clip-norm scale, clip value, coupled L2 factor, decoupled keep factor, then the row's
scalars), so the result is the NumPy engine's step. A two-pass optimizer (LAMB, LARS,
Prodigy...) makes two calls, its per-tensor sums then the update, as the NumPy engine's
two passes; ``nonfinite="skip"`` runs the kernel's skip variant, which stores nothing where
the step is not finite (the program then needs no copy of the old arrays)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .optax_scalars import _value


def host_update(opt: Any, plan: Any, leaves: list[Any], grads: list[Any],
                rows: list[list[Any]], attrs: list[dict[str, Any]],
                slot_leaves: dict[str, list[Any]], full: tuple[str, ...],
                dtypes: dict[str, Any], skip: Any = None, first: tuple | None = None
                ) -> tuple | None:
    """(new params, new slots by name, gradients finite, new values finite, new tensor
    slots, new values) after the fused kernel's call(s), or None where the step does not
    fit it (the caller traces the update then): clipping before the math (``adaptive_clip``,
    centralization, per-tensor norms), gradients of another dtype, and what
    :func:`.xla_ffi.usable` refuses.
    ``skip`` (``nonfinite="skip"`` only; None otherwise): whether the step is forced
    (``max_consecutive_skips`` reached), for the kernel's skip variant
    (:func:`.xla_ffi.fused_update`: a step not applied leaves every array as it was).
    ``first``: a two-pass optimizer's ``(between, own slots, own scalars' count)``, where
    ``between`` is its step between the passes (per-tensor sums → extra columns, tensor
    slots, values): the first pass is one call too (:func:`.xla_ffi.fused_reduce`, on the
    optimizer's own slots and scalars), the second has a row of scalars per tensor."""
    import jax
    import jax.numpy as jnp

    from ..utils.optimizers.engines import xla_ffi

    if getattr(plan, "pre", None) is not None or plan.agc is not None or plan.tensor_clip:
        return None
    if any(g.dtype != p.dtype or g.shape != p.shape for g, p in zip(grads, leaves)):
        return None
    if not xla_ffi.usable(leaves, [dtypes.get(s) for s in full]):
        return None
    dt = leaves[0].dtype
    gscale = _gscale(opt, attrs, grads)
    clip, table = False, []
    for r, row in enumerate(rows):
        cv, l2, dwd = plan.static[r]
        live, a = plan.live[r], attrs[r]
        c: Any = np.inf  # (no clip in this row: an infinite bound, as the NumPy engine's)
        if cv > 0 or "clip_value" in live:
            clip, c = True, _value(a.get("clip_value", cv))
        decay: Any = 0.0
        if l2 or ("weight_decay" in live and plan.decay[r] == "l2"):
            decay = _value(a.get("weight_decay", l2))
        decays = dwd or ("weight_decay" in live and plan.decay[r] == "decoupled")
        table.append(jnp.stack([jnp.asarray(x).astype(dt) for x in
                                (gscale, c, decay, row[0] if decays else 1.0, *row[1:])]))
    table, group = jnp.stack(table), np.asarray(plan.index, np.int32)
    n_scal, tensors, values = len(rows[0]) - 1, None, None
    if first is not None:
        between, own, n_own = first
        cut = 4 + n_own  # (the first pass reads the own scalars, not the averages')
        sums = [] if not opt.reductions else xla_ffi.fused_reduce(
            opt.reduce_math(), opt.reductions, clip, table[:, :cut], group, leaves, grads,
            [list(slot_leaves[s]) for s in own])
        extra, tensors, values = between(sums)
        per = table[group]  # a row per tensor: its group's, the extra columns inserted
        if skip is not None:  # inf/NaN tensor slots or values (DoG's Σ‖g‖² past the
            # dtype's range, its update finite): a NaN gradient scale makes the kernel's
            # dry pass skip the step, unless it is forced (max_consecutive_skips)
            from ..utils.optimizers.engines.jax_finite import finite_step

            ok = finite_step([], [], jax.tree_util.tree_leaves((tensors, values))) | skip
            per = per.at[:, 0].set(jnp.where(ok, per[:, 0], jnp.nan))
        table = jnp.concatenate([per[:, :cut], *(e.astype(dt)[:, None] for e in extra),
                                 per[:, cut:]], axis=1)
        group, n_scal = np.arange(len(leaves), dtype=np.int32), n_scal + len(extra)
    new_ps, new_slots, gf, vf = xla_ffi.fused_update(
        opt.full_kernel_math(n_scal), clip, table, group, leaves, grads,
        [list(slot_leaves[s]) for s in full], skip=skip)
    return new_ps, dict(zip(full, new_slots)), gf, vf, tensors, values


def _gscale(opt: Any, attrs: list[dict[str, Any]], grads: list[Any]) -> Any:
    """The gradients' factor of clipping by the global norm (traced), 1.0 without it."""
    import jax.numpy as jnp

    from ..utils.optimizers.engines.common import norm_scale
    from ..utils.optimizers.engines.jax_engine import scaled_norm

    clip_norm = _value(attrs[0].get("clip_norm", opt.clip_norm)) if attrs else opt.clip_norm
    if clip_norm is None:
        return 1.0
    norm = scaled_norm(grads)
    return norm_scale(jnp.asarray(clip_norm, norm.dtype), norm,
                      jnp.asarray(opt.clip_eps, norm.dtype))


def host_tensorwise(opt: Any, rows: Any, leaves: list[Any], grads: list[Any],
                    table: list[list[Any]], attrs: list[dict[str, Any]],
                    slot_leaves: dict[str, list[Any]], full: tuple[str, ...],
                    avg_w: list[list[Any]], skip: Any = None) -> tuple | None:
    """:func:`host_update` for a tensorwise optimizer (``rows``: its
    :class:`~mithril.interop.optax_tensorwise._Rows`; ``table``: each row's scalars,
    ``avg_w``: each row's averages' weights): (new params, new slots by name, gradients finite,
    new values finite), or None where no kernel takes the step. Adafactor's (torch's
    convention, ``fused=True``) and SM3's run as one call (:mod:`.xla_ffi_tensorwise`),
    the kernel's table a row per tensor made here from the rows' scalars, as the NumPy
    engine's; the same refusals as :func:`host_update`'s, and a traced hyperparameter the
    math branches on (Adafactor's ``epsilon``, SM3's ``beta2``)."""
    import jax.numpy as jnp

    from ..utils.optimizers.adafactor import Adafactor
    from ..utils.optimizers.engines import xla_ffi, xla_ffi_tensorwise
    from ..utils.optimizers.engines.sm3_kernels import MAX_RANK
    from ..utils.optimizers.sm3 import SM3

    kinds = {Adafactor: (_adafactor_row, xla_ffi_tensorwise.fused_adafactor),
             SM3: (_sm3_row, xla_ffi_tensorwise.fused_sm3)}
    cls = next((c for c in kinds if isinstance(opt, c)), None)
    plan = rows.plan
    if cls is None or full[:len(cls.slots)] != cls.slots or len(full) > len(cls.slots) + 2 \
            or any(not isinstance(r, cls) for r in rows.rows):
        return None
    if cls is Adafactor and any(r.convention != "torch" or not r.fused for r in rows.rows):
        return None
    if cls is SM3 and any(len(p.shape) > MAX_RANK for p in leaves):
        return None
    if plan.pre is not None or plan.agc is not None or plan.tensor_clip:
        return None
    if any(g.dtype != p.dtype or g.shape != p.shape for g, p in zip(grads, leaves)) or any(
            x.dtype != p.dtype for s in full for x, p in zip(slot_leaves[s], leaves)):
        return None
    if not xla_ffi.usable(leaves, []):
        return None
    dt = leaves[0].dtype
    gscale = _gscale(opt, attrs, grads)
    make, call = kinds[cls]
    clip, per_row = False, []
    for r, row in enumerate(rows.rows):
        cv, l2, dwd = plan.static[r]
        live, a = plan.live[r], attrs[r]
        c: Any = np.inf
        if cv > 0 or "clip_value" in live:
            clip, c = True, _value(a.get("clip_value", cv))
        if dwd or ("weight_decay" in live and plan.decay[r] == "decoupled"):
            return None
        l2 = _value(a["weight_decay"]) if "weight_decay" in live and plan.decay[r] == "l2" \
            else l2
        got = make(row, a, table[r], gscale, c, l2, dt)
        if got is None:
            return None
        per_row.append(jnp.stack([jnp.asarray(v).astype(dt) for v in (*got, *avg_w[r])]))
    H = jnp.stack(per_row)[np.asarray(plan.index, np.int32)]
    new_ps, new_slots, gf, vf = call(H, clip, leaves, grads, [list(slot_leaves[s]) for s in full],
                                     skip=skip)
    return new_ps, dict(zip(full, new_slots)), gf, vf


def _hyper(row: Any, a: dict[str, Any], name: str) -> Any:
    """A row's hyperparameter ``name``: traced where ``a`` (its traced ones) has it."""
    return _value(a[name]) if name in a else getattr(row, name)


def _adafactor_row(row: Any, a: dict[str, Any], scalars: list[Any], gscale: Any, c: Any,
                   l2: Any, dt: Any) -> tuple | None:
    """Adafactor's kernel columns (:data:`.factored_kernels.GS` ...) for one row: None
    where it has coupled decay (torch's is in its math) or a traced ``epsilon``."""
    import jax.numpy as jnp

    if l2 or "epsilon" in a:
        return None
    lr, w, rho = scalars[1:4]
    wd = _hyper(row, a, "weight_decay")
    keep = 1 - lr * wd if "weight_decay" in a or wd != 0 else 1.0
    eps1, eps2 = row.epsilon
    eps1 = float(np.finfo(dt).eps) if eps1 is None else eps1
    w = jnp.asarray(w).astype(dt)
    return (gscale * (-1.0 if row.maximize else 1.0), c, keep, w, 1 - w, rho, eps1,
            eps1 * eps1, eps2, _hyper(row, a, "d"))  # (torch's lerp: 1 − w in the dtype)


def _sm3_row(row: Any, a: dict[str, Any], scalars: list[Any], gscale: Any, c: Any,
             l2: Any, dt: Any) -> tuple | None:
    """SM3's kernel columns (:data:`.sm3_kernels.GS` ...) for one row: None where its
    ``beta2`` is traced (the math branches on ``beta2 == 1``)."""
    if "beta2" in a:
        return None
    b1, b2 = _hyper(row, a, "momentum"), row.beta2
    return (gscale, c, l2, scalars[1], 1.0 if b2 == 1.0 else 1.0 - b2, b2,
            _hyper(row, a, "epsilon"), 1 - b1, b1)
