"""torch's parameter groups on one mithril optimizer (:class:`~.torch_optim.TorchOptimizer`).

``torch_optimizer(Adam(), [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])``
takes torch's list of dicts. Each torch group becomes one of the mithril optimizer's
``param_groups`` (its parameters by name) holding *every* value the torch group has, so that
a change to one group never moves another, as in torch. The optimizer's own learning rate
is fixed at 1.0, which makes each group's ``lr_scale`` its torch ``lr`` exactly (a ratio to
any other rate would round, and could not hold a group's rate while another's is 0).

Values that hold for the whole step (``clip_norm``, ``nonfinite``) or belong to a wrapper
(a Lookahead's ``sync_period``) must be equal in every group; values that change the
update rule or the state slots (``amsgrad``, SGD momentum from 0 to non-zero) cannot differ
between groups. Both are refused at construction, naming the group and key. A group with
no parameters (torch takes one) is checked as any other but left out of the mithril
optimizer's groups (:func:`mithril_index` maps the indices).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import KeyMismatchError
from ..utils.optimizers import AdamW, Optimizer, RMSProp
from ..utils.optimizers.groups import GLOBAL, GROUP_KEYS
from .torch_optim_state import (
    group_value,
    groups_holder,
    live_offsets,
    same,
    scalar,
    step_offsets,
    with_group,
)

#: the optimizer's own learning rate when it holds torch's groups (see the module docs)
REFERENCE_LR = 1.0

_BETA = re.compile(r"beta[0-9]+")


def group_keys(opt: Optimizer) -> list[tuple[str, tuple[str, ...]]]:
    """(param-group key, the hyperparameters it holds) for ``opt``: ``lr`` first, ``betas``
    for ``beta1, beta2[, beta3...]``, ``eps`` for ``epsilon``, ``alpha`` for RMSProp's
    ``decay``; every other hyperparameter under its own name (a Lookahead's inner
    optimizer's too: ``flat_hyperparameters``)."""
    hp = opt.flat_hyperparameters()
    betas = tuple(sorted((k for k in hp if _BETA.fullmatch(k)), key=lambda k: int(k[4:])))
    if len(betas) < 2:  # a lone beta1 (schedule-free SGD) keeps its name: torch's "betas"
        betas = ()  # is a tuple, which OneCycleLR's momentum cycling indexes
    rename = {"epsilon": "eps"}
    if any(isinstance(h, RMSProp) for h in opt.hyper_holders()):
        rename["decay"] = "alpha"
    out: list[tuple[str, tuple[str, ...]]] = [("lr", ("learning_rate",))]
    taken = {"lr", "params", "param_names"}
    for k in hp:
        if k == "learning_rate" or k in betas[1:]:
            continue
        if k in betas:
            key, ours = "betas", betas
        else:
            key, ours = rename.get(k, k), (k,)
        if key in taken or (key != k and key in hp):  # a clash: keep our own name
            key = k
        taken.add(key)
        out.append((key, ours))
    return out


#: torch.optim's per-group settings: in a group of an optimizer without them they would be
#: ignored, so they are refused, not carried along
_TORCH_SETTINGS = frozenset({
    "lr", "momentum", "dampening", "nesterov", "betas", "eps", "alpha", "centered", "lr_decay",
    "initial_accumulator_value", "rho", "etas", "step_sizes", "lambd", "t0", "amsgrad",
    "momentum_decay", "decoupled_weight_decay", "weight_decay", "maximize", "foreach",
    "capturable", "differentiable", "fused", "beta2_decay", "d", "max_iter", "max_eval",
    "tolerance_grad", "tolerance_change", "history_size", "line_search_fn", "ns_coefficients",
    "ns_steps", "adjust_lr_fn"})

#: torch.optim's per-group flags that do not change the numbers (taken from a state dict)
#: or are checked by :func:`check_torch_flags`
_TORCH_SWITCHES = frozenset({"maximize", "foreach", "capturable", "differentiable", "fused",
                             "decoupled_weight_decay"})


#: torch.optim's per-group flags that change the update (torch's optimizers read them at
#: every step); where the optimizer has no such value, a group's must say what it does
#: (why: ``param_groups[0]["maximize"] = True`` on Adam was silently ignored, descending)
TORCH_FLAGS = ("maximize", "decoupled_weight_decay", "differentiable")


def check_torch_flags(opt: Optimizer, groups: Sequence[Mapping[str, Any]],
                      keys: Sequence[tuple[str, tuple]], start: int = 0) -> None:
    """Refuse groups holding one of torch's :data:`TORCH_FLAGS` that ``opt`` does not have
    at another value than what it does (``maximize`` False; ``decoupled_weight_decay``
    True for AdamW, else False), as a torch.optim state dict or a user may set them
    (``groups`` are ``param_groups[start]`` on)."""
    for i, g in enumerate(groups, start):
        for flag in TORCH_FLAGS:
            if flag not in g or any(flag == k for k, _ in keys):
                continue
            want = flag == "decoupled_weight_decay" and any(
                isinstance(h, AdamW) for h in opt.hyper_holders())
            if bool(g[flag]) != want:
                hint = {"maximize": "negate the loss instead",
                        "differentiable": "its step runs under torch.no_grad, no autograd "
                                          "graph reaches through it"}.get(
                    flag, "Adam and AdamW are two optimizers here: wrap the other one")
                raise ValueError(f"param_groups[{i}]['{flag}'] = {g[flag]!r}: "
                                 f"{type(opt).__name__} has no '{flag}' (it always runs "
                                 f"as {flag}={want}; {hint})")


def check_torch_kind(opt: Optimizer, groups: Sequence[Mapping[str, Any]],
                     keys: Sequence[tuple[str, tuple]]) -> None:
    """Refuse loaded groups holding a ``torch.optim`` setting ``opt`` has not (a state dict
    of another kind: ``torch.optim.SGD``'s ``momentum`` for Adam), as the constructor does.
    (why: an SGD's state dict made before its first step has no slots to tell its kind by;
    Adam took it, its moments reset and ``momentum`` carried along unread)"""
    known = {k for k, _ in keys}
    for i, g in enumerate(groups):
        bad = sorted(k for k in g if k in _TORCH_SETTINGS and k not in known
                     and k not in _TORCH_SWITCHES)
        if bad:
            raise KeyMismatchError(f"param_groups[{i}]: {bad} are not values of "
                                   f"{type(opt).__name__} (a state dict of another "
                                   f"optimizer?); its group keys: {sorted(known)}")


def torch_values(groups: Sequence[Mapping[str, Any]], keys: Sequence[tuple[str, tuple]],
                 defaults: Mapping[str, Any], start: int = 0) -> list[dict[str, Any]]:
    """Each torch group's entries under ``keys`` (the optimizer's values where a group
    leaves one out, as torch's ``defaults``), and its other entries carried along as torch
    does (``"name"`` for logging); a setting of another optimizer (``momentum`` for Adam) or
    a near spelling of a key is refused, naming it (``param_groups[start + i]``)."""
    import difflib

    from ..utils.optimizers.base import _catalog_takes

    known = {k for k, _ in keys} | {"param_names"}
    out = []
    for i, g in enumerate(groups, start):
        if "step_offset" in g:  # (carried along unread, it silently did nothing)
            raise KeyMismatchError(f"param_groups[{i}]: 'step_offset' is set by the wrapper "
                                   f"itself (each parameter counts its own steps, "
                                   f"as torch's); leave it out")
        extra = sorted(set(g) - known)
        near = {k: difflib.get_close_matches(k, known, 1, 0.8) for k in extra}
        bad = [k for k in extra if k not in _TORCH_SWITCHES  # (a switch: as a load takes it)
               and (near[k] or k in _TORCH_SETTINGS or k in _catalog_takes())]
        if bad:
            hint = "; ".join(f"{k}: did you mean {near[k][0]}?" for k in bad if near[k])
            # (a KeyMismatchError: a KeyError whose message is not quoted and escaped)
            raise KeyMismatchError(f"param_groups[{i}]: {bad} are not values of this "
                                   f"optimizer (its group keys: "
                                   f"{sorted(k for k, _ in keys)})"
                                   + (f" ({hint})" if hint else ""))
        out.append({**{k: g.get(k, defaults[k]) for k, _ in keys},
                    **{k: g[k] for k in extra},
                    **({"param_names": g["param_names"]} if "param_names" in g else {})})
    return out


def torch_groups(extras: Sequence[Mapping[str, Any]], counts: Sequence[int],
                 names: Sequence[str], given: Sequence[Any],
                 keys: Sequence[tuple[str, tuple]], defaults: Mapping[str, Any],
                 start: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                          list[list[str]], str]:
    """torch's group dicts (``extras``: each one's entries but ``params``; ``counts``: how
    many of the parameters ``names`` / ``given`` each holds, in order), as
    ``param_groups[start]`` on: (the dicts to hand to torch's ``add_param_group``, each
    group's values (:func:`torch_values`), each group's parameter names, the given values
    an error of the optimizer's checks is put on). The one path of the groups given at
    construction and of those added later."""
    values = torch_values(extras, keys, defaults, start)
    where = (given_values(extras, keys, [defaults] * len(extras), start)
             or ("param_groups" if start == 0 else f"param_groups[{start}]"))
    ends = [sum(counts[:i + 1]) for i in range(len(counts))]
    group_names = [list(names[e - c:e]) for c, e in zip(counts, ends)]
    dicts = [{"params": list(given[e - c:e]), **v} for c, e, v in zip(counts, ends, values)]
    return dicts, values, group_names, where


def hyperparameters_for(opt: Optimizer, keys: Sequence[tuple[str, tuple[str, ...]]],
                        groups: Sequence[Mapping[str, Any]], names: Sequence[Sequence[str]],
                        where: str, closure_driven: bool, grouped: bool) -> dict[str, Any]:
    """The hyperparameters (as ``opt.load_state_dict`` takes them) that make ``opt`` run the
    torch ``groups`` over the parameters ``names[i]`` of each: one group's values set on
    the optimizer itself, several as its ``param_groups`` (:func:`grouped_hyperparameters`;
    refused, :func:`check_wrappable`, for an optimizer that takes one group unless it holds
    torch's groups already: ``grouped``). Raises, naming ``where``, for a refused value."""
    if len(groups) > 1:
        if not grouped:
            check_wrappable(opt, closure_driven)
        return grouped_hyperparameters(opt, keys, groups, names, where)
    return with_group(opt, opt.state_dict(None)["hyperparameters"], groups[0], keys)


def joined_at(opt: Optimizer, hp: dict[str, Any], new: Sequence[str], st: Any,
              group: int) -> None:
    """Give the group of the parameters ``new`` (added as ``param_groups[group]``) in ``hp``
    (:func:`hyperparameters_for`'s; a Lookahead's groups are its inner optimizer's, under
    ``hp["inner"]["hyperparameters"]``: :func:`groups_holder`) the ``step_offset`` of the
    state ``st``'s step count, so that they count their own steps from the add, as torch's
    per-parameter ``step`` (a Lookahead's sync too: each group on its own count, as timm's).
    Raises, changing nothing, where ``hp`` holds no such group. Why: without it the new
    parameters' bias corrections silently counted the steps taken before they joined
    (torch's Adam's first step after the add is ~3x ours)."""
    if st is None or not st.step or not new:
        return
    for g in groups_holder(hp).get("param_groups") or ():
        if list(g["params"]) == list(new):
            g["step_offset"] = st.step
            return
    name = type(opt).__name__
    raise ValueError(f"param_groups[{group}]: {name} keeps no parameter group of its own "
                     f"for the new parameters (it cannot hold a group that joined after "
                     f"{st.step} steps, which torch.optim counts from 0); add the group "
                     f"before the first step")


def given_values(groups: Sequence[Mapping[str, Any]], keys: Sequence[tuple[str, tuple]],
                 refs: Sequence[Mapping[str, Any]], start: int = 0) -> str:
    """The values of the torch ``groups`` that are not those of ``refs`` (one mapping per
    group: the optimizer's own at construction, the live groups' at a load), as
    ``param_groups[start + i]['key'], ...``: what a refused construction or load names, as a
    refused change names the changed values."""
    return ", ".join(f"param_groups[{i}]['{k}']"
                     for i, (g, ref) in enumerate(zip(groups, refs), start)
                     for k, _ in keys if k in g and k in ref and not same(g[k], ref[k]))


def grouped_hyperparameters(opt: Optimizer, keys: Sequence[tuple[str, tuple[str, ...]]],
                            groups: Sequence[Mapping[str, Any]],
                            names: Sequence[Sequence[str]], where: str | None = None,
                            offsets_of: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The hyperparameters (as ``opt.load_state_dict`` takes them) that make ``opt`` run the
    torch ``groups`` (their values under ``keys``) over the parameters ``names[i]`` of each;
    raises, naming ``param_groups[i]['key']``, for a value that cannot differ by group
    (``where``: the changed values an error of the optimizer's own checks is put on). Each
    group keeps the ``step_offset`` (a group added after the first steps) that the
    hyperparameters ``offsets_of`` give its parameters (None: ``opt``'s own)."""
    values = []
    for i, g in enumerate(groups):
        v: dict[str, Any] = {}
        for key, ours in keys:
            if key not in g:
                raise KeyMismatchError(f"param_groups[{i}] has no '{key}' (the optimizer's "
                                       f"{', '.join(ours)})")
            v.update(group_value(key, ours, g[key], i))
        values.append(v)
    per_group = set(opt.hyper_holders()[-1].hyperparameters()) - GLOBAL - set(GROUP_KEYS)
    for key, ours in keys:
        if all(k in per_group for k in ours):
            continue
        for i, v in enumerate(values[1:], 1):
            if not all(same(v[k], values[0][k]) for k in ours):
                raise ValueError(f"param_groups[{i}]['{key}'] = {groups[i][key]!r} differs from "
                                 f"param_groups[0]'s {groups[0][key]!r}: it holds for the whole "
                                 f"step (or for the wrapping optimizer), the same in every group")
    flat = {**opt.flat_hyperparameters(), **values[0], "learning_rate": REFERENCE_LR}
    mithril_groups = [{"params": list(names[i]),
                       **{k: x for k, x in v.items() if k in per_group}}
                      for i, v in enumerate(values)]
    everyone = [n for ns in names for n in ns]
    offset = dict(zip(everyone, live_offsets(opt, everyone) if offsets_of is None
                      else step_offsets(offsets_of, everyone)))
    for g in mithril_groups:
        if g["params"] and offset[g["params"][0]]:
            g["step_offset"] = offset[g["params"][0]]
    full = opt.nested_hyperparameters({**flat, "param_groups": mithril_groups})
    if all(names):
        return full
    # torch takes a group with no parameters (an empty no-decay bucket); one in the mithril
    # optimizer would warn "matches no parameter" at every step after a rate change. Its
    # values are checked on a copy holding every group (errors name torch's index), and it
    # is left out (mithril_index maps the indices)
    try:
        copy.copy(opt).load_state_dict({"optimizer": type(opt).__name__,
                                        "hyperparameters": full})
    except (TypeError, ValueError, KeyError) as e:
        if where is None:
            raise
        raise named(e, where) from e
    kept = [g for g, n in zip(mithril_groups, names) if n]
    return opt.nested_hyperparameters({**flat, "param_groups": kept})


def named(e: BaseException, where: str) -> BaseException:
    """The optimizer's error ``e`` on the values ``where`` names (a ``KeyError`` as the
    ``ValueError`` it means: a value not known there)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    return (ValueError if isinstance(e, KeyError) else type(e))(f"{where}: {msg}")


def apply_values(opt: Optimizer, hp: Mapping[str, Any], before: Mapping[str, Any], st: Any,
                 where: str) -> None:
    """Load the hyperparameters ``hp`` into ``opt`` (checked; ``where`` names the torch values
    an error is put on), put back ``before`` if the state ``st`` (None before the first step)
    would then need other slots, and raise."""
    try:
        opt.load_state_dict({"optimizer": type(opt).__name__, "hyperparameters": hp})
    except (TypeError, ValueError, KeyError) as e:
        raise named(e, where) from e
    if st is not None and {*opt.full_slot_names(), *opt.tensor_slots} != set(st.slots):
        needed = sorted({*opt.full_slot_names(), *opt.tensor_slots})
        opt.load_state_dict({"optimizer": type(opt).__name__, "hyperparameters": before})
        # (a value cycled to 0 by a scheduler, e.g. OneCycleLR(base_momentum=0): torch's
        # keeps the unused buffer; here the constructor cannot help)
        hint = ("torch.optim keeps the unused slot while the value is 0 (a scheduler's "
                "base_momentum=0); here keep it above 0 (a value that sizes the state, as "
                "LBFGS's history_size, is the constructor's)" if set(needed) < set(st.slots)
                else "set this in the constructor instead")
        raise ValueError(f"{where}: {type(opt).__name__} would then need the state slots "
                         f"{needed}, but its state has {sorted(st.slots)}; {hint}")


def mithril_index(names: Sequence[Sequence[str]]) -> list[int | None]:
    """For each torch group (its parameters' ``names``), the index of its group in the
    mithril optimizer (None for an empty one, left out: :func:`grouped_hyperparameters`)."""
    out: list[int | None] = []
    j = 0
    for n in names:
        out.append(j if n else None)
        j += bool(n)
    return out


def check_wrappable(opt: Optimizer, closure_driven: bool) -> None:
    """Refuse torch's groups for an optimizer that cannot hold them: one that evaluates the
    loss itself (LBFGS; torch's refuses groups too), one whose optimizer-wide values or
    held optimizer read its own learning rate (Prodigy's ``d``, the schedule-free
    ``max_lr``, Muon's fallback: fixed at 1.0 here, they would be wrong), or one given
    groups of its own."""
    name = type(opt).__name__
    if closure_driven:
        raise ValueError(f"{name} does not take parameter groups (as torch.optim.LBFGS): "
                         f"pass the parameters themselves")
    wide = [*opt.state_values, *(k.rstrip(".") for k in opt.hyper_children())]
    if wide:
        raise ValueError(f"{name} does not take torch's parameter-group dicts: its {wide} "
                         f"follow the optimizer's own learning rate; pass the (named) "
                         f"parameters and give {name} param_groups of its own (by name)")
    if opt.param_groups or opt.weight_decay_mask is not None or opt.exclude_weight_decay:
        raise ValueError(f"this {name} has param_groups / weight-decay masks of its own; "
                         f"give either those or torch's parameter-group dicts, not both")


def sync_groups(tw: Any) -> None:
    """Apply the values of ``tw.param_groups`` (a :class:`~.torch_optim.TorchOptimizer`
    holding several) that changed since the last step, all or nothing: learning rates
    alone as each group's rate, anything else by setting every group's values anew."""
    opt, groups, synced = tw._mithril, tw.param_groups, tw._synced  # (as many: _sync_all)
    changed: list[tuple[int, str]] = []
    for i, (g, old) in enumerate(zip(groups, synced)):
        for key, ours in tw._keys:
            if key not in g:
                raise KeyMismatchError(f"param_groups[{i}] has no '{key}' (the optimizer's "
                                       f"{', '.join(ours)})")
            if not same(g[key], old[key]):
                changed.append((i, key))
    if not changed:
        return
    if all(key == "lr" for _, key in changed):  # a scheduler's step: nothing else to check
        new = []
        index = mithril_index(tw._group_names)
        for i, _ in changed:
            j = index[i]
            try:  # (an empty group's rate is checked as any group's, and used nowhere)
                new.append((j, opt.hyperparameter("learning_rate", group=j or 0).check(
                    scalar(groups[i]["lr"]))))
            except (TypeError, ValueError) as e:  # (the check names mithril's index j)
                msg = str(e).replace(f"param_groups[{j or 0}]: ", "")
                raise type(e)(f"param_groups[{i}]['lr']: {msg}") from None
        for j, lr in new:
            if j is not None:
                opt.set_learning_rate(lr, group=j)
    else:
        where = ", ".join(f"param_groups[{i}]['{k}']" for i, k in changed)
        hp = grouped_hyperparameters(opt, tw._keys, groups, tw._group_names, where)
        apply_values(opt, hp, opt.state_dict(None)["hyperparameters"], tw._opt_state, where)
    for i, key in changed:
        synced[i][key] = copy.deepcopy(groups[i][key])


def packed_groups(tw: Any) -> list[dict[str, Any]]:
    """torch's ``state_dict()["param_groups"]``: each group's values and its parameters'
    positions (counted on across the groups, as torch)."""
    out, start = [], 0
    for g in tw.param_groups:
        packed = {k: v for k, v in g.items() if k != "params"}
        packed["params"] = list(range(start, start + len(g["params"])))
        start += len(g["params"])
        out.append(packed)
    return out
