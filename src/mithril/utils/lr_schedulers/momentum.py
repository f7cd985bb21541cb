"""Momentum cycling (torch's ``cycle_momentum``), shared by :class:`OneCycleLR` and
:class:`CyclicLR`: which hyperparameter it drives, its bounds and their state-dict entries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..optimizers.checks import describe
from .base import _check_real
from .per_group import _hyperparameter_owner


def _momentum_handle(owner: str, optimizer: Any) -> Any:
    """The handle ``cycle_momentum`` drives, by torch's rule: the optimizer's ``momentum``
    if it has one (SGD, RMSProp), else its ``beta1`` (torch's ``betas[0]``: the Adam
    family); of the same group when ``optimizer`` is a group's handle. ``ValueError`` naming
    the optimizer if it has neither (torch refuses such optimizers too)."""
    from ..optimizers.groups import Hyperparameter

    if isinstance(optimizer, Hyperparameter):
        opt, group = optimizer.optimizer, optimizer.group
        if optimizer.name in ("momentum", "beta1"):
            raise ValueError(f"{owner}: cycle_momentum=True, but the scheduler already drives "
                             f"{optimizer!r}")
    else:  # (an Accumulate's: the wrapped optimizer's)
        opt, group = _hyperparameter_owner(optimizer), None
    hp: Mapping[str, Any] = {}
    if callable(getattr(opt, "hyperparameter", None)) and \
            callable(getattr(opt, "hyperparameters", None)):
        # (a Lookahead's are its inner optimizer's too)
        hp = getattr(opt, "flat_hyperparameters", opt.hyperparameters)()
    name = "momentum" if "momentum" in hp else "beta1" if "beta1" in hp else None
    if name is None:
        raise ValueError(f"{owner}: cycle_momentum=True needs an optimizer with a momentum or "
                         f"beta1 hyperparameter (torch's rule: momentum, else betas[0]); "
                         f"{type(opt).__name__} has neither")
    return opt.hyperparameter(name, group=group)


class MomentumCycle:
    """Momentum cycling of :class:`OneCycleLR` and :class:`CyclicLR` (torch's
    ``cycle_momentum``): the bounds, the handle they set and their state-dict entries. The
    class defines ``_momentum_at(t)``."""

    _momentum: Any
    cycle_momentum: bool
    base_momentum: float
    max_momentum: float

    def _init_momentum(self, optimizer: Any, cycle_momentum: Any, base_momentum: Any,
                       max_momentum: Any) -> None:
        owner = type(self).__name__
        if not isinstance(cycle_momentum, bool):
            raise ValueError(f"cycle_momentum must be a bool, got {describe(cycle_momentum)}")
        self._momentum = _momentum_handle(owner, optimizer) if cycle_momentum else None
        self.cycle_momentum = cycle_momentum
        self._set_momentum_bounds(base_momentum, max_momentum)

    @property
    def momentum_hyperparameter(self) -> str | None:
        """``"momentum"`` or ``"beta1"``: what the cycle drives (None without cycling)."""
        return None if self._momentum is None else self._momentum.name

    def _set_momentum_bounds(self, base: Any, top: Any) -> None:
        base = _check_real("base_momentum", base)
        top = _check_real("max_momentum", top)
        if self._momentum is not None:  # the optimizer's own checks, before any step
            for name, value in (("base_momentum", base), ("max_momentum", top)):
                try:
                    self._momentum.check(value)
                except (ValueError, TypeError) as e:
                    raise type(e)(f"{type(self).__name__}: {name}={value}: {e}") from None
        self.base_momentum, self.max_momentum = base, top

    def _set_hyperparameter(self, name: str, value: Any) -> None:
        if name == "base_momentum":
            self._set_momentum_bounds(value, self.max_momentum)
        elif name == "max_momentum":
            self._set_momentum_bounds(self.base_momentum, value)
        else:
            super()._set_hyperparameter(name, value)  # type: ignore[misc]

    def _extra_targets(self, t: int) -> list[tuple[Any, float]]:
        if self._momentum is None:
            return []
        return [(self._momentum, self._momentum_at(t))]

    def _momentum_at(self, t: int) -> float:
        raise NotImplementedError

    def _momentum_state(self) -> dict[str, Any]:
        if not self.cycle_momentum:
            return {"cycle_momentum": False}
        return {"cycle_momentum": True, "base_momentum": self.base_momentum,
                "max_momentum": self.max_momentum}

    def _load_momentum(self, state: Mapping[str, Any]) -> None:
        cycle = state.get("cycle_momentum", False)  # absent: saved before momentum cycling
        if not isinstance(cycle, bool):
            raise ValueError(f"state_dict cycle_momentum must be a bool, got {describe(cycle)}")
        if cycle != self.cycle_momentum:
            raise ValueError(f"state_dict was saved with cycle_momentum={cycle}, but this "
                             f"{type(self).__name__} has cycle_momentum={self.cycle_momentum}: "
                             f"build it as the saved one was")
        if cycle:
            for k in ("base_momentum", "max_momentum"):
                if k not in state:
                    raise ValueError(f"state_dict for {type(self).__name__} is missing key {k!r}")
            self._set_momentum_bounds(state["base_momentum"], state["max_momentum"])
