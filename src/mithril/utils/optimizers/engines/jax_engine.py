"""One ``jax.jit`` step over chunks of flat buffers, with buffer donation.

The state's slots are kept in chunks of the flat layout (:mod:`.jax_chunks`): on GPUs one
chunk, on CPU one per large tensor and one per run of small ones. Inside the jitted function
each chunk's parameters are concatenated into one flat vector, updated with the optimizer's
elementwise math (XLA fuses it into one loop) and split back, so the compiled program and
its dispatch cost stay small for thousands of tensors. Every
hyperparameter is an argument: changing the learning rate never recompiles. Params
returned by the previous update (under ``"skip"`` / ``"raise"`` they are not: a refused step
changes nothing, the caller's arrays included) and all state slots are donated.
"""

from __future__ import annotations

import inspect
import os
import types
from typing import Any

import numpy as np

from ..averaging import average
from ..elementwise import times_keep
from ..state import DeviceReport
from . import fast_step
from .common import (
    Engine,
    Unfit,
    clipped_table,
    nonfinite_error,
    nonfinite_result_error,
    nonfinite_results,
    norm_scale,
    refuses,
    scalar_table,
    tensor_clipping,
    two_pass_table,
)
from .jax_chunks import ChunkedSlots, chunk_bounds
from .jax_finite import finite_grads, sum_squares
from .jax_parts import Parts, selectors, slice_offsets
from .jax_per_tensor import (
    First,
    clip_factor,
    clip_scales,
    clip_spec,
    extra_columns,
    own_columns,
    own_numbers,
    own_table,
    second_table,
    settings_hold,
    tensor_steps,
)

_UNSEEN = object()

#: compiled steps shared by every engine: (math, slots, layout, chunks, grads present,
#: flags, donate, checked, the first pass in the program, per-tensor clipping); and the
#: host's first passes ("reduce", ...)
_COMPILED: dict[tuple, Any] = {}


def scaled_norm(leaves: list[Any]) -> Any:
    """‖g‖₂ over all ``leaves`` (traced), scaled by max|g|, so that finite gradients whose
    squares overflow float32 still have a finite norm (the fused kernel sums in float64);
    inf/NaN as the plain sum. Three passes over the gradients."""
    import jax.numpy as jnp

    if not leaves:
        return jnp.zeros((), jnp.float32)
    dt = jnp.result_type(*[jnp.promote_types(g.dtype, jnp.float32) for g in leaves])
    gs = [g.astype(dt) for g in leaves]
    a = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) if g.size else jnp.zeros((), dt) for g in gs]))
    safe = jnp.where((a > 0) & jnp.isfinite(a), a, jnp.ones((), dt))
    scaled = safe * jnp.sqrt(sum(jnp.sum(jnp.square(g / safe)) for g in gs))
    return jnp.where(jnp.isfinite(a), scaled, jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in gs)))


def global_norm(leaves: list[Any]) -> Any:
    """:func:`scaled_norm`'s value with one pass in the common case: one sum of squares per
    leaf; only where that sum overflows (finite gradients beyond ~1e19) or is not finite, the
    scaled norm, under ``lax.cond`` (its passes run only then), of the leaves concatenated
    (a few loops for XLA to compile instead of four per leaf)."""
    import jax
    import jax.numpy as jnp

    if not leaves:
        return jnp.zeros((), jnp.float32)
    dt, sq = sum_squares(leaves)

    def rare() -> Any:
        return scaled_norm([jnp.concatenate([g.reshape(-1).astype(dt) for g in leaves])]
                           if len(leaves) > 1 else leaves)

    return jax.lax.cond(jnp.isfinite(sq), lambda: jnp.sqrt(sq), rare)


def _finite(arrays: list[Any]) -> Any:
    """Whether every element of ``arrays`` is finite: Σ (x − x) is 0, or NaN where some x
    is ±inf or NaN. One float reduction per array, no boolean array to write (XLA's CPU
    backend wrote the elementwise mask, then reduced it in four more passes; one reduction
    of a chunk's (p − p) + (m − m) + (v − v) ran 12% slower than three)."""
    import jax.numpy as jnp

    return jnp.isfinite(sum(jnp.sum(x - x) for x in arrays))


def _clip_norm(opt: Any, flags: tuple, dtype: Any) -> np.ndarray | None:
    """The jitted passes' ``clip_norm`` argument, ``[clip_norm, clip_eps]`` (arguments, not
    constants: setting either compiles nothing; :func:`~.jax_per_tensor.clip_factor` reads
    it): None where the global clip is off (one host-to-device copy fewer a step)."""
    if not flags[0]:
        return None
    return np.asarray([opt.clip_norm, opt.clip_eps], dtype=np.promote_types(dtype, np.float32))


def _host(probe: Any) -> tuple[float, bool]:
    """A step's norm and finite probe (one array of both, read at once) as Python values
    (``np.asarray``: ~3 us, where ``float()`` of a 0-d array takes ~25 and
    ``jax.device_get`` ~60)."""
    norm, finite = np.asarray(probe).tolist()
    return norm, bool(finite)


#: Whether the jitted step keeps its norm and finite probe apart from the update's loops
#: (:func:`_barrier`). Added for XLA's CPU backend, which once fused such a reduction into
#: the update's loop and ran that loop ~2.5x slower (jax 0.10's emits the same program with
#: or without them). On a GPU, XLA could fuse the probe into the update's loop and read each
#: new value once instead of twice: not yet measured. ``MITHRIL_JAX_BARRIERS=0`` drops the
#: barriers, a measuring knob (``benchmarks/cuda_checks.sh`` runs both).
BARRIERS = os.environ.get("MITHRIL_JAX_BARRIERS", "1") != "0"


def _barrier(x: Any) -> Any:
    """``x``, computed before anything that uses the result (``optimization_barrier``;
    ``x`` itself where :data:`BARRIERS` is off)."""
    import jax

    return jax.lax.optimization_barrier(x) if BARRIERS else x


def _adaptive(lay: Any, params: Any, grads: Any, agc: tuple | None) -> Any:
    """The gradients clipped unit-wise (``adaptive_clip``), inside the jitted pass, where
    XLA fuses it into the step: ``agc`` holds each tensor's (c, ε), c = 0 where it is off."""
    if agc is None:
        return grads
    from ..clipping import adaptive_clip

    return {n: adaptive_clip(g, params[n], *agc[lay.index[n]]) if agc[lay.index[n]][0] else g
            for n, g in grads.items()}


def _named(lay: Any, names: list[str], leaves: tuple) -> dict[str, Any]:
    """``leaves`` (traced) by name, each checked against the layout's shape and dtype."""
    if len(leaves) != len(names):
        raise Unfit(f"{len(leaves)} arrays for {len(names)} names")
    dt = np.dtype(lay.dtype)
    for n, x in zip(names, leaves):
        if tuple(x.shape) != tuple(lay.shapes[lay.index[n]]) or x.dtype != dt:
            raise Unfit(f"'{n}': {x.dtype}{list(x.shape)}")
    return dict(zip(names, leaves))


def _prologue(parts: Parts, params: Any, grads: Any, table: Any, sels: tuple,
              clip_norm: Any, flags: tuple, norm_on: bool = True
              ) -> tuple[list, list, list, Any]:
    """Inside a jitted pass, per chunk: the flat params and the gradient as the math sees
    it (clipped unit-wise, scaled by the global norm rule and each tensor's table scale,
    clipped by value, L2-decayed), and its column getter; and the (unit-clipped)
    gradients' norm. ``sels``: each chunk's rows of the table (:meth:`Parts.col`).
    ``flags``: clip_norm_on, clip_value_on, per_tensor, the adaptive
    clipping and l2_on (some group has coupled weight decay: without it the gradient's
    passes do not read the params). ``norm_on`` False (no clip_norm, nothing reads it): no
    norm, None."""
    import jax.numpy as jnp

    clip_norm_on, clip_value_on, per_tensor, agc, l2_on = flags
    grads = _adaptive(parts.lay, params, grads, agc)
    ps, gs = parts.flat(params), parts.flat(grads)
    cols = parts.cols(table, sels)
    norm = None
    if norm_on or clip_norm_on:
        norm = global_norm(gs)
        # XLA's CPU backend fuses an independent reduction into the update's loop as a
        # second output, and that loop then runs ~2.5x slower (1M-param Adam: 2.55 vs
        # 0.92 ms); kept apart, the norm costs a separate read of g (0.07 ms)
        norm, ps, gs = _barrier((norm, ps, gs))
    if clip_norm_on:
        scale = clip_factor(clip_norm, norm, parts.lay.dtype).astype(parts.lay.dtype)
        gs = [g * scale for g in gs]
    if per_tensor:
        gs = [g * col(0) for g, col in zip(gs, cols)]
    if clip_value_on:
        gs = [jnp.clip(g, -col(1), col(1)) for g, col in zip(gs, cols)]
    if l2_on:
        gs = [g + col(2) * p for g, p, col in zip(gs, ps, cols)]
    return ps, gs, cols, norm


class JaxEngine(Engine):
    def __init__(self, backend: Any, layout: Any) -> None:
        import jax
        import jax.numpy as jnp

        from .kernel_cache import configure_jax

        configure_jax()  # its jitted steps compile once per machine (kernel_cache)
        self.jax, self.jnp = jax, jnp
        self.backend, self.layout = backend, layout
        self.array_type, self.native_dtype = jax.Array, jnp.dtype(layout.dtype)
        #: the concrete array class (isinstance against the jax.Array ABC costs ~0.3 us)
        self.concrete = type(jnp.zeros(0))
        #: the layout's chunks, in which the state's slots are kept (:mod:`.jax_chunks`)
        self.bounds = chunk_bounds(layout, backend.device.platform)
        self._sels: dict[tuple, tuple] = {}  # (rows, present) -> _selectors' arrays
        self._offsets = slice_offsets(self.bounds, backend.device.platform)
        self._first_specs: dict[tuple, tuple | None] = {}  # see _traced_first
        self._own_specs: dict[tuple, tuple | None] = {}  # (and the scalars it makes)

    def _selectors(self, rows: tuple[int, ...] | None, present: tuple[str, ...] | None
                   ) -> tuple[tuple, tuple, tuple]:
        """:func:`~.jax_parts.selectors` with this engine's offsets, made once and kept
        while the groups and the gradients' keys stay the same (the few last ones kept)."""
        key = (rows, present)
        got = self._sels.get(key)
        if got is None:
            if len(self._sels) >= 4:  # (a few: the first pass and the second differ)
                self._sels.clear()
            got = self._sels[key] = selectors(self.layout.names, self.bounds, rows, present,
                                              self._offsets)
        return got

    def full(self, n: int, value: float) -> Any:
        return self.jnp.full((n,), value, dtype=self.layout.dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, a: np.ndarray) -> Any:
        return self.jnp.asarray(np.asarray(a, dtype=self.layout.dtype))

    def _build(self, math_fn: Any, slot_names: tuple[str, ...], present: tuple[str, ...] | None,
               flags: tuple[bool, bool, bool], donate: bool, n_avg: int = 0,
               checked: bool = True, first: First | None = None,
               tclip: tuple | None = None) -> Any:
        """The jitted step, over the layout's chunks (slots: name → chunk arrays), with
        the chunks' :meth:`_selectors` as its last argument: where the table has a row per
        parameter group, a chunk whose tensors differ gathers each scalar per element (XLA
        fuses the gather into the update loop). ``n_avg``: the
        last slots are weight averages (their weights the last scalars), which move
        towards parameters without a gradient too. ``checked`` False
        (``nonfinite="unchecked"``): no norm unless clip_norm needs it, no finite probes
        (None). ``first``: a two-pass optimizer's first pass in the same program
        (:meth:`_traced_first`, :mod:`.jax_per_tensor`): the table is then one row per
        tensor in the sums' width, without the columns ``tensor_scalars`` makes from the
        per-tensor sums, which the program computes (from the step ``t``, the tensor
        slots ``tensors``, the settings ``numbers`` it reads and the state ``values``,
        arguments) and inserts before the update; the new tensor slots come back among
        the slots, the new values last. Where the optimizer's own scalars read the values,
        they are made in the program first, from each tensor's settings ``own_numbers``.
        ``tclip``: per-tensor clipping (:func:`~.jax_per_tensor.clip_spec`), its scales
        computed in the program, into the per-tensor table's column 0."""
        jax, jnp = self.jax, self.jnp
        clip_norm_on, clip_value_on, skip, per_tensor, agc, l2_on = flags  # per_tensor: col 0
        lay = self.layout
        parts = Parts(lay, self.bounds)
        n_slots = len(slot_names)
        half = lay.dtype in ("float16", "bfloat16")
        gnames = lay.name_list if present is None else list(present)

        # (which tensors have a gradient: those without keep their tensor slots)
        pmask = None if present is None else np.array([n in present for n in lay.names])

        def step(params, grads, slots, table, clip_norm, selectors, t=None, tensors=None,
                 numbers=None, values=None, own_numbers=None):
            # params (every tensor) and grads (``present``'s) in layout order, as tuples:
            # flattened faster than dicts (no sorting of keys), and checked here, when JAX
            # traces them, instead of on every call (fast_step.run_jax)
            params, grads = _named(lay, lay.name_list, params), _named(lay, gnames, grads)
            sels, masks, offsets = selectors
            wide, table = table, table.astype(lay.dtype)
            if first is not None and first.own is not None:  # own scalars of the values
                wide = own_table(first, wide, t[0], values, own_numbers)  # (each tensor's)
                table = wide.astype(lay.dtype)
            if tclip is not None:  # each tensor's clipping scale, from its Σ g²
                wide = clip_scales(parts, tclip, wide, parts.flat(_adaptive(lay, params,
                                                                            grads, agc)),
                                   clip_norm)
                table = wide.astype(lay.dtype)
            ps, gs, cols, norm = _prologue(parts, params, grads, table, sels, clip_norm,
                                           (clip_norm_on, clip_value_on, per_tensor, agc,
                                            l2_on), checked)
            new_tensors, new_values = {}, {}
            if first is not None:  # the per-tensor sums, then the update's table
                table, new_tensors, new_values = second_table(
                    parts, first, wide, ps, gs, cols, slots, t,
                    {s: v.astype(wide.dtype) for s, v in (tensors or {}).items()}, numbers,
                    values or {}, pmask)
                wide, table = table, table.astype(lay.dtype)
                cols = parts.cols(table, sels)
            kcols = parts.cols(wide, sels) if half else cols  # (keep: times_keep)
            n_scal = table.shape[1]
            new_ps, new_slots = [], []
            for c, (p, g, col, mask) in enumerate(zip(ps, gs, cols, masks)):
                old = [slots[s][c] for s in slot_names]
                out = math_fn(times_keep(p, kcols[c](3)), g, *old,
                              *(col(j) for j in range(4, n_scal)))
                new_p, new = out[0], list(out[1:])
                if mask is not None:  # some tensors have no gradient: left untouched
                    new_p = jnp.where(mask, new_p, p)
                    new = [jnp.where(mask, v, o) for v, o in zip(new, old)]
                    for i in range(n_slots - n_avg, n_slots):
                        w = col(n_scal - n_slots + i)
                        new[i] = jnp.where(mask, new[i], average(p, old[i], w))
                new_ps.append(new_p)
                new_slots.append(new)
            finite = None
            if checked:  # whether every new value is finite: a reduction of its own
                new_ps, new_slots = _barrier((new_ps, new_slots))
                finite = _finite([*new_ps, *(v for new in new_slots for v in new),
                                  # (a two-pass step's tensor slots and values: DoG's Σ‖g‖²
                                  # may overflow where its update stays finite)
                                  *(v.astype(lay.dtype) for v in new_tensors.values()),
                                  *new_values.values()])
            if skip:
                keep = finite_grads(list(grads.values()), norm) & finite  # (not the
                # norm's finiteness: a finite gradients' one may overflow float32)
                new_ps = [jnp.where(keep, v, p) for v, p in zip(new_ps, ps)]
                new_slots = [[jnp.where(keep, v, slots[s][c]) for v, s in zip(new, slot_names)]
                             for c, new in enumerate(new_slots)]
            out_slots = {s: tuple(new[i] for new in new_slots) for i, s in enumerate(slot_names)}
            out_slots.update((s, v.astype(lay.dtype)) for s, v in new_tensors.items())
            out = parts.unflat(new_ps, offsets)
            if finite is not None:  # one array to read back: [norm, finite]
                norm, finite = None, jnp.stack([norm, finite.astype(norm.dtype)])
            return tuple(out[n] for n in lay.name_list), out_slots, norm, finite, new_values

        return jax.jit(step, donate_argnums=(0, 2) if donate else (2,))

    def fuses_adaptive_clip(self, opt: Any, state: Any) -> bool:
        """Adaptive clipping runs inside the jitted passes (:func:`_adaptive`)."""
        return self._agc(opt, state) is not None

    def _agc(self, opt: Any, state: Any) -> tuple | None:
        """Each tensor's adaptive clipping (c, ε), c = 0 where off; None if none clips. A
        shape that cannot be clipped is refused here, by name, before any work."""
        from ..clipping import units

        index, views = opt.group_rows(state)
        own = tuple((getattr(v, "adaptive_clip", None), getattr(v, "adaptive_clip_eps", 1e-3))
                    for v in views)
        if all(c is None for c, _ in own):
            return None
        key = (id(state.layout), index.tobytes(), own)
        if self.__dict__.get("_agc_key") == key:
            return self._agc_spec
        spec = tuple((float(own[r][0] or 0.0), float(own[r][1])) for r in index)
        for (c, _), name, shape in zip(spec, self.layout.names, self.layout.shapes, strict=True):
            if c:
                try:
                    units(shape)
                except ValueError as e:
                    raise ValueError(f"adaptive_clip: parameter '{name}': {e}") from None
        self._agc_key, self._agc_spec = key, spec
        return spec

    def _host_table(self, opt: Any, state: Any, t: int, params: Any, grads: Any, agc: Any,
                    flags: tuple) -> tuple[np.ndarray, np.ndarray]:
        """The step's scalar table as the host computes it (per-tensor clipping from the
        gradients' Σ g² read back, a two-pass optimizer's first pass): the rare path that
        names the tensors of a refused step (:func:`~.common.nonfinite_results`)."""
        lay, jnp = self.layout, self.jnp
        if tensor_clipping(opt, state):
            parts, wide = Parts(lay, self.bounds), jnp.promote_types(lay.dtype, jnp.float32)
            gs = parts.flat(_adaptive(lay, dict(params), grads, agc))  # (zeros where absent)
            sq = np.asarray(parts.sumsq(gs, wide), dtype=np.float64)
            table, index, _, _ = clipped_table(opt, state, t, sq)
        else:
            table, index, _ = scalar_table(opt, state, t, None)
        if opt.two_pass():
            table, index = self._first_pass(opt, state, ChunkedSlots.of(
                state.slots, self.bounds), t, params, grads, table, index, flags)
        return table, index

    def _traced_first(self, opt: Any, table: np.ndarray) -> First | None:
        """How a two-pass optimizer's first pass runs inside the update's program
        (:func:`~.jax_per_tensor.second_table`), or None where it runs on the host
        (:meth:`_first_pass`, a program and a read back more): a ``tensor_scalars`` that
        reads an attribute that is not a number, None, bool, string or method, or does not
        trace (NumPy, Python control flow on a traced value). State values go in and out
        of the program; where the per-step ``scalars`` read some (``scalar_values``:
        Prodigy's ``d``), they are made in the program too (:func:`~.jax_per_tensor.
        own_table`), unless they do not trace or the prologue reads them (decoupled weight
        decay outside the optimizer's math). Found once per optimizer class and layout,
        and again when a static setting it read changes."""
        cls = type(opt)
        fn = inspect.getattr_static(cls, "tensor_scalars", None)
        if not isinstance(fn, types.FunctionType) or (opt.scalar_values
                                                      and not opt.weight_decay_in_math):
            return None
        own = tuple(opt.slot_names())
        n_own = table.shape[1] - 4 - (len(opt.full_slot_names()) - len(own))
        n, k, ts = len(self.layout.names), opt.reductions, tuple(opt.tensor_slots)
        key = (cls, fn, n, k, n_own, ts, tuple(opt.state_values))
        spec = self._first_specs.get(key, _UNSEEN)
        if spec is _UNSEEN or (spec is not None and not settings_hold(opt, *spec[1:])):
            spec = self._first_specs[key] = extra_columns(fn, opt, n, k, n_own,
                                                          self.layout.sizes, ts,
                                                          tuple(opt.state_values))
        if spec is None:
            return None
        scal = None
        if opt.scalar_values:
            scal = self._own_specs.get(key, _UNSEEN)
            if scal is _UNSEEN or (scal is not None and not settings_hold(opt, *scal[1:])):
                scal = self._own_specs[key] = own_columns(opt, n, n_own)
            if scal is None:
                return None
        n_extra, names, statics = spec
        return First(opt.reduce_math() if k else None, own, n_own, fn, n_extra, cls, ts, names,
                     statics, tuple(opt.state_values), scal)

    def _values(self, state: Any, first: First, dtype: Any) -> dict[str, Any] | None:
        """The state values a one-program step takes (0-d, ``dtype``): those the last step
        left on the device as they are, else the state's floats, put there (a NumPy
        argument would be a signature of its own for ``jax.jit``: a second trace)."""
        if not first.values:
            return None
        held = state.held_values()
        if held is not None and all(np.dtype(held[k].dtype) == dtype for k in first.values):
            return {k: held[k] for k in first.values}
        return {k: self.jnp.asarray(state.values[k], dtype) for k in first.values}

    def _first_pass(self, opt: Any, state: Any, slots: ChunkedSlots, t: int, params: Any,
                    grads: Any, table: np.ndarray, index: np.ndarray, flags: tuple
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-tensor float64 sums of ``opt.reduce`` (one jitted, read-only pass over the
        chunks of ``slots``, brought to the host), then the second pass's table
        (:func:`~.common.two_pass_table`)."""
        lay, k = self.layout, opt.reductions
        sums = np.zeros((len(lay.names), k), dtype=np.float64)
        present = np.array([n in grads for n in lay.names], dtype=bool)
        if k:
            own = opt.slot_names()
            n_own = table.shape[1] - 4 - (len(opt.full_slot_names()) - len(own))
            rows = None if table.shape[0] == 1 else tuple(int(r) for r in index)
            pres = None if present.all() else tuple(n for n in lay.names if n in grads)
            key = ("reduce", opt.reduce_math(), own, n_own, lay, self.bounds, pres, flags)
            fn = _COMPILED.get(key)
            if fn is None:
                fn = _COMPILED[key] = self._build_reduce(opt.reduce_math(), own, n_own, k,
                                                         flags)
            with np.errstate(over="ignore"):
                hp = table.astype(lay.dtype)
            cn = _clip_norm(opt, flags, lay.dtype)
            sums = np.asarray(fn(dict(params), dict(grads), {s: slots.chunks(s) for s in own},
                                 hp, cn, self._selectors(rows, None)[0]),
                              dtype=np.float64)
            # a tensor without a gradient counts for nothing (np.where: a float64 result
            # comes back as a read-only view)
            sums = np.where(present[:, None], sums, 0.0)
        return two_pass_table(opt, state, t, table, index, sums, present)

    def _build_reduce(self, reduce_fn: Any, own: tuple[str, ...], n_own: int, k: int,
                      flags: tuple) -> Any:
        """The jitted first pass: per tensor, the sums of ``reduce_fn``'s terms
        (:meth:`Parts.sums`). Its last argument: the chunks' rows of the table
        (:meth:`_selectors`)."""
        jax, jnp, lay = self.jax, self.jnp, self.layout
        clip_norm_on, clip_value_on, _, per_tensor, agc, l2_on = flags
        parts = Parts(lay, self.bounds)
        wide = jnp.promote_types(lay.dtype, jnp.float32)

        def first(params, grads, slots, table, clip_norm, sels):
            ps, gs, cols, _ = _prologue(parts, params, grads, table, sels, clip_norm,
                                        (clip_norm_on, clip_value_on, per_tensor, agc, l2_on))
            out = []
            for c, (p, g, col) in enumerate(zip(ps, gs, cols)):
                terms = reduce_fn(p * col(3), g, *(slots[s][c] for s in own),
                                  *(col(j) for j in range(4, 4 + n_own)))
                out.append(jnp.stack([parts.sums(c, x.astype(wide)) for x in terms], axis=1))
            return parts.per_tensor(out)

        return jax.jit(first)

    def report(self, probe: Any) -> DeviceReport:
        """A step's norm and finite probe (``[norm, finite]``), read when needed
        (:func:`_host`); its copy to the host starts now (a CPU array is on the host
        already)."""
        if self.backend.device.platform != "cpu":
            probe.copy_to_host_async()
        return DeviceReport(lambda: _host(probe))

    def fast_step(self, opt: Any, state: Any, params: Any, grads: Any) -> Any:
        return fast_step.run_jax(self, opt, state, params, grads)

    def step(self, opt: Any, state: Any, params: Any, grads: Any, t: int,
             prepared: Any = None, ours: bool = False) -> tuple[dict, bool, Any, bool]:
        jnp = self.jnp
        lay = self.layout
        present = None if len(grads) == len(lay.names) else tuple(n for n in lay.names if n in grads)
        agc = self._agc(opt, state)
        tclip = clip_spec(opt, state) if tensor_clipping(opt, state) else None
        # gscale: in the jitted step; values the scalars read: their initial ones, as long
        # as the program makes the scalars of the state's (none is read back for the table)
        table, index, clip = scalar_table(opt, state, t, None, not opt.scalar_values)
        flags = (opt.clip_norm is not None and tclip is None, clip, refuses(opt),
                 tclip is not None, agc, bool((table[:, 2] != 0).any()))
        slots = ChunkedSlots.of(state.slots, self.bounds)  # (state's own once the step runs)
        first = self._traced_first(opt, table) if opt.two_pass() else None
        own_nums = None
        if first is not None and first.own is not None:
            own_nums = own_numbers(opt.group_rows(state)[1], index, first.own, np.float64)
            if own_nums is None:  # a group whose static settings differ: on the host
                first = None
        if first is None and opt.scalar_values:  # the host's table: the state's values
            table, index, clip = scalar_table(opt, state, t, None)
        if first is not None or tclip is not None:  # per-tensor scalars made in the program
            table, index = table[index], np.arange(len(lay.names))
        if first is None and opt.two_pass():
            table, index = self._first_pass(opt, state, slots, t, params, grads, table, index,
                                            flags)
        rows = None if table.shape[0] == 1 else tuple(int(r) for r in index)
        # skip/raise must leave the caller's params intact (a skipped step's returned
        # arrays included): the params are donated only where the step is applied anyway
        donate = not refuses(opt)
        if donate and not ours:  # never donate arrays the caller may still hold
            params = {k: jnp.array(v, copy=True) for k, v in params.items()}
        elif donate and (same := fast_step.aliases(params, grads.values())):
            # a gradient that is a param array (donated below) is read from a copy
            grads = {k: jnp.array(g, copy=True) if id(g) in same else g
                     for k, g in grads.items()}
        names = opt.full_slot_names()
        math_fn = opt.full_kernel_math(table.shape[1] - 4 + (first.n_extra if first else 0))
        # "unchecked": nothing measured or read back (per-tensor scales: in the program)
        checked = opt.nonfinite != "unchecked"
        key = (math_fn, names, lay, self.bounds, present, flags, donate, checked, first, tclip)
        fn = _COMPILED.get(key)
        if fn is None:
            fn = _COMPILED[key] = self._build(math_fn, names, present, flags, donate,
                                              len(names) - len(opt.slot_names()), checked,
                                              first, tclip)
        selectors = self._selectors(rows, present)
        with np.errstate(over="ignore"):  # a scalar too large for the dtype: found below
            # (a one-program two-pass step's table: in the width of its sums)
            # (half precision: too, for the decay's keep factor, times_keep)
            hp = table.astype(self.jnp.promote_types(lay.dtype, np.float32)
                              if first or tclip or lay.dtype in ("float16", "bfloat16")
                              else lay.dtype)
        cn = _clip_norm(opt, flags[:1] if tclip is None else (tclip[3],), lay.dtype)
        kernel_slots = {s: slots.chunks(s) for s in names}
        extra = ()
        if first:  # the step, the tensor slots and the settings tensor_scalars reads
            extra = (tensor_steps(opt, state, t), {s: slots[s] for s in first.tensor_slots},
                     np.array([getattr(opt, k) for k in first.names], dtype=hp.dtype)
                     if first.names else None, self._values(state, first, hp.dtype),
                     None if own_nums is None else own_nums.astype(hp.dtype))
        new_params, new_slots, norm, probe, new_values = fn(
            tuple(params[n] for n in lay.name_list),
            tuple(grads[n] for n in (lay.name_list if present is None else present)),
            kernel_slots, hp, cn, selectors, *extra)
        # in layout order, so that the next update sees its own arrays (state.returned) and
        # neither checks nor copies them
        new_params = dict(zip(lay.name_list, new_params))
        # the old slots were donated (under skip/raise: same values)
        new_tensors = {s: new_slots.pop(s) for s in (first.tensor_slots if first else ())}
        state.slots = slots.replaced(new_slots)
        if new_tensors or new_values:  # committed once the step is applied (Optimizer.update)
            def commit() -> None:
                for s, v in new_tensors.items():
                    state.slots[s] = v
                if new_values:  # (kept on the device: read back only if read)
                    state.hold_values(new_values)

            state.pending = commit
        if (ours and donate and present is None and agc is None and not flags[3]
                and not opt.two_pass()):  # a plain step: the next may repeat it (fast_step)
            fast_step.keep(opt, state, lambda: fast_step.JaxRecipe(  # (cn as the full path
                # gives it: a device array here would be a second trace of the program)
                opt, state, self, fn, names, table.shape, cn, checked, selectors))
        if probe is None:  # "unchecked": nothing read back, the device runs on (the norm,
            # if clip_norm measured it, stays a 0-d array)
            state.param_views = new_params
            return dict(new_params), True, norm, True
        if opt.nonfinite == "propagate":  # applied whatever they say: read later
            state.param_views = new_params
            return dict(new_params), True, self.report(probe), True
        norm_f, finite = _host(probe)
        bad: list[str] = []
        if refuses(opt) and not np.isfinite(norm_f):  # (rare) which gradients: a norm of
            # finite ones may pass the dtype's range (float32 from ~1e38), as NumPy's does not
            bad = [n for n, g in grads.items() if not bool(jnp.all(jnp.isfinite(g)))]
        ok = not refuses(opt) or (not bad and finite)
        if not ok and opt.nonfinite == "raise":  # params were not donated: as they were
            if bad:
                raise nonfinite_error(opt, bad, norm_f)
            # name the offenders (rare): params were not donated, and the slots that came
            # back hold the old values
            flat = np.concatenate([np.asarray(params[n]).reshape(-1) for n in lay.names])
            if first is not None or tclip is not None:  # the table, taken on the host
                table, index = self._host_table(opt, state, t, params, grads, agc, flags)
            if flags[0]:  # the table of this step, with the global clip's scale in it
                table = table.copy()
                table[:, 0] *= norm_scale(opt.clip_norm, norm_f, opt.clip_eps)
            raise nonfinite_result_error(opt, nonfinite_results(
                opt, flat, {k: np.asarray(state.slots[k]) for k in new_slots}, grads, self.to_numpy,
                lay, table, index))
        state.param_views = new_params
        return dict(new_params), ok, norm_f, finite
