"""The watch on the hyperparameters :class:`~mithril.utils.training.TrainStep`'s JAX
program reads (:class:`HyperparameterWatch`) and the snapshots it compares: which changes
the program takes as traced values and which make it build anew."""

from __future__ import annotations

import operator
import warnings
from typing import Any

import numpy as np

from .train_step_jax import counting, group_counts

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
            from ..interop.optax_outer import outer_base
            from ..interop.optax_special import classify, state_hyperparams

            # (a per-tensor optimizer traces what it lists: Muon's momentum; a wrapper's
            # program bakes every hyperparameter in but the learning rate)
            self._kind = classify(outer_base(optimizer))
            self._traces_floats = self._kind in ("elementwise", "tensorwise") and \
                outer_base(optimizer) is optimizer
            # (schedule-free's beta1)
            self._state_kept = state_hyperparams(outer_base(optimizer))

    def _transformation(self) -> Any:
        if self._tx is None:
            from ..interop.optax_hyperparams import floats, traceable

            self._hyper_seen = self._hyper_versions()
            # (one set to an integer or None since, or whose group is gone, is baked in again)
            traced = {k for k in self._traced if traceable(self.optimizer, k)}
            if self._tracing:  # (every float one: a schedule begun later compiles nothing)
                traced.update(floats(self.optimizer))
            self._traced = tuple(sorted(traced))
            self._tx = counting(self._transformation_of(self.optimizer), self.optimizer)
            if self._traces_floats:
                self._snapshot = hyper_snapshot(self.optimizer, self._traced)
            self._hyper_args = self._hyper_arrays()
        return self._tx

    def _transformation_of(self, opt: Any) -> Any:
        """The program's transformation of ``opt``: a wrapper's (Mechanize, ScheduleFree,
        DP-SGD: :mod:`~mithril.interop.optax_outer`) around its base's, a SAM's base's (its
        second gradient is the program's: :mod:`~.train_step_sam`), else ``opt``'s own (each
        tensor's own count where the loss leaves some out, a Lookahead with
        ``reset_state`` counting none missed)."""
        from ..interop.optax_outer import is_outer, outer_transformation
        from ..interop.optax_special import classify
        from ..interop.optax_transform import optax_transformation
        from .optimizers.sam import SAM

        if isinstance(opt, SAM):  # (its second gradient: the program's, train_step_sam)
            return self._transformation_of(opt.base_optimizer)
        if is_outer(opt):
            return outer_transformation(opt, self._transformation_of(opt.base_optimizer))
        tx = optax_transformation(opt, traced_hyperparams=self._traced)
        if getattr(self, "_own_counts", False) and classify(opt) == "tensorwise":
            from .train_step_own_counts import own_counts  # (update(missed=): its module)

            tx = own_counts(tx, opt, self._traced)
        if getattr(opt, "reset_state", False):
            tx = group_counts(tx)
        return tx

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
