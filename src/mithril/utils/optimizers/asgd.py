"""Averaged SGD with torch.optim conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive
from .state import OptimizerState


def _asgd(p, g, ax, lr, decay, eta, mu, mu_c):
    p = p * decay - eta * g                # torch: p.mul_(1 − λ·η); p.add_(g, alpha=−η)
    return p, p * mu + ax * mu_c           # μ = 1: ax ← p exactly (torch copies)


class ASGD(Optimizer):
    """Averaged SGD (Polyak & Juditsky; Bottou's schedule) as torch.optim.ASGD::

        p ← p·(1 − λ·ηₜ) − ηₜ·g
        ax ← ax + μₜ·(p − ax)
        ηₜ = lr / (1 + λ·lr·(t−1))^α        μₜ = 1 / max(1, t − 1 − t₀)

    ``ax``, the running average of the parameters since step t₀ + 2 (before it, the current
    parameters), is the slot ``ax``: :meth:`averaged_params` gives it per parameter, the
    weights to evaluate with. The update itself is plain SGD with a decaying step.

    Conventions of torch, kept: ηₜ and μₜ of step t are computed at the end of step t−1, so
    a new learning rate is used one step late (ηₜ comes from the lr of step t−1; the first
    step uses lr). This optimizer remembers the lr of the previous step for that; a state
    restored from a state dict uses the current lr at its first step (torch: the one saved,
    the same unless lr changed on that very step). ηₜ and μₜ are float64 here; torch keeps
    them in its default dtype, i.e. rounded to float32 unless
    ``torch.set_default_dtype(torch.float64)`` (~1e-8 relative differences in float64).
    ``weight_decay`` is coupled L2 (``g ← g + wd·p``, torch). Defaults are torch's: lr 1e-2,
    λ (``lambd``) 1e-4, α 0.75, t₀ 1e6. optax and Keras have no ASGD.
    """

    slots = ("ax",)

    def __init__(self, learning_rate: float = 1e-2, lambd: float = 1e-4, alpha: float = 0.75,
                 t0: float = 1e6, weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.lambd = check_positive("lambd", lambd)
        self.alpha = check_positive("alpha", alpha)
        self.t0 = check_positive("t0", t0)
        self._lrs: dict[int, float] = {}  # step -> the lr it used (the last two steps)

    def eta(self, step: int, lr: float) -> float:
        """ηₜ from the lr of step t−1 (torch's expression)."""
        return lr / ((1 + self.lambd * lr * (step - 1)) ** self.alpha)

    def mu(self, step: int) -> float:
        return 1 / max(1, (step - 1) - self.t0)

    def scalars(self, step: int) -> tuple[float, ...]:
        lr = self.learning_rate
        before = self._lrs.get(step - 1, lr)
        self._lrs = {step - 1: before, step: lr}
        eta, mu = self.eta(step, before), self.mu(step)
        return (lr, 1 - self.lambd * eta, eta, mu, 1 - mu)

    def kernel_math(self) -> Any:
        return _asgd

    def averaged_params(self, state: OptimizerState) -> dict[str, Any]:
        """The averaged parameters ``ax``, per parameter (``state.slot("ax")``: views of the
        state on NumPy/torch, which the next update overwrites; copy them to keep them)."""
        return state.slot("ax")
