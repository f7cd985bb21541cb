"""The hyperparameters' attribute access of :class:`~mithril.utils.optimizers.Optimizer`:
setting one by attribute (refusing a name no step reads, and a value the constructor would
refuse; counting changes for programs that baked them in) and the learning rate's accessors,
the optimizer's or one parameter group's."""

from __future__ import annotations

import numbers
from typing import Any

from .argument_names import _meant
from .averaging import check_ema_decay
from .checks import check_positive
from .groups import UNSET, differs, group_rate

#: floats checked when set by attribute all the same: an EMA decay outside [0, 1) extrapolates
#: (w = 1 − decay < 0 or > 1) silently, where torch's get_ema_multi_avg_fn refuses it
_ALWAYS_CHECKED = {"ema_decay": check_ema_decay}


class HyperparameterAccessMixin:
    """Attribute setting and learning-rate access for
    :class:`~mithril.utils.optimizers.Optimizer` (its groups: :class:`.groups.GroupsMixin`)."""

    def _followed(self, name: str) -> str | None:
        """Why ``name`` is not this optimizer's to set (None where it is): a Muon's fallback
        takes its learning rate (``_lr_follows``) and, following optax's one ``eps``, its
        ``epsilon`` (``_follows_epsilon``) from its Muon, which sets them."""
        d = self.__dict__
        if name[0] == "_":  # (internal state: set freely, and at every step)
            return None
        why = d.get("_lr_follows") if name == "learning_rate" else d.get(f"_follows_{name}")
        return None if why is None else str(why)

    def __setattr__(self, name: str, value: Any) -> None:
        if (why := self._followed(name)) is not None:
            raise ValueError(why)  # (a Muon's fallback: Muon sets it)
        self._set_counted(name, value)

    def _checked_hyperparameter(self, name: str, value: Any, group: int | None,
                                rule: bool = True) -> Any:
        """As :class:`.groups.GroupsMixin`'s; a name another optimizer sets (:meth:`_followed`)
        refused first, as a handle (a scheduler) would set it."""
        if group is None and (why := self._followed(name)) is not None:
            raise ValueError(why)
        return super()._checked_hyperparameter(name, value, group, rule)  # type: ignore[misc]

    def _set_counted(self, name: str, value: Any) -> None:
        """:meth:`__setattr__` without the :meth:`_followed` refusal: how the optimizer that
        sets such a value sets it (a change counted, as any)."""
        d = self.__dict__
        if "_made" in d and name[0] != "_":
            if name not in d:
                if not hasattr(type(self), name) and (meant := _meant(self, name)):
                    raise AttributeError(f"{type(self).__name__} has no hyperparameter "
                                         f"{name!r}: setting it would change no step ({meant})")
            elif name in _ALWAYS_CHECKED and d[name] is not None:
                try:  # (the constructor's check of this one value: a step may set it)
                    _ALWAYS_CHECKED[name](value)
                except (ValueError, TypeError) as e:
                    raise type(e)(f"{type(self).__name__}: {name}={value!r} refused: {e}") \
                        from None
            elif isinstance(d[name], float) and (
                    value is None or isinstance(value, (str, bytes, list, tuple, dict, set))):
                # (not a number over a number: the constructor's check, where the next step
                # would raise NumPy's bare error or, None as SGD's weight decay, silently
                # make every parameter NaN; None stays where the constructor takes it)
                try:
                    self._check_attribute(name, value)
                except (ValueError, TypeError) as e:
                    if f"{name}={value!r} refused" in str(e):
                        raise
                    raise type(e)(f"{type(self).__name__}: {name}={value!r} refused: "
                                  f"{str(e).removeprefix(type(self).__name__ + ': ')}") from None
            elif (type(d[name]) is not float or isinstance(value, str)) \
                    and name != "learning_rate":
                self._check_attribute(name, value)
        # a hyperparameter other than the learning rate (which every step reads) is set: a
        # program that baked it in (make_train_step's JAX step) compares this count
        changed = name[0] != "_" and name != "learning_rate" and differs(
            self.__dict__.get(name, UNSET), value)
        object.__setattr__(self, name, value)  # (first: a read-only property raises here)
        if changed:
            d = self.__dict__
            d["_hyper_version"] = d.get("_hyper_version", 0) + 1

    def _check_attribute(self, name: str, value: Any) -> None:
        """Refuse ``value`` set by attribute over a flag, a choice, an integer or an unset
        value (``opt.nonfinite = "skipp"``) where the constructor would: such a typo would
        otherwise pick a default's behaviour silently. The value is set as given (checked,
        not normalised). A number set over a float stays unchecked, as torch's
        ``param_groups`` are (a step reads it as it is), and so does the learning rate;
        not ``ema_decay`` (:data:`_ALWAYS_CHECKED`)."""
        try:
            self._checked_hyperparameter(name, value, None, rule=False)
        except (ValueError, TypeError):
            current = self.__dict__[name]
            try:  # (a name the constructor's check cannot take: a nested optimizer's own)
                self._checked_hyperparameter(name, current, None, rule=False)
            except (ValueError, TypeError) as e:
                # ... but a number (one left out of range by an unchecked set too) replaced
                # by what is no number is refused
                if "unexpected keyword argument" in str(e) or not (
                        _number(current) and not _number(value)):
                    return
            raise

    # -- learning rate ---------------------------------------------------------------
    def get_learning_rate(self, group: int | None = None) -> float:
        """The learning rate, or that of ``param_groups[group]`` (its ``lr_scale`` times it,
        or the rate it was given while the optimizer's was 0)."""
        if group is None:
            return self.learning_rate
        return group_rate(self.learning_rate, self._group(group))

    def set_learning_rate(self, lr: float, group: int | None = None) -> None:
        """Change the learning rate (every group's in proportion: each keeps its
        ``lr_scale``), or with ``group`` only that group's. It is an argument of every
        kernel, so nothing recompiles.

        A group's rate is kept as its ratio to the optimizer's. One set while the
        optimizer's is 0 (a per-group warm-up from 0 in the first lane, as torch's
        ``LambdaLR`` with a list) is kept as it is until the optimizer's rate is set; the
        group then follows its last ratio again."""
        if group is None:
            self.learning_rate = check_positive("learning_rate", lr)
            pinned = [g for g in self._groups if "learning_rate" in g]
            for g in pinned:
                g._drop("learning_rate")
            self._groups_version += bool(pinned)
            return
        g = self._group(group)
        try:  # (why: the error did not say which group refused it)
            lr = check_positive("learning_rate", lr)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{type(self).__name__} param_groups[{group}]: {e}") from None
        before = self.get_learning_rate(group)
        if "learning_rate" in g:
            g._drop("learning_rate")
        if self.learning_rate == 0:
            if lr != 0:  # no ratio gives it: kept as it is
                g._set("learning_rate", lr)
        elif differs(g.get("lr_scale", 1.0), lr / self.learning_rate):
            g._set("lr_scale", lr / self.learning_rate)
        if differs(before, self.get_learning_rate(group)) or "learning_rate" in g:
            self._groups_version += 1


def _number(x: Any) -> bool:
    """A real number (not a bool): what a float hyperparameter may hold."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
