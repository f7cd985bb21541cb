"""D-Adaptation AdamW (Defazio & Mishchenko, 2023), as ``optax.contrib.dadapt_adamw``: a
two-pass optimizer whose step size estimate ``d`` is an optimizer-wide value kept in
``state.values`` (as :class:`~.prodigy.Prodigy`'s)."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive, check_unit
from .elementwise import abs_, maximum, sqrt, where


def _dadapt_reduce(p, g, m, v, s, lr, d, dlr, b1, omb1, b2, omb2, sb2, omsb2, eps, wd):
    # ⟨g, s/(√v + ε)⟩ with the previous s and v; ‖new s‖₁
    return g * (s / (sqrt(v) + eps)), abs_(sb2 * s + omsb2 * dlr * g)


def _dadapt(p, g, m, v, s, lr, d, dlr, b1, omb1, b2, omb2, sb2, omsb2, eps, wd):
    m = b1 * m + omb1 * dlr * g
    v = b2 * v + omb2 * g * g
    s = sb2 * s + omsb2 * dlr * g
    return p + (-wd * dlr * p - m / (sqrt(v) + eps)), m, v, s


class DAdaptAdamW(Optimizer):
    """D-Adaptation AdamW (Defazio & Mishchenko, 2023, "Learning-Rate-Free Learning by
    D-Adaptation") as ``optax.contrib.dadapt_adamw``: AdamW whose step size ``d`` is a
    lower bound on the distance to the solution, grown as training goes. ``learning_rate``
    multiplies the estimate (keep 1.0; schedule it). Each step (t = 1, 2, ...; ``d`` the
    current estimate, starting at ``estim_lr0``; β₂' = √β₂)::

        dlr ← d·lr·√(1−β₂ᵗ)/(1−β₁ᵗ)
        numerator ← β₂'·numerator + (1−β₂')·dlr·⟨g, s/(√v + ε)⟩     (s, v of the previous step)
        m ← β₁·m + (1−β₁)·dlr·g          v ← β₂·v + (1−β₂)·g²
        s ← β₂'·s + (1−β₂')·dlr·g
        d ← max(d, numerator / ((1−β₂')·‖s‖₁))
        p ← p − wd·dlr·p − m / (√v + ε)

    The step uses the ``dlr`` of the old ``d`` (folded into ``m``); the new ``d`` enters the
    next step's. ``⟨g, s/(√v+ε)⟩`` and ``‖s‖₁`` are sums over every parameter, taken per
    tensor in the first (read-only) pass (``Optimizer.reductions``); ``d`` and
    ``numerator`` are optimizer-wide values (``state.values``, saved with state dicts and
    checkpoints). With parameter groups, each group's lr enters its own ``dlr`` (and its share
    of the numerator); one ``d`` is shared. A parameter missing from a step's gradients is
    left alone (its ``s`` neither decayed nor counted in that step's ``‖s‖₁``).

    Conventions (optax's): decoupled weight decay ``wd·dlr·p`` (scaled by ``dlr``, not lr);
    the bias correction always on and folded into ``dlr``; ε added to √v. Defaults are
    optax's: lr 1.0, β (0.9, 0.999), ε 1e-8, d₀ 1e-6, no decay. The PyTorch package
    ``dadaptation`` (``DAdaptAdam``) names ``estim_lr0`` ``d0``, and adds ``growth_rate``,
    ``log_every`` and coupled/decoupled choices. torch 2.x and Keras 3 have none.
    """

    slots = ("m", "v", "s")
    state_values = ("d", "numerator")
    #: read from self between the passes (one d for every parameter)
    step_wide = ("beta2", "estim_lr0")
    #: the bias correction stays on the optimizer's count (optax's one count): ``d`` sums
    #: every tensor's ``dlr``
    counts_missed = False
    scalar_values = ("d",)  # scalars(step, d=...) reads the state's d
    loaded_domains = {"d": "positive"}  # (d only grows from estim_lr0 > 0)
    reductions = 2
    weight_decay_in_math = True

    def __init__(self, learning_rate: float = 1.0, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, estim_lr0: float = 1e-6, weight_decay: float = 0.0,
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon)
        self.estim_lr0 = check_positive("estim_lr0", estim_lr0, allow_zero=False)

    def state_value_init(self, name: str) -> float:
        return self.estim_lr0 if name == "d" else 0.0

    def scalars(self, step: int, d: float | None = None) -> tuple[float, ...]:
        # d: the estimate in the state being updated (the engines pass the state's)
        d = self.estim_lr0 if d is None else d
        b1, b2, lr = self.beta1, self.beta2, self.learning_rate
        sb2 = b2**0.5
        dlr = d * lr * (((1 - b2**step) ** 0.5) / (1 - b1**step))
        return (lr, d, dlr, b1, 1 - b1, b2, 1 - b2, sb2, 1 - sb2, self.epsilon,
                self.weight_decay)

    def reduce_math(self) -> Any:
        return _dadapt_reduce

    def kernel_math(self) -> Any:
        return _dadapt

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        # arithmetic only: it also runs traced (the jitted JAX engine, the optax transformation)
        num, l1 = sums
        d = values["d"]
        sb2 = self.beta2**0.5
        fac = scalars[2]  # each tensor's dlr
        inc = (fac * num).sum()
        if fac.size:  # one group (every factor the same): optax's order of operations
            inc = where((fac == fac[0]).all(), fac[0] * num.sum(), inc)
        numerator = sb2 * values["numerator"] + (1 - sb2) * inc
        estimate = numerator / ((1 - sb2) * l1.sum())
        d_new = maximum(d, estimate)  # NaN propagates, as jnp.maximum
        return (), tensors, {"d": d_new, "numerator": numerator}
