"""What :class:`~.sam.SAM` and :class:`~.mechanize.Mechanize` share: an optimizer that runs a
whole base optimizer's ``update`` inside its own (not its elementwise math, as Lookahead
does), so any base optimizer here but a closure-driven one (LBFGS) can be wrapped."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import KeyMismatchError
from .base import Optimizer
from .checks import check_state_kind, check_update, describe, to_float
from .held_hyperparameters import HeldHyperparameters
from .serialization import StateDictMixin, checked_head
from .sophia import HeldEstimates, HeldView
from .state import OptimizerState


def check_base(base: Any, who: str) -> Optimizer:
    """``base`` if ``who`` can run its update, else a TypeError saying why."""
    if not isinstance(base, Optimizer) or type(base) is Optimizer:
        raise TypeError(f"{who}: base_optimizer must be a mithril optimizer (e.g. Adam()), "
                        f"got {describe(base)}")
    if "closure" in inspect.signature(base.update).parameters:
        raise TypeError(f"{who}: base_optimizer {type(base).__name__} evaluates the loss "
                        f"itself (its update takes closure=) and cannot be wrapped")
    return base


def copied(a: Any) -> Any:
    """A copy of the backend array ``a`` that no later update writes (NumPy, torch, JAX)."""
    return a.detach().clone() if hasattr(a, "detach") else a.copy()


def array(a: Any) -> Any:
    """``a``, a NumPy scalar as a 0-d array: arithmetic on a 0-d parameter gives a scalar,
    which the next update would refuse as not an array."""
    return np.asarray(a) if isinstance(a, np.generic) else a


def vdot(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """``Σ a·b`` over every tensor, as a Python float (optax's ``tree.vdot``)."""
    return math.fsum(float((a[n] * b[n]).sum()) for n in a)


def check_grads(opt: Optimizer, params: Mapping[str, Any], grads: Any, state: Any,
                what: str, need: Any = None) -> None:
    """``grads`` (``what``: which) checked as ``update`` checks them (backend, shape, dtype)
    against ``params`` and ``state`` (which ``opt`` made): for some of the parameters (a
    parameter left out has no gradient, as a torch ``.grad`` None), for at least the names
    ``need`` where given (a closure's, for the params it was given gradients of)."""
    if not isinstance(grads, Mapping):
        raise TypeError(f"{what} must be a dict of arrays, got {describe(grads)}")
    missing = sorted(set(need or ()) - set(grads))
    unknown = sorted(set(grads) - set(params))
    if missing or unknown:
        raise KeyMismatchError(f"{what}: " + ", ".join(
            ([f"missing {missing} (given gradients at params)"] if missing else []) +
            ([f"unknown {unknown} (no such parameter)"] if unknown else [])))
    if any(g is None for g in grads.values()):
        raise TypeError(f"{what}: {[n for n, g in grads.items() if g is None]} are None "
                        f"(leave a parameter without a gradient out of the dict)")
    try:
        check_update(opt, params, grads, state)
    except (TypeError, ValueError) as e:  # (say whose: the closure's, or those given)
        if what == "gradients":
            raise
        raise type(e)(f"{what}: {e}") from None


class OuterWrapper(HeldEstimates, HeldHyperparameters, Optimizer):
    """Holds ``base_optimizer`` and hands it the learning rate (hence schedulers),
    ``state_dict`` / ``load_state_dict`` (:attr:`OWN` are the wrapper's hyperparameters,
    ``"base_optimizer"`` the base's class and hyperparameters), and a base Sophia's
    ``hessian_due`` / ``update_hessian`` / ``win_rate`` (:class:`~.sophia.HeldEstimates`)."""

    OWN: tuple[str, ...] = ()
    HELD = "base_optimizer"  # (its hyperparameters read and set through the wrapper)

    def __copy__(self) -> OuterWrapper:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__["base_optimizer"] = copy.copy(self.base_optimizer)
        return new

    @property
    def learning_rate(self) -> float:
        """The base optimizer's learning rate."""
        return self.base_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, lr: float) -> None:
        self.base_optimizer.set_learning_rate(lr)

    def get_learning_rate(self, group: int | None = None) -> float:
        return self.base_optimizer.get_learning_rate(group)

    def set_learning_rate(self, lr: float, group: int | None = None) -> None:
        self.base_optimizer.set_learning_rate(lr, group)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    def hyperparameters(self) -> dict[str, Any]:
        base = self.base_optimizer
        return {"base_optimizer": {"optimizer": type(base).__name__,
                                   "hyperparameters": base.hyperparameters()},
                **{k: getattr(self, k) for k in self.OWN}}

    def hyper_holders(self) -> tuple[Any, ...]:
        """This wrapper, then its base's: a name other than the wrapper's own (``beta1``, a
        group's ``momentum``) is the base's hyperparameter, as a Lookahead's inner's (what
        a scheduler's ``cycle_momentum`` and ``hyperparameter("beta1")`` reach)."""
        return (self, *self.base_optimizer.hyper_holders())

    def flat_hyperparameters(self) -> dict[str, Any]:
        own = {k: getattr(self, k) for k in self.OWN}
        return {**self.base_optimizer.flat_hyperparameters(), **own}

    def nested_hyperparameters(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in flat.items() if k in self.OWN}
        rest = {k: v for k, v in flat.items() if k not in self.OWN}
        if rest:
            base = self.base_optimizer
            out["base_optimizer"] = {"optimizer": type(base).__name__,
                                     "hyperparameters": base.nested_hyperparameters(rest)}
        return out

    def check_own(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        """The wrapper's own hyperparameters of a state dict, checked as the constructor
        checks them (a subclass's)."""
        raise NotImplementedError

    def _checked_hyperparameter(self, name: str, value: Any, group: int | None,
                                rule: bool = True) -> Any:
        """The wrapper's own hyperparameters checked as its constructor checks them (what
        setting one as an attribute or a scheduler meets); the base's by the base."""
        who = type(self).__name__
        if name == "base_optimizer":
            return check_base(value, who)
        if name not in self.OWN:
            return self.base_optimizer._checked_hyperparameter(name, value, group, rule)
        if group is not None:
            raise ValueError(f"{who}: {name} holds for every parameter and cannot differ per "
                             f"group")
        try:
            return self.check_own({name: value})[name]
        except (TypeError, ValueError) as e:
            raise type(e)(f"{who}: {name}={value!r} refused: {e}") from None

    @property
    def nonfinite(self) -> str:
        """The base optimizer's ``nonfinite`` policy."""
        return self.base_optimizer.nonfinite

    @nonfinite.setter
    def nonfinite(self, value: str) -> None:
        # (set on the base, checked there: it was a bare "property has no setter" error,
        # as Lookahead's inner takes it)
        self.base_optimizer.nonfinite = value

    @property
    def tensor_slots(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.base_optimizer.tensor_slots

    #: the wrapper's own slots (one value per parameter element), beside the base's
    own_slots: tuple[str, ...] = ()

    def own_values(self) -> tuple[str, ...]:
        """The wrapper's own optimizer-wide scalars in ``state.values``, beside the base's."""
        return ()

    def full_slot_names(self) -> tuple[str, ...]:
        return (*self.base_optimizer.full_slot_names(), *self.own_slots)

    def init(self, params: Mapping[str, Any]) -> OptimizerState:
        """The base optimizer's state for ``params``, under this class's name (a state of
        the base optimizer alone is refused, and this one by the base alone)."""
        state = self.base_optimizer.init(params)
        self._backend = self.base_optimizer._backend
        return self.loaded(state)

    def loaded(self, state: OptimizerState) -> OptimizerState:
        """``state`` (the base optimizer's, new or loaded) as this wrapper's."""
        state.kind = type(self).__name__
        return state

    def held_view(self, state: Any) -> HeldView:
        """``state`` as the base optimizer's: the wrapper's own slots aside (as
        :meth:`base_update` does), the same count (the base steps once per update)."""
        return HeldView(state, type(self.base_optimizer).__name__, self.own_slots)

    def base_update(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
                    state: OptimizerState, **extra: Any) -> tuple[dict[str, Any], OptimizerState]:
        """The base optimizer's update of ``state``: meanwhile its kind is the base's and
        the wrapper's own slots and values are held aside (the base checks its own).
        ``extra`` goes to the base's update (``loss=`` for a loss-aware base)."""
        slots = {k: state.slots.pop(k) for k in self.own_slots}
        values = {k: state.values.pop(k) for k in self.own_values()}
        state.kind = type(self.base_optimizer).__name__
        try:
            return self.base_optimizer.update(params, gradients, state, **extra)
        finally:  # (a two-pass base may have replaced state.values)
            state.kind = type(self).__name__
            state.slots.update(slots)
            state.values = {**state.values, **values}

    def state_dict(self, state: OptimizerState | None = None, *, arrays: str = "numpy"
                   ) -> dict[str, Any]:
        """The base optimizer's state dict (of ``state``), under this class's name and
        hyperparameters."""
        if state is not None:
            check_state_kind(self, state)
        out = self.base_optimizer.state_dict(state, arrays=arrays)
        return {**out, "optimizer": type(self).__name__,
                "hyperparameters": self.hyperparameters()}

    def load_state_dict(self, d: Mapping[str, Any], params: Mapping[str, Any] | None = None
                        ) -> OptimizerState | None:
        """Restore the hyperparameters (the base optimizer's through its own
        ``load_state_dict``, which must be of the saved class) and, given ``params``, the
        state, the wrapper's own slots and values with it. Everything is checked first; on
        error nothing changes."""
        hp = checked_head(self, d)
        unknown = sorted(set(hp) - {"base_optimizer", *self.OWN})
        if unknown:
            raise KeyError(f"state dict hyperparameter(s) {unknown} unknown to "
                           f"{type(self).__name__}")
        trial = copy.copy(self)
        trial.__dict__.update(self.check_own(hp))
        spec = hp.get("base_optimizer", {"optimizer": type(trial.base_optimizer).__name__,
                                         "hyperparameters": {}})
        if not isinstance(spec, Mapping) or set(spec) != {"optimizer", "hyperparameters"}:
            raise TypeError("state dict hyperparameter 'base_optimizer' must be a dict with "
                            "exactly 'optimizer' (a class name) and 'hyperparameters'")
        if spec["optimizer"] != type(trial.base_optimizer).__name__:
            raise ValueError(f"state dict's base optimizer is {spec['optimizer']!r}, but this "
                             f"{type(self).__name__} wraps {type(trial.base_optimizer).__name__}")
        with_state = params is not None and "slots" in d
        values, slots = dict(d.get("values") or {}), dict(d.get("slots") or {})
        if with_state:  # (the wrapper's own, beside what the base loads)
            missing = [k for k in trial.own_values() if k not in values] + [
                k for k in trial.own_slots if k not in slots]
            if missing:
                raise KeyError(f"state dict lacks {type(self).__name__}'s {missing}")
            d = {**d, "slots": {k: v for k, v in slots.items() if k not in trial.own_slots},
                 "values": {k: v for k, v in values.items() if k not in trial.own_values()}}
            if not d["values"]:
                del d["values"]
        state = trial.base_optimizer.load_state_dict({**d, **spec}, params)
        if state is not None:
            probe = OptimizerState(state.kind, state.layout, {k: state.engine.full(
                state.layout.total, 0.0) for k in trial.own_slots}, state.engine)
            own_slots = StateDictMixin._loaded_slots({k: slots[k] for k in trial.own_slots},
                                                     probe)
            own_values = {k: trial.checked_value(k, values[k]) for k in trial.own_values()}
            trial.loaded(state)
            state.slots.update(own_slots)
            state.values.update(own_values)
        self.__dict__.update(trial.__dict__)
        return state

    def checked_value(self, name: str, value: Any) -> float:
        """One of the wrapper's own values of a state dict, as a float (checked)."""
        return to_float(f"state dict value {name!r}", value)
