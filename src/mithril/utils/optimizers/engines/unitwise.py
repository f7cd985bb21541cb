"""Adaptive gradient clipping (optax ``adaptive_grad_clip``) fused into the numba engine.

Each unit ``u`` of a gradient (:func:`..clipping.units`: in C order, element ``j`` of a
tensor with ``U`` units belongs to unit ``j mod U``) is scaled by
``f_u = c·max(‖p_u‖, ε) / max(‖g_u‖, 1e-6)`` where ``‖g_u‖ ≥ c·max(‖p_u‖, ε)``, else 1.

A read-only first pass (:func:`unit_sums_kernel`) sums ``g²`` and ``p²`` per unit, per
segment of the :class:`~.threads.Plan` (each segment into its own part of one float64
buffer, so threads never share an accumulator, and the parts are added in segment order:
the result does not depend on the thread count). The factors of a tensor with one unit fold
into its row of the scalar table; the others are read by the update kernel's ``unitwise``
variant, one factor per element, in the same single update pass. No gradient is copied.
"""

from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np

from . import atomics, vector_width
from .kernels import voidptr


class UnitPlan:
    """Where each segment's per-unit sums go, for a layout and each tensor's unit count
    (``units[t] = 0``: the tensor is not clipped; it still has one sum, its Σ g²)."""

    def __init__(self, plan: Any, units: np.ndarray) -> None:
        self.units = units
        u = np.maximum(units, 1)
        length = np.minimum(u[plan.seg_t], plan.seg_size)  # a segment's units (some rows)
        self.seg_soff = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
        self.size = int(length.sum())
        # the unit (numbered across tensors) of each sum: the segment's first element is in
        # unit seg_first mod U, and its k-th sum is unit (seg_first + k) mod U
        self.ubase = np.concatenate([[0], np.cumsum(u)[:-1]]).astype(np.int64)
        seg = np.repeat(np.arange(len(length)), length)
        k = np.arange(self.size) - self.seg_soff[seg]
        t = plan.seg_t[seg]
        self.unit_of = self.ubase[t] + (plan.seg_first[seg] + k) % u[t]
        self.n_units = int(u.sum())
        self.tensor_of_unit = np.repeat(np.arange(len(u)), u)
        self.unit_units = np.repeat(units, u)  # per unit: its tensor's units (0: not clipped)


def factors(up: UnitPlan, UG: np.ndarray, UP: np.ndarray, clip: np.ndarray, eps: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the clipping factor (1 where a tensor is not clipped), and per tensor
    Σ (f·g)² of the clipped gradient, from the per-segment sums ``UG`` (g²) and ``UP`` (p²).
    ``clip``/``eps``: each tensor's ``c`` (0: not clipped) and ``ε``."""
    return _factors(up.unit_of, UG, UP, up.tensor_of_unit, clip, eps, len(up.units))


@numba.njit(nogil=True, error_model="numpy")
def _factors(unit_of, UG, UP, tensor_of_unit, clip, eps, n_tensors):  # pragma: no cover
    n_units = tensor_of_unit.shape[0]
    sg, sp = np.zeros(n_units), np.zeros(n_units)
    for k in range(unit_of.shape[0]):  # the segments' sums, in segment order
        sg[unit_of[k]] += UG[k]
        sp[unit_of[k]] += UP[k]
    f, sumsq = np.ones(n_units), np.zeros(n_tensors)
    for u in range(n_units):
        t = tensor_of_unit[u]
        c = clip[t]
        if c > 0:
            g_norm = np.sqrt(sg[u])
            bound = max(np.sqrt(sp[u]), eps[t]) * c
            if not g_norm < bound:  # (NaN too: it propagates, as in optax)
                f[u] = bound / (g_norm if g_norm > 1e-6 or g_norm != g_norm else 1e-6)
        sumsq[t] += sg[u] * f[u] * f[u]
    return f, sumsq


@functools.cache
def unit_sums_kernel(dtype: str) -> Any:
    """Per segment, the float64 sums of g² and p² of each of its units into
    ``UG``/``UP[seg_soff[e]:]`` (a tensor with ``units[t] <= 1``: one sum each). Reads only."""
    dt, itemsize = np.dtype(dtype).type, np.dtype(dtype).itemsize
    jit = vector_width.njit(fastmath={"reassoc", "contract"}, nogil=True)

    @jit
    def rows(G, P, SG, SP, U):  # pragma: no cover - compiled by numba
        # sum k of the segment is its elements k, k + U, k + 2U, ...: row by row, each row
        # a vectorised loop over contiguous units (slices: indices from 0, never negative)
        n = G.shape[0]
        j0 = 0
        while j0 < n:
            m = min(U, n - j0)
            Gr, Pr = G[j0:j0 + m], P[j0:j0 + m]
            for i in range(m):
                x = np.float64(Gr[i])
                y = np.float64(Pr[i])
                SG[i] += x * x
                SP[i] += y * y
            j0 += m

    @jit
    def one(G, P):  # pragma: no cover - compiled by numba
        s, q = 0.0, 0.0
        for j in range(G.shape[0]):
            x = np.float64(G[j])
            y = np.float64(P[j])
            s += x * x
            q += y * y
        return s, q

    @jit
    def kernel(P, gptr, seg_t, seg_first, seg_off, seg_size, bounds, sync, acc, spins,
               units, soff, UG, UP):  # pragma: no cover - compiled by numba
        pieces = bounds.shape[0] - 1
        slot = atomics.arrive(sync)  # this thread's range of pieces (:mod:`.atomics`)
        k = atomics.claim(sync, slot)
        while k < pieces:
            for e in range(bounds[k], bounds[k + 1]):
                t = seg_t[e]
                base = gptr[t]
                if base == 0:
                    continue
                a, n, o = seg_off[e], seg_size[e], soff[e]
                G = numba.carray(voidptr(base + seg_first[e] * itemsize), (n,), dt)
                if units[t] <= 1:
                    UG[o], UP[o] = one(G, P[a:a + n])
                else:
                    L = min(units[t], n)
                    rows(G, P[a:a + n], UG[o:o + L], UP[o:o + L], units[t])
            acc[k] = 0.0
            atomics.piece_done(sync)
            k = atomics.claim(sync, slot)
        return atomics.all_done(sync, pieces, spins)

    return kernel
