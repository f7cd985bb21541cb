"""What :func:`~.optax_transform.optax_transformation` takes: the checks of the optimizer
it is given (a mithril optimizer with an update rule, not a wrapper of whole updates, not
``nonfinite="raise"``; its ``mu_dtype`` against the one given), the copy of it the
transformation keeps, and the slots that start as a copy of the params."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

#: the wrappers that run a whole update, and their optax equivalents (what the refusal says)
_WRAPPERS = {
    "Accumulate": "optax.MultiSteps(optax_transformation(acc.optimizer), k, "
                  "accumulator_dtype=<the gradients' dtype>) (its float32 default rounds "
                  "float64 gradients)",
    "SAM": "optax.contrib.sam(optax_transformation(sam.base_optimizer), optax.chain("
           "optax.contrib.normalize(), optax.sgd(rho)), sync_period=2, opaque_mode=True) (SAM(..., eps=0.0))",
    "ScheduleFree": "optax.contrib.schedule_free(optax_transformation(sf.base_optimizer), "
                    "learning_rate, b1=sf.b1, weight_lr_power=sf.weight_lr_power)",
    "Mechanize": "optax.contrib.mechanize(optax_transformation(m.base_optimizer), ...)",
}


def _check_optimizer(optimizer: Any) -> str:
    """``"elementwise"`` or ``"tensorwise"`` (Muon, Adafactor: :mod:`.optax_tensorwise`);
    ``TypeError`` / ``ValueError`` for what cannot be a transformation."""
    from ..utils.accumulation import Accumulate
    from ..utils.optimizers import SAM, Mechanize, ScheduleFree
    from ..utils.optimizers.base import Optimizer
    from .optax_special import classify

    cls, name = type(optimizer), type(optimizer).__name__
    wrapper = next((w.__name__ for w in (Accumulate, SAM, ScheduleFree, Mechanize)
                    if isinstance(optimizer, w)), None)
    if wrapper is not None:  # (a wrapper of a whole update: optax's own around our base)
        raise TypeError(f"{name} overrides update() (it runs its wrapped optimizer's whole "
                        f"update), so it cannot be one optax transformation; in optax: "
                        f"{_WRAPPERS[wrapper]}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optax_transformation needs a mithril optimizer "
                        f"(mithril.utils.optimizers), got {type(optimizer).__name__}")
    kind = classify(optimizer)
    has_math = (cls.kernel_math is not Optimizer.kernel_math or cls.math is not Optimizer.math)
    if kind == "elementwise" and not has_math:
        raise TypeError(f"{name} defines no math (neither math nor kernel_math): nothing to run "
                        f"as an optax transformation")
    if optimizer.nonfinite == "raise":
        raise ValueError(f"{name}(nonfinite='raise') cannot raise inside jax.jit: use "
                         f"nonfinite='skip' (or 'propagate', the default, with "
                         f"optax.apply_if_finite)")
    return kind


def _copied_slots(opt: Any) -> tuple[str, ...]:
    """The slots that start as a copy of the params: the weight averages, and those the
    optimizer's ``init`` copies (Lookahead's slow weights, schedule-free's ``z``, Prodigy's
    ``x0``)."""
    from .optax_special import params_copy_slots

    return (*opt.averaged_slots(), *params_copy_slots(opt))


def _copy_optimizer(optimizer: Any) -> Any:
    """A copy whose later changes (hyperparameters, a Muon's fallback) do not reach it."""
    opt = copy.copy(optimizer)
    for k in ("fallback", "inner"):  # Muon's fallback, Lookahead's inner optimizer
        sub = opt.__dict__.get(k)
        if sub is not None and hasattr(sub, "learning_rate"):
            opt.__dict__[k] = copy.copy(sub)
    return opt


def _own_mu_dtype(opt: Any, given: Any) -> Any:
    """``mu_dtype=`` here, else the optimizer's own (``Adam(mu_dtype="bfloat16")``); both
    given must agree (which one would win is not obvious)."""
    own = getattr(opt, "mu_dtype", None)
    if own is None:
        return given
    if given is None:
        return own

    def name(d: Any) -> str:
        try:
            return np.dtype(d).name
        except TypeError:
            return str(d)

    if name(given) != name(own):
        raise ValueError(f"optax_transformation: mu_dtype={name(given)} but "
                         f"{type(opt).__name__} keeps m in {name(own)} (its mu_dtype): give "
                         f"one of them")
    return given
