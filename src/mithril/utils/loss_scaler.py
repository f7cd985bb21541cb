"""Dynamic loss scaling with ``torch.amp.GradScaler`` semantics: :class:`LossScaler`.

The loss scale ``s`` multiplies the loss gradients before a half-precision backward pass and
``1/s`` the parameter gradients after it. ``update(found_inf)`` after each step halves ``s``
(``backoff_factor``) on inf/NaN and doubles it (``growth_factor``) after ``growth_interval``
finite steps in a row; :class:`~mithril.utils.mixed_precision.MixedPrecisionTrainer` holds one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import KeyMismatchError
from .optimizers.checks import check_flag, check_int, describe, to_float

__all__ = ["LossScaler"]

def refuse_peer_names(who: str, given: Mapping[str, Any], ours: Mapping[str, str]) -> None:
    """A keyword ``who`` does not take (``given``): a TypeError naming ours for Keras'
    ``LossScaleOptimizer`` / torch's ``GradScaler`` spellings (``ours``), as Python's would."""
    if given:
        name = next(iter(given))
        hint = f" (use {ours[name]}=)" if name in ours else ""
        raise TypeError(f"{who}() got an unexpected keyword argument {name!r}{hint}")


#: torch.amp.GradScaler's methods and Keras LossScaleOptimizer's attributes -> ours
_PEER_NAMES = {
    "dynamic_scale": "read scaler.scale (a property, the current scale as a float)",
    "dynamic_growth_steps": "use scaler.growth_interval",
    "initial_scale": "the constructor's init_scale (scaler.scale is the current one)",
    "scale_loss": "MixedPrecisionTrainer.backward_and_update scales the loss gradients",
    "inner_optimizer": "the optimizer is MixedPrecisionTrainer.optimizer",
    "get_scale": "read scaler.scale (a property, the current scale as a float)",
    **{f"get_{k}": f"read scaler.{k}" for k in ("growth_factor", "backoff_factor",
                                                "growth_interval")},
    **{f"set_{k}": f"set scaler.{k} = value (checked as the constructor checks it)"
       for k in ("growth_factor", "backoff_factor", "growth_interval")},
    "is_enabled": "read scaler.dynamic (False: a fixed scale; a step with an inf/NaN gradient "
                  "is still skipped)",
    **dict.fromkeys(("unscale_", "step"), "MixedPrecisionTrainer.backward_and_update scales, "
                    "unscales, checks and steps in one call; scaler.update(found_inf) then "
                    "advances the scale (the trainer calls it)"),
}
_KERAS = frozenset({"dynamic_scale", "dynamic_growth_steps", "initial_scale", "scale_loss",
                    "inner_optimizer"})

#: the constructor's arguments, as its errors name them
_ARGS = ("init_scale", "growth_factor", "backoff_factor",
         "growth_interval", "dynamic", "growth_tracker", "min_scale")

#: scale, growth_factor, backoff_factor, growth_interval, dynamic, growth_tracker, min_scale
_Fields = tuple[np.float32, float, float, int, bool, int, np.float32]


def _item(v: Any) -> Any:
    """A 0-d NumPy / torch / JAX array as its Python number (checked as one); else ``v``."""
    return v.item() if getattr(v, "ndim", None) == 0 and hasattr(v, "item") else v


class LossScaler:
    """Loss scale bookkeeping with ``torch.amp.GradScaler`` semantics.

    ``update(found_inf)`` after every step: on inf/NaN the scale is multiplied by
    ``backoff_factor`` and the growth tracker reset to 0; otherwise the tracker grows by one
    and when it reaches ``growth_interval`` the scale is multiplied by ``growth_factor`` (kept
    only if finite) and the tracker reset. The scale is stored in float32 (as torch), products
    are formed in float64 and rounded to float32 (as torch's ``_amp_update_scale_``).
    ``dynamic=False`` keeps the scale fixed. ``min_scale``: a backoff never takes the scale
    below it (jmp's ``DynamicLossScale(min_loss_scale=1.0)``: ``max(min_scale, s·backoff)``);
    the default 0 is torch's and Keras' (no floor: ~165 overflows in a row reach 0).

    The constructor and :meth:`load_state_dict` apply the same rules: the scale is a number
    > 0 that stays finite and > 0 in float32 (:meth:`load_state_dict` also takes 0.0, which
    the scaler reaches itself after ~165 backoffs in a row, as torch's), ``growth_factor`` a
    finite number > 1, ``backoff_factor`` one in (0, 1), ``growth_interval`` an integer >= 1, ``dynamic`` a bool,
    the growth tracker an integer in ``[0, growth_interval)`` and ``min_scale`` a number in
    ``[0, scale]`` (rounded to float32, a positive one not to 0); so does setting a field
    by attribute (``scaler.growth_interval = 500``). A bad value raises
    ``TypeError`` (not a number / not an integer / not a bool) or ``ValueError`` (out of range,
    too large), naming it, and changes nothing.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 dynamic: bool = True, min_scale: float = 0.0, **peer: Any) -> None:
        refuse_peer_names("LossScaler", peer, {"initial_scale": "init_scale",
                                               "dynamic_growth_steps": "growth_interval"})
        self._set(self._checked(init_scale, growth_factor, backoff_factor, growth_interval,
                                dynamic, 0, min_scale, names=_ARGS, zero_scale=False))

    @classmethod
    def _named(cls, names: tuple[str, ...], *fields: Any) -> LossScaler:
        """A scaler built from ``fields`` (the constructor's, in its order) whose errors name
        the arguments ``names`` (a wrapper's own: the trainer's ``loss_scale``)."""
        self = cls.__new__(cls)
        *head, floor = fields
        *first, last = names
        self._set(cls._checked(*head, 0, floor, names=(*first, "growth_tracker", last),
                               zero_scale=False))
        return self

    @staticmethod
    def _checked(scale: Any, growth_factor: Any, backoff_factor: Any, growth_interval: Any,
                 dynamic: Any, growth_tracker: Any, min_scale: Any, names: tuple[str, ...],
                 zero_scale: bool = True) -> _Fields:
        """All seven fields validated and converted (nothing is stored here). ``zero_scale``:
        a scale of exactly 0.0 is taken - one the scaler reaches itself, backing off through
        float32's subnormals after ~165 non-finite steps in a row, so its state dict must
        load back (torch's ``GradScaler.load_state_dict`` takes it too); only the
        constructor refuses it (a scale 0 asked for is a mistake: every step is skipped)."""
        s = to_float(names[0], scale)
        with np.errstate(over="ignore", under="ignore"):
            s32 = np.float32(s)
        if not (math.isfinite(s) and np.isfinite(s32)
                and ((s > 0 and s32 > 0) or (zero_scale and s == 0))):
            what = "finite and >= 0" if zero_scale else "positive and finite"
            raise ValueError(f"{names[0]} must be {what} in float32 (a positive value must "
                             f"not round to 0), got {describe(scale)}")
        g = to_float(names[1], growth_factor)
        if not (math.isfinite(g) and g > 1.0):
            raise ValueError(f"{names[1]} must be finite and > 1, got {describe(growth_factor)}")
        b = to_float(names[2], backoff_factor)
        if not 0.0 < b < 1.0:
            raise ValueError(f"{names[2]} must be in (0, 1), got {describe(backoff_factor)}")
        interval = check_int(names[3], growth_interval, minimum=1)
        dyn = check_flag(names[4], dynamic)
        tracker = check_int(names[5], growth_tracker, minimum=0)
        if tracker >= interval:
            raise ValueError(f"{names[5]} must be < {names[3]} = {interval}, got {tracker}")
        m = to_float(names[6], min_scale)
        with np.errstate(over="ignore", under="ignore"):
            m32 = np.float32(m)
        if not (math.isfinite(m) and np.isfinite(m32) and m >= 0 and (m == 0 or m32 > 0)):
            raise ValueError(f"{names[6]} must be finite and >= 0 in float32 (a positive value "
                             f"must not round to 0), got {describe(min_scale)}")
        if m32 > s32:
            raise ValueError(f"{names[6]} = {float(m32)} must not exceed {names[0]} = "
                             f"{float(s32)} (backoffs stop at it)")
        return s32, g, b, interval, dyn, tracker, m32

    @property
    def scale(self) -> float:
        """The current loss scale."""
        return float(self._scale)

    def __setattr__(self, name: str, value: Any) -> None:
        """A field set by attribute (``scaler.growth_factor = 4.0``) is checked as the
        constructor checks it (with the others as they are); a bad value changes nothing.
        A peer's name (``dynamic_growth_steps``) raises the AttributeError naming ours."""
        if name in self._FIELDS and "_scale" in self.__dict__:
            fields = [self.__dict__[k] for k in ("_scale", *self._FIELDS)]
            fields[1 + self._FIELDS.index(name)] = value
            self._set(self._checked(*fields, names=tuple(
                f"LossScaler attribute '{k}'" for k in ("scale", *self._FIELDS))))
            return
        if name in _PEER_NAMES:  # (a Keras user's scaler.dynamic_growth_steps = 500 would
            self.__getattr__(name)  # be an attribute nothing reads)
        object.__setattr__(self, name, value)

    _FIELDS = ("growth_factor", "backoff_factor", "growth_interval", "dynamic",
               "growth_tracker", "min_scale")

    def __getattr__(self, name: str) -> Any:
        """(Only for a name not found.) ``torch.amp.GradScaler``'s getters, setters and
        steps (a torch loop's ``scaler.get_scale()``) and Keras ``LossScaleOptimizer``'s
        attributes (``dynamic_scale``) raise an AttributeError naming ours."""
        hint = _PEER_NAMES.get(name)
        if hint is None:
            raise AttributeError(f"'LossScaler' object has no attribute {name!r}")
        peer = "Keras LossScaleOptimizer" if name in _KERAS else "torch.amp.GradScaler"
        raise AttributeError(f"LossScaler has no {name} ({peer}'s): {hint}")

    def record(self, found_inf: bool) -> None:
        """Note one step's overflow for the next :meth:`update` called without one (torch's
        per-optimizer ``found_inf`` that ``scaler.update()`` reads): several steps recorded
        before an update count as one, overflowing if any did.
        ``MixedPrecisionTrainer.backward_and_update(..., update_scale=False)`` records its own."""
        found_inf = self._found_inf("record", found_inf)
        self.__dict__["_recorded"] = self.__dict__.get("_recorded") or found_inf

    @staticmethod
    def _found_inf(where: str, found_inf: Any) -> bool:
        if not isinstance(found_inf, (bool, np.bool_)):
            raise TypeError(f"LossScaler.{where}(found_inf): found_inf must be a bool (whether "
                            f"the step's gradients had an inf/NaN), got {describe(found_inf)}")
        return bool(found_inf)

    def update(self, found_inf: bool | None = None) -> None:
        """Advance after one step; ``found_inf``: the step's gradients had an inf/NaN (a
        bool; torch's ``update(new_scale)`` is :meth:`load_state_dict` here). Without it
        (torch's ``scaler.update()``): the steps :meth:`record` noted since the last update,
        overflowing if any did (a ``ValueError`` if none was, changing nothing). With it,
        the recorded steps count too (an overflow recorded is never dropped: the last of
        several trainers sharing the scaler may update it as usual). Either way the record
        is cleared."""
        recorded = self.__dict__.get("_recorded")
        if found_inf is None:
            if recorded is None:
                raise ValueError("LossScaler.update() without found_inf: no step was recorded "
                                 "since the last update (backward_and_update(..., "
                                 "update_scale=False) or scaler.record(found_inf) records one)")
            found_inf = recorded
        found_inf = self._found_inf("update", found_inf) or bool(recorded)
        self.__dict__["_recorded"] = None
        if not self.dynamic:
            return
        d = self.__dict__  # (the fields stay valid: no checks needed)
        if found_inf:
            d["_scale"] = max(np.float32(float(self._scale) * self.backoff_factor),
                              self.min_scale)
            d["growth_tracker"] = 0
            return
        d["growth_tracker"] += 1
        if self.growth_tracker == self.growth_interval:
            with np.errstate(over="ignore"):
                new = np.float32(float(self._scale) * self.growth_factor)
            if np.isfinite(new):
                d["_scale"] = new
            d["growth_tracker"] = 0

    def state_dict(self) -> dict[str, Any]:
        """GradScaler-style state: scale, factors, interval and growth tracker.

        The tracker is given under both ``growth_tracker`` and torch's ``_growth_tracker``,
        so ``torch.amp.GradScaler(...).load_state_dict(scaler.state_dict())`` works (torch
        reads ``_growth_tracker`` and ignores ``dynamic`` and ``min_scale``, given only when
        not 0); :meth:`load_state_dict` takes either key or both."""
        d = {"scale": self.scale, "growth_factor": self.growth_factor,
             "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
             "dynamic": self.dynamic, "growth_tracker": self.growth_tracker,
             "_growth_tracker": self.growth_tracker}
        if self.min_scale:  # (0, no floor, is left out: torch's layout, older checkpoints')
            d["min_scale"] = float(self.min_scale)
        return d

    _KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "dynamic",
             "growth_tracker", "min_scale")
    #: keys a state dict may leave out (torch's, older checkpoints), and their values then
    _DEFAULTS = {"dynamic": True, "min_scale": 0.0}

    @classmethod
    def _parse_state(cls, d: Any, where: str = "LossScaler state dict"
                     ) -> _Fields:
        """The fields of a :meth:`state_dict`, validated (``dynamic`` may be absent: True;
        ``min_scale`` too: 0).
        The tracker may come as ``growth_tracker`` (older checkpoints), torch's
        ``_growth_tracker`` (``GradScaler.state_dict()``) or both (ours now): each given one
        is checked on its own, and two must agree. A field may be a 0-d array or tensor (a
        dict saved with ``np.savez`` or ``torch.save`` of tensors, torch's tracker tensor)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"{where} must be a dict, got {type(d).__name__}")
        missing = [k for k in cls._KEYS if k not in d
                   and k not in ("growth_tracker", *cls._DEFAULTS)]
        if "growth_tracker" not in d and "_growth_tracker" not in d:  # (either key: name both)
            missing.append("growth_tracker (or torch's _growth_tracker)")
        if missing:
            raise KeyMismatchError(f"{where} is missing key(s) {missing}")
        parsed = []
        for key in ("growth_tracker", "_growth_tracker"):
            if key in d:
                names = (*cls._KEYS[:5], key, "min_scale")
                parsed.append(cls._checked(
                    *(_item(d[k]) if k in d else cls._DEFAULTS[k] for k in names),
                    names=tuple(f"{where} '{k}'" for k in names)))
        if len(parsed) == 2 and parsed[0][5] != parsed[1][5]:
            raise ValueError(f"{where} has both 'growth_tracker' = {parsed[0][5]} and torch's "
                             f"'_growth_tracker' = {parsed[1][5]}: which one?")
        return parsed[0]

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; every field is checked (as by the constructor)
        before any is written, so a bad dict changes nothing."""
        self._set(self._parse_state(d))

    def _set(self, fields: _Fields) -> None:
        self.__dict__.update(zip(("_scale", *self._FIELDS), fields, strict=True))

    def __repr__(self) -> str:
        floor = f", min_scale={float(self.min_scale)}" if self.min_scale else ""
        return (f"LossScaler(scale={self.scale}, growth_tracker={self.growth_tracker}, "
                f"dynamic={self.dynamic}{floor})")
