"""The checkpoints of :class:`~mithril.interop.torch_optim.TorchOptimizer`: a mixin with
torch's ``state_dict`` / ``load_state_dict`` (torch-shaped, with the ``"mithril"`` entry;
a ``torch.optim`` optimizer's own state dict and a ``save_checkpoint`` file's taken too;
everything checked before anything changes). The layout and the checks are
:mod:`.torch_optim_state`'s; the state itself (``_mithril``, ``_opt_state``, ``_names``,
``_params``, ``_keys``, ``_grouped``, ``_group_names``, ``_complex``) is set by
:class:`~mithril.interop.torch_optim.TorchOptimizer`'s ``__init__``."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import KeyMismatchError
from .torch_optim_complex import reals
from .torch_optim_groups import (
    check_torch_flags,
    check_torch_kind,
    given_values,
    grouped_hyperparameters,
    mithril_index,
    packed_groups,
)
from .torch_optim_lbfgs import ours_from_torch, torch_layout, torch_lbfgs_state
from .torch_optim_own import is_own, torch_shaped
from .torch_optim_rates import with_rates
from .torch_optim_state import export, parse_state_dict, restore, with_group

__all__ = ["TorchCheckpoints"]


class TorchCheckpoints:
    """torch's ``state_dict`` / ``load_state_dict`` of a :class:`TorchOptimizer` (see the
    module docs of :mod:`mithril.interop.torch_optim`); before ``torch.optim.Optimizer`` in
    its bases, so that these are the ones called."""

    def state_dict(self) -> dict[str, Any]:
        """A torch-shaped state dict (see the module docs); the tensors are copies."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._adopt_rate()  # (a mithril scheduler's rate since the last step: saved too)
        self._take_counts()
        packed = packed_groups(self)
        state, meta = export(self._mithril, self._opt_state, self._names,
                             [g["lr"] for g in self.param_groups for _ in g["params"]],
                             self._params)
        if torch_layout(self._mithril) and self._opt_state is not None:  # (torch.optim's)
            state = torch_lbfgs_state(self._opt_state, self._names)
        try:  # what the next step will use (a scheduler may have changed lr since the last)
            meta["hyperparameters"] = self._hyperparameters_of(
                self.param_groups, meta["hyperparameters"], per_key=True)
        except (KeyError, ValueError, TypeError):  # the next step refuses it, says why
            pass
        meta["param_names"] = list(self._names)
        # also in the first group: torch.distributed.checkpoint's get_optimizer_state_dict
        # keeps only "state" and "param_groups" (their keys), and the load needs the counters
        packed[0]["mithril"] = meta
        out: dict[str, Any] = {"state": state, "param_groups": packed, "mithril": meta}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def _hyperparameters_of(self, groups: list[Mapping[str, Any]], hp: Mapping[str, Any],
                            per_key: bool = False) -> dict[str, Any]:
        """``hp`` (the mithril optimizer's) with the values of the torch ``groups`` set (with
        ``per_key``, one group's keys each on its own, skipping one that is refused)."""
        if self._grouped:  # (the optimizer's rate and each group's scale kept: with_rates)
            return with_rates(self._mithril, grouped_hyperparameters(
                self._mithril, self._keys, groups, self._group_names, offsets_of=hp),
                groups, mithril_index(self._group_names), hp)
        if not per_key:
            return with_group(self._mithril, hp, groups[0], self._keys)
        out = dict(hp)
        for key, ours in self._keys:
            try:
                out = with_group(self._mithril, out, {key: groups[0][key]}, [(key, ours)])
            except (KeyError, ValueError):
                pass
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (of a wrapper of the same optimizer class
        over parameters of the same shapes, in groups of the same sizes, matched by position
        as in torch). Everything is checked before anything changes: on error this
        optimizer, its groups and the parameters are as they were."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state dict must be a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result

        def refuse(e: BaseException) -> BaseException:
            cls, msg = (KeyMismatchError, e.args[0] if e.args else e) if isinstance(
                e, KeyError) else (type(e), e)
            note = ("; a complex parameter's slots are complex tensors of its shape (held "
                    "here as its real view, shape (..., 2))") if self._complex else ""
            return cls(f"state dict refused (nothing changed): {msg}{note}")

        if is_own(state_dict):  # (a save_checkpoint file's: optimizer.state_dict(state))
            state_dict = torch_shaped(self, state_dict)
        # (LBFGS in torch.optim.LBFGS's layout: per parameter, with a "mithril" entry)
        state_dict = ours_from_torch(self._mithril, state_dict, self._names, reals(self._params))
        groups, ours = parse_state_dict(self._mithril, state_dict, self._names,
                                        self.param_groups, self._hyperparameters_of)
        try:  # (a torch.optim state dict's groups hold torch's flags)
            check_torch_flags(self._mithril, groups, self._keys)
        except ValueError as e:
            raise refuse(e) from e
        where = given_values(groups, self._keys, self.param_groups)
        try:  # the groups' values first: a refused one is named (as at construction)
            copy.copy(self._mithril).load_state_dict({"optimizer": ours["optimizer"],
                                                      "hyperparameters": ours["hyperparameters"]})
        except (TypeError, ValueError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise refuse(type(e)(f"{where}: {msg}") if where else e) from e
        slots, opt = ours.get("slots"), self._mithril
        if not isinstance(slots, Mapping) or set(slots) == {*opt.slot_names(),
                                                            *opt.tensor_slots}:
            try:  # (where the slots differ, the load names them instead)
                check_torch_kind(opt, groups, self._keys)
            except KeyError as e:
                raise refuse(e) from e
        with torch.inference_mode(False):  # (buffers of normal tensors: see step)
            state = restore(opt, ours, self._names, reals(self._params), refuse)
        # nothing fails from here on
        self._quiet = True  # (param_groups shows no rate until the groups are set: _note_rates)
        self._opt_state = state
        self._views = None  # the next step copies the parameters into the new buffer
        for group, now in zip(groups, self.param_groups):
            for key, _ in self._keys:
                group.setdefault(key, now[key])
        self.param_groups = groups
        self._synced = [{key: copy.deepcopy(g[key]) for key, _ in self._keys} for g in groups]
        self._note_rates()
        self._count_on()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
