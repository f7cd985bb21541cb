"""The steady state of a plain step, without re-deciding how to run it.

:meth:`NumbaEngine.step <.numba_engine.NumbaEngine.step>` decides on every call how to run
an update: which checks apply, whether a norm or a first pass is needed, which kernel, over
which buffers. In a training loop the answers never change, and deciding costs ~25 µs of
Python a step inside a real step (the interpreter's caches are cold there: the forward and
backward passes ran in between), as much as a small model's whole update kernel.

A plain step - NumPy or CPU torch, parameters that are the arrays the previous update
returned (updated in place), no clipping by per-tensor or adaptive norms (a global
``clip_norm`` is fine: its norm pass is repeated too), ``nonfinite="propagate"`` or
``"unchecked"`` - leaves a :class:`Recipe` on its state: the answers, and what they were
derived from. The next update takes :func:`run` instead when nothing they depend on has
changed: the same optimizer object with the same attributes (its learning
rate apart: a scheduler sets it every step, and it is only ever a per-step scalar), the
same parameter groups (their version), the same slot and parameter buffers, and the
gradients pass the same address scan (the complete, ordered, well-typed set the kernel can
read; or a set that leaves some parameters out, as a loss that does not reach them does:
the scan of its keys is made once, and the left-out tensors get no address, as the full
path gives them). The recipe reads the rows of the scalar table anew at every step, so it
holds while the state's missed counts change (``note_missed``; a two-head model's step on
one head, NumPy: 1.86x → ~1.1x the time of the step that reaches both,
``benchmarks/unreached_step.py``). Everything per step is computed as the full path computes it (the scalar table, the
aliasing check, the kernel's Σ g²), so the result is bit for bit the same; with one
parameter group and no clipping by norm the table's one row is built in the layout's dtype
directly (:func:`_one_group`: one SGD step on 1k params, 26 → 21 µs); anything else
falls back to the full path, which raises the errors. A two-pass optimizer's recipe (LAMB,
LARS, Novograd, Prodigy) repeats its first pass and per-tensor table as the full path takes
them, then the update as a one-pass step does (10k params in 20 tensors, a step: LAMB
151-153 → 135-139 µs, Prodigy 173-196 → 139-153).

The jitted JAX engine (accelerators; ``MITHRIL_JAX_ENGINE=jit`` on CPU) keeps a
:class:`JaxRecipe` under the same conditions (no first pass, no adaptive or per-tensor
clipping, ``"propagate"`` or ``"unchecked"``, every gradient given, the params the last
update returned): its compiled program, called with this step's scalar table. That cuts
the Python around the program by about a third (1M params in one tensor, CPU: ~190 → ~145
µs a call, of which the program's own dispatch is ~70 µs). It checks the gradients' keys
and array type only: their shapes and dtypes are the program's signature, and a call with
others is traced anew and refused there (:class:`~.common.Unfit`), never run; its one row
of scalars (one parameter group) is built without the table (:func:`_row`). One tensor of
10 elements, host time of a call: 87-116 → 76-114 µs; 200 tensors ~25% less.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from itertools import repeat
from typing import Any

import numpy as np

from ..averaging import row_counts
from .common import Unfit, prologue, scalar_table
from .kernels import update_kernel

_is = operator.is_


def repeatable(opt: Any) -> bool:
    """Whether ``opt``'s attributes and groups are all that its step depends on: not a
    wrapper of another optimizer (Lookahead: the inner one's attributes could change under
    it), and the groups of the base class (versioned)."""
    return "_groups_version" in opt.__dict__ and not any(
        hasattr(v, "full_slot_names") for v in opt.__dict__.values())


def keep(opt: Any, state: Any, make: Any) -> None:
    """Leave the recipe ``make()`` on ``state`` for the next update, unless ``opt`` is not
    :func:`repeatable` or the last few recipes went unused (something they depend on
    changes every step: making them is then wasted work)."""
    old = state.fast
    if not repeatable(opt):
        state.fast = None
        return
    if old is not None and not old.used:
        state.fast_waste += 1
    state.fast = make() if state.fast_waste < 4 else None


class Recipe:
    """What a plain step decided (see the module docs), and what it depended on."""

    __slots__ = ("opt", "engine", "attrs", "groups", "names", "slots", "n_slots", "flat",
                 "written", "before", "kernel_args", "kernels", "two_pass", "used", "partial",
                 "dtype", "bound")

    #: the rows of the scalar table are read anew at every step (:func:`run`), so the
    #: recipe holds while a state's missed counts change (``OptimizerState.note_missed``)
    follows_rows = True

    def __init__(self, opt: Any, state: Any, engine: Any, math_fn: Any, n_scal: int,
                 n_avg: int) -> None:
        self.opt, self.engine = opt, engine
        self.attrs = dict(opt.__dict__)
        self.groups = (opt._groups_version, id(opt._groups))
        # the slots the kernel reads and writes (a two-pass step's tensor slots are new
        # arrays every step: read afresh by its table, never by the kernel)
        self.names = opt.full_slot_names()
        self.slots, self.n_slots = tuple(state.slots[s] for s in self.names), len(state.slots)
        self.flat = state.params_flat
        slots = [engine.np_view(a) for a in self.slots]
        flat = engine.np_view(state.params_flat)
        self.written = (state.params_flat, *self.slots)
        self.before = (flat, flat, *slots)
        self.kernel_args = (math_fn, len(slots), n_scal, state.layout.dtype, n_avg)
        self.kernels: dict[bool, Any] = {}
        self.two_pass = opt.two_pass()
        self.dtype = np.dtype(state.layout.dtype)
        self.bound = _largest(self.dtype)
        self.used = False  # (a recipe never used: see keep)
        #: readers of gradient dicts that leave some parameters out, by their keys (see
        #: :func:`_partial`); None for a key order that has none
        self.partial: dict[tuple, Any] = {}

    def holds(self, opt: Any, state: Any) -> bool:
        """Whether the answers still hold for ``opt`` and ``state``."""
        return state.params_flat is self.flat and _holds(self, opt, state)

    def kernel(self, clip: bool) -> Any:
        k = self.kernels.get(clip)
        if k is None:
            math_fn, n_slots, n_scal, dtype, n_avg = self.kernel_args
            k = self.kernels[clip] = (
                update_kernel(math_fn, n_slots, n_scal, dtype, False, clip, False)
                if not n_avg else
                update_kernel(math_fn, n_slots, n_scal, dtype, False, clip, False, n_avg=n_avg))
        return k


def _largest(dtype: np.dtype) -> float:
    """The largest magnitude ``dtype`` holds (a scalar beyond it is probed as inf), or -1
    for a dtype ``finfo`` does not know (every row then takes scalar_table's path)."""
    try:
        return float(np.finfo(dtype).max)
    except ValueError:  # pragma: no cover - a dtype finfo does not know
        return -1.0


def _holds(r: Any, opt: Any, state: Any) -> bool:
    """Whether recipe ``r`` (``opt``, ``engine``, ``attrs``, ``groups``, ``names``,
    ``slots``) still holds for ``opt`` and ``state``: the same optimizer object with the same
    attributes but the learning rate, the same groups, engine and kernel slot arrays,
    nothing swapped in."""
    slots = state.slots
    return (_same_opt(r, opt, state) and len(slots) == r.n_slots
            and all(map(_is, map(slots.get, r.names), r.slots)))


def _same_opt(r: Any, opt: Any, state: Any) -> bool:
    """:func:`_holds` but for the slots."""
    if opt is not r.opt or state.engine is not r.engine or state.swapped is not None:
        return False
    attrs, now = r.attrs, opt.__dict__
    if "learning_rate" in attrs:
        attrs["learning_rate"] = now.get("learning_rate")
    try:  # (an attribute whose == is elementwise: not the same, then)
        same = now == attrs
    except (TypeError, ValueError):
        return False
    return same and r.groups == (opt._groups_version, id(opt._groups))


def run(engine: Any, opt: Any, state: Any, params: Any, grads: Any
        ) -> tuple[dict, bool, float, bool] | None:
    """The step of :meth:`NumbaEngine.step` (same return value) by its state's recipe, or
    None where the recipe does not hold (the caller then takes the full path)."""
    r = state.fast
    if (r is None or not isinstance(params, Mapping) or not isinstance(grads, Mapping)
            or not r.holds(opt, state)):
        return None
    if not state.returned(params):
        return None  # not the arrays the last update returned: the full path copies them in
    views, lay = state.param_views, engine.layout
    gptr = engine.prepare(grads)
    if gptr is None:
        gptr = _partial(r, engine, grads)
        if gptr is None:
            return None
    norm = engine._grad_norm(gptr) if opt.clip_norm is not None else None  # (its scale)
    after = _one_group(r, opt, state) if norm is None and not r.two_pass else None
    if after is not None:
        clip = (opt.clip_value or 0.0) > 0  # (the row's clip value, as scalar_table reads it)
    else:
        t = state.step + 1
        table, index, clip = scalar_table(opt, state, t, norm)
        if r.two_pass:  # the first pass, then the per-tensor table (commit: state.pending)
            table, index = engine._first_pass(opt, state, params, True, gptr, table, index,
                                              clip, t)
        if table.shape[1] - 4 != r.kernel_args[2]:  # (the kernel takes that many scalars)
            return None  # (a first pass's pending commit is dropped by the caller)
        with np.errstate(over="ignore"):  # a scalar too large for the dtype: the probe tells
            after = (index, table.astype(lay.dtype))
    keep: list = []  # (copies of gradients that alias a written buffer, alive until done)
    gptr = engine._unaliased(gptr, grads, keep, r.written)
    total = engine._plan.run(r.kernel(clip), r.before, gptr, after)
    if not r.used:
        r.used, state.fast_waste = True, 0
    if math.isfinite(total):
        return dict(views), True, math.sqrt(total) if norm is None else norm, True
    return dict(views), True, engine._grad_norm(gptr) if norm is None else norm, False


#: the most key orders of partial gradient dicts a recipe makes a reader for (others take
#: the full path)
_PARTIAL_KEYS = 8


def _partial(r: Recipe, engine: Any, grads: Mapping) -> np.ndarray | None:
    """The gradients' addresses in layout order, 0 where a parameter has none (left out of
    the step: its params and slots stay as they are, as the full path's ``_pointers``
    gives them), for a gradient dict that leaves some parameters out (a loss that does not
    reach them, :mod:`~mithril.utils.unreached_params`); None where a gradient is not a
    dense, C-contiguous array of its parameter's shape and dtype, a key is unknown, or
    the engine has no C-speed scan (the full path then checks them one by one). The scan
    of each key order is made once (a loop leaves out the same parameters step after
    step, or alternates among a few sets)."""
    keys = tuple(grads)
    reader = r.partial.get(keys, False)
    if reader is False:
        if len(r.partial) >= _PARTIAL_KEYS:  # (sets that change every step: the full path,
            return None  # not a scan made per step)
        reader = r.partial[keys] = _reader(engine, keys)
    if reader is None:
        return None
    sel, scan = reader
    sub = scan(list(grads.values()))
    if sub is None:
        return None
    gptr = np.zeros(len(engine.layout.names), dtype=np.int64)
    gptr[sel] = sub
    return gptr


def _reader(engine: Any, keys: tuple) -> tuple[np.ndarray, Any] | None:
    """(layout positions of ``keys``, a scan of arrays of their shapes and dtype) for
    :func:`_partial`; None where a key is not a parameter's, none is given, or the
    engine's arrays have no C-speed scan."""
    lay = engine.layout
    at = [lay.index.get(k) if isinstance(k, str) else None for k in keys]
    if not keys or None in at or len(keys) >= len(lay.names):
        return None
    shapes = [lay.shape_list[i] for i in at]
    if engine.kind == "numpy":
        from . import ndarray_fields

        expected = ndarray_fields.Expected(shapes, lay.dtype)

        def scan(vals: list) -> np.ndarray | None:
            return ndarray_fields.scan(vals, expected)
    elif engine.kind == "torch":
        from . import torch_scan

        scan = torch_scan.make(shapes, engine.native_dtype)
        if scan is None:
            return None
    else:
        return None
    return np.array(at, dtype=np.int64), scan


class JaxRecipe:
    """What a plain step of the jitted JAX engine (:class:`~.jax_engine.JaxEngine`) decided:
    its compiled program, the slots it reads, the shape of its scalar table. Unlike the
    NumPy recipe, the slots are new every step (the program returns them, a new
    :class:`~.jax_chunks.ChunkedSlots`): the recipe follows them (:func:`run_jax`), and holds
    while the state's are the ones it left, not written since (their ``version``)."""

    __slots__ = ("opt", "engine", "attrs", "groups", "slots", "version", "fn", "names",
                 "shape", "clip_norm", "checked", "used", "single", "dtype", "bound",
                 "selectors")

    def __init__(self, opt: Any, state: Any, engine: Any, fn: Any, names: tuple[str, ...],
                 shape: tuple[int, int], clip_norm: Any, checked: bool, selectors: tuple
                 ) -> None:
        self.opt, self.engine, self.fn, self.names = opt, engine, fn, names
        self.selectors = selectors  # (the groups' rows: fixed while the recipe holds)
        self.attrs = dict(opt.__dict__)
        self.groups = (opt._groups_version, id(opt._groups))
        self.slots, self.version = state.slots, state.slots.version
        self.shape, self.clip_norm, self.checked = shape, clip_norm, checked
        self.used = False
        # one parameter group, the optimizer itself: its row of scalars is built directly
        # (:func:`_row`), as scalar_table builds it
        views = opt.group_rows(state)[1]
        self.single = len(views) == 1 and views[0] is opt
        self.dtype = np.dtype(engine.layout.dtype)
        self.bound = _largest(self.dtype)
        if self.dtype.itemsize < 4:  # (half: the table as the full step passes it, float32)
            self.dtype = np.dtype(np.float32)

    def holds(self, opt: Any, state: Any) -> bool:
        return (state.slots is self.slots and self.slots.version == self.version
                and _same_opt(self, opt, state))


def run_jax(engine: Any, opt: Any, state: Any, params: Any, grads: Any
            ) -> tuple[dict, bool, Any, bool] | None:
    """The step of :meth:`JaxEngine.step <.jax_engine.JaxEngine.step>` (same return value)
    by its state's recipe: the scalar table of this step and one call of the program, with
    none of the decisions around it; None where the recipe does not hold. The gradients'
    keys (in any order, :meth:`~.common.Engine.ordered`) and types are checked here; their
    shapes and dtypes are JAX's signature of the call: others make it trace the program
    again, and the trace refuses them (:class:`~.common.Unfit`) before anything runs."""
    r = state.fast
    if (r is None or not isinstance(params, Mapping) or not isinstance(grads, Mapping)
            or not r.holds(opt, state) or not state.returned(params)):
        return None
    gs = engine.ordered(grads)
    if gs is None or not all(map(isinstance, gs, repeat(engine.concrete))) or any(
            map(operator.is_, gs, params.values())):  # (a param as its gradient: donated)
        return None
    hp = _row(opt, state, None, r.shape[1], r.dtype, r.bound) if r.single else None
    if hp is None:
        table = scalar_table(opt, state, state.step + 1, None)[0]
        if table.shape != r.shape:
            return None
        with np.errstate(over="ignore"):  # (as the full path: a scalar too large is probed)
            hp = table.astype(r.dtype)
    slots = state.slots
    try:
        new_params, new_slots, norm, probe, _ = r.fn(
            tuple(params.values()), tuple(gs), {s: slots.chunks(s) for s in r.names}, hp,
            r.clip_norm, r.selectors)
    except Unfit:  # (traced, never run: nothing donated)
        return None
    except ValueError as e:  # a param given as another's gradient: refused before it ran
        if "donated" not in str(e) or not aliases(params, gs):
            raise
        return None  # (the full step reads such gradients from copies)
    new_params = dict(zip(engine.layout.name_list, new_params))
    state.slots = r.slots = slots.replaced(new_slots)
    r.version = r.slots.version
    state.param_views = new_params
    if not r.used:
        r.used, state.fast_waste = True, 0
    if probe is None:  # "unchecked": nothing read back
        return dict(new_params), True, norm, True
    return dict(new_params), True, engine.report(probe), True  # ("propagate")


def aliases(params: Mapping[str, Any], gs: Any) -> set[int]:
    """The ids of the gradients ``gs`` that are one of ``params`` (arrays a step donates);
    empty when none is."""
    held = {id(v) for v in params.values()}
    return {id(g) for g in gs if id(g) in held}


def _row(opt: Any, state: Any, index: Any, width: int, dtype: np.dtype, bound: float
         ) -> np.ndarray | None:
    """:func:`~.common.scalar_table`'s one row of ``width`` scalars for this step (rows
    ``index``, or None), in ``dtype`` (each value rounded once, as the float64 table's cast
    rounds it), or None where a value lies beyond ``bound`` (the full table's cast, under
    ``errstate``, then makes it inf) or the row's length changed."""
    scal = opt.full_scalars(state.step + 1, state.values, row_counts(opt, state, index, 1)[0])
    row = (*prologue(opt, None, scal[0]), *scal)
    if len(row) != width or not (max(row) <= bound and min(row) >= -bound):
        return None
    return np.array((row,), dtype=dtype)


def _one_group(r: Recipe, opt: Any, state: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(each tensor's row, the one row of scalars in the layout's dtype) of a step without
    clipping by norm whose parameters all take the optimizer's own row (no groups, no
    missed counts of their own): :func:`~.common.scalar_table`'s table and cast without
    the table (~5 us less a step, more with the caches cold after a large update); None
    for anything else, which takes the table."""
    index, views = opt.group_rows(state)
    if len(views) != 1 or views[0] is not opt or r.bound < 0:
        return None
    row = _row(opt, state, index, 4 + r.kernel_args[2], r.dtype, r.bound)
    return None if row is None else (index, row)
