"""The pieces of :class:`~mithril.utils.training.TrainStep`'s one-program JAX step (and of
:class:`~mithril.distributed.jax_parallel.ShardedTrainStep`'s): the program's body, what
its steady state compares with, the watch on the hyperparameters it reads
(:class:`HyperparameterWatch`), and the checks of arrays an earlier step consumed and of
states converted to and from it."""

from __future__ import annotations

import operator
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
    before JAX fails on it inside a check or its runtime."""
    import jax

    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and leaf.is_deleted():
            raise TypeError(f"{what}{jax.tree_util.keystr(path)} is a deleted JAX array: was it "
                            f"consumed by an earlier step? (the step donates the params and "
                            f"opt_state it returned to the next one: pass the params and "
                            f"opt_state the last step returned)")


def committed(tree: Any) -> Any:
    """``tree`` with its JAX arrays committed to their devices (``jax.jit`` compiles again
    for committed arguments where it had uncommitted ones)."""
    import jax

    def commit(a: Any) -> Any:
        return jax.device_put(a, a.sharding) if isinstance(a, jax.Array) and not a.committed else a

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


def nonfinite_counts(held: dict, applied: Any, grads: Any, new: Any, opt_state: Any
                     ) -> dict[str, Any]:
    """The :data:`NONFINITE` counts after a step (traced), as ``OptimizerState.note_applied``
    keeps them: an ``applied`` step counts if its gradients (``grads``) are non-finite, or if
    its new params (``new``) or state (``opt_state``) are and the last applied step's were
    not."""
    import jax
    import jax.numpy as jnp

    bad_grad = ~jnp.isfinite(gradients_norm(list(grads)))
    finite = jnp.asarray(True)
    for x in jax.tree_util.tree_leaves((new, opt_state.slots, opt_state.tensor_slots,
                                        opt_state.values)):
        finite = finite & jnp.all(jnp.isfinite(x))
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

    sub = opt_state._replace(slots=part(opt_state.slots, on),
                             tensor_slots=part(opt_state.tensor_slots, on))
    if missed is not None:  # (the counts in the order the transformation flattens the dict:
        # its keys sorted)
        order = jax.tree_util.tree_leaves({names[i]: i for i in idx})
        kw = {**kw, "missed": missed[np.array(order, dtype=np.int32)]}
    new, sub = tx.update({names[i]: grads[i] for i in idx}, sub, {n: params[n] for n in on},
                         new_params=True, **kw)
    slots = {s: {**per, **sub.slots[s]} for s, per in opt_state.slots.items()}
    off = [n for n in names if n in unreached]
    if off and {EMA, SWA} & set(opt_state.slots):  # (their averages take the step too)
        kw = {k: v for k, v in kw.items() if k != "missed"}
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
              hyper: Any = None, unreached: frozenset[str] = frozenset()) -> tuple:
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
    (:func:`update_reached`).
    """
    import jax.numpy as jnp

    from ..interop.optax_scalars import _INT32_MAX

    if lr is not None:  # (a Python float argument: no array to make per change, no commit)
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams,
                                                    "learning_rate": lr})

    cots = {loss: jnp.ones((), ptuple[0].dtype if ptuple else jnp.float32)}
    if with_ctx:
        out, grads, mstate = ev._fwd_vjp_ctx(ptuple, inputs, rng, mstate, cots,
                                             training=training)
    else:
        out, grads = ev._fwd_vjp(ptuple, inputs, cots)
    names = ev.names
    params = dict(zip(names, ptuple, strict=True))
    old_state = opt_state
    kw = {} if hyper is None else {"hyper": hyper}
    missed = opt_state.hyperparams.get(MISSED)
    counts_missed = getattr(tx.update, "counts_missed", True)
    if missed is None and unreached and counts_missed:  # (a state of a step that reached
        missed = jnp.zeros(len(names), jnp.int32)  # them all: none yet)
    if not unreached and missed is None:
        new_params, opt_state = tx.update(dict(zip(names, grads, strict=True)), opt_state,
                                          params, new_params=True, **kw)
    else:
        new_params, opt_state = update_reached(tx, names, unreached, grads, opt_state, params,
                                               missed, kw)
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
        counts.update(nonfinite_counts(held, applied, grads, new_params, opt_state))
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


VERSIONS = operator.itemgetter("_hyper_version", "_groups_version")


def optimizers_in(opt: Any) -> list[Any]:
    """``opt`` and the optimizers it holds (Lookahead's ``inner``, Muon's ``fallback``),
    recursively."""
    from .optimizers.base import Optimizer

    found = [opt]
    for v in vars(opt).values():
        if isinstance(v, Optimizer):
            found += optimizers_in(v)
    return found


def hyper_snapshot(opt: Any, traced: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every hyperparameter of ``opt`` but the learning rate, by the names
    :mod:`~mithril.interop.optax_hyperparams` traces them under (its own, each group's
    overrides, and the value each ``traced`` group name has now, overridden or not), and
    under ``"_structure"`` what the groups match and the optimizer's and each group's slots
    and update rule (what no traced value can change)."""
    from ..interop.optax_hyperparams import parse, value
    from .optimizers.groups import views

    snap = {k: v for h in reversed(opt.hyper_holders()) for k, v in vars(h).items()
            if k[0] != "_" and k != "learning_rate"}  # (a Lookahead's inner's too)
    groups = opt.param_groups
    for g, group in enumerate(groups):  # (a group's lr_scale is 1.0 until set)
        snap.update({f"param_groups[{g}].{k}": v for k, v in
                     {"lr_scale": 1.0, **group}.items() if k != "params"})
    # (a traced group name's value, so that a group's first override of it is a change of
    # a value the program reads, not a new name)
    snap.update({k: value(opt, k) for k in traced if parse(k)[0] is not None and k not in snap})
    rules = [v.rule() for v in views(opt, [{}] + [{k: x for k, x in g.items() if k != "params"}
                                                  for g in groups])]
    snap["_structure"] = ([g.get("params") for g in groups], opt.weight_decay_mask,
                          list(opt.exclude_weight_decay or ()), rules)
    for prefix, held in opt.hyper_children().items():  # (a Muon's fallback's, prefixed)
        sub = hyper_snapshot(held, tuple(k[len(prefix):] for k in traced
                                         if k.startswith(prefix)))
        snap["_structure"] += (sub.pop("_structure"),)
        snap.update({prefix + k: v for k, v in sub.items()})
    return snap


def traced_holders(opt: Any) -> tuple[Any, ...]:
    """The optimizers whose float hyperparameters ``opt``'s traced program can read:
    :meth:`hyper_holders`, then those of :meth:`hyper_children` (recursively)."""
    return (*opt.hyper_holders(),
            *(h for held in opt.hyper_children().values() for h in traced_holders(held)))


def traceable_changes(opt: Any, old: dict[str, Any], new: dict[str, Any],
                      known: tuple[str, ...] = ()) -> set[str] | None:
    """The names whose values differ between the snapshots ``old`` and ``new`` of ``opt``
    (:func:`hyper_snapshot`), where each is a float hyperparameter the program may read
    at every step; None where any change shapes the program (an integer, flag, string,
    a group's new override of a name not traced, the groups' matching, the slots or the
    update rule). ``known``:
    names checked before (traced already: a float is all they need to stay)."""
    from ..interop.optax_hyperparams import check, is_float
    from .optimizers.groups import UNSET, differs

    changed = {k for k in old.keys() | new.keys()
               if differs(old.get(k, UNSET), new.get(k, UNSET))}
    if any(k == "_structure" or k not in old or k not in new or not is_float(old[k])
           or not is_float(new[k]) for k in changed):
        return None
    try:
        check(opt, sorted(changed - set(known)))
    except (KeyError, TypeError, ValueError):
        return None
    return changed


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
                      f"non-finite params or state after the step); params and state "
                      f"unchanged by them ({k} in all)", RuntimeWarning, stacklevel=4)
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


class HyperparameterWatch:
    """:class:`~mithril.utils.training.TrainStep`'s watch on the hyperparameters its JAX
    program reads: the learning rate on every call; a float one, after its first change,
    as the program's ``hyper`` argument (every float one from the first change of any);
    anything else baked in, the program built anew after a change. Expects the step's ``optimizer``, ``_fused``, ``_tx``, ``_jitted``,
    ``_steady``, ``_run_sigs``, ``_returned_state``, ``_jnp``, ``_device_put`` and
    ``_array_type``."""

    def _watch_hyperparameters(self, optimizer: Any) -> None:
        # what the JAX program bakes in besides the learning rate (read every call): the
        # hyperparameters of the optimizer and of those it holds (Lookahead's inner, Muon's
        # fallback), by the counts they keep of their changes (see _hyper_changed); first
        # those its names reach (hyper_holders: the snapshot covers them)
        held = traced_holders(optimizer) if self._fused else ()
        self._held = len(held)
        self._hyper_dicts = tuple(vars(o) for o in (*held, *(
            o for o in optimizers_in(optimizer) if all(o is not h for h in held)))) \
            if self._fused else ()
        for d in self._hyper_dicts:  # (an optimizer that never changed one counts 0)
            d.setdefault("_hyper_version", 0)
            d.setdefault("_groups_version", 0)
        self._hyper_seen: tuple | None = None
        self._resync = False  # the state's driven hyperparameters are re-read once
        # the float hyperparameters the program reads per call (each after its first
        # change), their values as the program's argument, and what the program was built with
        self._traced: tuple[str, ...] = ()
        self._tracing = False  # (set at the first change: every float one is traced then)
        self._hyper_args: Any = None
        self._snapshot: dict[str, Any] | None = None
        self.rebuilds: int = 0
        if self._fused:
            from ..interop.optax_special import classify, state_hyperparams

            # (a per-tensor optimizer traces what it lists: Muon's momentum)
            self._kind = classify(optimizer)
            self._traces_floats = self._kind in ("elementwise", "tensorwise")
            self._state_kept = state_hyperparams(optimizer)  # (schedule-free's beta1)

    def _transformation(self) -> Any:
        if self._tx is None:
            from ..interop.optax_hyperparams import floats, traceable
            from ..interop.optax_transform import optax_transformation

            self._hyper_seen = self._hyper_versions()
            # (one set to an integer or None since, or whose group is gone, is baked in again)
            traced = {k for k in self._traced if traceable(self.optimizer, k)}
            if self._tracing:  # (every float one: a schedule begun later compiles nothing)
                traced.update(floats(self.optimizer))
            self._traced = tuple(sorted(traced))
            tx = optax_transformation(self.optimizer, traced_hyperparams=self._traced)
            if getattr(self, "_own_counts", False) and self._kind == "tensorwise":
                from .train_step_own_counts import own_counts  # (update(missed=): its module)

                tx = own_counts(tx, self.optimizer, self._traced)
            if getattr(self.optimizer, "reset_state", False):
                tx = group_counts(tx)
            self._tx = counting(tx, self.optimizer)
            if self._traces_floats:
                self._snapshot = hyper_snapshot(self.optimizer, self._traced)
            self._hyper_args = self._hyper_arrays()
        return self._tx

    def _hyper_versions(self) -> tuple:
        return tuple(map(VERSIONS, self._hyper_dicts))

    def _hyper_arrays(self) -> Any:
        """The traced hyperparameters' values, row ``i`` the ``[hi, lo]`` pair of
        ``_traced[i]`` (:func:`~mithril.interop.optax_hyperparams.pair`, all at once), as
        the program's ``hyper`` argument: one NumPy array, which the jitted call transfers
        itself (a JAX array made here costs a dispatch, ~20 µs, per change); None when none
        is traced."""
        if not self._traced:
            return None
        import jax

        from ..interop.optax_hyperparams import value

        dt = np.float64 if jax.config.jax_enable_x64 else np.float32
        x = np.array([value(self.optimizer, k) for k in self._traced], dtype=np.float64)
        hi = x.astype(dt)
        return np.stack([hi, (x - hi).astype(dt)], axis=1)

    def _hyper_changed(self) -> None:
        """A hyperparameter other than the learning rate changed since the program was
        built. For an elementwise or two-pass optimizer, the first change builds the
        program anew with every float hyperparameter of the optimizer and of its groups
        (``beta1``, ``momentum``, ``weight_decay``, each group's, overridden or not, a
        Lookahead's inner optimizer's, a Muon's fallback's; one at 0 from its own first
        change on: :func:`~mithril.interop.optax_hyperparams.floats`) as an argument: later
        changes of them compile nothing, whichever begins when. Any other change (an
        integer, a flag, the groups' matching) builds it anew each time. Before the first
        call compiled anything, a change is only baked into the program it makes."""
        self._resync = True  # (the state keeps some: schedule-free's beta1)
        if self._jitted is None:  # nothing compiled yet (a checkpoint loaded before the
            self._tx = None  # first step): its first call builds with them baked in
            return
        self._tracing = self._traces_floats
        versions = self._hyper_versions()
        changed = None
        if self._traces_floats and versions[self._held:] == self._hyper_seen[self._held:]:
            new = hyper_snapshot(self.optimizer, self._traced)
            changed = traceable_changes(self.optimizer, self._snapshot, new, self._traced)
        if changed is None:
            self._rebuild()
            return
        names = tuple(sorted({*self._traced, *changed}))
        if names != self._traced:  # a first change of these: they become arguments
            self._traced = names
            self._rebuild()
            return
        self._snapshot, self._hyper_seen = new, versions
        self._hyper_args = self._hyper_arrays()

    def _fed(self, opt_state: Any) -> Any:
        """``opt_state`` with the hyperparameters the state keeps (schedule-free's
        ``beta1``) read from the optimizer again, after a change or in a state this step did
        not return (``init``'s, a resumed one). (The learning rate is the program's
        argument: read on every call.)"""
        if not self._state_kept or (not self._resync
                                    and opt_state is self._returned_state):
            self._resync = False
            return opt_state
        self._resync = False
        jnp, old = self._jnp, opt_state.hyperparams

        def put(k: str, v: float) -> Any:  # committed where the state's is (else: compiles)
            x, like = jnp.asarray(v), old.get(k)
            return self._device_put(x, like.sharding) if isinstance(
                like, self._array_type) and like.committed else x

        return opt_state._replace(hyperparams={
            **old, **{h: put(h, float(getattr(self.optimizer, h))) for h in self._state_kept}})

    def _rebuild(self) -> None:
        """A hyperparameter changed in a way the program cannot read per call (see
        :meth:`_hyper_changed`), or first changed: this call builds and compiles it anew,
        as the separate calls would take the new value. Warned once when that keeps
        happening."""
        self._tx = self._jitted = self._steady = None
        self._run_sigs.clear()
        self._resync = True
        self.rebuilds += 1
        if self.rebuilds == 8:
            warnings.warn(
                f"make_train_step: the {type(self.optimizer).__name__}'s hyperparameters "
                f"changed 8 times in ways the JAX step's program bakes in (an integer, a "
                f"flag, the groups' matching, a nested or per-tensor optimizer's; a float "
                f"one compiles once, at its first change): each compiles it again. To "
                f"change one every step, give the step optimizer.init's state: it then runs "
                f"the separate calls, which read every hyperparameter per step",
                RuntimeWarning, stacklevel=5)
