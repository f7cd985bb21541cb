"""NAdam; torch.optim conventions by default, optax's or Keras's on request."""

from __future__ import annotations

from typing import Any

from .adam import correction
from .base import Optimizer
from .checks import check_mu_dtype, check_positive, check_unit, refuse_unless
from .elementwise import array_only, helper, sqrt
from .sgd import BY_CONVENTION, check_convention, check_decoupled


@helper
def _nadam(p, g, m, v, lr, b1c, b2, b2c, bc2, eps, cg, cm):
    m = m + b1c * (g - m)                  # torch: m.lerp_(g, 1 − β₁)
    v = v * b2 + b2c * g * g
    d = sqrt(v / bc2) + eps
    return p + cg * (g / d) + cm * (m / d), m, v   # torch: two addcdiv_, g's first


def _nadam_optax(p, g, m, v, lr, b1c, b2, b2c, bc2, eps, cg, cm, eps_root):
    m = m + b1c * (g - m)
    v = v * b2 + b2c * g * g
    d = sqrt(v / bc2 + eps_root) + eps                 # optax: ε_root inside the root
    return p + cg * (g / d) + cm * (m / d), m, v


@array_only
def _nadam_mu(p, g, m, v, lr, b1, b1c, b2, b2c, t, eps, eps_root):
    # optax's order (mu_dtype): β₁·m in m's own dtype, its Nesterov m̂ and corrections
    m = b1c * g + b1 * m
    v = b2c * (g * g) + b2 * v
    mh = b1 * (m / correction(m, b1, t + 1)) + b1c * (g / correction(g, b1, t))
    return p + (-lr) * (mh / (sqrt(v / correction(v, b2, t) + eps_root) + eps)), m, v


@array_only
def _nadamw_mu(p, g, m, v, lr, b1, b1c, b2, b2c, t, eps, eps_root, wd):
    m = b1c * g + b1 * m
    v = b2c * (g * g) + b2 * v
    mh = b1 * (m / correction(m, b1, t + 1)) + b1c * (g / correction(g, b1, t))
    u = mh / (sqrt(v / correction(v, b2, t) + eps_root) + eps)
    return p + (-lr) * (u + wd * p), m, v          # optax.nadamw: −lr·(u + wd·p)


def _nadam_scheduled(p, g, m, v, lr, b1c, b2, b2c, bc2, eps, b1, psi, cg, cm):
    # (β₁ and ψ are read between the passes, by tensor_scalars, which gives cg and cm)
    return _nadam(p, g, m, v, lr, b1c, b2, b2c, bc2, eps, cg, cm)


class NAdam(Optimizer):
    """NAdam (Dozat, 2016) as torch.optim.NAdam, with its momentum schedule::

        μₜ = β₁·(1 − ½·0.96^(t·ψ))        Πₜ = μ₁·μ₂·…·μₜ        (ψ = momentum_decay)
        m ← β₁·m + (1−β₁)·g              v ← β₂·v + (1−β₂)·g²
        d = √(v / (1−β₂ᵗ)) + ε
        p ← p − lr·(1−μₜ)/(1−Πₜ) · g/d − lr·μₜ₊₁/(1−Πₜ·μₜ₊₁) · m/d

    Slots ``m`` and ``v`` (torch's ``exp_avg``/``exp_avg_sq``) and, as torch, the running
    product Πₜ per tensor (tensor slot ``mu_product``, multiplied by each step's μₜ between
    a read-free first pass and the update): a β₁ or ψ changed mid-run (a momentum cycle, a
    parameter group's own) is multiplied in from that step on, as in torch, and a restored
    state continues exactly. Πₜ is kept in the parameters' dtype; torch keeps it in its
    default dtype (rounded to float32 each step unless ``torch.set_default_dtype(
    torch.float64)``: the two then differ by ~1e-8 relative for float64 parameters).

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
      Πₜ is Keras's one product for the optimizer (``state.values["mu_product"]``),
      advanced on every step, so a tensor whose gradient misses steps follows Keras (with
      the first parameter's β₁: Keras has one). A group of another convention is refused.
    * ``"optax"`` (``optax.nadam``): **no μ schedule** (``momentum_decay`` is None; a value
      is refused): Adam's bias corrections with a constant β₁ and a Nesterov look-ahead,
      ``p ← p − lr·(1−β₁)/(1−β₁ᵗ) · g/d − lr·β₁/(1−β₁ᵗ⁺¹) · m/d``. ``weight_decay`` is
      coupled (``optax.chain(add_decayed_weights(wd), nadam(...))``), or with
      ``decoupled_weight_decay=True`` ``optax.nadamw``'s ``p ← p − lr·(step + wd·p)``.
      ``eps_root`` (optax's, default 0): ``d = √(v/(1−β₂ᵗ) + ε_root) + ε``; torch and Keras
      have none (refused there). optax's ``nesterov`` is this (True); False is
      ``optax.adam`` (:class:`Adam` with ``convention="optax"``).

    ``mu_dtype`` (optax's; None: the parameters' dtype): ``m`` kept in that dtype, as
    :class:`Adam`'s (the per-tensor array engine; under ``"optax"`` optax's order and
    bias corrections to the bit, ``nadamw``'s ``p − lr·(u + wd·p)``).

    torch's ``maximize`` / ``foreach`` / ``capturable`` / ``differentiable`` are not
    arguments: negate the loss to maximise; the fused kernels choose the loop.
    """

    slots = ("m", "v")
    step_wide = ("mu_dtype",)  # (one dtype per slot buffer: not a group's)

    def __init__(self, learning_rate: float = 2e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float = 0.0,
                 momentum_decay: float | None = BY_CONVENTION,
                 decoupled_weight_decay: bool = BY_CONVENTION, convention: str = "torch",
                 eps_root: float | None = None, mu_dtype: Any = None, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.mu_dtype = check_mu_dtype(mu_dtype)
        self.convention = check_convention(convention)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.momentum_decay = self._check_momentum_decay(momentum_decay)
        # optax's only: None under the others (no hyperparameter to drive or trace)
        refuse_unless(self.convention, "optax", eps_root=eps_root)
        self.eps_root = (check_positive("eps_root", 0.0 if eps_root is None else eps_root)
                         if self.convention == "optax" else None)
        # an instance attribute: the engines read opt.decoupled_weight_decay
        self.decoupled_weight_decay = check_decoupled(self.convention, decoupled_weight_decay)

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

    @property
    def tensor_slots(self) -> tuple[str, ...]:  # type: ignore[override]
        """torch's per-tensor running product Πₜ (a tensor without a gradient skips it)."""
        return ("mu_product",) if self.convention == "torch" else ()

    @property
    def state_values(self) -> tuple[str, ...]:  # type: ignore[override]
        """Keras's one Πₜ for the whole optimizer, advanced on every step."""
        return ("mu_product",) if self.convention == "keras" else ()

    @property
    def counts_missed(self) -> bool:
        """Keras counts one step for the optimizer (its ``iterations``, which Πₜ reads): a
        parameter's missed steps (``note_missed``) leave its count there."""
        return self.convention != "keras"

    def rule(self) -> tuple[Any, ...]:
        # Keras's one product and torch's per-tensor ones cannot mix in one state: a group
        # of the other convention is refused (as one that changes the slots)
        return (*super().rule(), self.tensor_slots, self.state_values, self.mu_dtype)

    def slot_init(self, slot: str) -> float:
        return 1.0 if slot == "mu_product" else 0.0

    def state_value_init(self, name: str) -> float:
        return 1.0

    def _optax_mu(self) -> bool:
        """Whether the step is optax's with ``mu_dtype`` (its own order)."""
        return self.mu_dtype is not None and self.convention == "optax"

    @property
    def weight_decay_in_math(self) -> bool:  # type: ignore[override]
        """optax.nadamw's decay inside the step (``_nadamw_mu``), with ``mu_dtype``."""
        return self._optax_mu() and self.decoupled_weight_decay

    def scalars(self, step: int) -> tuple[float, ...]:
        lr, b1, b2 = self.learning_rate, self.beta1, self.beta2
        if self._optax_mu():  # (the corrections are made in the kernel: adam.correction)
            mu = (lr, b1, 1 - b1, b2, 1 - b2, step, self.epsilon, self.eps_root)
            return (*mu, self.weight_decay) if self.weight_decay_in_math else mu
        if self.convention == "optax":  # constant β₁, Adam's bias corrections
            cg = -lr * (1.0 - b1) / (1.0 - b1**step)
            cm = -lr * b1 / (1.0 - b1 ** (step + 1))
            return (lr, 1 - b1, b2, 1 - b2, 1 - b2**step, self.epsilon, cg, cm, self.eps_root)
        return (lr, 1 - b1, b2, 1 - b2, 1 - b2**step, self.epsilon, b1, self.momentum_decay)

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        """Per tensor, as torch (in its Python floats): μₜ and μₜ₊₁ from this step's β₁ and
        ψ, Πₜ = Πₜ₋₁·μₜ, and the two coefficients of the update."""
        lr, b1, psi = scalars[0], scalars[6], scalars[7]
        mu = b1 * (1.0 - 0.5 * 0.96 ** (step * psi))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
        if self.convention == "keras":  # one product, with the first tensor's β₁ (Keras has one;
            prod = values["mu_product"] * mu[:1].prod()  # no tensor: a product of none, 1)
            values = {"mu_product": prod}
        else:
            prod = tensors["mu_product"] = tensors["mu_product"] * mu
        cg = -lr * (1.0 - mu) / (1.0 - prod)
        cm = (-lr * mu_next) / (1.0 - prod * mu_next)
        return (cg, cm), tensors, values

    def kernel_math(self) -> Any:
        if self._optax_mu():
            return _nadamw_mu if self.weight_decay_in_math else _nadam_mu
        return _nadam_optax if self.convention == "optax" else _nadam_scheduled
