"""Optimizers whose update is per tensor with array ops, not elementwise: matrix updates
(Muon) and factored statistics (Adafactor). A :class:`TensorwiseOptimizer` states ``slots``
(:meth:`~.Optimizer.slot_shape` where not parameter-shaped), ``scalars`` and
:meth:`~TensorwiseOptimizer.tensor_update`, written once with the namespace ``xp``
(:class:`NumpyOps`, :class:`TorchOps`, :class:`JaxOps`); the base class does the rest as
:meth:`.Optimizer.update` does: input checks, clipping, weight decay (coupled, decoupled or
the math's), parameter groups, weight averaging and the non-finite policies (every new value
is computed before anything is written: a skipped or refused step changes nothing). On
NumPy/torch the results are written into the state's flat buffers and the returned arrays
are views of its parameter buffer (the ownership rule of :mod:`.base`); on JAX the params
returned are new arrays and jax.Array slot buffers are replaced, the whole step one
``jax.jit`` program (:mod:`.engines.tensorwise_jit`; eagerly where it does not trace).

A subclass may also take the whole step at once after the input checks
(:meth:`~TensorwiseOptimizer.fused_step`, e.g. Adafactor's numba kernel); where it returns
None, the per-tensor path above runs."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from .averaging import advance, average, tensor_counts, weights
from .base import Optimizer, _without_none
from .checks import check_update
from .engines.common import is_finite, must_skip, nonfinite_result_error, norm_scale
from .groups import row_step
from .state import OptimizerState, scalar_arguments


class NumpyOps:
    """The operations a :meth:`TensorwiseOptimizer.tensor_update` may use besides
    arithmetic and ``@``: on NumPy (``m = numpy``), and through ``m = jax.numpy`` on JAX
    (:class:`JaxOps`); :class:`TorchOps` gives torch's own (the very kernels of
    torch.optim: equal results to the last bit)."""

    name, mutable, m = "numpy", True, np

    def lerp(self, a: Any, b: Any, w: Any) -> Any:
        """``a + w·(b − a)`` as torch's ``lerp`` computes it."""
        return a + w * (b - a) if abs(w) < 0.5 else b - (b - a) * (1 - w)

    def addmm(self, c: Any, a: Any, b: Any, beta: float, alpha: float) -> Any:
        return beta * c + alpha * (a @ b)  # torch.addmm

    def T(self, x: Any) -> Any:  # noqa: N802 - the matrix transpose
        return x.swapaxes(-1, -2)

    def norm(self, x: Any) -> float:
        return math.sqrt(self.sumsq(x))  # ‖x‖₂ over all elements, a Python float

    def norm0(self, x: Any) -> Any:  # ‖x‖₂, a 0-d array of x's dtype
        return np.sqrt(np.sum(np.square(x, dtype=np.float64))).astype(x.dtype)

    def norm_axis(self, x: Any, axis: int) -> Any:
        return self.m.sqrt(self.m.sum(x * x, axis=axis, keepdims=True))

    def mean(self, x: Any, axis: int) -> Any:
        return self.m.mean(x, axis=axis, keepdims=True)

    def rsqrt(self, x: Any) -> Any:
        return 1 / self.m.sqrt(x)

    def clamp_min(self, x: Any, v: float) -> Any:
        return self.m.maximum(x, self.m.asarray(v, dtype=x.dtype))

    def add_scaled(self, p: Any, u: Any, alpha: Any) -> Any:
        return p + alpha * u.astype(p.dtype)  # in p's dtype

    def eps(self, x: Any) -> float:
        return float(self.m.finfo(x.dtype).eps)

    def rnd(self, x: Any) -> Any:
        """float32 ``x`` rounded to the nearest bfloat16 (ties to even), kept as float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        b = x.view(np.uint32)
        r = ((b + (np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1)))) & np.uint32(0xFFFF0000))
        return np.where(np.isnan(x), x, r.view(np.float32))

    def low_precision(self, x: Any, dtype: str | None) -> tuple[Any, Any]:
        """``x`` in ``dtype`` (None: its own) and the rounding of each result: bfloat16 is
        emulated (float32 arithmetic rounded to bfloat16, as torch's CPU kernels do)."""
        if dtype == "bfloat16":
            return self.rnd(x.astype(np.float32)), self.rnd
        return (x if dtype is None else x.astype(dtype)), (lambda y: y)

    # -- what the base class uses --------------------------------------------------------
    def sumsq(self, x: Any) -> float:
        return float(np.sum(np.square(np.asarray(x), dtype=np.float64)))

    def all_finite(self, x: Any) -> bool:
        return bool(self.m.isfinite(x).all())

    def clip(self, x: Any, v: float) -> Any:
        return self.m.clip(x, -v, v)

    def copy(self, x: Any) -> Any:
        return np.array(x)

    def write(self, dst: Any, src: Any) -> None:
        dst[...] = src

    def part(self, x: Any) -> Any:
        return self.m.asarray(x)


class JaxOps(NumpyOps):
    name, mutable = "jax", False

    def __init__(self) -> None:
        import jax.numpy as jnp

        self.m = jnp

    def norm0(self, x: Any) -> Any:
        return self.m.sqrt(self.m.sum(x * x)).astype(x.dtype)

    def rnd(self, x: Any) -> Any:
        return x.astype(self.m.bfloat16).astype(self.m.float32)


class TorchOps(NumpyOps):
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.m = torch

    def lerp(self, a: Any, b: Any, w: Any) -> Any:
        return self.m.lerp(a, b, w)

    def addmm(self, c: Any, a: Any, b: Any, beta: float, alpha: float) -> Any:
        return self.m.addmm(c, a, b, beta=beta, alpha=alpha)

    def norm(self, x: Any) -> float:
        return x.norm(2).item()

    def norm0(self, x: Any) -> Any:
        return x.norm()

    def norm_axis(self, x: Any, axis: int) -> Any:
        return self.m.norm(x, dim=axis, keepdim=True)

    def rsqrt(self, x: Any) -> Any:
        return x.rsqrt()

    def clamp_min(self, x: Any, v: float) -> Any:
        return x.clamp(min=v)

    def add_scaled(self, p: Any, u: Any, alpha: Any) -> Any:
        return self.m.add(p, u, alpha=alpha)

    def low_precision(self, x: Any, dtype: str | None) -> tuple[Any, Any]:
        return (x if dtype is None else x.to(getattr(self.m, dtype))), (lambda y: y)

    def sumsq(self, x: Any) -> float:
        return float((x.detach().double() ** 2).sum())

    def all_finite(self, x: Any) -> bool:  # a finite sum has no inf/NaN term (one read;
        # isfinite().all() is ~50x slower on torch CPU); an overflowed sum: the exact test
        return bool(self.m.isfinite(x.sum())) or bool(self.m.isfinite(x).all())

    def copy(self, x: Any) -> Any:
        return x.detach().clone()

    def write(self, dst: Any, src: Any) -> None:
        dst.copy_(src)


def ops_for(backend: Any) -> NumpyOps:
    return {"torch": TorchOps, "jax": JaxOps}.get(backend.name, NumpyOps)()


class TensorwiseOptimizer(Optimizer):
    """Base class of optimizers updating each tensor with array operations (module docs)."""

    #: the float hyperparameters :meth:`tensor_update` and ``scalars`` compute with as
    #: values only (arithmetic, ``xp`` operations, ``math``, ``max`` / ``min``; a Python
    #: branch only on a Python number: a traced one is a JAX value), so that an optax
    #: transformation's program may take them as traced values (``traced_hyperparams``:
    #: a schedule of them compiles once). The gradient
    #: clipping's ``clip_norm`` / ``clip_value`` and a decoupled ``weight_decay`` are
    #: applied outside ``tensor_update`` and may be traced anyway.
    traced_in_update: tuple[str, ...] = ()

    def tensor_update(self, xp: NumpyOps, p: Any, g: Any, slots: dict[str, Any],
                      scalars: tuple[float, ...], name: str) -> tuple[Any, dict[str, Any]]:
        """One tensor's step: from the parameter ``p`` (already decayed where the weight
        decay is decoupled), its gradient ``g`` (clipped, with coupled decay added) and its
        part of every slot of :meth:`slot_names`, return the new parameter and slot parts,
        as new arrays (never modify the ones given). ``scalars`` is ``self.scalars(t)`` (with
        the state's :attr:`~.Optimizer.scalar_values` as keyword arguments, if any)."""
        raise NotImplementedError

    def fused_step(self, params: Mapping[str, Any], gradients: Mapping[str, Any],
                   state: OptimizerState, prepared: Any, ours: bool
                   ) -> tuple[dict[str, Any], bool, float, bool] | None:
        """The whole step at once where a subclass can (e.g. Adafactor's numba kernel),
        after the input checks: ``prepared`` is the engine's ``prepare`` result (None: the
        gradients are to be located one by one), ``ours`` whether ``params`` are the arrays
        the last update returned. Returns, as the engines' ``step``, (params to return,
        applied, global gradient norm, every new value finite) and writes nothing unless
        applied; None (the default): the per-tensor path of :meth:`tensor_update`."""
        return None

    def update_slots(self) -> tuple[str, ...]:
        """The slots :meth:`tensor_update` reads and returns (by default all)."""
        return self.slot_names()

    #: one row object per tensor (a copy where tensors share their group's view): set on
    #: the copy an optax transformation is made from when each tensor's row of scalars is
    #: to count its own steps (the one-program JAX step's per-parameter counts:
    #: :mod:`mithril.utils.train_step_own_counts`)
    _rows_per_tensor = False

    def tensor_rows(self, state: OptimizerState) -> list[Any]:
        """What updates each tensor (layout order; by default its group's view of this
        optimizer): ``tensor_update``, ``update_slots``, ``scalars``, hyperparameters."""
        index, views = self.group_rows(state)
        return self.own_rows_if_asked([views[r] for r in index])

    def own_rows_if_asked(self, rows: list[Any]) -> list[Any]:
        """``rows`` as they are, or with :attr:`_rows_per_tensor` each tensor's its own
        object (copies of the shared ones: the same values)."""
        if not self._rows_per_tensor:
            return rows
        seen: set[int] = set()
        out = []
        for r in rows:
            out.append(copy.copy(r) if id(r) in seen else r)
            seen.add(id(r))
        return out


def _tensor_clip(row: Any, sumsq: float, size: int) -> float:
    """A tensor's scale under ``clip_tensor_norm`` (Keras ``clipnorm``) and
    ``clip_block_rms`` (optax), as the fused engines apply them."""
    f = 1.0
    c = getattr(row, "clip_tensor_norm", None)
    if c is not None:
        f = c / max(math.sqrt(sumsq), c)
    c = getattr(row, "clip_block_rms", None)
    if c is not None:
        f /= max(1.0, math.sqrt(f * f * sumsq / max(size, 1)) / c)
    return f


def row_update(update: Any, row: TensorwiseOptimizer, xp: Any, p: Any, g: Any,
               mine: dict[str, Any], scal: Any, name: str, clip: bool, decay: bool
               ) -> tuple[Any, dict[str, Any]]:
    """``update(row, xp, p, g, mine, scal, name)`` (the row's ``tensor_update``, or its
    traceable form) after the row's clipping by value (``clip``) and weight decay
    (``decay``, where the math does not apply it itself: decoupled shrinks p, coupled adds
    to g): (new p, new slots), every slot of ``mine`` required back."""
    if clip:
        g = xp.clip(g, row.clip_value)
    if decay and not row.weight_decay_in_math:
        if row.decoupled_weight_decay:
            p = p * (1.0 - row.learning_rate * row.weight_decay)
        else:
            g = g + row.weight_decay * p
    new_p, out = update(row, xp, p, g, mine, scal, name)
    if set(out) != set(mine):
        raise RuntimeError(f"{type(row).__name__}.tensor_update must return every slot "
                           f"{sorted(mine)}, got {sorted(out)}")
    return new_p, out


def _update(self: TensorwiseOptimizer, params: Mapping[str, Any], gradients: Mapping[str, Any],
            state: OptimizerState) -> tuple[dict[str, Any], OptimizerState]:
    """One step; returns the new params and state (see the ownership rule of :mod:`.base`)."""
    if (n := self.max_consecutive_skips) is not None and state.consecutive_skips >= n \
            and self.nonfinite == "skip":  # (as Optimizer.update: given up, applied)
        return self._give_up(params, gradients, state, n)
    gradients = _without_none(gradients)  # (a None gradient: no gradient this step)
    bound = self._backend
    try:
        self._bind(params)
        prepared, ours = check_update(self, params, gradients, state)
    except BaseException:
        self._backend = bound  # a refused call keeps nothing, an inferred backend included
        raise
    if self._pre_clipping() and (pre := self._pre_clip(gradients, state, False)) is not None:
        gradients, prepared = pre, None  # centralized / normalized copies, before any clip
    if any(getattr(v, "adaptive_clip", None) is not None for v in self.group_rows(state)[1]):
        gradients = self._adaptive_clip(params, gradients, state)
        prepared = None  # the clipped copies are located anew
    with np.errstate(all="ignore"):
        fused = self.fused_step(params, gradients, state, prepared, ours)
    if fused is not None:
        return _finish(self, state, *fused)
    t, lay, eng = state.step + 1, state.layout, state.engine
    xp = ops_for(eng.backend)
    if xp.name == "jax":  # the same step as one jax.jit program (None: eagerly, below)
        from .engines import tensorwise_jit

        with np.errstate(all="ignore"):
            jitted = tensorwise_jit.step(self, state, params, gradients)
        if jitted is not None:
            return _finish(self, state, *jitted)
    views = state.param_views or {}
    grad_ctx = xp.m.no_grad() if xp.name == "torch" else contextlib.nullcontext()
    with grad_ctx, np.errstate(all="ignore"):
        sumsq = {n: xp.sumsq(g) for n, g in gradients.items()}
        norm = math.sqrt(sum(sumsq.values()))
        if must_skip(self, norm, gradients, eng.to_numpy):
            return _finish(self, state, dict(params), False, norm, True)
        rows = self.tensor_rows(state)
        # per tensor first (clip_tensor_norm / clip_block_rms), then clip_norm on the result
        factor = {n: _tensor_clip(rows[lay.index[n]], s, int(lay.sizes[lay.index[n]]))
                  for n, s in sumsq.items()}
        clipped = math.sqrt(sum(factor[n] ** 2 * s for n, s in sumsq.items()))
        gscale = 1.0 if self.clip_norm is None else norm_scale(self.clip_norm, clipped,
                                                                self.clip_eps)
        parts = {s: state.slot_layout(s).unflatten(state.slots[s]) for s in state.slots}
        averaged = self.full_slot_names()[len(self.slot_names()):]
        new_p: dict[str, Any] = {}
        new_s: dict[str, dict[str, Any]] = {s: {} for s in state.slots}
        for i, (name, _, _, _) in enumerate(lay.spans()):
            row, p = rows[i], params[name]
            if name in gradients and int(lay.sizes[i]):
                g = gradients[name]
                scale = gscale * factor[name]
                g = g * scale if scale != 1.0 else g
                mine = {s: xp.part(parts[s][name]) for s in row.update_slots()}
                scal = row.scalars(row_step(row, t), **scalar_arguments(row, state.values))
                new_p[name], out = row_update(type(row).tensor_update, row, xp, p, g, mine,
                                              scal, name, bool(row.clip_value),
                                              bool(row.weight_decay))
                for s, v in out.items():
                    new_s[s][name] = v
            for s, w in zip(averaged, weights(row, t, tensor_counts(self, state, i))):
                if w != 0:
                    new_s[s][name] = average(new_p.get(name, p), xp.part(parts[s][name]), w)
        bad = [n for n, v in (*new_p.items(), *(x for s in new_s.values() for x in s.items()))
               if not xp.all_finite(v)]
        finite = not bad
        if not finite and is_finite(norm) and self.nonfinite != "propagate":
            if self.nonfinite == "raise":
                raise nonfinite_result_error(self, sorted(set(bad)))
            return _finish(self, state, dict(params), False, norm, False)
        out_params = _commit(state, xp, params, ours, views, new_p, new_s)
    return _finish(self, state, out_params, True, norm, finite)


def _commit(state: OptimizerState, xp: NumpyOps, params: Mapping[str, Any], ours: bool,
            views: dict[str, Any], new_p: dict[str, Any], new_s: dict[str, dict[str, Any]]
            ) -> dict[str, Any]:
    """Write the step into the state's buffers; the params to return."""
    lay, eng = state.layout, state.engine
    # params without a gradient that are not ours: copied before anything is written
    kept = {} if not xp.mutable else {n: xp.copy(p) for n, p in params.items()
                                      if n not in new_p and not (ours or p is views.get(n))}
    for s, values in new_s.items():
        slay = state.slot_layout(s)
        if xp.mutable or isinstance(state.slots[s], np.ndarray):  # JAX-on-CPU: host buffers
            dst = slay.unflatten(state.slots[s])
            for n, v in values.items():
                xp.write(dst[n], v)
        elif values:  # a jax.Array buffer: a new one
            old = slay.unflatten(state.slots[s])
            state.slots[s] = xp.m.concatenate([values.get(n, old[n]).reshape(-1).astype(
                state.slots[s].dtype) for n in slay.names])
    if not xp.mutable:
        return {n: new_p.get(n, params[n]) for n in lay.names}
    if state.params_flat is None:
        state.params_flat = eng.full(lay.total, 0.0)
        state.param_views = lay.unflatten(state.params_flat)
    for n, v in (*new_p.items(), *kept.items()):
        xp.write(state.param_views[n], v)
    return dict(state.param_views)


def _finish(opt: Any, state: OptimizerState, params: dict[str, Any], ok: bool, norm: float,
            finite: bool) -> tuple[dict[str, Any], OptimizerState]:
    """The counters and warnings of :meth:`.Optimizer.update` after a step."""
    state.last_grad_norm, state.last_step_skipped = norm, not ok
    name = type(opt).__name__
    grad = f"non-finite gradient (global norm {norm})" if not is_finite(norm) else None
    if not ok:
        state.num_skipped += 1
        state.consecutive_skips += 1
        what = grad or "the step would give non-finite params or state"
        warnings.warn(f"{name}: {what}; step skipped, params and optimizer state unchanged",
                      RuntimeWarning, stacklevel=3)
        return params, state
    state.step, state.consecutive_skips = state.step + 1, 0
    advance(opt, state, state.step)  # (the averages' update counts)
    if grad or (not finite and not state.nonfinite_values):  # new non-finite values: once
        state.num_nonfinite += 1
        what = grad or "finite gradients, but the step made params or state non-finite"
        warnings.warn(f"{name}: {what} applied; params may now be non-finite (nonfinite="
                      f"'skip' or 'raise' guard against this)", RuntimeWarning, stacklevel=3)
    state.nonfinite_values = not finite
    return params, state


# assigned after the class: Optimizer.__init_subclass__'s wrapper would bind the backend first
TensorwiseOptimizer.update = _update  # type: ignore[method-assign]
