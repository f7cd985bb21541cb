"""The pieces of :class:`~mithril.utils.training.TrainStep`'s one-program JAX step (and of
:class:`~mithril.distributed.jax_parallel.ShardedTrainStep`'s): the program's body, what
its steady state compares with (the watch on the hyperparameters it reads:
:mod:`.train_step_hyper`), and the checks of arrays an earlier step consumed and of
states converted to and from it."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import KeyMismatchError, ShapeError


class SteadyState:
    """What the fused JAX step's steady state compares with (see
    :meth:`TrainStep._steady_args`): the last step's returned params and state, and its
    data's keys, abstract values and signature."""

    __slots__ = ("opt_state", "ptuple", "keys", "avals", "aval", "sig", "value_index")

    @classmethod
    def of(cls, step: Any, opt_state: Any, ptuple: tuple, data: dict, sig: tuple
           ) -> SteadyState | None:
        vals = list(data.values())
        kind = type(vals[0]) if vals else None
        if kind is None or not all(type(v) is kind for v in vals) or not isinstance(
                vals[0], step._jax_array):
            return None  # host arrays are converted every step: not a steady state
        self = cls()
        self.opt_state, self.ptuple, self.keys, self.sig = opt_state, ptuple, tuple(data), sig
        from ..backends.jax_backend import aval_getter

        self.aval = aval_getter(kind)
        self.avals = list(map(self.aval, vals))
        self.value_index = tuple(i for i, k in enumerate(data) if k in step._value_keys)
        return self


class Returned:
    """The params tuple and ``opt_state`` the last fused step on a compiled model returned,
    whichever :class:`~mithril.utils.training.TrainStep` of that model ran it (steps of
    two losses taking turns on one state): they are the steps' own arrays, which the next
    step donates by the ownership rule, so any step of the same model takes them as its
    own (no params check, no copy that keeps the user's arrays undonated). Only the latest
    return: the earlier ones were consumed. With ``nonfinite="skip"``, also the counts
    :func:`report_skips` last read of that state's line (``skips_seen``): each skip warned
    once, by whichever step reads it, without a host read per call."""

    __slots__ = ("ptuple", "opt_state", "skips_seen", "__weakref__")

    def __init__(self) -> None:
        self.ptuple: tuple | None = None
        self.opt_state: Any = None
        self.skips_seen: tuple | None = None


_RETURNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def returned_of(compiled: Any) -> Returned:
    """The :class:`Returned` record the steps of ``compiled`` share (dropped with it)."""
    rec = _RETURNED.get(compiled)
    if rec is None:
        rec = _RETURNED[compiled] = Returned()
    return rec


def refuse_consumed(what: str, tree: Any) -> None:
    """A ``TypeError`` (as for any deleted array) naming the first JAX array of ``tree``
    whose buffer is gone, most likely consumed by an earlier step (donated to its program),
    before JAX fails on it inside a check or its runtime; and one naming the first tracer
    (the step called inside ``jax.jit``, ``grad``, ``vmap`` or ``lax.scan``, where JAX's
    ``ConcretizationTypeError`` from ``is_deleted`` said nothing of the step)."""
    import jax

    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError(f"{what}{jax.tree_util.keystr(path)} is a JAX tracer: the train "
                            f"step was called inside a JAX transformation (jax.jit, grad, "
                            f"vmap, lax.scan). It is one jax.jit program already, donating "
                            f"its buffers: call it outside any transformation, or inside "
                            f"your own use compiled.evaluate with "
                            f"mithril.interop.optax_transformation(optimizer)")
        if isinstance(leaf, jax.Array) and leaf.is_deleted():
            raise TypeError(f"{what}{jax.tree_util.keystr(path)} is a deleted JAX array: was it "
                            f"consumed by an earlier step? (the step donates the params and "
                            f"opt_state it returned to the next one: pass the params and "
                            f"opt_state the last step returned)")


def committed(tree: Any) -> Any:
    """``tree`` with its JAX arrays committed to their devices (``jax.jit`` compiles again
    for committed arguments where it had uncommitted ones); where its arrays on several
    devices span one mesh (params ``jax.device_put`` on it), the uncommitted ones (the
    state's count, ``init``'s scalars) replicated on that mesh, as JAX places them beside
    the params: committed to their own device they would be refused beside them."""
    import jax

    from ..backends.jax_backend import mesh_placement

    rep = mesh_placement(tree)

    def commit(a: Any) -> Any:
        if isinstance(a, jax.Array) and not a.committed:
            return jax.device_put(a, a.sharding if rep is None else rep)
        return a

    return jax.tree_util.tree_map(commit, tree)


#: where an ``OptaxState`` counts the steps ``nonfinite="skip"`` skipped (its hyperparams)
SKIPPED = "num_skipped"
#: where it counts the non-finite steps applied after ``max_consecutive_skips`` in a row
#: (what ``update`` warns of at each: the program keeps the count, a later call warns)
GIVEN_UP = "num_given_up"
#: where it counts the applied steps that were non-finite (``OptimizerState.num_nonfinite``:
#: a non-finite gradient each time, params or state made non-finite once until a step
#: leaves them finite again) and whether the last applied step left them non-finite
NONFINITE, NONFINITE_VALUES = "num_nonfinite", "nonfinite_values"
#: where it counts, per parameter (the model's order, int32), the applied steps it had no
#: gradient at (``OptimizerState.missed``: the loss did not reach it)
MISSED = "missed"


def counting(tx: Any, optimizer: Any) -> Any:
    """``tx`` (an optax transformation of ``optimizer``) whose ``init`` adds the
    :data:`GIVEN_UP` counter where the state counts non-finite steps in a row, and the
    :data:`NONFINITE` ones where a step may be applied non-finite (``"propagate"``, or
    given up after ``max_consecutive_skips``)."""
    from ..interop.optax_prologue import CONSECUTIVE

    def init(params: Any) -> Any:
        state = tx.init(params)
        run = CONSECUTIVE in state.hyperparams
        applies = run or getattr(optimizer, "nonfinite", None) == "propagate"
        if not applies:
            return state
        import jax.numpy as jnp

        added = {NONFINITE: jnp.zeros((), jnp.int32), NONFINITE_VALUES: jnp.zeros((), bool)}
        if run:
            added[GIVEN_UP] = jnp.zeros((), jnp.int32)
        return state._replace(hyperparams={**state.hyperparams, **added})

    return tx._replace(init=init)


def group_counts(tx: Any) -> Any:
    """``tx`` (a Lookahead's with ``reset_state``) whose ``update`` counts no missed steps:
    its inner count restarts at each sync, one for all (the group's), so each row takes the
    group's count and no parameter keeps a count of its own (``note_missed``'s rule, what
    ``torch_optimizer`` does); ``step_body`` then keeps no :data:`MISSED` counts."""

    def update(updates: Any, state: Any, params: Any = None, *, missed: Any = None,
               **kw: Any) -> tuple[Any, Any]:
        return tx.update(updates, state, params, **kw)

    update.counts_missed = False  # type: ignore[attr-defined]
    return tx._replace(update=update)


def carry_counts(opt_state: Any, state: Any) -> Any:
    """``opt_state`` (an ``OptaxState``) with the non-finite steps in a row of ``state`` (an
    ``OptimizerState``), where it counts them (``max_consecutive_skips``), and its applied
    non-finite steps, where it counts those."""
    from ..interop.optax_prologue import CONSECUTIVE

    held = opt_state.hyperparams
    if CONSECUTIVE not in held and NONFINITE not in held:
        return opt_state
    import jax.numpy as jnp

    got = {CONSECUTIVE: jnp.asarray(state.consecutive_skips, jnp.int32)} \
        if CONSECUTIVE in held else {}
    if NONFINITE in held:
        got[NONFINITE] = jnp.asarray(state.num_nonfinite, jnp.int32)
        got[NONFINITE_VALUES] = jnp.asarray(bool(state.nonfinite_values))
    return opt_state._replace(hyperparams={**held, **got})


def read_counts(opt_state: Any, out: Any) -> None:
    """The counts of ``opt_state`` (its step count and those the program keeps in its
    ``hyperparams``: the skipped steps, the non-finite ones in a row, the non-finite ones
    applied) set on ``out``, an ``OptimizerState``."""
    from ..interop.optax_prologue import CONSECUTIVE

    out.step = int(opt_state.count)
    held = opt_state.hyperparams
    if SKIPPED in held:
        out.num_skipped = int(held[SKIPPED])
    if CONSECUTIVE in held:
        out.consecutive_skips = int(held[CONSECUTIVE])
    if NONFINITE in held:
        out.num_nonfinite = int(held[NONFINITE])
        out.nonfinite_values = bool(held[NONFINITE_VALUES])


def nonfinite_counts(held: dict, applied: Any, grads: Any, new: Any, opt_state: Any,
                     probe: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """The :data:`NONFINITE` counts after a step (traced), as ``OptimizerState.note_applied``
    keeps them: an ``applied`` step counts if its gradients (``grads``) are non-finite, or if
    its new params (``new``) or state (``opt_state``) are and the last applied step's were
    not. ``probe``: (gradients finite, new params and slots finite), where the fused CPU
    kernel measured them in its pass (:mod:`~.optimizers.engines.xla_ffi`)."""
    import jax
    import jax.numpy as jnp

    from .optimizers.engines.jax_finite import finite_grads, finite_step

    others = jax.tree_util.tree_leaves((opt_state.tensor_slots, opt_state.values))
    if probe is not None:
        bad_grad, finite = ~probe[0], probe[1] & finite_step([], [], others)
    else:
        bad_grad = ~finite_grads(list(grads))  # (not a norm's finiteness: it may overflow)
        finite = finite_step(jax.tree_util.tree_leaves(new),
                             [jax.tree_util.tree_leaves(t) for t in opt_state.slots.values()],
                             others)
    was = held[NONFINITE_VALUES]
    counted = applied & (bad_grad | (~finite & ~was))
    return {NONFINITE: held[NONFINITE] + counted.astype(held[NONFINITE].dtype),
            NONFINITE_VALUES: jnp.where(applied, ~finite, was)}


def update_reached(tx: Any, names: list[str], unreached: frozenset[str], grads: Any,
                   opt_state: Any, params: dict[str, Any], missed: Any, kw: dict) -> tuple:
    """``tx.update`` (new params) of the parameters not in ``unreached``, each counting
    its own steps (``missed``: per parameter of ``names``, the applied steps it had no
    gradient at; None: the group's count for all, a Lookahead's with ``reset_state``); the
    others and their own slots as they were, as torch.optim passes over a ``.grad`` None,
    their weight averages moved toward them as the optimizer's ``update`` moves them
    (``average_only``: :mod:`~mithril.interop.optax_unreached`) unless the step was skipped.
    Returns (new params, new state)."""
    idx = [i for i, n in enumerate(names) if n not in unreached]
    on = [names[i] for i in idx]

    def part(tree: dict[str, dict[str, Any]], keep: list[str]) -> dict[str, dict[str, Any]]:
        return {s: {n: per[n] for n in keep} for s, per in tree.items()}

    import jax
    import jax.numpy as jnp

    from ..interop.optax_scalars import _INT32_MAX
    from .optimizers.averaging import EMA, SWA
    from .optimizers.groups import resolving_part
    from .optimizers.mechanize import X0

    sub = opt_state._replace(slots=part(opt_state.slots, on),
                             tensor_slots=part(opt_state.tensor_slots, on))
    if missed is not None:  # (the counts in the order the transformation flattens the dict:
        # its keys sorted)
        order = jax.tree_util.tree_leaves({names[i]: i for i in idx})
        kw = {**kw, "missed": missed[np.array(order, dtype=np.int32)]}
    with resolving_part():  # (a group naming an unreached parameter is no typo)
        new, sub = tx.update({names[i]: grads[i] for i in idx}, sub,
                             {n: params[n] for n in on}, new_params=True, **kw)
    slots = {s: {**per, **sub.slots[s]} for s, per in opt_state.slots.items()}
    off = [n for n in names if n in unreached]
    if off and X0 in slots:  # (Mechanic's x0: every parameter's value at its first step)
        count = "mechanic_count"  # (moved from 0: this step was its first, applied)
        first = (opt_state.values[count] == 0) & (sub.values[count] != 0)
        slots[X0].update({n: jnp.where(first, params[n], slots[X0][n]) for n in off})
    if off and {EMA, SWA} & set(opt_state.slots):  # (their averages take the step too)
        kw = {k: v for k, v in kw.items() if k not in ("missed", "host_kernel")}
        _, rest = tx.update(params, opt_state, params, new_params=True,
                            average_only=frozenset(off), **kw)
        old = opt_state.count  # (a skipped step leaves the count, unless saturated)
        applied = (sub.count != old) | (old == _INT32_MAX)
        for s in (EMA, SWA):
            if s in slots:
                slots[s].update({n: jnp.where(applied, rest.slots[s][n], opt_state.slots[s][n])
                                 for n in off})
    return {**params, **new}, sub._replace(
        slots=slots,
        tensor_slots={s: {**per, **sub.tensor_slots[s]}
                      for s, per in opt_state.tensor_slots.items()})


def step_body(ev: Any, tx: Any, loss: str, with_ctx: bool, ptuple: tuple, opt_state: Any,
              inputs: dict, rng: Any, mstate: dict, training: bool, lr: Any = None,
              hyper: Any = None, unreached: frozenset[str] = frozenset(),
              sam: Any = None, private: tuple | None = None) -> tuple:
    """Inside a JAX train-step program: forward, the gradients of ``loss`` for the parameters
    ``ptuple`` and the optimizer's update (``tx``, an optax transformation, at learning rate
    ``lr`` (None: the state's); ``hyper``: the values of its traced hyperparameters).
    Returns (new params tuple, new optimizer state, outputs, new model state (the old one
    where no operator keeps any), gradients). A state holding :data:`SKIPPED`
    (``nonfinite="skip"``) counts a skipped step there: the update leaves its count then;
    one holding :data:`GIVEN_UP` counts a step applied with the run of non-finite steps
    going on (``max_consecutive_skips`` reached: what ``update`` warns of); one holding
    :data:`NONFINITE` counts the non-finite steps applied (:func:`nonfinite_counts`); one
    holding :data:`MISSED` updates the parameters the loss reaches (all but ``unreached``)
    on their own counts and counts an applied step as missed for the others
    (:func:`update_reached`). ``sam``: a SAM whose base ``tx`` is, the update then taking
    the gradients at its perturbed point (:mod:`~.train_step_sam`), which are those returned;
    ``private``: (a DP-SGD optimizer, the model's constant keys), the update then taking the
    noised mean of the per-example gradients (:mod:`~.train_step_private`), returned.
    """
    import jax.numpy as jnp

    from ..interop.optax_scalars import _INT32_MAX

    if lr is not None:  # (a Python float argument: no array to make per change, no commit)
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams,
                                                    "learning_rate": lr})

    cots = {loss: jnp.ones((), ptuple[0].dtype if ptuple else jnp.float32)}
    if private is not None:  # (no context operator there: refused at make_train_step)
        from ..interop.optax_outer import check_own_state
        from .optimizers.differentially_private import COUNT
        from .train_step_private import private_gradients

        check_own_state(private[0], opt_state, (), (COUNT,))  # (another's: its error)
        out, grads = private_gradients(ev, *private, ptuple, inputs, cots,
                                       opt_state.values[COUNT], unreached)
    elif with_ctx:
        out, grads, mstate = ev._fwd_vjp_ctx(ptuple, inputs, rng, mstate, cots,
                                             training=training)
    else:
        out, grads = ev._fwd_vjp(ptuple, inputs, cots)
    if sam is not None:  # (no context operator there: train_step_sam.fuses)
        from .train_step_sam import perturbed_gradients

        grads = perturbed_gradients(ev, sam, ptuple, inputs, cots, grads, unreached)
    names = ev.names
    params = dict(zip(names, ptuple, strict=True))
    old_state = opt_state
    kw = {} if hyper is None else {"hyper": hyper}
    if getattr(tx.update, "takes_value", False):  # a loss-aware optimizer: the step's loss
        kw["value"] = out[loss]
    missed = opt_state.hyperparams.get(MISSED)
    counts_missed = getattr(tx.update, "counts_missed", True)
    if missed is None and unreached and counts_missed:  # (a state of a step that reached
        missed = jnp.zeros(len(names), jnp.int32)  # them all: none yet)
    probe: list = []  # (the fused CPU kernel's, where it ran: xla_ffi)
    if getattr(tx.update, "host_kernel", False):
        kw["host_kernel"] = probe
    if not unreached and missed is None:
        new_params, opt_state = tx.update(dict(zip(names, grads, strict=True)), opt_state,
                                          params, new_params=True, **kw)
    else:
        new_params, opt_state = update_reached(tx, names, unreached, grads, opt_state, params,
                                               missed, kw)
    if probe and unreached:  # (the kernel probed the reached params: the others' new values
        # (their averages moved) here)
        from .optimizers.engines.jax_finite import finite_step

        off = [n for n in names if n in unreached]
        probe[0] = (probe[0][0], probe[0][1] & finite_step(
            [new_params[n] for n in off], [[per[n] for n in off]
                                           for per in opt_state.slots.values()]))
    held, counts, applied = old_state.hyperparams, {}, jnp.asarray(True)
    if SKIPPED in held:  # a skipped step leaves the count (unless saturated)
        skipped = (opt_state.count == old_state.count) & (old_state.count != _INT32_MAX)
        applied = ~skipped
        counts[SKIPPED] = held[SKIPPED] + skipped.astype(held[SKIPPED].dtype)
        from ..interop.optax_prologue import CONSECUTIVE

        run = opt_state.hyperparams.get(CONSECUTIVE)
        if GIVEN_UP in held and run is not None:  # applied, and the run goes on: given up
            bad = (opt_state.count != old_state.count) & (run > 0)
            counts[GIVEN_UP] = held[GIVEN_UP] + bad.astype(held[GIVEN_UP].dtype)
    if NONFINITE in held:
        counts.update(nonfinite_counts(held, applied, grads, new_params, opt_state,
                                       probe[0] if probe else None))
    if missed is not None and unreached:  # (an applied step: note_missed's count)
        mask = np.array([n in unreached for n in names])
        counts[MISSED] = missed + (applied & mask).astype(missed.dtype)
    if counts:
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, **counts})
    new = tuple(new_params[n] for n in names)
    return new, opt_state, out, mstate, grads


def gradients_norm(grads: list[Any]) -> Any:
    """``‖g‖₂`` over all gradients (traced): the engines' one-pass norm
    (:func:`~mithril.utils.optimizers.engines.jax_engine.global_norm`)."""
    from .optimizers.engines.jax_engine import global_norm

    return global_norm(grads)


def same_params(what: str, got: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """``got`` (name: shape) holds the parameters ``expected`` holds, of the same shapes."""
    missing, unknown = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unknown:
        raise KeyMismatchError(f"{what} does not hold the model's parameters: missing "
                               f"{missing}, unknown {unknown}")
    for n, shape in expected.items():
        if tuple(got[n]) != tuple(shape):
            raise ShapeError(f"{what}: '{n}' has shape {tuple(got[n])}, the parameter "
                             f"{tuple(shape)}")


def state_before_run(optimizer: Any, param_shapes: Mapping[str, Any], params: Any,
                     opt_state: Any) -> None:
    """What ``optimizer.update`` checks of ``opt_state`` (its kind and slots, its
    parameters against the model's ``param_shapes``) and of ``params`` against it (keys,
    array type, dtype, shapes: the optimizer's own check), for the separate-calls step to
    refuse them before the model runs (and moves its Dropout counter)."""
    from .optimizers.checks import _check_params, check_state_kind

    check_state_kind(optimizer, opt_state)
    same_params("the optimizer state", dict(zip(opt_state.layout.names,
                                                opt_state.layout.shapes)), param_shapes)
    if isinstance(params, Mapping) and not opt_state.returned(params):
        _check_params(optimizer, params, opt_state)


def report_skips(step: Any, opt_state: Any) -> None:
    """Warn of the steps the one-program JAX step skipped (``nonfinite="skip"``), and of
    those it applied after ``max_consecutive_skips`` non-finite ones in a row, as ``update``
    warns of each: the program counts them in the state it returns (:data:`SKIPPED`,
    :data:`GIVEN_UP`), and each call reads the counts of the state it is given when the
    device has computed them (never waiting for them: a loop's dispatch stays ahead of the
    device), warning once for the steps since it last read (so a call or more late; a
    single step given up in ``update``'s very words). A state the step did not return
    (``init``'s, a resumed one) sets the counts it starts from. Only the skipped count is
    read while no run of non-finite steps can have reached the limit (none was at it at the
    last read, and none was skipped since): one read, as without the limit."""
    held = getattr(opt_state, "hyperparams", {})
    n = held.get(SKIPPED)
    if n is None:
        return
    seen = getattr(step, "_skips_seen", None)
    # (a state another step of the model returned continues the counts read: Returned)
    if seen is None or (opt_state is not step._returned_state
                        and opt_state is not step._shared.opt_state):
        try:
            step._skips_seen = _counts(step, opt_state)
        except RuntimeError:  # a donated (consumed) state: refused, naming it, by the step
            step._skips_seen = None
        return
    if not n.is_ready() or (int(n) == seen[0] and not seen[2]):
        return
    now = _counts(step, opt_state)
    if now == seen:
        return
    step._skips_seen = now
    (k, j, _), name = now, type(step.optimizer).__name__
    if k > seen[0]:
        warnings.warn(f"{name}: {k - seen[0]} step(s) skipped (a non-finite gradient, or "
                      f"non-finite params or state after the step); params and optimizer "
                      f"state unchanged by them ({k} in all)", RuntimeWarning, stacklevel=4)
    if j is None or seen[1] is None or j <= seen[1]:
        return
    from ..interop.optax_prologue import CONSECUTIVE

    limit = step.optimizer.max_consecutive_skips
    run, t = int(opt_state.hyperparams[CONSECUTIVE]), int(opt_state.count)
    if j - seen[1] == 1 and limit is not None and run > limit:  # (the last step: update's words)
        what = f"{run} non-finite steps in a row (max_consecutive_skips={limit}): step {t} applied"
    else:
        what = (f"{j - seen[1]} steps applied after {limit} or more non-finite steps in a row "
                f"(max_consecutive_skips={limit}); params may now be non-finite ({j} in all; "
                f"{run} non-finite steps in a row at step {t})")
    warnings.warn(f"{name}: {what}", RuntimeWarning, stacklevel=4)


def _counts(step: Any, opt_state: Any) -> tuple[int, int | None, bool]:
    """What :func:`report_skips` keeps of a state: its skipped and given-up counts, and
    whether its run of non-finite steps is at the limit (a step may then be given up
    without a skip first)."""
    from ..interop.optax_prologue import CONSECUTIVE

    held, limit = opt_state.hyperparams, step.optimizer.max_consecutive_skips
    g, run = held.get(GIVEN_UP), held.get(CONSECUTIVE)
    return (int(held[SKIPPED]), None if g is None else int(g),
            g is not None and run is not None and limit is not None and int(run) >= limit)
