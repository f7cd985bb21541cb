"""The torch param groups <-> the wrapped optimizer's hyperparameters, for
:class:`~mithril.interop.torch_optim.TorchOptimizer`: a mixin that checks the groups still
hold the parameters they took and applies a group's changed values (``lr`` and the rest)
to the mithril optimizer before a step, all or nothing."""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch

from ..errors import KeyMismatchError
from ..utils.optimizers.layout import slot_shape_of
from .torch_optim_groups import apply_values, check_torch_flags, mithril_index, sync_groups
from .torch_optim_rates import adopt_rates, group_rates
from .torch_optim_state import group_value, same, scalar

__all__ = ["TorchGroupSync"]


class TorchGroupSync:
    """The group sync of a torch optimizer; the state (``_mithril``, ``_keys``,
    ``_synced``, ``_group_names``, ``_params``, ``_grouped``, ``_opt_state``) is set by
    :class:`TorchOptimizer`'s ``__init__``."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """torch's groups; each ``lr`` shows the rate the next step uses, a Mithril
        scheduler's of ``opt.mithril_optimizer`` too (:meth:`_adopt_rate`, when the
        optimizer's rates moved since the last look: a cheap check)."""
        groups = self.__dict__.get("_groups", [])
        if "_rate_key" in self.__dict__ and not self.__dict__.get("_quiet"):
            key = _rate_key(self._mithril)
            if key != self.__dict__.get("_rate_key"):
                self._adopt_rate()
                self._rate_key = key
            self._adopt_values()
        return groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.__dict__["_groups"] = value

    def _sync_all(self) -> None:
        groups = self.param_groups
        if len(groups) != len(self._group_names) or not all(
                len(g["params"]) == len(n) for g, n in zip(groups, self._group_names)) \
                or not all(map(operator.is_, chain.from_iterable(g["params"] for g in groups),
                               self._params)):  # (C-speed: every step)
            # why: a group's "params" replaced or cut was silently ignored (every parameter
            # still stepped), where torch's steps those the groups hold
            raise ValueError(f"param_groups changed their parameters (or groups) since the "
                             f"optimizer took them ({len(self._params)} parameters in "
                             f"{len(self._group_names)} groups): add them with "
                             f"add_param_group; to drop some, make a new optimizer")
        check_torch_flags(self._mithril, groups, self._keys)
        self._adopt_rate()
        self._adopt_values()
        if self._grouped:
            sync_groups(self)
            self._note_rates()
        else:
            self._sync(self.param_groups[0])
        self._rate_key = _rate_key(self._mithril)

    def _take_counts(self) -> None:
        """Take the ``opt.state[p]["step"]`` written in place since the last look
        (:class:`~.torch_optim_state_view.StepCounts`)."""
        if self._counts is not None:
            self._counts.take(self._mithril, self._opt_state, self._names)

    def _count_on(self) -> None:
        """Show the step just taken in the ``opt.state[p]["step"]`` tensors read so far."""
        if self._counts is not None:
            self._counts.refresh(self._mithril, self._opt_state, self._names)

    def _note_rates(self) -> None:
        """Note each group's rate (several groups: :mod:`.torch_optim_rates`), as synced
        (the groups are set: ``param_groups`` shows the rates again)."""
        self._rates = group_rates(self._mithril, mithril_index(self._group_names)) \
            if self._grouped else []
        self._rate_key = _rate_key(self._mithril)
        self._quiet = False

    def _value_of(self, ours: tuple[str, ...]) -> Any:
        if ours == ("learning_rate",):
            return self._mithril.get_learning_rate()
        hp = self._mithril.flat_hyperparameters()
        return tuple(hp[k] for k in ours) if len(ours) > 1 else hp[ours[0]]

    def _adopt_rate(self) -> None:
        """A rate set on the wrapped optimizer itself (a Mithril scheduler of
        ``opt.mithril_optimizer``) while the group kept the ``lr`` synced last is shown as
        its ``lr``, so the next step keeps it (an ``lr`` written since still wins); with
        several groups each group's rate (:mod:`.torch_optim_rates`)."""
        if self._grouped:
            index = mithril_index(self._group_names)
            adopt_rates(self.__dict__["_groups"], self._synced, self._rates,
                        group_rates(self._mithril, index), index)
            return
        group, synced = self.__dict__["_groups"][0], self._synced[0]
        rate = self._mithril.get_learning_rate()
        if "lr" not in group or not same(group["lr"], synced["lr"]) \
                or rate == scalar(synced["lr"]):
            return
        # why: each step set the group's old lr back, undoing the scheduler unseen
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)  # (as torch's schedulers write a tensor lr)
        else:
            group["lr"] = rate
        synced["lr"] = copy.deepcopy(group["lr"])

    def _adopt_values(self) -> None:
        """The values other than ``lr`` set on the wrapped optimizer itself (a Mithril
        scheduler cycling ``momentum`` or ``betas``, a weight-decay schedule, a per-group
        one) while a group kept the value synced last are shown in that group, as
        :meth:`_adopt_rate` does for ``lr``: ``param_groups`` and ``state_dict()`` show them,
        and a group's other value edited by hand no longer writes the stale one back. A value
        written into the group since still wins. Looked at when the optimizer's
        hyperparameters changed since the last look (their change counts: a cheap check)."""
        key = _values_key(self._mithril)
        if key == self.__dict__.get("_values_key"):
            return
        opt, groups = self._mithril, self.__dict__["_groups"]
        index = mithril_index(self._group_names) if self._grouped else [None] * len(groups)
        for i, (g, old, j) in enumerate(zip(groups, self._synced, index)):
            if j is None and self._grouped:  # (an empty group: it steps nothing)
                continue
            for k, ours in self._keys[1:]:
                if k not in g or not same(g[k], old[k]):
                    continue
                try:
                    was = group_value(k, ours, old[k], i)
                    now = [opt._hyperparameter_value(n, j) for n in ours]
                except (AttributeError, KeyError, TypeError, ValueError):
                    continue
                if not all(isinstance(v, (int, float)) for v in now) \
                        or all(same(v, was[n]) for n, v in zip(ours, now)):
                    continue  # (a number set on the optimizer: not an object it holds)
                g[k] = _torch_form(g[k], now)
                old[k] = copy.deepcopy(g[k])
        self._values_key = key

    def _sync(self, group: Mapping[str, Any]) -> None:
        """Apply the group's values that changed since the last step to the optimizer."""
        opt = self._mithril
        try:
            lr = group["lr"]
        except KeyError:
            raise KeyMismatchError("param_groups[0] has no 'lr'") from None
        lr, old_lr = scalar(lr), opt.get_learning_rate()
        if lr != old_lr:
            try:
                opt.set_learning_rate(lr)
            except (TypeError, ValueError) as e:
                raise type(e)(f"param_groups[0]['lr']: {e}") from e
        try:  # a refused value of the group leaves the learning rate as it was too
            changed = {}
            for key, ours in self._keys[1:]:
                if key not in group:
                    raise KeyMismatchError(f"param_groups[0] has no '{key}' (the "
                                           f"optimizer's {', '.join(ours)})")
                if not same(group[key], self._synced[0][key]):
                    changed[key] = group[key]
            if changed:
                self._apply(changed)
        except BaseException:
            if lr != old_lr:
                opt.set_learning_rate(old_lr)
            raise
        if lr != old_lr:
            self._synced[0]["lr"] = copy.deepcopy(group["lr"])

    def _apply(self, changed: dict[str, Any]) -> None:
        opt = self._mithril
        keys = dict(self._keys)
        hp: dict[str, Any] = {}
        for key, value in changed.items():
            hp.update(group_value(key, keys[key], value))
        old = opt.flat_hyperparameters()
        before = opt.nested_hyperparameters({k: old[k] for k in hp})
        where = ", ".join(f"param_groups[0]['{k}']" for k in changed)
        st = self._opt_state
        apply_values(opt, opt.nested_hyperparameters(hp), before, st, where)
        moved = [] if st is None else [  # (slots of the same names laid out otherwise:
            s for s in (*opt.slot_names(), *opt.tensor_slots) if s in st.slots and  # Muon's
            [tuple(slot_shape_of(opt, s, tuple(shape), n)) for n, shape in  # exclusions)
             zip(st.layout.names, st.layout.shapes)] != list(st.slot_layout(s).shapes)]
        if moved:
            opt.load_state_dict({"optimizer": type(opt).__name__, "hyperparameters": before})
            raise ValueError(f"{where}: {type(opt).__name__} would then lay out its state "
                             f"slots {moved} otherwise than its state holds them; set this "
                             f"in the constructor instead")
        self._synced[0].update({k: copy.deepcopy(v) for k, v in changed.items()})


def _values_key(opt: Any) -> tuple:
    """What changes when a hyperparameter of ``opt`` (but its learning rate) is set."""
    return tuple((h.__dict__.get("_hyper_version"), h.__dict__.get("_groups_version"))
                 for h in opt.hyper_holders())


def _torch_form(shown: Any, values: list[Any]) -> Any:
    """``values`` (the optimizer's, one per hyperparameter of a torch key) as the group
    showed the key: one number, or a tuple (``betas``); a tensor filled in place (as torch's
    schedulers write a tensor value)."""
    if len(values) == 1:
        if isinstance(shown, torch.Tensor):
            return shown.fill_(values[0])
        return values[0]
    if isinstance(shown, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in shown):
        for t, v in zip(shown, values):
            if isinstance(t, torch.Tensor):
                t.fill_(v)
        return type(shown)(t if isinstance(t, torch.Tensor) else v for t, v in zip(shown, values))
    return type(shown)(values) if isinstance(shown, (tuple, list)) else tuple(values)


def _rate_key(opt: Any) -> tuple:
    """What changes when a rate of ``opt`` (its own or a group's) is set."""
    return opt.get_learning_rate(), getattr(opt.hyper_holders()[-1], "_groups_version", None)
