"""The rows Muon's step gives the tensors it does not orthogonalize with torch's math: the
fallback optimizer's (:class:`_FallbackRow`) and MLX's per-tensor update (:func:`_mlx_update`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import muon_optax as _mo
from .base import Optimizer
from .groups import GroupsMixin
from .muon_newton_schulz import newton_schulz
from .tensorwise import NumpyOps

if TYPE_CHECKING:
    from .muon import Muon

#: the prefix of the fallback optimizer's slots in Muon's state
PREFIX = "fallback_"


class _FallbackRow:
    """The fallback optimizer (one of its groups) updating one tensor inside Muon's step."""

    #: the steps its tensor had no gradient at (``OptimizerState.missed``): its rules count
    #: the others only, as the optimizer's own rows do
    missed = 0
    #: its Muon group's ``step_offset`` (joined after that many steps: :meth:`row_step`)
    _step_offset = 0

    def __init__(self, fb: Optimizer, owner: Muon, group: tuple[int | None, bool] = (None, True),
                 overrides: Mapping[str, Any] | None = None) -> None:
        self.fb = fb
        # (for a traced program: the fallback's group of this row, (index, decays), what
        # it overrides, and the learning rate's factors, Muon's ratio and the group's)
        self.group, self.overrides = group, set(overrides or ())
        self.lr_ratio = owner.fallback_lr_ratio
        self.follows_epsilon = _mo.follows(owner.fallback)  # (a traced "epsilon" is its too)
        self.lr_scale = float((overrides or {}).get("lr_scale", 1.0))
        self.learning_rate, self.weight_decay = fb.learning_rate, fb.weight_decay
        self.decoupled_weight_decay = fb.decoupled_weight_decay
        self.weight_decay_in_math = fb.weight_decay_in_math
        # whole-step options: Muon's
        self.clip_value, self.ema_decay = owner.clip_value, owner.ema_decay
        self.clip_tensor_norm, self.clip_block_rms = owner.clip_tensor_norm, owner.clip_block_rms
        self.ema_every, self.swa_start = owner.ema_every, owner.swa_start
        self.ema_start = owner.ema_start

    def update_slots(self) -> tuple[str, ...]:
        return tuple(PREFIX + s for s in self.fb.slot_names())

    def row_step(self, t: Any) -> Any:
        """The step as its Muon group counts it, ``t − step_offset``
        (:meth:`~.groups.GroupsMixin.row_step`)."""
        return GroupsMixin.row_step(self, t)

    def scalars(self, step: int) -> tuple[float, ...]:
        return self.fb.scalars(step - self.missed)

    def tensor_update(self, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                      scalars: tuple[float, ...], name: str) -> tuple[Any, dict[str, Any]]:
        own = self.fb.slot_names()
        out = self.fb.kernel_math()(p, g, *(slots[PREFIX + s] for s in own), *scalars)
        return out[0], {PREFIX + s: v for s, v in zip(own, out[1:])}


def optax_group_rows(owner: Muon, rows: list[Any], out: list[Any],
                     where: Mapping[str, int], names: Sequence[str]) -> list[Any]:
    """``convention="optax"``: what optax's Muon shares with its adamw branch reaches the
    fallback's tensors of a Muon group too, as ``optax.partition`` over one
    ``optax.contrib.muon`` per group does: the group's learning rate (optax's
    ``adam_learning_rate`` defaults to Muon's; ours is it times ``fallback_lr_ratio``) and,
    for a fallback that follows Muon's ``epsilon``, the group's (optax's one ``eps``).
    ``rows``: Muon's own row of each tensor (its group's view), ``out``: the fallback's
    (at ``where[name]``), replaced where the group differs."""
    follows = _mo.follows(owner.fallback)
    lr, made = owner.learning_rate, {}
    for i, n in enumerate(names):
        r, fr = rows[i], out[i]
        if n not in where or r is owner:
            continue
        scale = r.learning_rate / lr if lr else 1.0  # (a group pinned at Muon's 0: no ratio)
        eps = r.epsilon if follows else fr.fb.epsilon
        if scale == 1.0 and eps == fr.fb.epsilon:
            continue
        key = (id(fr), scale, eps)
        if key not in made:
            fb = copy.copy(fr.fb)
            pinned = r.learning_rate * owner.fallback_lr_ratio * fr.lr_scale
            fb.assign({"learning_rate": fr.fb.learning_rate * scale if lr else pinned,
                       **({"epsilon": eps} if follows else {})})
            row = made[key] = copy.copy(fr)
            row.fb, row.lr_scale = fb, fr.lr_scale * scale
            # (its eps is the group's: a traced optimizer-wide "epsilon" is not its)
            row.follows_epsilon = fr.follows_epsilon and eps == owner.epsilon
        out[i] = made[key]
    return out


#: Muon's options that hold for every parameter, per Muon group: a fallback row takes them
#: from its tensor's Muon group (the fallback itself refuses them)
GROUP_WIDE = ("clip_value", "clip_tensor_norm", "clip_block_rms", "ema_decay", "ema_every",
              "ema_start", "swa_start")


def group_wide_rows(owner: Muon, rows: list[Any], out: list[Any], where: Mapping[str, int],
                    names: Sequence[str]) -> list[Any]:
    """The fallback's rows (``out``, at ``where[name]``) with :data:`GROUP_WIDE` of their
    tensor's Muon group (``rows``: Muon's own row of each tensor): a group's ``ema_start``,
    ``ema_decay`` or ``clip_value`` naming a fallback tensor was left out (its row had
    Muon's own), though clipping and averaging are Muon's for every parameter."""
    made: dict[tuple, Any] = {}
    for i, n in enumerate(names):
        r, fr = rows[i], out[i]
        if n not in where or r is owner:
            continue
        got = tuple((k, getattr(r, k)) for k in GROUP_WIDE)
        if all(getattr(fr, k) == v for k, v in got):
            continue
        key = (id(fr), got)
        if key not in made:
            row = made[key] = copy.copy(fr)
            row.__dict__.update(got)
        out[i] = made[key]
    return out


def _mlx_update(self: Muon, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                lr: float) -> tuple[Any, dict[str, Any]]:
    """MLX's Muon on one tensor (its coupled weight decay is already in ``g``)."""
    buf = xp.lerp(slots["momentum_buffer"], g, 1 - self.momentum)
    u = xp.lerp(g, buf, self.momentum) if self.nesterov else buf
    shape = tuple(u.shape)
    if len(shape) >= 2:  # (MLX: more axes flattened into the columns)
        m = u.reshape(shape[0], -1) if len(shape) > 2 else u
        a, b, c = self.ns_coefficients  # (MLX's addmm takes c as a C++ float: float32)
        u = newton_schulz(xp, m, (a, b, float(np.float32(c))), self.ns_steps, self.epsilon,
                          self.ns_dtype, add_eps=True).reshape(shape)
        lr = lr * math.sqrt(max(1, shape[-2] / shape[-1]))  # of the tensor's last two axes
    return xp.add_scaled(p, u, -lr), {"momentum_buffer": buf}
