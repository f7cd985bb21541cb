"""The engine that runs the fused kernels (:mod:`.kernels`) for NumPy arrays, CPU torch
tensors and JAX-on-CPU arrays.

Parameters and slots live in flat buffers; the engine checks and locates the gradients
(C-speed passes where it can: :mod:`.ndarray_fields`, :mod:`.torch_scan`), copies in
parameters it did not return, and runs the kernel on every core (:mod:`.threads`).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from . import fast_step, ndarray_fields, streaming, threads, torch_scan, unitwise
from .common import (
    Engine,
    clipped_table,
    must_skip,
    nonfinite_result_error,
    nonfinite_results,
    refuses,
    scalar_table,
    tensor_clipping,
    two_pass_table,
)
from .kernels import (
    inside,
    reduce_kernel,
    segment_sumsq_kernel,
    sumsq_kernel,
    update_kernel,
)

_IS_CPU = operator.attrgetter("is_cpu")


def _accelerators(jax: Any) -> bool:
    """Whether JAX has a backend besides the CPU (then a gradient may lie in device memory,
    which the kernel must never dereference)."""
    try:
        from jax._src import xla_bridge

        return any(name != "cpu" for name in xla_bridge.backends())
    except Exception:  # noqa: BLE001 - another jax version: assume there may be one
        return True


class NumbaEngine(Engine):
    """Executes built-in optimizers with fused numba kernels on host memory.

    ``kind`` is "numpy", "torch" (CPU tensors; the kernel works on zero-copy numpy views)
    or "jax" (CPU: parameters are ``jax.Array`` objects aliasing 64-byte aligned slices of
    two flat host buffers, made by the first two updates (the first writes its one buffer in
    place: it holds copies of the given arrays); each later update reads one and writes the other,
    so arrays JAX may still be reading asynchronously stay valid for a step - buffer
    donation without a copy or a compile).
    """

    def __init__(self, backend: Any, layout: Any) -> None:
        self.backend = backend
        self.kind = backend.name
        self.layout = layout.aligned(16) if self.kind == "jax" else layout
        self._plan = threads.Plan(self.layout.offsets, self.layout.sizes)
        self._spans: dict[tuple, tuple] = {}  # see _unaliased
        self._units_key: Any = None  # see _unit_spec / _unit_plan
        self._unit_plan_key: Any = None
        if self.kind == "torch":
            import torch

            self._torch = torch
            self.array_type = torch.Tensor
            self.native_dtype = getattr(torch, layout.dtype)
            # None: read the gradients from Python only
            self._scan = torch_scan.make(self.layout.shape_list, self.native_dtype)
        elif self.kind == "jax":
            import jax

            self._jax = jax
            # the concrete array class: isinstance against the jax.Array ABC costs ~0.3 us
            self.array_type = type(jax.numpy.zeros(0))
            self._ptr = self.array_type.unsafe_buffer_pointer
            from ....backends.jax_backend import aval_getter

            self._aval = aval_getter(self.array_type)
            try:  # one C++ call for every array (what jax.block_until_ready does after a tree walk)
                from jax._src.lib import xla_client

                self._wait = xla_client.batched_block_until_ready
            except (ImportError, AttributeError):  # pragma: no cover - other jax versions
                self._wait = jax.block_until_ready
            self.native_dtype = np.dtype(layout.dtype)
            self._good_avals: list = [None] * len(layout.names)  # see well_typed
            self._good_shardings: list = [None] * len(layout.names)  # see _on_cpu
            self._foreign = _accelerators(jax)
        else:
            self.array_type, self.native_dtype = np.ndarray, np.dtype(layout.dtype)
            self._expected = ndarray_fields.Expected(self.layout.shape_list, layout.dtype)

    def well_typed(self, vals: list) -> bool:
        """Shapes and dtype of ``vals`` (validated before any pointer is read). On JAX from
        their abstract values: one property read per array, and JAX shares one immutable
        aval among arrays of a shape and dtype, so the avals of the last gradients that
        passed are checked by identity before any shape is compared."""
        if self.kind != "jax":
            return super().well_typed(vals)
        avals = list(map(self._aval, vals))
        if avals == self._good_avals:  # C loop, identity first (equal avals: same shape, dtype)
            return True
        if [a.shape for a in avals] != self.layout.shape_list or {a.dtype for a in avals} != {
                self.native_dtype}:
            return False
        self._good_avals = avals
        return True

    # -- buffers ---------------------------------------------------------------------
    def full(self, n: int, value: float) -> Any:
        """A flat buffer of ``n`` values ``value``. Zeros come from ``calloc`` (``np.zeros``):
        a large buffer is then fresh zero pages that take no memory until first written, so
        the slots and parameter buffers are paid for as a step writes them, not all at once
        before it (what keeps the first update's peak down, see :meth:`_adopt`)."""
        if self.kind == "torch":
            if value == 0:  # torch.zeros would memset every page at once
                return self._torch.from_numpy(np.zeros(n, dtype=self.layout.dtype))
            return self._torch.full((n,), value, dtype=self.native_dtype)
        if self.kind == "jax":  # 64-byte aligned host buffer
            raw = np.zeros(n + 16, dtype=self.layout.dtype)
            start = (-raw.ctypes.data % 64) // raw.itemsize
            out = raw[start:start + n]
            if value != 0:
                out[...] = value
            return out
        if value == 0:
            return np.zeros(n, dtype=self.layout.dtype)
        return np.full(n, value, dtype=self.layout.dtype)

    def np_view(self, x: Any) -> np.ndarray:
        return x.numpy() if self.kind == "torch" else x

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.kind == "torch":
            return x.detach().resolve_neg().resolve_conj().cpu().numpy()
        return np.asarray(x)

    def from_numpy(self, a: np.ndarray) -> Any:
        out = self.full(a.size, 0.0)
        self.np_view(out)[...] = a
        return out

    def views(self, flat: Any) -> dict[str, Any]:
        """Per-parameter arrays over ``flat`` in the backend's array type."""
        if self.kind != "jax":
            return self.layout.unflatten(flat)
        out = {}
        for name, a, b, shape in self.layout.spans():
            x = self._jax.device_put(flat[a:b].reshape(shape), self.backend.device)
            if x.unsafe_buffer_pointer() != flat[a:b].ctypes.data and b > a:
                raise RuntimeError("JAX did not alias the host buffer")
            out[name] = x
        return out

    def _address(self, name: str, g: Any, keep: list) -> int:
        if self.kind == "torch":
            if g.device.type != "cpu":
                raise ValueError(f"gradients['{name}'] is on {g.device}; the parameters are on cpu")
            if g.requires_grad or not g.is_contiguous() or g.is_neg() or g.is_conj():
                g = g.detach().resolve_neg().resolve_conj().contiguous()
                keep.append(g)
            return g.data_ptr()
        if self.kind == "jax":
            devices = g.sharding.device_set
            if any(d.platform != "cpu" for d in devices):
                raise ValueError(f"gradients['{name}'] is on {sorted(map(str, devices))}; the "
                                 f"parameters are on cpu")
            return g.unsafe_buffer_pointer()
        if not g.flags.c_contiguous:
            g = np.ascontiguousarray(g)
            keep.append(g)
        return g.ctypes.data

    # -- one step --------------------------------------------------------------------
    def prepare(self, gradients: Any) -> np.ndarray | None:
        """The addresses, in layout order, of a full, well-typed set of gradients (keys in
        any order, :meth:`ordered`; read where they lie by the kernel), found without
        per-tensor Python calls where possible; else None."""
        if self.kind == "numpy":
            vals = self.ordered(gradients)
            return None if vals is None else ndarray_fields.scan(vals, self._expected)
        if self.kind == "jax":
            return self._prepare_jax(gradients)
        if self._scan is not None:
            vals = self.ordered(gradients)
            out = None if vals is None else self._scan(vals)
            if out is not None:
                return out
        # no scan, or one it refuses (e.g. requires_grad, a subclass): the Python reads
        vals = super().prepare(gradients)
        if vals is None:
            return None
        T = self._torch.Tensor  # lazily negated views must be resolved first (_address)
        if all(map(T.is_contiguous, vals)) and all(map(_IS_CPU, vals)) and not any(map(T.is_neg, vals)):
            return np.fromiter(map(T.data_ptr, vals), np.int64, len(vals))
        return None

    def _prepare_jax(self, gradients: Any) -> np.ndarray | None:
        """:meth:`prepare` for JAX. No ``isinstance`` pass: anything but a JAX array fails
        one of the reads below (``aval``, the wait, the unbound ``unsafe_buffer_pointer``)
        before a byte is written, and then the per-key checks name the fault."""
        vals = self.ordered(gradients)
        if vals is None:
            return None
        try:
            if not self.well_typed(vals) or (self._foreign and not self._on_cpu(vals)):
                return None
            self._wait(vals)  # the kernel reads the buffers: their computations must be done
            return np.fromiter(map(self._ptr, vals), np.int64, len(vals))
        except Exception:  # noqa: BLE001 - any failure means "not the fast path"
            return None

    def _on_cpu(self, vals: list) -> bool:
        """Whether every array lies in host memory (checked only where JAX also has an
        accelerator; the shardings that last passed are recognised by identity)."""
        shardings = [g.sharding for g in vals]
        if all(map(operator.is_, shardings, self._good_shardings)):
            return True
        distinct = {id(s): s for s in shardings}.values()
        if not all(d.platform == "cpu" for s in distinct for d in s.device_set):
            return False
        self._good_shardings = shardings
        return True

    def _pointers(self, grads: Any, keep: list) -> np.ndarray:
        """Addresses of the gradient buffers in layout order (0 where a gradient is absent);
        copies of non-contiguous ones are appended to ``keep``."""
        lay = self.layout
        gptr = np.zeros(len(lay.names), dtype=np.int64)
        for name, g in grads.items():
            try:
                if self.kind == "jax":
                    g.block_until_ready()  # the kernel reads it: its computation must be done
                gptr[lay.index[name]] = self._address(name, g, keep)
            except ValueError:
                raise
            except Exception as e:  # noqa: BLE001 - sparse, deleted, failed computation, ...
                raise TypeError(f"gradients['{name}'] cannot be read as a dense host array: {e}") from e
        return gptr

    def step(self, opt: Any, state: Any, params: Any, grads: Any, t: int,
             prepared: np.ndarray | None = None, ours: bool = False
             ) -> tuple[dict, bool, float | None, bool]:
        lay = self.layout
        keep: list = []  # contiguous copies the kernel reads, alive until it returns
        gptr = prepared if prepared is not None else self._pointers(grads, keep)
        norm = None
        plain = False  # no per-tensor or per-unit norms before the update (see fast_step.py)
        plan, itemsize = self._plan, np.dtype(lay.dtype).itemsize
        units = unit_args = None
        if self.fuses_adaptive_clip(opt, state):
            units, unit_clip, unit_eps = self._unit_spec(opt, state)
        fuse = self.fuses_normalize(opt, state)
        if units is not None or tensor_clipping(opt, state, fuse):  # per-tensor norms: read-only
            if units is not None:  # (adaptive clipping: per-unit norms of g and p)
                up = self._unit_plan(units)
                UG, UP = np.zeros(up.size), np.zeros(up.size)
                flat = self._current(state, params, ours)
                plan.run(unitwise.unit_sums_kernel(lay.dtype), (flat,), gptr,
                         (units, up.seg_soff, UG, UP))
                f, sumsq = unitwise.factors(up, UG, UP, unit_clip, unit_eps)
            else:
                R = np.zeros(len(plan.seg_t), dtype=np.float64)
                plan.run(segment_sumsq_kernel(lay.dtype), (), gptr, (R,), with_offsets=False)
                sumsq = np.zeros(len(lay.names), dtype=np.float64)
                np.add.at(sumsq, plan.seg_t, R)  # segments in order: thread-count independent
            table, index, clip, norm = clipped_table(opt, state, t, sumsq, fuse)
            if units is not None:  # one unit: a factor per tensor, folded into gscale
                one = unit_clip > 0
                one[units > 1] = False
                table[one, 0] *= f[up.ubase[one]]
                many = np.where(units > 1, units, 0)
                if many.any():
                    with np.errstate(over="ignore"):
                        unit_args = (up.ubase, many, f.astype(lay.dtype))
            if must_skip(opt, norm, grads, self.to_numpy):
                return dict(params), False, norm, True
        else:
            plain = True
            if opt.clip_norm is not None:  # the scale needs the norm before any update
                norm = self._grad_norm(gptr)
                if must_skip(opt, norm, grads, self.to_numpy):
                    return dict(params), False, norm, True
            table, index, clip = scalar_table(opt, state, t, norm)
        if opt.two_pass():
            table, index = self._first_pass(opt, state, params, ours, gptr, table, index,
                                            clip, t, unit_args)
        with np.errstate(over="ignore"):  # a scalar too large for the dtype: the probe tells
            after = (index, table.astype(lay.dtype), *(unit_args or ()))
        unit_kw = {"unitwise": True} if unit_args else {}
        n_scal = table.shape[1] - 4
        names = opt.full_slot_names()
        slots = [self.np_view(state.slots[s]) for s in names]
        math_fn, n_avg = opt.full_kernel_math(n_scal), len(names) - len(opt.slot_names())
        if refuses(opt):
            # skip/raise: the step is computed once without being stored; it reads what the
            # update reads (the price of "nothing changes"), Σ g² included
            flat = self._current(state, params, ours)
            dry = update_kernel(math_fn, len(slots), n_scal, lay.dtype, clip=clip, dry=True,
                                **unit_kw)
            total = plan.run(dry, (flat, flat, *slots), gptr, after)
            if not math.isfinite(total):
                gnorm = norm if norm is not None else self._grad_norm(gptr)
                if must_skip(opt, gnorm, grads, self.to_numpy):
                    return dict(params), False, gnorm, True
                if opt.nonfinite == "raise":
                    seen = opt._adaptive_clip(params, grads, state) if units is not None else grads
                    raise nonfinite_result_error(opt, nonfinite_results(
                        opt, flat, dict(zip(names, slots)), seen, self.to_numpy, lay,
                        table, index))
                return dict(params), False, gnorm, False
            if norm is None:
                norm = math.sqrt(total)
        src, views = self._adopt(state, params, ours)
        dst = state.params_flat
        gptr = self._unaliased(gptr, grads, keep, (dst, *state.slots.values()))
        copy = src is not dst
        stream = copy and streaming.worth_it((3 + len(state.slots)) * lay.total * itemsize)
        kernel = (update_kernel(math_fn, len(slots), n_scal, lay.dtype, copy, clip, stream)
                  if not n_avg and not unit_kw else
                  update_kernel(math_fn, len(slots), n_scal, lay.dtype, copy, clip, stream,
                                n_avg=n_avg, **unit_kw))
        if (plain and not copy and not unit_kw and ours and self.kind != "jax"
                and not refuses(opt)):
            self._keep_recipe(opt, state, math_fn, n_scal, n_avg)
        total = plan.run(kernel, (self.np_view(src), self.np_view(dst), *slots), gptr, after)
        if math.isfinite(total):  # gradients and every new value finite
            return dict(views), True, math.sqrt(total) if norm is None else norm, True
        # rare: a non-finite gradient, or finite gradients and a non-finite result
        return dict(views), True, self._grad_norm(gptr) if norm is None else norm, False

    def _keep_recipe(self, opt: Any, state: Any, math_fn: Any, n_scal: int, n_avg: int) -> None:
        """Leave how this plain step ran on ``state`` for the next (:mod:`.fast_step`), unless
        the last few recipes went unused (something they depend on changes every step)."""
        if state.fast is not None and state.fast.holds(opt, state):
            return
        fast_step.keep(opt, state,
                       lambda: fast_step.Recipe(opt, state, self, math_fn, n_scal, n_avg))

    def fast_step(self, opt: Any, state: Any, params: Any, grads: Any) -> Any:
        return fast_step.run(self, opt, state, params, grads)

    # -- adaptive clipping (:mod:`.unitwise`) ---------------------------------------------
    def fuses_adaptive_clip(self, opt: Any, state: Any) -> bool:
        """Whether a group clips adaptively (this engine does it inside its passes: a
        two-pass optimizer's first pass reads the units' factors as the update does)."""
        return any(getattr(v, "adaptive_clip", None) is not None
                   for v in opt.group_rows(state)[1])

    def centralized(self, grads: Any) -> dict[str, Any] | None:
        if self.kind == "jax":  # (its gradients are JAX arrays: the base class's copies)
            return None
        from .centralize_kernel import centralized

        return centralized(self, grads)

    def fuses_normalize(self, opt: Any, state: Any) -> bool:
        """Whether a group normalizes (``normalize_grad``) and none clips adaptively: the
        factors then come from the per-tensor sums of the read-only pass (no gradient copy,
        :func:`~.common.clipped_table`); adaptive clipping, fused here, comes after the
        normalization, which the base class then makes on copies."""
        views = opt.group_rows(state)[1]
        return (any(getattr(v, "normalize_grad", None) is not None for v in views)
                and not self.fuses_adaptive_clip(opt, state))

    def _unit_spec(self, opt: Any, state: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per tensor: its unit count (0: not clipped), ``c`` (0: not clipped) and ``ε``,
        cached while the groups and their clipping options stay the same."""
        from ..clipping import units as units_of

        index, views = opt.group_rows(state)
        key = (state.groups[0] if state.groups else None, id(state.layout),
               tuple((v.adaptive_clip, v.adaptive_clip_eps) for v in views))
        if self._units_key == key:
            return self._units
        lay = self.layout
        c = np.array([views[r].adaptive_clip or 0.0 for r in index], dtype=np.float64)
        eps = np.array([views[r].adaptive_clip_eps for r in index], dtype=np.float64)
        units = np.zeros(len(lay.names), dtype=np.int64)
        for i in np.flatnonzero(c):
            try:
                units[i] = units_of(lay.shapes[i])
            except ValueError as e:
                raise ValueError(f"adaptive_clip: parameter '{lay.names[i]}': {e}") from None
        self._units_key, self._units = key, (units, c, eps)
        return self._units

    def _unit_plan(self, units: np.ndarray) -> unitwise.UnitPlan:
        key = units.tobytes()
        if self._unit_plan_key != key:
            self._unit_plan_cached, self._unit_plan_key = unitwise.UnitPlan(self._plan, units), key
        return self._unit_plan_cached

    def _first_pass(self, opt: Any, state: Any, params: Any, ours: bool, gptr: np.ndarray,
                    table: np.ndarray, index: np.ndarray, clip: bool, t: int,
                    unit_args: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The per-tensor sums of ``opt.reduce`` (a read-only pass), then the second pass's
        per-tensor table (:func:`~.common.two_pass_table`)."""
        lay, plan = self.layout, self._plan
        sums = np.zeros((len(lay.names), opt.reductions), dtype=np.float64)
        if opt.reductions:
            own = opt.slot_names()
            n_own = table.shape[1] - 4 - (len(opt.full_slot_names()) - len(own))
            kernel = reduce_kernel(opt.reduce_math(), len(own), n_own, opt.reductions,
                                   lay.dtype, clip, **({"unitwise": True} if unit_args else {}))
            flat = self._current(state, params, ours)
            R = np.zeros((len(plan.seg_t), opt.reductions), dtype=np.float64)
            with np.errstate(over="ignore"):
                H = np.ascontiguousarray(table[:, :4 + n_own]).astype(lay.dtype)
            plan.run(kernel, (flat, *(self.np_view(state.slots[s]) for s in own)), gptr,
                     (index, H, R, *(unit_args or ())))
            np.add.at(sums, plan.seg_t, R)  # segments in order: thread-count independent
        return two_pass_table(opt, state, t, table, index, sums, gptr != 0)

    def _grad_norm(self, gptr: np.ndarray) -> float:
        """‖g‖₂ of the gradients at ``gptr`` (a read-only pass)."""
        return math.sqrt(self._plan.run(sumsq_kernel(self.layout.dtype), (), gptr, (),
                                        with_offsets=False))

    def _current(self, state: Any, params: Any, ours: bool) -> np.ndarray:
        """A flat host buffer holding ``params``, changing nothing: the state's own when they
        are the arrays the last update returned, else a new one with them copied in."""
        if ours:
            return self.np_view(state.params_flat)
        flat = (np.zeros(self.layout.total, self.layout.dtype) if state.params_flat is None
                else np.array(self.np_view(state.params_flat)))
        lay = self.layout
        for name, x in self.read_params(params, state.param_views or {}, None):
            a = int(lay.offsets[lay.index[name]])
            flat[a:a + x.size] = np.asarray(x).reshape(-1)
        return flat

    def _unaliased(self, gptr: np.ndarray, grads: Any, keep: list, written: tuple) -> np.ndarray:
        """``gptr`` with copies in place of gradients that lie in a buffer the kernel writes
        (e.g. a returned parameter passed as another one's gradient: in place, it would
        change before it is read). A few vector compares per step."""
        key = tuple(map(id, written))
        cached = self._spans.get(key)
        if cached is None:  # (the buffers are held with their spans: their ids stay theirs)
            if len(self._spans) >= 4:  # JAX's two parameter buffers, a reloaded state, ...
                self._spans.clear()
            spans = np.array([(v.ctypes.data, v.ctypes.data + v.nbytes)
                              for v in map(self.np_view, written)], dtype=np.int64)
            cached = self._spans[key] = (written, spans)
        spans = cached[1]
        if not inside(gptr, spans):
            return gptr
        hit = ((gptr[:, None] - spans[:, 0]).astype(np.uint64)
               < (spans[:, 1] - spans[:, 0]).astype(np.uint64)).any(axis=1)
        gptr = gptr.copy()
        for i in np.flatnonzero(hit):
            c = np.array(self.to_numpy(grads[self.layout.names[i]]))
            keep.append(c)
            gptr[i] = c.ctypes.data
        return gptr

    def _adopt(self, state: Any, params: Any, ours: bool) -> tuple[Any, dict[str, Any]]:
        """Make sure a flat buffer holds ``params`` (already so when ``ours``: they are the
        arrays the previous update returned); returns it and the arrays this update returns
        (over ``state.params_flat``, which the kernel writes)."""
        copies = [] if ours else self.read_params(params, state.param_views or {}, state.params_flat)
        first = state.params_flat is None
        if first:
            state.params_flat = self.full(self.layout.total, 0.0)
            state.param_views = self.views(state.params_flat)
        src, views = state.params_flat, state.param_views
        flat = self.np_view(src)
        lay = self.layout
        for name, x in copies:
            a = int(lay.offsets[lay.index[name]])
            flat[a:a + x.size] = x.reshape(-1)
        # JAX: write the other buffer, so that the given arrays stay valid. Not on the first
        # update: what it is given are copies into a fresh buffer, updated in place, and the
        # second buffer is made by the next update (the first one's peak holds the
        # parameters once, not twice: Adam 12 B/param beyond params + gradients, not 16)
        if self.kind == "jax" and not first:
            if getattr(self, "_spare", None) is None or len(self._spare) != len(flat):
                self._spare = self.full(self.layout.total, 0.0)
                self._spare_views = self.views(self._spare)
            state.params_flat, state.param_views, self._spare, self._spare_views = (
                self._spare, self._spare_views, src, views)
        return src, state.param_views

    def adopt_params(self, state: Any, params: dict[str, Any], repoint: Any = None) -> dict[str, Any]:
        """NumPy/torch: move the caller's ``params`` into the state's flat buffer, tensor by
        tensor (:meth:`Optimizer.adopt <mithril.utils.optimizers.Optimizer.adopt>`).

        Every parameter is read (and checked readable) before anything changes. Then each
        is copied into its slice and the caller's dict entry replaced by the slice's view
        (``repoint(name, view)`` is called too, e.g. ``param.data = view``), so that the
        original's memory is freed, if nothing else holds it, before the next tensor is
        copied: the parameters are never held twice, where a first ``update`` copies them
        all while the caller still holds the originals (12 B/param of peak for Adam instead
        of 8). The buffer is fresh zero pages (:meth:`full`), paid for as it is written.
        Returns the views, in layout order; ``update`` takes them as its own arrays."""
        if self.kind == "jax":  # two alternating buffers (see the class docs): not this path
            raise ValueError("adopt_params: NumPy and torch only")
        copies = self.read_params(params, state.param_views or {}, state.params_flat)
        if state.params_flat is None:
            state.params_flat = self.full(self.layout.total, 0.0)  # zero pages: paid as written
            state.param_views = self.views(state.params_flat)
        flat, views, lay = self.np_view(state.params_flat), state.param_views, self.layout
        copies.reverse()
        while copies:  # each copy popped and dropped: the list must not keep the originals
            name, x = copies.pop()
            a = int(lay.offsets[lay.index[name]])
            flat[a:a + x.size] = x.reshape(-1)
            del x
            params[name] = views[name]
            if repoint is not None:
                repoint(name, views[name])
        return dict(views)

    def adopt_storage(self, state: Any, params: dict[str, Any], repoint: Any) -> dict[str, Any]:
        """Torch, before the first update: :meth:`adopt_params` with ``repoint`` (what
        :mod:`mithril.interop.torch_optim` calls to point each ``nn.Parameter`` at its
        slice: ``param.data = view``)."""
        if self.kind != "torch" or state.params_flat is not None:
            raise ValueError("adopt_storage: torch, before the first update only")
        return self.adopt_params(state, params, repoint)

    def readable(self, p: Any) -> np.ndarray:
        return self.to_numpy(p)

    def unaliased_copy(self, x: np.ndarray, flat: Any) -> np.ndarray:
        return x.copy() if np.may_share_memory(x, self.np_view(flat)) else x

