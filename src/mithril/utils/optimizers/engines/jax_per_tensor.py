"""Per-tensor scalars computed inside the jitted JAX engine's program: a two-pass
optimizer's (LAMB, LARS, ...) and per-tensor clipping's (``clip_tensor_norm``,
``clip_block_rms``).

Both need sums per tensor before the update: a two-pass step sums its ``reduce`` terms and
turns them into per-tensor scalars (``Optimizer.tensor_scalars``); per-tensor clipping sums
each gradient's squares and scales it. The engine used to run a program for the sums, read
them back and compute the scalars on the host: a wait for the device and a second program
per step (LAMB on 200k params in 20 tensors: 2.6 ms a step, 3.4x optax's; Adam with
``clip_tensor_norm``: 2.1 ms against Adam's 0.7). Here the update's program computes them
(:func:`second_table`, :func:`clip_scales`).

``tensor_scalars`` runs in the program with a stand-in ``self`` (:class:`_Traced`): the
numeric settings it reads are arguments (a changed ``beta2`` needs no compile), its static
ones (None, bools, strings) part of the program's key. Tensor slots (Novograd's ν, NAdam's
μ product, ASGD's η and μ) and state values (Prodigy's ``d`` and numerator) go in and come
back, committed once the step is applied; where the per-step ``scalars`` read state values
(``scalar_values``), they are made in the program too (:func:`own_table`), so that no value
is read back between steps. A ``tensor_scalars`` that reads anything else of ``self``, or
does not trace, keeps the host's pass (:meth:`JaxEngine._traced_first
<.jax_engine.JaxEngine._traced_first>`).
"""

from __future__ import annotations

import inspect
import types
from typing import Any, NamedTuple

import numpy as np

from .common import norm_scale

_STATIC = (type(None), bool, str)
_MISSING = object()


class _Recorder:
    """What ``tensor_scalars`` gets as ``self`` while its settings are found: the
    optimizer's attributes, each read recorded. A number will be a traced scalar of the
    program (a setting changed between steps is then used without a compile); None, a bool
    or a string is static (in the program's key); a method runs with this object as its
    self; anything else refuses (the step keeps the host's pass)."""

    def __init__(self, opt: Any) -> None:
        self.__opt = opt
        self.__numbers: list[str] = []
        self.__statics: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:  # (only for names this object lacks)
        value = getattr(self.__opt, name)
        if isinstance(value, types.MethodType) and value.__self__ is self.__opt:
            return types.MethodType(value.__func__, self)
        if isinstance(value, _STATIC):
            self.__statics[name] = value
            return value
        if _number(value):
            if name not in self.__numbers:
                self.__numbers.append(name)
            return value
        raise AttributeError(f"tensor_scalars reads self.{name}, a {type(value).__name__}")

    def found(self) -> tuple[tuple[str, ...], tuple]:
        """The numbers read (in order) and the static values read (sorted by name)."""
        return tuple(self.__numbers), tuple(sorted(self.__statics.items()))


class _Traced:
    """``self`` inside the program: the recorded numbers as traced scalars, the static
    values as recorded, the optimizer class's methods and properties run on this object;
    nothing else (no optimizer instance is kept by a compiled program)."""

    def __init__(self, cls: type, numbers: dict[str, Any], statics: tuple) -> None:
        self.__cls, self.__numbers, self.__statics = cls, numbers, dict(statics)

    def __getattr__(self, name: str) -> Any:
        if name in self.__numbers:
            return self.__numbers[name]
        if name in self.__statics:
            return self.__statics[name]
        attr = inspect.getattr_static(self.__cls, name, _MISSING)
        if isinstance(attr, types.FunctionType):
            return types.MethodType(attr, self)
        if isinstance(attr, property) and attr.fget is not None:
            return attr.fget(self)
        raise AttributeError(f"tensor_scalars reads self.{name}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool)


def settings_hold(opt: Any, names: tuple[str, ...], statics: tuple) -> bool:
    """Whether ``opt``'s settings still fit a program traced with them: the numbers still
    numbers (another value than a number: traced again), the static ones unchanged."""
    return (all(_number(getattr(opt, k, None)) for k in names)
            and all(type(v) is type(getattr(opt, k, _MISSING)) and getattr(opt, k) == v
                    for k, v in statics))


def extra_columns(fn: Any, opt: Any, n: int, k: int, n_own: int, sizes: np.ndarray,
                  tensor_slots: tuple[str, ...], values: tuple[str, ...] = ()
                  ) -> tuple | None:
    """How ``tensor_scalars`` (the function ``fn`` of ``opt``) traces for ``n`` tensors,
    ``k`` sums, ``n_own`` scalars, the tensor slots ``tensor_slots`` and the state values
    ``values``: ``(extra columns, settings read as numbers, static settings read)``, found
    by tracing it twice (``jax.eval_shape``: nothing runs), with the settings' values,
    then as the program runs it (:class:`_Traced`); None where it does not trace so, or
    does not return every tensor slot and every value (a 0-d one): the step keeps the
    host's pass."""
    import jax

    spec, zero = jax.ShapeDtypeStruct((n,), np.float32), jax.ShapeDtypeStruct((), np.float32)
    args = (jax.ShapeDtypeStruct((), np.int32), (spec,) * k, (spec,) * n_own,
            dict.fromkeys(tensor_slots, spec), dict.fromkeys(values, zero))
    try:
        rec = _Recorder(opt)
        jax.eval_shape(lambda t, sums, cols, tens, vals: fn(rec, t, sums, cols, tens, vals,
                                                            sizes), *args)
        names, statics = rec.found()

        def traced(t: Any, sums: Any, cols: Any, tens: Any, vals: Any, numbers: Any) -> Any:
            me = _Traced(type(opt), dict(zip(names, numbers)), statics)
            return fn(me, t, sums, cols, tens, vals, sizes)

        extra, tensors, new_values = jax.eval_shape(traced, *args, [zero] * len(names))
    except Exception:  # noqa: BLE001 - anything that does not trace: the host's pass
        return None
    if (set(tensors) != set(tensor_slots) or set(new_values) != set(values)
            or any(np.shape(v) != () for v in new_values.values())):
        return None
    return len(extra), names, statics


def own_columns(opt: Any, n: int, n_own: int) -> tuple | None:
    """How ``scalars`` (the optimizer's own per-step scalars, of the state values it reads:
    ``scalar_values``) traces for ``n`` tensors, each tensor's settings a number of its own
    (parameter groups): ``(scalars, settings read as numbers, static settings read)``,
    found as :func:`extra_columns` finds it; None where it does not trace so or gives other
    than ``n_own`` scalars (the step keeps the host's pass)."""
    import jax

    fn = inspect.getattr_static(type(opt), "scalars", None)
    if not isinstance(fn, types.FunctionType):
        return None
    zero = jax.ShapeDtypeStruct((), np.float32)
    args = (jax.ShapeDtypeStruct((), np.int32), dict.fromkeys(opt.scalar_values, zero))
    try:
        rec = _Recorder(opt)
        jax.eval_shape(lambda t, vals: fn(rec, t, **vals), *args)
        names, statics = rec.found()

        def traced(t: Any, vals: Any, numbers: Any) -> Any:
            return fn(_Traced(type(opt), dict(zip(names, numbers)), statics), t, **vals)

        out = jax.eval_shape(traced, *args,
                             [jax.ShapeDtypeStruct((n,), np.float32)] * len(names))
    except Exception:  # noqa: BLE001 - anything that does not trace: the host's pass
        return None
    if len(out) != n_own or any(np.shape(x) not in ((), (n,)) for x in out):
        return None
    return fn, names, statics


def own_numbers(views: list, index: np.ndarray, spec: tuple, dtype: Any) -> np.ndarray | None:
    """Each tensor's settings that ``scalars`` reads (:func:`own_columns`' ``spec``), from
    its parameter group's optimizer, shape (tensors, settings); None where some group's
    do not fit the program (a static setting that differs)."""
    _, names, statics = spec
    if not all(settings_hold(v, names, statics) for v in views):
        return None
    rows = np.array([[getattr(v, k) for k in names] for v in views], dtype=np.float64)
    return rows.reshape(len(views), len(names))[index].astype(dtype)


def own_table(first: Any, wide: Any, t: Any, values: dict[str, Any], numbers: Any) -> Any:
    """Inside the program: the per-tensor table ``wide`` with the optimizer's own scalars
    (its columns after the prologue's four) made from the state's ``values`` (traced: the
    previous step's, never read back) and each tensor's settings ``numbers``
    (:func:`own_numbers`), in ``wide``'s dtype (as optax computes its bias corrections);
    the host's table held them for each value's ``state_value_init``."""
    import jax.numpy as jnp

    fn, names, statics = first.own
    n, dt = wide.shape[0], wide.dtype
    me = _Traced(first.cls, {k: numbers[:, i].astype(dt) for i, k in enumerate(names)}, statics)
    cols = fn(me, t, **{k: values[k].astype(dt) for k in first.cls.scalar_values})
    cols = [jnp.broadcast_to(jnp.asarray(c, dt), (n,)) for c in cols]
    return jnp.concatenate([wide[:, :4], jnp.stack(cols, axis=1), wide[:, 4 + len(cols):]],
                           axis=1)


class First(NamedTuple):
    """How a two-pass step's first pass runs inside the update's program
    (:meth:`JaxEngine._traced_first <.jax_engine.JaxEngine._traced_first>`); part of the
    program's key."""

    reduce: Any  # the optimizer's reduce math (None: no sums)
    slots: tuple[str, ...]  # its own slots, which reduce reads
    n_own: int  # its own scalars
    fn: Any  # its tensor_scalars
    n_extra: int  # the columns tensor_scalars adds
    cls: type
    tensor_slots: tuple[str, ...]
    names: tuple[str, ...]  # settings tensor_scalars reads, as numbers (arguments)
    statics: tuple  # its static settings
    values: tuple[str, ...]  # the state values, in and out of the program
    own: tuple | None  # own_columns' spec: the own scalars made in the program (scalar_values)


def tensor_steps(opt: Any, state: Any, t: int) -> tuple[Any, Any]:
    """The program's step argument: each tensor's own count (its row's, a group's
    ``step_offset`` and missed steps left out; ``t`` itself where every tensor's is ``t``)
    and the optimizer's ``t``, as the host's :func:`~.common.two_pass_table` reads them."""
    from ..groups import row_step

    index, views = opt.group_rows(state)
    steps = np.array([row_step(v, t) for v in views], dtype=np.int32)
    return (np.int32(t) if (steps == t).all() else steps[index]), np.int32(t)


def second_table(parts: Any, first: First, wide: Any, ps: list, gs: list, cols: list,
                 slots: Any, t: Any, tensors: dict[str, Any], numbers: Any,
                 values: dict[str, Any], present: np.ndarray | None
                 ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Inside a one-program two-pass step: the per-tensor sums of the optimizer's
    ``reduce`` terms (per chunk: ``parts.sums``, :class:`~.jax_parts.Parts`), its
    ``tensor_scalars`` traced on them, and the per-tensor table ``wide`` with those columns
    inserted after the optimizer's own scalars (as :func:`~.common.two_pass_table` does on
    the host); the new tensor slots (a tensor without a gradient, ``present`` False,
    keeps its own) and the new state values. ``tensors``: the tensor slots (per tensor,
    in ``wide``'s dtype); ``numbers``: the settings ``tensor_scalars`` reads (``first``'s
    names, in order); ``values``: the state values (0-d); ``t``: :func:`tensor_steps`'s
    pair, the optimizer's count where ``tensor_scalars_step`` is ``"optimizer"``."""
    import jax.numpy as jnp

    own_end = 4 + first.n_own  # (the prologue's four columns, then the optimizer's own)
    n, dt = wide.shape[0], wide.dtype
    out = []
    for c, (p, g, col) in enumerate(zip(ps, gs, cols) if first.reduce else ()):
        terms = first.reduce(p * col(3), g, *(slots[s][c] for s in first.slots),
                             *(col(j) for j in range(4, own_end)))
        out.append(jnp.stack([parts.sums(c, x.astype(dt)) for x in terms], axis=1))
    sums = parts.per_tensor(out) if out else jnp.zeros((n, 0), dt)
    if present is not None:  # a tensor without a gradient counts for nothing (Prodigy's
        sums = jnp.where(present[:, None], sums, 0.0)  # ‖s‖₁: as the other engines)
    me = _Traced(first.cls, {k: numbers[i].astype(dt) for i, k in enumerate(first.names)},
                 first.statics)
    extra, new, new_values = first.fn(
        me, t[getattr(first.cls, "tensor_scalars_step", "tensor") == "optimizer"], tuple(sums[:, k] for k in range(sums.shape[1])),
        tuple(wide[:, j] for j in range(4, own_end)), dict(tensors),
        {k: v.astype(dt) for k, v in values.items()}, parts.lay.sizes)
    extra = [jnp.broadcast_to(jnp.asarray(e, dt), (n,)) for e in extra]
    new = {s: jnp.broadcast_to(jnp.asarray(new[s], dt), (n,)) for s in first.tensor_slots}
    if present is not None:
        new = {s: jnp.where(present, v, tensors[s]) for s, v in new.items()}
    return (jnp.concatenate([wide[:, :own_end], *(e[:, None] for e in extra),
                             wide[:, own_end:]], axis=1), new,
            {k: jnp.asarray(new_values[k], dt) for k in first.values})


def clip_spec(opt: Any, state: Any) -> tuple:
    """Per-tensor clipping as constants of the program (and part of its cache key): each
    tensor's ``clip_tensor_norm`` and ``clip_block_rms`` (None where off; a NaN would make
    every key a new one), its size, and whether ``clip_norm`` (global) applies to the
    clipped gradients."""
    index, views = opt.group_rows(state)
    per = [(getattr(views[r], "clip_tensor_norm", None), getattr(views[r], "clip_block_rms", None))
           for r in index]
    return (tuple(None if c is None else float(c) for c, _ in per),
            tuple(None if c is None else float(c) for _, c in per),
            tuple(int(x) for x in state.layout.sizes), opt.clip_norm is not None)


def clip_factor(clip: Any, norm: Any, dtype: Any) -> Any:
    """Traced: the global clip's scale ``min(1, c / (norm + ε))`` from the jitted passes'
    ``[clip_norm, clip_eps]`` argument: ``c`` in the params' ``dtype`` (as the step has
    always rounded it), ε in the norm's (as a Python constant would be)."""
    return norm_scale(clip[0].astype(dtype), norm, clip[1].astype(norm.dtype))


def clip_scales(parts: Any, spec: tuple, wide: Any, gs: list, clip_norm: Any) -> Any:
    """Inside the program: the per-tensor table ``wide`` with each tensor's clipping scale
    (and the global ``clip_norm``'s, measured on the clipped gradients) in column 0, from
    ``gs``, the chunks' flat gradients as the passes see them (after adaptive clipping).
    As :func:`~.common.clipped_table` on the host: Keras ``clipnorm`` scales a tensor by
    ``c / max(‖g‖, c)``, then optax ``clip_by_block_rms`` by ``1 / max(1, rms(g) / c)``."""
    import jax.numpy as jnp

    c_norm, c_rms, sizes, global_on = spec
    dt = wide.dtype
    sq = parts.sumsq(gs, dt)
    c_norm, c_rms = (np.array([np.nan if c is None else c for c in x]) for x in (c_norm, c_rms))
    f = jnp.ones_like(sq)
    if not np.isnan(c_norm).all():
        c = jnp.asarray(np.nan_to_num(c_norm, nan=1.0), dt)
        f = jnp.where(np.isnan(c_norm), f, c / jnp.maximum(jnp.sqrt(sq), c))
    if not np.isnan(c_rms).all():
        c = jnp.asarray(np.nan_to_num(c_rms, nan=1.0), dt)
        rms = jnp.sqrt(sq * f * f / np.maximum(np.asarray(sizes, np.float64), 1.0).astype(dt))
        f = jnp.where(np.isnan(c_rms), f, f / jnp.maximum(1.0, rms / c))
    if global_on:
        clipped = jnp.sqrt(jnp.sum(sq * f * f))
        f = f * clip_factor(clip_norm, clipped, parts.lay.dtype).astype(dt)
    return jnp.concatenate([wide[:, :1] * f[:, None], wide[:, 1:]], axis=1)
