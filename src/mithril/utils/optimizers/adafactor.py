"""Adafactor (Shazeer & Stern, 2018) as torch.optim.Adafactor: factored second moments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .checks import check_flag, check_positive, describe, to_float
from .tensorwise import NumpyOps, TensorwiseOptimizer


def _check_eps(value: Any) -> tuple[float | None, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"epsilon must be a pair (eps1 or None, eps2), got {describe(value)}")
    eps1 = None if value[0] is None else check_positive("epsilon[0]", value[0])
    return eps1, check_positive("epsilon[1]", value[1])


class Adafactor(TensorwiseOptimizer):
    """Adafactor exactly as ``torch.optim.Adafactor`` (same hyperparameters and defaults:
    ``lr=1e-2``, ``beta2_decay=-0.8``, ``eps=(None, 1e-3)``, ``d=1``, ``weight_decay=0``,
    ``maximize=False``). Per tensor, at step t::

        β̂ = 1 − t^beta2_decay      ρ = min(lr, 1/√t)      α = max(eps2, RMS(p))·ρ
        p ← p·(1 − lr·wd)                                     (decoupled, with the raw lr)
        dim ≥ 2: R ← β̂·R + (1−β̂)·mean(g², last axis)          (slot "row_var", (..., r, 1))
                 C ← β̂·C + (1−β̂)·mean(g², second-last axis)   (slot "col_var", (..., 1, c))
                 V = R·C / max(mean(R), eps1)                   (factored along the last 2 axes)
        else:    V ← β̂·V + (1−β̂)·g²                             (slot "variance", full)
        U = g / √max(V, eps1²)      p ← p − α·U / max(1, RMS(U)/d)

    ``eps1=None`` is the parameters' dtype's machine epsilon. As in torch, ``lr`` only caps
    the relative step size ρ and scales the weight decay: the step itself is relative to
    the parameter's RMS (at least ``eps2``). Slots not used by a tensor (the factors of a
    vector, the full variance of a matrix) have shape ``(0,)``. The step count is one per
    state (torch counts per parameter: the same unless some parameters miss steps).
    """

    slots = ("row_var", "col_var", "variance")
    weight_decay_in_math = True

    def __init__(self, learning_rate: float = 1e-2, beta2_decay: float = -0.8,
                 epsilon: Sequence[float | None] = (None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, maximize: bool = False, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta2_decay = to_float("beta2_decay", beta2_decay)
        if not self.beta2_decay <= 0:  # also refuses NaN
            raise ValueError(f"beta2_decay must be <= 0, got {describe(beta2_decay)}")
        self.epsilon = _check_eps(epsilon)
        self.d = check_positive("d", d)
        if not self.d >= 1:
            raise ValueError(f"d (the clipping threshold) must be >= 1, got {describe(d)}")
        self.maximize = check_flag("maximize", maximize)

    def slot_shape(self, slot: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        factored = len(shape) > 1
        if slot == "row_var":
            return (*shape[:-1], 1) if factored else (0,)
        if slot == "col_var":
            return (*shape[:-2], 1, shape[-1]) if factored else (0,)
        if slot == "variance":
            return (0,) if factored else shape
        return shape  # weight averages

    def scalars(self, step: int) -> tuple[float, ...]:
        """(lr, 1 − β̂ = t^beta2_decay, ρ) for step ``t``."""
        lr = self.learning_rate
        return lr, float(step) ** self.beta2_decay, min(lr, 1 / (float(step) ** 0.5))

    def tensor_update(self, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                      scalars: tuple[float, ...], name: str) -> tuple[Any, dict[str, Any]]:
        lr, w, rho = scalars
        eps1, eps2 = self.epsilon
        if eps1 is None:
            eps1 = xp.eps(p)
        if self.maximize:
            g = -g
        size = int(p.size) if not callable(p.size) else p.numel()
        alpha = max(eps2, xp.norm(p) / size ** 0.5) * rho
        if self.weight_decay != 0:
            p = p * (1 - lr * self.weight_decay)
        out = dict(slots)
        if g.ndim > 1:
            row = xp.lerp(slots["row_var"], xp.norm_axis(g, -1) ** 2 / g.shape[-1], w)
            col = xp.lerp(slots["col_var"], xp.norm_axis(g, -2) ** 2 / g.shape[-2], w)
            v = (row @ col) / xp.clamp_min(xp.mean(row, -2), eps1)
            out.update(row_var=row, col_var=col)
        else:
            v = out["variance"] = xp.lerp(slots["variance"], g * g, w)
        u = xp.rsqrt(xp.clamp_min(v, eps1 * eps1)) * g
        denom = max(1.0, xp.norm(u) / (size ** 0.5 * self.d))
        return xp.add_scaled(p, u, -alpha / denom), out
