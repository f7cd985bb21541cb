"""The fused SM3 step (:class:`~mithril.utils.optimizers.SM3`) that the
:class:`~.numba_engine.NumbaEngine` runs: one numba kernel over every tensor, one pass
over each tensor's p, g and m.

Each tensor is one piece of work (claimed largest first, as :mod:`.factored_kernels`),
done whole by the thread that claims it: the results do not depend on the thread count.
Gradients are read where they lie (a table of addresses). Per element, with ``x`` the
scaled, clipped gradient (plus ``wd·p``, the coupled decay)::

    ν = c·x² + β₂·mn        mn: μ itself (rank < 2), else the least of the element's μᵢ
    u = x / √(ν + ε) where ν > 0, else 0;   m ← (1 − β₁)·u + β₁·m;   p ← p − lr·m

A tensor goes a block at a time (:data:`BLOCK` elements, whole rows of its last axis):
for rank ≥ 2 the least μ of each element is gathered first, then the elementwise math
runs over the block (vectorised: rows are often short), then ν's maxima are taken (the
last axis's elementwise over rows, the others from each row's max). The new
accumulators are built in a scratch copy of the ``mu`` buffer while the old ones are
read, and copied over the tensor's ``mu`` once its pass ends. The elementwise math is the
per-tensor path's (:meth:`.SM3.tensor_update` on NumPy) operation by operation, with no
fastmath flags (no FMA, no reassociation): the same bits. Only the Σ g² of a block
(float64, the norm) is summed in any order. Nothing is written in ``dry`` mode: the new
values are only probed for inf/NaN (the largest exponent field,
:func:`.kernels.exponent_bits`), which the ``skip``/``raise`` policies run first.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numba
import numpy as np

from ..averaging import row_counts
from . import atomics, kernel_cache, threads
from .kernels import exponent_bits, voidptr
from .tensor_norms import clip_scales, dry_run_verdict
from .tensorwise_parts import average_parts, layout_geometry
from .workers import share

#: the largest rank the kernel takes (a state with a larger one runs the per-tensor path)
MAX_RANK = 8
#: columns of the int64 geometry table (one row per tensor): offset in the flat parameter
#: buffer, size, rank, offset in the ``mu`` buffer, then the shape (``MAX_RANK`` columns)
OFF, SIZE, RANK, MOFF, DIMS = range(5)
#: columns of the scalar table (one row per tensor, in the parameters' dtype): gradient
#: scale (clipping), clip value (inf: none), coupled weight decay, lr, c (of x²), β₂, ε,
#: 1 − β₁, β₁, then the averaging weights
GS, CV, WD, LR, C, B2, EPS, C1, B1, AVG = range(10)
#: elements per block (whole rows of the last axis where longer): the elementwise math
#: runs over a block, whose Σ g² is summed while it is in cache
BLOCK = 2048


def geometry(shapes: list[tuple[int, ...]], offsets: Any, mu_offsets: Any) -> np.ndarray:
    """The geometry table of tensors of ``shapes`` (see :data:`OFF`); ranks ≤ MAX_RANK."""
    geo = np.zeros((len(shapes), DIMS + MAX_RANK), dtype=np.int64)
    for i, shape in enumerate(shapes):
        geo[i, :DIMS] = (offsets[i], int(np.prod(shape, dtype=np.int64)), len(shape),
                         mu_offsets[i])
        geo[i, DIMS:DIMS + len(shape)] = shape
    return geo


@functools.cache
def sm3_parts(dtype: str, dry: bool, copy: bool, clip: bool, n_avg: int) -> dict[str, Any]:
    """The per-tensor functions of :func:`sm3_kernel` (``vector``, ``axes``, ``no_grad``),
    which the one-program JAX step's handler calls too (:mod:`.xla_ffi_tensorwise`).
    Options as :func:`sm3_kernel`'s."""
    DT = np.dtype(dtype).type
    wide = np.dtype(dtype).itemsize == 8
    IT = np.int64 if wide else np.int32
    UT = np.uint64 if wide else np.uint32
    INF_BITS = UT(0x7FF0000000000000) if wide else UT(0x7F800000)
    one, zero = DT(1.0), DT(0.0)
    U = np.uint64  # unsigned indices: no wraparound test, so that the loops vectorise
    jit = kernel_cache.jit(error_model="numpy", nogil=True)  # IEEE ops, as NumPy's
    inline = numba.njit(inline="always", error_model="numpy", nogil=True)
    averaged, no_grad = average_parts(IT, copy, dry, n_avg, jit, inline)

    @inline
    def least(a, b):  # pragma: no cover - np.minimum: NaN if either is
        return a if (a != a or a <= b) else b

    @inline
    def most(a, b):  # pragma: no cover - np.maximum: NaN if either is
        return a if (a != a or a >= b) else b

    @inline
    def element(p, g, m, mn, gs, cv, wd, lr, c, b2, eps, c1, b1):  # pragma: no cover
        """SM3.tensor_update's math, operation by operation: (p, m, ν)."""
        x = g * gs
        if clip:
            x = -cv if x < -cv else x
            x = cv if x > cv else x
        if wd != 0:
            x = x + wd * p
        acc = c * (x * x) + b2 * mn
        pos = acc > 0
        inv = one / np.sqrt((acc if pos else one) + eps)
        m = c1 * (x * (inv if pos else zero)) + b1 * m
        return p - lr * m, m, acc

    @kernel_cache.jit(fastmath={"reassoc", "contract"}, nogil=True)
    def sumsq(G, a, b):  # pragma: no cover - Σ g² (float64, any order)
        s = 0.0
        for i in range(a, b):
            gd = np.float64(G[U(i)])
            s += gd * gd
        return s

    @jit
    def nan_max(vals, a, n):  # pragma: no cover
        """max(vals[a:a + n]) as np.amax, NaN first (a row with a NaN or a negative value)."""
        v = vals[a]
        for j in range(1, n):
            v = most(v, vals[a + j])
        return v

    @jit
    def block(P, Q, G, M, MN, ACC, A0, A1, o, n, hd, a0, a1):  # pragma: no cover
        """Elements ``o … o + n`` of a tensor, ``MN[k]`` the least of element ``o + k``'s
        accumulators (μ itself for rank < 2): its ν into ``ACC[k]``; p, m and the averages
        written (not in ``dry`` mode); the probe of every new value but ν."""
        gs, cv, wd, lr, c, b2, eps, c1, b1 = hd[GS], hd[CV], hd[WD], hd[LR], hd[C], hd[B2], \
            hd[EPS], hd[C1], hd[B1]
        z = IT(0)
        for k in range(n):
            e, kk = U(o + k), U(k)
            p, m, acc = element(P[e], G[e], M[e], MN[kk], gs, cv, wd, lr, c, b2, eps, c1, b1)
            ACC[kk] = acc
            z = IT(max(z, max(exponent_bits(p), exponent_bits(m))))
            if not dry:
                M[e] = m
                if copy:
                    Q[e] = p
                else:
                    P[e] = p
            if n_avg > 0:
                v0, v1, za = averaged(p, A0[e], A1[e] if n_avg > 1 else p, a0, a1)
                z = IT(max(z, za))
                if not dry:
                    A0[e] = v0
                    if n_avg > 1:
                        A1[e] = v1
        return z

    @jit
    def vector(P, Q, G, M, MU, A0, A1, acc, hd, a0, a1):  # pragma: no cover
        """A tensor of rank 0 or 1 (μ = ν, elementwise), a block at a time: (Σ g², probe)."""
        n, gsq, z = G.shape[0], 0.0, IT(0)
        for a in range(0, n, BLOCK):
            b = min(a + BLOCK, n)
            gsq += sumsq(G, a, b)
            z = IT(max(z, block(P, Q, G, M, MU[a:b], acc, A0, A1, a, b - a, hd, a0, a1)))
            for k in range(b - a):  # ν is the new μ
                z = IT(max(z, exponent_bits(acc[k])))
                if not dry:
                    MU[a + k] = acc[k]
        return gsq, z

    @jit
    def axes(P, Q, G, M, MU, MUn, A0, A1, dims, rank, mn, acc, accb, cell, cellb, hd, a0, a1
             ):  # pragma: no cover
        """A tensor of rank ≥ 2 (``MU``: its accumulators, concatenated; ``MUn``: their
        new values, built here), whole rows (of the last axis) at a time: (Σ g², probe).
        The least μ of each element is gathered first (``mn``), so that the elementwise
        math runs over a block, not a row (rows are often short)."""
        inner = dims[rank - 1]
        last = MU.shape[0] - inner  # the last axis's μ
        idx = np.zeros(rank, dtype=np.int64)  # the leading axes' index of the row: filled
        jdx = np.zeros(rank, dtype=np.int64)  # ... and reduced
        start = np.zeros(rank, dtype=np.int64)
        for k in range(1, rank):
            start[k] = start[k - 1] + dims[k - 1]
        for k in range(MU.shape[0]):
            MUn[k] = -np.inf
        gsq, z = 0.0, IT(0)
        rows, per = G.shape[0] // inner, max(1, BLOCK // inner)
        for r0 in range(0, rows, per):
            nr = min(per, rows - r0)
            for r in range(nr):
                mo = MU[idx[0]]  # the least μ of the leading axes at this row
                for k in range(1, rank - 1):
                    mo = least(mo, MU[start[k] + idx[k]])
                for j in range(inner):
                    mn[U(r * inner + j)] = least(mo, MU[U(last + j)])
                k = rank - 2  # the odometer
                idx[k] += 1
                while k > 0 and idx[k] == dims[k]:
                    idx[k] = 0
                    k -= 1
                    idx[k] += 1
            o = r0 * inner
            gsq += sumsq(G, o, o + nr * inner)
            z = IT(max(z, block(P, Q, G, M, mn, acc, A0, A1, o, nr * inner, hd, a0, a1)))
            for r in range(nr):
                rb = UT(0)  # the row's max: its bits' unsigned max, exact for values ≥ +0
                for j in range(inner):
                    q, lj = U(r * inner + j), U(last + j)
                    MUn[lj] = most(MUn[lj], acc[q])
                    b = accb[q]
                    rb = b if b > rb else rb
                cellb[0] = rb  # (read back as a float)
                v = cell[0] if rb <= INF_BITS else nan_max(acc, r * inner, inner)
                for k in range(rank - 1):
                    MUn[start[k] + jdx[k]] = most(MUn[start[k] + jdx[k]], v)
                k = rank - 2
                jdx[k] += 1
                while k > 0 and jdx[k] == dims[k]:
                    jdx[k] = 0
                    k -= 1
                    jdx[k] += 1
        for k in range(MU.shape[0]):
            z = IT(max(z, exponent_bits(MUn[k])))
            if not dry:
                MU[k] = MUn[k]
        return gsq, z

    @inline
    def scratch(work):  # pragma: no cover
        """A thread's scratch (``2 w + 1`` values: :func:`scratch_size`) as the blocks
        ``axes`` takes: the least μ, ν (and its bits), a cell (and its bits)."""
        w = (work.shape[0] - 1) // 2
        bits = work.view(UT)
        return work[:w], work[w:2 * w], bits[w:2 * w], work[2 * w:], bits[2 * w:]

    return {"vector": vector, "axes": axes, "no_grad": no_grad, "scratch": scratch}


def scratch_size(ranks: Any, inner: Any) -> int:  # pragma: no cover - numba's too
    """The values of a thread's scratch for tensors of ``ranks`` whose last axes are
    ``inner`` long: two blocks of at least :data:`BLOCK` (or the longest last axis of a
    tensor of rank ≥ 2) and a cell."""
    w = BLOCK
    for k in range(len(ranks)):
        if ranks[k] >= 2 and inner[k] > w:
            w = inner[k]
    return 2 * w + 1


@functools.cache
def sm3_kernel(dtype: str, dry: bool, copy: bool, clip: bool, n_avg: int) -> Any:
    """The kernel for ``dtype``; ``dry``: probe only; ``copy``: parameters are read from
    ``P`` and written to ``Q`` (JAX's double buffer; else in place); ``clip``: clipping
    by value compiled in; ``n_avg``: how many weight averages (``A0``, ``A1``) move."""
    parts = sm3_parts(dtype, dry, copy, clip, n_avg)
    vector, axes, no_grad = parts["vector"], parts["axes"], parts["no_grad"]
    DT = np.dtype(dtype).type
    EXP = np.int64(0x7FF0000000000000) if np.dtype(dtype).itemsize == 8 else \
        np.int32(0x7F800000)
    views = parts["scratch"]
    jit = kernel_cache.jit(error_model="numpy", nogil=True)

    @jit
    def kernel(P, Q, M, MU, MUn, A0, A1, gptr, geo, Hd, order, work, out, bad, sync, spins
               ):  # pragma: no cover
        """Claim tensors (in ``order``) until none is left; ``out[t]``: Σ g² of tensor
        ``t``'s raw gradient, ``bad[t]``: one of its new values is inf/NaN. ``work``: this
        thread's scratch, two blocks (the least μ, ν) and a cell."""
        n = order.shape[0]
        mn, acc, accb, cell, cellb = views(work)
        slot = atomics.arrive(sync)
        k = atomics.claim(sync, slot)
        while k < n:
            t = order[k]
            a, size, rank, mo = geo[t, OFF], geo[t, SIZE], geo[t, RANK], geo[t, MOFF]
            b = a + size
            hd = Hd[t]
            a0 = hd[AVG] if n_avg > 0 else hd[0]
            a1 = hd[AVG + 1] if n_avg > 1 else hd[0]
            base = gptr[t]
            if base == 0:
                z = no_grad(P[a:b], Q[a:b], A0[a:b], A1[a:b], a0, a1)
            elif rank < 2:
                G = numba.carray(voidptr(base), (size,), DT)
                out[t], z = vector(P[a:b], Q[a:b], G, M[a:b], MU[mo:mo + size], A0[a:b],
                                   A1[a:b], acc, hd, a0, a1)
            else:
                G = numba.carray(voidptr(base), (size,), DT)
                dims = geo[t, DIMS:DIMS + rank]
                nm = 0
                for d in range(rank):
                    nm += dims[d]
                out[t], z = axes(P[a:b], Q[a:b], G, M[a:b], MU[mo:mo + nm], MUn[mo:mo + nm],
                                 A0[a:b], A1[a:b], dims, rank, mn, acc, accb, cell, cellb,
                                 hd, a0, a1)
            bad[t] = z == EXP
            atomics.piece_done(sync)
            k = atomics.claim(sync, slot)
        return atomics.all_done(sync, n, spins)

    return kernel


def run(kernel: Any, args: tuple, gptr: np.ndarray, geo: np.ndarray, Hd: np.ndarray,
        order: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Run ``kernel`` on this thread and up to ``get_num_threads() - 1`` pool threads
    (each claims whole tensors, ``order`` first); returns ``out`` (per tensor: Σ g² of the
    raw gradient, float64) and ``bad`` (a new value is inf/NaN)."""
    n = len(order)
    out = np.zeros(len(geo), dtype=np.float64)
    bad = np.zeros(len(geo), dtype=np.bool_)
    sync = atomics.new_sync(n, 1)  # one queue: the largest tensors first
    ranks = geo[:, RANK]
    inner = geo[np.arange(len(geo)), DIMS + np.maximum(ranks - 1, 0)]
    workers = min(threads.get_num_threads(), n) - 1 if total >= threads.MIN_PARALLEL else 0
    w = scratch_size(ranks, inner)  # each thread its own scratch (see the kernel)
    job = lambda spins: kernel(*args, gptr, geo, Hd, order, np.empty(w, Hd.dtype),  # noqa: E731
                               out, bad, sync, spins)
    share(job, sync, n, workers, threads.SPINS)
    return out, bad


def _geometry(opt: Any, state: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The geometry table and the order tensors are claimed in (largest first, empty ones
    left out), cached per layout; None where a tensor's rank exceeds :data:`MAX_RANK`."""
    return layout_geometry(opt, state, "_sm3_geometry", lambda lay: None if any(
        len(s) > MAX_RANK for s in lay.shape_list) else geometry(
        lay.shape_list, lay.offsets, state.slot_layout("mu").offsets))


def _scalar_table(opt: Any, state: Any, t: int, scale: np.ndarray, n_avg: int
                  ) -> tuple[np.ndarray, bool]:
    """The kernel's per-tensor scalars in the parameters' dtype (columns: :data:`GS` ...;
    each rounded once from its float64 value, as NumPy rounds a Python float operand),
    and whether any tensor is clipped by value."""
    index, views = opt.group_rows(state)
    rows = []
    for v, c in zip(views, row_counts(opt, state, index, len(views))):
        full = v.full_scalars(t, state.values, c)
        b1, b2 = v.momentum, v.beta2
        rows.append((1.0, v.clip_value or np.inf, v.weight_decay, full[0],
                     1.0 if b2 == 1.0 else 1.0 - b2, b2, v.epsilon, 1 - b1, b1,
                     *full[1:1 + n_avg]))
    H = np.array(rows, dtype=np.float64)[index]
    H[:, GS] *= scale
    with np.errstate(over="ignore"):  # a scalar too large for the dtype: the probe tells
        return H.astype(state.layout.dtype), any(v.clip_value for v in views)


def fused_step(opt: Any, params: Any, gradients: Any, state: Any, prepared: Any, ours: bool
               ) -> tuple[dict[str, Any], bool, float, bool] | None:
    """:meth:`.SM3.fused_step`: (params to return, applied, global norm, finite), as the
    engines' ``step``; None where a tensor's rank exceeds :data:`MAX_RANK`. Nothing is
    written unless the step is applied."""
    found = _geometry(opt, state)
    if found is None:
        return None
    geo, order = found
    eng, lay, t = state.engine, state.layout, state.step + 1
    keep: list = []  # contiguous copies the kernel reads, alive until it returns
    gptr = prepared if prepared is not None else eng._pointers(gradients, keep)
    index, views = opt.group_rows(state)
    norm, scale, skip = clip_scales(opt, state, gptr, gradients, geo[:, SIZE], index, views)
    if skip:
        return dict(params), False, norm, True
    full = opt.full_slot_names()
    n_avg = len(full) - len(opt.slot_names())
    Hd, clip = _scalar_table(opt, state, t, scale, n_avg)
    view = eng.np_view
    MU, M = view(state.slots["mu"]), view(state.slots["m"])
    MUn = np.empty_like(MU)  # the new accumulators of rank ≥ 2 tensors, before they are kept
    none = np.empty(0, dtype=lay.dtype)
    A0, A1 = ([view(state.slots[s]) for s in full[len(opt.slots):]] + [none, none])[:2]
    tables = (gptr, geo, Hd, order, int(lay.sizes.sum()))
    if opt.nonfinite in ("skip", "raise"):  # computed once without being stored: then decide
        flat = eng._current(state, params, ours)
        dry = sm3_kernel(lay.dtype, True, False, clip, n_avg)
        out, bad = run(dry, (flat, flat, M, MU, MUn, A0, A1), *tables)
        norm, verdict = dry_run_verdict(opt, state, params, gradients, norm, out, bad)
        if verdict is not None:
            return verdict
    src, out_views = eng._adopt(state, params, ours)
    dst = state.params_flat
    gptr = eng._unaliased(gptr, gradients, keep, (dst, *state.slots.values()))
    kernel = sm3_kernel(lay.dtype, False, src is not dst, clip, n_avg)
    out, bad = run(kernel, (view(src), view(dst), M, MU, MUn, A0, A1), gptr, *tables[1:])
    if norm is None:
        norm = math.sqrt(float(out.sum()))
    return dict(out_views), True, norm, not bad.any()
