"""RAdam; torch.optim conventions by default, optax's on request."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Optimizer
from .checks import (
    check_choice,
    check_flag,
    check_positive,
    check_unit,
    describe,
    refuse_unless,
    switched_on,
    to_float,
)
from .elementwise import helper, sqrt, where


def _traced_rho(step: Any, b2: float, rho_inf: float) -> Any:
    """ρₜ for a traced step, in float32 without torch's formula's cancellation (at step 10
    with β₂ = 0.999 it subtracts 1990 from 1999: ~1e-5 off in float32). With c = −ln β₂ and
    y = t·c (c and the constants in float64, on the host): 2t·β₂ᵗ/(1−β₂ᵗ) = (2/c)·y/expm1(y),
    so ρₜ = (2/c)·(1 − y/expm1(y)) + (ρ∞ − 2/c), where 1 − y/expm1(y) is its series
    y/2 − y²/12 + y⁴/720 − y⁶/30240 below y = 0.5 (the next term: < 1e-8 of it)."""
    import jax.numpy as jnp

    dt = jnp.result_type(float)  # (float64 under jax_enable_x64: torch's formula, as the host)
    t = jnp.asarray(step).astype(dt)
    if not switched_on(b2):  # β₂ᵗ = 0: ρₜ = ρ∞ (a traced β₂ is not 0)
        return jnp.full((), rho_inf, dt)
    if dt == jnp.float64:
        return rho_inf - 2 * t * b2**t / (1 - b2**t)
    # (a traced β₂ gives its own ln, from its float64 value: float32's would be 1e-4 off)
    c = -(b2.log() if hasattr(b2, "log") else math.log(b2))
    y = t * c
    s = jnp.minimum(y, 0.5)
    series = s * (0.5 - s * (1 / 12 - s * s * (1 / 720 - s * s / 30240)))
    direct = 1.0 - y / jnp.expm1(jnp.maximum(y, 0.5))
    return (2 / c) * jnp.where(y < 0.5, series, direct) + (rho_inf - 2 / c)


def _radam(p, g, m, v, lr, b1c, b2, b2c, bc1, bc2_sqrt, eps, rect):
    m = m + b1c * (g - m)                  # torch: m.lerp_(g, 1 − β₁)
    v = v * b2 + b2c * g * g
    u = m / bc1 * lr
    # rect > 0 exactly when ρₜ > 5 (a per-step scalar: every element takes the same branch)
    return p - where(rect > 0, u * (bc2_sqrt / (sqrt(v) + eps)) * rect, u), m, v


@helper
def _rectified_optax(p, mh, v, lr, bc2, eps_root, eps, on, rect):
    # optax: ε on the bias-corrected √(v̂ + ε_root); below the threshold, SGD with momentum
    return p - lr * where(on > 0, rect * mh / (sqrt(v / bc2 + eps_root) + eps), mh)


def _radam_optax(p, g, m, v, lr, b1c, b2, b2c, b1, bc1, bc1_next, bc2, eps_root, eps, on,
                 rect):
    m = m + b1c * (g - m)
    v = v * b2 + b2c * g * g
    return _rectified_optax(p, m / bc1, v, lr, bc2, eps_root, eps, on, rect), m, v


def _radam_optax_nesterov(p, g, m, v, lr, b1c, b2, b2c, b1, bc1, bc1_next, bc2, eps_root,
                          eps, on, rect):
    m = m + b1c * (g - m)
    v = v * b2 + b2c * g * g
    mh = b1 * (m / bc1_next) + b1c * (g / bc1)     # optax's Nesterov look-ahead
    return _rectified_optax(p, mh, v, lr, bc2, eps_root, eps, on, rect), m, v


class RAdam(Optimizer):
    """RAdam (Liu et al., 2019, rectified Adam) as torch.optim.RAdam::

        m ← β₁·m + (1−β₁)·g        v ← β₂·v + (1−β₂)·g²        m̂ = m/(1−β₁ᵗ)
        ρ∞ = 2/(1−β₂) − 1          ρₜ = ρ∞ − 2t·β₂ᵗ/(1−β₂ᵗ)
        ρₜ > 5:  rₜ = √((ρₜ−4)(ρₜ−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρₜ))
                 p ← p − lr·m̂ · √(1−β₂ᵗ)/(√v + ε) · rₜ
        else:    p ← p − lr·m̂                                (SGD with momentum)

    Slots ``m`` and ``v`` (torch's ``exp_avg``/``exp_avg_sq``). ``weight_decay`` is coupled
    L2 (``g ← g + wd·p``, torch's default; optax: ``add_decayed_weights`` chained in front),
    or with ``decoupled_weight_decay=True`` ``p ← p·(1 − lr·wd)`` first (torch's option,
    AdamW style). Defaults are torch's and optax's: lr 1e-3, β = (0.9, 0.999), ε = 1e-8.
    Keras has no RAdam.

    ``convention`` (default ``"torch"``, the above: ε on the raw √v, rectified where ρₜ > 5):

    * ``"optax"`` (``optax.radam``): ε is added to the bias-corrected √(v̂ + ε_root), and
      the rectified step is taken where ρₜ ≥ ``threshold`` (default 5)::

          ρₜ ≥ threshold:  p ← p − lr·rₜ · m̂ / (√(v/(1−β₂ᵗ) + ε_root) + ε)
          else:            p ← p − lr·m̂

      ``nesterov=True``: m̂ = β₁·m/(1−β₁ᵗ⁺¹) + (1−β₁)·g/(1−β₁ᵗ) (optax's look-ahead).
      ``eps_root`` (default 0), ``threshold`` (default 5) and ``nesterov`` are optax's only:
      torch's RAdam has none (given under ``"torch"``, they are refused; unset, they are
      None there).

    torch's ``maximize`` / ``foreach`` / ``capturable`` / ``differentiable`` are not
    arguments: negate the loss to maximise; the fused kernels choose the loop.
    """

    slots = ("m", "v")

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, convention: str = "torch",
                 eps_root: float | None = None, threshold: float | None = None,
                 nesterov: bool = False, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.convention = check_choice("convention", convention, ("torch", "optax"),
                                       " (Keras has no RAdam)")
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.nesterov = check_flag("nesterov", nesterov)
        # optax's only: None under torch's convention (no hyperparameter to drive or trace)
        refuse_unless(convention, "optax", eps_root=eps_root, threshold=threshold,
                      nesterov=self.nesterov or None)
        self.eps_root = self.threshold = None
        if convention == "optax":
            self.eps_root = check_positive("eps_root", 0.0 if eps_root is None else eps_root)
            self.threshold = to_float("threshold", 5.0 if threshold is None else threshold)
            if not 4.0 <= self.threshold < float("inf"):  # (below 4: rₜ = √ of a negative)
                raise ValueError(f"threshold must be a finite number >= 4, got "
                                 f"{describe(threshold)}")
        # an instance attribute: the engines read opt.decoupled_weight_decay
        self.decoupled_weight_decay = check_flag("decoupled_weight_decay", decoupled_weight_decay)

    def rho(self, step: int) -> float:
        """ρₜ, the length of the approximated simple moving average (torch's formula; for
        a traced step, :func:`_traced_rho`)."""
        b2 = self.beta2
        rho_inf = 2 / (1 - b2) - 1
        if not isinstance(step, (int, np.integer)):
            return _traced_rho(step, b2, rho_inf)
        return rho_inf - 2 * step * (b2**step) / (1 - b2**step)

    def scalars(self, step: int) -> tuple[float, ...]:
        b1, b2 = self.beta1, self.beta2
        bc2 = 1 - b2**step
        rho_inf = 2 / (1 - b2) - 1
        rho_t = self.rho(step)
        optax = self.convention == "optax"
        on = rho_t >= self.threshold if optax else rho_t > 5.0  # (optax's ≥, torch's >)
        if isinstance(on, (bool, np.bool_)):  # the host's step and threshold: torch's branch
            rect = 0.0
            if on:
                rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                        / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        else:  # a traced step or threshold (an optax transformation's program): no branch
            r = where(on, rho_t, 6.0)  # (the root's argument positive where it is unused)
            rect = where(on, ((r - 4) * (r - 2) * rho_inf
                              / ((rho_inf - 4) * (rho_inf - 2) * r)) ** 0.5, 0.0)
        if optax:
            return (self.learning_rate, 1 - b1, b2, 1 - b2, b1, 1 - b1**step,
                    1 - b1 ** (step + 1), bc2, self.eps_root, self.epsilon, on * 1.0, rect)
        return (self.learning_rate, 1 - b1, b2, 1 - b2, 1 - b1**step, bc2**0.5,
                self.epsilon, rect)

    def kernel_math(self) -> Any:
        if self.convention == "optax":
            return _radam_optax_nesterov if self.nesterov else _radam_optax
        return _radam
