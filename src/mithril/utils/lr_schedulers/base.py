"""The scheduler base class, the optimizer protocol and shared validation helpers (the
per-group construction is in :mod:`.per_group`)."""

from __future__ import annotations

import math
import numbers
import operator
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..optimizers.checks import MAX_INT, describe
from . import attributes
from . import lanes as lanes_mod
from .per_group import _apply, _per_group_constructor, wrapper_hint

__all__ = ["LRScheduler", "SupportsLearningRate"]


@runtime_checkable
class SupportsLearningRate(Protocol):
    """The optimizer interface the schedulers rely on."""

    def get_learning_rate(self) -> float: ...

    def set_learning_rate(self, lr: float) -> None: ...


# --------------------------------------------------------------------------------------------
# validation / serialisation helpers
# --------------------------------------------------------------------------------------------


def _check_optimizer(optimizer: Any) -> None:
    for name in ("get_learning_rate", "set_learning_rate"):
        if not callable(getattr(optimizer, name, None)):
            raise TypeError(
                f"optimizer must provide get_learning_rate() and set_learning_rate(lr); "
                f"{type(optimizer).__name__} has no callable {name!r}{wrapper_hint(optimizer)}"
            )


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    """An integer in ``[minimum, MAX_INT]`` (``ValueError`` naming ``name`` otherwise); a
    float with an integral value is taken (Keras' ``decay_steps=1e4``, a JSON config's
    ``1000.0``)."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) \
            and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {describe(value)}")
    value = int(value)
    if value > MAX_INT:
        raise ValueError(f"{name} is too large: got {describe(value)} (at most {MAX_INT})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _to_float(name: str, value: Any) -> float:
    """``float(value)`` of a real number; ``ValueError`` naming ``name`` if it is too large."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large: got {describe(value)} (not representable as a "
                         f"float)") from None


def _check_real(
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {describe(value)}")
    value = _to_float(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    tests = ((">", gt, operator.gt), (">=", ge, operator.ge), ("<", lt, operator.lt),
             ("<=", le, operator.le))
    bounds = [(f"{op} {b}", test(value, b)) for op, b, test in tests if b is not None]
    if not all(ok for _, ok in bounds):
        raise ValueError(f"{name} must be {' and '.join(b for b, _ in bounds)}, got {value}")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {describe(value)}")
    return str(value)


def _entries(name: str, values: Any, what: str) -> list[Any]:
    """The entries of a list, tuple, set or array, as torch and Keras iterate them (not a
    string, a mapping or a one-shot iterator: ``ValueError`` naming ``name``)."""
    try:
        ok = not isinstance(values, (str, bytes, Mapping)) and iter(values) is not values
    except TypeError:  # (a 0-d array)
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a list of {what}, got {describe(values)}")
    return [v.item() if getattr(v, "ndim", None) == 0 else v for v in values]


def _check_milestones(name: str, milestones: Any, *, any_order: bool = False) -> list[int]:
    """Integers ``>= 0`` (:func:`_entries`), non-decreasing (a repeat: a phase of no steps),
    or with ``any_order`` sorted (a repeat counts once per occurrence: torch's ``Counter``)."""
    out = [_check_int(f"{name}[{i}]", m, minimum=0)
           for i, m in enumerate(_entries(name, milestones, "integers"))]
    if any_order:
        return sorted(out)
    for prev, cur in zip(out, out[1:], strict=False):
        if cur < prev:  # (torch's bisect would run the schedulers out of order)
            raise ValueError(f"{name} must be non-decreasing, got {out}")
    return out


def _encode_float(x: float) -> float | str:
    """A strictly JSON-representable float: non-finite values become strings."""
    x = float(x)
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "nan"
    return "inf" if x > 0 else "-inf"


def _decode_float(x: float | str, name: str = "value") -> float:
    """The inverse of :func:`_encode_float`: a real number or a string such as ``"inf"``
    (``ValueError`` naming ``name`` for anything else, or a number too large for a float)."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, str)):
        raise ValueError(f"state_dict {name} must be a number, got {describe(x)}")
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            raise ValueError(f"state_dict {name} must be a number, got {describe(x)}") from None
    return _to_float(f"state_dict {name}", x)


def _check_lr(name: str, lr: float) -> float:
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"state_dict {name} must be a finite value >= 0, got {lr!r}")
    return lr


def _check_step(t: Any, name: str = "step t") -> int:
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {describe(t)}")
    if t > MAX_INT:
        raise ValueError(f"{name} is too large: got {describe(t)} (at most {MAX_INT})")
    return int(t)


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------


_made: weakref.WeakSet = weakref.WeakSet()  # every live scheduler (mithril.interop.optax_scheduled)


class LRScheduler:
    """Base class of all learning-rate schedulers.

    At construction the scheduler records ``base_lr = optimizer.get_learning_rate()`` and the
    step counter ``last_step = 0``; subclasses then set the optimizer to the value of step ``0``
    (every constructor takes ``last_step=n`` / torch's ``last_epoch=n - 1``: then as if
    stepped ``n`` times, see :mod:`.start`).
    :meth:`step` advances ``last_step`` by one and sets the optimizer's learning rate to
    ``get_lr_at(last_step)``, a closed-form function of the integer step (never a recursive
    multiplication of the previous value).

    Subclasses implement :meth:`_lr_at` and list their hyper-parameters in ``_HPARAMS`` (which
    :meth:`_configure` validates and stores), so that :meth:`state_dict` /
    :meth:`load_state_dict` work generically.

    **Any hyperparameter.** ``optimizer`` may be a handle from
    ``optimizer.hyperparameter(name, group=None)``: the scheduler then drives that value
    (``StepLR(opt.hyperparameter("weight_decay"), 10)`` is a weight-decay schedule), with the
    same formulas.

    **Its own base: ``base_lr=``.** Every closed form whose rates follow ``base_lr`` (all but
    :class:`OneCycleLR` and :class:`CyclicLR`, whose rates are their arguments) takes the
    keyword ``base_lr=`` (a real ``>= 0``): the scheduler's ``base_lr`` is then that value
    instead of the optimizer's learning rate, and a parent (:class:`SequentialLR`,
    :class:`JoinSchedules`, :class:`ChainedScheduler`, a warm-up) keeps it rather than
    re-basing it, as optax's schedules each keep their own ``init_value`` / ``peak_value``:
    ``JoinSchedules(opt, [WSD(opt, ..., base_lr=0.1), WSD(opt, ..., base_lr=0.05)], [b])``
    peaks at 0.1, then at 0.05. Not with ``per_group`` (each group's own rate is its base).

    **Per parameter group, as torch.** With ``per_group=True`` (a keyword every closed-form
    scheduler takes), or a list for an argument torch takes per group (``OneCycleLR``'s
    ``max_lr``, ``CyclicLR``'s ``base_lr`` / ``max_lr``, the momentum bounds, ``LambdaLR``'s
    ``lr_lambda``), the scheduler acts on every parameter group with the group's own base
    value, as torch's schedulers do: one *lane* for the optimizer's own parameters (those in
    no group; the scheduler itself, lists' first entry) and one per ``param_groups[i]``
    (entry ``i + 1``), all stepped together and set all or nothing. Without it, a scheduler
    drives the optimizer's learning rate and the groups follow in proportion (their
    ``lr_scale``). :meth:`get_last_lrs` gives every lane's value; ``state_dict`` holds the
    groups' lanes under ``"groups"``.
    """

    _HPARAMS: ClassVar[tuple[str, ...]] = ()
    #: arguments that take a list with one value per parameter group (torch's)
    _GROUP_ARGS: ClassVar[tuple[str, ...]] = ()
    #: a scheduler with its own ``step`` that may still act per group, stepping each lane
    #: in turn (:func:`.lanes.lanewise`): it reads only its own lane's value and children
    _LANEWISE: ClassVar[bool] = False
    #: arguments holding child schedulers: per group, lane i drives the children's lane i
    _LANE_CHILDREN: ClassVar[tuple[str, ...]] = ()
    #: the constructor argument naming the optimizer (None: the first after ``self``)
    _OPTIMIZER_ARG: ClassVar[str | None] = None
    #: restarted by a parent, it starts from the rate the optimizer has then (SWALR), so
    #: the parent's :meth:`get_lr_at` passes it that rate (:meth:`_lr_at_from`)
    _STARTS_FROM_CURRENT: ClassVar[bool] = False
    #: each step goes on from the optimizer's current rate (ReduceLROnPlateau, SWALR), so
    #: it keeps what another scheduler did to it (see :func:`.lanes.alone`)
    _STEPS_FROM_CURRENT: ClassVar[bool] = False
    #: its state follows the metrics it is given (ReduceLROnPlateau): no start step
    _METRIC_DRIVEN: ClassVar[bool] = False

    @classmethod
    def _normalize_arguments(cls, arguments: dict[str, Any]) -> None:
        """Put the bound constructor ``arguments`` in canonical form, in place (a class
        accepting two argument orders says which is which)."""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "__init__" in cls.__dict__:
            cls.__init__ = _per_group_constructor(cls.__dict__["__init__"])  # type: ignore[method-assign]
        if "step" in cls.__dict__:
            step = cls.__dict__["step"]
            cls.step = lanes_mod.alone(  # type: ignore[method-assign]
                lanes_mod.lanewise(step) if cls._LANEWISE else step)

    @classmethod
    def _takes_base_lr(cls) -> bool:
        """Whether the class takes ``base_lr=``: a closed form stepped by the base class whose
        base a parent may re-base (not explicit rates, children or the current rate)."""
        return (cls.step is LRScheduler.step and cls._set_step is LRScheduler._set_step
                and cls._reset_state is LRScheduler._reset_state
                and cls._rebase is LRScheduler._rebase)

    @classmethod
    def _check_base_lr(cls, value: Any, grouped: bool) -> float:
        """The checked ``base_lr=`` keyword (``TypeError`` where the class or ``per_group``
        cannot take it, ``ValueError`` for a bad value)."""
        if not cls._takes_base_lr():
            raise TypeError(f"{cls.__name__} takes no base_lr= (its rates come from its "
                            f"arguments, its child schedulers or the optimizer's current rate)")
        if grouped:
            raise TypeError(f"{cls.__name__}: base_lr= gives one base; acting per parameter "
                            f"group each group's own rate is its base (set the groups' rates)")
        return _check_real("base_lr", value, ge=0.0)

    @classmethod
    def _acts_per_group(cls) -> bool:
        """Whether the class can act per group: a closed form stepped by the base class, or
        one stepping each lane in turn (``_LANEWISE``)."""
        return cls._LANEWISE or (
            cls.step is LRScheduler.step and cls._set_step is LRScheduler._set_step
            and cls._reset_state is LRScheduler._reset_state)

    def __new__(cls, *args: Any, **kwargs: Any) -> LRScheduler:
        if "verbose" in kwargs:  # torch's, with no meaning here
            raise TypeError(f"{cls.__name__}: no verbose= argument (torch's); read "
                            f"get_last_lr() to log the rate")
        _made.add(made := super().__new__(cls))
        return made

    def __init__(self, optimizer: SupportsLearningRate) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        lr = self.__dict__.get("_base_given")  # base_lr= (checked by the constructor wrapper)
        if lr is None:
            lr = _to_float("the optimizer's learning rate", optimizer.get_learning_rate())
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"the optimizer's learning rate must be finite and >= 0, got {lr!r}")
        self.base_lr: float = lr
        self._last_step: int = 0
        self._last_lr: float = self.base_lr
        self._siblings: list[LRScheduler] = []  # the groups' lanes (per_group)

    # ---- schedule ---------------------------------------------------------------------------

    def get_lr_at(self, t: int) -> float:
        """Learning rate of step ``t`` (``t >= 0``); pure function of ``t`` and ``base_lr``."""
        t = _check_step(t)
        try:
            lr = self._lr_at(t)
        except OverflowError:
            lr = math.inf
        if not math.isfinite(lr):  # a negative one is the optimizer's to refuse
            raise ValueError(f"{type(self).__name__}: the learning rate at step {t} is {lr}")
        return lr

    def _lr_at(self, t: int) -> float:
        raise NotImplementedError

    def _lr_at_from(self, t: int, start: float) -> float:
        """:meth:`get_lr_at` of a scheduler restarted when the rate was ``start`` (the same
        unless it :attr:`_STARTS_FROM_CURRENT`)."""
        return self.get_lr_at(t)

    def step(self, epoch: None = None) -> None:
        """Advance the step counter by one and set the optimizer's learning rate."""
        if epoch is not None:  # torch's deprecated form (CosineAnnealingWarmRestarts' docs use it)
            raise TypeError(
                f"{type(self).__name__}.step() takes no epoch (got {epoch!r}): step once per "
                f"update with the schedule counted in updates (e.g. T_0 = epochs * "
                f"batches_per_epoch for torch's step(epoch + i / iters)); to jump to a step, "
                f"load_state_dict")
        self._set_step(self.last_step + 1)

    def get_last_lr(self) -> float:
        """The learning rate this scheduler set most recently (the value of ``last_step``)."""
        return self._last_lr

    def get_last_lrs(self) -> list[float]:
        """Every lane's last value: the optimizer's own, then each parameter group's (one
        entry unless the scheduler acts per group), as torch's ``get_last_lr()``."""
        return [self._last_lr, *(s._last_lr for s in self._siblings)]

    def get_lrs_at(self, t: int) -> list[float]:
        """Every lane's value at step ``t`` (see :meth:`get_last_lrs`)."""
        return [self.get_lr_at(t), *(s.get_lr_at(t) for s in self._siblings)]

    @property
    def last_step(self) -> int:
        """The step counter: ``0`` at construction, one more per :meth:`step` (read-only: the
        rate, :meth:`get_last_lr` and a composite's children follow it)."""
        return self._last_step

    @last_step.setter
    def last_step(self, value: Any) -> None:
        attributes.refuse_step(self, "last_step", value)

    @property
    def per_group(self) -> bool:
        """Whether the scheduler acts on every parameter group with its own base value."""
        return bool(self._siblings)

    @property
    def requires_metric(self) -> bool:
        """Whether :meth:`step` needs a metric (true for plateau schedulers and their parents)."""
        return False

    # ---- internal protocol used by composite schedulers --------------------------------------

    def _configure(self, **hparams: Any) -> None:
        """Validate and store the hyper-parameters named in ``_HPARAMS``."""
        raise NotImplementedError

    def _extra_targets(self, t: int) -> list[tuple[Any, float]]:
        """Other hyperparameters this scheduler sets at step ``t`` besides the learning rate,
        as ``(handle, value)`` pairs (momentum cycling); none by default."""
        return []

    def _lane_targets(self, t: int) -> list[tuple[Any, float]]:
        return [(self.optimizer, self.get_lr_at(t)), *self._extra_targets(t)]

    def _current_targets(self) -> list[tuple[Any, float]]:
        """What the optimizer must hold at ``last_step``: every lane's learning rate (and the
        values of :meth:`_extra_targets`)."""
        out: list[tuple[Any, float]] = []
        for lane in (self, *self._siblings):
            out.append((lane.optimizer, lane._last_lr))
            out.extend(lane._extra_targets(lane.last_step))
        return out

    def _set_step(self, t: int) -> None:
        lanes = (self, *self._siblings)
        # may raise: evaluate every value before mutating any state
        targets = [lane._lane_targets(t) for lane in lanes]
        # checks each value first; a refused one puts every value set back
        _apply([x for lane in targets for x in lane])
        for lane, values in zip(lanes, targets, strict=True):
            lane._last_step = t
            lane._last_lr = values[0][1]

    def _reset_state(self) -> None:
        """Go back to step 0 without touching the optimizer."""
        self._last_lr = self.get_lr_at(0)
        self._last_step = 0
        for sibling in self._siblings:
            sibling._reset_state()

    def _restart(self) -> None:
        """Go back to step 0 and set the optimizer's learning rate accordingly (all or
        nothing: if the optimizer refuses the rate, the scheduler is left as it was)."""
        backup = self.state_dict()
        try:
            self._reset_state()
            _apply(self._current_targets())
        except Exception:
            try:
                self._load(backup)
            except Exception:  # only while constructing (no valid state yet): keep the cause
                pass
            raise

    def __getattr__(self, name: str) -> Any:
        # (only for a name the scheduler lacks) torch's names say what ours are called
        other = attributes.OTHER_NAMES.get(name)
        hint = f" (torch's name; here: {other})" if other else ""
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}{hint}",
                             name=name, obj=self)

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if name[0] == "_" or "_made" not in d or "_inside" in d:
            object.__setattr__(self, name, value)
        else:
            attributes.set_attribute(self, name, value)

    def _set_hyperparameter(self, name: str, value: Any) -> None:
        """Set hyperparameter ``name`` of this lane, checked as the constructor checks it
        (raising before anything is set)."""
        self._configure(**{**{n: getattr(self, n) for n in self._HPARAMS}, name: value})

    def _advance(self, metric: float | None) -> None:
        """One step on behalf of a parent scheduler; ``metric`` is ignored unless needed."""
        self.step()

    def _rebase(self, lr: float) -> None:
        """Replace ``base_lr`` (used by parents; does not touch the optimizer), unless it was
        given as ``base_lr=``."""
        if "_base_given" not in self.__dict__:
            self.base_lr = float(lr)

    # ---- serialisation -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The complete scheduler state as a plain, strictly JSON-serialisable ``dict``.

        Contains the class name (``"type"``), ``last_step``, ``base_lr``, ``last_lr``, every
        hyper-parameter and, for composite schedulers, the nested state of their children;
        ``base_lr_given: True`` where the base was given as ``base_lr=`` (a parent's re-base
        leaves it: restored by :meth:`load_state_dict`).
        """
        state: dict[str, Any] = {
            "type": type(self).__name__,
            "last_step": self.last_step,
            "base_lr": _encode_float(self.base_lr),
            "last_lr": _encode_float(self._last_lr),
        }
        if "_base_given" in self.__dict__:  # base_lr= given: a parent's re-base leaves it
            state["base_lr_given"] = True
        for name in self._HPARAMS:
            value = getattr(self, name)
            if isinstance(value, float):
                value = _encode_float(value)
            elif isinstance(value, list):
                value = list(value)
            state[name] = value
        state.update(self._extra_state())
        if self._siblings:
            state["groups"] = [s.state_dict() for s in self._siblings]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (also after a JSON round trip).

        Hyper-parameters, counters and nested child states are all restored, and the optimizer's
        learning rate is set to the restored ``last_lr``, so continuing to call :meth:`step`
        reproduces an uninterrupted run exactly.
        """
        backup = self.state_dict()
        try:
            self._load(state_dict)
            _apply(self._current_targets())  # checks the restored values
        except Exception:
            self._load(backup)  # leave the scheduler untouched on a bad state_dict
            raise

    def _load(self, state: Mapping[str, Any]) -> None:
        d = self.__dict__
        inside = "_inside" in d
        d["_inside"] = True  # (the values are checked here)
        try:
            self._load_checked(state)
            unknown = sorted(set(state) - set(self.state_dict()))  # (a typo, a newer version)
            if unknown:
                raise KeyError(f"state_dict key(s) {unknown} unknown to {type(self).__name__}")
        finally:
            if not inside:
                del d["_inside"]

    def _load_checked(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state).__name__}")
        kind = state.get("type")
        if kind is None and "last_epoch" in state:  # (a user switching from torch)
            raise ValueError(
                f"state_dict is torch.optim.lr_scheduler's (it has 'last_epoch', no 'type'), "
                f"not a {type(self).__name__}.state_dict(): build this scheduler with the "
                f"same arguments and step it last_epoch times to carry a torch run on (or "
                f"build it with last_step=state_dict['last_epoch'])")
        if not isinstance(kind, str) or kind != type(self).__name__:
            raise ValueError(
                f"state_dict is for {describe(kind)}, cannot load it into "
                f"{type(self).__name__}"
            )
        missing = [k for k in ("last_step", "base_lr", "last_lr", *self._HPARAMS) if k not in state]
        if missing:
            raise ValueError(f"state_dict for {type(self).__name__} is missing keys {missing}")
        # hyper-parameters are validated finite, so they are stored verbatim
        self._configure(**{name: state[name] for name in self._HPARAMS})
        self._last_step = _check_step(state["last_step"], "state_dict last_step")
        self.base_lr = _check_lr("base_lr", _decode_float(state["base_lr"], "base_lr"))
        given = state.get("base_lr_given", False)
        if not isinstance(given, bool):
            raise ValueError(f"state_dict 'base_lr_given' must be a bool, got {describe(given)}")
        if given:  # (as the saved scheduler: its base is kept when a parent re-bases)
            self.__dict__["_base_given"] = self.base_lr
        else:
            self.__dict__.pop("_base_given", None)
        self._last_lr = _check_lr("last_lr", _decode_float(state["last_lr"], "last_lr"))
        self._load_extra(state)
        groups = state.get("groups")
        if self._siblings:
            if (isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence)
                    or len(groups) != len(self._siblings)):
                raise ValueError(f"state_dict must hold the states of {len(self._siblings)} "
                                 f"parameter groups under 'groups' (this {type(self).__name__} "
                                 f"acts per group), got {describe(groups)}")
            for i, (sibling, sub) in enumerate(zip(self._siblings, groups, strict=True)):
                _load_nested(sibling, sub, f"['groups'][{i}]")
        elif groups is not None:
            raise ValueError(f"state_dict was saved by a {type(self).__name__} acting per "
                             f"parameter group ('groups'); build this one per group "
                             f"(per_group=True or lists) to load it")

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        parts = [f"{k}={getattr(self, k)!r}" for k in self._HPARAMS]
        children = self.__dict__.get("schedulers")
        if isinstance(children, (list, tuple)):  # a composite's (ChainedScheduler had none)
            parts.insert(0, f"schedulers=[{', '.join(type(c).__name__ for c in children)}]")
        parts += [f"last_step={self.last_step}", f"last_lr={self._last_lr!r}"]
        return f"{type(self).__name__}({', '.join(parts)})"


def _load_nested(child: LRScheduler, sub: Any, key: str) -> None:
    """``child._load(sub)``, an error saying where ``sub`` is in the state dict loaded
    (``state_dict['schedulers'][1]['after_scheduler']: ...``)."""
    try:
        child._load(sub)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        rest = msg[len("state_dict"):] if msg.startswith("state_dict[") else f": {msg}"
        raise type(exc)(f"state_dict{key}{rest}") from None


LRScheduler.step = lanes_mod.alone(LRScheduler.step)  # type: ignore[method-assign]


def _check_child(owner: str, optimizer: Any, child: Any, what: str) -> LRScheduler:
    if not isinstance(child, LRScheduler):
        raise TypeError(f"{owner}: {what} must be an LRScheduler, got {type(child).__name__}")
    if not lanes_mod.same_target(child.optimizer, optimizer):
        raise ValueError(f"{owner}: {what} must drive the same optimizer object")
    child.__dict__["_owned"] = True  # (stepped by its parent: see lanes.alone)
    return child


class ChildrenState:
    """The state-dict half of a scheduler made of child schedulers (``self.schedulers``):
    their states, in order, under ``"schedulers"``."""

    schedulers: list[Any]

    def _extra_state(self) -> dict[str, Any]:
        return {"schedulers": [c.state_dict() for c in self.schedulers]}

    def _load_checked(self, state: Mapping[str, Any]) -> None:
        # why: first, as the children are what differs (a state of 2 children loaded into 3
        # was refused by the milestones' count)
        if isinstance(state, Mapping) and state.get("type") == type(self).__name__:
            subs = state.get("schedulers")
            n = len(self.schedulers)
            if isinstance(subs, (str, bytes)) or not isinstance(subs, Sequence):
                raise ValueError(f"state_dict['schedulers'] must be a list of {n} child "
                                 f"scheduler states, got {describe(subs)}")
            if len(subs) != n:
                raise ValueError(f"state_dict['schedulers'] holds {len(subs)} child scheduler "
                                 f"states, this {type(self).__name__} has {n} children: build "
                                 f"it with the children it was saved with")
        super()._load_checked(state)  # type: ignore[misc]

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        for i, (child, sub) in enumerate(zip(self.schedulers, state["schedulers"], strict=True)):
            _load_nested(child, sub, f"['schedulers'][{i}]")
