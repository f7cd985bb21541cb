"""The one-program JAX train step's update of an optimizer that runs a whole base
optimizer's update inside its own (:class:`~mithril.utils.optimizers.outer_wrapper.OuterWrapper`):
:class:`~mithril.utils.optimizers.Mechanize` and
:class:`~mithril.utils.optimizers.ScheduleFree`, each as an optax transformation that runs
the base's (``inner``) and its own math around it, traced, so that
:func:`~mithril.utils.training.make_train_step` keeps forward, backward and the whole update
one ``jax.jit`` program.

:class:`~mithril.utils.optimizers.DifferentiallyPrivate` is one too, for the count it
keeps: the train step aggregates the per-example gradients it is given
(:mod:`~mithril.utils.train_step_private`) and this transformation's ``updates`` are their
noised mean.

The state is the base's :class:`~.optax_transform.OptaxState` with the wrapper's own slots
(Mechanic's ``"mechanic_x0"``, schedule-free's ``"z"``) and values (Mechanic's
``"mechanic_count"``, ``"mechanic_r0"`` ...; ``"weight_sum"``, ``"max_lr"``; ``"dp_count"``) beside the
base's, under the names the wrapper's ``OptimizerState`` keeps them (so
:meth:`~mithril.utils.training.TrainStep.to_optimizer_state` and ``from_optimizer_state``
convert them as any other). The math is the wrapper's ``update`` (its class docs); the
scalars are in the values' dtype (float32 unless ``jax_enable_x64``), where the wrapper's own
``update`` keeps them in float64 on the host: rounding apart, the same numbers. A step the
base skips (``nonfinite="skip"``: its count stays) is skipped here too. The wrapper's own
hyperparameters are baked into the program (a change builds it anew); the learning rate is
the state's, as the base's.

Not the public :func:`~.optax_transform.optax_transformation`, which refuses a wrapper:
in optax, ``optax.contrib.mechanize`` / ``schedule_free`` wrap a base transformation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..utils.optimizers.differentially_private import COUNT, DifferentiallyPrivate
from ..utils.optimizers.mechanize import X0, Mechanize
from ..utils.optimizers.schedule_free_wrapper import ScheduleFree

__all__ = ["check_own_state", "is_outer", "outer_base", "outer_transformation", "wrappers"]

#: the wrappers the program runs, by class
_OUTER = (Mechanize, ScheduleFree, DifferentiallyPrivate)
#: the wrappers' own step counts: int32 in the state (a float32 count stops at 2**24, and
#: DP-SGD's noise is drawn for its step: the same draw every step after)
_COUNTS = ("mechanic_count", COUNT)


def is_outer(opt: Any) -> bool:
    """Whether ``opt`` is a wrapper :func:`outer_transformation` runs."""
    return isinstance(opt, _OUTER)


def wrappers(opt: Any) -> list[Any]:
    """``opt`` and the base optimizers of the wrappers it is made of (these and SAM, whose
    second gradient the train step's program takes: :mod:`~mithril.utils.train_step_sam`),
    outermost first: the last is the one the wrappers wrap."""
    from ..utils.optimizers.sam import SAM

    chain = [opt]
    while is_outer(chain[-1]) or isinstance(chain[-1], SAM):
        chain.append(chain[-1].base_optimizer)
    return chain


def outer_base(opt: Any) -> Any:
    """The optimizer a chain of wrappers ends at (``opt`` itself where it is none)."""
    return wrappers(opt)[-1]


def one_program(optimizer: Any) -> bool:
    """Whether the JAX program can hold ``optimizer``'s update: it is made of the slots,
    scalars and math (or tensor_update) an optax transformation runs, or is a wrapper
    (Mechanize, ScheduleFree, SAM, DP-SGD's aggregation at the top) of such a one."""
    from .optax_special import classify

    chain = wrappers(optimizer)
    if any(isinstance(w, DifferentiallyPrivate) for w in chain[1:]):
        return False  # (a DP-SGD's update under another wrapper takes no batch gradient)
    if any(getattr(w.base_optimizer, "needs_loss", False) and not getattr(w, "needs_loss", False)
           for w in chain[:-1]):  # (a wrapper that hands its base no loss, a Mechanize's, a
        return False  # DP-SGD's (the batch's loss is not private): refused by the base there)
    try:  # (the base of the wrappers: elementwise, two-pass or tensorwise)
        classify(outer_base(optimizer))
    except TypeError:
        return False
    return True


def _split(state: Any, slots: tuple[str, ...], values: tuple[str, ...]) -> tuple[Any, dict,
                                                                                 dict]:
    """(the base's part of ``state``, the wrapper's slots, its values)."""
    inner = state._replace(slots={k: v for k, v in state.slots.items() if k not in slots},
                           values={k: v for k, v in state.values.items() if k not in values})
    return inner, {k: state.slots[k] for k in slots}, {k: state.values[k] for k in values}


def _counted(count: Any) -> Any:
    """``count + 1``, saturated at int32's largest (as the state's step count)."""
    from .optax_scalars import _INT32_MAX

    return count + (count < _INT32_MAX).astype(count.dtype)


def _vdot(a: dict[str, Any], b: dict[str, Any]) -> Any:
    import jax.numpy as jnp

    from .optax_prologue import _wide

    wide = _wide()
    return sum((jnp.vdot(a[n].astype(wide), b[n].astype(wide)) for n in a),
               jnp.zeros((), wide))


def _mechanize(opt: Mechanize) -> Callable:
    """Mechanic's step (:class:`~mithril.utils.optimizers.Mechanize`'s docs)."""
    import jax.numpy as jnp

    k = len(opt.betas)
    names = {v: tuple(f"mechanic_{v}{i}" for i in range(k)) for v in "rmvs"}

    def step(params: dict, grads: dict, slots: dict, values: dict, lr: Any,
             inner: Callable) -> tuple[dict, dict, dict, Any]:
        wide = values["mechanic_r0"].dtype
        eps, wd = jnp.asarray(opt.eps, wide), jnp.asarray(opt.weight_decay, wide)
        betas = jnp.asarray(opt.betas, wide)
        vec = {v: jnp.stack([values[x] for x in ns]) for v, ns in names.items()}
        first = values["mechanic_count"] == 0
        x0 = {n: jnp.where(first, p, slots[X0][n]) for n, p in params.items()}
        s_sum = vec["s"].sum()
        given = {n: params[n] for n in grads}
        coef = wd * s_sum * jnp.sqrt(_vdot(grads, grads)) / (
            jnp.sqrt(_vdot(given, given)) + eps)
        prev = {n: (x0[n] - p) / (s_sum + eps).astype(p.dtype) for n, p in given.items()}
        h = _vdot({n: g + coef.astype(g.dtype) * params[n] for n, g in grads.items()}, prev)
        new, state, applied = inner()
        m = jnp.maximum(betas * vec["m"], jnp.abs(h) + eps)
        v = betas ** 2 * vec["v"] + h * h
        r = betas * vec["r"] + jnp.clip(h, -vec["m"], vec["m"]) * vec["s"]
        s = (opt.s_init / k * m + jnp.maximum(r, 0.0)) / (jnp.sqrt(v) + eps)
        total = s.sum()
        out = {n: (x0[n] - total.astype(p.dtype) * (prev[n] - (new[n] - p))).astype(p.dtype)
               if n in prev else new.get(n, p) for n, p in params.items()}
        own = {x: vec_new[i] for vec_new, v in ((r, "r"), (m, "m"), (v, "v"), (s, "s"))
               for i, x in enumerate(names[v])}
        own["mechanic_count"] = _counted(values["mechanic_count"])
        return out, {X0: x0}, own, (new, state, applied)

    return step


def _schedule_free(opt: ScheduleFree) -> Callable:
    """Schedule-free's step (:class:`~mithril.utils.optimizers.ScheduleFree`'s docs)."""
    import jax.numpy as jnp

    def step(params: dict, grads: dict, slots: dict, values: dict, lr: Any,
             inner: Callable) -> tuple[dict, dict, dict, Any]:
        wide = values["weight_sum"].dtype
        lr = jnp.asarray(lr if opt.averaging_lr is None else opt.averaging_lr, wide)
        max_lr = values["max_lr"]
        # (Python's max(max_lr, lr): NaN kept where max_lr is, ignored where lr is)
        max_lr = jnp.where(jnp.isnan(max_lr) | ~(lr > max_lr), max_lr, lr)
        weight = max_lr ** jnp.asarray(opt.weight_lr_power, wide)
        total = values["weight_sum"] + weight
        ratio = weight / jnp.where(total != 0, total, jnp.nan)
        c = jnp.where(jnp.isnan(weight) | jnp.isnan(total), jnp.nan,
                      jnp.where(jnp.isnan(ratio), 0.0, ratio))
        b1 = opt.b1
        z = slots["z"]
        x = {n: (params[n] - (1.0 - b1) * z[n]) / b1 for n in grads}
        new, state, applied = inner()
        out, z_new = dict(params), dict(z)
        for n in grads:
            p, cn = params[n], c.astype(params[n].dtype)
            z_new[n] = z[n] + (new[n] - p)
            y = b1 * ((1.0 - cn) * x[n] + cn * z_new[n]) + (1.0 - b1) * z_new[n]
            out[n] = (p + (y - p)).astype(p.dtype)
        return out, {"z": z_new}, {"weight_sum": total, "max_lr": max_lr}, (new, state,
                                                                            applied)

    return step


def _private(opt: DifferentiallyPrivate) -> Callable:
    """DP-SGD's count of aggregated steps (the noise's counter), one more per step, a
    skipped one too (as its ``update``): the aggregation itself, of per-example gradients,
    is the train step's (:mod:`~mithril.utils.train_step_private`), the base's update takes
    its mean."""

    def step(params: dict, grads: dict, slots: dict, values: dict, lr: Any,
             inner: Callable) -> tuple[dict, dict, dict, Any]:
        new, state, applied = inner()
        return new, {}, {COUNT: _counted(values[COUNT])}, (new, state, applied)

    step.counts_skipped = True  # type: ignore[attr-defined]
    return step


def outer_transformation(opt: Any, inner: Any) -> Any:
    """``opt`` (a Mechanize, ScheduleFree or DP-SGD: :func:`is_outer`) as an optax transformation
    around ``inner``, its base optimizer's (built with ``learning_rate=None``: the state's),
    whose ``update`` takes what the base's takes (``new_params=``, ``missed=``,
    ``average_only=``, ``value=``, ``hyper=``) and passes it on (module docs)."""
    import jax
    import jax.numpy as jnp
    import optax

    from .optax_prologue import _wide
    from .optax_scalars import _INT32_MAX
    from .optax_transform import OptaxState

    own_slots, own_values = tuple(opt.own_slots), tuple(opt.own_values())
    math = (_mechanize if isinstance(opt, Mechanize) else _schedule_free
            if isinstance(opt, ScheduleFree) else _private)(opt)
    every = getattr(math, "counts_skipped", False)  # (its values move on a skipped step too)
    skips = opt.nonfinite == "skip"

    def init(params: Any) -> OptaxState:
        state = inner.init(params)
        copies = {s: jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params)
                  for s in own_slots}
        first = _first_values(opt)
        own = {k: jnp.asarray(first[k], jnp.int32 if k in _COUNTS else _wide())
               for k in own_values}
        return state._replace(slots={**state.slots, **copies},
                              values={**state.values, **own})

    def update(updates: Any, state: OptaxState, params: Any = None, *,
               new_params: bool = False, average_only: Any = (), **kw: Any
               ) -> tuple[Any, OptaxState]:
        if not isinstance(state, OptaxState):
            raise TypeError(f"state must be what this transformation's init returned "
                            f"(an OptaxState), got {type(state).__name__}")
        if params is None:
            raise ValueError(f"{type(opt).__name__} as an optax transformation needs params")
        check_own_state(opt, state, own_slots, own_values)  # (while tracing: nothing ran)
        base, slots, values = _split(state, own_slots, own_values)
        if average_only:  # (only the base's averages move: the wrapper's own stay)
            new, base = inner.update(updates, base, params, new_params=new_params,
                                     average_only=average_only, **kw)
            return new, base._replace(slots={**base.slots, **slots},
                                      values={**base.values, **values})
        params, grads = dict(params), dict(updates)

        def run_inner() -> tuple[dict, Any, Any]:
            new, after = inner.update(grads, base, params, new_params=True, **kw)
            applied = (after.count != base.count) | (base.count == _INT32_MAX) if skips \
                else jnp.asarray(True)
            return dict(new), after, applied

        out, own_slot_vals, own_vals, (_, after, applied) = math(
            params, grads, slots, values, base.hyperparams.get("learning_rate"), run_inner)
        keep = jax.tree_util.tree_map
        out = {n: jnp.where(applied, out[n], p) for n, p in params.items()}
        slots = {s: keep(lambda a, b: jnp.where(applied, a, b), own_slot_vals[s], slots[s])
                 for s in own_slots}
        values = {k: (own_vals[k] if every else jnp.where(applied, own_vals[k], values[k])
                      ).astype(values[k].dtype) for k in own_values}
        state = after._replace(slots={**after.slots, **slots},
                               values={**after.values, **values})
        if new_params:
            return out, state
        return {n: out[n] - params[n] for n in params}, state

    for attr in ("takes_value", "counts_missed"):  # (what step_body asks the update)
        if hasattr(inner.update, attr):
            setattr(update, attr, getattr(inner.update, attr))
    return optax.GradientTransformation(init, update)


def check_own_state(opt: Any, state: Any, slots: tuple[str, ...], values: tuple[str, ...]) -> None:
    """Refuse a ``state`` without ``opt``'s own slots and values (another optimizer's, the
    bare base's) or, a Mechanize's, with Mechanic's scalars for other betas (``betas``
    changed since ``init``), as its ``update`` refuses them: a bare KeyError, or a step on
    the betas it still holds, before."""
    who = type(opt).__name__
    if isinstance(opt, Mechanize) and X0 in state.slots and "mechanic_count" in state.values:
        opt.check_scalars(state.values)  # (its update's check)
    lacks = [k for k in slots if k not in state.slots] + [
        k for k in values if k not in state.values]
    if lacks:
        raise ValueError(f"{who}: the state lacks its {lacks} (slots {sorted(state.slots)}, "
                         f"values {sorted(state.values)}): a state of another optimizer?")


def _first_values(opt: Any) -> dict[str, float]:
    """The wrapper's own values as its ``init`` starts them: Mechanic's ``s`` at
    ``s_init``, everything else 0."""
    out = dict.fromkeys(opt.own_values(), 0.0)
    if isinstance(opt, Mechanize):
        out.update({f"mechanic_s{i}": float(opt.s_init) for i in range(len(opt.betas))})
    return out
