"""The learning rates a :class:`~mithril.interop.torch_optim.TorchOptimizer` holding several
torch groups shows and saves while a Mithril scheduler drives ``opt.mithril_optimizer``.

With several groups the mithril optimizer's own rate starts at 1.0 and each group's
``lr_scale`` is its torch ``lr`` (:mod:`.torch_optim_groups`). A Mithril scheduler moves the
optimizer's rate (or, ``per_group=True``, each group's), so a group's rate is then
``rate * lr_scale`` (:func:`~mithril.utils.optimizers.groups.group_rate`), which
``param_groups[i]["lr"]`` shows (:func:`adopt_rates`, before each step and
``state_dict()``), as a torch scheduler writes its rates there. A rate written into the
group since (a torch scheduler, a user) still wins: it becomes the group's ``lr_scale``
against the optimizer's rate at the next step.

A state dict keeps the optimizer's rate and each group's ``lr_scale`` (its ``"mithril"``
entry), which a Mithril scheduler's state dict goes on from, and each group's ``lr`` the
rate shown, which a ``torch.optim`` optimizer loading it takes. A load keeps the saved
rate and scales for each group whose ``lr`` is still their product, and sets the ``lr`` of
one edited since (a ``torch.optim`` optimizer that loaded ours and was scheduled on) as
its rate (:func:`with_rates`). Why: the groups' ``lr`` showed the rates given at the
construction all run long; saving the shown rates as the scales (the optimizer's rate back
at 1.0) applied the Mithril scheduler's factor twice after a resume."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..utils.optimizers import Optimizer
from .torch_optim_state import groups_holder, same, scalar

__all__ = ["adopt_rates", "group_rates", "with_rates"]

_LR = ("lr_scale", "learning_rate")  # (a group's rate: its scale, or one pinned while 0)


def group_rates(opt: Optimizer, index: Sequence[int | None]) -> list[float]:
    """The rate of each torch group (``index``: its mithril group; for an empty one, None,
    which the mithril optimizer leaves out, the optimizer's own rate)."""
    return [opt.get_learning_rate() if j is None else opt.get_learning_rate(group=j)
            for j in index]


def adopt_rates(groups: Sequence[dict[str, Any]], synced: Sequence[dict[str, Any]],
                rates: list[float], now: Sequence[float], index: Sequence[int | None]
                ) -> None:
    """Show in each group's ``lr`` its rate ``now`` where it moved since ``rates`` (the
    rates at the last sync: a Mithril scheduler set it) and the ``lr`` is still the one
    synced (not written since); ``synced`` and ``rates`` follow. An empty group (``index``
    None) moves in proportion to the optimizer's own rate, as torch's scheduler moves it
    (it holds no parameter: what it shows changes no number)."""
    for i, (g, old, was, rate, j) in enumerate(zip(groups, synced, rates, now, index)):
        if rate == was or "lr" not in g or not same(g["lr"], old["lr"]):
            continue
        if j is None:
            if not was:
                continue
            rates[i], rate = rate, float(scalar(g["lr"])) * rate / was
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(rate)  # (as torch's schedulers write a tensor lr)
        else:
            g["lr"] = rate
        old["lr"] = copy.deepcopy(g["lr"])
        if j is not None:
            rates[i] = rate


def _parts(hp: Mapping[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """(the optimizer's rate, each mithril group's rate entries) of hyperparameters ``hp``."""
    h = groups_holder(hp)
    groups = h.get("param_groups")
    return h.get("learning_rate"), [
        {k: g[k] for k in _LR if k in g} for g in groups if isinstance(g, Mapping)
    ] if isinstance(groups, (list, tuple)) else []


def _set_parts(hp: dict[str, Any], rate: Any, parts: Sequence[Mapping[str, Any]]) -> None:
    h = groups_holder(hp)
    h["learning_rate"] = rate
    for g, part in zip(h["param_groups"], parts):
        for k in _LR:
            g.pop(k, None)
        g.update(part)


def with_rates(opt: Optimizer, hp: Mapping[str, Any], groups: Sequence[Mapping[str, Any]],
               index: Sequence[int | None], source: Mapping[str, Any]) -> dict[str, Any]:
    """``hp`` (the hyperparameters of the torch ``groups``: rate 1.0, each group's scale its
    ``lr``) with the optimizer's rate and each group's scale of ``source`` (the live
    optimizer's hyperparameters, or a state dict's), but a group whose ``lr`` is not its
    rate there set to its ``lr`` (as the next step's sync does). ``hp`` itself where
    ``source`` holds other groups (a state dict of a torch.optim optimizer)."""
    rate, parts = _parts(source)
    kept = [j for j in index if j is not None]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
            or len(parts) != len(kept) or len(_parts(hp)[1]) != len(kept):
        return dict(hp)
    out = copy.deepcopy(dict(hp))
    _set_parts(out, rate, parts)
    trial = copy.copy(opt)
    moved = False
    try:  # (a value refused here is refused, by name, where these hyperparameters load)
        trial.load_state_dict({"optimizer": type(opt).__name__, "hyperparameters": out})
        for g, j in zip(groups, index):
            if j is None or "lr" not in g:
                continue
            lr = scalar(g["lr"])
            if not same(lr, trial.get_learning_rate(group=j)):
                trial.set_learning_rate(lr, group=j)
                moved = True
    except (TypeError, ValueError, KeyError):
        return dict(hp)
    if moved:
        _set_parts(out, rate, _parts(trial.state_dict(None)["hyperparameters"])[1])
    return out
