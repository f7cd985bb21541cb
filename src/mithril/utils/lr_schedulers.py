"""Backend-agnostic learning-rate schedulers.

Every scheduler drives a duck-typed optimizer that exposes exactly two methods::

    optimizer.get_learning_rate() -> float
    optimizer.set_learning_rate(lr: float) -> None

Setting the learning rate is assumed to be cheap (the optimizer just stores a float), so a
scheduler may call ``set_learning_rate`` on every step.

Conventions (shared by all schedulers, identical to ``torch.optim.lr_scheduler``):

* The step counter ``t`` (attribute ``last_step``) starts at ``0``. Constructing a scheduler puts
  the optimizer at the value of step ``0``; each call to :meth:`LRScheduler.step` advances ``t``
  by one and sets the optimizer's learning rate to the value of the new step. Call ``step()``
  *after* the optimizer update, as in PyTorch.
* ``base_lr`` is the optimizer's learning rate when the scheduler is constructed (a few
  schedulers re-base it explicitly; see :class:`LinearWarmupScheduler`, :class:`OneCycleLR` and
  :class:`SequentialLR`).
* Apart from :class:`ReduceLROnPlateau` (which depends on the observed metric), every schedule is
  a *closed form*: :meth:`LRScheduler.get_lr_at` is a pure function of the integer step ``t`` and
  the hyper-parameters. PyTorch evaluates several schedules recursively (``lr_t = lr_{t-1} *
  ratio``); the values agree with PyTorch up to the floating-point rounding of that recursion
  (below ``1e-12`` relative over a few hundred steps; the recursion's error grows with the step
  count) and exactly where PyTorch itself uses a closed form or plain comparisons
  (:class:`OneCycleLR`, :class:`CosineAnnealingWarmRestarts`, :class:`ReduceLROnPlateau`).
* :meth:`LRScheduler.state_dict` returns a plain, strictly JSON-serialisable ``dict`` (numbers,
  strings, booleans, ``None``, lists and nested dicts; non-finite floats are encoded as the
  strings ``"inf"``, ``"-inf"`` and ``"nan"``), so it survives ``json.dumps(...,
  allow_nan=False)`` and can be stored as checkpoint metadata without pickle.

Intended differences from PyTorch: a single learning rate per optimizer (no parameter groups);
no momentum cycling in :class:`OneCycleLR`; no deprecated ``epoch`` argument to ``step``;
:class:`SequentialLR` and :class:`LinearWarmupScheduler` accept a :class:`ReduceLROnPlateau`
child; stricter hyper-parameter validation (degenerate settings raise :class:`ValueError`
instead of producing division by zero or silently odd schedules).
"""

from __future__ import annotations

import math
import numbers
import warnings
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

__all__ = [
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "ExponentialLR",
    "LRScheduler",
    "LinearWarmupScheduler",
    "MultiStepLR",
    "OneCycleLR",
    "ReduceLROnPlateau",
    "SequentialLR",
    "StepLR",
    "SupportsLearningRate",
]


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
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


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
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
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
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return str(value)


def _check_milestones(name: str, milestones: Any) -> list[int]:
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise ValueError(f"{name} must be a sequence of integers, got {milestones!r}")
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


def _decode_float(x: float | str) -> float:
    return float(x)


def _check_step(t: Any) -> int:
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
        raise ValueError(f"step t must be a non-negative integer, got {t!r}")
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
        self.base_lr: float = float(optimizer.get_learning_rate())
        self.last_step: int = 0
        self._last_lr: float = self.base_lr

    # ---- schedule ---------------------------------------------------------------------------

    def get_lr_at(self, t: int) -> float:
        """Learning rate of step ``t`` (``t >= 0``); pure function of ``t`` and ``base_lr``."""
        return self._lr_at(_check_step(t))

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
        self.last_step = t
        self._last_lr = lr
        self.optimizer.set_learning_rate(lr)

    def _reset_state(self) -> None:
        """Go back to step 0 without touching the optimizer."""
        self._last_lr = self.get_lr_at(0)
        self.last_step = 0

    def _restart(self) -> None:
        """Go back to step 0 and set the optimizer's learning rate accordingly."""
        self._reset_state()
        self.optimizer.set_learning_rate(self._last_lr)

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
        except Exception:
            self._load(backup)  # leave the scheduler untouched on a bad state_dict
            raise
        self.optimizer.set_learning_rate(self._last_lr)

    def _load(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state).__name__}")
        if state.get("type") != type(self).__name__:
            raise ValueError(
                f"state_dict is for {state.get('type')!r}, cannot load it into "
                f"{type(self).__name__}"
            )
        missing = [k for k in ("last_step", "base_lr", "last_lr", *self._HPARAMS) if k not in state]
        if missing:
            raise ValueError(f"state_dict for {type(self).__name__} is missing keys {missing}")
        # hyper-parameters are validated finite, so they are stored verbatim
        self._configure(**{name: state[name] for name in self._HPARAMS})
        self.last_step = _check_step(state["last_step"])
        self.base_lr = _decode_float(state["base_lr"])
        self._last_lr = _decode_float(state["last_lr"])
        self._load_extra(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._HPARAMS)
        return f"{type(self).__name__}({hp}, last_step={self.last_step}, last_lr={self._last_lr!r})"


# --------------------------------------------------------------------------------------------
# simple closed-form schedules
# --------------------------------------------------------------------------------------------


class StepLR(LRScheduler):
    """Decay by ``gamma`` every ``step_size`` steps.

    .. math:: \\eta_t = \\eta_{base} \\cdot \\gamma^{\\lfloor t / \\text{step\\_size} \\rfloor}

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        step_size: period of the decay, integer ``>= 1``.
        gamma: multiplicative factor, ``> 0``.
    """

    _HPARAMS = ("step_size", "gamma")

    def __init__(self, optimizer: SupportsLearningRate, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(optimizer)
        self._configure(step_size=step_size, gamma=gamma)
        self._restart()

    def _configure(self, *, step_size: int, gamma: float) -> None:
        step_size = _check_int("step_size", step_size, minimum=1)
        gamma = _check_real("gamma", gamma, gt=0.0)
        self.step_size, self.gamma = step_size, gamma

    def _lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma ** (t // self.step_size)


class MultiStepLR(LRScheduler):
    """Decay by ``gamma`` at each milestone.

    .. math:: \\eta_t = \\eta_{base} \\cdot \\gamma^{\\#\\{m \\in \\text{milestones} : m \\le t\\}}

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        milestones: strictly increasing positive integers (PyTorch also accepts unsorted or
            repeated milestones; here they raise :class:`ValueError`).
        gamma: multiplicative factor, ``> 0``.
    """

    _HPARAMS = ("milestones", "gamma")

    def __init__(
        self, optimizer: SupportsLearningRate, milestones: Sequence[int], gamma: float = 0.1
    ) -> None:
        super().__init__(optimizer)
        self._configure(milestones=milestones, gamma=gamma)
        self._restart()

    def _configure(self, *, milestones: Sequence[int], gamma: float) -> None:
        ms = _check_milestones("milestones", milestones)
        gamma = _check_real("gamma", gamma, gt=0.0)
        self.milestones, self.gamma = ms, gamma

    def _lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma ** bisect_right(self.milestones, t)


class ExponentialLR(LRScheduler):
    """Decay by ``gamma`` every step.

    .. math:: \\eta_t = \\eta_{base} \\cdot \\gamma^{t}

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        gamma: multiplicative factor, ``> 0``.
    """

    _HPARAMS = ("gamma",)

    def __init__(self, optimizer: SupportsLearningRate, gamma: float) -> None:
        super().__init__(optimizer)
        self._configure(gamma=gamma)
        self._restart()

    def _configure(self, *, gamma: float) -> None:
        self.gamma = _check_real("gamma", gamma, gt=0.0)

    def _lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma**t


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing, optionally with warm restarts (SGDR).

    Without restarts (``warm_restarts=False``, the default):

    .. math::
        \\eta_t = \\eta_{min} + \\tfrac12 (\\eta_{base} - \\eta_{min})
                  \\left(1 + \\cos\\left(\\pi \\frac{t}{T_{max}}\\right)\\right)

    for *all* ``t >= 0``. Past ``T_max`` this keeps following the cosine: the rate rises back to
    ``base_lr`` at ``t = 2 T_max`` and is periodic with period ``2 T_max``. This is exactly what
    PyTorch's recursive ``CosineAnnealingLR`` produces (its special case at
    ``(t - 1 - T_max) % (2 T_max) == 0`` exists precisely to continue the cosine through the
    minimum); the two agree to about ``1e-13`` relative (verified numerically in the tests).

    With ``warm_restarts=True`` the schedule matches PyTorch's
    ``CosineAnnealingWarmRestarts(T_0=T_max, T_mult, eta_min)`` exactly:

    .. math::
        \\eta_t = \\eta_{min} + \\tfrac12 (\\eta_{base} - \\eta_{min})
                  \\left(1 + \\cos\\left(\\pi \\frac{T_{cur}}{T_i}\\right)\\right)

    where the first cycle has length ``T_i = T_max``, each later cycle is ``T_mult`` times
    longer, and ``T_cur`` is the number of steps since the last restart.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        T_max: half-period (no restarts; real ``> 0``) or first cycle length (restarts;
            integer ``>= 1``).
        eta_min: minimum learning rate, ``>= 0``.
        warm_restarts: restart the cosine at ``base_lr`` at the end of every cycle.
        T_mult: cycle-length multiplier (integer ``>= 1``; ``None`` means 1). Values other than 1
            require ``warm_restarts=True``.
    """

    _HPARAMS = ("T_max", "eta_min", "warm_restarts", "T_mult")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        T_max: float,
        eta_min: float = 0.0,
        warm_restarts: bool = False,
        T_mult: int | None = 1,
    ) -> None:
        super().__init__(optimizer)
        self._configure(T_max=T_max, eta_min=eta_min, warm_restarts=warm_restarts, T_mult=T_mult)
        self._restart()

    def _configure(
        self, *, T_max: float, eta_min: float, warm_restarts: bool, T_mult: int | None
    ) -> None:
        if not isinstance(warm_restarts, bool):
            raise ValueError(f"warm_restarts must be a bool, got {warm_restarts!r}")
        t_mult = 1 if T_mult is None else _check_int("T_mult", T_mult, minimum=1)
        if warm_restarts:
            t_max: float = _check_int("T_max", T_max, minimum=1)
        else:
            t_max = _check_real("T_max", T_max, gt=0.0)
            if isinstance(T_max, numbers.Integral):
                t_max = int(T_max)
            if t_mult != 1:
                raise ValueError(f"T_mult={t_mult} requires warm_restarts=True")
        eta = _check_real("eta_min", eta_min, ge=0.0)
        self.T_max, self.eta_min, self.warm_restarts, self.T_mult = (
            t_max,
            eta,
            warm_restarts,
            t_mult,
        )

    def cycle_position(self, t: int) -> tuple[int, int]:
        """``(T_cur, T_i)`` of step ``t`` for the warm-restart schedule."""
        t = _check_step(t)
        t_i = int(self.T_max)
        if self.T_mult == 1:
            return t % t_i, t_i
        start = 0
        while t - start >= t_i:
            start += t_i
            t_i *= self.T_mult
        return t - start, t_i

    def _lr_at(self, t: int) -> float:
        if self.warm_restarts:
            t_cur, t_i = self.cycle_position(t)
            # same evaluation order as torch's CosineAnnealingWarmRestarts.get_lr
            return (
                self.eta_min
                + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2
            )
        # same evaluation order as torch's CosineAnnealingLR._get_closed_form_lr
        return (
            self.eta_min
            + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2
        )


class CosineAnnealingWarmRestarts(CosineAnnealingLR):
    """PyTorch-compatible spelling of ``CosineAnnealingLR(..., warm_restarts=True)``.

    .. math::
        \\eta_t = \\eta_{min} + \\tfrac12 (\\eta_{base} - \\eta_{min})
                  \\left(1 + \\cos\\left(\\pi \\frac{T_{cur}}{T_i}\\right)\\right),
        \\quad T_0 = \\text{T\\_0},\\ T_{i+1} = \\text{T\\_mult} \\cdot T_i

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        T_0: length of the first cycle, integer ``>= 1``.
        T_mult: cycle-length multiplier, integer ``>= 1``.
        eta_min: minimum learning rate, ``>= 0``.
    """

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        T_0: int,
        T_mult: int = 1,
        eta_min: float = 0.0,
    ) -> None:
        super().__init__(optimizer, T_max=T_0, eta_min=eta_min, warm_restarts=True, T_mult=T_mult)

    def _configure(
        self, *, T_max: float, eta_min: float, warm_restarts: bool, T_mult: int | None
    ) -> None:
        if warm_restarts is not True:
            raise ValueError("CosineAnnealingWarmRestarts requires warm_restarts=True")
        try:
            super()._configure(T_max=T_max, eta_min=eta_min, warm_restarts=True, T_mult=T_mult)
        except ValueError as exc:  # report torch's parameter name
            raise ValueError(str(exc).replace("T_max", "T_0")) from None

    @property
    def T_0(self) -> int:
        """Length of the first cycle (alias of ``T_max``)."""
        return int(self.T_max)


# --------------------------------------------------------------------------------------------
# metric-driven schedule
# --------------------------------------------------------------------------------------------


class ReduceLROnPlateau(LRScheduler):
    """Reduce the learning rate when a monitored metric stops improving.

    Semantics are exactly PyTorch's. On ``step(metric)``:

    * ``metric`` is *better* than ``best`` if, for ``threshold_mode='rel'``,
      ``metric < best * (1 - threshold)`` (``mode='min'``) or
      ``metric > best * (1 + threshold)`` (``mode='max'``); for ``threshold_mode='abs'``,
      ``metric < best - threshold`` / ``metric > best + threshold``. ``best`` starts at
      ``+inf`` (min) / ``-inf`` (max). A better metric becomes ``best`` and zeroes
      ``num_bad_epochs``; otherwise ``num_bad_epochs += 1``.
    * While in cooldown (``cooldown_counter > 0``) the counter is decremented and bad epochs are
      ignored (``num_bad_epochs = 0``).
    * If ``num_bad_epochs > patience``: ``new = max(lr * factor, min_lr)`` where ``lr`` is the
      optimizer's current learning rate; the optimizer is updated only if ``lr - new > eps``.
      Then ``cooldown_counter = cooldown`` and ``num_bad_epochs = 0``.

    The optimizer is not touched at construction (``base_lr`` is its current learning rate).
    This scheduler has no closed form: :meth:`get_lr_at` raises :class:`NotImplementedError`.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        mode: ``'min'`` or ``'max'``.
        factor: reduction factor, ``0 <= factor < 1``.
        patience: number of tolerated bad steps, integer ``>= 0``.
        threshold: improvement threshold, ``>= 0`` (``< 1`` for ``mode='min'`` with
            ``threshold_mode='rel'``).
        threshold_mode: ``'rel'`` or ``'abs'``.
        cooldown: steps to wait after a reduction, integer ``>= 0``.
        min_lr: lower bound of the learning rate, ``>= 0``.
        eps: minimal effective reduction, ``>= 0``.
    """

    _HPARAMS = (
        "mode",
        "factor",
        "patience",
        "threshold",
        "threshold_mode",
        "cooldown",
        "min_lr",
        "eps",
    )

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        mode: Literal["min", "max"] = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        min_lr: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(optimizer)
        self._configure(
            mode=mode,
            factor=factor,
            patience=patience,
            threshold=threshold,
            threshold_mode=threshold_mode,
            cooldown=cooldown,
            min_lr=min_lr,
            eps=eps,
        )
        self._reset_state()

    def _configure(
        self,
        *,
        mode: str,
        factor: float,
        patience: int,
        threshold: float,
        threshold_mode: str,
        cooldown: int,
        min_lr: float,
        eps: float,
    ) -> None:
        mode = _check_choice("mode", mode, ("min", "max"))
        threshold_mode = _check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
        factor = _check_real("factor", factor, ge=0.0, lt=1.0)
        patience = _check_int("patience", patience, minimum=0)
        if mode == "min" and threshold_mode == "rel":
            threshold = _check_real("threshold", threshold, ge=0.0, lt=1.0)
        else:
            threshold = _check_real("threshold", threshold, ge=0.0)
        cooldown = _check_int("cooldown", cooldown, minimum=0)
        min_lr = _check_real("min_lr", min_lr, ge=0.0)
        eps = _check_real("eps", eps, ge=0.0)
        self.mode, self.threshold_mode = mode, threshold_mode
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.cooldown, self.min_lr, self.eps = cooldown, min_lr, eps

    @property
    def requires_metric(self) -> bool:
        return True

    @property
    def mode_worse(self) -> float:
        """Initial value of ``best``: ``+inf`` for ``'min'``, ``-inf`` for ``'max'``."""
        return math.inf if self.mode == "min" else -math.inf

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _lr_at(self, t: int) -> float:
        raise NotImplementedError(
            "ReduceLROnPlateau depends on the observed metrics and has no closed form"
        )

    def _reset_state(self) -> None:
        self.last_step = 0
        self.best: float = self.mode_worse
        self.num_bad_epochs: int = 0
        self.cooldown_counter: int = 0
        self._last_lr = self.base_lr

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def step(self, metric: float | None = None) -> None:  # type: ignore[override]
        """Observe ``metric`` (anything ``float()`` accepts) and maybe reduce the learning rate.

        Without a metric there is nothing to observe: a ``RuntimeWarning`` says so and
        nothing changes (no epoch is counted). A loop written for epoch-driven schedulers
        thus keeps running, visibly, instead of crashing or silently decaying.
        """
        if metric is None:
            _warn_no_metric()
            return
        current = float(metric)
        self.last_step += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1

        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # ignore any bad epochs in cooldown

        if self.num_bad_epochs > self.patience:
            old_lr = float(self.optimizer.get_learning_rate())
            new_lr = max(old_lr * self.factor, self.min_lr)
            if old_lr - new_lr > self.eps:
                self.optimizer.set_learning_rate(new_lr)
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

        self._last_lr = float(self.optimizer.get_learning_rate())

    def _advance(self, metric: float | None) -> None:
        self.step(metric)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "best": _encode_float(self.best),
            "num_bad_epochs": self.num_bad_epochs,
            "cooldown_counter": self.cooldown_counter,
        }

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        try:
            self.best = _decode_float(state["best"])
            self.num_bad_epochs = _check_int("num_bad_epochs", state["num_bad_epochs"], minimum=0)
            self.cooldown_counter = _check_int(
                "cooldown_counter", state["cooldown_counter"], minimum=0
            )
        except KeyError as exc:
            raise ValueError(f"ReduceLROnPlateau state_dict is missing key {exc}") from None


# --------------------------------------------------------------------------------------------
# warm-up and one-cycle
# --------------------------------------------------------------------------------------------


def _check_child(owner: str, optimizer: Any, child: Any, what: str) -> LRScheduler:
    if not isinstance(child, LRScheduler):
        raise TypeError(f"{owner}: {what} must be an LRScheduler, got {type(child).__name__}")
    if child.optimizer is not optimizer:
        raise ValueError(f"{owner}: {what} must drive the same optimizer object")
    return child


class LinearWarmupScheduler(LRScheduler):
    """Linear warm-up, optionally followed by another scheduler.

    .. math::
        \\eta_t = \\text{start\\_lr} + (\\text{end\\_lr} - \\text{start\\_lr})
                  \\frac{t}{\\text{warmup\\_steps}} \\quad (0 \\le t < \\text{warmup\\_steps})

    For ``t >= warmup_steps``: if ``after_scheduler`` is ``None`` the rate stays at ``end_lr``;
    otherwise ``after_scheduler`` drives it with its own step counter, which is ``0`` at
    ``t = warmup_steps`` (so ``eta_t = after.get_lr_at(t - warmup_steps)``).

    The ``after_scheduler``'s ``base_lr`` is **re-based to** ``end_lr`` (whatever the optimizer's
    learning rate was when it was constructed), so a base-relative schedule continues seamlessly
    from the end of the warm-up. Schedules with explicit rates (:class:`OneCycleLR`) ignore this.
    ``after_scheduler`` may be a :class:`ReduceLROnPlateau`; then ``step(metric)`` forwards the
    metric to it after the warm-up (the metric is ignored during the warm-up and on the step
    that ends it, since it measures the warm-up phase).

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        warmup_steps: warm-up length, integer ``>= 0`` (``0`` means no warm-up).
        start_lr: learning rate at ``t = 0``, ``>= 0``.
        end_lr: learning rate at ``t = warmup_steps``, ``>= 0``.
        after_scheduler: optional scheduler on the same optimizer.
    """

    _HPARAMS = ("warmup_steps", "start_lr", "end_lr")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        warmup_steps: int,
        start_lr: float,
        end_lr: float,
        after_scheduler: LRScheduler | None = None,
    ) -> None:
        super().__init__(optimizer)
        self._configure(warmup_steps=warmup_steps, start_lr=start_lr, end_lr=end_lr)
        if after_scheduler is not None:
            _check_child(type(self).__name__, optimizer, after_scheduler, "after_scheduler")
            after_scheduler._rebase(self.end_lr)
        self.after_scheduler = after_scheduler
        self._restart()

    def _configure(self, *, warmup_steps: int, start_lr: float, end_lr: float) -> None:
        warmup_steps = _check_int("warmup_steps", warmup_steps, minimum=0)
        start_lr = _check_real("start_lr", start_lr, ge=0.0)
        end_lr = _check_real("end_lr", end_lr, ge=0.0)
        self.warmup_steps, self.start_lr, self.end_lr = warmup_steps, start_lr, end_lr

    @property
    def requires_metric(self) -> bool:
        return self.after_scheduler is not None and self.after_scheduler.requires_metric

    def _lr_at(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.start_lr + (self.end_lr - self.start_lr) * t / self.warmup_steps
        if self.after_scheduler is None:
            return self.end_lr
        return self.after_scheduler.get_lr_at(t - self.warmup_steps)

    def _reset_state(self) -> None:
        self.last_step = 0
        after = self.after_scheduler
        if after is not None:
            after._reset_state()
        if after is not None and self.warmup_steps == 0:
            self._last_lr = after.get_last_lr()
        else:
            self._last_lr = self._lr_at(0)

    def step(self, metric: float | None = None) -> None:  # type: ignore[override]
        """Advance one step; ``metric`` is forwarded to a metric-driven ``after_scheduler``."""
        t = self.last_step + 1
        after = self.after_scheduler
        if after is None or t < self.warmup_steps:
            self._set_step(t)
            return
        if t == self.warmup_steps:
            after._restart()
        elif metric is None and after.requires_metric:
            _warn_no_metric()  # nothing to observe: nothing advances
            return
        else:
            after._advance(metric)
        self.last_step = t
        self._last_lr = after.get_last_lr()

    def _advance(self, metric: float | None) -> None:
        self.step(metric)

    def _extra_state(self) -> dict[str, Any]:
        after = self.after_scheduler
        return {"after_scheduler": None if after is None else after.state_dict()}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        sub = state.get("after_scheduler")
        if (sub is None) != (self.after_scheduler is None):
            raise ValueError(
                "state_dict and scheduler disagree on the presence of an after_scheduler"
            )
        if self.after_scheduler is not None:
            self.after_scheduler._load(sub)


def _warn_no_metric() -> None:
    warnings.warn(
        "ReduceLROnPlateau.step() called without the monitored metric; learning rate "
        "unchanged (call scheduler.step(val_loss))",
        RuntimeWarning,
        stacklevel=3,
    )


class OneCycleLR(LRScheduler):
    """The 1cycle policy, with learning-rate values identical to PyTorch's ``OneCycleLR``.

    With ``initial_lr = max_lr / div_factor`` and ``min_lr = initial_lr / final_div_factor``,
    the schedule is piecewise annealed between phase boundaries (PyTorch's, including the
    ``- 1`` offsets; the rate peaks at step ``pct_start * total_steps - 1``):

    * two phases: ``initial_lr -> max_lr`` on ``[0, pct_start*total_steps - 1]``, then
      ``max_lr -> min_lr`` until ``total_steps - 1``;
    * ``three_phase=True``: ``initial_lr -> max_lr -> initial_lr`` (the second phase ends at
      ``2*pct_start*total_steps - 2``), then ``initial_lr -> min_lr`` until ``total_steps - 1``.

    Inside a phase from step ``s`` to ``e`` with ``p = (t - s) / (e - s)``, the ``'cos'``
    strategy gives ``end + (start - end) / 2 * (cos(pi p) + 1)`` and ``'linear'`` gives
    ``(end - start) * p + start``. As in PyTorch, step ``total_steps`` is still allowed (it
    extrapolates the last phase) and any later step raises :class:`ValueError`.

    Like PyTorch, the optimizer is set to ``initial_lr`` at construction and ``base_lr`` is set
    to ``initial_lr`` (the optimizer's previous learning rate is irrelevant). Momentum is not
    cycled (the optimizer interface only exposes the learning rate). Unlike PyTorch,
    configurations with an empty or negative-length phase (e.g. ``pct_start * total_steps <=
    1``), which PyTorch turns into a division by zero or a schedule that never reaches
    ``max_lr``, raise :class:`ValueError`.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        max_lr: peak learning rate, ``> 0``.
        total_steps: number of steps in the cycle, integer ``>= 1``.
        pct_start: fraction of the cycle spent increasing the rate, in ``[0, 1]``.
        anneal_strategy: ``'cos'`` or ``'linear'``.
        div_factor: ``initial_lr = max_lr / div_factor``, ``> 0``.
        final_div_factor: ``min_lr = initial_lr / final_div_factor``, ``> 0``.
        three_phase: use the symmetric three-phase variant.
    """

    _HPARAMS = (
        "max_lr",
        "total_steps",
        "pct_start",
        "anneal_strategy",
        "div_factor",
        "final_div_factor",
        "three_phase",
    )

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        max_lr: float,
        total_steps: int,
        pct_start: float = 0.3,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
    ) -> None:
        super().__init__(optimizer)
        self._configure(
            max_lr=max_lr,
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy=anneal_strategy,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            three_phase=three_phase,
        )
        self.base_lr = self.initial_lr
        self._restart()

    def _configure(
        self,
        *,
        max_lr: float,
        total_steps: int,
        pct_start: float,
        anneal_strategy: str,
        div_factor: float,
        final_div_factor: float,
        three_phase: bool,
    ) -> None:
        max_lr = _check_real("max_lr", max_lr, gt=0.0)
        total_steps = _check_int("total_steps", total_steps, minimum=1)
        pct_start = _check_real("pct_start", pct_start, ge=0.0, le=1.0)
        anneal_strategy = _check_choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
        div_factor = _check_real("div_factor", div_factor, gt=0.0)
        final_div_factor = _check_real("final_div_factor", final_div_factor, gt=0.0)
        if not isinstance(three_phase, bool):
            raise ValueError(f"three_phase must be a bool, got {three_phase!r}")

        initial_lr = max_lr / div_factor
        min_lr = initial_lr / final_div_factor
        # (end_step, start_lr, end_lr) with torch's exact arithmetic for the boundaries
        if three_phase:
            phases = [
                (float(pct_start * total_steps) - 1, initial_lr, max_lr),
                (float(2 * pct_start * total_steps) - 2, max_lr, initial_lr),
                (float(total_steps - 1), initial_lr, min_lr),
            ]
        else:
            phases = [
                (float(pct_start * total_steps) - 1, initial_lr, max_lr),
                (float(total_steps - 1), max_lr, min_lr),
            ]
        start = 0.0
        for i, (end, _, _) in enumerate(phases):
            if not end > start:
                raise ValueError(
                    f"pct_start={pct_start} and total_steps={total_steps} give an empty or "
                    f"negative-length phase {i} (from step {start} to {end}); increase "
                    f"total_steps or choose pct_start so that every phase lasts > 0 steps"
                )
            start = end

        self.max_lr, self.total_steps, self.pct_start = max_lr, total_steps, pct_start
        self.anneal_strategy, self.div_factor = anneal_strategy, div_factor
        self.final_div_factor, self.three_phase = final_div_factor, three_phase
        self.initial_lr, self.min_lr = initial_lr, min_lr
        self._phases = phases

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            cos_out = math.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        return (end - start) * pct + start

    def _lr_at(self, t: int) -> float:
        if t > self.total_steps:
            raise ValueError(
                f"Tried to step {t} times. The specified number of total steps is "
                f"{self.total_steps}"
            )
        start_step = 0.0
        last = len(self._phases) - 1
        for i, (end_step, start_lr, end_lr) in enumerate(self._phases):
            if t <= end_step or i == last:
                pct = (t - start_step) / (end_step - start_step)
                return self._anneal(start_lr, end_lr, pct)
            start_step = end_step
        raise AssertionError("unreachable")  # pragma: no cover

    def _rebase(self, lr: float) -> None:
        """No-op: the one-cycle schedule is defined by ``max_lr``, not by ``base_lr``."""


# --------------------------------------------------------------------------------------------
# composition
# --------------------------------------------------------------------------------------------


class SequentialLR(LRScheduler):
    """Run several schedulers one after another, switching at the given milestones.

    Like PyTorch's ``SequentialLR``: with ``milestones = [m_1, ..., m_{k-1}]`` (strictly
    increasing), child ``i`` is active for ``m_i <= t < m_{i+1}`` (``m_0 = 0``) and restarts
    its own step counter at ``0`` on its milestone, so

    .. math:: \\eta_t = \\text{child}_i.\\text{get\\_lr\\_at}(t - m_i).

    As in PyTorch (where every scheduler on an optimizer shares the optimizer's ``initial_lr``),
    every child is **re-based to** ``schedulers[0].base_lr`` (the learning rate the optimizer
    had before the first child was constructed), because constructing a child may already have
    changed the optimizer's learning rate (e.g. a warm-up sets ``start_lr``).

    Unlike PyTorch, a child may be a :class:`ReduceLROnPlateau` (or a composite containing
    one). ``step(metric)`` forwards ``metric`` to the active child if it needs one (otherwise
    the metric is ignored). On its milestone a plateau child restarts like any other child: its
    learning rate becomes ``base_lr``, ``best``/``num_bad_epochs``/``cooldown_counter`` are
    reset, and the metric passed on that step is *not* observed (it measures the previous
    phase). On every later step the metric is required (:class:`TypeError` otherwise).
    :meth:`get_lr_at` raises :class:`NotImplementedError` for steps in a plateau phase.

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        schedulers: at least one distinct scheduler, all on ``optimizer``.
        milestones: ``len(schedulers) - 1`` strictly increasing positive integers.
    """

    _HPARAMS = ("milestones",)

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        schedulers: Sequence[LRScheduler],
        milestones: Sequence[int],
    ) -> None:
        super().__init__(optimizer)
        children = list(schedulers)
        if not children:
            raise ValueError("schedulers must contain at least one scheduler")
        for i, child in enumerate(children):
            _check_child(type(self).__name__, optimizer, child, f"schedulers[{i}]")
        if len({id(c) for c in children}) != len(children):
            raise ValueError("schedulers must be distinct objects")
        self.schedulers: list[LRScheduler] = children
        self._configure(milestones=milestones)
        self._rebase(children[0].base_lr)
        self._restart()

    def _configure(self, *, milestones: Sequence[int]) -> None:
        ms = _check_milestones("milestones", milestones)
        if len(ms) != len(self.schedulers) - 1:
            raise ValueError(
                f"milestones must have len(schedulers) - 1 = {len(self.schedulers) - 1} "
                f"entries, got {len(ms)}"
            )
        self.milestones = ms

    @property
    def requires_metric(self) -> bool:
        return any(c.requires_metric for c in self.schedulers)

    def _locate(self, t: int) -> tuple[int, int]:
        idx = bisect_right(self.milestones, t)
        start = self.milestones[idx - 1] if idx > 0 else 0
        return idx, t - start

    def _lr_at(self, t: int) -> float:
        idx, local = self._locate(t)
        return self.schedulers[idx].get_lr_at(local)

    def _rebase(self, lr: float) -> None:
        self.base_lr = float(lr)
        for child in self.schedulers:
            child._rebase(lr)

    def _reset_state(self) -> None:
        self.last_step = 0
        for child in self.schedulers:
            child._reset_state()
        self._last_lr = self.schedulers[0].get_last_lr()

    def step(self, metric: float | None = None) -> None:  # type: ignore[override]
        """Advance one step; ``metric`` goes to the active child if it is metric-driven."""
        t = self.last_step + 1
        idx, local = self._locate(t)
        child = self.schedulers[idx]
        if local == 0:
            child._restart()
        elif metric is None and child.requires_metric:
            _warn_no_metric()  # nothing to observe: nothing advances
            return
        else:
            child._advance(metric)
        self.last_step = t
        self._last_lr = child.get_last_lr()

    def _advance(self, metric: float | None) -> None:
        self.step(metric)

    def _extra_state(self) -> dict[str, Any]:
        return {"schedulers": [c.state_dict() for c in self.schedulers]}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        subs = state.get("schedulers")
        if not isinstance(subs, Sequence) or len(subs) != len(self.schedulers):
            raise ValueError(f"state_dict must hold {len(self.schedulers)} child scheduler states")
        for child, sub in zip(self.schedulers, subs, strict=True):
            child._load(sub)
