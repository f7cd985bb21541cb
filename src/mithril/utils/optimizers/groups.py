"""Parameter groups: per-tensor hyperparameters inside one optimizer and one fused pass.

``param_groups=[{"params": <regex | list of names | callable(name) -> bool | dict of name ->
bool>, **overrides}]`` (the patterns: :mod:`.name_patterns`)
gives the parameters a group matches (the *first* group that matches a name owns it) other
values of any hyperparameter the optimizer has; unmatched parameters keep the constructor's.
``weight_decay_mask`` (optax ``masked``: decay only where it matches) and
:meth:`~mithril.utils.optimizers.Optimizer.exclude_from_weight_decay` (Keras) turn weight
decay off for the names they leave out / match, in whatever group those are.

Every distinct combination becomes one row of a table of per-step scalars; the fused
kernels read each tensor's row (one read per tensor), so 50 groups cost one pass, as one
group does. A group's learning rate is kept as its ratio to the optimizer's
(``lr_scale``): a scheduler driving ``set_learning_rate`` moves every group in proportion,
as torch's multiplicative schedulers move each group from its own base lr, and a state dict
restores it exactly. A rate given to a group while the optimizer's is 0, which no ratio
holds, is kept as it is (the group's ``"learning_rate"``) until the optimizer's is set.
A group's ``"step_offset": k`` (an int >= 0) says its parameters joined after ``k`` steps:
its rules that read the step count (bias corrections, ``lr_decay``, first-step rules) count
``t − k``, as torch.optim counts each parameter's own steps after ``add_param_group``
(``torch_optimizer`` sets it; a state of fewer than ``k + 1`` steps is refused). The traced
JAX program counts it too (``k`` static per row; until its count passes ``k`` a group's
parameters and slots are kept, as torch's before the add), and so does Lookahead, its sync
included (each group syncs on its own count). Inside a group, a
state's per-parameter ``missed`` counts (:meth:`~.state.OptimizerState.note_missed`: the
applied steps a parameter had no gradient at, which ``torch_optimizer`` keeps as torch.optim
keeps each parameter's own ``step``) add to it: a parameter's rules count
``t − step_offset − missed`` (not where ``counts_missed`` is False: schedule-free, Prodigy,
Keras's NAdam count per group or optimizer). Each distinct (row, missed) becomes a row of its
own, so the kernels still read one row per tensor; counts all 0 (``missed`` None) cost nothing,
and the rows are kept between steps while the same tensors miss them (:mod:`.own_rows`).

:meth:`GroupsMixin.hyperparameter` gives a handle on any one numeric hyperparameter of the
optimizer or of one group, with the ``get_learning_rate`` / ``set_learning_rate`` pair every
scheduler drives: ``StepLR(opt.hyperparameter("weight_decay"), ...)`` is a weight-decay
schedule. Setting it is checked as the constructor checks the value; a group's new value only
invalidates the table of scalars (``_groups_version``), never a compiled kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import numbers
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .argument_names import _OTHER_NAMES
from .name_patterns import _matcher, _matches, check_disjoint, claimed_earlier
from .own_rows import OwnRows, own_count_rows  # noqa: F401 - own_count_rows: importable here
from .readonly_groups import ParamGroup, ParamGroups  # noqa: F401 - importable from here

if TYPE_CHECKING:
    from .state import OptimizerState

#: a hyperparameter not set before (see :func:`differs`)
UNSET = object()


def differs(old: Any, new: Any) -> bool:
    """Whether setting ``new`` over ``old`` changes a hyperparameter (a scheduler sets
    the same value again on most steps)."""
    if old is new:
        return False
    try:
        return type(old) is not type(new) or not bool(old == new)
    except Exception:  # (an array's ambiguous truth value: count it as a change)
        return True


#: the options that say which tensors take which hyperparameters
GROUP_KEYS = ("param_groups", "weight_decay_mask", "exclude_weight_decay", "strict")

#: hyperparameters that hold for the whole step, not per tensor (an optimizer adds its own
#: in a ``step_wide`` class attribute: DoG's ε enters one optimizer-wide step size)
GLOBAL = frozenset({"clip_norm", "clip_eps", "nonfinite", "max_consecutive_skips", "param_groups",
                    "weight_decay_mask", "exclude_weight_decay"})


def normalize(opt: Any, groups: Any) -> list[dict[str, Any]]:
    """``groups`` checked against ``opt`` (an optimizer built without groups): each a dict
    with ``params`` and overrides of hyperparameters ``opt`` has, each value checked as the
    constructor checks it, and none changing the state slots or the kernel (flags such as
    ``amsgrad``, or momentum between zero and non-zero: those need separate optimizers).
    A ``learning_rate`` becomes ``lr_scale`` (its ratio to ``opt``'s)."""
    if groups is None:
        return ParamGroups()
    if isinstance(groups, Mapping) or not isinstance(groups, Sequence) or isinstance(groups, str):
        raise TypeError(f"param_groups must be a list of dicts, got {type(groups).__name__}")
    hp = opt.hyperparameters()
    out = []
    for i, g in enumerate(groups):
        where = f"param_groups[{i}]"
        if not isinstance(g, Mapping):
            raise TypeError(f"{where} must be a dict, got {type(g).__name__}")
        if "params" not in g:
            raise KeyError(f"{where} has no 'params' (a regex, a list of names or a callable)")
        _matcher(g["params"], f"{where}['params']")
        over = {k: v for k, v in g.items() if k != "params"}
        for alias, name in _HP_ALIASES.items():  # torch's "lr" / "eps", as the constructor's
            if alias in over and alias not in hp:
                if name in over:
                    raise TypeError(f"{where}: give {name} or {alias}, not both")
                over[name] = over.pop(alias)
        scale, pinned = over.pop("lr_scale", None), None
        offset = check_step_offset(where, over.pop("step_offset", 0))
        if "learning_rate" in over:
            lr = over.pop("learning_rate")
            try:
                check = type(opt)(**{**hp, "learning_rate": lr}).learning_rate
            except (ValueError, TypeError) as e:
                raise type(e)(f"{where}['learning_rate']: {e}") from None
            if opt.learning_rate == 0 and check != 0:  # no ratio gives it: kept as it is
                pinned = check  # (beside its last ratio, where a state dict holds one)
            elif scale is not None:
                raise TypeError(f"{where}: give learning_rate or lr_scale, not both")
            elif opt.learning_rate != 0:
                scale = check / opt.learning_rate
        if scale is not None:
            from .checks import check_positive

            scale = check_positive(f"{where}['lr_scale']", scale)
        unknown = sorted(set(over) - set(hp))
        if unknown:
            ours = [f"{u!r} is {_OTHER_NAMES[u]}" for u in unknown if u in _OTHER_NAMES]
            raise KeyError(f"{where}: {unknown} are not hyperparameters of {type(opt).__name__} "
                           + f"({''.join(o + ' here; ' for o in ours)}it has "
                           + f"{sorted(set(hp) - GLOBAL)})")
        wide = set(over) & (GLOBAL | set(getattr(opt, "step_wide", ())))
        for k in [k for k in wide if not differs(hp[k], over[k])]:
            del over[k]  # (a torch group repeats every default: the same value is no change)
        fixed = sorted(set(over) & wide)
        if fixed:
            raise ValueError(f"{where}: {fixed} hold for the whole step and cannot differ per group")
        try:
            view = type(opt)(**{**hp, **over})  # the constructor's checks and normalisation
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: {e}") from None
        norm = {k: getattr(view, k) for k in over}
        for k in norm:
            probe = copy.copy(opt)
            probe.assign({k: norm[k]})
            if probe.rule() != opt.rule():
                raise ValueError(f"{where}: {k}={over[k]!r} changes {type(opt).__name__}'s state "
                                 f"slots or update rule ({k}={hp[k]!r} elsewhere); parameters "
                                 f"that need it take a separate optimizer")
        entry = {"params": g["params"], **norm}
        if scale is not None:
            entry["lr_scale"] = scale
        if pinned is not None:
            entry["learning_rate"] = pinned
        if offset:
            entry["step_offset"] = offset
        out.append(ParamGroup(entry, i))
    check_disjoint(out)
    return ParamGroups(out)


def check_step_offset(where: str, offset: Any) -> int:
    """A group's ``step_offset`` checked: an int >= 0 (see :class:`GroupsMixin`)."""
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"{where}['step_offset'] must be an int >= 0 (the optimizer steps "
                         f"taken before the group's parameters joined), got {offset!r}")
    return int(offset)


#: True while rows are resolved for a part of the parameters (the one-program step's reached
#: ones): a name the part lacks is no typo, so nothing is said (the whole set was checked)
_PART: contextvars.ContextVar[bool] = contextvars.ContextVar("groups_part", default=False)


@contextlib.contextmanager
def resolving_part() -> Iterator[None]:
    """Within it, :func:`resolve` neither warns nor raises for names it is not given."""
    token = _PART.set(True)
    try:
        yield
    finally:
        _PART.reset(token)


def resolve(opt: Any, names: Sequence[str], no_decay: Collection[str] = ()
            ) -> tuple[np.ndarray, list[dict[str, Any]], list[tuple[int | None, bool]]]:
    """Each tensor's row, the rows' overrides and each row's (group index or None, whether
    it decays), for parameters ``names`` (row 0: no overrides); ``no_decay``: names that do
    not decay whatever ``opt``'s own mask and exclusions say (a Muon's, for its fallback's
    tensors). Warns for a group or mask that matches nothing, and for an exclusion or mask
    that names unknown parameters or matches nothing (raises with ``strict``)."""
    groups = opt.param_groups
    matchers = [_matcher(g["params"], f"param_groups[{i}]['params']") for i, g in enumerate(groups)]
    mask = opt.weight_decay_mask
    excl = opt.exclude_weight_decay
    mask_m = None if mask is None else _matcher(mask, "weight_decay_mask")
    excl_m = [_matcher(e, "exclude_from_weight_decay") for e in excl]
    owner = []
    used = [False] * len(groups)
    matched: dict[str, list[str]] = {"mask": []}
    for n in names:
        gi = next((i for i, m in enumerate(matchers)
                   if _matches(m, n, f"param_groups[{i}]['params']")), None)
        if gi is not None:
            used[gi] = True
            matched.setdefault(f"group{gi}", []).append(n)
        decay = mask_m is None or _matches(mask_m, n, "weight_decay_mask")
        if decay:
            matched["mask"].append(n)
        decay = decay and n not in no_decay
        for j, m in enumerate(excl_m):
            if _matches(m, n, "exclude_from_weight_decay"):
                decay = False
                matched.setdefault(f"exclude{j}", []).append(n)
        owner.append((gi, decay))
    claimed_earlier(groups, [gi for gi, _ in owner], names)
    # what a callable matched, by name: what state dicts and checkpoints keep
    opt._matched = matched
    known = set(names)
    msgs = []
    for i, m in enumerate(matchers):  # (why: a typo beside a known name went unsaid)
        missing = [x for x in m if x not in known] if isinstance(m, (list, dict)) else []
        if not used[i]:
            msgs.append(f"{type(opt).__name__}: param_groups[{i}] matches no parameter"
                        + (f" (unknown names {missing})" if missing else ""))
        elif missing:
            msgs.append(f"{type(opt).__name__}: param_groups[{i}] names unknown parameters "
                        f"{missing}")
    # a name an exclusion or the mask lists that no parameter has (Keras' var_names=["bias"]
    # given as names=: exact names), or an exclusion matching nothing, is as silent otherwise
    for j, m in enumerate(excl_m):
        missing = [x for x in m if x not in known] if isinstance(m, (list, dict)) else []
        if missing or f"exclude{j}" not in matched:
            msgs.append(f"{type(opt).__name__}: exclude_from_weight_decay entry {j} "
                        + (f"names unknown parameters {missing}" if missing
                           else f"({excl[j]!r}) matches no parameter")
                        + " (names= are exact names; var_names= Keras' substrings)")
    if isinstance(mask_m, (list, dict)) and (missing := [x for x in mask_m if x not in known]):
        msgs.append(f"{type(opt).__name__}: weight_decay_mask names unknown parameters "
                    f"{missing}")
    warned = opt.__dict__.setdefault("_warned", set())  # (shared with its copies)
    for msg in () if _PART.get() else msgs:
        if opt.strict:
            raise ValueError(msg)
        if msg not in warned:  # once: the rows are resolved anew at every group change
            warned.add(msg)
            warnings.warn(msg, UserWarning, stacklevel=4)
    combos = sorted(set(owner), key=lambda c: (-1 if c[0] is None else c[0], not c[1]))
    if (None, True) in combos:  # row 0 is the optimizer's own values
        combos.remove((None, True))
    combos.insert(0, (None, True))
    index = {c: r for r, c in enumerate(combos)}
    rows = []
    for gi, decay in combos:
        over = {} if gi is None else {k: v for k, v in groups[gi].items() if k != "params"}
        if not decay:
            over["weight_decay"] = 0.0
        rows.append(over)
    return np.array([index[c] for c in owner], dtype=np.int64), rows, combos


def group_rate(lr: float, group: Mapping[str, Any]) -> float:
    """The learning rate of ``group`` when the optimizer's is ``lr``: the rate it was given
    while ``lr`` was 0 (``"learning_rate"``), else its ``lr_scale`` times ``lr``."""
    return group["learning_rate"] if "learning_rate" in group else lr * group.get("lr_scale", 1.0)


def views(opt: Any, rows: list[dict[str, Any]]) -> list[Any]:
    """One optimizer per row: ``opt`` with the row's overrides (its learning rate scaled;
    :meth:`GroupsMixin.row_view`)."""
    return [opt.row_view(dict(over)) if over else opt for over in rows]


def row_step(row: Any, t: Any) -> Any:
    """``row.row_step(t)`` for a row that has one (a group's view, Muon's fallback rows),
    else ``t`` (a wrapper's own row type)."""
    return row.row_step(t) if hasattr(row, "row_step") else t


class GroupsMixin:
    """Parameter groups' half of :class:`~mithril.utils.optimizers.Optimizer`: checking the
    constructor's group options, the shortcuts, and each tensor's row of scalars."""

    #: steps the optimizer had taken when this row's parameters joined (a group's
    #: ``"step_offset"``): the row's rules count ``t − step_offset`` (see :meth:`row_step`)
    _step_offset = 0

    def row_step(self, t: Any) -> Any:
        """The step count ``t`` (1-based, the optimizer's) as this row's parameters count
        it: a group with ``"step_offset": k`` joined after ``k`` steps, so its bias
        corrections, decays and first-step rules read ``t − k``, as torch.optim counts each
        parameter's own steps (``add_param_group`` mid-run)."""
        if not self._step_offset:
            return t
        if t <= self._step_offset:  # (checked before the step writes anything)
            raise ValueError(f"{type(self).__name__}: a param group's step_offset "
                             f"{self._step_offset} is not below the step count {t}: its "
                             f"parameters joined after {self._step_offset} steps, so the state "
                             f"must have taken as many (load one that has)")
        return t - self._step_offset

    def row_view(self, over: dict[str, Any]) -> Any:
        """A copy of this optimizer with a row's overrides ``over`` set (``lr_scale``: its
        learning rate times that; ``step_offset``: :meth:`row_step`'s): what updates the
        row's tensors."""
        v = copy.copy(self)
        offset = over.pop("step_offset", 0)
        if offset:
            v._step_offset = offset
        scale = over.pop("lr_scale", None)
        if scale is not None and "learning_rate" not in over:  # (else kept as it was set)
            over["learning_rate"] = self.learning_rate * scale
        v.assign(over)
        return v

    def rule(self) -> tuple[Any, ...]:
        """What this optimizer's steps are made of besides their scalars: its state slots
        and its elementwise math. A value that changes it picks the update rule: it cannot
        differ per group, be driven to or traced in a program."""
        return (tuple(self.full_slot_names()), self.kernel_math())

    # -- whose hyperparameters a name reaches ----------------------------------------------
    def hyper_holders(self) -> tuple[Any, ...]:
        """This optimizer, then those whose hyperparameters it takes as its own under the
        same names (a Lookahead's inner optimizer: ``Lookahead(Adam()).hyperparameter(
        "beta1")`` is the inner's ``beta1``). The last one keeps the parameter groups."""
        return (self,)

    def hyper_children(self) -> dict[str, Any]:
        """Optimizers this one holds and runs for some of its parameters, each under the
        prefix its hyperparameters' names take in a traced program (a Muon's fallback:
        ``"fallback."``, so that ``"fallback.beta1"`` is its ``beta1``). None here."""
        return {}

    def flat_hyperparameters(self) -> dict[str, Any]:
        """:meth:`hyperparameters` with those of the optimizers whose hyperparameters this
        one takes as its own (:meth:`hyper_holders`) by their names, at the top level (a
        Lookahead's inner Adam's ``beta1`` as ``"beta1"``)."""
        return self.hyperparameters()

    def nested_hyperparameters(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """``flat`` (names as :meth:`flat_hyperparameters` has them) as a state dict's
        ``"hyperparameters"`` holds them (what ``load_state_dict`` takes)."""
        return dict(flat)

    def _holder(self, name: str) -> Any:
        """The optimizer of :meth:`hyper_holders` that keeps hyperparameter ``name`` (this
        one where none does)."""
        holders = self.hyper_holders()
        if len(holders) > 1:
            for h in holders:
                if name in h.hyperparameters():
                    return h
        return self

    def assign(self, attrs: Mapping[str, Any]) -> None:
        """Set ``attrs`` (hyperparameter name -> value) as they are, unchecked and not
        counted as changes, each on the optimizer that keeps it (:meth:`hyper_holders`):
        how a copy becomes a row's view, or takes the values a traced program reads."""
        for name, value in attrs.items():
            self._holder(name).__dict__[name] = value

    def _finish_groups(self) -> None:
        # (the outermost constructor is done: a new public attribute is a typo from now on)
        self.__dict__["_made"] = True
        raw = self.__dict__.pop("_raw_groups", None)
        if raw is None:
            return
        groups, mask, exclude, strict = raw
        normalized = normalize(self, groups)
        if mask is not None:  # (a dict kept flat, of plain bools: a state dict's JSON)
            m = _matcher(mask, "weight_decay_mask")
            mask = m if isinstance(mask, Mapping) else mask
        if isinstance(exclude, (str, Mapping)) or not isinstance(exclude, (list, tuple)):
            raise TypeError("exclude_weight_decay must be a list of regexes, name lists or callables")
        for e in exclude:
            _matcher(e, "exclude_weight_decay")
        self._groups, self._wd_mask, self._wd_exclude = normalized, mask, list(exclude)
        self._strict = strict

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups (see :mod:`.groups`), checked; a group's learning rate as ``lr_scale``."""
        return self._groups

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        raise AttributeError(
            f"{type(self).__name__}.param_groups is fixed at construction (they decide the "
            f"state's rows): build another optimizer for other groups; set one group's value "
            f"with opt.hyperparameter(name, group=i).set(x) or opt.set_learning_rate(x, "
            f"group=i)")

    @property
    def weight_decay_mask(self) -> Any:
        return self._wd_mask

    @property
    def exclude_weight_decay(self) -> list[Any]:
        return self._wd_exclude

    @property
    def strict(self) -> bool:
        return self._strict

    def exclude_from_weight_decay(self, names: Sequence[str] | None = None,
                                  regex: str | None = None, *,
                                  var_names: Sequence[str] | None = None,
                                  var_list: Any = None) -> None:
        """No weight decay for the parameters ``names`` lists (exact names), those
        ``regex`` matches (searched in the name), or, Keras' rule, those in whose name one of
        ``var_names`` is found (``var_names=["bias", "norm"]``; joined into one regex with
        ``|``, as Keras does). Takes effect at the next update, in any group; one naming an
        unknown parameter or matching nothing then warns (raises with ``strict=True``).
        Each call adds to the exclusions (a second Keras call replaces its first's).
        Keras's ``var_list=`` (its variables) is refused, naming ``names=``."""
        if var_list is not None:  # (Keras's variables have no counterpart: their names do)
            raise TypeError("exclude_from_weight_decay: Keras's var_list= (variables) is "
                            "names= here, the parameters' names (names=['linear.bias'])")
        if names is not None and (not isinstance(names, (list, tuple)) or not all(
                isinstance(n, str) for n in names)):  # (a string would be searched as a regex)
            raise TypeError(f"exclude_from_weight_decay: names must be a list of exact names, "
                            f"got {names!r:.60} (a pattern is regex=)")
        if regex is not None and not isinstance(regex, str):  # (a list: exact names)
            raise TypeError(f"exclude_from_weight_decay: regex must be a string searched in "
                            f"each name, got {regex!r:.60} (exact names are names=)")
        if var_names is not None:
            if isinstance(var_names, str) or not all(isinstance(v, str) for v in var_names):
                raise TypeError("exclude_from_weight_decay: var_names must be a list of strings")
            var_names = "|".join(var_names) if var_names else None  # (Keras' own pattern)
        elif names is None and regex is None:  # (var_names=[] excludes nothing, as Keras)
            raise ValueError("exclude_from_weight_decay needs names=, regex= or var_names=")
        new = [x for x in (names, regex, var_names) if x is not None]
        for x in new:
            _matcher(list(x) if isinstance(x, (list, tuple)) else x,
                                "exclude_from_weight_decay")
        self._wd_exclude = self._wd_exclude + [list(x) if isinstance(x, (list, tuple)) else x
                                               for x in new]
        self._groups_version += 1

    def group_rows(self, state: OptimizerState) -> tuple[np.ndarray, list[Any]]:
        """Each tensor's row of scalars and one optimizer per row (row 0: this one); a
        parameter that missed steps gets a row of its own count, unless ``counts_missed`` is False."""
        key = (self._groups_version, id(self._groups))
        cached = state.groups
        if cached is None or cached[0] != key:
            index, rows, _ = resolve(self, state.layout.name_list)
            cached = state.groups = (key, index, rows)
        missed = getattr(state, "missed", None) if getattr(self, "counts_missed", True) else None
        if missed is None:
            return cached[1], views(self, cached[2])
        own = state.own_rows  # (kept while the rows stay: see own_rows.OwnRows)
        if own is None or own.base is not cached or not own.current:
            own = state.own_rows = OwnRows(cached, missed, own)
        return own.index, own.views_of(self)

    # -- a handle on one hyperparameter (what a scheduler drives) --------------------------
    def hyperparameter(self, name: str = "learning_rate", group: int | None = None
                       ) -> Hyperparameter:
        """A handle on hyperparameter ``name`` of this optimizer or, with ``group``, of
        ``param_groups[group]``, with ``get_learning_rate()`` / ``set_learning_rate(value)``
        (the interface every scheduler drives), e.g. ``StepLR(opt.hyperparameter(
        "weight_decay"), step_size=10)`` or ``LinearLR(opt.hyperparameter("beta1", group=0),
        ...)``. A value set through it is checked as the constructor checks it (a refused one
        changes nothing, and the error names the hyperparameter and the group); it is a
        per-step scalar of the fused kernel, so nothing recompiles. ``lr`` and ``eps`` are
        accepted for ``learning_rate`` and ``epsilon``."""
        name = _HP_ALIASES.get(name, name) if isinstance(name, str) else name
        self._drivable(name, group)
        return Hyperparameter(self._holder(name), name, group)

    def _drivable(self, name: Any, group: int | None) -> None:
        """Raise unless ``name`` is a numeric hyperparameter a handle may drive (for
        ``param_groups[group]`` when ``group`` is not None)."""
        if not isinstance(name, str):
            raise TypeError(f"a hyperparameter name must be a string, got {type(name).__name__}")
        holder = self._holder(name)
        if holder is not self:
            return holder._drivable(name, group)
        hp = self.hyperparameters()
        own = sorted(k for k, v in hp.items() if k not in GROUP_KEYS and _is_number(v))
        if name not in hp or name in GROUP_KEYS:
            raise KeyError(f"{type(self).__name__} has no hyperparameter {name!r}; its numeric "
                           f"hyperparameters are {own}")
        if group is not None:
            self._group(group)
            if name in GLOBAL or name in getattr(self, "step_wide", ()):
                raise ValueError(f"{type(self).__name__}: {name} holds for the whole step and "
                                 f"cannot differ per group (drive it with group=None)")
        value = self._hyperparameter_value(name, group)
        if not _is_number(value):
            raise TypeError(f"{type(self).__name__}: {name}={value!r} is not a number a "
                            f"scheduler can drive (the numeric hyperparameters are {own})")

    def _hyperparameter_value(self, name: str, group: int | None) -> Any:
        """The value of ``name`` for the optimizer or ``param_groups[group]``."""
        holder = self._holder(name)
        if holder is not self:
            return holder._hyperparameter_value(name, group)
        if name == "learning_rate":
            return self.get_learning_rate(group)
        if group is None:
            return getattr(self, name)
        return self._group(group).get(name, getattr(self, name))

    def _checked_hyperparameter(self, name: str, value: Any, group: int | None,
                                rule: bool = True) -> Any:
        """``value`` as the constructor normalises it, for ``name`` of the optimizer or of
        ``param_groups[group]`` (``ValueError`` / ``TypeError`` naming both otherwise,
        and, with ``rule``, for a value that would change the state slots or the kernel)."""
        where = type(self).__name__ + ("" if group is None else f" param_groups[{group}]")
        if name == "learning_rate":
            from .checks import check_positive

            if group is None and "_lr_follows" in self.__dict__:
                raise ValueError(self.__dict__["_lr_follows"])

            try:
                return check_positive("learning_rate", value)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{where}: {e}") from None
        # (a group's step_offset is no constructor argument: kept out of the check)
        over = {} if group is None else {k: v for k, v in self._group(group).items()
                                         if k not in ("params", "lr_scale", "step_offset")}
        hp = {k: v for k, v in self.hyperparameters().items() if k not in GROUP_KEYS}
        try:
            view = type(self)(**{**hp, **over, name: value})  # the constructor's checks
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: {name}={value!r} refused: {e}") from None
        new = getattr(view, name)
        if not rule:
            return new
        probe = copy.copy(self)
        probe.assign({**over, name: new})
        if probe.rule() != self.rule():
            now = self._hyperparameter_value(name, group)
            raise ValueError(f"{where}: {name}={value!r} changes {type(self).__name__}'s state "
                             f"slots or update rule ({name}={now!r} now); build the optimizer "
                             f"with a value of the same kind (e.g. momentum > 0 to drive "
                             f"momentum)")
        return new

    def _set_hyperparameter(self, name: str, value: Any, group: int | None) -> None:
        """Set ``name`` of the optimizer or of ``param_groups[group]`` (checked first: a
        refused value changes nothing)."""
        new = self._checked_hyperparameter(name, value, group)
        if name == "learning_rate":
            try:
                self.set_learning_rate(new, group)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{type(self).__name__} param_groups[{group}]: {e}") from None
        elif group is None:
            setattr(self, name, new)
        else:
            g = self._group(group)
            if differs(g.get(name, UNSET), new):
                g._set(name, new)
                self._groups_version += 1  # (a value set again changes nothing)

    def _group(self, group: Any) -> dict[str, Any]:
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)):
            raise TypeError(f"group must be an index into param_groups, got {group!r}")
        if not 0 <= group < len(self._groups):
            raise KeyError(f"{type(self).__name__} has {len(self._groups)} param_groups, no "
                           f"group {group}")
        return self._groups[group]



#: names torch and optax users type for ours
_HP_ALIASES = {"lr": "learning_rate", "eps": "epsilon"}


def _is_number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)))


class Hyperparameter:
    """A handle on one hyperparameter of an optimizer (``group=None``) or of one of its
    parameter groups, made by :meth:`GroupsMixin.hyperparameter`: it has the
    ``get_learning_rate()`` / ``set_learning_rate(value)`` pair that every scheduler drives
    (whatever the hyperparameter: a scheduler only reads and sets a number), and ``get`` /
    ``set`` as plainer names. ``check(value)`` returns the value as it would be set, or
    raises as setting it would, changing nothing."""

    __slots__ = ("group", "name", "optimizer")

    def __init__(self, optimizer: Any, name: str, group: int | None = None) -> None:
        self.optimizer, self.name, self.group = optimizer, name, group

    def get_learning_rate(self) -> float:
        return float(self.optimizer._hyperparameter_value(self.name, self.group))

    def set_learning_rate(self, value: float) -> None:
        self.optimizer._set_hyperparameter(self.name, value, self.group)

    def check(self, value: float) -> float:
        return float(self.optimizer._checked_hyperparameter(self.name, value, self.group))

    get = get_learning_rate
    set = set_learning_rate

    def __repr__(self) -> str:
        where = "" if self.group is None else f", group={self.group}"
        return f"{type(self.optimizer).__name__}.hyperparameter({self.name!r}{where})"
