"""Mechanic (Cutkosky, Defazio & Mehta, 2023): a learned scale of any base optimizer's
updates, as ``optax.contrib.mechanize``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .base import _without_none
from .checks import check_int, check_positive, describe, to_float
from .outer_wrapper import OuterWrapper, array, check_base, check_grads, copied, vdot
from .state import OptimizerState

#: Mechanic's scalars, one value per beta each (state.values "mechanic_r0", ...)
_VECTORS = ("r", "m", "v", "s")
#: the slot of the reference point x0 (beside the base optimizer's slots)
X0 = "mechanic_x0"


def _check_betas(betas: Any) -> tuple[float, ...]:
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or not betas:
        raise TypeError(f"betas must be a non-empty sequence of numbers, got {describe(betas)}")
    out = tuple(to_float(f"betas[{i}]", b) for i, b in enumerate(betas))
    bad = [b for b in out if not 0 <= b < 1]
    if bad:
        raise ValueError(f"betas must be in [0, 1), got {describe(bad[0])}")
    return out


class Mechanize(OuterWrapper):
    """Mechanic around ``base_optimizer`` (any optimizer here but LBFGS; give it the
    learning rate you would schedule, 1.0 for a constant one), equal to
    ``optax.contrib.mechanize`` (0.2.8) around the same base. Per step ``t`` (params ``x``,
    gradients ``g``, the base optimizer's step ``u = base(x, g) − x``)::

        x0 = x on the first step (then kept)        S = Σ s (over the betas)
        g̃ = g + weight_decay · S · ‖g‖ / (‖x‖ + eps) · x
        Δ = (x0 − x) / (S + eps) − u                 h = ⟨g̃, (x0 − x)/(S + eps)⟩
        per beta β_i (1 − 0.1^i, i = 1..num_betas, or ``betas``):
            m ← max(β·m, |h| + eps)      v ← β²·v + h²      r ← β·r + clip(h, ±m_old)·s
            s ← (s_init/num_betas · m + max(r, 0)) / (√v + eps)
        x ← x0 − Σ s · Δ

    ‖·‖ and ⟨·,·⟩ are global over the parameters given gradients: ``gradients`` may leave
    some out (those a loss does not reach), as the authors' torch ``mechanize`` treats a
    ``.grad`` None: they are in neither ‖g‖, ‖x‖ nor ``h``, the base optimizer's step leaves
    them out and so does Mechanic's (values and slots as they were; the caller counts their
    missed step, as :func:`~mithril.utils.training.make_train_step` does); ``x0`` holds every
    parameter's value at the first step. The base optimizer's state, learning rate (schedulers drive it), parameter
    groups, weight decay and ``nonfinite`` are its own; a step it skips (``nonfinite="skip"``)
    is skipped here too (params and Mechanic's scalars unchanged). Its EMA / SWA
    (``ema_decay``, ``swa_start``) average its own iterate ``x + u``, not the ``x0 + s·Δ``
    returned here (as under ScheduleFree): average the returned params yourself (e.g. a
    ``torch.optim.swa_utils.AveragedModel`` of them) for the wrapper's. The state is the base
    optimizer's (under ``"Mechanize"``) with Mechanic's added: the slot ``"mechanic_x0"``
    and the values ``"mechanic_count"``, ``"mechanic_r0"`` … ``"mechanic_s{k-1}"``
    (:meth:`vectors` reads ``r``, ``m``, ``v``, ``s``), which ``state_dict``, checkpoints and
    the torch drop-in keep with the base's. The scalars are float64 on the host (optax keeps
    them in the params' dtype: float32 params differ by float32 rounding). A call that raises (a missing or
    misshapen or unknown gradient) changes neither the params nor the state.
    """

    OWN = ("weight_decay", "eps", "s_init", "betas")

    def __init__(self, base_optimizer: Any, weight_decay: float = 1e-2, eps: float = 1e-8,
                 s_init: float = 1e-6, num_betas: int = 6,
                 betas: Sequence[float] | None = None) -> None:
        self.__dict__["base_optimizer"] = check_base(base_optimizer, "Mechanize")
        self.__dict__["weight_decay"] = check_positive("weight_decay", weight_decay)
        self.eps = check_positive("eps", eps)
        self.s_init = check_positive("s_init", s_init)
        n = check_int("num_betas", num_betas, 1, 64)
        self.betas = (tuple(1.0 - 0.1 ** i for i in range(1, n + 1)) if betas is None
                      else _check_betas(betas))
        self._backend = base_optimizer._backend

    def check_own(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        checks = {"weight_decay": lambda v: check_positive("weight_decay", v),
                  "eps": lambda v: check_positive("eps", v),
                  "s_init": lambda v: check_positive("s_init", v), "betas": _check_betas}
        return {k: checks[k](v) for k, v in hp.items() if k in checks}

    own_slots = (X0,)

    def own_values(self) -> tuple[str, ...]:
        return ("mechanic_count", *(f"mechanic_{k}{i}" for k in _VECTORS
                                    for i in range(len(self.betas))))

    def checked_value(self, name: str, value: Any) -> float:
        v = super().checked_value(name, value)
        if name == "mechanic_count" and not (v >= 0 and v.is_integer()):
            raise ValueError(f"state dict value 'mechanic_count' must be a count, got "
                             f"{describe(value)}")
        return v

    def check_scalars(self, names: Any) -> None:
        """Refuse state values (``names``) holding Mechanic's scalars for other betas than
        this Mechanize's (its ``betas`` changed since ``init``)."""
        have = {k for k in names if k.startswith("mechanic_")}
        if have != set(self.own_values()):
            raise ValueError(f"state holds Mechanic's scalars for {(len(have) - 1) // 4} betas, "
                             f"this Mechanize has {len(self.betas)} (betas changed since init?)")

    def init(self, params: Mapping[str, Any]) -> OptimizerState:
        """The base optimizer's state plus Mechanic's: the slot ``x0`` a copy of ``params``
        (replaced by the params of the first update, as optax's), and the values ``s =
        s_init``, ``r = m = v = 0`` (per beta) and the count."""
        state = super().init(params)
        state.slots[X0] = _flat(state, params)
        state.values.update(dict.fromkeys(self.own_values(), 0.0))
        self._set_vectors(state, {"s": np.full(len(self.betas), self.s_init)})
        return state

    def vectors(self, state: OptimizerState) -> dict[str, np.ndarray]:
        """Mechanic's ``r``, ``m``, ``v``, ``s`` (one float64 per beta) in ``state``."""
        k = len(self.betas)
        return {v: np.array([state.values[f"mechanic_{v}{i}"] for i in range(k)])
                for v in _VECTORS}

    @staticmethod
    def _set_vectors(state: OptimizerState, vectors: Mapping[str, np.ndarray]) -> None:
        state.values.update({f"mechanic_{v}{i}": float(x) for v, a in vectors.items()
                             for i, x in enumerate(a)})

    def update(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
               state: OptimizerState) -> tuple[dict[str, Any], OptimizerState]:
        """One Mechanic step (class docs); on any error neither ``params`` nor ``state``
        has changed."""
        gradients = _without_none(gradients)  # (None: no gradient this step)
        check_grads(self, params, gradients, state, "gradients")
        self.check_scalars(state.values)
        mech = self.vectors(state)
        first = state.values["mechanic_count"] == 0
        x0 = {n: copied(p) for n, p in params.items()} if first else state.slot(X0)
        s_sum = float(mech["s"].sum())
        eps, wd = self.eps, self.weight_decay
        with np.errstate(all="ignore"):
            # (over the parameters given gradients: the others sit this step out)
            given = {n: params[n] for n in gradients}
            coef = wd * s_sum * math.sqrt(vdot(gradients, gradients)) / (
                math.sqrt(vdot(given, given)) + eps)
            prev = {n: (x0[n] - p) / (s_sum + eps) for n, p in given.items()}
            h = vdot({n: g + coef * params[n] for n, g in gradients.items()}, prev)
            old = {n: copied(p) for n, p in params.items()}  # (the base step may write them)
        new, state = self.base_update(params, gradients, state)
        if state.last_step_skipped:  # (the base skipped: nothing changed, nor here)
            return dict(old), state
        betas = np.array(self.betas)
        m = np.maximum(betas * mech["m"], abs(h) + eps)
        v = betas ** 2 * mech["v"] + h * h
        r = betas * mech["r"] + np.clip(h, -mech["m"], mech["m"]) * mech["s"]
        with np.errstate(all="ignore"):
            s = (self.s_init / len(betas) * m + np.maximum(r, 0.0)) / (np.sqrt(v) + eps)
            total = float(s.sum())
            out = {n: array(x0[n] - total * (prev[n] - (new[n] - old[n]))) if n in prev
                   else new[n] for n in old}
        self._set_vectors(state, {"r": r, "m": m, "v": v, "s": s})
        state.values["mechanic_count"] += 1
        if first:
            state.slots[X0] = _flat(state, x0)
        return out, state


def _flat(state: OptimizerState, arrays: Mapping[str, Any]) -> Any:
    """A new flat buffer of ``state``'s layout holding ``arrays`` (one per parameter)."""
    eng = state.engine
    return eng.from_numpy(state.layout.flatten_numpy({n: np.array(eng.to_numpy(a))
                                                      for n, a in arrays.items()}))
