"""Sophia (Liu et al., 2023), as ``optax.contrib.sophia``: a clipped Adam-like step whose
denominator is an EMA of a Hessian-diagonal estimate, folded in every ``update_interval``
steps by :meth:`Sophia.update_hessian` (the estimate: :mod:`mithril.utils.hessian`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import KeyMismatchError, ShapeError
from .base import Optimizer
from .checks import (
    check_int,
    check_mu_dtype,
    check_positive,
    check_state_kind,
    check_unit,
    is_array,
    unwrapped,
)
from .elementwise import maximum
from .state import OptimizerState


def _sophia(p, g, m, nu, lr, b1, b1c, bc1, gamma, eps, clip, wd):
    m = b1c * g + b1 * m                        # optax's update_moment order
    u = (m / bc1) / maximum(gamma * nu, eps)    # nu of the last estimate: not updated here
    u = -maximum(-maximum(u, -clip), -clip)     # clip(u, −c, c), exactly
    return p + (-lr) * (u + wd * p), m, nu      # optax: −lr·(u + wd·p)


def _sophia_noclip(p, g, m, nu, lr, b1, b1c, bc1, gamma, eps, clip, wd):
    m = b1c * g + b1 * m
    u = (m / bc1) / maximum(gamma * nu, eps)
    return p + (-lr) * (u + wd * p), m, nu


#: optax.contrib.sophia's arguments that are not Sophia's here, and what to do instead
_NOT_OFFERED = {
    "hessian_diagonal_fn": "the estimate enters through opt.update_hessian(state, h) after "
                           "each update that opt.hessian_due(state) names (optax's default "
                           "estimator is mithril.utils.hessian.hutchinson_diagonal)",
    "verbose": "the win rate is not printed (the share of |u| < clip_threshold: measure it "
               "from the state's m and nu)",
    "print_win_rate_every_n_steps": "the win rate is not printed",
}


class Sophia(Optimizer):
    """Sophia (Liu et al., 2023) as ``optax.contrib.sophia``. Each step (t = 1, 2, ...)::

        m ← β₁·m + (1−β₁)·g
        u ← clip((m/(1−β₁ᵗ)) / max(γ·ν, ε), −c, c)        (c = clip_threshold; None: no clip)
        p ← p − lr·(u + wd·p)                              (decoupled decay, after the clip)

    and at steps 1, k+1, 2k+1, ... (k = ``update_interval``: optax's count *before* the
    step is a multiple of k) the EMA of a Hessian-diagonal estimate ĥ measured at the
    parameters *before* that step::

        ν ← β₂·ν + (1−β₂)·ĥ

    The step reads ν and leaves it unchanged (so it runs on every engine: fused NumPy /
    torch kernels, the jitted JAX step); the estimate enters through
    :meth:`update_hessian`, after the step, and :meth:`hessian_due` says whether a step is
    one that takes it. A loop in optax's order (the step uses the old ν; ĥ is measured at
    the pre-step params)::

        from mithril.utils.hessian import hutchinson_diagonal

        out, g = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
        h = None
        if opt.hessian_due(state):
            key, sub = jax.random.split(key)   # optax's HutchinsonState split; or an int seed
            h = hutchinson_diagonal(compiled, params, data, sub, loss="loss")
        params, state = opt.update(params, g, state)
        if h is not None:
            state = opt.update_hessian(state, h)

    ν is a slot: state dicts and checkpoints keep it. Defaults are optax's (β₁ 0.965, β₂
    0.99, ε 1e-8, wd 1e-4, γ 0.01, c 1.0, k 10; optax has no default learning rate: 1e-4
    here). optax's ``weight_decay_mask`` is ours (and groups may set ``weight_decay``,
    ``beta1``, ``gamma``, ``epsilon``, the learning rate); ``beta2``, ``update_interval`` and
    ``clip_threshold`` are the optimizer's only. ``mu_dtype`` as :class:`~.adam.Adam`'s
    (``m`` kept in that dtype, the per-tensor array engine). optax's ``verbose`` win-rate
    printing is not offered. The state of ``optax_transformation(opt)`` and
    ``make_train_step``'s JAX ``opt_state`` (an ``OptaxState``) are taken by both methods
    (outside ``jax.jit``: ``state = opt.update_hessian(state, h)`` gives a new one), and so
    are a ``torch_optimizer``'s ``mithril_state`` (changed in place) and an ``Accumulate``'s
    state. Without :meth:`update_hessian` (optax's ``obj_fn`` never given) ν stays 0 and the
    step is ``clip(m̂/ε, ±c)``: sign descent with momentum, not Sophia.
    """

    slots = ("m", "nu")
    decoupled_weight_decay = True
    weight_decay_in_math = True  # (optax's −lr·(u + wd·p), after the clip)
    step_wide = ("mu_dtype", "beta2", "update_interval", "clip_threshold")

    def __init__(self, learning_rate: float = 1e-4, beta1: float = 0.965, beta2: float = 0.99,
                 epsilon: float = 1e-8, weight_decay: float = 1e-4, gamma: float = 0.01,
                 clip_threshold: float | None = 1.0, update_interval: int = 10,
                 mu_dtype: Any = None, **options: Any) -> None:
        for name, why in _NOT_OFFERED.items():  # (optax's arguments with no equal here)
            if name in options:
                raise TypeError(f"Sophia: {name}= is optax's, not taken here: {why}")
        super().__init__(learning_rate, weight_decay=weight_decay, **options)
        self.mu_dtype = check_mu_dtype(mu_dtype)
        self.beta1 = check_unit("beta1", beta1)
        self.beta2 = check_unit("beta2", beta2)
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=False)
        self.gamma = check_positive("gamma", gamma, allow_zero=False)
        self.clip_threshold = (None if clip_threshold is None else
                               check_positive("clip_threshold", clip_threshold, False))
        self.update_interval = check_int("update_interval", update_interval, minimum=1)

    def rule(self) -> tuple[Any, ...]:
        return (*super().rule(), self.mu_dtype)  # (the dtype of m's buffer: not changed live)

    def scalars(self, step: int) -> tuple[float, ...]:
        # (arithmetic only: the step may be traced, in an optax transformation's program)
        clip = 1.0 if self.clip_threshold is None else self.clip_threshold
        return (self.learning_rate, self.beta1, 1 - self.beta1, 1 - self.beta1**step,
                self.gamma, self.epsilon, clip, self.weight_decay)

    def kernel_math(self) -> Any:
        return _sophia_noclip if self.clip_threshold is None else _sophia

    # -- the Hessian-diagonal EMA ----------------------------------------------------------
    def hessian_due(self, state: Any) -> bool:
        """Whether the next :meth:`update` of ``state`` is one whose estimate :meth:`update_hessian`
        folds in (optax: the count before the step is a multiple of ``update_interval``):
        measure the estimate at the params given to that update. ``state``: what ``init``
        / ``update`` returned, or ``make_train_step``'s JAX ``opt_state`` (a host read of
        its count)."""
        return _Held.of(self, state, "hessian_due").step % self.update_interval == 0

    def update_hessian(self, state: Any, estimate: Mapping[str, Any]) -> Any:
        """Fold ``estimate`` (parameter name → Hessian-diagonal estimate at the params before
        the step just taken, e.g. :func:`mithril.utils.hessian.hutchinson_diagonal`) into
        the slot ν: ``ν ← β₂·ν + (1−β₂)·ĥ``, in ν's dtype. Call it after the :meth:`update`
        that :meth:`hessian_due` said was due; after a skipped step (``nonfinite="skip"``)
        it does nothing, as optax's ``apply_if_finite`` keeps the whole inner state.

        Everything is checked first (a clear error naming the key; a refused call changes
        nothing): ``estimate`` must hold exactly the state's parameters, each an array of
        the parameter's shape and dtype; the step just taken must be a due one, folded once.
        A non-finite estimate follows the optimizer's ``nonfinite`` policy: ``"propagate"``
        folds it in as optax does, with a ``RuntimeWarning`` (ν then stays non-finite:
        every later step is NaN); ``"unchecked"`` folds it in silently; ``"skip"`` leaves ν
        as it was, with a ``RuntimeWarning``; ``"raise"`` raises ``FloatingPointError``.
        Returns ``state`` (updated in place on NumPy / torch). ``make_train_step``'s JAX
        ``opt_state`` (an ``OptaxState``, immutable) is taken too: a new one is returned
        (rebind to it); a skipped step leaves its count, so the next due check is the
        skipped step's again, and folding twice is not detected there."""
        held = _Held.of(self, state, "update_hessian")
        if held.skipped:
            return state
        t, k = held.step, self.update_interval
        if t < 1 or (t - 1) % k:
            raise ValueError(
                f"update_hessian: the last step taken (step {t}) is not one that takes an "
                f"estimate (update_interval={k}: steps 1, {k + 1}, {2 * k + 1}, ...); call it "
                f"after the update that hessian_due(state) said was due (before that update)")
        if held.folded == t:
            raise ValueError(f"update_hessian: step {t}'s estimate is already folded in")
        h = held.checked(estimate)
        bad = sorted(n for n, a in h.items() if not _all_finite(a))
        if bad and self.nonfinite != "unchecked":
            what = f"update_hessian: the estimate of {bad} holds inf/NaN"
            if self.nonfinite == "raise":
                raise FloatingPointError(f"{what}; nothing changed")
            if self.nonfinite == "skip":
                warnings.warn(f"{what}; not folded in, nu unchanged", RuntimeWarning, 2)
                return state
            warnings.warn(f"{what}; folded in as optax does: nu and every later step are "
                          f"non-finite (nonfinite='skip' or 'raise' guard against this)",
                          RuntimeWarning, 2)
        b2 = self.beta2
        nu = held.nu()
        new = held.written({n: (1 - b2) * h[n] + b2 * nu[n] for n in h})  # optax's order
        return state if held.backend is not None else new  # (an Accumulate's state: itself)


class _Held:
    """What :meth:`Sophia.update_hessian` reads and writes of a state: an
    :class:`OptimizerState` (ν in its flat buffer, written in place where it can be) or
    ``make_train_step``'s ``OptaxState`` (ν a dict of JAX arrays, replaced)."""

    def __init__(self, state: Any, step: int, skipped: bool, folded: Any,
                 shapes: dict[str, tuple], dtype: str, backend: Any) -> None:
        self.state, self.step, self.skipped, self.folded = state, step, skipped, folded
        self.shapes, self.dtype, self.backend = shapes, dtype, backend

    @classmethod
    def of(cls, opt: Sophia, state: Any, who: str) -> _Held:
        state = unwrapped(state)
        if type(state).__name__ == "OptaxState" and hasattr(state, "_replace"):
            nu = state.slots.get("nu") if isinstance(state.slots, Mapping) else None
            if not isinstance(nu, Mapping) or "m" not in state.slots:
                raise ValueError(f"{who}: this opt_state holds no Sophia slots (slots "
                                 f"{sorted(state.slots)})")
            first = next(iter(nu.values()), None)
            return cls(state, int(np.asarray(state.count)), False, None,
                       {n: tuple(a.shape) for n, a in nu.items()},
                       str(getattr(first, "dtype", "float32")), None)
        if not isinstance(state, OptimizerState):
            raise TypeError(f"{who}: state must be what Sophia.init returned (or "
                            f"make_train_step's opt_state), got {type(state).__name__}")
        try:
            check_state_kind(opt, state)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{who}: {e}") from None
        lay = state.layout
        return cls(state, state.step, state.last_step_skipped,
                   state.__dict__.get("_hessian_step"), dict(zip(lay.names, lay.shapes)),
                   lay.dtype, state.engine.backend)

    def nu(self) -> dict[str, Any]:
        s = self.state
        return dict(s.slots["nu"]) if self.backend is None else s.slot("nu")

    def written(self, new: dict[str, Any]) -> Any:
        s = self.state
        if self.backend is None:
            return s._replace(slots={**s.slots, "nu": {n: new[n] for n in s.slots["nu"]}})
        _write(s, "nu", new)
        s.__dict__["_hessian_step"] = s.step
        return s

    def checked(self, estimate: Any) -> dict[str, Any]:
        """``estimate`` as arrays of the state's kind, each checked against its parameter
        (key, shape, dtype): errors name the key."""
        if not isinstance(estimate, Mapping):
            raise TypeError(f"update_hessian: the estimate must be a dict of arrays keyed by "
                            f"parameter name, got {type(estimate).__name__}")
        missing = sorted(set(self.shapes) - set(estimate))
        extra = sorted((k for k in estimate if k not in self.shapes), key=str)
        if missing or extra:
            raise KeyMismatchError(f"update_hessian: the estimate's keys do not match the "
                                   f"state's parameters: missing {missing}, unknown {extra}")
        out = {}
        for name, shape in self.shapes.items():
            a = estimate[name]
            a = np.asarray(a) if isinstance(a, np.generic) else a  # (a 0-d NumPy scalar)
            if not is_array(a):
                raise TypeError(f"update_hessian: estimate['{name}'] must be an array, got "
                                f"{type(a).__name__}")
            if tuple(a.shape) != tuple(shape):
                raise ShapeError(f"update_hessian: estimate['{name}'] has shape "
                                 f"{tuple(a.shape)}, the parameter {tuple(shape)}")
            dt = str(a.dtype).removeprefix("torch.")
            if dt != self.dtype:
                raise TypeError(f"update_hessian: estimate['{name}'] has dtype {dt}, the "
                                f"parameters {self.dtype}")
            if self.backend is None:  # (an OptaxState's: JAX arrays)
                import jax.numpy as jnp

                out[name] = jnp.asarray(_host(a) if hasattr(a, "detach") else a)
            else:
                out[name] = a if self.backend.is_native(a) else self.backend.array(_host(a))
        return out


def _host(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def _all_finite(a: Any) -> bool:
    mod = type(a).__module__.split(".", 1)[0]
    if mod == "torch":
        import torch

        return bool(torch.isfinite(a).all())
    return bool(np.isfinite(np.asarray(a)).all())


def _write(state: OptimizerState, slot: str, arrays: Mapping[str, Any]) -> None:
    """``arrays`` (every parameter's) into ``state``'s flat ``slot``: in place where it is a
    NumPy / torch buffer (a fused step's recipe keeps reading it), a new JAX array
    otherwise (the jitted engine's slots mapping counts the write)."""
    flat = state.slots[slot]
    if isinstance(flat, np.ndarray) or hasattr(flat, "copy_"):
        views = state.slot(slot)
        for n, a in arrays.items():
            v = views[n]
            if hasattr(v, "copy_"):
                v.copy_(a)
            else:
                v[...] = np.asarray(a)
        return
    import jax.numpy as jnp

    parts, at = [], 0
    for n, a0, b0, _shape in state.slot_layout(slot).spans():
        if a0 > at:  # (an engine's alignment gap: kept as it is)
            parts.append(flat[at:a0])
        parts.append(jnp.asarray(arrays[n], flat.dtype).reshape(-1))
        at = b0
    if at < flat.shape[0]:
        parts.append(flat[at:])
    state.slots[slot] = jnp.concatenate(parts) if parts else flat
