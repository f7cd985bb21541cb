"""The state-dict half of :class:`~mithril.interop.torch_optim.TorchOptimizer`: mithril
optimizer state <-> a torch-shaped state dict (see :mod:`.torch_optim` for what it holds).

Per parameter, ``state[i]`` holds ``step`` and every state slot under torch's name where
torch has the optimizer (:data:`TORCH_SLOTS`), else under mithril's, as a tensor of the
parameter's slot shape: a parameter-shaped moment, a 0-d tensor for the slots holding one
value per tensor (ASGD's ``eta``/``mu``, Novograd's ``nu``), a factored statistic
(Adafactor's ``row_var`` ``(..., r, 1)`` and ``col_var`` ``(..., 1, c)``). Left out, and
restored by :func:`parse_state_dict`:

* entries with no elements: the slots a parameter does not use (Adafactor's ``variance``
  of a matrix, its factors of a vector; Muon's ``momentum_buffer`` of a vector, its
  fallback's slots of a matrix), so each parameter's entry holds what torch's would;
* LBFGS history entries not in use (an older save's: ``convention="torch"`` now saves
  torch.optim.LBFGS's layout, :mod:`.torch_optim_lbfgs`; optax's): the state keeps them
  as one shared zero buffer, and so does a restored one.

Optimizer-wide values (``OptimizerState.values``: Prodigy's ``d`` and ``numerator``, the
schedule-free ``weight_sum`` and ``max_lr``, LBFGS's ``n_iter``, ``func_evals``, ``t``,
``H_diag``, ``prev_loss``, ``history``, ``ro{i}``, ``last_loss``) are floats in
``state_dict()["mithril"]["values"]``, next to the exact step counters.

A state dict that went through ``torch.distributed.checkpoint`` with
``flatten_optimizer_state_dict=True`` comes back without the ``"mithril"`` entry (DCP
unflattens only the keys the live param groups have); its groups hold every hyperparameter
and each parameter's ``step`` the count, which rebuild it (:func:`_rebuilt_meta`). A
``torch.optim`` optimizer that loaded our state dict keeps the entry in its first group as
it was while it steps on: its parameters' ``step`` give the count (:func:`_counted_on`).
A ``torch.optim`` optimizer's own state dict, and a parameter that has not stepped yet:
:mod:`.torch_optim_interchange`.

A group added later (``add_param_group``) gets its state from :func:`with_added`: the
others' state as it is, a fresh one (:func:`torch_initial`) for the new parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import KeyMismatchError
from ..utils.optimizers import (
    ASGD,
    LBFGS,
    SGD,
    AdaGrad,
    Adam,
    Adamax,
    NAdam,
    Optimizer,
    RAdam,
    RMSProp,
)
from ..utils.optimizers.averaging import counts_of, saved_counts
from ..utils.optimizers.layout import slot_shape_of
from .torch_optim_complex import shown_as
from .torch_optim_interchange import is_zero, torch_state, torchs, unstepped

#: mithril slot -> torch.optim state key, for the optimizers torch also has (others keep
#: theirs, which are torch's already for ASGD, Adadelta, Adagrad, Rprop, Adafactor, Muon)
TORCH_SLOTS: tuple[tuple[type, dict[str, str]], ...] = (
    (SGD, {"momentum": "momentum_buffer"}),
    (Adam, {"m": "exp_avg", "v": "exp_avg_sq", "vmax": "max_exp_avg_sq"}),  # and AdamW
    (RMSProp, {"v": "square_avg", "momentum": "momentum_buffer"}),
    (Adamax, {"m": "exp_avg", "u": "exp_inf"}),
    (NAdam, {"m": "exp_avg", "v": "exp_avg_sq"}),
    (RAdam, {"m": "exp_avg", "v": "exp_avg_sq"}),
)

#: the counters kept next to the hyperparameters in ``state_dict()["mithril"]``
COUNTERS = ("step", "num_skipped", "num_nonfinite", "consecutive_skips")


def slot_names_for_torch(opt: Optimizer) -> dict[str, str]:
    """mithril slot name -> the state key used in torch-style state dicts."""
    for cls, names in TORCH_SLOTS:
        if isinstance(opt, cls):
            return names
    return {}


def scalar(v: Any) -> Any:
    """A one-element tensor as a Python number (a scheduler may keep ``lr`` as a tensor)."""
    return v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v


def same(a: Any, b: Any) -> bool:
    """Whether two param-group values are equal (tensors as numbers)."""
    if a is b:
        return True
    try:
        return bool(scalar(a) == scalar(b))
    except Exception:  # noqa: BLE001 - incomparable values are different
        return False


def group_value(key: str, ours: tuple[str, ...], value: Any, group: int = 0) -> dict[str, Any]:
    """The hyperparameters the value ``value`` of ``key`` in ``param_groups[group]`` stands
    for."""
    if len(ours) == 1:
        return {ours[0]: scalar(value)}
    try:
        values = tuple(value)
    except TypeError:
        values = ()
    if len(values) != len(ours):
        raise ValueError(f"param_groups[{group}]['{key}'] must be a sequence of {len(ours)} "
                         f"numbers ({', '.join(ours)}), got {value!r}")
    return {k: scalar(v) for k, v in zip(ours, values)}


def with_group(opt: Optimizer, hp: Mapping[str, Any], group: Mapping[str, Any],
               keys: Sequence[tuple[str, tuple[str, ...]]]) -> dict[str, Any]:
    """``hp`` (a state dict's hyperparameters) with the values of ``group`` (a param group)
    of ``keys`` set in it (a Lookahead's inner's under its ``"inner"``); a value that is
    not the shape of its key's raises ``ValueError``."""
    flat = opt.flat_hyperparameters()
    upd: dict[str, Any] = {}
    for key, ours in keys:
        if key in group and all(k in flat for k in ours):
            upd.update(group_value(key, ours, group[key]))
    return _merged(hp, opt.nested_hyperparameters(upd))


def _merged(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        both = isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
        out[k] = _merged(out[k], v) if both else v
    return out


def to_numpy(x: Any) -> Any:
    """A tensor as a NumPy array (a complex one as its real view, as the optimizer holds a
    complex parameter's slots: :mod:`.torch_optim_complex`)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_complex():
            x = torch.view_as_real(x.resolve_conj())
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.cpu().numpy()
    return x


def to_tensor(a: np.ndarray) -> torch.Tensor:
    try:
        return torch.from_numpy(a.copy(order="C") if not a.flags.c_contiguous else a)
    except TypeError:  # e.g. an ml_dtypes bfloat16 array
        return torch.from_numpy(np.asarray(a, dtype=np.float32))


def unused_slots(opt: Optimizer, values: Mapping[str, Any]) -> set[str]:
    """The slots ``opt``'s state holds but does not use, given its ``values``: LBFGS's
    history entries not yet made (one shared zero buffer), else none. Under optax's
    convention update ``c`` (from 0) writes ring entry ``(c − 1) mod h`` once ``c > 0``:
    after ``count`` updates the first ``min(count − 1, h)`` are made."""
    if not isinstance(opt, LBFGS):
        return set()
    if opt.convention == "optax":
        try:
            n = int(float(values["count"]))
        except (KeyError, TypeError, ValueError):
            return set()
        out = {"prev_params", "prev_grad", "ls_grad"} if n == 0 else set()
        made = min(max(n - 1, 0), opt.history_size)
        out.update(f"{k}{i}" for k in "sy" for i in range(made, opt.history_size))
        return out
    try:
        n, fresh = int(float(values["history"])), float(values["n_iter"]) == 0
    except (KeyError, TypeError, ValueError):  # malformed: the optimizer's load names it
        return set()
    out = {"d", "prev_flat_grad"} if fresh else set()
    out.update(f"{k}{i}" for k in "sy" for i in range(n, opt.history_size))
    return out


def shown(opt: Optimizer, st: Any) -> list[str]:
    """The slots of ``st`` a state dict (and ``opt.state``) shows."""
    unused = unused_slots(opt, st.values)
    return [s for s in st.slots if s not in unused]


def groups_holder(hp: Mapping[str, Any]) -> Mapping[str, Any]:
    """The mapping of a mithril optimizer's hyperparameters ``hp`` that holds its
    ``param_groups``: ``hp`` itself, or a Lookahead's inner optimizer's (under
    ``hp["inner"]["hyperparameters"]``, as ``hyper_holders()[-1]`` keeps the groups)."""
    while "param_groups" not in hp:
        inner = hp.get("inner")
        if not (isinstance(inner, Mapping) and isinstance(inner.get("hyperparameters"),
                                                           Mapping)):
            break
        hp = inner["hyperparameters"]
    return hp


def step_offsets(hp: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                 names: Sequence[str]) -> list[int]:
    """Each parameter's ``step_offset`` (0 but in a group added after the first steps):
    from a mithril optimizer's hyperparameters ``hp`` (its ``param_groups`` list names
    the parameters; a Lookahead's, its inner's: :func:`groups_holder`) or from its
    ``param_groups`` themselves."""
    groups = groups_holder(hp).get("param_groups") if isinstance(hp, Mapping) else hp
    offset: dict[str, int] = {}
    for g in groups if isinstance(groups, (list, tuple)) else ():
        k = g.get("step_offset", 0) if isinstance(g, Mapping) else 0
        if k and isinstance(g.get("params"), (list, tuple)):
            offset.update(dict.fromkeys(g["params"], int(k)))
    return [offset.get(n, 0) for n in names]


def live_offsets(opt: Optimizer, names: Sequence[str]) -> list[int]:
    """:func:`step_offsets` of the live optimizer ``opt`` (its groups' holder's)."""
    return step_offsets(list(opt.hyper_holders()[-1].param_groups), names)


def own_steps(opt: Optimizer, st: Any, names: Sequence[str]) -> list[int]:
    """Each parameter's own step count in the state ``st``, as torch.optim's per-parameter
    ``step``: the state's count less its group's ``step_offset`` (joined later) and the
    steps it had no gradient at (``st.missed``)."""
    missed = st.missed.tolist() if st.missed is not None else [0] * len(names)
    return [st.step - k - m for k, m in zip(live_offsets(opt, names), missed)]


def export(opt: Optimizer, st: Any, names: Sequence[str], lrs: Sequence[float],
           params: Sequence[torch.Tensor]) -> tuple[dict[int, Any], dict]:
    """The ``state`` entry of a state dict (copies) and the ``"mithril"`` counters and
    values of ``st`` (None: no step yet); ``lrs``: each parameter's group's rate; a complex
    one of ``params`` gets complex slots (torch's)."""
    ours = opt.state_dict(None)
    if st is None:
        return {}, {**ours, **dict.fromkeys(COUNTERS, 0)}
    meta = {**ours, **{k: getattr(st, k) for k in COUNTERS}}
    if st.values:
        meta["values"] = {k: float(v) for k, v in st.values.items()}
    if counts_of(opt, st) is not None:  # each average's updates, in the parameters' order
        meta["averaged"] = {a: [c[n] for n in names] for a, c in saved_counts(st).items()}
    if st.missed is not None:  # (each count is in its 'step' too: see _counted_on)
        meta["missed"] = st.missed_counts()
    rename = slot_names_for_torch(opt)
    counts = own_steps(opt, st, names)
    # each parameter's own count, as torch's: a tensor of torch's scalar dtype (float64
    # where that is the default dtype, else float32: torch.optim.optimizer._get_scalar_dtype)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    state: dict[int, dict[str, Any]] = {
        i: {"step": torch.tensor(float(k), dtype=dtype)} for i, k in enumerate(counts)}
    for slot in shown(opt, st):
        for i, view in enumerate(st.slot(slot).values()):
            if isinstance(view, torch.Tensor) and view.dtype == torch.bfloat16:
                t = view.detach().cpu().clone()  # (bfloat16 as torch.optim keeps it: the
            else:  # engine's to_numpy widens it to float32)
                t = to_tensor(np.array(st.engine.to_numpy(view)))
            if t.numel():
                state[i][rename.get(slot, slot)] = shown_as(t, params[i])
    for i, k in enumerate(counts):
        if k == 0:
            unstepped(opt, state[i], float(scalar(lrs[i])))
    return state, meta


def parse_state_dict(opt: Optimizer, sd: Mapping[str, Any], names: Sequence[str],
                     groups_now: Sequence[Mapping[str, Any]],
                     hyper: Callable[[list[Mapping[str, Any]], Mapping[str, Any]], dict]
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The new param groups and the mithril state dict that ``sd`` stands for (``hyper``:
    the optimizer's hyperparameters with saved groups' values set); raises, naming the entry
    at fault, if it is malformed. Entries the state dict leaves out (see the module docs)
    are not filled in yet: :func:`complete` does that."""
    n = len(names)
    meta = sd.get("mithril")
    groups = sd.get("param_groups")
    if meta is None and isinstance(groups, (list, tuple)) and groups and isinstance(
            groups[0], Mapping):  # (a dict that went through torch.distributed.checkpoint,
        # or a torch.optim optimizer that loaded ours: it keeps the entry as it was)
        meta = groups[0].get("mithril")
        if isinstance(meta, Mapping):
            meta = _counted_on(opt, meta, sd.get("state"), groups)
    if meta is None and _flattened(groups, groups_now):
        meta = _rebuilt_meta(opt, sd.get("state"), groups, names)
    state = given = sd.get("state")
    native = meta is None and torchs(groups) and isinstance(state, Mapping)
    if native:  # a torch.optim optimizer's own (its groups hold its values, its state steps)
        if opt.state_values:
            raise ValueError(f"state dict has no 'mithril' entry: a torch.optim optimizer's "
                             f"state does not give {type(opt).__name__}'s optimizer-wide values "
                             f"{list(opt.state_values)} (only LBFGS(convention='torch') takes "
                             f"torch.optim.LBFGS's); resume from a mithril torch_optimizer's")
        state = torch_state(given, groups)
        meta = _rebuilt_meta(opt, state, groups, names)
    if not isinstance(meta, Mapping):
        raise ValueError("state dict has no 'mithril' entry and is not a torch.optim "
                         "state dict of as many groups and parameters: it was not made by "
                         "a mithril torch_optimizer or a torch.optim optimizer")
    if meta.get("optimizer") != type(opt).__name__:
        raise ValueError(f"state dict is for {meta.get('optimizer')!r}, not "
                         f"{type(opt).__name__}")
    if not isinstance(meta.get("hyperparameters"), Mapping):
        raise TypeError("state dict ['mithril']['hyperparameters'] must be a dict")
    k = len(groups_now)
    if not isinstance(groups, (list, tuple)) or len(groups) != k or not all(
            isinstance(g, Mapping) for g in groups):
        got = (f"{len(groups)} groups" if isinstance(groups, (list, tuple))
               else type(groups).__name__)
        want = "one group" if k == 1 else f"{k} groups"
        raise ValueError(f"state dict 'param_groups' must be a list of {want} (dicts), as "
                         f"this optimizer has, got {got}")
    saved = [copy.deepcopy(dict(g)) for g in groups]
    if native:  # torch's groups: the live group's values where they have none
        for g, now in zip(saved, groups_now):
            for k, v in now.items():
                if k not in ("params", "param_names"):
                    g.setdefault(k, copy.deepcopy(v))
    ids: list[Any] = []
    for i, (g, now) in enumerate(zip(saved, groups_now)):
        got_ids = g.get("params")
        if not isinstance(got_ids, (list, tuple)) or len(got_ids) != len(now["params"]):
            got = len(got_ids) if isinstance(got_ids, (list, tuple)) else type(got_ids).__name__
            raise ValueError(f"state dict's parameter group {i} has {got} parameters, this "
                             f"optimizer's {len(now['params'])}")
        ids += list(got_ids)
    hp = hyper(saved, meta["hyperparameters"])
    out: dict[str, Any] = {"optimizer": type(opt).__name__, "hyperparameters": hp,
                           **{k: meta.get(k, 0) for k in COUNTERS}}
    count = out["step"]  # (a count that is no number: the optimizer's load names it)
    late = [k for k in step_offsets(hp, names)
            if isinstance(count, (int, float, np.number)) and k > count >= 0]
    if late:  # (a state of fewer steps than a group joined after: no step could run)
        raise ValueError(f"state dict: a group joined after {max(late)} steps "
                         f"('step_offset'), but its step count is {out['step']!r}")
    if "values" in meta:
        if not isinstance(meta["values"], Mapping):
            raise TypeError(f"state dict ['mithril']['values'] must be a dict, got "
                            f"{type(meta['values']).__name__}")
        out["values"] = dict(meta["values"])
    if "averaged" in meta:  # (the counts, in the parameters' order: the names may differ)
        got = meta["averaged"]
        if not isinstance(got, Mapping) or not all(
                isinstance(c, (list, tuple)) and len(c) == n for c in got.values()):
            raise ValueError(f"state dict ['mithril']['averaged'] must map each average to "
                             f"{n} counts (one per parameter), got {got!r:.80}")
        out["averaged"] = {a: dict(zip(names, c)) for a, c in got.items()}
    if not isinstance(state, Mapping):
        raise TypeError(f"state dict 'state' must be a dict, got {type(state).__name__}")
    if state:
        index = {i: k for k, i in enumerate(ids)}
        if len(index) != n or set(state) != set(index):
            missing = sorted(set(index) - set(state), key=repr)
            unknown = sorted(set(state) - set(index), key=repr)
            raise KeyMismatchError(f"state dict 'state' must have an entry for every "
                                   f"parameter id {list(ids)}: missing {missing}, "
                                   f"unknown {unknown}")
        back = {v: k for k, v in slot_names_for_torch(opt).items()}
        slots: dict[str, dict[str, Any]] = {}
        for pid, entry in state.items():
            if not isinstance(entry, Mapping):
                raise TypeError(f"state dict 'state'[{pid!r}] must be a dict, got "
                                f"{type(entry).__name__}")
            name = names[index[pid]]
            for key, value in entry.items():
                if key != "step":
                    slots.setdefault(back.get(key, key), {})[name] = to_numpy(value)
        # a parameter that has not stepped starts fresh (complete): torch's keeps no entry
        # for it, ours holds torch's first-step values (unstepped)
        fresh = [names[index[i]] for i, e in state.items()
                 if isinstance(e, Mapping) and is_zero(e.get("step"))]
        out["slots"] = {s: {n: a for n, a in per.items() if n not in fresh}
                        for s, per in slots.items()}
        out["absent"] = fresh
        if isinstance(count, (int, np.integer)) and not isinstance(count, bool) and count >= 0:
            # (another count: the optimizer's load names it)
            out["missed"] = _missed(state, index, names, step_offsets(hp, names), int(count))
    elif out["step"] != 0:
        raise ValueError(f"state dict has step {out['step']!r} but no per-parameter state")
    out_groups = []
    for g, now in zip(saved, groups_now):
        group = {key: v for key, v in g.items() if key not in ("params", "mithril")}
        if "param_names" not in group and "param_names" in now:
            group["param_names"] = now["param_names"]
        group["params"] = now["params"]
        out_groups.append(group)
    return out_groups, out


def _missed(state: Mapping[Any, Any], index: Mapping[Any, int], names: Sequence[str],
            offsets: Sequence[int], count: int) -> dict[str, int]:
    """The steps each parameter had no gradient at, from the per-parameter ``step`` of a
    state dict's ``state`` (torch's own count) and the optimizer's ``count``: ``count``
    less its group's ``step_offset`` less its ``step`` (an entry without one: none)."""
    out = {}
    for pid, entry in state.items():
        if "step" not in entry:
            continue
        i = index[pid]
        try:
            own = float(np.asarray(to_numpy(entry["step"])))
        except (TypeError, ValueError):
            own = float("nan")
        m = count - offsets[i] - own
        if not (own >= 0 and own == int(own) and m >= 0):
            raise ValueError(f"state dict 'state'[{pid!r}]['step'] must be a whole number of "
                             f"steps from 0 to {count - offsets[i]} (the optimizer's count "
                             f"since its group joined), got {entry['step']!r}")
        if m:
            out[names[i]] = int(m)
    return out


def _flattened(groups: Any, groups_now: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``groups`` (a state dict's param groups without the "mithril" entry) are
    ours as DCP's ``flatten_optimizer_state_dict=True`` gives them back: its unflattening
    keeps each group's keys that the live groups have (every value of ours: a torch.optim
    state dict lacks most), and its ``params`` are the parameters' names (a state dict of
    ours that lost the entry otherwise is refused)."""
    return (isinstance(groups, (list, tuple)) and len(groups) == len(groups_now)
            and all(isinstance(g, Mapping) and set(now) - {"params"} <= set(g)
                    and isinstance(g.get("params"), (list, tuple))
                    and all(isinstance(i, str) for i in g["params"])
                    for g, now in zip(groups, groups_now)))


def _steps(state: Any) -> set[float]:
    """The distinct per-parameter ``step`` values of a state dict's ``state``."""
    steps = set()
    for entry in state.values() if isinstance(state, Mapping) else ():
        if isinstance(entry, Mapping) and "step" in entry:
            steps.add(float(np.asarray(to_numpy(entry["step"]))))
    return steps


def _counted_on(opt: Optimizer, meta: Mapping[str, Any], state: Any, groups: Sequence[Any]
                ) -> Mapping[str, Any]:
    """The ``"mithril"`` entry ``meta`` kept in a state dict's first group, with the step
    count its parameters' ``step`` say. Why: a ``torch.optim`` optimizer that loaded our
    state dict (after an ``add_param_group`` too) and stepped on counts each parameter's
    steps on but keeps the entry as it was, and its state dict loaded back here resumed
    with the old count (wrong bias corrections). Each parameter's own count at the save
    is the entry's, less its group's ``step_offset`` (:func:`step_offsets`) and its
    ``missed``; the steps taken since are the most any parameter took (each parameter's
    missed steps then follow from its ``step``: :func:`_missed`)."""
    ids = [i for g in groups if isinstance(g, Mapping)
           for i in (g.get("params") if isinstance(g.get("params"), (list, tuple)) else ())]
    names = meta.get("param_names")
    count = meta.get("step", 0)
    if not isinstance(state, Mapping) or not isinstance(names, (list, tuple)) \
            or len(names) != len(ids) or not isinstance(count, (int, np.integer)):
        return meta
    missed = meta.get("missed") if isinstance(meta.get("missed"), Mapping) else {}
    then = {i: count - k - missed.get(n, 0) for i, n, k in zip(
        ids, names, step_offsets(meta.get("hyperparameters") or {}, names))}
    since = {i: float(np.asarray(to_numpy(e["step"]))) - then.get(i, 0)
             for i, e in state.items() if isinstance(e, Mapping) and "step" in e}
    if not since or max(since.values()) == 0:
        return meta
    if min(since.values()) < 0:
        back = sorted((i for i, d in since.items() if d < 0), key=repr)
        raise ValueError(f"state dict: the 'step' of parameters {back} is below its "
                         f"'mithril' entry's count for them: not a state dict that went on "
                         f"from ours")
    if opt.state_values:
        raise ValueError(f"state dict: its parameters' 'step' are past its 'mithril' "
                         f"entry's ({count}): {type(opt).__name__}'s optimizer-wide values "
                         f"{list(opt.state_values)} are stale")
    return {**meta, "step": int(count + max(since.values()))}


def _rebuilt_meta(opt: Optimizer, state: Any, groups: Sequence[Mapping[str, Any]],
                  names: Sequence[str]) -> dict[str, Any]:
    """The "mithril" entry of a DCP-flattened state dict (:func:`_flattened`): its groups
    hold every hyperparameter and each parameter's ``step`` the count (the counts of skipped
    and non-finite steps, which no update reads, restart at 0; optimizer-wide ``values``
    cannot come back: such an optimizer's load is refused, saying so). A group added later
    (``add_param_group``) counts fewer steps: the count is the largest ``step``, and each
    group whose parameters count ``k`` fewer gets ``step_offset`` ``k`` (why: such a state
    dict was refused as "not a mithril torch_optimizer's", where torch.optim's resumes); a
    parameter counting fewer than the most of its group missed as many (:func:`_missed`)."""
    if opt.state_values:
        raise ValueError(f"state dict has no 'mithril' entry (DCP's flatten_optimizer_state_"
                         f"dict=True drops it): {type(opt).__name__}'s optimizer-wide values "
                         f"{list(opt.state_values)} are lost with it; save without flattening")
    hp = opt.state_dict(None)["hyperparameters"]
    steps = _steps(state)
    slots = {*opt.full_slot_names(), *opt.tensor_slots}
    if isinstance(state, Mapping) and state and slots and all(
            isinstance(e, Mapping) and set(e) <= {"step"} for e in state.values()):
        # (DCP unflattens the keys the live state has: none before a step, and it makes
        # one by a step at lr 0 only where every .grad is None)
        raise ValueError("state dict has no 'mithril' entry and its parameters' entries hold "
                         "no state: DCP's flatten_optimizer_state_dict=True keeps the keys "
                         "the loading optimizer's state has, and this one had not stepped "
                         "while its parameters' .grad were set (so DCP did not initialize it); "
                         "call zero_grad(set_to_none=True) before set_optimizer_state_dict")
    if len(steps) <= 1:
        return {"optimizer": type(opt).__name__, "hyperparameters": hp,
                "step": int(steps.pop()) if steps else 0}
    total, per_group, pos = max(steps), [], 0
    for g in groups:
        ids = list(g["params"])
        # (a group's parameters that count fewer steps than its most missed them: _missed)
        mine = _steps({k: state[k] for k in ids if k in state})
        per_group.append((list(names[pos:pos + len(ids)]), int(total - max(mine))
                          if mine else 0))
        pos += len(ids)
    joined = [{"params": ns, "step_offset": k} for ns, k in per_group if ns and k]
    flat = {**opt.flat_hyperparameters(), "param_groups": joined}  # (a Lookahead's: its inner's)
    return {"optimizer": type(opt).__name__, "hyperparameters": opt.nested_hyperparameters(flat),
            "step": int(total)}


def complete(opt: Optimizer, ours: dict[str, Any], names: Sequence[str],
             params: Sequence[Any]) -> None:
    """Fill in the slot entries a state dict leaves out (module docs), as the optimizer
    with the state dict's hyperparameters lays them out; raises as ``opt.load_state_dict``
    would if those hyperparameters are bad. ``opt`` is not changed."""
    trial = copy.copy(opt)
    trial.load_state_dict({"optimizer": ours["optimizer"],
                           "hyperparameters": ours["hyperparameters"]})
    slots, absent = ours["slots"], ours.pop("absent", ())
    unused = unused_slots(trial, ours.get("values", {}))
    fresh = None
    for s in (*trial.full_slot_names(), *trial.tensor_slots):
        for name, p in zip(names, params):
            if name in slots.get(s, {}):
                continue
            if name in absent:  # (torch's: no entry, fresh: _torch_state)
                if fresh is None:
                    fresh = trial.init({n: q.detach() for n, q in zip(names, params)})
                slots.setdefault(s, {})[name] = np.array(fresh.engine.to_numpy(
                    fresh.slot(s)[name]))
                continue
            shape = tuple(p.shape) if s in unused else tuple(slot_shape_of(trial, s, tuple(p.shape),
                                                                                 name))
            if s in unused or not int(np.prod(shape, dtype=np.int64)):
                # the parameter's dtype: the first array of a slot sets its buffer's dtype
                dtype = to_numpy(p.detach().reshape(-1)[:0]).dtype
                slots.setdefault(s, {})[name] = np.zeros(shape, dtype=dtype)


def restore(opt: Optimizer, ours: dict[str, Any], names: Sequence[str], params: Sequence[Any],
            refuse: Callable[[BaseException], BaseException]) -> Any:
    """``opt.load_state_dict`` of ``ours`` (completed; over ``params``): the new state, or
    None for a state dict saved before any step. On error, ``refuse(e)`` is raised and
    ``opt`` is unchanged."""
    try:
        if "slots" not in ours:
            return opt.load_state_dict(ours)
        complete(opt, ours, names, params)
        return opt.load_state_dict(ours, {n: p.detach() for n, p in zip(names, params)})
    except (TypeError, ValueError, KeyError) as e:
        raise refuse(e) from e


def torch_initial(opt: Optimizer, lr: Any, defaults: Mapping[str, Any]) -> dict[str, float]:
    """torch's initial state of a parameter added to a running optimizer, per slot, where
    ``opt.init``'s is not it: ASGD's ``eta`` = its group's ``lr`` and ``mu`` = 1 (mithril sets
    them at step 1 only), torch's Adagrad's ``sum`` from its ``defaults``'
    ``initial_accumulator_value`` (a group added later does not use its own)."""
    if isinstance(opt, ASGD):
        return {"eta": float(scalar(lr)), "mu": 1.0}
    if isinstance(opt, AdaGrad) and "initial_accumulator_value" in defaults:
        return {"sum": float(scalar(defaults["initial_accumulator_value"]))}
    return {}


def with_added(trial: Optimizer, st: Any, names: Sequence[str], params: Sequence[Any],
               new: Sequence[str], initial: Mapping[str, float]) -> Any:
    """The state of ``trial`` (the optimizer with its new groups' hyperparameters) over
    ``params`` (``names``) once the parameters ``new`` are added to those of ``st``: its
    counters, values and slots for the others, bit for bit, and a fresh state
    (``trial.init``'s, ``initial`` setting a slot's value) for the new ones. None where
    ``st`` is (no step yet). Nothing is changed; raises ``ValueError`` if the optimizer
    would then need other state slots."""
    if st is None:
        return None
    current = {n: p.detach() for n, p in zip(names, params)}
    fresh = trial.init(current)
    if set(fresh.slots) != set(st.slots):
        raise ValueError(f"{type(trial).__name__} would then need the state slots "
                         f"{sorted(fresh.slots)}, but its state has {sorted(st.slots)}")
    slots: dict[str, dict[str, Any]] = {}
    for s in st.slots:
        kept = {n: np.array(st.engine.to_numpy(v)) for n, v in st.slot(s).items()}
        made = fresh.slot(s)
        for n in new:
            a = np.array(fresh.engine.to_numpy(made[n]))
            if s in initial:
                a[...] = initial[s]
            kept[n] = a
        slots[s] = kept
    del fresh  # (its buffers: the load below makes the state anew)
    ours = {**trial.state_dict(None), **{k: getattr(st, k) for k in COUNTERS},
            "slots": slots}
    if st.values:
        ours["values"] = dict(st.values)
    if getattr(st, "averaged", None) is not None:  # (the new parameters' averages: fresh)
        ours["averaged"] = {a: {**c, **dict.fromkeys(new, 0)}
                            for a, c in saved_counts(st).items()}
    if st.missed is not None:  # (each parameter's own count; the new ones': their group's)
        ours["missed"] = st.missed_counts()
    return trial.load_state_dict(ours, current)
