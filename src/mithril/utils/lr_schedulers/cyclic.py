"""Cyclical learning rates: :class:`CyclicLR`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal

from .base import (
    LRScheduler,
    SupportsLearningRate,
    _check_choice,
    _check_int,
    _check_real,
)
from .lambda_lr import _call_number, _check_callable
from .momentum import MomentumCycle

__all__ = ["CyclicLR"]

_MODES = ("triangular", "triangular2", "exp_range")


class CyclicLR(MomentumCycle, LRScheduler):
    """Cyclical learning rates (Smith, 2017), with the values of PyTorch's ``CyclicLR``.

    A cycle lasts ``step_size_up + step_size_down`` steps: the rate rises linearly from
    ``base_lr`` to ``max_lr`` over ``step_size_up`` steps and falls back over
    ``step_size_down``; the amplitude ``max_lr - base_lr`` is scaled by

    * ``'triangular'``: 1;
    * ``'triangular2'``: ``1 / 2**(cycle - 1)`` (halved every cycle; ``cycle`` counts from 1);
    * ``'exp_range'``: ``gamma**t``;
    * ``scale_fn`` (overrides ``mode``): ``scale_fn(cycle)`` for ``scale_mode='cycle'`` or
      ``scale_fn(t)`` for ``scale_mode='iterations'``.

    As in PyTorch the rates are explicit: the optimizer is set to ``base_lr`` at construction,
    ``base_lr`` here *is* the scheduler's ``base_lr`` (the optimizer's previous learning rate is
    irrelevant), and parents such as :class:`SequentialLR` do not re-base it. The arithmetic is
    PyTorch's, so the values are equal bit for bit.

    ``cycle_momentum=True`` cycles the momentum inversely, as PyTorch:
    ``max_momentum - (max_momentum - base_momentum) * scale_factor * scale``, so it is
    ``max_momentum`` where the rate is ``base_lr`` and ``base_momentum`` at the peak. It
    drives the optimizer's ``momentum`` if it has one (SGD, RMSProp), else its ``beta1`` (the
    Adam family: torch's ``betas[0]``); an optimizer with neither raises :class:`ValueError`,
    as in PyTorch, and so does one whose momentum is 0 (build it with momentum > 0). Changing
    the momentum every step never recompiles (it is a per-step scalar of the kernel).
    Differences from PyTorch: the default is ``cycle_momentum=False`` (PyTorch's is
    ``True``); ``scale_fn`` is not saved by ``state_dict`` (a function is not JSON data;
    PyTorch omits plain functions too): build the scheduler with the same function before
    loading.

    Per parameter group (``per_group=True``, or lists for ``base_lr``, ``max_lr``,
    ``base_momentum``, ``max_momentum`` with one entry for the optimizer's own parameters,
    then one per ``param_groups[i]``, as PyTorch takes them): every group cycles between its
    own bounds, equal to PyTorch's on the same groups. Without it, the optimizer's rate
    cycles and the groups follow in proportion (their ``lr_scale``).

    Args:
        optimizer: object with ``get_learning_rate`` / ``set_learning_rate``.
        base_lr: lower bound of the cycle, ``>= 0``.
        max_lr: upper bound of the cycle, ``>= 0``.
        step_size_up: steps of the rising half, a real number ``> 0`` (PyTorch's arithmetic is
            in floats: ``2.5`` is a cycle of 5 steps with ``step_size_down=None``).
        step_size_down: steps of the falling half, real ``>= 0`` (``None``: ``step_size_up``).
        mode: ``'triangular'``, ``'triangular2'`` or ``'exp_range'``.
        gamma: base of ``'exp_range'``, ``>= 0``.
        scale_fn: optional callable returning the amplitude scale (overrides ``mode``).
        scale_mode: ``'cycle'`` or ``'iterations'`` (only used with ``scale_fn``; the modes
            fix it as PyTorch does).
        cycle_momentum: cycle the optimizer's momentum (or beta1) inversely to the rate.
        base_momentum: momentum at the peak rate; default 0.8.
        max_momentum: momentum at ``base_lr``; default 0.9.
        per_group: act on every parameter group with its own bounds (see above).
    """

    _HPARAMS = ("max_lr", "step_size_up", "step_size_down", "mode", "gamma", "scale_mode")
    _GROUP_ARGS = ("base_lr", "max_lr", "base_momentum", "max_momentum")

    def __init__(
        self,
        optimizer: SupportsLearningRate,
        base_lr: float,
        max_lr: float,
        step_size_up: int = 2000,
        step_size_down: int | None = None,
        mode: Literal["triangular", "triangular2", "exp_range"] = "triangular",
        gamma: float = 1.0,
        scale_fn: Callable[[int], float] | None = None,
        scale_mode: Literal["cycle", "iterations"] = "cycle",
        cycle_momentum: bool = False,
        base_momentum: float = 0.8,
        max_momentum: float = 0.9,
    ) -> None:
        super().__init__(optimizer)
        self._init_momentum(optimizer, cycle_momentum, base_momentum, max_momentum)
        lower = _check_real("base_lr", base_lr, ge=0.0)
        self.scale_fn = None if scale_fn is None else _check_callable("scale_fn", scale_fn)
        self._configure(
            max_lr=max_lr,
            step_size_up=step_size_up,
            step_size_down=step_size_down,
            mode=mode,
            gamma=gamma,
            scale_mode=scale_mode,
        )
        self.base_lr = lower
        self._restart()

    def _configure(
        self,
        *,
        max_lr: float,
        step_size_up: int,
        step_size_down: int | None,
        mode: str,
        gamma: float,
        scale_mode: str,
    ) -> None:
        max_lr = _check_real("max_lr", max_lr, ge=0.0)
        up = _step_size("step_size_up", step_size_up)
        if up == 0:
            raise ValueError(f"step_size_up must be > 0, got {up} (torch's CyclicLR divides by "
                             f"zero at step 0)")
        down = None if step_size_down is None else _step_size("step_size_down", step_size_down)
        mode = _check_choice("mode", mode, _MODES)
        gamma = _check_real("gamma", gamma, ge=0.0)
        scale_mode = _check_choice("scale_mode", scale_mode, ("cycle", "iterations"))
        if self.scale_fn is None:  # torch's _init_scale_fn
            scale_mode = "iterations" if mode == "exp_range" else "cycle"
        self.max_lr, self.step_size_up, self.step_size_down = max_lr, up, down
        self.mode, self.gamma, self.scale_mode = mode, gamma, scale_mode
        # torch's arithmetic
        up_f = float(up)
        down_f = float(down) if down is not None else up_f
        self.total_size = up_f + down_f
        self.step_ratio = up_f / self.total_size

    def _scale(self, x: int) -> float:
        if self.scale_fn is not None:
            return _call_number("scale_fn", self.scale_fn, x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            try:
                return 1 / (2.0 ** (x - 1))
            except OverflowError:  # cycle > 1025: the amplitude has vanished
                return 0.0
        return self.gamma**x

    def _position(self, t: int) -> tuple[int, float]:
        # same evaluation order as torch's CyclicLR.get_lr
        cycle = math.floor(1 + t / self.total_size)
        x = 1.0 + t / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor = x / self.step_ratio
        else:
            scale_factor = (x - 1) / (self.step_ratio - 1)
        return cycle, scale_factor

    def _lr_at(self, t: int) -> float:
        cycle, scale_factor = self._position(t)
        base_height = (self.max_lr - self.base_lr) * scale_factor
        if self.scale_mode == "cycle":
            return self.base_lr + base_height * self._scale(cycle)
        return self.base_lr + base_height * self._scale(t)

    def _momentum_at(self, t: int) -> float:
        cycle, scale_factor = self._position(t)
        base_height = (self.max_momentum - self.base_momentum) * scale_factor
        if self.scale_mode == "cycle":
            return self.max_momentum - base_height * self._scale(cycle)
        return self.max_momentum - base_height * self._scale(t)

    def _set_hyperparameter(self, name: str, value: Any) -> None:
        if name == "base_lr":  # (the lower bound: every lane's, or a list, as max_lr)
            self.base_lr = _check_real("base_lr", value, ge=0.0)
            return
        if name != "scale_fn":
            super()._set_hyperparameter(name, value)
            return
        # why: set as a plain attribute it was unchecked (a string failed at the next step)
        # and reached the optimizer's own lane only, per group
        self.scale_fn = None if value is None else _check_callable("scale_fn", value)
        # (without one, the mode fixes scale_mode again, as the constructor)
        self._configure(**{n: getattr(self, n) for n in self._HPARAMS})

    def _rebase(self, lr: float) -> None:
        """No-op: the cycle's bounds are explicit (``base_lr``, ``max_lr``)."""

    def _extra_state(self) -> dict[str, Any]:
        return {"custom_scale_fn": self.scale_fn is not None, **self._momentum_state()}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        self._load_momentum(state)
        custom = state.get("custom_scale_fn")
        if not isinstance(custom, bool):
            raise ValueError(f"state_dict custom_scale_fn must be a bool, got {custom!r}")
        if custom != (self.scale_fn is not None):
            raise ValueError(
                "state_dict and scheduler disagree on custom_scale_fn (the state was saved "
                f"{'with' if custom else 'without'} a scale_fn; scale_fn is not saved: build "
                "the scheduler with the same one)"
            )


def _step_size(name: str, value: Any) -> int | float:
    """A half cycle's length ``>= 0``: a real number, as torch computes in floats (an integer
    is kept one, as given)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return _check_int(name, value, minimum=0)
    return _check_real(name, value, ge=0.0)
