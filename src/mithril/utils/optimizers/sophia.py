"""Sophia (Liu et al., 2023), as ``optax.contrib.sophia``: a clipped Adam-like step whose
denominator is an EMA of a Hessian-diagonal estimate, folded in every ``update_interval``
steps by :meth:`Sophia.update_hessian` (the estimate: :mod:`mithril.utils.hessian`)."""

from __future__ import annotations

import math
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
    "verbose": "the win rate optax prints is opt.win_rate(state), read after an update "
               "(print it every n steps as optax's print_win_rate_every_n_steps)",
    "print_win_rate_every_n_steps": "read opt.win_rate(state) after the updates you want it "
                                    "of (optax prints it when count % n == 0)",
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
    (``m`` kept in that dtype, the per-tensor array engine). optax's ``verbose`` win rate
    is :meth:`win_rate`. The state of ``optax_transformation(opt)`` and
    ``make_train_step``'s JAX ``opt_state`` (an ``OptaxState``) are taken by both methods
    (outside ``jax.jit``: ``state = opt.update_hessian(state, h)`` gives a new one), and so
    are a ``torch_optimizer``'s ``mithril_state`` (changed in place) and an ``Accumulate``'s
    state. Inside a wrapper (``Lookahead``, ``ScheduleFree``, ``Mechanize``, ``SAM``,
    ``DifferentiallyPrivate``: optax's ``lookahead(sophia)``, ...) call the three methods on
    the wrapper, with its state (:class:`HeldEstimates`). Without :meth:`update_hessian` (optax's ``obj_fn`` never given) ν stays 0 and the
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
        if held.folded == held.stamp:
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
        if held.backend is not None and self.clip_threshold is not None:
            # (the last step's win rate read the nu before this fold: kept for win_rate)
            held.state.__dict__["_win_rate"] = (held.stamp, self._win_rate(held, nu))
        new = held.written({n: (1 - b2) * h[n] + b2 * nu[n] for n in h})  # optax's order
        return state if held.backend is not None else new  # (an Accumulate's state: itself)

    # -- optax's diagnostic --------------------------------------------------------------
    def win_rate(self, state: Any) -> float:
        """The last step's win rate, as optax's ``verbose`` Sophia prints it ("Sophia
        optimizer win rate: ..."): the share of all parameter elements whose update was
        *not* clipped, ``|m̂ / max(γ·ν, ε)| < clip_threshold``, with the ν that step read
        (an estimate folded in after it by :meth:`update_hessian` is not counted; the
        authors advise 0.1 to 0.5: raise ``gamma`` if it is too low). optax prints it when
        ``count % print_win_rate_every_n_steps == 0``; here read it after any update, e.g.
        ``if step % n == 0: print(opt.win_rate(state))``. Per-group ``gamma`` /
        ``epsilon`` / ``beta1`` count with their group's values. Takes the states
        :meth:`update_hessian` takes (``make_train_step``'s ``opt_state``: read it before
        ``update_hessian``, which returns a new one; a state loaded from a checkpoint reads
        the ν it holds). With ``mu_dtype`` it reads the stored, rounded ``m``. A Python
        float; ``ValueError`` before any step or with ``clip_threshold=None`` (optax prints
        nothing then)."""
        held = _Held.of(self, state, "win_rate")
        if self.clip_threshold is None:
            raise ValueError("win_rate: clip_threshold=None clips nothing, so there is no win "
                             "rate (optax prints none either)")
        if held.step < 1:
            raise ValueError("win_rate: no step taken yet")
        kept = held.state.__dict__.get("_win_rate") if held.backend is not None else None
        if kept is not None and kept[0] == held.stamp:
            return kept[1]
        return self._win_rate(held, held.nu())

    def _win_rate(self, held: _Held, nu: Mapping[str, Any]) -> float:
        # (on the arrays' device: only the counts come to the host)
        m, (index, rows), won, total = held.m(), held.rows(self), 0, 0
        for i, (name, shape) in enumerate(held.shapes.items()):
            row = rows[int(index[i])]
            t = row.row_step(held.step) if hasattr(row, "row_step") else held.step
            _lr, _b1, _omb1, bc1, gamma, eps, clip, _wd = row.scalars(t)
            v = nu[name]
            u = (_like(m[name], v) / bc1) / maximum(gamma * v, eps)
            won += int((abs(u) < clip).sum())
            total += math.prod(shape)
        return won / total if total else 0.0


#: where a wrapper's view of its state keeps the wrapper's own step count (see HeldView)
STAMP = "_estimate_stamp"


class _Held:
    """What :meth:`Sophia.update_hessian` reads and writes of a state: an
    :class:`OptimizerState` (ν in its flat buffer, written in place where it can be) or
    ``make_train_step``'s ``OptaxState`` (ν a dict of JAX arrays, replaced)."""

    def __init__(self, state: Any, step: int, skipped: bool, folded: Any,
                 shapes: dict[str, tuple], dtype: str, backend: Any) -> None:
        self.state, self.step, self.skipped, self.folded = state, step, skipped, folded
        self.shapes, self.dtype, self.backend = shapes, dtype, backend
        #: the step that marks a fold: the wrapper's count (a Lookahead with
        #: ``reset_state`` gives Sophia a count that restarts at each sync)
        self.stamp = (state.__dict__.get(STAMP, step) if backend is not None else step)

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
        if state.kind != type(opt).__name__ and "nu" in state.slots:
            raise ValueError(f"{who}: this state was made by a {state.kind}, not by this "
                             f"Sophia: if that {state.kind} holds it, call {who} on the "
                             f"{state.kind} (it hands the call to its Sophia)")
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

    def m(self) -> dict[str, Any]:
        s = self.state
        return dict(s.slots["m"]) if self.backend is None else s.slot("m")

    def rows(self, opt: Sophia) -> tuple[Any, list[Any]]:
        """Each parameter's row (its group's optimizer) and the rows, in ``shapes``' order."""
        if self.backend is not None:
            return opt.group_rows(self.state)
        from .groups import resolve, views

        index, rows, _ = resolve(opt, list(self.shapes))
        return index, views(opt, rows)

    def written(self, new: dict[str, Any]) -> Any:
        s = self.state
        if self.backend is None:
            return s._replace(slots={**s.slots, "nu": {n: new[n] for n in s.slots["nu"]}})
        _write(s, "nu", new)
        s.__dict__["_hessian_step"] = self.stamp
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


def _like(a: Any, b: Any) -> Any:
    """``a`` in ``b``'s dtype (``m`` kept in ``mu_dtype``: read in ν's, as optax reads it)."""
    if a.dtype == b.dtype:
        return a
    return a.to(b.dtype) if hasattr(a, "detach") else a.astype(b.dtype)


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


# -- wrappers: the estimate handed to the Sophia they hold ---------------------------------------
class HeldView:
    """A wrapper's state as the optimizer it holds sees it, for the length of a ``with``
    block: ``kind`` the held one's, the wrapper's own slots (``aside``) set aside, and (``step``) the held optimizer's own count where the wrapper restarts it
    (Lookahead's ``reset_state``). An ``OptimizerState`` is changed in place and restored
    on exit; an ``OptaxState`` (immutable) is viewed as a new one and :meth:`rebuilt`.
    ``restarted``: the last step restarted the held state (its estimate is dropped, as
    optax re-inits the whole inner state); ``restarts_next``: the next step will."""

    def __init__(self, state: Any, kind: str, aside: tuple[str, ...] = (),
                 step: int | None = None, restarted: bool = False,
                 restarts_next: bool = False) -> None:
        self.outer, self.kind, self.aside = state, kind, aside
        self.step, self.restarted, self.restarts_next = step, restarted, restarts_next
        self.state: Any = state

    def __enter__(self) -> HeldView:
        s = self.outer
        if not isinstance(s, OptimizerState):  # (an OptaxState: a new tuple, count swapped)
            self.state = s._replace(
                slots={k: v for k, v in s.slots.items() if k not in self.aside},
                **({} if self.step is None else {"count": np.int32(self.step)}))
            return self
        d = s.__dict__
        self._saved = (s.kind, s.step, STAMP in d,
                       {k: s.slots.pop(k) for k in self.aside if k in s.slots})
        d.setdefault(STAMP, s.step)  # (an outer wrapper's count, if it set one)
        s.kind = self.kind
        if self.step is not None:
            s.step = self.step
        return self

    def __exit__(self, *exc: Any) -> None:
        s = self.outer
        if not isinstance(s, OptimizerState):
            return
        kind, step, stamped, slots = self._saved
        s.kind, s.step = kind, step
        s.slots.update(slots)
        if not stamped:
            del s.__dict__[STAMP]

    def rebuilt(self, new: Any) -> Any:
        """The wrapper's state holding ``new``, what the held optimizer returned."""
        s = self.outer
        if isinstance(s, OptimizerState):
            return s
        return s._replace(slots={**new.slots, **{k: s.slots[k] for k in self.aside}})


class HeldEstimates:
    """:meth:`hessian_due`, :meth:`update_hessian` and :meth:`win_rate` of a wrapper (a
    Lookahead, SAM, ScheduleFree, Mechanize, DifferentiallyPrivate), handed to the optimizer
    it holds (``HELD``: a :class:`Sophia`, or another wrapper holding one) on the wrapper's
    state seen as that optimizer's (:meth:`held_view`, which each wrapper defines), as
    optax composes ``lookahead(sophia)``, ``schedule_free(sophia)``, ...: the estimate
    measured at the params given to the update (the fast weights, optax's ``params.fast``).
    A wrapper holding no Sophia refuses by name, changing nothing."""

    HELD: str

    def held_view(self, state: Any) -> HeldView:  # pragma: no cover - each wrapper's
        raise NotImplementedError

    def _held_for(self, who: str, state: Any) -> tuple[Any, HeldView]:
        """The held optimizer (refused by name where it takes no estimate) and the view of
        ``state`` (checked: this wrapper's) it reads."""
        name = type(self).__name__
        held = self.__dict__.get(self.HELD)
        if not hasattr(held, who):
            raise TypeError(f"{name}.{who}: its {self.HELD} {type(held).__name__} takes no "
                            f"Hessian-diagonal estimate (Sophia does: {name}(Sophia(...)))")
        inner = unwrapped(state)  # (an Accumulate's state: its wrapped one)
        if isinstance(inner, OptimizerState):
            try:
                check_state_kind(self, inner)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}.{who}: {e}") from None
        elif not (type(inner).__name__ == "OptaxState" and hasattr(inner, "_replace")):
            raise TypeError(f"{name}.{who}: state must be what {name}.init returned (or "
                            f"make_train_step's opt_state), got {type(state).__name__}")
        view = self.held_view(inner)
        missing = sorted(set(view.aside) - set(inner.slots))
        if missing:  # (an OptaxState: checked here, as check_state_kind does the others)
            raise ValueError(f"{name}.{who}: this opt_state lacks {name}'s slots {missing} "
                             f"(slots {sorted(inner.slots)}): not made by this {name}")
        return held, view

    def hessian_due(self, state: Any) -> bool:
        """Whether the next update folds an estimate into the held Sophia's ν (its
        :meth:`Sophia.hessian_due` on its own count; False where that update restarts the
        held state, as a Lookahead's ``reset_state`` sync does: optax drops that estimate)."""
        held, view = self._held_for("hessian_due", state)
        with view:
            return not view.restarts_next and held.hessian_due(view.state)

    def update_hessian(self, state: Any, estimate: Mapping[str, Any]) -> Any:
        """The held Sophia's :meth:`Sophia.update_hessian` on this wrapper's ``state``
        (checked first, as there: a refused call changes nothing). Returns ``state``
        (changed in place on NumPy / torch; an Accumulate's as given), or a new
        ``OptaxState`` for ``optax_transformation`` / ``make_train_step``'s."""
        held, view = self._held_for("update_hessian", state)
        with view:
            if view.restarted:
                raise ValueError(f"{type(self).__name__}.update_hessian: the last step "
                                 f"restarted the held optimizer's state (reset_state sync): "
                                 f"optax drops that step's estimate (hessian_due said False)")
            new = view.rebuilt(held.update_hessian(view.state, estimate))
        return state if isinstance(view.outer, OptimizerState) else new

    def win_rate(self, state: Any) -> float:
        """The held Sophia's :meth:`Sophia.win_rate` of the last step."""
        held, view = self._held_for("win_rate", state)
        with view:
            if view.restarted:
                raise ValueError(f"{type(self).__name__}.win_rate: the last step restarted "
                                 f"the held optimizer's state (reset_state sync): its m is "
                                 f"gone, and with it the step's win rate")
            return held.win_rate(view.state)
