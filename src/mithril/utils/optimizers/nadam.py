"""NAdam; torch.optim conventions by default, optax's or Keras's on request."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit
from .elementwise import sqrt
from .sgd import BY_CONVENTION, check_convention


def _nadam(p, g, m, v, lr, b1c, b2, b2c, bc2, eps, cg, cm):
    m = m + b1c * (g - m)                  # torch: m.lerp_(g, 1 − β₁)
    v = v * b2 + b2c * g * g
    d = sqrt(v / bc2) + eps
    return p + cg * (g / d) + cm * (m / d), m, v   # torch: two addcdiv_, g's first


class NAdam(Optimizer):
    """NAdam (Dozat, 2016) as torch.optim.NAdam, with its momentum schedule::

        μₜ = β₁·(1 − ½·0.96^(t·ψ))        Πₜ = μ₁·μ₂·…·μₜ        (ψ = momentum_decay)
        m ← β₁·m + (1−β₁)·g              v ← β₂·v + (1−β₂)·g²
        d = √(v / (1−β₂ᵗ)) + ε
        p ← p − lr·(1−μₜ)/(1−Πₜ) · g/d − lr·μₜ₊₁/(1−Πₜ·μₜ₊₁) · m/d

    Slots ``m`` and ``v`` (torch's ``exp_avg``/``exp_avg_sq``). Πₜ is a function of t only,
    computed from the step count (the running product is cached, and recomputed from
    scratch for a state resumed at another step), so a restored state continues exactly.
    Πₜ is kept in float64: torch keeps its ``mu_product`` in its default dtype, i.e. rounded
    to float32 each step unless ``torch.set_default_dtype(torch.float64)`` (the two then
    differ by ~1e-8 relative in float64).

    ``weight_decay``: coupled L2 ``g ← g + wd·p`` (torch's default), or with
    ``decoupled_weight_decay=True`` ``p ← p·(1 − lr·wd)`` first (torch's NAdamW option).
    ``momentum_decay=0`` gives a constant μ = β₁/2 (torch). Keras' Nadam is this update with
    ψ = 1 fixed (μₜ = β₁·(1 − ½·0.96ᵗ)), ε 1e-7 and lr 1e-3. optax.nadam differs: Adam's
    bias corrections with a Nesterov look-ahead and a constant β₁ (no μ schedule). Defaults
    are torch's: lr 2e-3, β = (0.9, 0.999), ε = 1e-8, ψ = 4e-3.

    ``convention`` (default ``"torch"``, the above; the defaults of ``momentum_decay`` and
    ``decoupled_weight_decay`` follow it):

    * ``"keras"`` (``keras.optimizers.Nadam``): the schedule with ψ fixed at 1,
      μₜ = β₁·(1 − ½·0.96ᵗ) (``momentum_decay`` is 1; other values are refused), and Keras's
      decoupled ``weight_decay`` (``decoupled_weight_decay`` is True; False is refused).
    * ``"optax"`` (``optax.nadam``): **no μ schedule** (``momentum_decay`` is None; a value
      is refused): Adam's bias corrections with a constant β₁ and a Nesterov look-ahead,
      ``p ← p − lr·(1−β₁)/(1−β₁ᵗ) · g/d − lr·β₁/(1−β₁ᵗ⁺¹) · m/d``. ``weight_decay`` is
      coupled (``optax.chain(add_decayed_weights(wd), nadam(...))``), or with
      ``decoupled_weight_decay=True`` ``optax.nadamw``'s ``p ← p − lr·(step + wd·p)``.
    """

    slots = ("m", "v")

    def __init__(self, learning_rate: float = 2e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float = 0.0,
                 momentum_decay: float | None = BY_CONVENTION,
                 decoupled_weight_decay: bool = BY_CONVENTION, convention: str = "torch",
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.convention = check_convention(convention)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.momentum_decay = self._check_momentum_decay(momentum_decay)
        if decoupled_weight_decay is BY_CONVENTION:
            decoupled_weight_decay = convention == "keras"
        # an instance attribute: the engines read opt.decoupled_weight_decay
        self.decoupled_weight_decay = check_flag("decoupled_weight_decay", decoupled_weight_decay)
        if convention == "keras" and not self.decoupled_weight_decay:
            raise ValueError("decoupled_weight_decay=False: Keras's weight decay is decoupled "
                             "only (convention='keras')")
        self._products: tuple = ()  # (beta1, momentum_decay, t, Π_t): the last one computed

    def _check_momentum_decay(self, value: Any) -> float | None:
        conv = self.convention
        if value is BY_CONVENTION:
            return {"torch": 4e-3, "keras": 1.0, "optax": None}[conv]
        if conv == "optax":
            if value is not None:
                raise ValueError(f"momentum_decay={value!r}: optax's NAdam has no momentum "
                                 f"schedule (convention='optax'): leave it unset")
            return None
        value = check_positive("momentum_decay", value)
        if conv == "keras" and value != 1.0:
            raise ValueError(f"momentum_decay={value!r}: Keras's NAdam schedule fixes it at 1 "
                             f"(convention='keras')")
        return value

    def _mu(self, t: int) -> float:
        if self.momentum_decay is None:  # optax: a constant β₁
            return self.beta1
        return self.beta1 * (1.0 - 0.5 * (0.96 ** (t * self.momentum_decay)))

    def mu_product(self, step: int) -> float:
        """Πₜ = μ₁·…·μₜ, multiplied in the order torch does (from the cached Πₜ₋₁ when the
        previous step's is cached, else from scratch: exact for any resumed step)."""
        key = (self.beta1, self.momentum_decay)
        cached = self._products
        t, prod = (cached[2], cached[3]) if cached[:2] == key and cached[2] <= step else (0, 1.0)
        while t < step:
            t += 1
            prod *= self._mu(t)
        self._products = (*key, t, prod)
        return prod

    def scalars(self, step: int) -> tuple[float, ...]:
        lr, b1, b2 = self.learning_rate, self.beta1, self.beta2
        if self.convention == "optax":  # constant β₁, Adam's bias corrections
            cg = -lr * (1.0 - b1) / (1.0 - b1**step)
            cm = -lr * b1 / (1.0 - b1 ** (step + 1))
            return (lr, 1 - b1, b2, 1 - b2, 1 - b2**step, self.epsilon, cg, cm)
        mu, mu_next = self._mu(step), self._mu(step + 1)
        prod = self.mu_product(step)
        # as torch computes them, in Python floats
        cg = -lr * (1.0 - mu) / (1.0 - prod)
        cm = (-lr * mu_next) / (1.0 - prod * mu_next)
        return (lr, 1 - b1, b2, 1 - b2, 1 - b2**step, self.epsilon, cg, cm)

    def kernel_math(self) -> Any:
        return _nadam
