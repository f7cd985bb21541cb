"""Weight averaging in the optimizer's own fused pass: an exponential moving average
(``ema_decay=``) and/or an equal running mean from a given step on (SWA, ``swa_start=``) of
the parameters, each kept as one more state slot (``"ema"``, ``"swa"``) and updated in the
same elementwise pass, right after the parameter update::

    avg ← avg + w·(p_new − avg)          (nothing on a step with w = 0)

An average starts as the parameters given to ``init`` (as torch's ``AveragedModel``, a
copy of the model), so it is never garbage before its first update. The weight ``w`` is a
per-step scalar, one more column of the scalar table (so changing ``ema_decay`` or the
learning rate never recompiles). Which steps update an average follows from the step count
``t`` and the settings in force at that step; how an update weighs follows from the
average's *update count* ``n``, kept in the state (``state.averaged``, per average and
tensor; saved with it: state dicts, checkpoints, sharded checkpoints, a ``torch_optimizer``'s
state dict), as torch's ``AveragedModel`` keeps ``n_averaged``:

* EMA, ``ema_every = k``, ``ema_start = s`` (default 1): the average is updated on the
  steps that are multiples of ``k`` and ``>= s`` (``k, 2k, 3k, ...`` by default); an update
  with ``n = 0`` copies the parameters (``w = 1``), each later one takes
  ``w = 1 − ema_decay`` (the ``ema_decay`` in force at that step). That is torch's
  ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))`` created after
  step ``s − 1`` (timm's ``ModelEma`` after a warm-up) with ``update_parameters(model)``
  called after every later k-th optimizer step. (Keras'
  ``ema_overwrite_frequency`` is another thing: Keras updates its EMA every step and
  *overwrites the model's weights* with it every k steps; here the parameters are never
  overwritten: :meth:`~mithril.utils.optimizers.Optimizer.swap_ema` swaps the average in
  when you ask. Keras's ``ema_overwrite_frequency=k`` is rebinding ``params`` to a copy of
  ``opt.ema_params(state)`` (views of the state on NumPy/torch) after every k-th update.)
* SWA, ``swa_start = s``: the average is the mean of the parameters after steps ``s``,
  ``s + 1``, ... (those that are multiples of ``ema_every`` when it is > 1): ``w = 1/(n+1)``
  on an update after ``n``. That is torch's ``AveragedModel(model)`` (default average) with
  ``update_parameters(model)`` after each of those steps; use it with
  :class:`~mithril.utils.lr_schedulers.SWALR`.

Changing the settings mid-run (``opt.ema_start = ...``, a group's, ``ema_decay``,
``swa_start``) is a torch loop's ``if step >= start: avg.update_parameters(model)`` with the
new ``start``, on the same ``AveragedModel``: a start moved later pauses the updates until
it (a started average then goes on from where it was: its count is kept, an SWA mean goes on
counting); a start moved earlier (to a step already passed) before the average's first
update makes the next averaging step its first, a copy (never a blend with the starting
copy); moved earlier once started it changes nothing. A new ``ema_decay`` weighs the
updates from then on. Per parameter group (``param_groups`` with their own ``ema_start`` /
``swa_start`` / ``ema_every`` / ``ema_decay``) each group's tensors count their own updates.
Where the state holds no count (a state dict or checkpoint saved before they were kept),
it is inferred from the step as if the settings had always been the current ones (the
updates in ``[s, t]``), which is what such a run did; so is it in a traced program (the
optax transformation, ``make_train_step``), whose settings are fixed while it runs.

Resuming (:meth:`~mithril.utils.optimizers.Optimizer.load_state_dict`): an optimizer
constructed with an average that loads a checkpoint (a state dict saved with its state)
without it keeps its averaging
settings and starts the average at the resume, as a fresh ``AveragedModel`` would: the slot
is a copy of the ``params`` given to ``load_state_dict``, its count 0, and the start
(``ema_start``, ``swa_start``) becomes the saved step + 1 unless it is later already. An
average the checkpoint has is restored with the checkpoint's settings and count (torch's
rule: ``load_state_dict`` restores the hyperparameters), whether or not the optimizer was
constructed with it.

Against the peers (``tests/test_weight_averaging_peers.py``, side by side): Keras 3's
``use_ema=True, ema_momentum=m`` is ``ema_decay=m`` (its first step copies too); optax's
``optax.ema(d)`` starts from zeros instead of a copy, so it is another average: undebiased it
is ours minus ``d**t·p₁`` (``p₁`` the first averaged parameters), ``debias=True`` that
divided by ``1 − d**t``. Under mixed precision a step the loss scaler skips does not advance
the step count, so it moves no average (torch: ``update_parameters`` only after a step
``GradScaler`` did not skip). Rounding: torch's ``lerp`` fuses the multiply-add (one rounding;
for float16/bfloat16 in float32), ours rounds each operation in the parameters' dtype, so an
average may differ from ``AveragedModel``'s by an ulp in float32 and the EMA by a few ulps in
float16 / bfloat16 (no drift: the average contracts); float64 agrees to ~1e-16.

The composed elementwise function (:func:`averaged_math`) is generated once per (math, slot
count, scalar count, averaged slots), with explicit arity, so the numba kernels compile it
as any optimizer's math and it runs as well on NumPy, JAX and torch arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numba.extending import register_jitable

from ...errors import KeyMismatchError, ShapeError
from .checks import MAX_INT, check_int, describe, is_array, to_float, unwrapped
from .elementwise import where
from .state import OptimizerState, scalar_arguments

#: the state slot of each average
EMA, SWA = "ema", "swa"

#: the largest ``ema_every`` / ``ema_start`` / ``swa_start``: beyond it a step count would
#: overflow int64
MAX_EVERY = 2**62


class NoAverageError(KeyError):
    """The optimizer state keeps no such average (it was made without ``ema_decay=`` /
    ``swa_start=``)."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


def check_ema_decay(value: Any) -> float | None:
    if value is None:
        return None
    v = to_float("ema_decay", value)
    # 1 (torch, Keras and optax take it): the average stays the first averaged params
    if not (math.isfinite(v) and 0 <= v <= 1):
        raise ValueError(f"ema_decay must be in [0, 1] (or None: no EMA), got {describe(value)}")
    return v


def check_ema_every(value: Any) -> int:
    return check_int("ema_every", value, minimum=1, maximum=MAX_EVERY)


def check_swa_start(value: Any) -> int | None:
    if value is None:
        return None
    return check_int("swa_start", value, minimum=1, maximum=MAX_EVERY)


def check_ema_start(value: Any) -> int:
    return check_int("ema_start", value, minimum=1, maximum=MAX_EVERY)


def _updates_before(t: int, s: int, k: int) -> int:
    """How many averaging steps (multiples of ``k`` that are ``>= s``) come before step
    ``t``: the multiples of ``k`` in ``[s, t − 1]``."""
    return (t - 1) // k - (s - 1) // k


def slots_of(opt: Any) -> tuple[str, ...]:
    """The averaged slots ``opt`` keeps, in order."""
    out = ()
    if getattr(opt, "ema_decay", None) is not None:
        out += (EMA,)
    if getattr(opt, "swa_start", None) is not None:
        out += (SWA,)
    return out


def _gate(opt: Any, t: int, start: int) -> bool:
    """Whether step ``t`` updates an average that starts at ``start`` (paced by
    ``opt.ema_every``)."""
    return t >= start and not t % getattr(opt, "ema_every", 1)


def inferred_counts(opt: Any, t: int) -> tuple[int, ...]:
    """How many updates each average of ``opt`` (a row) had before step ``t`` if its
    settings had always been the current ones: what a state saved without its counts
    (before they were kept) resumes with."""
    k = getattr(opt, "ema_every", 1)
    out: tuple[int, ...] = ()
    if getattr(opt, "ema_decay", None) is not None:
        out += (max(0, _updates_before(t, getattr(opt, "ema_start", 1), k)),)
    if getattr(opt, "swa_start", None) is not None:
        out += (max(0, _updates_before(t, opt.swa_start, k)),)
    return out


def weights(opt: Any, t: int, counts: tuple[int, ...] | None = None) -> tuple[float, ...]:
    """The averaging weight of each averaged slot for step ``t`` (1-based): 0 where the
    step does not average (not a multiple of ``ema_every``, or before the average's start),
    1 on its first update (a copy), then ``1 − ema_decay`` (EMA) or ``1/(n+1)`` after ``n``
    updates (SWA). ``counts``: the updates each average has had (the state's
    :func:`row_counts`); None infers them from ``t`` and the settings
    (:func:`inferred_counts`: exact while the settings never changed, as in a traced
    program)."""
    if counts is None:
        counts = inferred_counts(opt, t)
    out: tuple[float, ...] = ()
    i = 0
    if getattr(opt, "ema_decay", None) is not None:
        n, i = counts[i], i + 1
        on = _gate(opt, t, getattr(opt, "ema_start", 1))
        out += ((1.0 if n == 0 else 1.0 - opt.ema_decay) if on else 0.0,)
    if getattr(opt, "swa_start", None) is not None:
        n = counts[i]
        out += (1.0 / (n + 1) if _gate(opt, t, opt.swa_start) else 0.0,)
    return out


def _row_table(opt: Any, state: Any) -> tuple[np.ndarray, list[Any]]:
    """Each tensor's row (layout order) and the rows: optimizer views with their group's
    settings (a tensorwise optimizer's own per-tensor rows where it has them)."""
    rows = getattr(opt, "tensor_rows", None)
    if rows is not None:
        views = rows(state)
        return np.arange(len(views)), views
    index, views = opt.group_rows(state)
    return np.asarray(index), views


def counts_of(opt: Any, state: Any) -> dict[str, np.ndarray] | None:
    """``state.averaged``: per averaged slot, the updates each tensor's average has had
    (int64, layout order); None without averages. A state without them (made before they
    were kept) gets them inferred from its step (:func:`inferred_counts`), once."""
    avg = slots_of(opt)
    if not avg:
        return None
    got = getattr(state, "averaged", None)
    if got is None or set(got) != set(avg):
        index, views = _row_table(opt, state)
        per = np.array([inferred_counts(v, state.step + 1) for v in views],
                       dtype=np.int64).reshape(len(views), len(avg))
        have = got or {}
        got = {s: np.array(have[s], dtype=np.int64) if s in have else per[index, j]
               for j, s in enumerate(avg)}
        state.averaged = got
    return got


def row_counts(opt: Any, state: Any, index: Any, n_rows: int) -> list[tuple[int, ...] | None]:
    """Per row of the scalar table (``index``: each tensor's row; None: one row for all):
    the updates each average has had, read from the row's first tensor (a row's tensors
    share its weights, so they agree unless the groups were redrawn: then the row's first
    tensor's count decides); None for a row without tensors."""
    counts = counts_of(opt, state)
    out: list[tuple[int, ...] | None] = [None] * n_rows
    if counts is None:
        return out
    arrays = [counts[s] for s in slots_of(opt)]
    if index is None:
        first = [(0, 0)] if len(arrays[0]) else []
    else:  # (the index is the object group_rows keeps while the groups stay: cached)
        held = getattr(state, "_averaged_first", None)
        if held is None or held[0] is not index:
            rows, at = np.unique(np.asarray(index), return_index=True)
            held = state._averaged_first = (index, list(zip(rows.tolist(), at.tolist())))
        first = held[1]
    for r, i in first:
        out[r] = tuple(int(c[i]) for c in arrays)
    return out


def tensor_counts(opt: Any, state: Any, i: int) -> tuple[int, ...] | None:
    """The updates each average of tensor ``i`` (layout order) has had."""
    counts = counts_of(opt, state)
    return None if counts is None else tuple(int(counts[s][i]) for s in slots_of(opt))


def advance(opt: Any, state: Any, t: int) -> None:
    """Count applied step ``t``'s averaging updates in ``state.averaged`` (the step the
    weights of :func:`weights` were taken for): each tensor's average that step ``t``
    updated (its row's gate) has had one more. New arrays, never changed in place (a copy
    of the state keeps its own counts)."""
    counts = counts_of(opt, state)
    if counts is None:
        return
    index, views = _row_table(opt, state)
    new = dict(counts)
    for s in counts:
        gates = np.array([_gate(v, t, getattr(v, "ema_start", 1) if s == EMA else v.swa_start)
                          for v in views], dtype=np.int64)
        new[s] = counts[s] + gates[index]
    state.averaged = new


def saved_counts(state: Any) -> dict[str, dict[str, int]]:
    """``state.averaged`` per parameter name, for a state dict (empty when none kept)."""
    got = getattr(state, "averaged", None) or {}
    names = state.layout.names
    return {s: {n: int(v) for n, v in zip(names, c)} for s, c in got.items()}


def merged_counts(opt: Any, parts: list[Any], names: list[str], step: int | None = None
                  ) -> dict[str, np.ndarray] | None:
    """The counts of a sharded checkpoint for the parameters ``names``: each rank's
    ``"averaged"`` (its :func:`saved_counts` for the tensors it held) merged; an average
    none has (one that starts at the resume) at 0. None where a rank's has none (saved
    before they were kept: inferred from the step when first used). Each count is an int
    in [0, ``step``] (the checkpoint's step; None: at most ``MAX_INT``)."""
    avg = slots_of(opt)
    if not avg or not all(isinstance(p, Mapping) for p in parts):
        return None
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for s, per in part.items():
            if s not in avg or not isinstance(per, Mapping):
                raise ValueError(f"checkpoint 'averaged' has {s!r}: not an average of "
                                 f"{type(opt).__name__} ({list(avg)}) with per-parameter counts")
            merged.setdefault(s, {}).update(per)
    return {s: np.array([_count(merged.get(s, {}).get(n, 0), step, "checkpoint", s, n)
                         for n in names], dtype=np.int64) for s in avg}


def _count(v: Any, step: int | None, what: str, s: str, n: str) -> int:
    """An average's update count ``v`` (of average ``s`` for parameter ``n``), checked: an
    int in [0, ``step``] (an average is updated at most once per step; None: at most
    ``MAX_INT``, what its int64 holds)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{what} 'averaged' count of '{s}' for '{n}' must be a non-negative "
                         f"int, got {describe(v)}")
    bound = MAX_INT if step is None else step
    if v > bound:
        raise ValueError(f"{what} 'averaged' count of '{s}' for '{n}' is {v}, beyond "
                         + (f"the {step} steps taken" if step is not None else f"{MAX_INT}"))
    return int(v)


def loaded_counts(opt: Any, saved: Any, state: Any, started: tuple[str, ...]
                  ) -> dict[str, np.ndarray] | None:
    """The counts of a state dict's ``"averaged"`` (:func:`saved_counts`) for ``state`` (a
    loaded state of ``opt``, its step set), checked: one entry per average the state dict
    restores (the ``started`` ones start at 0), each with exactly the parameters, each an
    int in [0, ``state.step``]. ``saved`` None (a state dict from before counts were kept): inferred
    from the step (:func:`counts_of`)."""
    avg = slots_of(opt)
    if saved is None:
        state.averaged = None
        got = counts_of(opt, state)
        for s in started:
            got[s] = np.zeros(len(got[s]), dtype=np.int64)
        return got
    if not isinstance(saved, Mapping):
        raise ValueError(f"state dict 'averaged' must be a dict of average -> {{param: count}}, "
                        f"got {type(saved).__name__}")
    want = set(avg) - set(started)
    if set(saved) != want:
        raise KeyError(f"state dict 'averaged' must have exactly the averages {sorted(want)}, "
                       f"got {sorted(saved)}")
    names = state.layout.names
    out = {s: np.zeros(len(names), dtype=np.int64) for s in avg}
    for s, per in saved.items():
        if not isinstance(per, Mapping) or set(per) != set(names):
            got = sorted(per) if isinstance(per, Mapping) else type(per).__name__
            raise KeyError(f"state dict 'averaged' of '{s}' must have exactly the parameters "
                           f"{sorted(names)}, got {got}")
        for i, n in enumerate(names):
            out[s][i] = _count(per[n], state.step, "state dict", s, n)
    return out


def resumed_averages(opt: Any, saved: Mapping[str, Any], step: int | None
                     ) -> tuple[tuple[str, ...], dict[str, Any]]:
    """For ``opt`` loading a checkpoint whose hyperparameters are ``saved`` (saved at
    ``step``): the averages ``opt`` keeps that the checkpoint has not (started at the
    resume), and the hyperparameters that keep them, to set over the checkpoint's. An
    average starts after ``step``: its start becomes ``step + 1`` unless ``opt``'s is later.
    ``ema_every`` is ``opt``'s only where the checkpoint keeps no average (else it paces the
    restored one). A checkpoint saved before ``ema_start`` existed started its EMA at step 1.
    ``step`` None (hyperparameters only, no state: a change of settings, as the torch
    wrapper's groups make): nothing, the hyperparameters are taken as given."""
    if step is None:
        return (), {}
    new: dict[str, Any] = {}
    if saved.get("ema_decay") is not None and "ema_start" not in saved:
        new["ema_start"] = 1
    ema = getattr(opt, "ema_decay", None) is not None and saved.get("ema_decay") is None
    swa = getattr(opt, "swa_start", None) is not None and saved.get("swa_start") is None
    after = step + 1
    if ema:
        new.update(ema_decay=opt.ema_decay, ema_start=max(opt.ema_start, after))
    if swa:
        new["swa_start"] = max(opt.swa_start, after)
    if (ema or swa) and saved.get("ema_decay") is None and saved.get("swa_start") is None:
        new["ema_every"] = opt.ema_every
    return (EMA,) * ema + (SWA,) * swa, new


def started_averages(opt: Any, saved: Mapping[str, Any], step: int | None) -> tuple[str, ...]:
    """The slots of :func:`resumed_averages`: the averages ``opt`` keeps that a checkpoint
    (hyperparameters ``saved``, saved at ``step``) lacks, which start at the resume. A
    wrapper's (a Lookahead's, ``saved["inner"]``; a SAM's, ScheduleFree's or Mechanize's,
    ``saved["base_optimizer"]``) are its inner optimizer's."""
    key = "inner" if "inner" in saved else "base_optimizer"
    inner, spec = opt.__dict__.get(key), saved.get(key)  # (not a wrapper's pass-through)
    if inner is not None and isinstance(spec, Mapping):
        hp = spec.get("hyperparameters")
        return started_averages(inner, hp, step) if isinstance(hp, Mapping) else ()
    return resumed_averages(opt, saved, step)[0]


def average(p: Any, a: Any, w: Any) -> Any:
    """One averaging step, elementwise: ``a + w·(p − a)``; exactly ``p`` where ``w`` is 1
    (a first update copies, as torch's ``lerp`` and ``AveragedModel`` do), ``a`` itself
    where ``w`` is 0 (an inf/NaN parameter never leaks into an average a step leaves
    alone)."""
    return where(w == 1, p, where(w != 0, a + w * (p - a), a))


_SRC = """
def averaged({args}):
    out = MATH({math_args})
    p = out[0]
    return ({outs})
"""


@functools.cache
def averaged_math(math_fn: Any, n_slots: int, n_scal: int, n_avg: int) -> Any:
    """``math_fn`` followed by ``n_avg`` averaging steps: ``(p, g, *slots, *avgs, *scalars,
    *weights) -> (p, *slots, *avgs)``. Cached: one function object per base math, so the
    kernels built from it are cached too."""
    slots = [f"s{i}" for i in range(n_slots)]
    avgs = [f"a{i}" for i in range(n_avg)]
    scal = [f"h{i}" for i in range(n_scal)]
    wts = [f"w{i}" for i in range(n_avg)]
    src = _SRC.format(
        args=", ".join(["p", "g", *slots, *avgs, *scal, *wts]),
        math_args=", ".join(["p", "g", *slots, *scal]),
        outs=", ".join(["p", *(f"out[{i + 1}]" for i in range(n_slots)),
                        *(f"AVG(p, {a}, {w})" for a, w in zip(avgs, wts))]) + ",",
    )
    name = getattr(math_fn, "__qualname__", repr(math_fn))
    ns: dict[str, Any] = {"MATH": _jitable(math_fn), "AVG": _jitable(average)}
    exec(compile(src, f"<mithril averaged {name}>", "exec"), ns)
    fn = ns["averaged"]
    fn.__qualname__ = fn.__name__ = f"averaged_{getattr(math_fn, '__name__', 'math')}"
    fn.base_math = math_fn
    return fn


@functools.cache
def _jitable(fn: Any) -> Any:
    """``fn`` itself, callable from Python as ever and, referenced from numba-compiled code,
    compiled and inlined there (numba's ``register_jitable``), its literals typed as its
    first argument there (:func:`~.engines.literals.typed_literals`)."""
    from .engines.literals import typed_literals

    return register_jitable(inline="always")(typed_literals(fn))



class AveragingMixin:
    """Weight averaging's half of :class:`~mithril.utils.optimizers.Optimizer`: the slots,
    scalars and math the engines run (the optimizer's own plus the averages), and the
    averages' accessors."""

    def averaged_slots(self) -> tuple[str, ...]:
        """The averages this optimizer keeps: ``"ema"`` (``ema_decay``), ``"swa"``
        (``swa_start``), in that order; empty without weight averaging."""
        return slots_of(self)

    def full_slot_names(self) -> tuple[str, ...]:
        """Every state slot: :meth:`slot_names`, then :meth:`averaged_slots`."""
        avg = slots_of(self)
        if not avg:
            return self.slot_names()
        own = self.slot_names()
        clash = sorted(set(own) & set(avg))
        if clash:
            raise ValueError(f"{type(self).__name__} has state slot(s) {clash} of its own: "
                             f"they clash with weight averaging's")
        return (*own, *avg)

    def full_scalars(self, step: int, values: Mapping[str, Any] | None = None,
                     counts: tuple[int, ...] | None = None) -> tuple[float, ...]:
        """:meth:`scalars`, then each average's weight for ``step`` (see :mod:`.averaging`).
        ``values``: the state's ``values``, of which :attr:`scalar_values` are passed to
        :meth:`scalars` as keyword arguments (None: each one's ``state_value_init``).
        ``counts``: the updates each average has had (:func:`row_counts`; None: inferred
        from ``step``)."""
        own = self.scalars(self.row_step(step), **scalar_arguments(self, values))
        if self.ema_decay is None and self.swa_start is None:
            return own
        return (*own, *weights(self, step, counts))

    def full_kernel_math(self, n_scalars: int) -> Callable:
        """The elementwise function the engines run, ``(p, g, *full slots, *full scalars)
        -> (p, *full slots)`` with ``n_scalars = len(full_scalars(t))``: :meth:`kernel_math`
        itself without weight averaging, else it composed with the averaging steps (one
        function per base math, so the kernels stay cached)."""
        math_fn = self.kernel_math()
        n_avg = len(slots_of(self))
        if not n_avg:
            return math_fn
        return averaged_math(math_fn, len(self.slot_names()), n_scalars - n_avg, n_avg)

    def ema_params(self, state: OptimizerState) -> dict[str, Any]:
        """The EMA of the parameters kept in ``state`` (``ema_decay=``), per parameter: views
        of the state's slot on NumPy/torch (the next update changes them: copy to keep),
        arrays on JAX. Before its first update it holds the parameters ``init`` was given.
        A state kept without an EMA raises :class:`~.NoAverageError` (a
        ``KeyError``)."""
        return self._average(state, EMA, "ema_params")

    def swa_params(self, state: OptimizerState) -> dict[str, Any]:
        """The SWA average (``swa_start=``) kept in ``state``, as :meth:`ema_params`."""
        return self._average(state, SWA, "swa_params")

    def _average(self, state: Any, slot: str, what: str) -> dict[str, Any]:
        state = unwrapped(state)
        if not isinstance(state, OptimizerState):
            hint = ("; a make_train_step's JAX state: step.to_optimizer_state(opt_state, params) "
                    "first") if type(state).__name__ == "OptaxState" else ""
            raise TypeError(f"{what}: state must be what {type(self).__name__}.init returned, "
                            f"got {type(state).__name__}{hint}")
        if slot not in state.slots:
            option = "ema_decay=" if slot == EMA else "swa_start="
            raise NoAverageError(
                f"{what}: this {state.kind} state keeps no {slot.upper()} (slots "
                f"{sorted(state.slots)}); construct the optimizer with {option} before init")
        out = state.slot(slot)
        if state.engine.backend.name == "jax":  # JAX arrays, never views of a host buffer
            import jax.numpy as jnp

            return {n: jnp.array(np.asarray(v)) for n, v in out.items()}
        return out

    def swap_ema(self, params: Mapping[str, Any], state: OptimizerState,
                 average: str | None = None) -> dict[str, Any]:
        """Swap an average (``"ema"``, or ``"swa"``; by default the EMA, else the SWA
        average) with the parameters: returns the parameters to evaluate with, and the
        state then keeps the training parameters in the average's place. Call it again,
        with what it returned, to swap back: the training parameters and the average come
        back bit for bit.

        Ownership, as for :meth:`update`: ``params`` are consumed, rebind to what it
        returns. When ``params`` are the arrays the last update returned (NumPy, torch),
        the two buffers swap contents in place, so those very arrays hold the average
        until the swap back (nothing is allocated); other arrays (JAX's, or arrays of your
        own) are copied into the state, and the average comes back as arrays over the
        buffer the state held it in (on JAX, new arrays). While swapped, :meth:`update`, the average's
        accessors and saving the state refuse (the slot holds the training parameters)."""
        state = unwrapped(state)
        if not isinstance(state, OptimizerState):
            raise TypeError(f"swap_ema: state must be what {type(self).__name__}.init "
                            f"returned, got {type(state).__name__}")
        if not isinstance(params, Mapping):
            raise TypeError(f"swap_ema: params must be a dict of arrays, got "
                            f"{type(params).__name__}")
        kept = [s for s in (EMA, SWA) if s in state.slots]
        if average is None:
            if state.swapped is not None:
                average = state.swapped
            elif not kept:
                raise NoAverageError(
                    f"swap_ema: this {state.kind} state keeps no average (slots "
                    f"{sorted(state.slots)}); construct the optimizer with ema_decay= or "
                    f"swa_start= before init")
            else:
                average = kept[0]
        if average not in (EMA, SWA):
            raise ValueError(f"swap_ema: average must be 'ema' or 'swa', got {average!r}")
        if average not in state.slots:
            self._average(state, average, "swap_ema")  # raises, naming it
        if state.swapped not in (None, average):
            raise ValueError(f"swap_ema: the {state.swapped.upper()} is swapped in; swap it "
                             f"back before swapping the {average.upper()}")
        lay, eng = state.layout, state.engine
        ours = eng.backend.name != "jax" and state.returned(params)
        if not ours:  # check everything before anything changes
            if params.keys() != lay.index.keys():
                raise KeyMismatchError(
                    f"swap_ema: params do not match the optimizer state: missing "
                    f"{sorted(set(lay.names) - set(params))}, unknown "
                    f"{sorted(set(params) - set(lay.names))}")
            for name, p in params.items():
                shape = lay.shapes[lay.index[name]]
                if not is_array(p) or tuple(p.shape) != shape:
                    raise ShapeError(f"swap_ema: params['{name}'] must be an array of shape "
                                     f"{shape}, got {type(p).__name__} "
                                     f"{tuple(getattr(p, 'shape', ()))}")
            want = np.dtype(eng.to_numpy(state.slots[average]).dtype)
            host = {n: np.asarray(eng.to_numpy(p)) for n, p in params.items()}
            for name, h in host.items():  # (each: concatenating would promote a float32 one)
                if h.dtype != want:
                    raise TypeError(f"swap_ema: params['{name}'] must have dtype {lay.dtype}, "
                                    f"got {h.dtype}")
            flat = lay.flatten_numpy(host)
            held = state.slots[average]
            state.slots[average] = eng.from_numpy(flat)
            out = lay.unflatten(held)
            if eng.backend.name == "jax" and isinstance(held, np.ndarray):  # JAX-on-CPU
                import jax

                out = {n: jax.device_put(np.array(v), eng.backend.device) for n, v in out.items()}
        else:
            buf, avg = state.params_flat, state.slots[average]
            if eng.backend.name == "torch":
                tmp = buf.clone()
                buf.copy_(avg)
                avg.copy_(tmp)
            else:
                tmp = buf.copy()
                buf[...] = avg
                avg[...] = tmp
            out = dict(state.param_views)
        state.swapped = None if state.swapped == average else average
        return out

