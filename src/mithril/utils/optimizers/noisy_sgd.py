"""Noisy SGD (annealed Gaussian gradient noise), optax conventions, with counter-based noise:
the same draws on every backend, in every engine and inside JAX programs."""

from __future__ import annotations

import math
import zlib
from typing import Any

from .checks import check_int, check_positive
from .tensorwise import NumpyOps, TensorwiseOptimizer

_MASK = 0xFFFFFFFF


def _mix(xp: NumpyOps, x: Any) -> Any:
    """A 32-bit integer hash (Wellons' ``lowbias32``), elementwise. NumPy and JAX compute
    in uint32 (products wrap); torch, whose uint32 has no multiply, in int64 masked to the
    low 32 bits (the same bits)."""
    torch = xp.name == "torch"
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        x = (x * mult) & _MASK if torch else x * xp.m.uint32(mult)
    return x ^ (x >> 16)


def gaussian_noise(xp: NumpyOps, shape: tuple[int, ...], seed: int, name: str, step: Any,
                   dtype: Any) -> Any:
    """Standard normal noise of ``shape`` for parameter ``name`` at 1-based ``step``: a pure
    function of (seed, name, step, element index), by Box–Muller on two 32-bit hashes of
    each element's counter (in float64, or float32 where JAX runs without x64), cast to
    ``dtype``. ``step`` may be a traced JAX value."""
    m, torch = xp.m, xp.name == "torch"
    n = math.prod(shape)
    itype = m.int64 if torch else m.uint32
    tag = zlib.crc32(name.encode()) ^ (seed & _MASK)  # (the parameter and the seed)
    # (1-element arrays, not 0-d: NumPy warns on a 0-d product's wrap-around)
    key = _mix(xp, m.asarray([tag], dtype=itype))
    if torch:
        step_bits = m.asarray([int(step) & _MASK], dtype=itype)
    else:
        step_bits = m.asarray(step).astype(itype).reshape(1)
    key = _mix(xp, key ^ _mix(xp, step_bits))
    i = m.arange(n, dtype=itype)
    a = _mix(xp, key ^ _mix(xp, i * 2))
    b = _mix(xp, key ^ _mix(xp, i * 2 + 1))
    ftype = m.float64 if torch or xp.name == "numpy" else m.asarray(0.0).dtype
    u1 = (a.to(ftype) if torch else a.astype(ftype)) + 0.5  # in (0, 2³²): log finite
    u2 = b.to(ftype) if torch else b.astype(ftype)
    scale = 2.0**-32
    z = m.sqrt(-2.0 * m.log(u1 * scale)) * m.cos((2.0 * math.pi * scale) * u2)
    z = z.reshape(shape)
    return z.to(dtype) if torch else z.astype(dtype)


class NoisySGD(TensorwiseOptimizer):
    """SGD with annealed Gaussian gradient noise (Neelakantan et al., 2015) as
    optax.noisy_sgd (``add_noise``, then the learning rate), at step t = 1, 2, ...::

        σ_t = √(η / t^γ)
        p ← p − lr·(g + σ_t·ξ_t),    ξ_t ~ N(0, I)

    ``eta`` (η, the variance at t = 1) and ``gamma`` (γ, its decay exponent) default to
    optax's 0.01 and 0.55. ``weight_decay`` is coupled L2 (``g ← g + wd·p`` before the noise:
    optax.add_decayed_weights chained in front); optax's has none. No slots.

    The noise: reproducible, and the same on every backend and engine (NumPy, torch, the
    JAX engine and an optax transformation / ``make_train_step`` program; up to the last bit
    of the libraries' float64 ``log`` / ``cos``, the integer draws alike). It is a pure
    function of ``seed``, the parameter's name, the step count and the element's index
    (a counter-based generator: 32-bit integer hashes, Box–Muller in float64, or float32 on
    JAX without x64, then cast to the parameter's dtype), so a run resumed from a checkpoint
    draws the noise the uninterrupted run would, and a parameter's noise does not depend on
    the others. optax's ``key`` seeds ``jax.random`` instead: the distribution is the same,
    the draws are not (see :func:`gaussian_noise`). Defaults: lr 1e-2 (optax has none),
    ``seed`` 0 (optax's ``key`` default 0).
    """

    def __init__(self, learning_rate: float = 1e-2, eta: float = 0.01, gamma: float = 0.55,
                 seed: int = 0, weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.eta = check_positive("eta", eta)
        self.gamma = check_positive("gamma", gamma)
        # (as every integer hyperparameter: TypeError for a float, bool or text, ValueError
        # out of [0, 2**32), the hash's 32 bits)
        self.seed = check_int("seed", seed, maximum=2**32 - 1)

    def scalars(self, step: int) -> tuple[Any, ...]:
        # σ_t = √(η / t^γ), as optax's add_noise (arithmetic: the step may be traced)
        return (self.learning_rate, (self.eta / (step * 1.0) ** self.gamma) ** 0.5, step)

    def tensor_update(self, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                      scalars: tuple[Any, ...], name: str) -> tuple[Any, dict[str, Any]]:
        lr, sigma, step = scalars
        noise = gaussian_noise(xp, tuple(g.shape), self.seed, name, step, g.dtype)
        return p - lr * (g + sigma * noise), {}
