"""The optimizer math with plain array ops on flat buffers.

Used where no fused kernel applies: torch on GPU (each op is one device kernel over the
flat buffer, so per-tensor launch cost still vanishes), float16/bfloat16 parameters, and
states with a slot in a dtype of its own (optax's ``mu_dtype``, ``slot_dtypes``): that
slot's flat buffer has its dtype, the math runs with the array library's promotion (a
bfloat16 ``m`` with float32 gradients: float32; a Python float times it: bfloat16, as
optax's weak-typed scalars) and its new value is rounded to its dtype when stored. On JAX
(that case only) the buffers are NumPy host arrays (bfloat16 by ``ml_dtypes``, whose
arithmetic rounds as XLA's CPU does) and each update returns new ``jax.Array`` copies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..averaging import average
from ..elementwise import times_keep
from .common import (
    Engine,
    all_finite,
    clipped_table,
    is_finite,
    must_skip,
    nonfinite_result_error,
    refuses,
    scalar_table,
    tensor_clipping,
    two_pass_table,
)


class ArrayEngine(Engine):
    def __init__(self, backend: Any, layout: Any,
                 slot_dtypes: dict[str, str] | None = None) -> None:
        """``slot_dtypes``: slot name -> the dtype name its buffer has (others: the
        parameters')."""
        self.backend, self.layout = backend, layout
        self.slot_dtypes = dict(slot_dtypes or {})
        self.torch = backend.name == "torch"
        self.jax = backend.name == "jax"
        if self.jax:  # (host buffers: the NumPy path below, jax.Array in and out)
            import jax

            from ....backends.numpy_backend import numpy_dtype

            self.array_type, self.native_dtype = jax.Array, np.dtype(numpy_dtype(layout.dtype))
        elif self.torch:
            import torch

            self.t = torch
            self.tdtype = getattr(torch, layout.dtype)
            self.device = backend.device
            self.array_type, self.native_dtype = torch.Tensor, self.tdtype
        else:
            from ....backends.numpy_backend import numpy_dtype

            self.array_type, self.native_dtype = np.ndarray, np.dtype(numpy_dtype(layout.dtype))
        # each tensor's elements (with the gap after it): what _per_element repeats by
        starts = [a for _, a, _, _ in layout.spans()]
        self._reps = np.diff(np.array([*starts, layout.total], dtype=np.int64))
        self._spans = [(a, b) for _, a, b, _ in layout.spans()]
        if self.torch:
            self._reps_dev = self.t.from_numpy(self._reps).to(self.device)

    def _tensor_sums(self, x: Any, square: bool = False) -> np.ndarray:
        """Σ x (or Σ x², ``square``) over each tensor's span of the flat ``x``, in float64,
        as a NumPy array. On the host, a reduction per tensor's view: 10M elements in 200
        tensors took ~10 ms (torch) / ~27 ms (NumPy), where adding each element into its
        tensor's slot by index (``index_add_`` / ``bincount``, with an index per element)
        took ~240 / ~100 ms. On an accelerator, that one kernel (a launch per tensor instead
        is the host's time; not measured on a GPU yet)."""
        n = len(self._spans)
        if self.torch and self.device.type != "cpu":
            ids = self._per_element(np.arange(n))
            w = x.double() ** 2 if square else x.double()
            acc = self.t.zeros(n, dtype=self.t.float64, device=self.device)
            return acc.index_add_(0, ids, w).cpu().numpy()
        if self.torch:
            f64 = self.t.float64
            return self.t.stack([(x[a:b].double().square().sum() if square else
                                  x[a:b].sum(dtype=f64)) for a, b in self._spans]).numpy()
        return np.array([np.sum(np.square(x[a:b], dtype=np.float64) if square else
                                x[a:b], dtype=np.float64) for a, b in self._spans],
                        dtype=np.float64)

    def _per_element(self, values: Any) -> Any:
        """Per-tensor ``values`` (shape ``(..., tensors)``, NumPy or torch) as each element's
        value, shape ``(..., elements)`` (a gap after a tensor takes its value): on torch
        repeated on the device from the small array (one kernel, nothing of the
        parameters' size crosses from the host)."""
        if not self.torch:
            return np.repeat(values, self._reps, axis=-1)
        small = (values if isinstance(values, self.t.Tensor) else
                 self.t.from_numpy(np.ascontiguousarray(values)))
        return self.t.repeat_interleave(small.to(self.device), self._reps_dev, dim=-1,
                                        output_size=int(self.layout.total))

    def full(self, n: int, value: float, dtype: str | None = None) -> Any:
        """``n`` elements of ``value`` in ``dtype`` (a name; None: the parameters')."""
        if self.torch:
            dt = self.tdtype if dtype is None else getattr(self.t, dtype)
            return self.t.full((n,), value, dtype=dt, device=self.device)
        from ....backends.numpy_backend import numpy_dtype

        return np.full(n, value, dtype=numpy_dtype(dtype or self.layout.dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x) if self.jax else self.backend.to_numpy(x)

    def from_numpy(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """A buffer of ``a``'s values in ``dtype`` (None: the parameters')."""
        if self.jax:
            from ....backends.numpy_backend import numpy_dtype

            return np.array(a, dtype=numpy_dtype(dtype or self.layout.dtype))
        return self.backend.array(np.asarray(a), dtype or self.layout.dtype)

    def _flat(self, arrays: list) -> Any:
        if self.torch:
            return self.t.cat([a.detach().reshape(-1) for a in arrays])
        return np.concatenate([np.asarray(a).reshape(-1) for a in arrays])

    def readable(self, p: Any) -> Any:
        if self.jax:
            return np.asarray(p)
        return p.detach().resolve_neg().resolve_conj().to(self.device) if self.torch else p

    def _stored(self, names: tuple[str, ...], out: list[Any]) -> list[Any]:
        """The step's new values (params first, then ``names``' slots), a slot of its own
        dtype rounded to it (what is probed for inf/NaN and written: a float16 ``m`` past
        65504 is inf)."""
        own = self.slot_dtypes
        if not own:
            return list(out)
        if self.torch:
            cast = lambda x, d: x.to(getattr(self.t, d))  # noqa: E731
        else:
            from ....backends.numpy_backend import numpy_dtype

            cast = lambda x, d: np.asarray(x).astype(numpy_dtype(d))  # noqa: E731
        return [out[0], *(cast(x, own[s]) if s in own else x for s, x in zip(names, out[1:]))]

    def unaliased_copy(self, x: Any, flat: Any) -> Any:
        if self.torch:
            same = x.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
            return x.clone() if same else x
        return np.array(x) if np.may_share_memory(x, flat) else x

    def step(self, opt: Any, state: Any, params: Any, grads: Any, t: int,
             prepared: Any = None, ours: bool = False) -> tuple[dict, bool, float | None, bool]:
        with np.errstate(all="ignore"):  # inf/NaN are found and reported by the policy
            return self._step(opt, state, params, grads, t, ours)

    def _step(self, opt: Any, state: Any, params: Any, grads: Any, t: int,
              ours: bool) -> tuple[dict, bool, float | None, bool]:
        lay = self.layout
        zeros = self.full
        g = self._flat([grads[n] if n in grads else zeros(int(s), 0.0)
                        for n, s in zip(lay.names, lay.sizes)])
        # the norm is cheap next to the unfused update below; reported in every policy
        norm = math.sqrt(float((g.double() ** 2).sum()) if self.torch
                         else float(np.sum(np.square(g, dtype=np.float64))))
        if must_skip(opt, norm, grads, self.to_numpy):
            return dict(params), False, norm, True
        copies = [] if ours else self.read_params(params, state.param_views or {}, state.params_flat)
        # the step is computed into new arrays before anything is written (the flat
        # parameters of a first step are a concatenation, not yet the state's buffer)
        P = state.params_flat if state.params_flat is not None else zeros(lay.total, 0.0)
        if copies:
            P = P.clone() if self.torch else P.copy()
            for n, x in copies:
                a, b = self._span(n)
                P[a:b] = x.reshape(-1)
        if tensor_clipping(opt, state):
            table, index, clip, _ = clipped_table(opt, state, t, self._tensor_sums(g, True))
        else:
            table, index, clip = scalar_table(opt, state, t, norm)
        g_raw = g
        g, cols = self._prologue(g_raw, P, table, index, clip)
        if opt.two_pass():
            table, index = self._first_pass(opt, state, t, P, g, cols, table, index, grads)
            g, cols = self._prologue(g_raw, P, table, index, clip)
        keep, scal = self._keep(table, index, cols[3]), cols[4:]
        names = opt.full_slot_names()
        olds = [P, *(state.slots[s] for s in names)]
        out = self._stored(names, opt.full_kernel_math(len(scal))(times_keep(P, keep), g,
                                                                   *olds[1:], *scal))
        present = None
        if len(grads) != len(lay.names):  # leave parameters without gradient untouched
            present = self._per_element(np.array([n in grads for n in lay.names]))
        if present is not None:
            n_avg = len(names) - len(opt.slot_names())
            if n_avg:  # averages move towards parameters without a gradient too
                olds_or_avg = [*olds[:len(olds) - n_avg],
                               *(average(P, a, w) for a, w in zip(olds[len(olds) - n_avg:],
                                                                   scal[len(scal) - n_avg:]))]
            else:
                olds_or_avg = olds
            out = [self.t.where(present, new, old) if self.torch else np.where(present, new, old)
                   for new, old in zip(out, olds_or_avg)]
        finite = True
        if opt.nonfinite != "unchecked":
            isfinite = self.t.isfinite if self.torch else np.isfinite
            bad = ~all_finite(isfinite, list(out))  # per element
            finite = not bool(bad.any())
        if not finite and is_finite(norm) and refuses(opt):
            if opt.nonfinite == "raise":
                raise nonfinite_result_error(opt, [n for n, a, b, _ in lay.spans()
                                                   if bool(bad[a:b].any())])
            return dict(params), False, norm, False
        if state.params_flat is None:
            state.params_flat = zeros(lay.total, 0.0)
            state.param_views = lay.unflatten(state.params_flat)
        for dst, new in zip([state.params_flat, *(state.slots[s] for s in names)], out):
            dst[...] = new
        if self.jax:  # (copies, JaxBackend.array's own: the host buffer is written again by
            # the next update, and an aligned view would be aliased)
            return ({n: self.backend.array(v, lay.dtype)
                     for n, v in state.param_views.items()}, True, norm, finite)
        return dict(state.param_views), True, norm, finite

    def _prologue(self, g: Any, P: Any, table: np.ndarray, index: np.ndarray, clip: bool
                  ) -> tuple[Any, list[Any]]:
        """The gradient as the math sees it (scaled, clipped, L2-decayed), and the table's
        columns."""
        cols = self._columns(table, index)
        gscale, cv, l2 = cols[0], cols[1], cols[2]
        g = g * gscale
        if clip:
            g = self.t.clamp(g, -cv, cv) if self.torch else np.clip(g, -cv, cv)
        return g + l2 * P, cols

    def _first_pass(self, opt: Any, state: Any, t: int, P: Any, g: Any, cols: list[Any],
                    table: np.ndarray, index: np.ndarray, grads: Any
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-tensor sums of ``opt.reduce`` (float64), then the second pass's table."""
        lay = self.layout
        n, k = len(lay.names), opt.reductions
        sums = np.zeros((n, k), dtype=np.float64)
        if k:
            own = opt.slot_names()
            n_own = len(cols) - 4 - (len(opt.full_slot_names()) - len(own))
            terms = opt.reduce_math()(times_keep(P, self._keep(table, index, cols[3])), g,
                                      *(state.slots[s] for s in own),
                                      *cols[4:4 + n_own])
            for j, term in enumerate(terms):
                sums[:, j] = self._tensor_sums(term)
        present = np.array([name in grads for name in lay.names], dtype=bool)
        sums[~present] = 0.0  # a tensor without a gradient counts for nothing (as numba's)
        return two_pass_table(opt, state, t, table, index, sums, present)

    def _keep(self, table: np.ndarray, index: np.ndarray, keep: Any) -> Any:
        """The decoupled decay's keep factor ``keep`` (column 3), per element in float32
        where :meth:`_columns` rounded it to half precision (several groups)."""
        if isinstance(keep, float) or self.layout.dtype not in ("float16", "bfloat16"):
            return keep
        return self._per_element(table[index][:, 3].astype(np.float32))

    def _columns(self, table: np.ndarray, index: np.ndarray) -> list[Any]:
        """Each scalar of the table: a Python float with one parameter group, else an array
        of each element's value (the unfused path: one more array per scalar), made from
        each tensor's row (:meth:`_per_element`)."""
        if table.shape[0] == 1:
            return [float(x) for x in table[0]]
        rows = table[index].T  # (scalars, tensors)
        if self.torch:  # (torch rounds to its own dtype: NumPy has no bfloat16 for it)
            return list(self._per_element(
                self.t.from_numpy(np.ascontiguousarray(rows)).to(self.tdtype)).unbind(0))
        from ....backends.numpy_backend import numpy_dtype

        with np.errstate(over="ignore"):
            return list(self._per_element(rows.astype(numpy_dtype(self.layout.dtype))))

    def _span(self, name: str) -> tuple[int, int]:
        lay = self.layout
        i = lay.index[name]
        a = int(lay.offsets[i])
        return a, a + int(lay.sizes[i])
