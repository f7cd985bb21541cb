"""Muon (Jordan et al., 2024) as torch.optim.Muon, with a fallback optimizer (AdamW by
default, as Keras) for the parameters that are not matrices."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import ShapeError
from . import groups as _groups
from .base import Optimizer
from .checks import check_flag, check_int, check_positive, describe, to_float
from .state import OptimizerState
from .tensorwise import NumpyOps, TensorwiseOptimizer

#: torch's (Keller Jordan's) quintic Newton–Schulz coefficients, steps and epsilon
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = ("bfloat16", "float32", "float64", None)
ADJUST_LR = (None, "original", "match_rms_adamw")
#: the prefix of the fallback optimizer's slots in Muon's state
PREFIX = "fallback_"


class _Default:
    def __repr__(self) -> str:
        return "AdamW()"


#: ``fallback``'s default: a new ``AdamW()`` with torch's defaults
DEFAULT_FALLBACK: Any = _Default()


def newton_schulz(xp: NumpyOps, G: Any, coefficients: Sequence[float], steps: int, eps: float,
                  dtype: str | None = "bfloat16") -> Any:
    """torch's ``_zeropower_via_newtonschulz``: ``steps`` quintic iterations towards the
    orthogonal factor of the matrix ``G``, in ``dtype`` (None: ``G``'s own; bfloat16 as
    torch, emulated on NumPy and JAX by rounding every result to bfloat16)."""
    a, b, c = coefficients
    X, rnd = xp.low_precision(G, dtype)
    tall = G.shape[0] > G.shape[1]
    if tall:
        X = xp.T(X)
    X = rnd(X / rnd(xp.clamp_min(rnd(xp.norm0(X)), eps)))  # spectral norm at most 1
    for _ in range(steps):
        A = rnd(X @ xp.T(X))
        B = rnd(xp.addmm(A, A, A, b, c))
        X = rnd(xp.addmm(X, B, X, a, 1.0))
    return xp.T(X) if tall else X


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """torch's ``_adjust_lr``: ``"original"`` (None) scales by √max(1, A/B),
    ``"match_rms_adamw"`` by 0.2·√max(A, B)."""
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, A / B))
    return lr * (0.2 * math.sqrt(max(A, B)))


def _build(spec: Any) -> Optimizer | None:
    """The fallback optimizer from what the constructor was given: an optimizer (copied),
    None, the default, or a state dict's ``{"optimizer": name, "hyperparameters": ...}``."""
    from . import AdamW

    if spec is None:
        return None
    if spec is DEFAULT_FALLBACK:
        return AdamW()
    if isinstance(spec, Mapping):
        from .. import optimizers

        if set(spec) != {"optimizer", "hyperparameters"}:
            raise TypeError("fallback given as a dict must have exactly 'optimizer' (a class "
                            "name) and 'hyperparameters'")
        cls = getattr(optimizers, str(spec["optimizer"]), None)
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
            raise ValueError(f"fallback: {spec['optimizer']!r} is not a mithril optimizer")
        spec = cls(**spec["hyperparameters"])
    if not isinstance(spec, Optimizer):
        raise TypeError(f"fallback must be a mithril optimizer (e.g. AdamW()) or None, got "
                        f"{describe(spec)}")
    name, cls = type(spec).__name__, type(spec)
    if (isinstance(spec, TensorwiseOptimizer) or cls.init is not Optimizer.init
            or cls.update is not Optimizer.update or spec.two_pass()
            or (cls.kernel_math is Optimizer.kernel_math and cls.math is Optimizer.math)):
        raise TypeError(f"fallback: {name} is not an elementwise optimizer (one pass, its own "
                        f"math); use e.g. AdamW, Adam, SGD, Lion")
    own = {"clip_norm": None, "clip_value": None, "nonfinite": "propagate", "ema_decay": None,
           "swa_start": None}
    for k, v in own.items():
        if getattr(spec, k) != v:
            raise ValueError(f"fallback: {k}={getattr(spec, k)!r} holds for the whole step: "
                             f"give it to Muon, not to its fallback")
    return copy.copy(spec)


class Muon(TensorwiseOptimizer):
    """Muon as ``torch.optim.Muon`` (same hyperparameters and defaults: ``lr=1e-3``,
    ``weight_decay=0.1``, ``momentum=0.95``, ``nesterov=True``, torch's Newton–Schulz
    coefficients, ``eps=1e-7``, ``ns_steps=5``, ``adjust_lr_fn=None``) for 2-D parameters::

        B ← μ·B + (1−μ)·g            (torch: B.lerp_(g, 1−μ); slot "momentum_buffer")
        U = g + μ·(B − g) if nesterov else B
        O = NS(U)                    (ns_steps quintic iterations; a tall U transposed)
        p ← p·(1 − lr·wd) − adjusted_lr·O

    ``adjust_lr_fn``: None / ``"original"`` gives ``lr·√max(1, rows/cols)``,
    ``"match_rms_adamw"`` ``0.2·lr·√max(rows, cols)`` (Moonshot's, to reuse AdamW's lr and
    weight decay). ``ns_dtype``: the Newton–Schulz iteration's precision; ``"bfloat16"`` as
    torch (on torch the very same operations; on NumPy and JAX emulated: float32 arithmetic,
    each result rounded to bfloat16, which agrees with torch's to bfloat16 rounding), or
    ``"float32"``, ``"float64"``, None (the parameters' dtype, as Keras).

    Every parameter that is not a matrix (biases, norms, scalars, conv kernels) is updated
    by ``fallback``, an elementwise optimizer (default ``AdamW()`` with torch's defaults, as
    Keras' Muon uses AdamW for them; torch.optim.Muon refuses them and is paired with
    AdamW). Its learning rate is kept as its ratio to Muon's, ``fallback_lr_ratio``
    (default: the ratio of the two learning rates given), so ``set_learning_rate`` and
    every scheduler driving Muon move both. Its own ``param_groups`` /
    ``weight_decay_mask`` apply to the parameters it updates; clipping, ``nonfinite`` and
    weight averaging are Muon's, for every parameter. Its slots are Muon's with the prefix
    ``"fallback_"`` (AdamW: ``"fallback_m"``, ``"fallback_v"``); a slot has shape ``(0,)``
    for the parameters it does not serve. ``fallback=None``: 2-D parameters only (a
    parameter of another rank is refused by ``init``, naming it), as torch.
    """

    slots = ("momentum_buffer",)
    decoupled_weight_decay = True

    def __init__(self, learning_rate: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: Sequence[float] = NS_COEFFICIENTS, epsilon: float = 1e-7,
                 ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 ns_dtype: str | None = "bfloat16", fallback: Any = DEFAULT_FALLBACK,
                 fallback_lr_ratio: float | None = None, **options: Any) -> None:
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.momentum = check_positive("momentum", momentum)
        self.nesterov = check_flag("nesterov", nesterov)
        if isinstance(ns_coefficients, (str, bytes)) or not isinstance(
                ns_coefficients, Sequence) or len(ns_coefficients) != 3:
            raise TypeError(f"ns_coefficients must be three numbers (a, b, c), got "
                            f"{describe(ns_coefficients)}")
        self.ns_coefficients = tuple(to_float(f"ns_coefficients[{i}]", x)
                                     for i, x in enumerate(ns_coefficients))
        if not all(map(math.isfinite, self.ns_coefficients)):
            raise ValueError(f"ns_coefficients must be finite, got {self.ns_coefficients}")
        self.epsilon = check_positive("epsilon", epsilon)
        self.ns_steps = check_int("ns_steps", ns_steps, maximum=99)  # torch: < 100
        if adjust_lr_fn not in ADJUST_LR:
            raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR}, got "
                             f"{describe(adjust_lr_fn)}")
        self.adjust_lr_fn = adjust_lr_fn
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {describe(ns_dtype)}")
        self.ns_dtype = ns_dtype
        self.fallback = _build(fallback)
        if self.fallback is None:
            self.fallback_lr_ratio = None
            return
        if fallback_lr_ratio is None:
            if self.learning_rate == 0:
                raise ValueError("with learning_rate=0 the fallback's learning rate cannot be "
                                 "kept as a ratio to it: give fallback_lr_ratio")
            fallback_lr_ratio = self.fallback.learning_rate / self.learning_rate
        self.fallback_lr_ratio = check_positive("fallback_lr_ratio", fallback_lr_ratio)
        self.fallback.learning_rate = self.learning_rate * self.fallback_lr_ratio

    def _finish_groups(self) -> None:
        super()._finish_groups()
        for i, g in enumerate(self._groups):
            bad = sorted({"fallback", "fallback_lr_ratio", "ns_dtype"} & set(g))
            if bad:
                raise ValueError(f"param_groups[{i}]: {bad} configure Muon as a whole, not a "
                                 f"group (the fallback takes param_groups of its own)")

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        fb = out.get("fallback")
        if isinstance(fb, Optimizer):
            out["fallback"] = {"optimizer": type(fb).__name__,
                               "hyperparameters": fb.hyperparameters()}
        return out

    def set_learning_rate(self, lr: float, group: int | None = None) -> None:
        """As :meth:`.Optimizer.set_learning_rate`; the fallback's moves in proportion."""
        super().set_learning_rate(lr, group)
        if group is None and self.fallback is not None:
            self.fallback.learning_rate = self.learning_rate * self.fallback_lr_ratio

    def slot_names(self) -> tuple[str, ...]:
        fb = () if self.fallback is None else self.fallback.slot_names()
        return (*self.slots, *(PREFIX + s for s in fb))

    def update_slots(self) -> tuple[str, ...]:
        return self.slots

    def slot_init(self, slot: str) -> float:
        if slot.startswith(PREFIX):
            return self.fallback.slot_init(slot[len(PREFIX):])
        return 0.0

    def slot_shape(self, slot: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if slot == "momentum_buffer":
            return shape if len(shape) == 2 else (0,)
        if slot.startswith(PREFIX):
            return (0,) if len(shape) == 2 else shape
        return shape  # weight averages

    def tensor_update(self, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                      scalars: tuple[float, ...], name: str) -> tuple[Any, dict[str, Any]]:
        if g.ndim != 2:
            raise ShapeError(f"Muon's matrix path takes 2-D parameters; '{name}' has shape "
                             f"{tuple(g.shape)}")
        buf = xp.lerp(slots["momentum_buffer"], g, 1 - self.momentum)
        u = xp.lerp(g, buf, self.momentum) if self.nesterov else buf
        o = newton_schulz(xp, u, self.ns_coefficients, self.ns_steps, self.epsilon,
                          self.ns_dtype)
        lr = adjusted_lr(scalars[0], self.adjust_lr_fn, tuple(p.shape))
        return xp.add_scaled(p, o, -lr), {"momentum_buffer": buf}

    def tensor_rows(self, state: OptimizerState) -> list[Any]:
        rows = super().tensor_rows(state)
        fb = self.fallback
        if fb is None:
            return rows
        lay = state.layout
        others = [n for n, s in zip(lay.names, lay.shapes) if len(s) != 2]
        key = (id(fb._groups), fb._groups_version, id(fb._wd_exclude), tuple(others))
        cached = self.__dict__.get("_fallback_rows")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_fallback_rows"] = (key, *_groups.resolve(fb, others))
        base = copy.copy(fb)
        base.learning_rate = self.learning_rate * self.fallback_lr_ratio
        views = [_FallbackRow(v, self) for v in _groups.views(base, cached[2])]
        where = dict(zip(others, cached[1]))
        return [views[where[n]] if n in where else r for n, r in zip(lay.names, rows)]


class _FallbackRow:
    """The fallback optimizer (one of its groups) updating one tensor inside Muon's step."""

    def __init__(self, fb: Optimizer, owner: Muon) -> None:
        self.fb = fb
        self.learning_rate, self.weight_decay = fb.learning_rate, fb.weight_decay
        self.decoupled_weight_decay = fb.decoupled_weight_decay
        self.weight_decay_in_math = fb.weight_decay_in_math
        # whole-step options: Muon's
        self.clip_value, self.ema_decay = owner.clip_value, owner.ema_decay
        self.clip_tensor_norm, self.clip_block_rms = owner.clip_tensor_norm, owner.clip_block_rms
        self.ema_every, self.swa_start = owner.ema_every, owner.swa_start

    def update_slots(self) -> tuple[str, ...]:
        return tuple(PREFIX + s for s in self.fb.slot_names())

    def scalars(self, step: int) -> tuple[float, ...]:
        return self.fb.scalars(step)

    def tensor_update(self, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                      scalars: tuple[float, ...], name: str) -> tuple[Any, dict[str, Any]]:
        own = self.fb.slot_names()
        out = self.fb.kernel_math()(p, g, *(slots[PREFIX + s] for s in own), *scalars)
        return out[0], {PREFIX + s: v for s, v in zip(own, out[1:])}


def _init(self: Muon, params: Mapping[str, Any]) -> OptimizerState:
    """As :meth:`.Optimizer.init`; without a fallback, a parameter that is not 2-D is
    refused, named."""
    if self.fallback is None and isinstance(params, Mapping):
        for name, p in params.items():
            shape = getattr(p, "shape", None)
            if shape is not None and len(shape) != 2:
                raise ShapeError(f"Muon(fallback=None) updates 2-D parameters only (as "
                                 f"torch.optim.Muon); params['{name}'] has shape "
                                 f"{tuple(shape)}: give Muon a fallback (e.g. "
                                 f"fallback=AdamW()) for the others")
    return Optimizer.init(self, params)


# assigned after the class, so that Optimizer.__init_subclass__ does not wrap it (the
# wrapper binds the backend first; a refused init must keep nothing)
Muon.init = _init  # type: ignore[method-assign]
