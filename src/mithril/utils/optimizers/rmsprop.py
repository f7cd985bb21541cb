"""RMSProp; torch.optim conventions by default, optax's, Keras's or MLX's on request."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_flag, check_positive, check_unit, switched_on
from .elementwise import maximum, sqrt
from .sgd import BY_CONVENTION, CONVENTIONS, check_convention


def _plain(p, g, v, lr, a, ac, eps):
    v = a * v + ac * g * g
    return p - lr * (g / (sqrt(v) + eps)), v


def _centered(p, g, v, ga, lr, a, ac, eps):
    v = a * v + ac * g * g
    ga = ga + ac * (g - ga)
    return p - lr * (g / (sqrt(maximum(v - ga * ga, 0.0)) + eps)), v, ga


def _momentum(p, g, v, b, lr, a, ac, eps, mu):
    v = a * v + ac * g * g
    b = mu * b + g / (sqrt(v) + eps)
    return p - lr * b, v, b


def _centered_momentum(p, g, v, ga, b, lr, a, ac, eps, mu):
    v = a * v + ac * g * g
    ga = ga + ac * (g - ga)
    b = mu * b + g / (sqrt(maximum(v - ga * ga, 0.0)) + eps)
    return p - lr * b, v, ga, b


# optax / Keras: ε inside the square root, lr inside the momentum buffer
def _plain_in(p, g, v, lr, a, ac, eps):
    v = a * v + ac * g * g
    return p - lr * g / sqrt(v + eps), v


def _centered_in(p, g, v, ga, lr, a, ac, eps):
    v = a * v + ac * g * g
    ga = ga + ac * (g - ga)
    return p - lr * g / sqrt(maximum(v - ga * ga, 0.0) + eps), v, ga


def _momentum_in(p, g, v, b, lr, a, ac, eps, mu):
    v = a * v + ac * g * g
    b = mu * b + lr * g / sqrt(v + eps)
    return p - b, v, b


def _centered_momentum_in(p, g, v, ga, b, lr, a, ac, eps, mu):
    v = a * v + ac * g * g
    ga = ga + ac * (g - ga)
    b = mu * b + lr * g / sqrt(maximum(v - ga * ga, 0.0) + eps)
    return p - b, v, ga, b


def _plain_mlx(p, g, v, lr, a, ac, eps):
    v = a * v + ac * (g * g)
    return p - lr * g / (sqrt(v) + eps), v     # MLX: (lr·g)/(√v + ε)


_MATH = {(False, False): _plain, (True, False): _centered, (False, True): _momentum,
         (True, True): _centered_momentum}
_MATH_IN = {(False, False): _plain_in, (True, False): _centered_in, (False, True): _momentum_in,
            (True, True): _centered_momentum_in}


class RMSProp(Optimizer):
    """RMSProp as torch.optim.RMSprop (with ``decay`` = torch's α)::

        v ← α·v + (1−α)·g²          (centered: ḡ ← α·ḡ + (1−α)·g, denominator √max(v − ḡ², 0))
        d = √v + ε                  (ε outside the sqrt, as torch; optax default puts it inside)
        momentum μ > 0:  b ← μ·b + g/d;  p ← p − lr·b   (lr outside the buffer, as torch)
        otherwise:       p ← p − lr·g/d

    Default ``decay=0.9`` as the guide, optax and Keras (torch defaults to 0.99, and so
    does ``convention="mlx"``, as MLX).
    Centered: ``v − ḡ²`` is clamped at 0 - once the gradient is (nearly) constant it cancels
    to rounding noise, and torch's ``sqrt`` of a slightly negative value gives NaN parameters
    (e.g. after ~330 steps of a constant gradient at α=0.9); otherwise identical to torch.

    ``convention`` (default ``"torch"``, the above); ``"optax"`` (``optax.rmsprop`` with its
    defaults ``eps_in_sqrt=True``, ``bias_correction=False``) and ``"keras"``
    (``keras.optimizers.RMSprop``) share one update, with **ε inside the square root** and
    **lr inside the momentum buffer**::

        d = √(v + ε)                (centered: √(max(v − ḡ², 0) + ε))
        momentum μ > 0:  b ← μ·b + lr·g/d;  p ← p − b
        otherwise:       p ← p − lr·g/d

    so the buffer keeps the learning rate of each past step and the step changes gradually
    when lr does (optax's trace holds −b). ``weight_decay``: optax has none in rmsprop and
    is coupled here as ``optax.chain(add_decayed_weights(wd), rmsprop(...))``; Keras's is
    decoupled, ``p ← p − lr·wd·p`` before the step. Keras's default ε is 1e-7.

    ``"mlx"`` (``mlx.optimizers.RMSprop``): torch's plain update (``√v + ε``) in MLX's order
    of operations, with MLX's default ``decay=0.99`` (its ``alpha``); MLX has no momentum
    and no centered variant (refused) and no weight decay (coupled here, as torch's).
    """

    def __init__(self, learning_rate: float = 1e-3, decay: float = BY_CONVENTION,
                 epsilon: float = 1e-8, momentum: float = 0.0, centered: bool = False,
                 weight_decay: float = 0.0, convention: str = "torch", **options: Any) -> None:
        theirs = [k for k in ("rho", "alpha") if k in options]
        if theirs:  # (the generic hint names other optimizers that take these names)
            raise TypeError(f"RMSProp() takes decay= for Keras's rho= and torch's alpha= "
                            f"(got {theirs[0]}={options[theirs[0]]!r})")
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.convention = check_convention(convention, (*CONVENTIONS, "mlx"))
        self.decay = check_unit("decay", (0.99 if convention == "mlx" else 0.9)
                                if decay is BY_CONVENTION else decay)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.momentum = check_unit("momentum", momentum)
        self.centered = check_flag("centered", centered)
        for name in ("momentum", "centered"):
            if convention == "mlx" and getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r}: MLX's RMSprop has no "
                                 f"{name} (convention='mlx')")

    @property
    def decoupled_weight_decay(self) -> bool:  # type: ignore[override]
        return self.convention == "keras"

    def slot_names(self) -> tuple[str, ...]:
        return ("v",) + (("grad_avg",) if self.centered else ()) + (("momentum",) if self.momentum else ())

    def scalars(self, step: int) -> tuple[float, ...]:
        # 1 − α passed in (torch computes it in Python too; an int literal in the kernel
        # would also promote float32 math to float64)
        s = (self.learning_rate, self.decay, 1 - self.decay, self.epsilon)
        return s + (self.momentum,) if switched_on(self.momentum) else s

    def kernel_math(self) -> Any:
        if self.convention == "mlx":
            return _plain_mlx
        table = _MATH if self.convention == "torch" else _MATH_IN
        return table[(self.centered, bool(self.momentum))]
