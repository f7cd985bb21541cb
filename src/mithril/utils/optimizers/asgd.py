"""Averaged SGD with torch.optim conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive
from .elementwise import maximum, where
from .state import OptimizerState


def _asgd(p, g, ax, lr, lambd, alpha, t0, decay, eta, mu, mu_c):
    p = p * decay - eta * g                # torch: p.mul_(1 − λ·η); p.add_(g, alpha=−η)
    return p, p * mu + ax * mu_c           # μ = 1: ax ← p exactly (torch copies)


class ASGD(Optimizer):
    """Averaged SGD (Polyak & Juditsky; Bottou's schedule) as torch.optim.ASGD::

        p ← p·(1 − λ·ηₜ) − ηₜ·g
        ax ← ax + μₜ·(p − ax)
        ηₜ₊₁ = lrₜ / (1 + λ·lrₜ·t)^α        μₜ₊₁ = 1 / max(1, t − t₀)      (η₁ = lr, μ₁ = 1)

    ``ax``, the running average of the parameters since step t₀ + 2 (before it, the current
    parameters), is the slot ``ax``: :meth:`averaged_params` gives it per parameter, the
    weights to evaluate with. The update itself is plain SGD with a decaying step.

    Conventions of torch, kept: ηₜ₊₁ and μₜ₊₁ are computed at the end of step t, from that
    step's lr, and kept per tensor in the tensor slots ``eta`` and ``mu`` (torch's state of
    the same names), so a new learning rate is used one step late, parameter groups keep
    their own, and a restored state resumes exactly. They are stored in the parameters'
    dtype; torch keeps them in its default dtype (float32 unless
    ``torch.set_default_dtype(torch.float64)``). ``weight_decay`` is coupled L2
    (``g ← g + wd·p``, torch). Defaults are torch's: lr 1e-2, λ (``lambd``) 1e-4, α 0.75,
    t₀ 1e6. optax and Keras have no ASGD.

    torch's ``maximize`` / ``foreach`` / ``capturable`` / ``differentiable`` are not
    arguments: negate the loss to maximise; the fused kernels choose the loop.
    """

    slots = ("ax",)
    tensor_slots = ("eta", "mu")

    def __init__(self, learning_rate: float = 1e-2, lambd: float = 1e-4, alpha: float = 0.75,
                 t0: float = 1e6, weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.lambd = check_positive("lambd", lambd)
        self.alpha = check_positive("alpha", alpha)
        self.t0 = check_positive("t0", t0)

    def scalars(self, step: int) -> tuple[float, ...]:
        return (self.learning_rate, self.lambd, self.alpha, self.t0)

    def kernel_math(self) -> Any:
        return _asgd

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        lr, lambd, alpha, t0 = scalars
        eta = where(step == 1, lr, tensors["eta"])  # torch's initial state: η = lr, μ = 1
        mu = where(step == 1, 1.0, tensors["mu"])
        new = {"eta": lr / ((1 + lambd * lr * step) ** alpha),
               "mu": 1 / maximum(step - t0, 1.0)}
        return (1 - lambd * eta, eta, mu, 1 - mu), new, values

    def averaged_params(self, state: OptimizerState) -> dict[str, Any]:
        """The averaged parameters ``ax``, per parameter (``state.slot("ax")``: views of the
        state on NumPy/torch, which the next update overwrites; copy them to keep them)."""
        return state.slot("ax")
