"""A :class:`~..tensorwise.TensorwiseOptimizer`'s step on JAX as one ``jax.jit`` program.

Eagerly, JAX dispatches every operation of every tensor's ``tensor_update`` on its own
(SM3 on 200 tensors: ~400 ms a step on CPU, where optax's jitted step takes ~18 ms). Here
the whole step of :func:`~..tensorwise._update` runs in one program per layout: the global
and per-tensor gradient norms, the clipping, weight decay, every tensor's ``tensor_update``
(with :class:`~..traced_ops.TracedOps`), the weight averages, the finite probe of each
tensor's new values and, under ``nonfinite="skip"``/``"raise"``/``"unchecked"``, the
choice between the new slots and the old (the slot buffers are donated; a refused step
gets its old values back). The params a step updates are donated too where the caller
handed them over (the arrays the last step returned, the ownership rule of
:mod:`..base`) and the step is applied whatever it finds (not under ``"skip"`` /
``"raise"``, whose refused step returns the caller's params). One array, ``[norm, finite
per tensor]``, is read back; the host then decides as the eager path does.

What changes between steps without a new program: the per-step ``scalars`` (floats), the
learning rate, a decoupled weight decay, the clipping bounds, the averages' weights and the
class's ``traced_in_update`` hyperparameters, all non-zero numbers read from one table
(weak-typed inside the program, as the Python floats of the eager path: a bfloat16 tensor
stays bfloat16). Any other attribute of a row (a number, string, None or tuple) is part of
the program's key: changing it compiles anew. A step whose ``tensor_update`` does not trace
(Python control flow on a traced value) runs eagerly, and that key is remembered.

Differences from the eager path, all float32 rounding (float64 with ``jax_enable_x64``):
the norms the eager path takes on the host in float64 are taken in the program, and the
scalars are rounded to the table's dtype first. ``MITHRIL_TENSORWISE_JIT=0`` (or
:data:`ENABLED` False) keeps the eager path.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..averaging import average, tensor_counts, weights
from ..base import Optimizer
from ..groups import row_step
from ..state import OptimizerState, scalar_arguments
from ..tensorwise import row_update
from . import fast_step
from .common import norm_scale, refuses

#: False: the eager per-tensor path (a measuring knob; ``MITHRIL_TENSORWISE_JIT=0``)
ENABLED = os.environ.get("MITHRIL_TENSORWISE_JIT", "1") != "0"
#: how many times a step program was traced (tests count compiles with it)
TRACES = 0
#: the step programs, least recently used first (a process-wide cache of at most
#: :data:`_MOST`: the least recently used goes when it is full, never all at once, so that a
#: loop alternating between programs - GaLore's with and without its SVD refresh - keeps
#: both however many other optimizers made theirs before)
_COMPILED: OrderedDict[tuple, Any] = OrderedDict()
_MOST = 32
#: attributes of a row that are host-side step counts (row_step, scalars): not in the key
_HOST_ONLY = frozenset({"missed", "_missed", "_step_offset"})
_CLIPS = ("clip_value", "clip_tensor_norm", "clip_block_rms")


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _traceable(row: Any) -> tuple[str, ...]:
    """The row's attributes the program reads from the table: the learning rate, the
    class's ``traced_in_update``, the clipping bounds, a weight decay applied outside the
    math; those that are non-zero numbers (a zero may pick another rule: kept static)."""
    names = ("learning_rate", *getattr(row, "traced_in_update", ()), *_CLIPS,
             "fallback_lr_ratio", "weight_decay")
    if getattr(row, "weight_decay_in_math", False) and "weight_decay" not in getattr(
            row, "traced_in_update", ()):
        names = names[:-1]
    d = vars(row)
    return tuple(dict.fromkeys(k for k in names if _number(d.get(k)) and d[k] != 0))


def _static(v: Any) -> Any:
    """A hashable stand-in of an attribute's value for the key, or None where the
    program does not read it as a constant (arrays, dicts, callables)."""
    if v is None or isinstance(v, (bool, numbers.Number, str)):
        return (v,)
    if isinstance(v, (tuple, frozenset, set)) and all(
            x is None or isinstance(x, (bool, numbers.Number, str)) for x in v):
        return tuple(sorted(v, key=repr)) if isinstance(v, (set, frozenset)) else v
    if isinstance(v, Optimizer):  # (a Muon's fallback: its elementwise math)
        return (type(v), v.kernel_math(), tuple(v.slot_names()))
    return None


def fingerprint(row: Any, traced: tuple[str, ...]) -> tuple:
    """What a program bakes in of ``row``: its class and every other attribute's value."""
    items = tuple((k, s) for k, v in sorted(vars(row).items())
                  if k not in traced and k not in _HOST_ONLY and (s := _static(v)) is not None)
    return type(row), traced, items


def _weak(x: Any) -> Any:
    """``x`` weak-typed, as a Python float is in JAX arithmetic (it takes the array's
    dtype)."""
    try:
        from jax._src.lax.lax import _convert_element_type
    except ImportError:  # (a JAX without it: strong float32 scalars)
        return x
    return _convert_element_type(x, weak_type=True)


def step(opt: Any, state: OptimizerState, params: Mapping[str, Any],
         gradients: Mapping[str, Any]) -> tuple[dict[str, Any], bool, float, bool] | None:
    """The step as :func:`~..tensorwise._update`'s per-tensor path does it, in one program:
    (params to return, applied, global gradient norm, every new value finite); None where
    it runs eagerly (disabled, or a ``tensor_update`` that does not trace)."""
    if not ENABLED:
        return None
    import jax

    lay, t = state.layout, state.step + 1
    rows = opt.tensor_rows(state)
    wide = np.float64 if jax.config.jax_enable_x64 else np.float32
    averaged = opt.full_slot_names()[len(opt.slot_names()):]
    # the host's numbers first (a refused row_step raises before anything runs)
    table: list[float] = [opt.clip_norm or 0.0, opt.clip_eps]  # (arguments: no recompiling)
    spec, prints, seen = [], {}, {}
    for i, name in enumerate(lay.names):
        row = rows[i]
        if id(row) not in seen:
            traced = _traceable(row)
            fp = fingerprint(row, traced)
            scal = row.scalars(row_step(row, t), **scalar_arguments(row, state.values))
            kinds = tuple(None if _number(x) and not isinstance(x, int) else (x,)
                          for x in scal)
            seen[id(row)] = (prints.setdefault(fp, (len(prints), row))[0], traced,
                             [float(getattr(row, k)) for k in traced], scal, kinds)
        r, traced, values, scal, kinds = seen[id(row)]
        at = len(table)
        table += values
        table += [float(x) for x, k in zip(scal, kinds) if k is None]
        w = list(weights(row, t, tensor_counts(opt, state, i)))
        table += [float(x) for x in w]
        upd = name in gradients and int(lay.sizes[i]) > 0
        spec.append((r, at, kinds, tuple(x != 0 for x in w), upd))
    host = {s: isinstance(v, np.ndarray) for s, v in state.slots.items()}
    slays = tuple((s, state.slot_layout(s), np.dtype(state.slots[s].dtype).name)
                  for s in state.slots)
    # the params it updates are donated where the step is applied whatever it finds
    # (skip/raise return the caller's), as the jitted elementwise engine's: copies of them
    # unless they are the arrays the last step returned (state.returned: the caller handed
    # those over, the ownership rule; others it may still read). One program either way
    donate = not refuses(opt)
    key = (lay, slays, tuple(host.items()), tuple(prints), tuple(spec), opt.nonfinite,
           opt.clip_norm is not None, wide, tuple(averaged), donate)
    try:
        fn = _COMPILED.get(key)
    except TypeError:  # (a scalar that is no number and unhashable: eagerly)
        return None
    if fn is not None:
        _COMPILED.move_to_end(key)
    if fn is False:  # (found not to trace)
        return None
    grads = tuple(gradients[n] for n, s in zip(lay.names, spec) if s[4])
    updated = tuple(params[n] for n, s in zip(lay.names, spec) if s[4])
    if donate and not state.returned(params):
        updated = tuple(jax.numpy.array(p, copy=True) for p in updated)
    elif donate and (same := fast_step.aliases(params, grads)):  # (read from a copy)
        grads = tuple(jax.numpy.array(g, copy=True) if id(g) in same else g for g in grads)
    slots = {s: v for s, v in state.slots.items() if not host[s]}
    args = (updated,
            tuple(params[n] for n, s in zip(lay.names, spec) if not s[4]), grads, slots,
            {s: v for s, v in state.slots.items() if host[s]}, np.asarray(table, dtype=wide))
    if fn is None:
        while len(_COMPILED) >= _MOST:
            _COMPILED.popitem(last=False)
        protos = [copy.copy(row) for _, row in prints.values()]
        try:
            fn = jax.jit(_program(opt, state, protos, spec, averaged, key),
                         donate_argnums=(0, 3) if donate else (3,))
            out = fn(*args)
        except Exception:
            if any(getattr(v, "is_deleted", lambda: False)() for v in (*slots.values(),
                                                                        *args[0])):
                raise  # (ran, donated: nothing to fall back to)
            _COMPILED[key] = False
            return None
        _COMPILED[key] = fn
    else:
        out = fn(*args)
    new_p, new_s, probe = out
    probe, k = np.asarray(probe, dtype=np.float64), len(grads)
    with np.errstate(all="ignore"):  # (inf/NaN gradients: a non-finite norm)
        norm = math.sqrt(float(np.sum(np.square(probe[:k] * probe[k:2 * k]))))
    ok_all = probe[2 * k:] != 0
    for s, v in new_s.items():  # (donated: the program's, the old values if refused)
        if not host[s]:
            state.slots[s] = v
    out = _decide(opt, state, params, gradients, dict(zip(
        [n for n, s in zip(lay.names, spec) if s[4]], new_p)), new_s, host, norm, ok_all)
    if out[1]:  # (the next step may take them over: state.returned)
        state.param_views = out[0]
        return dict(out[0]), *out[1:]
    return out


def _decide(opt: Any, state: OptimizerState, params: Mapping[str, Any],
            gradients: Mapping[str, Any], new_p: dict[str, Any], new_s: dict[str, Any],
            host: dict[str, bool], norm: float, ok_all: np.ndarray
            ) -> tuple[dict[str, Any], bool, float, bool]:
    """The eager path's decision from the program's probe (must_skip, then the finite
    check of the new values), and the host buffers written where the step applies."""
    from .common import must_skip, nonfinite_result_error

    lay = state.layout
    if must_skip(opt, norm, gradients, state.engine.to_numpy):
        return dict(params), False, norm, True
    finite = bool(ok_all.all())
    if not finite and math.isfinite(norm) and opt.nonfinite != "propagate":
        if opt.nonfinite == "raise":
            raise nonfinite_result_error(opt, sorted(n for n, ok in zip(lay.names, ok_all)
                                                     if not ok))
        return dict(params), False, norm, False
    for s, values in new_s.items():
        if host[s]:
            dst = state.slot_layout(s).unflatten(state.slots[s])
            for n, v in values.items():
                dst[n][...] = np.asarray(v)
    return {n: new_p.get(n, params[n]) for n in lay.names}, True, norm, finite


def _norms(gs: list[Any], wide: Any) -> Any:
    """Each gradient's ‖g‖₂ as two factors (traced, in ``wide``; rows (a, r), ‖g‖₂ = a·r):
    (1, √Σ g²), or where some sum overflows (finite gradients beyond ~1e19 in float32) or is
    not finite, (max|g|, ‖g / max|g|‖₂): the host takes the global norm from them in
    float64, as the eager path (finite gradients whose norm float32 cannot hold included)."""
    import jax
    import jax.numpy as jnp

    if not gs:
        return jnp.zeros((2, 0), wide)
    sq = jnp.stack([jnp.sum(jnp.square(g.astype(wide))) for g in gs])

    def scaled() -> Any:
        a, r = [], []
        for g in gs:
            g = g.astype(wide)
            m = jnp.max(jnp.abs(g)) if g.size else jnp.zeros((), wide)
            safe = jnp.where((m > 0) & jnp.isfinite(m), m, jnp.ones((), wide))
            a.append(safe)
            r.append(jnp.sqrt(jnp.sum(jnp.square(g / safe))))
        return jnp.stack([jnp.stack(a), jnp.stack(r)])

    return jax.lax.cond(jnp.isfinite(jnp.sum(sq)),
                        lambda: jnp.stack([jnp.ones_like(sq), jnp.sqrt(sq)]), scaled)


def _hypot(n: Any) -> Any:
    """‖n‖₂ of a vector of norms without overflow (scaled by its largest)."""
    import jax.numpy as jnp

    if n.size == 0:
        return jnp.zeros((), n.dtype)
    m = jnp.max(n)
    safe = jnp.where((m > 0) & jnp.isfinite(m), m, jnp.ones((), n.dtype))
    return jnp.where(jnp.isfinite(m), safe * jnp.sqrt(jnp.sum(jnp.square(n / safe))),
                     jnp.sqrt(jnp.sum(jnp.square(n))))


def _program(opt: Any, state: OptimizerState, protos: list[Any], spec: list[tuple],
             averaged: tuple[str, ...], key: tuple) -> Any:
    """The step's traced function (see :func:`step` for its arguments)."""
    import jax.numpy as jnp

    from ..traced_ops import TracedOps, traceable_update
    from .jax_engine import _barrier

    lay = state.layout
    names, sizes = list(lay.names), [int(x) for x in lay.sizes]
    slays = {s: sl for s, sl, _ in key[1]}
    dtypes = {s: d for s, _, d in key[1]}
    # (the program keeps no reference to the optimizer or the state)
    policy, clip_on, refusing = opt.nonfinite, opt.clip_norm is not None, refuses(opt)
    xp = TracedOps()

    def program(updated, others, grads, slots, host_slots, table):
        global TRACES
        TRACES += 1
        it = (iter(updated), iter(others))  # the params in layout order again
        params = [next(it[0] if s[4] else it[1]) for s in spec]
        allslots = {**slots, **host_slots}
        parts = {s: slays[s].unflatten(v) for s, v in allslots.items()}
        wide = table.dtype
        upd = [i for i, s in enumerate(spec) if s[4]]
        gs = dict(zip(upd, grads))
        rowsv = []  # each tensor's row, its traced attributes from the table
        for r, at, *_ in spec:
            row = copy.copy(protos[r])
            for j, k in enumerate(row_traced(row, r)):
                row.__dict__[k] = _weak(table[at + j])
            rowsv.append(row)
        per = any(getattr(v, "clip_tensor_norm", None) is not None
                  or getattr(v, "clip_block_rms", None) is not None for v in rowsv)
        scale = {}
        ar = _norms([gs[i] for i in upd], wide)
        n = ar[0] * ar[1]
        # the norm's finiteness as the host sees it (a finite norm beyond float32's range
        # is finite): every factor finite
        nf = jnp.all(jnp.isfinite(ar))
        if gs and (clip_on or per):
            f = []
            for j, i in enumerate(upd):
                row, fi = rowsv[i], jnp.ones((), wide)
                c = getattr(row, "clip_tensor_norm", None)
                if c is not None:
                    fi = c / jnp.maximum(n[j], c)
                c = getattr(row, "clip_block_rms", None)
                if c is not None:
                    fi = fi / jnp.maximum(1.0, fi * n[j] / math.sqrt(max(sizes[i], 1)) / c)
                f.append(fi)
            f = jnp.stack(f)
            gscale = 1.0
            if clip_on:
                h = _hypot(f * n)
                gscale = norm_scale(table[0], h, table[1].astype(h.dtype))
            scale = {i: f[j] * gscale for j, i in enumerate(upd)}
        new_p, new_s = {}, {s: {} for s in allslots}
        ok = []
        for i, (r, at, kinds, wz, u) in enumerate(spec):
            row, name, p = rowsv[i], names[i], params[i]
            vals = []
            if u:
                g = gs[i]
                if i in scale:
                    g = g * _weak(scale[i])
                mine = {s: parts[s][name] for s in row.update_slots()}
                nt = len(row_traced(row, r))
                it = iter(table[at + nt:at + nt + sum(k is None for k in kinds)])
                scal = tuple(_weak(next(it)) if k is None else k[0] for k in kinds)
                new, out = row_update(
                    traceable_update(type(row).tensor_update), row, xp, p, g, mine, scal,
                    name, on(row, r, "clip_value"), on(row, r, "weight_decay"))
                # (in p's dtype: a traced norm is float32 where NumPy's is a Python float,
                # so Adafactor's bfloat16 params came back float32)
                new_p[name] = new.astype(p.dtype)
                for s, v in out.items():
                    new_s[s][name] = v
                vals += [("p", name), *((s, name) for s in out)]
            nw = len(row_traced(row, r)) + sum(k is None for k in kinds)
            for j, (s, nz) in enumerate(zip(averaged, wz)):
                if nz:
                    w = _weak(table[at + nw + j])
                    new_s[s][name] = average(new_p.get(name, p), parts[s][name], w)
                    vals.append((s, name))
            ok.append(vals)
        # the finite probe, a reduction of its own (jax_engine._barrier: XLA's CPU backend
        # slows the update's loops where it fuses the reduction into them)
        new_p, new_s = _barrier((new_p, new_s))
        vals = {"p": new_p, **new_s}
        ok = jnp.stack([jnp.isfinite(sum(jnp.sum(x - x) for x in (vals[s][n] for s, n in v)))
                        if v else jnp.ones((), bool) for v in ok]) if ok else jnp.ones((0,), bool)
        fin = jnp.all(ok)
        keep = None
        if policy != "propagate":  # the eager path's decision, for the slots
            keep = (nf | (not refusing)) & (fin | ~nf)
        out_s = {}
        for s, values in new_s.items():
            if not values:  # (a donated buffer comes back as it was)
                if s in slots:
                    out_s[s] = slots[s]
                continue
            if s in host_slots:  # (written into the host buffer's views, which may
                out_s[s] = values  # have gaps between them)
                continue
            old = parts[s]
            flat = jnp.concatenate([values.get(n, old[n]).reshape(-1).astype(dtypes[s])
                                    for n in slays[s].names])
            out_s[s] = flat if keep is None else jnp.where(keep, flat, allslots[s])
        probe = jnp.concatenate([ar.reshape(-1), ok.astype(wide)])
        return tuple(new_p[names[i]] for i in upd), out_s, probe

    def row_traced(row: Any, r: int) -> tuple[str, ...]:
        return key[3][r][1]

    def on(row: Any, r: int, k: str) -> bool:  # (a traced value is a non-zero one)
        return k in row_traced(row, r) or bool(getattr(row, k, None))

    return program
