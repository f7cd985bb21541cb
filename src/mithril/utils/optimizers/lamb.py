"""LAMB (layer-wise adaptive moments), optax conventions or Keras's: a two-pass optimizer."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_positive, check_unit
from .elementwise import helper, sqrt, where


@helper
def _direction(p, g, m, v, b1, b1c, b2, b2c, bc1, bc2, eps, eps_root, wd):
    m = b1 * m + b1c * g
    v = b2 * v + b2c * g * g
    return m, v, (m / bc1) / (sqrt(v / bc2 + eps_root) + eps) + wd * p


def _lamb_reduce(p, g, m, v, lr, b1, b1c, b2, b2c, bc1, bc2, eps, eps_root, wd):
    u = _direction(p, g, m, v, b1, b1c, b2, b2c, bc1, bc2, eps, eps_root, wd)[2]
    return p * p, u * u


def _lamb(p, g, m, v, lr, b1, b1c, b2, b2c, bc1, bc2, eps, eps_root, wd, ratio):
    m, v, u = _direction(p, g, m, v, b1, b1c, b2, b2c, bc1, bc2, eps, eps_root, wd)
    return p - lr * (ratio * u), m, v


def trust_ratio(param_sq: Any, update_sq: Any, coefficient: Any = 1.0, eps: Any = 0.0) -> Any:
    """optax ``scale_by_trust_ratio``: ``c·‖p‖ / (‖u‖ + ε)``, 1 where either norm is 0."""
    pn, un = sqrt(param_sq), sqrt(update_sq)
    return where((pn == 0) | (un == 0), 1.0, coefficient * pn / (un + eps))


class LAMB(Optimizer):
    """LAMB (You et al., 2019) as optax.lamb::

        m ← β₁·m + (1−β₁)·g          v ← β₂·v + (1−β₂)·g²
        u ← m̂ / (√(v̂ + ε_root) + ε) + wd·p          (m̂, v̂ bias-corrected)
        p ← p − lr · (‖p‖ / ‖u‖) · u                 (per tensor; ratio 1 if a norm is 0)

    Two passes over the data: the first (read-only) sums ‖p‖² and ‖u‖² per tensor, the
    second applies the update (see ``Optimizer.reductions``). Weight decay is inside the
    trust ratio, as optax (``add_decayed_weights`` before ``scale_by_trust_ratio``);
    ``weight_decay_mask`` / parameter groups exclude tensors from it. Defaults are optax's
    (ε 1e-6, no decay). torch has no LAMB.

    ``convention="keras"`` (``keras.optimizers.Lamb``, default ε 1e-7: pass it): the same
    step without ``wd·p`` in ``u``; ``weight_decay`` is Keras's decoupled ``p ← p − lr·wd·p``
    before the step, so ‖p‖ is the decayed parameter's. Keras has no ``eps_root`` (refused).
    """

    slots = ("m", "v")
    reductions = 2

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-6, eps_root: float = 0.0, weight_decay: float = 0.0,
                 convention: str = "optax", **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        if convention not in ("optax", "keras"):
            raise ValueError(f"convention must be 'optax' or 'keras' (torch has no LAMB), "
                             f"got {convention!r}")
        self.convention = convention
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon)
        self.eps_root = check_positive("eps_root", eps_root)
        if self.eps_root and convention == "keras":
            raise ValueError(f"eps_root={eps_root!r}: Keras's Lamb has none "
                             f"(convention='keras')")

    @property
    def weight_decay_in_math(self) -> bool:  # type: ignore[override]
        return self.convention == "optax"

    @property
    def decoupled_weight_decay(self) -> bool:  # type: ignore[override]
        return self.convention == "keras"

    def scalars(self, step: int) -> tuple[float, ...]:
        b1, b2 = self.beta1, self.beta2
        return (self.learning_rate, b1, 1 - b1, b2, 1 - b2, 1 - b1**step, 1 - b2**step,
                self.epsilon, self.eps_root,
                self.weight_decay if self.weight_decay_in_math else 0.0)  # (Keras: decoupled)

    def reduce_math(self) -> Any:
        return _lamb_reduce

    def kernel_math(self) -> Any:
        return _lamb

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        return (trust_ratio(*sums),), tensors, values
