"""MoMo and MoMo-Adam (Schaipp et al., 2023) as ``optax.contrib.momo`` / ``momo_adam``:
momentum (Adam) with a Polyak-type step size from the loss, a model of it and a lower
bound. Loss-aware (``needs_loss``, :mod:`.loss_aware`) two-pass optimizers: the first,
read-only pass takes three sums over every parameter, the step size is computed between
the passes from them and the optimizer-wide values ``barf``, ``gamma``, ``lb`` and ``loss``
(``state.values``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit, describe, to_float
from .elementwise import helper, maximum, minimum, sqrt, where
from .polyak_sgd import FLOAT_EPS


def _momo_reduce(p, g, m, lr, bt, omb, shrink):
    m = bt * m + omb * g  # (the new momentum: the sums are of it)
    return g * p, m * m, m * p


def _momo(p, g, m, lr, bt, omb, shrink, tau_per_lr):
    m = bt * m + omb * g
    return p - shrink * p - (lr * tau_per_lr) * m, m


@helper
def _adam_moments(g, m, v, b1, omb1, b2, omb2, bc2, eps):
    m = b1 * m + omb1 * g
    v = b2 * v + omb2 * g * g
    return m, v, eps + sqrt(v / bc2)


def _momo_adam_reduce(p, g, m, v, lr, b1, omb1, b2, omb2, bc2, eps, shrink):
    m, v, pre = _adam_moments(g, m, v, b1, omb1, b2, omb2, bc2, eps)
    return g * p, m * (m / pre), m * p


def _momo_adam(p, g, m, v, lr, b1, omb1, b2, omb2, bc2, eps, shrink, tau_per_lr):
    m, v, pre = _adam_moments(g, m, v, b1, omb1, b2, omb2, bc2, eps)
    return p - shrink * p - (lr * tau_per_lr) * (m / pre), m, v


class _Momo(Optimizer):
    """What MoMo and MoMo-Adam share: the loss, the lower bound and the step size."""

    needs_loss = True
    reductions = 3
    state_values = ("barf", "gamma", "lb")
    weight_decay_in_math = True
    #: one step size for all parameters from optimizer-wide values (a group's would be
    #: silently unused)
    step_wide = ("weight_decay", "lower_bound", "adapt_lower_bound")
    #: barf, gamma and lb mix every parameter: one count (optax's), and tensor_scalars
    #: reads the optimizer's
    counts_missed = False
    tensor_scalars_step = "optimizer"

    def _bound(self, lower_bound: Any, adapt_lower_bound: Any) -> None:
        self.lower_bound = to_float("lower_bound", lower_bound)
        if not np.isfinite(self.lower_bound):
            raise ValueError(f"lower_bound must be finite, got {describe(lower_bound)}")
        self.adapt_lower_bound = check_flag("adapt_lower_bound", adapt_lower_bound)

    def state_value_init(self, name: str) -> float:
        return self.lower_bound if name == "lb" else 0.0

    def _shrink(self) -> float:
        # the decoupled decay factor α·wd/(1 + α·wd) (a group's α, its mask's wd)
        a = self.learning_rate * self.weight_decay
        return a / (1 + a)

    def _step_size(self, barf: Any, gamma: Any, iprod: Any, norm: Any, values: dict,
                   bc1: Any) -> tuple[Any, dict[str, Any]]:
        """τ/α (each tensor's step is its own α times it) and the new values. Arithmetic
        only: it also runs traced (the jitted JAX engine, optax_transformation)."""
        a = self.learning_rate
        c = 1 + a * self.weight_decay
        lb = values["lb"]
        if self.adapt_lower_bound:
            cap = c * (barf - gamma) + iprod
            lb = where(cap < c * bc1 * lb, maximum(cap / (2 * bc1 * c), self.lower_bound), lb)
        small = norm <= FLOAT_EPS
        t1 = where(small, 0.0,
                   maximum(c * (barf - bc1 * lb - gamma) + iprod, 0.0) / where(small, 1.0, norm))
        tau = minimum(a / bc1, t1)
        if self.adapt_lower_bound:
            lb = maximum((barf + iprod - gamma - 0.5 * tau * norm) / bc1, self.lower_bound)
        positive = a > 0
        per_lr = where(positive, tau / where(positive, a, 1.0), 0.0)
        return per_lr, {"barf": barf, "gamma": gamma, "lb": lb, "loss": values["loss"]}


class Momo(_Momo):
    """MoMo (Schaipp et al., 2023) as ``optax.contrib.momo``: SGD with momentum and a
    Polyak-type step size from the loss ``f``, given to every step as
    ``update(params, grads, state, loss=f)`` (optax's ``value=``). Per step (t = 1, 2, ...;
    β_t = 0 at t = 1, else ``beta``; α the learning rate; sums over every parameter)::

        f̄ ← β_t·f̄ + (1−β_t)·f          m ← β_t·m + (1−β_t)·g
        γ ← β_t·γ + (1−β_t)·⟨g, p⟩      c = 1 + α·wd
        τ ← min(α, max(c·(f̄ − lb − γ) + ⟨m, p⟩, 0) / ‖m‖²)        (0 where ‖m‖² ≤ 2⁻⁵²)
        p ← p − α·wd/c · p − τ·m

    ``lb`` is ``lower_bound`` (a lower bound of the loss; 0 suits most), or with
    ``adapt_lower_bound=True`` an estimate updated each step (optax's: first lowered to
    ``max(cap/(2c), lower_bound)`` where ``cap = c·(f̄ − γ) + ⟨m, p⟩ < c·lb``, then set to
    ``max(f̄ + ⟨m, p⟩ − γ − τ‖m‖²/2, lower_bound)``). ``f̄``, ``γ``, ``lb`` and the last
    loss are optimizer-wide values (``state.values``: ``barf``, ``gamma``, ``lb``,
    ``loss``); slot ``m`` (optax's ``exp_avg``). ``weight_decay`` is decoupled (AdamW-like,
    as optax's). Defaults are optax's (lr 1.0, β 0.9, no decay). Parameter groups: τ is
    computed once with the optimizer's own α; a group's learning rate scales its tensors'
    step (α_group/α · τ) and decay; ``weight_decay_mask`` leaves tensors undecayed (c keeps
    the optimizer's decay); ``weight_decay``, ``lower_bound`` and ``adapt_lower_bound`` are
    the optimizer's only. torch 2.x and Keras 3 have none.
    """

    slots = ("m",)
    step_wide = ("beta", *_Momo.step_wide)

    def __init__(self, learning_rate: float = 1.0, beta: float = 0.9, lower_bound: float = 0.0,
                 weight_decay: float = 0.0, adapt_lower_bound: bool = False,
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta = check_unit("beta", beta)
        self._bound(lower_bound, adapt_lower_bound)

    def scalars(self, step: int) -> tuple[Any, ...]:
        bt = where(step == 1, 0.0, self.beta)  # (branch-free: it is also traced)
        return (self.learning_rate, bt, 1 - bt, self._shrink())

    def reduce_math(self) -> Any:
        return _momo_reduce

    def kernel_math(self) -> Any:
        return _momo

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        bt = where(step == 1, 0.0, self.beta)
        barf = bt * values["barf"] + (1 - bt) * values["loss"]
        gamma = bt * values["gamma"] + (1 - bt) * sums[0].sum()
        per_lr, values = self._step_size(barf, gamma, sums[2].sum(), sums[1].sum(), values, 1.0)
        return (per_lr,), tensors, values


class MomoAdam(_Momo):
    """MoMo-Adam (Schaipp et al., 2023) as ``optax.contrib.momo_adam``: Adam(W) with a
    Polyak-type step size from the loss ``f``, given to every step as
    ``update(params, grads, state, loss=f)`` (optax's ``value=``). Per step (t = 1, 2, ...;
    α the learning rate; sums over every parameter)::

        f̄ ← β₁·f̄ + (1−β₁)·f      m ← β₁·m + (1−β₁)·g      v ← β₂·v + (1−β₂)·g²
        D = ε + √(v/(1−β₂ᵗ))       γ ← β₁·γ + (1−β₁)·⟨g, p⟩    c = 1 + α·wd
        b = 1 − β₁ᵗ
        τ ← min(α/b, max(c·(f̄ − b·lb − γ) + ⟨m, p⟩, 0) / ⟨m, m/D⟩)   (0 where ⟨m, m/D⟩ ≤ 2⁻⁵²)
        p ← p − α·wd/c · p − τ·m/D

    ``lb``: ``lower_bound``, or with ``adapt_lower_bound=True`` optax's estimate (lowered to
    ``max(cap/(2bc), lower_bound)`` where ``cap = c·(f̄ − γ) + ⟨m, p⟩ < c·b·lb``, then set
    to ``max((f̄ + ⟨m, p⟩ − γ − τ·⟨m, m/D⟩/2)/b, lower_bound)``). Values ``barf``,
    ``gamma``, ``lb``, ``loss`` (``state.values``); slots ``m``, ``v`` (optax's ``exp_avg``,
    ``exp_avg_sq``). Decoupled ``weight_decay`` (optax's). Defaults are optax's (lr 1e-2,
    β 0.9/0.999, ε 1e-8, no decay; ``eps=`` is accepted for ``epsilon``). Parameter groups
    as :class:`Momo`'s (``beta1`` is the optimizer's only). torch 2.x and Keras 3 have none.
    """

    slots = ("m", "v")
    step_wide = ("beta1", *_Momo.step_wide)

    def __init__(self, learning_rate: float = 1e-2, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, lower_bound: float = 0.0, weight_decay: float = 0.0,
                 adapt_lower_bound: bool = False, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon)
        self._bound(lower_bound, adapt_lower_bound)

    def scalars(self, step: int) -> tuple[Any, ...]:
        b1, b2 = self.beta1, self.beta2
        return (self.learning_rate, b1, 1 - b1, b2, 1 - b2, 1 - b2**step, self.epsilon,
                self._shrink())

    def reduce_math(self) -> Any:
        return _momo_adam_reduce

    def kernel_math(self) -> Any:
        return _momo_adam

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        b1 = self.beta1
        barf = b1 * values["barf"] + (1 - b1) * values["loss"]
        gamma = b1 * values["gamma"] + (1 - b1) * sums[0].sum()
        per_lr, values = self._step_size(barf, gamma, sums[2].sum(), sums[1].sum(), values,
                                         1 - b1**step)
        return (per_lr,), tensors, values
