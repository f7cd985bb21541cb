"""Fused numba kernels for NumPy arrays and CPU torch tensors.

Parameters and slots live in flat buffers; gradients are read where they lie through a
table of their addresses, so one parallel loop touches each byte once (28 bytes per
parameter for an fp32 Adam step) however many tensors there are. The kernel is generated
once per (math, dtype) from the optimizer's elementwise ``math``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import is_finite, needs_norm, nonfinite_error, prologue

# Vectorising flags, but not nnan/ninf: NaN/inf must still propagate and be detected.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def _voidptr(typingctx, addr):  # pragma: no cover - compiled by numba
    """An integer address as a void pointer (to view a gradient buffer with carray)."""
    if isinstance(addr, types.Integer):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(addr), codegen
    return None


_KERNEL_SRC = """
def kernel(P, {slots}gptr, ctensor, clo, chi, toff, tsize, gscale, cv, l2, keep{scal}):
    for c in prange(ctensor.shape[0]):
        t = ctensor[c]
        if gptr[t] == 0:
            continue
        G = carray(voidptr(gptr[t]), (tsize[t],), DTYPE)
        base = toff[t]
        for j in range(clo[c], chi[c]):
            i = base + j
            g = G[j] * gscale
            if cv > 0:
                g = min(max(g, -cv), cv)
            p = P[i]
            g = g + l2 * p
            p = p * keep
            {lhs} = MATH(p, g, {reads}{scal_args})
            P[i] = p
{writes}
"""


@functools.lru_cache(maxsize=None)
def update_kernel(math_fn: Any, n_slots: int, n_scal: int, dtype: str) -> Any:
    """The fused update loop for ``math_fn`` with ``n_slots`` slots and ``n_scal`` scalars."""
    slots = [f"S{k}" for k in range(n_slots)]
    src = _KERNEL_SRC.format(
        slots="".join(s + ", " for s in slots),
        scal="".join(f", h{k}" for k in range(n_scal)),
        lhs="p, " + ", ".join(f"s{k}" for k in range(n_slots)),
        reads="".join(f"{s}[i], " for s in slots),
        scal_args=", ".join(f"h{k}" for k in range(n_scal)),
        writes="\n".join(f"            {s}[i] = s{k}" for k, s in enumerate(slots)),
    )
    ns = {"prange": numba.prange, "carray": numba.carray, "voidptr": _voidptr,
          "DTYPE": np.dtype(dtype).type, "MATH": numba.njit(inline="always")(math_fn)}
    exec(compile(src, f"<mithril kernel {getattr(math_fn, '__qualname__', math_fn)}>", "exec"), ns)
    return numba.njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", nogil=True)(ns["kernel"])


@functools.lru_cache(maxsize=None)
def sumsq_kernel(dtype: str) -> Any:
    dt = np.dtype(dtype).type

    @numba.njit(parallel=True, fastmath={"reassoc", "contract"}, nogil=True)
    def sumsq(gptr, ctensor, clo, chi, tsize):  # pragma: no cover - compiled by numba
        acc = 0.0
        for c in numba.prange(ctensor.shape[0]):
            t = ctensor[c]
            s = 0.0
            if gptr[t] != 0:
                G = numba.carray(_voidptr(gptr[t]), (tsize[t],), dt)
                for j in range(clo[c], chi[c]):
                    x = np.float64(G[j])
                    s += x * x
            acc += s
        return acc

    return sumsq


class NumbaEngine:
    """Executes built-in optimizers on NumPy arrays or CPU torch tensors (fp32/fp64)."""

    def __init__(self, backend: Any, layout: Any) -> None:
        self.backend, self.layout = backend, layout
        self.torch = backend.name == "torch"
        if self.torch:
            import torch

            self._torch = torch
            self._tdtype = getattr(torch, layout.dtype)

    # -- buffers ---------------------------------------------------------------------
    def full(self, n: int, value: float) -> Any:
        if self.torch:
            return self._torch.full((n,), value, dtype=self._tdtype)
        return np.full(n, value, dtype=self.layout.dtype)

    def np_view(self, x: Any) -> np.ndarray:
        return x.numpy() if self.torch else x

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if self.torch else np.asarray(x)

    def from_numpy(self, a: np.ndarray) -> Any:
        a = np.ascontiguousarray(a, dtype=self.layout.dtype)
        return self._torch.from_numpy(a.copy()) if self.torch else a.copy()

    def _address(self, g: Any, keep: list) -> int:
        if self.torch:
            if g.requires_grad or not g.is_contiguous():
                g = g.detach().contiguous()
                keep.append(g)
            return g.data_ptr()
        if not g.flags.c_contiguous:
            g = np.ascontiguousarray(g)
            keep.append(g)
        return g.ctypes.data

    # -- one step --------------------------------------------------------------------
    def step(self, opt: Any, state: Any, params: Any, grads: Any, t: int) -> tuple[dict, bool, float | None]:
        lay = self.layout
        keep: list = []
        gptr = np.zeros(len(lay.names), dtype=np.int64)
        index = lay.index
        for name, g in grads.items():
            gptr[index[name]] = self._address(g, keep)
        norm = None
        if needs_norm(opt):
            norm = math.sqrt(sumsq_kernel(lay.dtype)(gptr, lay.chunk_tensor, lay.chunk_lo,
                                                     lay.chunk_hi, lay.sizes))
            if not is_finite(norm):
                if opt.nonfinite == "raise":
                    bad = [n for n, g in grads.items() if not np.isfinite(self.to_numpy(g)).all()]
                    raise nonfinite_error(opt, bad, norm)
                if opt.nonfinite == "skip":
                    return dict(params), False, norm
        views = self._adopt(state, params)
        scal = opt.scalars(t)
        pro = prologue(opt, norm, scal[0])
        dt = np.dtype(lay.dtype).type
        kernel = update_kernel(opt.kernel_math(), len(state.slots), len(scal), lay.dtype)
        kernel(self.np_view(state.params_flat), *(self.np_view(state.slots[s]) for s in opt.slot_names()),
               gptr, lay.chunk_tensor, lay.chunk_lo, lay.chunk_hi, lay.offsets, lay.sizes,
               *(dt(x) for x in pro), *(dt(x) for x in scal))
        return dict(views), True, norm

    def _adopt(self, state: Any, params: Any) -> dict[str, Any]:
        """Make sure the flat parameter buffer holds ``params``; returns its views."""
        if state.params_flat is None:
            state.params_flat = self.full(self.layout.total, 0.0)
            state.param_views = self.layout.unflatten(state.params_flat)
        views = state.param_views
        vals = views.values()
        if not all(map(_is, params.values(), vals)) or list(params) != list(views):
            for name, p in params.items():
                v = views[name]
                if p is not v:
                    if self.torch:
                        v.copy_(p.detach())
                    else:
                        v[...] = p
        return views


def _is(a: Any, b: Any) -> bool:
    return a is b
