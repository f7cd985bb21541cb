"""Adafactor (Shazeer & Stern, 2018) as torch.optim.Adafactor: factored second moments
(Keras's and MLX's conventions on request)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .adam import f32_pow
from .averaging import row_counts
from .checks import check_flag, check_positive, check_unit, describe, switched_on, to_float
from .elementwise import minimum
from .state import OptimizerState
from .tensorwise import NumpyOps, TensorwiseOptimizer


def _check_eps(value: Any) -> tuple[float | None, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"epsilon must be a pair (eps1 or None, eps2), got {describe(value)}")
    eps1 = None if value[0] is None else check_positive("epsilon[0]", value[0])
    return eps1, check_positive("epsilon[1]", value[1])


#: mlx.optimizers.Adafactor's options (HF/fairseq) that only convention="mlx" takes, and
#: their MLX defaults
_MLX_OPTIONS = {"relative_step": True, "scale_parameter": True, "warmup_init": False,
                "beta_1": None}


def _f32_pow(t: Any, e: float) -> Any:
    """``t ** e`` in float32 as MLX computes ``step ** decay_rate`` (its step is an integer
    array, a Python float weakly typed: float32). On the host: the C library's ``powf``,
    MLX's (:func:`.adam.f32_pow`); traced: the program's float32 power (the float64 power
    rounded, 1 ulp off at times from step 3,046 with ``e = -0.8``)."""
    if isinstance(t, (int, np.integer)):
        return f32_pow(float(t), e)
    return (t * 1.0).astype(np.float32) ** np.float32(e)


#: keras.optimizers.Adafactor's names that are not ours
_KERAS_NAMES = {"clip_threshold": "ours is d",
                "epsilon_1": "ours is epsilon=(epsilon_1, epsilon_2)",
                "epsilon_2": "ours is epsilon=(epsilon_1, epsilon_2)",
                "relative_step": "the relative step is always min(lr, 1/√t), as Keras's with "
                                 "either value"}
#: mlx.optimizers.Adafactor's (HF's) names that are not ours, under any convention
_MLX_NAMES = {"clip_threshold": "ours is d", "decay_rate": "ours is beta2_decay"}


class Adafactor(TensorwiseOptimizer):
    """Adafactor exactly as ``torch.optim.Adafactor`` (same hyperparameters and defaults:
    ``lr=1e-2``, ``beta2_decay=-0.8``, ``eps=(None, 1e-3)``, ``d=1``, ``weight_decay=0``,
    ``maximize=False``). Per tensor, at step t::

        β̂ = 1 − t^beta2_decay      ρ = min(lr, 1/√t)      α = max(eps2, RMS(p))·ρ
        p ← p·(1 − lr·wd)                                     (decoupled, with the raw lr)
        dim ≥ 2: R ← β̂·R + (1−β̂)·mean(g², last axis)          (slot "row_var", (..., r, 1))
                 C ← β̂·C + (1−β̂)·mean(g², second-last axis)   (slot "col_var", (..., 1, c))
                 V = R·C / max(mean(R), eps1)                   (factored along the last 2 axes)
        else:    V ← β̂·V + (1−β̂)·g²                             (slot "variance", full)
        U = g / √max(V, eps1²)      p ← p − α·U / max(1, RMS(U)/d)

    ``eps1=None`` is the parameters' dtype's machine epsilon. As in torch, ``lr`` only caps
    the relative step size ρ and scales the weight decay: the step itself is relative to
    the parameter's RMS (at least ``eps2``). Slots not used by a tensor (the factors of a
    vector, the full variance of a matrix) have shape ``(0,)``. The step count is one per
    state (torch counts per parameter: the same unless some parameters miss steps).

    ``fused=True`` (the default): on NumPy, torch-CPU and JAX-CPU in float32/float64 one
    numba kernel updates every tensor (:mod:`.engines.factored_kernels`: the gradient read
    where it lies, three passes over a tensor while it is in cache, sums in float64). It
    agrees with torch to rounding, not to the last bit (float64: ~1e-15 relative after 100
    steps of fixed gradients; in training, where a difference feeds back through the
    gradients, ~1e-13). ``fused=False`` runs :meth:`tensor_update` tensor by tensor with
    the backend's own operations: on torch these are torch.optim's, equal to the last bit.

    ``convention="mlx"`` (``mlx.optimizers.Adafactor``, the HF/fairseq algorithm; its
    ``eps`` is ``epsilon`` (ε₁ None: 1e-30), ``clip_threshold`` is ``d`` (> 0), ``decay_rate``
    is ``beta2_decay``) takes MLX's options ``relative_step=True``, ``scale_parameter=True``,
    ``warmup_init=False``, ``beta_1=None`` (MLX's defaults; any other convention refuses
    them by name)::

        ρ = min(0.01, 1/√t) (warmup_init: min(1e-6·t, 1/√t)); relative_step=False: ρ = lr
        α = max(eps2, RMS(p))·ρ  (scale_parameter=False: α = ρ)        β̂ = 1 − t^beta2_decay
        R, C (or V) as Keras's: ε₁ added to g², V = R·C / mean(R); U = g / √V
        U ← α·U / max(1, RMS(U)/d);  beta_1: m ← β₁·m + (1−β₁)·U, U = m   (slot "exp_avg")
        p ← p − wd·α·p − U                           (the decay scaled by α, as MLX's)

    As MLX, ρ and ``t^beta2_decay`` are float32 numbers whatever the parameters' dtype
    (MLX's step count is an integer array). ``learning_rate`` (``relative_step=False``) is
    taken as given: MLX's ``learning_rate=0.1`` is the float32 ``mx.array(0.1)``.
    The rest is the parameters' dtype. Per tensor (no fused kernel).

    ``convention="keras"`` (``keras.optimizers.Adafactor``; its ``epsilon_1``/``epsilon_2``
    are ``epsilon``, ``clip_threshold`` is ``d``, any > 0 (torch's is >= 1), ``beta_2_decay``
    ``beta2_decay``; Keras's
    lr defaults to 1e-3): ε₁ (None: Keras's 1e-30) is added to g² instead of clamping V,
    ``V = R·C / mean(R)``, and ``weight_decay`` is Keras's ``p ← p − lr·wd·p`` *before* the
    step (α then sees the decayed p). It runs the per-tensor path (no fused kernel).
    """

    slots = ("row_var", "col_var", "variance")
    #: the convention sets the slots and which options exist: a group repeats it or is refused
    step_wide = ("convention",)
    traced_in_update = ("beta2_decay", "d", "weight_decay")

    def __init__(self, learning_rate: float = 1e-2, beta2_decay: float = -0.8,
                 epsilon: Sequence[float | None] = (None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, maximize: bool = False, fused: bool = True,
                 convention: str = "torch", **options: Any) -> None:
        mlx = {k: options.pop(k, v) for k, v in _MLX_OPTIONS.items()} \
            if convention == "mlx" else {}
        keras = [k for k in (*_KERAS_NAMES, *_MLX_NAMES, *_MLX_OPTIONS) if k in options]
        if keras:  # (the generic hint knows no Adafactor names of Keras's or MLX's)
            k = keras[0]
            mlx_too = " (MLX's: convention='mlx')" if k in _MLX_OPTIONS else ""
            whose = " and ".join(w for w, names in (("MLX's", _MLX_NAMES),
                                                    ("Keras's", _KERAS_NAMES)) if k in names)
            raise TypeError(f"Adafactor() got {whose} {k}=: "
                            f"{_KERAS_NAMES.get(k) or _MLX_NAMES[k]}{mlx_too}" if whose
                            else f"Adafactor() got {k}=: MLX's option, taken with "
                            f"convention='mlx' only")
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        if convention not in ("torch", "keras", "mlx"):
            raise ValueError(f"convention must be 'torch', 'keras' or 'mlx' (optax's "
                             f"adafactor is another algorithm), got {describe(convention)}")
        self.convention = convention
        self.beta2_decay = to_float("beta2_decay", beta2_decay)
        if not self.beta2_decay <= 0:  # also refuses NaN
            raise ValueError(f"beta2_decay must be <= 0, got {describe(beta2_decay)}")
        self.epsilon = _check_eps(epsilon)
        self.d = check_positive("d", d)
        if mlx:
            for k in ("relative_step", "scale_parameter", "warmup_init"):
                setattr(self, k, check_flag(k, mlx[k]))
            self.beta_1 = None if mlx["beta_1"] is None else check_unit("beta_1", mlx["beta_1"])
        keras = convention != "torch"  # (Keras, MLX take any clip_threshold > 0, torch d >= 1)
        if not (self.d > 0 if keras else self.d >= 1):
            raise ValueError(f"d (the clipping threshold) must be {'> 0' if keras else '>= 1'}, "
                             f"got {describe(d)}")
        self.maximize = check_flag("maximize", maximize)
        self.fused = check_flag("fused", fused)

    @property
    def weight_decay_in_math(self) -> bool:  # type: ignore[override]
        return self.convention != "keras"

    def load_state_dict(self, d: Mapping[str, Any], params: Mapping[str, Any] | None = None
                        ) -> OptimizerState | None:
        """As :meth:`.Optimizer.load_state_dict`; a checkpoint of MLX's convention into a
        torch / Keras one, or back, loads as into an Adafactor built with the checkpoint's
        convention (MLX's options exist under its convention only): its run goes on."""
        hp = d.get("hyperparameters") if isinstance(d, Mapping) else None
        conv = hp.get("convention", "torch") if isinstance(hp, Mapping) else None
        if conv == self.convention or conv not in ("torch", "keras", "mlx") or \
                "mlx" not in (conv, self.convention):
            return super().load_state_dict(d, params)
        other = copy.copy(self)  # (its own __dict__: a refused load leaves self as it was)
        for k, v in _MLX_OPTIONS.items():  # MLX's defaults under its convention, else none
            other.__dict__.pop(k, None)
            if conv == "mlx":
                other.__dict__[k] = v
        other.__dict__["convention"] = conv
        state = other.load_state_dict(d, params)
        self.__dict__.clear()
        self.__dict__.update(other.__dict__)
        return state

    def slot_names(self) -> tuple[str, ...]:
        return (*self.slots, "exp_avg") if getattr(self, "beta_1", None) is not None \
            else self.slots

    @property
    def decoupled_weight_decay(self) -> bool:  # type: ignore[override]
        return self.convention == "keras"  # (before tensor_update: α sees the decayed p)

    def slot_shape(self, slot: str, shape: tuple[int, ...], name: str | None = None
                   ) -> tuple[int, ...]:
        """By shape alone (``name``, which Muon's routing reads, is taken and ignored)."""
        factored = len(shape) > 1
        if slot == "row_var":
            return (*shape[:-1], 1) if factored else (0,)
        if slot == "col_var":
            return (*shape[:-2], 1, shape[-1]) if factored else (0,)
        if slot == "variance":
            return (0,) if factored else shape
        return shape  # weight averages

    def scalars(self, step: int) -> tuple[float, ...]:
        """(lr, 1 − β̂ = t^beta2_decay, ρ) for step ``t`` (MLX's: float32 numbers)."""
        lr = self.learning_rate
        if self.convention == "mlx":  # (float32 numbers, as MLX's)
            w = _f32_pow(step, self.beta2_decay)
            if not self.relative_step:
                return lr, w, lr
            host = isinstance(step, (int, np.integer))
            t = np.float32(step) if host else (step * 1.0).astype(np.float32)
            cap = np.float32(1e-6) * t if self.warmup_init else np.float32(1e-2)
            rsqrt = np.float32(1) / np.sqrt(t) if host else t ** np.float32(-0.5)
            return lr, w, float(min(cap, rsqrt)) if host else minimum(rsqrt, cap)
        if isinstance(step, (int, np.integer)):
            return lr, float(step) ** self.beta2_decay, min(lr, 1 / (float(step) ** 0.5))
        t = step * 1.0  # a traced step (an optax transformation's program): its float value
        return lr, t ** self.beta2_decay, minimum(1 / t**0.5, lr)

    def tensor_update(self, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                      scalars: tuple[float, ...], name: str) -> tuple[Any, dict[str, Any]]:
        lr, w, rho = scalars
        eps1, eps2 = self.epsilon
        torch = self.convention == "torch"
        mlx = self.convention == "mlx"
        if eps1 is None:
            eps1 = xp.eps(p) if torch else 1e-30

        def sq(x: Any) -> Any:  # Keras, MLX add ε₁ to g² where torch clamps V at ε₁²
            return x if torch else x + eps1

        if self.maximize:
            g = -g
        size = int(p.size) if not callable(p.size) else p.numel()
        alpha = max(eps2, xp.norm(p) / size ** 0.5) * rho if not mlx or \
            self.scale_parameter else rho
        if torch and switched_on(self.weight_decay):  # (a traced one: always)
            p = p * (1 - lr * self.weight_decay)
        out = dict(slots)
        if g.ndim > 1:
            row = xp.lerp(slots["row_var"], sq(xp.norm_axis(g, -1) ** 2 / g.shape[-1]), w)
            col = xp.lerp(slots["col_var"], sq(xp.norm_axis(g, -2) ** 2 / g.shape[-2]), w)
            mean = xp.mean(row, -2)
            v = (row @ col) / (xp.clamp_min(mean, eps1) if torch else mean)
            out.update(row_var=row, col_var=col)
        else:
            v = out["variance"] = xp.lerp(slots["variance"], sq(g * g), w)
        u = xp.rsqrt(xp.clamp_min(v, eps1 * eps1) if torch else v) * g
        denom = max(1.0, xp.norm(u) / (size ** 0.5 * self.d))
        if not mlx:
            return xp.add_scaled(p, u, -alpha / denom), out
        u = u * (alpha / denom)
        if self.beta_1 is not None:  # MLX's first moment: of the scaled, clipped step
            u = out["exp_avg"] = xp.lerp(slots["exp_avg"], u, 1 - self.beta_1)
        if switched_on(self.weight_decay):  # MLX's: scaled by α (before the step)
            p = p + p * (-self.weight_decay * alpha)
        return xp.add_scaled(p, u, -1.0), out

    def fused_step(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
                   state: OptimizerState, prepared: Any, ours: bool
                   ) -> tuple[dict[str, Any], bool, float, bool] | None:
        """The whole step in one numba kernel where the state's engine is the NumbaEngine
        (and every parameter group ``fused``); else None (the per-tensor path)."""
        if type(state.engine).__name__ != "NumbaEngine" or not all(
                v.fused and v.convention == "torch" for v in self.group_rows(state)[1]):
            return None
        return _fused_step(self, params, gradients, state, prepared, ours)


def _geometry(opt: Adafactor, state: OptimizerState) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's geometry table and the order tensors are claimed in (largest first,
    empty ones left out), cached per layout."""
    from .engines import factored_kernels as fk
    from .engines.tensorwise_parts import layout_geometry

    return layout_geometry(opt, state, "_fused_geometry", lambda lay: fk.geometry(
        lay.shape_list, lay.offsets, {s: state.slot_layout(s).offsets for s in opt.slots}))


def _scalar_tables(opt: Adafactor, state: OptimizerState, t: int, scale: np.ndarray,
                   n_avg: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The kernel's per-tensor scalars in float64 and in the parameters' dtype (columns:
    :data:`.factored_kernels.GS` ...), and whether any tensor is clipped by value."""
    from .engines import factored_kernels as fk

    index, views = opt.group_rows(state)
    dtype = np.dtype(state.layout.dtype)
    rows = []
    for v, c in zip(views, row_counts(opt, state, index, len(views))):
        full = v.full_scalars(t, state.values, c)
        lr, w, rho = full[:3]
        eps1, eps2 = v.epsilon
        eps1 = float(np.finfo(dtype).eps) if eps1 is None else eps1
        keep = 1 - lr * v.weight_decay if v.weight_decay != 0 else 1.0
        rows.append((-1.0 if v.maximize else 1.0, v.clip_value or math.inf, keep, w, 1 - w,
                     rho, eps1, eps1 * eps1, eps2, v.d, *full[3:3 + n_avg]))
    H = np.array(rows, dtype=np.float64)[index]
    H[:, fk.GS] *= scale
    with np.errstate(over="ignore"):  # a scalar too large for the dtype: the probe tells
        Hd = H.astype(dtype)
    Hd[:, fk.W1] = dtype.type(1) - Hd[:, fk.W]  # torch's lerp: 1 − w in the dtype
    return H, Hd, any(v.clip_value for v in views)


def _fused_step(opt: Adafactor, params: Mapping[str, Any], gradients: Mapping[str, Any],
                state: OptimizerState, prepared: Any, ours: bool
                ) -> tuple[dict[str, Any], bool, float, bool]:
    """:meth:`Adafactor.fused_step`: (params to return, applied, global norm, finite), as
    the engines' ``step``. Nothing is written unless the step is applied."""
    from .engines import factored_kernels as fk
    from .engines.tensor_norms import clip_scales, dry_run_verdict

    eng, lay, t = state.engine, state.layout, state.step + 1
    keep: list = []  # contiguous copies the kernel reads, alive until it returns
    gptr = prepared if prepared is not None else eng._pointers(gradients, keep)
    geo, order = _geometry(opt, state)
    index, views = opt.group_rows(state)
    norm, scale, skip = clip_scales(opt, state, gptr, gradients, geo[:, fk.SIZE], index, views)
    if skip:
        return dict(params), False, norm, True
    full = opt.full_slot_names()
    n_avg = len(full) - len(opt.slot_names())
    H, Hd, clip = _scalar_tables(opt, state, t, scale, n_avg)
    view = eng.np_view
    R, C, V = (view(state.slots[s]) for s in opt.slots)
    none = np.empty(0, dtype=lay.dtype)
    A0, A1 = ([view(state.slots[s]) for s in full[len(opt.slots):]] + [none, none])[:2]
    tables = (gptr, geo, Hd, H, order, int(lay.sizes.sum()))
    if opt.nonfinite in ("skip", "raise"):  # computed once without being stored: then decide
        flat = eng._current(state, params, ours)
        dry = fk.adafactor_kernel(lay.dtype, True, False, clip, n_avg)
        out, bad = fk.run(dry, (flat, flat, R, C, V, np.empty_like(R), np.empty_like(C),
                                A0, A1), *tables)
        norm, verdict = dry_run_verdict(opt, state, params, gradients, norm, out, bad)
        if verdict is not None:
            return verdict
    src, out_views = eng._adopt(state, params, ours)
    dst = state.params_flat
    gptr = eng._unaliased(gptr, gradients, keep, (dst, *state.slots.values()))
    kernel = fk.adafactor_kernel(lay.dtype, False, src is not dst, clip, n_avg)
    out, bad = fk.run(kernel, (view(src), view(dst), R, C, V, R, C, A0, A1), gptr,
                      *tables[1:])
    if norm is None:
        norm = math.sqrt(float(out.sum()))
    return dict(out_views), True, norm, not bad.any()
