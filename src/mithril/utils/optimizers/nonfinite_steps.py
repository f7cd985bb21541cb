"""Non-finite steps of :class:`~.base.Optimizer`: the ``nonfinite=`` policies, the
constructor's check of ``nonfinite`` / ``max_consecutive_skips``, and the mixin that records
a step's outcome in its state (:meth:`NonfiniteStepsMixin._record`) and applies a step after
``max_consecutive_skips`` skipped ones (:meth:`NonfiniteStepsMixin._give_up`).

Non-finite gradients (``nonfinite=``); the global gradient norm of every step is reported
in ``state.last_grad_norm`` under the first three policies:

* ``"propagate"`` (default, torch.optim/optax behaviour): the step is applied as computed.
  The fused kernel measures the gradient norm and probes every new param and slot value
  for inf/NaN in the same pass (no extra traffic; a two-pass optimizer's per-tensor slots
  and values, such as DoG's Σ‖g‖², before its second pass), so a non-finite step is never silent,
  whatever its cause (a non-finite gradient, or finite gradients with, say, ``lr=1e38``):
  a ``RuntimeWarning`` is issued, ``state.num_nonfinite`` grows and, for a non-finite
  gradient, ``state.last_grad_norm`` is inf/NaN. Non-finite values that stay so are
  reported once (``state.nonfinite_values`` is True until a step gives finite values
  again); every non-finite gradient is. (The jitted JAX engine measures the norm in float32,
  or float64 with ``jax_enable_x64``: there, finite gradients whose norm passes ~3.4e38 are
  counted as a non-finite gradient; ``"skip"`` and ``"raise"`` then read the gradients
  themselves; the other engines sum in float64 or read the gradients themselves.)
* ``"skip"``: the step is computed once without being stored, before any write (a
  read-only pass over what the update reads: 16 more bytes per parameter for fp32 Adam);
  if a gradient or any new param/slot value is inf/NaN the step is skipped (so params or
  state that already hold inf/NaN refuse every step until repaired), params and state are
  untouched, ``state.num_skipped`` grows, ``state.last_step_skipped`` is True and
  a ``RuntimeWarning`` is issued. (:class:`~mithril.utils.mixed_precision.MixedPrecisionTrainer`
  skips itself.)
  ``max_consecutive_skips=N`` (None: skip forever) gives up as optax's ``apply_if_finite(inner,
  max_consecutive_errors=N)``: ``state.consecutive_skips`` counts non-finite steps in a row
  (its ``notfinite_count``; a finite step resets it); a step taken with it at ``N`` or more is
  applied as under ``"propagate"`` (a broken run shows NaN params, not silently no training),
  counted in ``num_nonfinite``, not ``num_skipped`` (their sum: its ``total_notfinite``). Optax
  looks at gradients only; here results count too (once params hold NaN, the count grows).
* ``"raise"``: the same check; ``FloatingPointError`` naming the offending parameters,
  nothing changed.
* ``"unchecked"``: the step is applied and nothing is looked at, as torch.optim and optax
  do. On the fused CPU kernel this changes nothing but the warnings (the norm and the probe
  come with the pass); on accelerators it is the fast path: the jitted JAX engine and torch
  on CUDA (torch's own fused kernels on the flat buffers, :mod:`.engines.torch_fused`)
  measure no norm unless ``clip_norm`` needs it (``state.last_grad_norm`` is then a 0-d array
  on the device, else None), probe nothing and read nothing back, so the host never waits
  for the device. Under the other policies they measure, probe and read back every step
  (on CUDA: the gradients' norm and one read of each flat buffer, ~16 B/param on fp32
  Adam's 28, and a synchronisation).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from . import averaging
from .engines.common import is_finite
from .loss_aware import LOSS
from .state import DeviceReport, OptimizerState

#: the ``nonfinite=`` policies (module docs)
NONFINITE = ("skip", "raise", "propagate", "unchecked")


def check_nonfinite(nonfinite: Any, max_consecutive_skips: Any) -> int | None:
    """The constructor's check of ``nonfinite`` and ``max_consecutive_skips`` (which needs
    ``"skip"``); returns ``max_consecutive_skips`` checked (None: skip forever)."""
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if (n := max_consecutive_skips) is not None:
        n = averaging.check_int("max_consecutive_skips", n)
        if nonfinite != "skip":
            raise ValueError(f"max_consecutive_skips={n} needs nonfinite='skip' (got "
                             f"nonfinite={nonfinite!r})")
    return n


def nonfinite_report(norm: Any) -> Any:
    """``norm`` as an engine returns it (a number, or a :class:`~.state.DeviceReport` still
    on the device), reporting the step's results as non-finite."""
    if not isinstance(norm, DeviceReport):
        return norm
    read = norm.read
    return DeviceReport(lambda: (read()[0], False))


class NonfiniteStepsMixin:
    """A step's outcome under the ``nonfinite`` policy, for
    :class:`~mithril.utils.optimizers.Optimizer` (whose ``update`` calls these)."""

    def _record(self, state: OptimizerState, t: int, new_params: dict[str, Any], ok: bool,
                norm: Any, finite: bool) -> tuple[dict[str, Any], OptimizerState]:
        """The step's outcome in ``state`` (its count, the norm, skipped and non-finite
        steps, with their warnings); returns what ``update`` returns. ``norm`` a
        :class:`~.state.DeviceReport` (an applied ``"propagate"`` step whose norm and probe
        are still on the device): read later (:meth:`~.state.OptimizerState.settle`)."""
        name = type(self).__name__
        if isinstance(norm, DeviceReport):
            state.step, state.last_step_skipped = t, False
            averaging.advance(self, state, t)  # (the averages' update counts)
            state.defer(norm, t, name)
            return new_params, state
        state.last_grad_norm = norm
        state.last_step_skipped = not ok
        if ok:
            state.step, state.consecutive_skips = t, 0
            averaging.advance(self, state, t)
            if self.nonfinite != "unchecked":  # nothing looked at (engines may not measure)
                state.note_applied(name, norm, finite)
            return new_params, state
        state.num_skipped += 1
        state.consecutive_skips += 1
        what = (f"non-finite gradient (global norm {norm})" if not is_finite(norm) else
                "the step would give non-finite params or state")
        warnings.warn(f"{name}: {what}; step skipped, params and optimizer state unchanged",
                      RuntimeWarning, stacklevel=3)
        return new_params, state

    def _give_up(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
                 state: OptimizerState, n: int) -> tuple[dict[str, Any], OptimizerState]:
        """A step after ``n`` or more non-finite ones in a row, applied as under "propagate"."""
        owner, k = self, state.consecutive_skips
        while isinstance(getattr(type(owner), "nonfinite", None), property):
            owner = owner.inner  # (a Lookahead's is its inner's)
        state.fast, owner.__dict__["nonfinite"] = None, "propagate"  # (restored below)
        try:
            new_params, state = self.update(params, gradients, state, **(
                {LOSS: state.values[LOSS]} if self.needs_loss else {}))
        finally:  # (and no recipe made under "propagate" kept)
            owner.__dict__["nonfinite"], state.fast = "skip", None
        state.settle()
        bad = not is_finite(state._last_grad_norm) or state._nonfinite_values
        state.consecutive_skips = k + 1 if bad else 0
        if bad:
            warnings.warn(f"{type(self).__name__}: {k + 1} non-finite steps in a row (max_"
                          f"consecutive_skips={n}): step {state.step} applied", RuntimeWarning, 3)
        return new_params, state
