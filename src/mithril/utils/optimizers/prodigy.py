"""Prodigy (Mishchenko & Defazio, 2023), as ``optax.contrib.prodigy``: a two-pass optimizer
whose step size estimate ``d`` is an optimizer-wide value kept in ``state.values``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit
from .elementwise import abs_, helper, maximum, sqrt, where
from .schedule_free import init_from_params
from .state import OptimizerState


@helper
def _grad_sum(g, s, d, sc, b3, d0):
    return b3 * s + sc * (d * g) / d0


def _prodigy_reduce(p, g, m, v, s, x0, lr, d, dlr, sc, b1, omb1, b2, omb2, b3, d0, wd):
    return g * (x0 - p), abs_(_grad_sum(g, s, d, sc, b3, d0))


def _prodigy(p, g, m, v, s, x0, lr, d, dlr, sc, b1, omb1, b2, omb2, b3, d0, wd, d_eps):
    dg = d * g
    m = b1 * m + omb1 * dg
    v = b2 * v + omb2 * dg * dg
    s = _grad_sum(g, s, d, sc, b3, d0)
    u = -wd * dlr * p - dlr * m / (sqrt(v) + d_eps)
    return p + u, m, v, s, x0


class Prodigy(Optimizer):
    """Prodigy (Mishchenko & Defazio, 2023): AdamW whose step size ``d`` estimates the
    distance to the solution, as ``optax.contrib.prodigy``. ``learning_rate`` is a
    multiplier of that estimate (keep 1.0; schedule it, e.g. cosine from 1 to 0). Each step
    (t = 1, 2, ...; ``d`` the current estimate, starting at ``estim_lr0``)::

        dlr ← d·lr·√(1−β₂ᵗ)/(1−β₁ᵗ)
        m ← β₁·m + (1−β₁)·d·g          v ← β₂·v + (1−β₂)·(d·g)²
        s ← β₃·s + dlr·d·g/d₀          (safeguard_warmup: d·d·g/d₀)
        numerator ← β₃·numerator + (d/d₀)·dlr·⟨g, x₀ − p⟩
        d ← max(d, estim_lr_coef · numerator / ‖s‖₁)
        p ← p − wd·dlr·p − dlr·m / (√v + d·ε)          (dlr of the old d; the new d in d·ε)

    ``x₀`` is the starting point (slot ``"x0"``, a copy of the parameters ``init`` gets);
    ``⟨g, x₀ − p⟩`` and ``‖s‖₁`` are sums over every parameter: the first (read-only) pass
    takes them per tensor, the second applies the update (see ``Optimizer.reductions``).
    ``d`` and ``numerator`` are optimizer-wide values (``state.values``, saved with state
    dicts and checkpoints); the per-step scalars read the state's ``d``, passed to
    :meth:`scalars` as a keyword argument (``scalar_values``): the instance holds no value
    of a state, and may step several states. With parameter groups, each group's lr enters its own ``dlr``
    (steps, ``s`` and its share of the numerator, as the PyTorch ``prodigyopt`` package
    does); one ``d`` is shared. A parameter missing from a step's gradients is left alone,
    and its ``s`` is then neither decayed nor counted in that step's ``‖s‖₁``.

    Conventions (optax's): AdamW-style decoupled weight decay ``wd·dlr·p``; the bias
    correction always on and folded into ``dlr``; ε scaled by the new ``d``. ``beta3`` None
    means ``√β₂``. The PyTorch package ``prodigyopt`` names ``estim_lr0`` ``d0`` and
    ``estim_lr_coef`` ``d_coef``, and adds ``growth_rate``, optional bias correction and
    decoupled/coupled decay choices (its defaults: no bias correction). Defaults are optax's
    (lr 1.0, β 0.9/0.999, ε 1e-8, d₀ 1e-6, no decay).
    """

    slots = ("m", "v", "s", "x0")
    state_values = ("d", "numerator")
    #: read from self between the passes (one d for every parameter): a group cannot have
    #: its own (a group's was silently unused)
    step_wide = ("beta3", "epsilon", "estim_lr0", "estim_lr_coef")
    #: a parameter's missed steps leave its bias correction on the optimizer's count (the
    #: reference's per-group ``k``, optax's one count): ``d`` sums every tensor's ``dlr``
    counts_missed = False
    scalar_values = ("d",)  # scalars(step, d=...) reads the state's d
    reductions = 2
    weight_decay_in_math = True

    def __init__(self, learning_rate: float = 1.0, beta1: float = 0.9, beta2: float = 0.999,
                 beta3: float | None = None, epsilon: float = 1e-8, estim_lr0: float = 1e-6,
                 estim_lr_coef: float = 1.0, weight_decay: float = 0.0,
                 safeguard_warmup: bool = False, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.beta3 = None if beta3 is None else check_unit("beta3", beta3)
        self.epsilon = check_positive("epsilon", epsilon)
        self.estim_lr0 = check_positive("estim_lr0", estim_lr0, allow_zero=False)
        self.estim_lr_coef = check_positive("estim_lr_coef", estim_lr_coef)
        self.safeguard_warmup = check_flag("safeguard_warmup", safeguard_warmup)

    def _beta3(self) -> float:
        return self.beta2**0.5 if self.beta3 is None else self.beta3

    def state_value_init(self, name: str) -> float:
        return self.estim_lr0 if name == "d" else 0.0

    def scalars(self, step: int, d: float | None = None) -> tuple[float, ...]:
        # d: the estimate in the state being updated (scalar_values: the engines pass the
        # state's), else the initial one
        d = self.estim_lr0 if d is None else d
        b1, b2, lr = self.beta1, self.beta2, self.learning_rate
        bc = ((1 - b2**step) ** 0.5) / (1 - b1**step)
        dlr = d * lr * bc
        return (lr, d, dlr, d if self.safeguard_warmup else dlr, b1, 1 - b1, b2, 1 - b2,
                self._beta3(), self.estim_lr0, self.weight_decay)

    def reduce_math(self) -> Any:
        return _prodigy_reduce

    def kernel_math(self) -> Any:
        return _prodigy

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        # arithmetic only (no Python branch on a value): it also runs traced, inside the
        # jitted JAX engine's program and the optax transformation's, with d on the device
        num, den = sums
        d = values["d"]
        fac = (d / self.estim_lr0) * scalars[2]  # (d/d₀)·dlr of each tensor
        inc = (fac * num).sum()
        if fac.size:  # one group (every factor the same): optax's order of operations
            inc = where((fac == fac[0]).all(), fac[0] * num.sum(), inc)
        numerator = self._beta3() * values["numerator"] + inc
        estimate = self.estim_lr_coef * numerator / den.sum()
        d_new = maximum(estimate, d)  # NaN propagates, as jnp.maximum
        return (d_new * self.epsilon,), tensors, {"d": d_new, "numerator": numerator}


def _init(self: Prodigy, params: Mapping[str, Any]) -> OptimizerState:
    """A fresh state: ``m``, ``v``, ``s`` zero, ``x0`` a copy of ``params`` (which are not
    modified), ``d = estim_lr0``, ``numerator = 0``."""
    return init_from_params(self, params, "x0")


# assigned after the class, so that Optimizer.__init_subclass__ does not wrap it (the
# wrapper binds the backend first, and would keep an inferred one when the call refuses)
Prodigy.init = _init  # type: ignore[method-assign]
