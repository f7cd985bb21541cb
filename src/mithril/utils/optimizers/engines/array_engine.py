"""The optimizer math with plain array ops on flat buffers.

Used where no fused kernel applies: torch on GPU (each op is one device kernel over the
flat buffer, so per-tensor launch cost still vanishes) and float16/bfloat16 parameters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .common import Engine, must_skip, prologue


class ArrayEngine(Engine):
    def __init__(self, backend: Any, layout: Any) -> None:
        self.backend, self.layout = backend, layout
        self.torch = backend.name == "torch"
        if self.torch:
            import torch

            self.t = torch
            self.tdtype = getattr(torch, layout.dtype)
            self.device = backend.device
            self.array_type, self.native_dtype = torch.Tensor, self.tdtype
        else:
            from ....backends.numpy_backend import numpy_dtype

            self.array_type, self.native_dtype = np.ndarray, np.dtype(numpy_dtype(layout.dtype))

    def full(self, n: int, value: float) -> Any:
        if self.torch:
            return self.t.full((n,), value, dtype=self.tdtype, device=self.device)
        from ....backends.numpy_backend import numpy_dtype

        return np.full(n, value, dtype=numpy_dtype(self.layout.dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.backend.to_numpy(x)

    def from_numpy(self, a: np.ndarray) -> Any:
        return self.backend.array(np.asarray(a), self.layout.dtype)

    def _flat(self, arrays: list) -> Any:
        if self.torch:
            return self.t.cat([a.detach().reshape(-1) for a in arrays])
        return np.concatenate([a.reshape(-1) for a in arrays])

    def readable(self, p: Any) -> Any:
        return p.detach().resolve_neg().resolve_conj().to(self.device) if self.torch else p

    def unaliased_copy(self, x: Any, flat: Any) -> Any:
        if self.torch:
            same = x.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
            return x.clone() if same else x
        return np.array(x) if np.may_share_memory(x, flat) else x

    def step(self, opt: Any, state: Any, params: Any, grads: Any, t: int,
             prepared: Any = None, ours: bool = False) -> tuple[dict, bool, float | None]:
        lay = self.layout
        zeros = self.full
        g = self._flat([grads[n] if n in grads else zeros(int(s), 0.0)
                        for n, s in zip(lay.names, lay.sizes)])
        # the norm is cheap next to the unfused update below; reported in every policy
        norm = math.sqrt(float((g.double() ** 2).sum()) if self.torch
                         else float(np.sum(np.square(g, dtype=np.float64))))
        if must_skip(opt, norm, grads, self.to_numpy):
            return dict(params), False, norm
        copies = [] if ours else self.read_params(params, state.param_views or {}, state.params_flat)
        if state.params_flat is None:
            state.params_flat = zeros(lay.total, 0.0)
            state.param_views = lay.unflatten(state.params_flat)
        views = state.param_views
        for n, x in copies:
            views[n][...] = x
        P = state.params_flat
        scal = opt.scalars(t)
        gscale, cv, l2, keep = prologue(opt, norm, scal[0])
        g = g * gscale
        if cv:
            g = g.clamp(-cv, cv) if self.torch else np.clip(g, -cv, cv)
        g = g + l2 * P
        out = opt.kernel_math()(P * keep, g, *(state.slots[s] for s in opt.slot_names()), *scal)
        present = None
        if len(grads) != len(lay.names):  # leave parameters without gradient untouched
            present = np.zeros(lay.total, dtype=bool)
            for n, a, b, _ in lay.spans():
                present[a:b] = n in grads
            if self.torch:
                present = self.t.from_numpy(present).to(self.device)
        for dst, new in zip([P, *(state.slots[s] for s in opt.slot_names())], out):
            if present is not None:
                new = self.t.where(present, new, dst) if self.torch else np.where(present, new, dst)
            dst[...] = new
        return dict(views), True, norm
