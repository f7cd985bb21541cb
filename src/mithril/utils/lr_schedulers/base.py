"""The scheduler base class, the optimizer protocol and shared validation helpers."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..optimizers.checks import MAX_INT, describe

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
                f"{type(optimizer).__name__} has no callable {name!r}"
            )


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    """An integer in ``[minimum, MAX_INT]`` (``ValueError`` naming ``name`` otherwise)."""
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
    bounds = []
    ok = True
    if gt is not None:
        bounds.append(f"> {gt}")
        ok &= value > gt
    if ge is not None:
        bounds.append(f">= {ge}")
        ok &= value >= ge
    if lt is not None:
        bounds.append(f"< {lt}")
        ok &= value < lt
    if le is not None:
        bounds.append(f"<= {le}")
        ok &= value <= le
    if not ok:
        raise ValueError(f"{name} must be {' and '.join(bounds)}, got {value}")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {describe(value)}")
    return str(value)


def _check_milestones(name: str, milestones: Any) -> list[int]:
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise ValueError(f"{name} must be a sequence of integers, got {describe(milestones)}")
    out = [_check_int(f"{name}[{i}]", m, minimum=1) for i, m in enumerate(milestones)]
    for prev, cur in zip(out, out[1:], strict=False):
        if cur <= prev:
            raise ValueError(f"{name} must be strictly increasing, got {out}")
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


def _check_step(t: Any) -> int:
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
        raise ValueError(f"step t must be a non-negative integer, got {describe(t)}")
    if t > MAX_INT:
        raise ValueError(f"step t is too large: got {describe(t)} (at most {MAX_INT})")
    return int(t)


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------


class LRScheduler:
    """Base class of all learning-rate schedulers.

    At construction the scheduler records ``base_lr = optimizer.get_learning_rate()`` and the
    step counter ``last_step = 0``; subclasses then set the optimizer to the value of step ``0``.
    :meth:`step` advances ``last_step`` by one and sets the optimizer's learning rate to
    ``get_lr_at(last_step)``, a closed-form function of the integer step (never a recursive
    multiplication of the previous value).

    Subclasses implement :meth:`_lr_at` and list their hyper-parameters in ``_HPARAMS`` (which
    :meth:`_configure` validates and stores), so that :meth:`state_dict` /
    :meth:`load_state_dict` work generically.
    """

    _HPARAMS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, optimizer: SupportsLearningRate) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        lr = _to_float("the optimizer's learning rate", optimizer.get_learning_rate())
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"the optimizer's learning rate must be finite and >= 0, got {lr!r}")
        self.base_lr: float = lr
        self.last_step: int = 0
        self._last_lr: float = self.base_lr

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

    def step(self) -> None:
        """Advance the step counter by one and set the optimizer's learning rate."""
        self._set_step(self.last_step + 1)

    def get_last_lr(self) -> float:
        """The learning rate this scheduler set most recently (the value of ``last_step``)."""
        return self._last_lr

    @property
    def requires_metric(self) -> bool:
        """Whether :meth:`step` needs a metric (true for plateau schedulers and their parents)."""
        return False

    # ---- internal protocol used by composite schedulers --------------------------------------

    def _configure(self, **hparams: Any) -> None:
        """Validate and store the hyper-parameters named in ``_HPARAMS``."""
        raise NotImplementedError

    def _set_step(self, t: int) -> None:
        lr = self.get_lr_at(t)  # may raise; evaluate before mutating any state
        self.optimizer.set_learning_rate(lr)  # checks first: a refused lr changes nothing
        self.last_step = t
        self._last_lr = lr

    def _reset_state(self) -> None:
        """Go back to step 0 without touching the optimizer."""
        self._last_lr = self.get_lr_at(0)
        self.last_step = 0

    def _restart(self) -> None:
        """Go back to step 0 and set the optimizer's learning rate accordingly (all or
        nothing: if the optimizer refuses the rate, the scheduler is left as it was)."""
        backup = self.state_dict()
        try:
            self._reset_state()
            self.optimizer.set_learning_rate(self._last_lr)
        except Exception:
            try:
                self._load(backup)
            except Exception:  # only while constructing (no valid state yet): keep the cause
                pass
            raise

    def _advance(self, metric: float | None) -> None:
        """One step on behalf of a parent scheduler; ``metric`` is ignored unless needed."""
        self.step()

    def _rebase(self, lr: float) -> None:
        """Replace ``base_lr`` (used by parents; does not touch the optimizer)."""
        self.base_lr = float(lr)

    # ---- serialisation -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The complete scheduler state as a plain, strictly JSON-serialisable ``dict``.

        Contains the class name (``"type"``), ``last_step``, ``base_lr``, ``last_lr``, every
        hyper-parameter and, for composite schedulers, the nested state of their children.
        """
        state: dict[str, Any] = {
            "type": type(self).__name__,
            "last_step": self.last_step,
            "base_lr": _encode_float(self.base_lr),
            "last_lr": _encode_float(self._last_lr),
        }
        for name in self._HPARAMS:
            value = getattr(self, name)
            if isinstance(value, float):
                value = _encode_float(value)
            elif isinstance(value, list):
                value = list(value)
            state[name] = value
        state.update(self._extra_state())
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
            self.optimizer.set_learning_rate(self._last_lr)  # checks the restored lr
        except Exception:
            self._load(backup)  # leave the scheduler untouched on a bad state_dict
            raise

    def _load(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state).__name__}")
        kind = state.get("type")
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
        self.last_step = _check_step(state["last_step"])
        self.base_lr = _check_lr("base_lr", _decode_float(state["base_lr"], "base_lr"))
        self._last_lr = _check_lr("last_lr", _decode_float(state["last_lr"], "last_lr"))
        self._load_extra(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._HPARAMS)
        return f"{type(self).__name__}({hp}, last_step={self.last_step}, last_lr={self._last_lr!r})"


def _check_child(owner: str, optimizer: Any, child: Any, what: str) -> LRScheduler:
    if not isinstance(child, LRScheduler):
        raise TypeError(f"{owner}: {what} must be an LRScheduler, got {type(child).__name__}")
    if child.optimizer is not optimizer:
        raise ValueError(f"{owner}: {what} must drive the same optimizer object")
    return child


class ChildrenState:
    """The state-dict half of a scheduler made of child schedulers (``self.schedulers``):
    their states, in order, under ``"schedulers"``."""

    schedulers: list[Any]

    def _extra_state(self) -> dict[str, Any]:
        return {"schedulers": [c.state_dict() for c in self.schedulers]}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        subs = state.get("schedulers")
        if not isinstance(subs, Sequence) or len(subs) != len(self.schedulers):
            raise ValueError(f"state_dict must hold {len(self.schedulers)} child scheduler states")
        for child, sub in zip(self.schedulers, subs, strict=True):
            child._load(sub)
