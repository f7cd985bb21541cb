"""Adam, AMSGrad and AdamW; torch.optim conventions by default, optax's, Keras's or MLX's on
request."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import numpy as np

from .base import Optimizer
from .checks import check_flag, check_mu_dtype, check_positive, check_unit
from .elementwise import array_only, maximum, sqrt
from .sgd import BY_CONVENTION, CONVENTIONS, check_convention


def _adam(p, g, m, v, lr, b1c, b2, b2c, step_size, bc2_sqrt, eps):
    m = m + b1c * (g - m)           # torch: m.lerp_(g, 1 − β₁)
    v = v * b2 + b2c * g * g         # torch: v.mul_(β₂).addcmul_(g, g, 1 − β₂)
    return p - step_size * (m / (sqrt(v) / bc2_sqrt + eps)), m, v


def _amsgrad(p, g, m, v, vmax, lr, b1c, b2, b2c, step_size, bc2_sqrt, eps):
    m = m + b1c * (g - m)
    v = v * b2 + b2c * g * g
    vmax = maximum(vmax, v)          # torch: the max of the raw v
    return p - step_size * (m / (sqrt(vmax) / bc2_sqrt + eps)), m, v, vmax


def _amsgrad_optax(p, g, m, v, vmax, lr, b1c, b2, b2c, step_size, bc2, eps):
    m = m + b1c * (g - m)
    v = v * b2 + b2c * g * g
    vmax = maximum(vmax, v / bc2)    # optax: the max of the bias-corrected v̂
    return p - step_size * (m / (sqrt(vmax) + eps)), m, v, vmax


def _adam_keras(p, g, m, v, lr, b1c, b2, b2c, alpha, eps):
    m = m + b1c * (g - m)
    v = v * b2 + b2c * g * g
    return p - alpha * m / (sqrt(v) + eps), m, v     # Keras: ε on the raw √v


def _amsgrad_keras(p, g, m, v, vmax, lr, b1c, b2, b2c, alpha, eps):
    m = m + b1c * (g - m)
    v = v * b2 + b2c * g * g
    vmax = maximum(vmax, v)
    return p - alpha * m / (sqrt(vmax) + eps), m, v, vmax


def _adam_mlx(p, g, m, v, lr, b1, b1c, b2, b2c, eps):
    m = b1 * m + b1c * g            # MLX's order of operations, to the bit
    v = b2 * v + b2c * (g * g)
    return p - lr * m / (sqrt(v) + eps), m, v


def _adam_mlx_corrected(p, g, m, v, lr, b1, b1c, b2, b2c, c1, c2, eps):
    m = b1 * m + b1c * g
    v = b2 * v + b2c * (g * g)
    return p - c1 * m / (sqrt(v) * c2 + eps), m, v


def correction(moment: Any, beta: Any, t: Any) -> Any:
    """``1 − βᵗ`` as optax's ``bias_correction`` gives it for ``moment`` (a NumPy or torch
    array): computed in float32 (float64 for a float64 moment), β rounded to it first
    (optax's count is an int32 array: a weak-typed β), then rounded to the moment's dtype;
    a 0-d array of it. Per-element ``beta`` / ``t`` (parameter groups): ``1 − βᵗ`` as is."""
    if not (isinstance(beta, float) and isinstance(t, (int, float))):
        return 1 - beta**t
    torch = type(moment).__module__.split(".", 1)[0] == "torch"
    wide = np.float64 if moment.dtype.itemsize == 8 else np.float32
    c = wide(1) - wide(beta) ** wide(t)  # (equal to XLA's float32 pow, checked to t = 3000)
    return moment.new_tensor(float(c)) if torch else np.asarray(c).astype(moment.dtype)


@array_only
def _adam_mu(p, g, m, v, lr, b1, b1c, b2, b2c, t, eps):
    # optax's order (mu_dtype): β₁·m in m's own dtype (a weak-typed scalar), then promoted
    m = b1c * g + b1 * m
    v = b2c * (g * g) + b2 * v
    u = (m / correction(m, b1, t)) / (sqrt(v / correction(v, b2, t)) + eps)
    return p + (-lr) * u, m, v


@array_only
def _adamw_mu(p, g, m, v, lr, b1, b1c, b2, b2c, t, eps, wd):
    m = b1c * g + b1 * m
    v = b2c * (g * g) + b2 * v
    u = (m / correction(m, b1, t)) / (sqrt(v / correction(v, b2, t)) + eps)
    return p + (-lr) * (u + wd * p), m, v          # optax.adamw: −lr·(u + wd·p)


@array_only
def _amsgrad_mu(p, g, m, v, vmax, lr, b1, b1c, b2, b2c, t, eps):
    m = b1c * g + b1 * m
    v = b2c * (g * g) + b2 * v
    vmax = maximum(vmax, v / correction(v, b2, t))
    return p + (-lr) * ((m / correction(m, b1, t)) / (sqrt(vmax) + eps)), m, v, vmax


@functools.cache
def _powf() -> Any:
    """The C library's ``powf``, or None where ctypes finds none (Windows)."""
    import ctypes

    try:
        f = ctypes.CDLL(None).powf
    except (OSError, AttributeError, TypeError):
        return None
    f.restype, f.argtypes = ctypes.c_float, (ctypes.c_float, ctypes.c_float)
    return f


def f32_pow(x: float, y: float) -> float:
    """``x ** y`` in float32 as MLX's CPU computes it (its C library's ``powf``, whose last
    bit the float64 power rounded to float32, the fallback, misses at times: ``0.9999 **
    508``); ``x`` and ``y`` are rounded to float32 first, as MLX's operands are."""
    f = _powf()
    if f is None:
        return float(np.float32(float(np.float32(x)) ** float(np.float32(y))))
    return f(x, y)


def mlx_corrections(lr: Any, beta1: float, beta2: float, step: Any) -> tuple[Any, Any]:
    """MLX's ``lr/(1−β₁ᵗ)`` and ``1/√(1−β₂ᵗ)``, its bias corrections rounded as MLX rounds
    them: its step counter is an integer array, so ``βᵗ``, ``1 − βᵗ`` and the rsqrt are
    float32 even for float64 parameters (only the division by lr is in lr's precision).
    ``step`` is an int, or a JAX program's traced step (make_train_step, optax interop)."""
    b1, b2 = float(np.float32(beta1)), float(np.float32(beta2))
    if isinstance(step, numbers.Integral):
        f32 = np.float32
        bc1, bc2 = f32(1) - f32(f32_pow(b1, step)), f32(1) - f32(f32_pow(b2, step))
        return lr / float(bc1), float(f32(1) / np.sqrt(bc2))
    import jax.numpy as jnp

    wide = jnp.result_type(float)  # float64 under x64: float32's sqrt and 1/x rounded
    t = jnp.asarray(step, wide)   # once from it, as IEEE's (XLA's own float32 ones are not)
    bc1, bc2 = (1 - (b**t).astype(jnp.float32) for b in (b1, b2))
    root = jnp.sqrt(bc2.astype(wide)).astype(jnp.float32).astype(wide)
    return lr / bc1.astype(wide), (1 / root).astype(jnp.float32).astype(wide)


class Adam(Optimizer):
    """Adam (Kingma & Ba) as torch.optim.Adam / optax.adam (eps_root=0)::

        m ← β₁·m + (1−β₁)·g        v ← β₂·v + (1−β₂)·g²
        p ← p − lr/(1−β₁ᵗ) · m / (√v / √(1−β₂ᵗ) + ε)

    ε is added to the bias-corrected √v̂ (torch/optax; Keras adds it to the raw √v).
    ``weight_decay`` is coupled L2 (``g ← g + wd·p``, torch Adam); use :class:`AdamW` for
    decoupled decay. ``amsgrad`` keeps the max of the raw v and divides it by √(1−β₂ᵗ)
    (torch; optax takes the max of v̂ instead).

    ``convention`` (default ``"torch"``, the above):

    * ``"optax"``: ``optax.adam`` (the same step) and ``optax.amsgrad``, whose slot ``vmax``
      is the max of the bias-corrected ``v̂ = v/(1−β₂ᵗ)``: ``p ← p − lr/(1−β₁ᵗ)·m/(√vmax + ε)``.
      ``weight_decay`` is coupled as ``optax.chain(add_decayed_weights(wd), adam(...))``;
      AdamW's decoupled decay is ``optax.adamw``'s ``p ← p − lr·(step + wd·p)``.
    * ``"keras"``: ``keras.optimizers.Adam``: the bias corrections go into the step size and
      **ε is added to the raw √v**, ``p ← p − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε)`` (much
      smaller steps than torch's while v is small); AMSGrad: ``vmax = max(vmax, v)`` (raw,
      like torch) in place of v. ``weight_decay`` (Adam and AdamW alike) is Keras's decoupled
      ``p ← p − lr·wd·p`` before the step. Keras's default ε is 1e-7: pass ``epsilon=1e-7``.
    * ``"mlx"``: ``mlx.optimizers.Adam`` / ``AdamW``, **without bias correction by default**
      (``bias_correction=False``, MLX's default): ``p ← p − lr·m/(√v + ε)``; with
      ``bias_correction=True``, ``p ← p − lr/(1−β₁ᵗ)·m/(√v/√(1−β₂ᵗ) + ε)``, its corrections
      rounded to float32 as MLX's (:func:`mlx_corrections`). MLX's operation order, so float64
      runs agree to the last bits. No AMSGrad (refused); ``weight_decay`` coupled (MLX's Adam
      has none; AdamW's is MLX's ``p ← p·(1 − lr·wd)`` before the step).

    ``bias_correction`` is MLX's option: the other conventions always correct (True; False
    is refused there).

    ``mu_dtype`` (optax's; None: the parameters' dtype): ``m`` is kept in that dtype
    (``"bfloat16"``, ``"float16"``, ``jnp.bfloat16``, ``torch.bfloat16``...: 2 bytes per
    parameter), each step computing from the stored value in the promoted dtype and storing
    the new ``m`` rounded (``optax.tree.cast(mu, mu_dtype)``); the step uses it unrounded.
    Such a state takes the per-tensor array engine (the fused kernels hold one dtype; on
    JAX host buffers, new arrays per update). With ``convention="optax"`` the step is
    optax's to the bit: its order (``(1−β₁)·g + β₁·m``, β₁·m rounded in m's dtype, a
    weak-typed scalar), its float32 bias corrections and, for AdamW, ``p − lr·(u + wd·p)``.
    Other conventions keep their formula (torch: ``m + (1−β₁)·(g − m)`` in float32 from
    the stored bfloat16, what a hand-written torch loop with ``m.float()`` gives).
    """

    step_wide = ("mu_dtype",)  # (one dtype per slot buffer: not a group's)

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 convention: str = "torch", bias_correction: bool = BY_CONVENTION,
                 mu_dtype: Any = None, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.mu_dtype = check_mu_dtype(mu_dtype)
        self.convention = check_convention(convention, (*CONVENTIONS, "mlx"))
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.amsgrad = check_flag("amsgrad", amsgrad)
        mlx = convention == "mlx"
        if self.amsgrad and mlx:
            raise ValueError("amsgrad=True: MLX's Adam has no AMSGrad (convention='mlx')")
        self.bias_correction = not mlx if bias_correction is BY_CONVENTION else check_flag(
            "bias_correction", bias_correction)
        if not (self.bias_correction or mlx):
            raise ValueError(f"bias_correction=False: {convention}'s Adam always corrects the "
                             f"bias (convention='mlx' has the option)")

    @property
    def decoupled_weight_decay(self) -> bool:  # type: ignore[override]
        return self.convention == "keras"

    def _optax_mu(self) -> bool:
        """Whether the step is optax's with ``mu_dtype`` (its own order: see the class)."""
        return self.mu_dtype is not None and self.convention == "optax"

    @property
    def weight_decay_in_math(self) -> bool:  # type: ignore[override]
        """optax.adamw's decay inside the step (``_adamw_mu``), with ``mu_dtype``."""
        return (self._optax_mu() and not self.amsgrad
                and type(self).decoupled_weight_decay is True)

    def slot_names(self) -> tuple[str, ...]:
        return ("m", "v", "vmax") if self.amsgrad else ("m", "v")

    def rule(self) -> tuple[Any, ...]:
        return (*super().rule(), self.mu_dtype)  # (the dtype of m's buffer: not changed live)

    def scalars(self, step: int) -> tuple[float, ...]:
        bc1 = 1 - self.beta1**step
        bc2 = 1 - self.beta2**step
        lr = self.learning_rate
        if self.convention == "mlx":
            head = (lr, self.beta1, 1 - self.beta1, self.beta2, 1 - self.beta2)
            if not self.bias_correction:
                return (*head, self.epsilon)
            return (*head, *mlx_corrections(lr, self.beta1, self.beta2, step), self.epsilon)
        if self._optax_mu():  # (the bias corrections are made in the kernel: correction)
            mu = (lr, self.beta1, 1 - self.beta1, self.beta2, 1 - self.beta2, step,
                  self.epsilon)
            return (*mu, self.weight_decay) if self.weight_decay_in_math else mu
        head = (lr, 1 - self.beta1, self.beta2, 1 - self.beta2)
        if self.convention == "keras":
            return (*head, lr * math.sqrt(bc2) / bc1, self.epsilon)
        if self.convention == "optax" and self.amsgrad:
            return (*head, lr / bc1, bc2, self.epsilon)
        return (*head, lr / bc1, math.sqrt(bc2), self.epsilon)

    def kernel_math(self) -> Any:
        if self._optax_mu():
            return _amsgrad_mu if self.amsgrad else (
                _adamw_mu if self.weight_decay_in_math else _adam_mu)
        if self.convention == "mlx":
            return _adam_mlx_corrected if self.bias_correction else _adam_mlx
        if self.convention == "keras":
            return _amsgrad_keras if self.amsgrad else _adam_keras
        if self.amsgrad:
            return _amsgrad_optax if self.convention == "optax" else _amsgrad
        return _adam


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as in all four peers:
    ``p ← p·(1 − lr·wd)`` then the Adam step (``convention`` chooses the Adam step, as for
    :class:`Adam`). Default ``weight_decay=1e-2`` (torch, MLX; optax defaults to 1e-4,
    Keras to 4e-3). With ``convention="mlx"`` this is ``mlx.optimizers.AdamW`` (its decay
    ``p·(1 − lr·wd)``, then its Adam step; ``bias_correction`` as :class:`Adam`'s)."""

    decoupled_weight_decay = True  # type: ignore[assignment]

    def __init__(self, learning_rate: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
                 convention: str = "torch", bias_correction: bool = BY_CONVENTION,
                 mu_dtype: Any = None, **options: Any) -> None:
        super().__init__(learning_rate, beta1, beta2, epsilon, weight_decay, amsgrad,
                         convention, bias_correction, mu_dtype=mu_dtype, **options)
