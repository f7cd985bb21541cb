"""Mechanic (Cutkosky, Defazio & Mehta, 2023): a learned scale of any base optimizer's
updates, as ``optax.contrib.mechanize``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import KeyMismatchError, ShapeError
from .checks import check_int, check_positive, describe, to_float
from .outer_wrapper import OuterWrapper, check_base, check_full, copied, vdot
from .serialization import _numeric
from .state import OptimizerState

#: Mechanic's scalars, each one value per beta, then the step count (state.mechanic)
_VECTORS = ("r", "m", "v", "s")
#: the state dict's slot of the reference point x0 (beside the base optimizer's slots)
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

    ‖·‖ and ⟨·,·⟩ are global over every parameter, so every step needs a gradient for every
    parameter. The base optimizer's state, learning rate (schedulers drive it), parameter
    groups, weight decay and ``nonfinite`` are its own; a step it skips (``nonfinite="skip"``)
    is skipped here too (params and Mechanic's scalars unchanged). The state is the base
    optimizer's with Mechanic's scalars (``state.mechanic``: ``r``, ``m``, ``v``, ``s`` per
    beta in float64 and the count) and ``x0`` (``state.mechanic_x0``, per parameter)
    added; ``state_dict`` keeps them as values ``mechanic_r0`` … and the slot
    ``"mechanic_x0"``. The scalars are float64 on the host (optax keeps them in the params'
    dtype: float32 params differ by float32 rounding). A call that raises (a missing or
    misshapen gradient) changes neither the params nor the state.
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

    def init(self, params: Mapping[str, Any]) -> OptimizerState:
        """The base optimizer's state plus Mechanic's: ``x0`` a copy of ``params`` (replaced
        by the params of the first update, as optax's), ``s = s_init``, ``r = m = v = 0``."""
        state = super().init(params)
        k = len(self.betas)
        state.mechanic = {"count": 0, **{n: np.zeros(k) for n in _VECTORS}}
        state.mechanic["s"][:] = self.s_init
        state.mechanic_x0 = {n: copied(p) for n, p in params.items()}
        return state

    def update(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
               state: OptimizerState) -> tuple[dict[str, Any], OptimizerState]:
        """One Mechanic step (class docs); on any error neither ``params`` nor ``state``
        has changed."""
        check_full(self, params, gradients, state, "gradients")
        mech = state.mechanic
        first = mech["count"] == 0
        x0 = {n: copied(p) for n, p in params.items()} if first else state.mechanic_x0
        s_sum = float(mech["s"].sum())
        eps, wd = self.eps, self.weight_decay
        with np.errstate(all="ignore"):
            coef = wd * s_sum * math.sqrt(vdot(gradients, gradients)) / (
                math.sqrt(vdot(params, params)) + eps)
            prev = {n: (x0[n] - p) / (s_sum + eps) for n, p in params.items()}
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
            out = {n: x0[n] - total * (prev[n] - (new[n] - old[n])) for n in old}
        state.mechanic = {"count": mech["count"] + 1, "r": r, "m": m, "v": v, "s": s}
        state.mechanic_x0 = x0
        return out, state

    # -- state dicts: Mechanic's scalars and x0 beside the base optimizer's ---------------
    def state_dict(self, state: OptimizerState | None = None, *, arrays: str = "numpy"
                   ) -> dict[str, Any]:
        out = super().state_dict(state, arrays=arrays)
        if state is not None:
            mech, host = state.mechanic, state.engine.to_numpy
            out["values"] = {**out.get("values", {}), "mechanic_count": mech["count"],
                             **{f"mechanic_{k}{i}": float(x) for k in _VECTORS
                                for i, x in enumerate(mech[k])}}
            x0 = {n: np.array(host(a)) for n, a in state.mechanic_x0.items()}
            if arrays == "torch":
                import torch

                x0 = {n: torch.from_numpy(a) for n, a in x0.items()}
            out["slots"] = {**out["slots"], X0: x0}
        return out

    def load_state_dict(self, d: Mapping[str, Any], params: Mapping[str, Any] | None = None
                        ) -> OptimizerState | None:
        """As the base optimizer's (:class:`OuterWrapper`), Mechanic's scalars and ``x0``
        checked first and restored with the state; on error nothing changes."""
        if params is None or not isinstance(d, Mapping) or "slots" not in d:
            return super().load_state_dict(d, params)
        values, slots = dict(d.get("values") or {}), dict(d.get("slots") or {})
        hp = d.get("hyperparameters")
        k = len(_check_betas(hp["betas"]) if isinstance(hp, Mapping) and "betas" in hp
                else self.betas)
        names = ["mechanic_count", *(f"mechanic_{v}{i}" for v in _VECTORS for i in range(k))]
        missing = [n for n in names if n not in values] + ([X0] if X0 not in slots else [])
        if missing:
            raise KeyError(f"state dict lacks Mechanize's {missing}")
        mech = {v: np.array([to_float(f"state dict value 'mechanic_{v}{i}'",
                                      values.pop(f"mechanic_{v}{i}")) for i in range(k)])
                for v in _VECTORS}
        count = values.pop("mechanic_count")
        count = check_int("state dict value 'mechanic_count'",
                          int(count) if isinstance(count, float) and count.is_integer() else count)
        x0 = _checked_x0(slots.pop(X0), params)
        rest = {**d, "slots": slots, "values": values}
        if not values:
            del rest["values"]
        state = super().load_state_dict(rest, params)
        state.mechanic = {"count": count, **mech}
        state.mechanic_x0 = {n: _like(a, params[n]) for n, a in x0.items()}
        return state


def _checked_x0(saved: Any, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The state dict's ``x0``: exactly the params' names, each a numeric array of its
    parameter's shape (as NumPy arrays)."""
    if not isinstance(saved, Mapping) or saved.keys() != params.keys():
        got = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
        raise KeyMismatchError(f"state dict slot '{X0}' must have exactly the parameters "
                               f"{sorted(params)}, got {got}")
    out = {}
    for n, p in params.items():
        a = _numeric(saved[n], f"state dict slot '{X0}' of '{n}'")
        if a.shape != tuple(p.shape):
            raise ShapeError(f"state dict slot '{X0}' of '{n}' has shape {a.shape}, the "
                             f"parameter {tuple(p.shape)}")
        out[n] = a
    return out


def _like(a: np.ndarray, p: Any) -> Any:
    """``a`` as a new array of ``p``'s backend, dtype (and torch device)."""
    if hasattr(p, "detach"):
        import torch

        return torch.tensor(a, dtype=p.dtype, device=p.device)
    if isinstance(p, np.ndarray):
        return np.array(a, dtype=p.dtype)
    import jax.numpy as jnp

    return jnp.array(a, dtype=p.dtype)
