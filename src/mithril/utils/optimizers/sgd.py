"""Stochastic gradient descent with optional (Nesterov) momentum; torch.optim conventions by
default, optax's, Keras's or MLX's on request (``convention=``, whose helpers live here)."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit, switched_on

#: the libraries whose conventions SGD, Adam, RMSProp, AdaGrad and NAdam can follow
CONVENTIONS = ("torch", "optax", "keras")


class _ByConvention:
    """The default of a hyperparameter whose value depends on ``convention``."""

    def __repr__(self) -> str:
        return "BY_CONVENTION"


BY_CONVENTION: Any = _ByConvention()


def check_convention(convention: Any, allowed: tuple[str, ...] = CONVENTIONS) -> str:
    """``convention`` if it is one of ``allowed`` (by default :data:`CONVENTIONS`; an
    optimizer that also follows MLX passes ``(*CONVENTIONS, "mlx")``), else a ValueError
    naming them."""
    if not isinstance(convention, str) or convention not in allowed:
        raise ValueError(f"convention must be one of {allowed}, got {convention!r}")
    return convention


def check_decoupled(convention: str, value: Any) -> bool:
    """``decoupled_weight_decay`` checked (a bool): by default (:data:`BY_CONVENTION`)
    decoupled under Keras's convention only, whose weight decay is decoupled only (False
    there is a ValueError)."""
    if value is BY_CONVENTION:
        value = convention == "keras"
    value = check_flag("decoupled_weight_decay", value)
    if convention == "keras" and not value:
        raise ValueError("decoupled_weight_decay=False: Keras's weight decay is decoupled "
                         "only (convention='keras')")
    return value


def _plain(p, g, lr):
    return (p - lr * g,)


def _momentum(p, g, b, lr, mu_t, c_t):
    b = mu_t * b + c_t * g
    return p - lr * b, b


def _nesterov(p, g, b, lr, mu_t, c_t, mu):
    b = mu_t * b + c_t * g
    return p - lr * (g + mu * b), b


def _mlx_momentum(p, g, b, lr, mu, c):
    b = mu * b + c * g               # MLX: b starts at 0 and step 1 is dampened too
    return p - lr * b, b


def _mlx_nesterov(p, g, b, lr, mu, c):
    b = mu * b + c * g
    return p - lr * (g + mu * b), b


def _keras_momentum(p, g, v, lr, mu):
    v = mu * v - lr * g              # Keras: the velocity holds lr
    return p + v, v


def _keras_nesterov(p, g, v, lr, mu):
    v = mu * v - lr * g
    return p + (mu * v - lr * g), v


class SGD(Optimizer):
    """SGD: ``p ← p − lr·u`` with, for momentum μ > 0 and dampening τ,

    ``b₁ = g`` on the first step (no dampening, as torch), then ``b ← μ·b + (1−τ)·g``;
    ``u = g + μ·b`` (Nesterov) or ``u = b``. ``weight_decay`` adds ``wd·p`` to ``g`` first.
    lr stays outside the buffer (torch), so changing lr mid-run rescales the whole step.

    "First step" is the optimizer's first step (one step count per state, as for every
    optimizer here): a parameter whose first gradient arrives later starts from ``b = 0``,
    so with dampening its first buffer is ``(1−τ)·g`` where torch, which counts per
    parameter, takes ``g``. Without dampening the two agree.

    ``convention`` (default ``"torch"``, the above):

    * ``"optax"`` (``optax.sgd``; ``weight_decay`` as ``optax.chain(add_decayed_weights(wd),
      sgd(...))``): the same update and coupled decay; optax has no dampening (refused).
    * ``"keras"`` (``keras.optimizers.SGD``): **lr inside the velocity**,
      ``v ← μ·v − lr·g``, ``p ← p + v`` (Nesterov: ``p ← p + μ·v − lr·g``); the slot holds
      that velocity. Equal to torch only while lr is constant. ``weight_decay`` is Keras's
      decoupled ``p ← p − lr·wd·p`` before the step. No dampening (refused).
    * ``"mlx"`` (``mlx.optimizers.SGD``): **the buffer starts at 0 and every step, the first
      included, is dampened**: ``b ← μ·b + (1−τ)·g`` from ``b = 0``, so with dampening the
      first steps are smaller than torch's. Coupled ``weight_decay`` as torch's. Nesterov
      needs momentum > 0 and no dampening, as torch.

    Nesterov without momentum is plain SGD under ``"optax"`` and ``"keras"``, as theirs;
    torch's and MLX's conventions refuse it, as torch and MLX.
    """

    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0, convention: str = "torch",
                 **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.convention = check_convention(convention, (*CONVENTIONS, "mlx"))
        self.momentum = check_unit("momentum", momentum)
        self.dampening = check_positive("dampening", dampening)
        if self.dampening > 1:
            raise ValueError(f"dampening must be in [0, 1], got {dampening!r}")
        if self.dampening and convention not in ("torch", "mlx"):
            raise ValueError(f"dampening={dampening!r}: {convention} SGD has no dampening "
                             f"(convention='torch' and 'mlx' have)")
        # (optax and Keras take Nesterov without momentum: plain SGD; torch and MLX refuse it)
        if check_flag("nesterov", nesterov) and convention in ("torch", "mlx") and (
                self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        self.nesterov = bool(nesterov)

    @property
    def decoupled_weight_decay(self) -> bool:  # type: ignore[override]
        return self.convention == "keras"

    def slot_names(self) -> tuple[str, ...]:
        return ("momentum",) if self.momentum else ()

    def scalars(self, step: int) -> tuple[float, ...]:
        # (arithmetic in the step, so that a JAX program traces it: no host callback)
        if not switched_on(self.momentum):
            return (self.learning_rate,)
        if self.convention == "keras":
            return (self.learning_rate, self.momentum)
        if self.convention == "mlx":
            return (self.learning_rate, self.momentum, 1.0 - self.dampening)
        later = (step != 1) * 1.0  # the first step's buffer is the gradient itself (torch)
        mu_t, c_t = self.momentum * later, 1.0 - self.dampening * later
        return (self.learning_rate, mu_t, c_t, self.momentum) if self.nesterov else \
            (self.learning_rate, mu_t, c_t)

    def kernel_math(self) -> Any:
        if not self.momentum:
            return _plain
        if self.convention == "keras":
            return _keras_nesterov if self.nesterov else _keras_momentum
        if self.convention == "mlx":  # (not torch's functions: torch's fused SGD would run them)
            return _mlx_nesterov if self.nesterov else _mlx_momentum
        return _nesterov if self.nesterov else _momentum
