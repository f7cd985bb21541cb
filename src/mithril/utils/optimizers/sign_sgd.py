"""signSGD and Signum (the sign of the gradient, or of its moving average), optax conventions."""

from __future__ import annotations

from typing import Any

from .base import Optimizer
from .checks import check_unit, switched_on, to_float
from .elementwise import sign


def _sign_sgd(p, g, lr):
    return (p - lr * sign(g),)


def _signum(p, g, m, lr, b, bc):
    m = b * m + bc * g                 # optax.ema(β, debias=False): no bias correction
    return p - lr * sign(m), m         # (the sign would undo it anyway)


class SignSGD(Optimizer):
    """signSGD (Bernstein et al., 2018) as optax.sign_sgd, and with ``momentum`` β > 0
    Signum as optax.signum::

        p ← p − lr·sign(g)                             (momentum = 0: optax.sign_sgd)
        m ← β·m + (1−β)·g,   p ← p − lr·sign(m)        (momentum β: optax.signum)

    sign(0) = 0 (``jnp.sign``). The moving average has no bias correction (optax's
    ``ema(β, debias=False)``: only its sign is used). Slot ``m`` only with momentum.
    optax has no weight decay for either: ``weight_decay`` here is coupled L2
    (``g ← g + wd·p``, optax.add_decayed_weights chained in front, as the paper's Signum).
    Default lr 1e-3 (optax has none); momentum 0 (optax.sign_sgd; optax.signum's β is 0.9:
    :class:`Signum`). torch 2.x and Keras 3 have neither. optax.signum's ``beta`` is
    ``momentum`` here; its ``accumulator_dtype`` is not offered (``m`` is in the parameters'
    dtype).
    """

    def __init__(self, learning_rate: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.momentum = check_unit("momentum", momentum)

    def slot_names(self) -> tuple[str, ...]:
        return ("m",) if self.momentum else ()

    def scalars(self, step: int) -> tuple[float, ...]:
        if not switched_on(self.momentum):  # (a traced momentum is never 0: see switched_on)
            return (self.learning_rate,)
        return (self.learning_rate, self.momentum, 1.0 - self.momentum)

    def kernel_math(self) -> Any:
        return _signum if self.momentum else _sign_sgd


class Signum(SignSGD):
    """Signum (Bernstein et al., 2018): :class:`SignSGD` with optax.signum's default
    ``momentum=0.9`` (optax's ``beta``)::

        m ← β·m + (1−β)·g        p ← p − lr·sign(m)

    ``momentum=0`` is refused here (that is :class:`SignSGD`). optax's
    ``accumulator_dtype`` is not offered (``m`` is in the parameters' dtype).
    """

    def __init__(self, learning_rate: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, **options: Any) -> None:
        if to_float("momentum", momentum) == 0.0:
            raise ValueError("momentum=0: Signum needs a momentum in (0, 1); plain signSGD is "
                             "SignSGD")
        super().__init__(learning_rate, momentum, weight_decay, **options)
