"""SM3 (memory-efficient adaptive optimisation with per-axis accumulators), optax conventions."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from .checks import check_positive, check_unit
from .state import OptimizerState
from .tensorwise import NumpyOps, TensorwiseOptimizer


def _axis_max(xp: NumpyOps, x: Any, axes: tuple[int, ...]) -> Any:
    return xp.m.amax(x, dim=axes) if xp.name == "torch" else x.max(axis=axes)


def _concat(xp: NumpyOps, parts: list[Any]) -> Any:
    return xp.m.cat(parts) if xp.name == "torch" else xp.m.concatenate(parts)


class SM3(TensorwiseOptimizer):
    """SM3 (Anil et al., 2019, "Memory-Efficient Adaptive Optimization") as optax.sm3 /
    optax.scale_by_sm3. For a tensor of rank r ≥ 2, one accumulator vector ``μᵢ`` per axis i
    (its length the axis's), instead of one value per element; per step::

        ν ← c·g² + β₂·min_i μᵢ        (each μᵢ broadcast along its axis; c = 1 if β₂ = 1,
                                        else 1 − β₂)
        μᵢ ← max of ν over every axis but i
        u ← g / √(ν + ε)  where ν > 0, else 0
        m ← (1 − β₁)·u + β₁·m
        p ← p − lr·m

    A tensor of rank 0 or 1 keeps ν itself (``μ = ν``, AdaGrad with momentum when β₂ = 1).
    Slots ``mu`` (the accumulators of each axis, concatenated: shape ``(Σ shape,)`` for rank
    ≥ 2, the parameter's shape otherwise) and ``m`` (optax's ``nu``, the momentum).
    ``momentum`` is optax.sm3's argument (β₁ of ``scale_by_sm3``); ``beta2`` (1.0) and
    ``epsilon`` (1e-8) are ``scale_by_sm3``'s ``b2`` and ``eps``. The momentum has no bias
    correction. optax.sm3 has no weight decay: ``weight_decay`` here is coupled L2
    (``g ← g + wd·p``, optax.add_decayed_weights chained in front). Defaults are optax's
    (momentum 0.9; optax has no default lr: 1e-2 here). torch 2.x and Keras 3 have none.
    """

    slots = ("mu", "m")

    def __init__(self, learning_rate: float = 1e-2, momentum: float = 0.9, beta2: float = 1.0,
                 epsilon: float = 1e-8, weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.momentum = check_unit("momentum", momentum)
        self.beta2 = check_positive("beta2", beta2)
        if not self.beta2 <= 1:
            raise ValueError(f"beta2 must be in [0, 1], got {beta2!r}")
        self.epsilon = check_positive("epsilon", epsilon)

    def slot_shape(self, slot: str, shape: tuple[int, ...], name: str | None = None
                   ) -> tuple[int, ...]:
        if slot == "mu" and len(shape) >= 2:
            return (sum(shape),)
        return shape  # m, the weight averages, mu of a rank < 2 tensor

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate,)

    def tensor_update(self, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                      scalars: tuple[float, ...], name: str) -> tuple[Any, dict[str, Any]]:
        (lr,) = scalars
        b1, b2 = self.momentum, self.beta2
        c = 1.0 if b2 == 1.0 else 1.0 - b2  # optax's coefficient of g² (a Python branch)
        mu, m = slots["mu"], slots["m"]
        nd = len(g.shape)
        if nd < 2:
            acc = c * g**2 + b2 * mu
            new_mu = acc
        else:
            shape, parts, start = tuple(g.shape), [], 0
            for i, n in enumerate(shape):  # μᵢ broadcast along axis i
                parts.append(mu[start:start + n].reshape(
                    (1,) * i + (n,) + (1,) * (nd - i - 1)))
                start += n
            acc = c * g**2 + b2 * functools.reduce(xp.m.minimum, parts)
            new_mu = _concat(xp, [_axis_max(xp, acc, tuple(j for j in range(nd) if j != i))
                                  for i in range(nd)])
        pos = acc > 0
        inv = xp.m.where(pos, 1 / xp.m.sqrt(xp.m.where(pos, acc, 1.0) + self.epsilon), 0.0)
        m = (1 - b1) * (g * inv) + b1 * m
        return p - lr * m, {"mu": new_mu, "m": m}

    def fused_step(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
                   state: OptimizerState, prepared: Any, ours: bool
                   ) -> tuple[dict[str, Any], bool, float, bool] | None:
        """The whole step in one numba kernel where the state's engine is the NumbaEngine
        (NumPy, torch-CPU, JAX-CPU in float32/float64; :mod:`.engines.sm3_kernels`: one
        pass over p, g, m, the same operations as :meth:`tensor_update` on NumPy, hence
        the same bits); else None (the per-tensor path)."""
        if type(state.engine).__name__ != "NumbaEngine":
            return None
        from .engines import sm3_kernels

        return sm3_kernels.fused_step(self, params, gradients, state, prepared, ours)
