""":func:`~mithril.interop.optax_transformation` for a
:class:`~mithril.utils.optimizers.tensorwise.TensorwiseOptimizer` (Muon, Adafactor): each
tensor's ``tensor_update(xp, p, g, slots, scalars, name)`` runs inside the transformation's
``update`` with an ops namespace of JAX operations whose results stay JAX values
(:class:`TracedOps`), so the update is one XLA program: pure, jittable, composable in
``optax.chain``.

What the optimizer's own ``update`` does, the transformation does alike: the clipping
(per tensor, then ``clip_norm`` on the clipped gradients, then ``clip_value``), weight decay
(coupled, decoupled with the row's learning rate, or the math's), parameter groups (Muon's
fallback optimizer for the parameters that are not matrices, with its own groups), weight
averaging and ``nonfinite="skip"``. The slots have the optimizer's shapes
(``slot_shape``: Adafactor's factored row / column statistics, Muon's ``(0,)`` parts for
the tensors a slot does not serve), each leaf a JAX array in ``state.slots[name]``.

Differences from the optimizer's own ``update`` on the JAX backend, all rounding: the
norms it takes on the host in float64 (the global gradient norm, Adafactor's RMS of the
parameter and of the update) are taken here in float32 (float64 with ``jax_enable_x64``);
the per-step scalars, traced or computed on the host as for elementwise optimizers, are
float32 likewise. Muon's bfloat16 Newton–Schulz iteration rounds each result with
``jax.lax.reduce_precision`` (what ``astype(bfloat16)`` does eagerly, and which XLA does
not remove when it fuses).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

from ..utils.optimizers.layout import slot_shape_of
from ..utils.optimizers.traced_ops import TracedOps, traceable_update
from .optax_host_kernel import host_tensorwise
from .optax_hyperparams import not_kept, scheduled
from .optax_inputs import optax_mask, with_mask
from .optax_prologue import _prologue, _wide, forced, given_up
from .optax_scalars import (
    _INT32_MAX,
    _averaging_weights,
    _Hyper,
    _Plan,
    _row_scalars,
    _static_prologue,
    _value,
    joined,
    refuse_pinned,
)
from .optax_transform import (
    OptaxState,
    _check_hyper,
    _check_update,
    _copied_slots,
    _flatten,
    _gradients,
    _initial_hyperparams,
    _state_leaves,
    _step_lr,
)
from .optax_unreached import averages_only

__all__ = ["TracedOps", "tensorwise_transformation"]


def _traceable_update(fn: Callable) -> Callable:
    """``fn`` (a ``tensor_update``) traceable, taking the lazy scalars too."""
    return traceable_update(fn, _value)


def _scalar_source(row: Any) -> Any:
    """The optimizer whose ``scalars(step)`` a row's are: Muon's fallback rows call their
    fallback optimizer's (traced through it, not through the wrapper)."""
    from ..utils.optimizers.muon import _FallbackRow

    if not isinstance(row, _FallbackRow):
        return row
    if not row._step_offset:
        return row.fb
    fb = copy.copy(row.fb)  # (a late Muon group's: its tensors join with it, see joined)
    fb.__dict__["_step_offset"] = row._step_offset
    return fb


class _Rows:
    """One parameter structure's rows: the objects whose ``tensor_update`` runs (``rows``,
    distinct, with each tensor's ``index``), and the :class:`_Plan` of their scalars."""

    def __init__(self, opt: Any, names: list[str], shapes: list[tuple[int, ...]],
                 mode: str, traced: tuple[str, ...] = ()) -> None:
        from types import SimpleNamespace

        holder = SimpleNamespace(groups=None, layout=SimpleNamespace(
            name_list=list(names), names=tuple(names), shapes=tuple(shapes)))
        refuse_pinned(opt)
        unit = copy.copy(opt)
        unit.learning_rate = 1.0  # each row's learning rate is then its ratio to opt's
        per_tensor = unit.tensor_rows(holder)
        seen: dict[int, int] = {}
        rows: list[Any] = []
        index = []
        for row in per_tensor:
            if id(row) not in seen:
                seen[id(row)] = len(rows)
                rows.append(row)
            index.append(seen[id(row)])
        # what each row's group overrides (a traced optimizer-wide value does not reach
        # it): its group's of opt (group_rows left them on the holder), a fallback row's own
        over = [set() for _ in rows]
        if holder.groups is not None:
            for i, r in enumerate(index):
                over[r] = set(holder.groups[2][holder.groups[1][i]])
        sources = [_scalar_source(r) for r in rows]
        clips = [(getattr(r, "clip_tensor_norm", None), getattr(r, "clip_block_rms", None))
                 for r in rows]
        self.rows = rows
        self.n_own = [len(copy.copy(s).scalars(1)) for s in sources]
        self.plan = _Plan(index, sources, [float(s.learning_rate) for s in sources], mode,
                          clips=clips, traced=traced, share=functools.partial(_share, rows, over))
        self.plan.static = [_static_prologue(r) for r in rows]  # clip_value: the row's
        # adaptive clipping: each tensor with its group's (of opt's own groups, as the
        # optimizer's update clips before its per-tensor rows)
        self.plan.agc = self.plan.pre = None
        if (opt.adaptive_clip is not None or any("adaptive_clip" in g for g in opt._groups)
                or opt._pre_clipping()):
            from ..utils.optimizers.groups import resolve, views

            at, group_rows, _ = resolve(opt, names)
            own = views(opt, group_rows)
            self.plan.agc = _Plan.adaptive([own[r] for r in at])
            self.plan.pre = _Plan.pre_clip([own[r] for r in at])


def _share(rows: list[Any], over: list[set[str]], driven: dict[str, Any]
           ) -> list[dict[str, Any]]:
    """Each row's share of the traced values ``driven`` (names as in
    :mod:`.optax_hyperparams`): the optimizer's rows take its own names but those their
    group overrides (``over``; a row excluded from weight decay keeps its 0); a Muon's
    fallback rows take the whole step's clipping (Muon's) and the ``"fallback."`` names as
    their group of the fallback takes them (Muon's ``"epsilon"`` too where the fallback
    follows it, optax's one ``eps``, unless ``"fallback.epsilon"`` is traced as well), their
    learning rate factor a traced ``fallback_lr_ratio`` times their group's."""
    from ..utils.optimizers.muon import _FallbackRow
    from .optax_hyperparams import row_attrs

    own = {k: v for k, v in driven.items() if not k.startswith("fallback")}
    held = {k.split(".", 1)[1]: v for k, v in driven.items() if k.startswith("fallback.")}
    ratio = driven.get("fallback_lr_ratio")
    out = []
    for r, o in zip(rows, over):
        if not isinstance(r, _FallbackRow):
            out.append({k: v for k, v in own.items() if k not in o})
            continue
        a = {k: v for k, v in own.items() if k in ("clip_norm", "clip_value")}
        eps = {"epsilon": own["epsilon"]} if r.follows_epsilon and "epsilon" in own else {}
        a.update(row_attrs([r.group], [r.overrides], {**eps, **held})[0])
        if ratio is not None or "lr_scale" in a:
            a["lr_scale"] = (r.lr_ratio if ratio is None else ratio) * a.get("lr_scale",
                                                                               r.lr_scale)
        out.append(a)
    return out


def _check_shapes(opt: Any, names: list[str], leaves: list[Any]) -> None:
    """Muon without a fallback takes matrices only (2-D, or as ``weight_dimension_numbers``
    says; as its ``init``), unless it updates every rank itself (``convention="mlx"``)."""
    from ..errors import ShapeError
    from ..utils.optimizers.muon import Muon

    if isinstance(opt, Muon) and opt.fallback is None and not opt.owns_all():
        for n, p in zip(names, leaves):
            if opt.matrix_axes(n, tuple(p.shape)) is None:  # (weight_dimension_numbers)
                raise ShapeError(f"Muon(fallback=None) updates matrices only (as "
                                 f"torch.optim.Muon: 2-D, or what weight_dimension_numbers "
                                 f"names); params['{n}'] has shape {tuple(p.shape)}:"
                                 f" give Muon a fallback (e.g. fallback=AdamW()) for the others")


def tensorwise_transformation(opt: Any, learning_rate: Any, scalars: str,
                              traced: tuple[str, ...] = (),
                              sched: dict[str, Any] | None = None) -> Any:
    """The transformation of a tensorwise optimizer ``opt`` (already checked and copied by
    :func:`~mithril.interop.optax_transform.optax_transformation`); ``traced``: its checked
    ``traced_hyperparams``, set on each of its own rows as :class:`_Hyper` values;
    ``sched``: its checked ``schedules``, set as the schedules' values."""
    import jax
    import jax.numpy as jnp
    import optax

    from ..utils.optimizers.engines.jax_finite import finite_grads, finite_step

    opt_name = type(opt).__name__
    own = tuple(opt.slot_names())
    full = tuple(opt.full_slot_names())
    averaged = full[len(own):]
    copied = _copied_slots(opt)
    xp = TracedOps()
    structures: dict[tuple, _Rows] = {}
    sched = sched or {}
    live = tuple(sorted({*traced, *sched}))  # what the program reads at every update

    def rows_for(treedef: Any, names: list[str], leaves: list[Any], params: Any) -> _Rows:
        shapes = [tuple(p.shape) for p in leaves]  # which tensors are matrices: Muon's rows
        mask = optax_mask(opt, params, names)  # (optax's mask function: by name, per tree)
        key = (treedef, tuple(shapes), None if mask is None else tuple(mask.items()))
        got = structures.get(key)
        if got is None:
            got = structures[key] = _Rows(with_mask(opt, mask), names, shapes, scalars, live)
        return got

    def init(params: Any) -> OptaxState:
        leaves, treedef, names = _flatten(params, opt_name)
        _check_shapes(opt, names, leaves)
        slots = {}
        for s in full:
            if s in copied:
                slots[s] = treedef.unflatten([jnp.array(p, copy=True) for p in leaves])
            else:
                v = opt.slot_init(s)
                slots[s] = treedef.unflatten([jnp.full(tuple(slot_shape_of(opt, s, p.shape, n)), v,
                                                       p.dtype) for n, p in zip(names, leaves)])
        return OptaxState(jnp.zeros((), jnp.int32), slots, {}, {},
                          _initial_hyperparams(opt, learning_rate, sched))

    def update(updates: Any, state: OptaxState, params: Any = None, *,
               new_params: bool = False, hyper: Any = None, missed: Any = None,
               average_only: Any = (), host_kernel: list | None = None
               ) -> tuple[Any, OptaxState]:
        """(updates, new state); ``new_params=True``: (the new params, new state)
        (what ``make_train_step`` takes: no ``p + (new − p)`` round trip); ``hyper``: the
        ``[hi, lo]`` rows of the traced hyperparameters; ``missed``: per row of scalars
        (one per tensor: :mod:`mithril.utils.train_step_own_counts`), the applied steps its
        tensor had no gradient at, left out of the row's count (``t − missed``), not out of
        the optimizer's (the averages, a group's joining); ``average_only``: names of leaves
        that had no gradient: only their averages move, ``updates`` are not read
        (:mod:`.optax_unreached`); ``host_kernel``: as the elementwise transformation's
        (:func:`.optax_host_kernel.host_tensorwise`: Adafactor's step as one call)."""
        _check_update(opt_name, state, params)
        _check_hyper(opt_name, traced, hyper)
        leaves, treedef, names = _flatten(params, opt_name)
        grads = _gradients(opt_name, updates, treedef, leaves, names)
        rows = rows_for(treedef, names, leaves, params)
        plan = rows.plan
        slot_leaves = _state_leaves(opt_name, state, "slots", full, treedef, names, leaves,
                                    lambda s, shape, n: slot_shape_of(opt, s, shape, n))
        count = state.count
        t = count + 1
        lr = _step_lr(learning_rate, state)
        driven = {k: _Hyper(hyper[i, 0], hyper[i, 1]) for i, k in enumerate(traced)}
        now = scheduled(sched, count, state.hyperparams)
        driven.update(now)
        # (each row's: a group's own ema_decay / ema_start / swa_start, as the eager step's)
        avg_w = [_averaging_weights(r, t) for r in rows.rows]
        late = joined(plan, t)  # (groups that join after the first steps: see joined)
        if average_only:
            return averages_only(state, treedef, leaves, names, average_only, slot_leaves,
                                 averaged, lambda i: avg_w[plan.index[i]], late, new_params)
        t_rows = t if missed is None else t - jnp.asarray(missed).astype(t.dtype)
        table = _row_scalars(plan, t_rows, lr, driven, _wide())
        attrs = plan.attrs(driven)
        skip = opt.nonfinite == "skip"
        if late is not None:
            grads = [g if j is None else jnp.where(j, g, jnp.zeros_like(g))
                     for g, j in zip(grads, late)]

        def traced_update() -> tuple[list[Any], dict[str, list[Any]], list[Any]]:
            """Each tensor's ``tensor_update`` traced (as XLA compiles it on any device):
            (new params, new slots by name, the gradients ``"skip"`` requires finite)."""
            gs, ps, _, checked = _prologue(opt, plan, leaves, grads, table, attrs, names)

            new_ps: list[Any] = []
            new_slots: dict[str, list[Any]] = {s: list(slot_leaves[s]) for s in full}
            for i, (p, g) in enumerate(zip(ps, gs)):
                r = plan.index[i]
                row = copy.copy(rows.rows[r])
                row.__dict__.update(attrs[r])
                row.learning_rate = jnp.asarray(lr) * plan.scales[r]
                acc = jnp.promote_types(p.dtype, jnp.float32)
                scal = tuple(x.astype(acc) for x in table[r][1:1 + rows.n_own[r]])
                mine = {s: slot_leaves[s][i] for s in row.update_slots()}
                fn = _traceable_update(type(row).tensor_update)
                try:
                    new_p, out = fn(row, xp, p, g, dict(mine), scal, names[i])
                except Exception as e:
                    kind = type(e).__name__
                    if "Tracer" not in kind and "Concretization" not in kind:
                        raise
                    raise TypeError(f"{opt_name}.tensor_update does not run on traced JAX values "
                                    f"({type(e).__name__}); it must use the ops namespace, "
                                    f"arithmetic and math / max / min only") from e
                if set(out) != set(mine):
                    raise RuntimeError(f"{type(row).__name__}.tensor_update must return every slot "
                                       f"{sorted(mine)}, got {sorted(out)}")
                new_p = jnp.asarray(new_p).astype(p.dtype)
                new_ps.append(new_p)
                for s, v in out.items():
                    old = slot_leaves[s][i]
                    v = jnp.asarray(v)
                    if v.shape != old.shape:
                        raise RuntimeError(f"{type(row).__name__}.tensor_update returned slot "
                                           f"{s!r} of '{names[i]}' with shape {v.shape}, not "
                                           f"{old.shape}")
                    new_slots[s][i] = v.astype(old.dtype)
                for s, w in zip(averaged, avg_w[r]):
                    a = slot_leaves[s][i]
                    w = w.astype(a.dtype)
                    new_slots[s][i] = jnp.where(w == 1, new_p,
                                                jnp.where(w != 0, a + w * (new_p - a), a))
            return new_ps, new_slots, checked

        fused = None if host_kernel is None \
            else host_tensorwise(opt, rows, leaves, grads, table, attrs, slot_leaves, full,
                                 avg_w, forced(opt, state.hyperparams) if skip else None)
        if fused is not None:
            host_kernel.append(fused[2:4])
            new_ps, new_slots = list(fused[0]), {s: list(v) for s, v in fused[1].items()}
        else:
            new_ps, new_slots, checked = traced_update()
        for i, j in enumerate(late or ()):  # a group not joined yet: all kept (the kernel's
            if j is not None:  # results too: XLA copies such a leaf before the call)
                new_ps[i] = jnp.where(j, new_ps[i], leaves[i])
                for s in full:
                    new_slots[s][i] = jnp.where(j, new_slots[s][i], slot_leaves[s][i])

        new_count = jnp.minimum(count, _INT32_MAX - 1) + 1
        if skip and fused is not None:  # (the kernel left every array as it was, skipped)
            finite, counts = given_up(opt, state.hyperparams, fused[2] & fused[3])
            new_count = jnp.where(finite, new_count, count)
        elif skip:
            finite = finite_grads(checked) & finite_step(new_ps, list(new_slots.values()))
            finite, counts = given_up(opt, state.hyperparams, finite)  # (finite: applied)
            # (one conditional, not a select per array: see optax_transform's)
            new_ps, new_slots, new_count = jax.lax.cond(
                finite, lambda a, b: a, lambda a, b: b, (new_ps, new_slots, new_count),
                (list(leaves), {s: list(slot_leaves[s]) for s in new_slots}, count))

        out_updates = treedef.unflatten(new_ps if new_params else
                                        [a - b for a, b in zip(new_ps, leaves)])
        hyper = dict(state.hyperparams)
        if callable(learning_rate):  # (a fixed one is not in the state: see _initial_hyperparams)
            hyper["learning_rate"] = jnp.asarray(lr)
        hyper.update({k: v for k, v in now.items() if k not in not_kept(sched)})
        if skip:
            hyper.update(counts)
        new_state = OptaxState(new_count, {s: treedef.unflatten(v) for s, v in new_slots.items()},
                               dict(state.tensor_slots), dict(state.values), hyper)
        return out_updates, new_state

    update.host_kernel = True  # type: ignore[attr-defined] - it takes host_kernel=
    return optax.GradientTransformation(init, update)

