"""Lookahead (Zhang et al., 2019) around any elementwise optimizer, in its own fused pass."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .averaging import _jitable, started_averages
from .base import Optimizer
from .checks import check_flag, check_int, describe, state_dict_count, to_float, unwrapped
from .elementwise import where
from .held_hyperparameters import HeldHyperparameters
from .serialization import checked_head
from .sophia import HeldEstimates, HeldView
from .state import OptimizerState

#: the state slot of the slow weights
SLOW = "slow"

#: what Lookahead's own hyperparameters are (the rest belongs to the inner optimizer)
_OWN = ("sync_period", "slow_step_size", "reset_state")

_SRC = """
def lookahead({args}):
    out = MATH({math_args})
    on = sync != 0
    slow = WHERE(on, slow + alpha * (out[0] - slow), slow)
    return ({outs})
"""

_REDUCE_SRC = """
def lookahead_reduce({args}):
    return MATH({math_args})
"""


@functools.cache
def _arity(fn: Any) -> int:
    """How many arguments the elementwise function ``fn`` takes."""
    return len(inspect.signature(getattr(fn, "py_func", fn)).parameters)


def lookahead_math(math_fn: Any, n_slots: int, n_scal: int, reset: bool,
                   n_extra: int = 0) -> Any:
    """``math_fn`` (an optimizer's elementwise step) followed by the lookahead
    synchronisation: ``(p, g, *slots, slow, *scalars, sync, alpha[, *inits][, *extra]) ->
    (p, *slots, slow)``. Where ``sync`` is non-zero: ``slow ← slow + alpha·(p_new −
    slow)``, ``p ← slow`` and, with ``reset``, each slot ← its initial value (the ``inits``
    scalars; as optax, ``0·slot + init``, so a NaN slot stays NaN). ``extra``: a two-pass
    optimizer's scalars from ``tensor_scalars`` (the engines append them), passed on to
    ``math_fn`` after its own. Cached: one function object per (math, arity, reset), so
    the kernels compiled from it are cached too."""
    return _lookahead_math(math_fn, n_slots, n_scal, reset, n_extra)


@functools.cache  # (keyed on every argument, n_extra's default included)
def _lookahead_math(math_fn: Any, n_slots: int, n_scal: int, reset: bool, n_extra: int) -> Any:
    slots = [f"s{i}" for i in range(n_slots)]
    scal = [f"h{i}" for i in range(n_scal)]
    extra = [f"e{i}" for i in range(n_extra)]
    inits = [f"r{i}" for i in range(n_slots)] if reset else []
    new_slots = [f"out[{i + 1}]" for i in range(n_slots)]
    if reset:
        new_slots = [f"WHERE(on, 0 * {s} + {r}, {s})" for s, r in zip(new_slots, inits)]
    src = _SRC.format(
        args=", ".join(["p", "g", *slots, "slow", *scal, "sync", "alpha", *inits, *extra]),
        math_args=", ".join(["p", "g", *slots, *scal, *extra]),
        outs=", ".join(["WHERE(on, slow, out[0])", *new_slots, "slow"]) + ",",
    )
    name = getattr(math_fn, "__qualname__", repr(math_fn))
    ns: dict[str, Any] = {"MATH": _jitable(math_fn), "WHERE": where}
    exec(compile(src, f"<mithril lookahead {name}>", "exec"), ns)
    fn = ns["lookahead"]
    fn.__qualname__ = fn.__name__ = f"lookahead_{getattr(math_fn, '__name__', 'math')}"
    fn.base_math = math_fn
    return fn


@functools.cache
def lookahead_reduce(reduce_fn: Any, n_slots: int, n_scal: int, reset: bool) -> Any:
    """A two-pass optimizer's first pass ``reduce_fn`` as Lookahead's engines call it:
    ``(p, g, *slots, slow, *scalars, sync, alpha[, *inits]) -> reduce_fn(p, g, *slots,
    *scalars)`` (the sums are the inner optimizer's; cached as :func:`lookahead_math`)."""
    slots = [f"s{i}" for i in range(n_slots)]
    scal = [f"h{i}" for i in range(n_scal)]
    inits = [f"r{i}" for i in range(n_slots)] if reset else []
    src = _REDUCE_SRC.format(
        args=", ".join(["p", "g", *slots, "slow", *scal, "sync", "alpha", *inits]),
        math_args=", ".join(["p", "g", *slots, *scal]))
    name = getattr(reduce_fn, "__qualname__", repr(reduce_fn))
    ns: dict[str, Any] = {"MATH": _jitable(reduce_fn)}
    exec(compile(src, f"<mithril lookahead reduce {name}>", "exec"), ns)
    fn = ns["lookahead_reduce"]
    fn.__qualname__ = fn.__name__ = f"lookahead_{getattr(reduce_fn, '__name__', 'reduce')}"
    return fn


def _inner_spec(inner: Optimizer) -> dict[str, Any]:
    return {"optimizer": type(inner).__name__, "hyperparameters": inner.hyperparameters()}


def _check_inner(inner: Any) -> Optimizer:
    """``inner`` if Lookahead can wrap it, else a TypeError saying why."""
    if isinstance(inner, Lookahead):
        raise TypeError("inner must not be a Lookahead itself (nested lookahead is not "
                        "supported): wrap the inner optimizer once")
    if type(inner).__name__ == "Accumulate" and hasattr(inner, "k_for"):
        # (optax.lookahead(MultiSteps(opt, k), sync_period=k·s) syncs on the s-th window)
        raise TypeError("inner must be a mithril optimizer, got an Accumulate: wrap the other "
                        "way round, Accumulate(Lookahead(opt, sync_period=s), k), which is "
                        "optax.lookahead(optax.MultiSteps(opt, k), sync_period=k*s)")
    if not isinstance(inner, Optimizer):
        raise TypeError(f"inner must be a mithril optimizer (e.g. Adam()), got {describe(inner)}")
    cls = type(inner)
    name = cls.__name__
    if cls.init is not Optimizer.init or cls.update is not Optimizer.update:
        raise TypeError(f"inner: {name} overrides init/update itself; Lookahead composes "
                        f"an optimizer's elementwise math (slots, scalars, kernel_math) and "
                        f"cannot wrap it")
    if cls.kernel_math is Optimizer.kernel_math and cls.math is Optimizer.math:
        raise TypeError(f"inner: {name} states no elementwise math (define math or "
                        f"kernel_math)")
    if SLOW in inner.full_slot_names():
        raise TypeError(f"inner: {name} has a state slot named {SLOW!r} of its own, which "
                        f"clashes with Lookahead's slow weights")
    return inner


def _check_reset(inner: Optimizer, reset: bool) -> bool:
    """``reset_state``, refused for an inner optimizer whose state holds more than slots
    (per-tensor slots, optimizer-wide values: MoMo's ``f̄``, Prodigy's ``d``), which the
    sync would not restart as optax's ``fast_optimizer.init`` does."""
    kept = (*inner.tensor_slots, *inner.state_values)
    if reset and kept:
        raise TypeError(f"reset_state=True: {type(inner).__name__} keeps {list(kept)} besides "
                        f"its slots, which a sync would not restart (optax re-inits them); "
                        f"use reset_state=False")
    return reset


def _check_sync_period(value: Any) -> int:
    return check_int("sync_period", value, minimum=1)


def _check_slow_step_size(value: Any) -> float:
    v = to_float("slow_step_size", value)
    if not 0 < v <= 1:  # also refuses NaN
        raise ValueError(f"slow_step_size must be in (0, 1], got {describe(value)}")
    return v


def _delegated(name: str, default: Any = None) -> property:
    """A read-only view of the inner optimizer's attribute ``name``."""
    return property(lambda self: getattr(self.inner, name, default),
                    doc=f"The inner optimizer's ``{name}``.")


class Lookahead(HeldEstimates, HeldHyperparameters, Optimizer):
    """Lookahead (Zhang et al., 2019, "k steps forward, 1 step back") around ``inner``, any
    elementwise optimizer here (Adam, SGD, ...), as ``optax.lookahead``::

        fast ← inner step(fast, g)                        (every step, inner's own state)
        every sync_period-th step t (t % sync_period == 0), after that inner step:
            slow ← slow + α·(fast − slow)                  (α = slow_step_size)
            fast ← slow
            reset_state: inner's slots ← their initial values, and its step count restarts

    The parameters ``update`` takes and returns are the *fast* weights (compute gradients
    with them, as optax's ``params.fast``); the slow weights are one more state slot,
    ``"slow"``, which starts as a copy of the parameters given to ``init`` (optax's
    ``LookaheadParams.init_synced``). Evaluate with :meth:`slow_params` (the paper and
    optax recommend the slow weights for inference; right after a sync step they equal
    the fast ones bit for bit).

    Conventions are optax's: syncing on the steps ``t`` with ``t % sync_period == 0`` (optax's
    ``steps_since_sync == sync_period − 1``), and ``reset_state`` restarting the inner
    optimizer after a sync as ``fast_optimizer.init`` would (its slots back to their initial
    values and its step count, hence bias corrections, from 1 again). Steps skipped under
    ``nonfinite="skip"`` do not count; a parameter absent from a step's gradients is left
    alone, its slow weights included, even on a sync step. A param group of the inner's with
    a ``step_offset`` ``k`` (its parameters joined after ``k`` steps: ``add_param_group``)
    counts its own steps ``t − k`` for everything that reads the count, the sync included
    (as timm's and torch-optimizer's Lookahead count each group's steps from its add); its
    slow weights are what its state holds, its parameters at the join for a state made then.
    A state that counts each parameter's own steps (:meth:`OptimizerState.note_missed`, what
    ``torch_optimizer`` does for a ``.grad`` that is None) gives the inner's rules a
    parameter's own count ``t − k − missed``, as torch.optim's per-parameter ``step``, while
    the sync counts its group's ``t − k`` (timm's Lookahead syncs each group on its own
    count, passing over a parameter without a gradient): a parameter that missed steps
    syncs with its group, on the group's sync steps it has a gradient at; one that never had
    one keeps slow weights equal to its fast ones. With ``reset_state`` the inner's count
    since the last sync is the group's (missed steps are not left out of it).

    Everything runs in the inner optimizer's single fused pass: the slots are the inner's
    plus ``"slow"``, the per-step scalars the inner's plus a sync flag and α, and the
    kernel's math the inner's composed with the synchronisation (:func:`lookahead_math`).
    The learning rate (:meth:`get_learning_rate` / :meth:`set_learning_rate`, hence the
    schedulers driving this optimizer), parameter groups, weight decay, clipping,
    ``nonfinite`` and weight averaging (``ema_decay``/``ema_start``/``swa_start``: averages of the fast
    weights after each step) are the inner optimizer's: give them to its constructor.
    ``state_dict`` / ``load_state_dict`` and checkpoints describe the inner optimizer as
    ``{"optimizer": class name, "hyperparameters": ...}`` under ``"inner"``; loading
    requires one of the same class. Around a :class:`~.sophia.Sophia`, ``hessian_due`` /
    ``update_hessian`` / ``win_rate`` are the Lookahead's, on its state (optax's
    ``lookahead(sophia)``; the estimate at the fast weights given to ``update``).

    Usage::

        opt = Lookahead(Adam(1e-3), sync_period=6, slow_step_size=0.5)
        state = opt.init(params)
        params, state = opt.update(params, grads, state)   # params: the fast weights
        eval_params = opt.slow_params(state)               # views: copy to keep
    """

    HELD, OWN = "inner", _OWN  # (``la.beta1`` is the inner's: :class:`HeldHyperparameters`)

    def held_view(self, state: Any) -> HeldView:
        """``state`` as the inner optimizer's (:class:`HeldEstimates`: a Sophia's
        ``update_hessian`` through ``la.update_hessian``): the slow weights aside; with
        ``reset_state`` the inner count restarts at each sync, whose step drops the
        inner state (optax's ``fast_optimizer.init``), an estimate of that step included."""
        kind = type(self.inner).__name__
        if not self.reset_state:
            return HeldView(state, kind, (SLOW,))
        k = self.sync_period
        if isinstance(state, OptimizerState):
            t, skipped = state.step, state.last_step_skipped
        else:  # (optax_transformation's / make_train_step's OptaxState)
            t, skipped = int(np.asarray(state.count)), False
        return HeldView(state, kind, (SLOW,), step=t % k,
                        restarted=t >= 1 and t % k == 0 and not skipped,
                        restarts_next=(t + 1) % k == 0)

    def __init__(self, inner: Optimizer, sync_period: int = 6, slow_step_size: float = 0.5,
                 reset_state: bool = False) -> None:
        inner = _check_inner(inner)
        self.sync_period = _check_sync_period(sync_period)
        self.slow_step_size = _check_slow_step_size(slow_step_size)
        self.reset_state = _check_reset(inner, check_flag("reset_state", reset_state))
        self.inner = inner
        self._backend = inner._backend

    def __copy__(self) -> Lookahead:
        """A copy wrapping a copy of the inner optimizer (so that changing one's learning
        rate or hyperparameters never changes the other's)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.inner = copy.copy(self.inner)
        return new

    def _wrapping(self, inner: Optimizer) -> Lookahead:
        """This Lookahead around ``inner`` instead (no copy of it)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.inner = inner
        return new

    # -- the inner optimizer's options ---------------------------------------------------
    clip_norm = _delegated("clip_norm")
    clip_eps = _delegated("clip_eps", 1e-6)
    clip_value = _delegated("clip_value")
    clip_tensor_norm = _delegated("clip_tensor_norm")
    clip_block_rms = _delegated("clip_block_rms")
    adaptive_clip = _delegated("adaptive_clip")
    adaptive_clip_eps = _delegated("adaptive_clip_eps", 1e-3)
    weight_decay = _delegated("weight_decay", 0.0)
    nonfinite = _delegated("nonfinite", "propagate")
    ema_decay = _delegated("ema_decay")
    ema_every = _delegated("ema_every", 1)
    ema_start = _delegated("ema_start", 1)
    swa_start = _delegated("swa_start")
    decoupled_weight_decay = _delegated("decoupled_weight_decay", False)
    weight_decay_in_math = _delegated("weight_decay_in_math", False)
    epsilon = _delegated("epsilon")

    @property
    def learning_rate(self) -> float:
        """The inner optimizer's learning rate."""
        return self.inner.learning_rate

    @learning_rate.setter
    def learning_rate(self, lr: float) -> None:
        self.inner.set_learning_rate(lr)

    def get_learning_rate(self, group: int | None = None) -> float:
        """The inner optimizer's learning rate (or that of its ``param_groups[group]``)."""
        return self.inner.get_learning_rate(group)

    def set_learning_rate(self, lr: float, group: int | None = None) -> None:
        """Set the inner optimizer's learning rate (see its ``set_learning_rate``)."""
        self.inner.set_learning_rate(lr, group)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def weight_decay_mask(self) -> Any:
        return self.inner.weight_decay_mask

    @property
    def exclude_weight_decay(self) -> list[Any]:
        return self.inner.exclude_weight_decay

    @property
    def strict(self) -> bool:
        return self.inner.strict

    def exclude_from_weight_decay(self, names: Sequence[str] | None = None,
                                  regex: str | None = None, *,
                                  var_names: Sequence[str] | None = None,
                                  var_list: Any = None) -> None:
        self.inner.exclude_from_weight_decay(names, regex, var_names=var_names,
                                             var_list=var_list)

    def _group(self, group: Any) -> dict[str, Any]:
        return self.inner._group(group)

    def _drivable(self, name: Any, group: int | None) -> None:
        if name in _OWN and group is not None:  # (its rows are the inner's groups')
            raise ValueError(f"Lookahead: {name} holds for every parameter and cannot "
                             f"differ per group (drive it with group=None)")
        super()._drivable(name, group)

    def _checked_hyperparameter(self, name: str, value: Any, group: int | None,
                                rule: bool = True) -> Any:
        """Lookahead's own ``sync_period`` / ``slow_step_size`` checked as the constructor
        checks them (what a scheduler driving them sets); the inner's by the inner."""
        checks = {"sync_period": _check_sync_period, "slow_step_size": _check_slow_step_size,
                  "reset_state": lambda v: _check_reset(self.inner, check_flag("reset_state", v))}
        if name not in checks:
            return self.inner._checked_hyperparameter(name, value, group, rule)
        try:
            return checks[name](value)
        except (TypeError, ValueError) as e:
            raise type(e)(f"Lookahead: {name}={value!r} refused: {e}") from None

    def hyper_holders(self) -> tuple[Any, ...]:
        """This Lookahead, then its inner optimizer's: a name other than Lookahead's own
        (``beta1``, ``weight_decay``, a group's) is the inner's hyperparameter, on its
        handle, its groups' rows, in a traced program and in a torch param group."""
        return (self, *self.inner.hyper_holders())

    def flat_hyperparameters(self) -> dict[str, Any]:
        own = {k: v for k, v in self.hyperparameters().items() if k != "inner"}
        return {**self.inner.flat_hyperparameters(), **own}

    def nested_hyperparameters(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in flat.items() if k in _OWN}
        rest = {k: v for k, v in flat.items() if k not in _OWN}
        if rest:
            out["inner"] = {"optimizer": type(self.inner).__name__,
                            "hyperparameters": self.inner.nested_hyperparameters(rest)}
        return out

    def group_rows(self, state: OptimizerState) -> tuple[np.ndarray, list[Any]]:
        """The inner optimizer's rows (its parameter groups), each wrapped in Lookahead. A
        group with a ``step_offset`` ``k`` (its parameters joined after ``k`` steps) counts
        its own steps ``t − k`` for all its step rules, the sync included: it syncs on every
        ``sync_period``-th step since it joined, as timm's and torch-optimizer's Lookahead
        count each param group's steps from its ``add_param_group``."""
        index, views = self.inner.group_rows(state)
        missed = getattr(state, "missed", None)
        own = [0] * len(views)
        if missed is not None:  # (a row's tensors all missed as many steps: own_count_rows)
            first = np.zeros(len(views), dtype=np.int64)
            first[index] = missed
            own = first.tolist()
        return index, [self if v is self.inner else self._joined(self._wrapping(v), v, m)
                       for v, m in zip(views, own)]

    @staticmethod
    def _joined(row: Lookahead, view: Any, missed: int = 0) -> Lookahead:
        """``row`` (wrapping the group's ``view``) counting the steps as its group does,
        its tensors' ``missed`` steps (in the view's offset) left out of the inner's count
        only: the sync counts the group's."""
        if view._step_offset:
            row._step_offset = view._step_offset
        if missed:
            row._missed = missed
        return row

    # -- what the engines run ----------------------------------------------------------
    def slot_names(self) -> tuple[str, ...]:
        return (*self.inner.slot_names(), SLOW)

    def slot_init(self, slot: str) -> float:
        # (a tensor slot's too: DoG's layer-wise estimates start at their own values)
        return 0.0 if slot == SLOW else self.inner.slot_init(slot)

    #: steps this row's tensors had no gradient at (``state.missed``, in its
    #: ``_step_offset`` too): the inner's rules leave them out, the sync counts them
    _missed = 0

    def scalars(self, step: int, **values: Any) -> tuple[float, ...]:
        """The inner optimizer's scalars (for the step count since the last sync with
        ``reset_state``), then the sync flag of ``step`` and α (then, with ``reset_state``,
        the inner slots' initial values). ``step`` is the row's own count (its missed
        steps left out, as torch.optim's per-parameter ``step``); the sync reads its
        group's, ``step + missed`` (timm's per-group count), as does ``reset_state``'s
        restarted count (a count since the last sync has no per-parameter form here)."""
        k = self.sync_period
        group_step = step + self._missed
        inner_step = (group_step - 1) % k + 1 if self.reset_state else step
        sync = (group_step % k == 0) * 1.0  # (arithmetic: traceable in a JAX program)
        out = (*self.inner.scalars(inner_step, **values), sync, self.slow_step_size)
        if self.reset_state:
            out += tuple(float(self.inner.slot_init(s)) for s in self.inner.slot_names())
        return out

    def kernel_math(self) -> Callable:
        inner = self.inner
        fn, n_slots, n_scal = inner.kernel_math(), len(inner.slot_names()), len(inner.scalars(1))
        n_extra = _arity(fn) - 2 - n_slots - n_scal if inner.two_pass() else 0
        return lookahead_math(fn, n_slots, n_scal, self.reset_state, n_extra)

    # -- a two-pass inner optimizer's (PolyakSGD, Momo, Prodigy, ...): its sums, values ------
    def reduce_math(self) -> Callable:
        inner = self.inner
        return lookahead_reduce(inner.reduce_math(), len(inner.slot_names()),
                                len(inner.scalars(1)), self.reset_state)

    def tensor_scalars(self, step, sums, scalars, tensors, values, sizes):  # noqa: ANN001, ANN201
        # (the own scalars start with the inner's: it reads them by position)
        return self.inner.tensor_scalars(step, sums, scalars, tensors, values, sizes)

    def state_value_init(self, name: str) -> float:
        return self.inner.state_value_init(name)

    def hyperparameters(self) -> dict[str, Any]:
        """``inner`` (its class name and hyperparameters), ``sync_period``,
        ``slow_step_size`` and ``reset_state``: plain JSON, as checkpoints store it."""
        return {"inner": _inner_spec(self.inner), "sync_period": self.sync_period,
                "slow_step_size": self.slow_step_size, "reset_state": self.reset_state}

    # -- the slow weights -----------------------------------------------------------------
    def slow_params(self, state: OptimizerState) -> dict[str, Any]:
        """The slow weights kept in ``state``, per parameter, to evaluate with: views of the
        state's slot on NumPy/torch (the next update changes them: copy to keep), arrays
        on JAX."""
        state = unwrapped(state)  # (an Accumulate's state: its wrapped one)
        if not isinstance(state, OptimizerState):
            raise TypeError(f"slow_params: state must be what Lookahead.init returned, got "
                            f"{type(state).__name__}")
        if SLOW not in state.slots:
            raise ValueError(f"slow_params: this {state.kind} state keeps no slow weights (it "
                             f"was not made by Lookahead.init)")
        return self._average(state, SLOW, "slow_params")

    # -- state dicts ------------------------------------------------------------------------
    def load_state_dict(self, d: Mapping[str, Any], params: Mapping[str, Any] | None = None
                        ) -> OptimizerState | None:
        """Restore the hyperparameters (the inner optimizer's through its own
        ``load_state_dict``, which must be of the saved class) and, given ``params``, the
        state, checked and restored as every optimizer's (``Optimizer.load_state_dict``:
        the keys, the counters ``consecutive_skips`` included, the slots, each average's
        counts and each parameter's missed steps, ``"missed"``, at most the step). Everything
        is checked first; on error nothing changes. The inner optimizer is replaced by a
        restored copy (never changed in place)."""
        hp = checked_head(self, d)
        unknown = sorted(set(hp) - {"inner", *_OWN})
        if unknown:
            raise KeyError(f"state dict hyperparameter(s) {unknown} unknown to {type(self).__name__}")
        new: dict[str, Any] = {}
        started: tuple[str, ...] = ()
        if "sync_period" in hp:
            new["sync_period"] = _check_sync_period(hp["sync_period"])
        if "slow_step_size" in hp:
            new["slow_step_size"] = _check_slow_step_size(hp["slow_step_size"])
        if "reset_state" in hp:
            new["reset_state"] = check_flag("reset_state", hp["reset_state"])
        if "inner" in hp:
            spec = hp["inner"]
            if not isinstance(spec, Mapping) or set(spec) != {"optimizer", "hyperparameters"}:
                raise TypeError("state dict hyperparameter 'inner' must be a dict with exactly "
                                "'optimizer' (a class name) and 'hyperparameters'")
            if spec["optimizer"] != type(self.inner).__name__:
                raise ValueError(f"state dict's inner optimizer is {spec['optimizer']!r}, but "
                                 f"this Lookahead wraps {type(self.inner).__name__}")
            inner = copy.copy(self.inner)
            # (with the step: an average the inner keeps and the checkpoint lacks starts after it)
            inner.load_state_dict({**spec, "step": d["step"]} if "step" in d else spec)
            new["inner"] = _check_inner(inner)
            step = state_dict_count(d, "step") if "step" in d else None
            started = started_averages(self, hp, step)
        trial = copy.copy(self)
        trial.__dict__.update(new)
        state = None
        if params is not None and "slots" in d:  # (the optimizers' own checks and restore)
            state = self._loaded_state(trial, d, params, started)
        self.__dict__.update(new)
        return state


def _init(self: Lookahead, params: Mapping[str, Any]) -> OptimizerState:
    """The inner optimizer's state for ``params`` plus the slow weights, a copy of
    ``params`` (optax's ``LookaheadParams.init_synced``); ``params`` are not modified."""
    state = Optimizer.init(self, params)
    lay, eng = state.layout, state.engine
    if params:
        flat = lay.flatten_numpy({n: eng.to_numpy(p) for n, p in params.items()})
        state.slots[SLOW] = eng.from_numpy(flat)
    return state


# assigned after the class, so that Optimizer.__init_subclass__ does not wrap it (the wrapper
# binds the backend before init runs, and would keep an inferred one when init refuses)
Lookahead.init = _init  # type: ignore[method-assign]
# the inner optimizer's two-pass description (the loss it needs, its sums, tensor slots and
# values): after the class too, as __init_subclass__ reads them as class constants
for _name, _default in (("needs_loss", False), ("reductions", 0), ("tensor_slots", ()),
                        ("state_values", ()), ("scalar_values", ()), ("step_wide", ()),
                        ("counts_missed", True), ("tensor_scalars_step", "tensor"),
                        ("loaded_domains", {})):
    setattr(Lookahead, _name, _delegated(_name, _default))
