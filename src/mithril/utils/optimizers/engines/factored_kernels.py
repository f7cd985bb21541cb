"""The fused Adafactor step (:class:`~mithril.utils.optimizers.Adafactor`) that the
:class:`~.numba_engine.NumbaEngine` runs: one numba kernel over every tensor.

Each tensor is one piece of work (threads claim them as :mod:`.threads` does, largest
first), done whole by the thread that claims it, so the results do not depend on the
thread count. Gradients are read where they lie (a table of addresses, as
:mod:`.kernels`). Per tensor, with ``x`` the scaled, clipped (and for ``maximize``
negated) gradient:

* a matrix (the last two axes factored, per leading index): pass 1 reads p and g for
  ‖p‖², Σ g² and the row and column sums of x² (float64), and lerps the factors R, C;
  pass 2 reads g for ‖U‖², ``U = x / √max(R·C / max(mean R, eps1), eps1²)``; pass 3
  reads p and g and writes p. A tensor's p and g (200 kB each for 50k float32) stay in
  the core's cache between the passes, so memory sees one read of each and one write.
* anything else (full second moment V): pass 1 reads p, g, V (‖p‖², ‖U‖² from the new
  V, computed, not stored); pass 2 reads them again and writes p and V.

Nothing is written before a tensor's last pass, and in ``dry`` mode nothing at all: the
new values are only probed (the largest exponent field, :func:`.kernels.exponent_bits`),
which the ``skip``/``raise`` policies run first. Weight averages move in the last pass
(also for tensors without a gradient). float32 sums are accumulated in float64; the
elementwise math is in the parameters' dtype, as torch's.
"""

from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np

from . import atomics, kernel_cache, threads
from .kernels import exponent_bits, voidptr
from .tensorwise_parts import average_parts
from .workers import share

# Vectorising flags (reassoc: the float64 sums; contract: FMAs, as torch's lerp and add),
# but neither arcp nor afn (divisions and square roots rounded as torch's), nor nnan/ninf:
# NaN/inf must still propagate and be detected.
_FASTMATH = {"nsz", "contract", "reassoc"}

#: columns of the int64 geometry table (one row per tensor): its offset in the flat
#: parameter buffer, its size, leading-index count, rows and columns of the factored
#: axes (0: not factored), and its offsets in the row_var, col_var and variance buffers
OFF, SIZE, BATCH, ROWS, COLS, ROFF, COFF, VOFF = range(8)
#: columns of the scalar tables (one row per tensor; in float64, and in the dtype):
#: gradient scale (clipping × the sign of ``maximize``), clip value (inf: none), weight
#: decay keep factor, lerp weight w = 1 − β̂ and 1 − w, ρ, eps1, eps1², eps2, d, then the
#: averaging weights
GS, CV, KEEP, W, W1, RHO, EPS1, EPS1SQ, EPS2, D, AVG = range(11)


def geometry(shapes: list[tuple[int, ...]], offsets: Any, slot_offsets: dict[str, Any]
             ) -> np.ndarray:
    """The geometry table of tensors of ``shapes`` (see :data:`OFF`)."""
    geo = np.zeros((len(shapes), 8), dtype=np.int64)
    for i, shape in enumerate(shapes):
        size = int(np.prod(shape, dtype=np.int64))
        rows, cols = (shape[-2], shape[-1]) if len(shape) > 1 else (0, 0)
        batch = size // (rows * cols) if rows * cols else 0
        geo[i] = (offsets[i], size, batch, rows, cols, slot_offsets["row_var"][i],
                  slot_offsets["col_var"][i], slot_offsets["variance"][i])
    return geo


def exp_field(dtype: str) -> Any:
    """The exponent field of ``dtype`` (float32/float64) all ones: the probe's value where a
    new value is inf/NaN (:func:`.kernels.exponent_bits`)."""
    return np.int64(0x7FF0000000000000) if np.dtype(dtype).itemsize == 8 else \
        np.int32(0x7F800000)


@functools.cache
def adafactor_parts(dtype: str, dry: bool, copy: bool, clip: bool, n_avg: int
                    ) -> dict[str, Any]:
    """The per-tensor functions of :func:`adafactor_kernel` (``matrix``, ``full_usq``,
    ``full_step``, ``no_grad``, ``step_size``), which the one-program JAX step's handler
    calls too (:mod:`.xla_ffi_tensorwise`). Options as :func:`adafactor_kernel`'s."""
    DT = np.dtype(dtype).type
    # the probe's integer (of the float's width; see kernels._INNER_SRC: z = IT(max(...)))
    IT = np.int64 if np.dtype(dtype).itemsize == 8 else np.int32
    one = DT(1.0)
    jit = kernel_cache.jit(fastmath=_FASTMATH, error_model="numpy", nogil=True)
    inline = numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy", nogil=True)
    averaged, no_grad = average_parts(IT, copy, dry, n_avg, jit, inline)

    @inline
    def lerp(a, b, w, w1, small):  # pragma: no cover - torch's lerp
        return a + w * (b - a) if small else b - (b - a) * w1

    @inline
    def at_least(x, lo):  # pragma: no cover - torch's clamp(min=lo): NaN stays NaN
        return lo if x < lo else x

    @inline
    def grad(g, gs, cv):  # pragma: no cover - scaled, clipped
        x = g * gs
        if clip:
            x = -cv if x < -cv else x
            x = cv if x > cv else x
        return x

    @jit
    def factors(P, G, R, Rn, C, Cn, col, rows, cols, gs, cv, w, w1, small):  # pragma: no cover
        """Pass 1 of one matrix: (Σ g², Σ p², exponent probe); the new factors in Rn, Cn."""
        gsq, psq, z = 0.0, 0.0, IT(0)
        for j in range(cols):
            col[j] = 0.0
        for i in range(rows):
            o, s = i * cols, 0.0
            for j in range(cols):
                g0 = G[o + j]
                gd, pd = np.float64(g0), np.float64(P[o + j])
                gsq += gd * gd
                psq += pd * pd
                xd = np.float64(grad(g0, gs, cv))
                x2 = xd * xd
                s += x2
                col[j] += x2
            r0, rn = R[i], DT(np.sqrt(s))  # torch: ‖row‖ in the dtype, squared, / cols
            r = lerp(r0, rn * rn / DT(cols), w, w1, small)
            Rn[i] = r
            z = IT(max(z, exponent_bits(r)))
        for j in range(cols):
            c0, cn = C[j], DT(np.sqrt(col[j]))
            c = lerp(c0, cn * cn / DT(rows), w, w1, small)
            Cn[j] = c
            z = IT(max(z, exponent_bits(c)))
        return gsq, psq, z

    @jit
    def row_mean(Rn, rows, eps1):  # pragma: no cover
        """max(mean R, eps1) in the dtype."""
        m = 0.0
        for i in range(rows):
            m += np.float64(Rn[i])
        return at_least(DT(m / rows), eps1)

    @jit
    def factored_usq(G, Rn, Cn, rows, cols, gs, cv, eps1, eps1sq):  # pragma: no cover
        """Pass 2 of one matrix: ‖U‖² (float64)."""
        mean = row_mean(Rn, rows, eps1)
        usq = 0.0
        for i in range(rows):
            ri, o = Rn[i], i * cols
            for j in range(cols):
                x = grad(G[o + j], gs, cv)
                u = one / np.sqrt(at_least(ri * Cn[j] / mean, eps1sq)) * x
                ud = np.float64(u)
                usq += ud * ud
        return usq

    @jit
    def factored_step(P, Q, G, A0, A1, Rn, Cn, rows, cols, gs, cv, eps1, eps1sq, keep, step,
                      a0, a1):  # pragma: no cover
        """Pass 3 of one matrix: the new parameters (and averages); the probe."""
        mean, z = row_mean(Rn, rows, eps1), IT(0)
        for i in range(rows):
            ri, o = Rn[i], i * cols
            for j in range(cols):
                x = grad(G[o + j], gs, cv)
                u = one / np.sqrt(at_least(ri * Cn[j] / mean, eps1sq)) * x
                p = P[o + j] * keep + step * u
                z = IT(max(z, exponent_bits(p)))
                if not dry:
                    if copy:
                        Q[o + j] = p
                    else:
                        P[o + j] = p
                if n_avg > 0:
                    v0, v1, za = averaged(p, A0[o + j], A1[o + j] if n_avg > 1 else p, a0, a1)
                    z = IT(max(z, za))
                    if not dry:
                        A0[o + j] = v0
                        if n_avg > 1:
                            A1[o + j] = v1
        return z

    @jit
    def full_usq(P, G, V, gs, cv, w, w1, small, eps1sq):  # pragma: no cover
        """Pass 1 of a tensor with a full second moment: (Σ g², Σ p², ‖U‖²), V unchanged."""
        gsq, psq, usq = 0.0, 0.0, 0.0
        for j in range(G.shape[0]):
            g0 = G[j]
            gd, pd = np.float64(g0), np.float64(P[j])
            gsq += gd * gd
            psq += pd * pd
            x = grad(g0, gs, cv)
            v = lerp(V[j], x * x, w, w1, small)
            u = one / np.sqrt(at_least(v, eps1sq)) * x
            ud = np.float64(u)
            usq += ud * ud
        return gsq, psq, usq

    @jit
    def full_step(P, Q, G, V, A0, A1, gs, cv, w, w1, small, eps1sq, keep, step, a0, a1
                  ):  # pragma: no cover
        """Pass 2 of a tensor with a full second moment: new p, V (and averages); the probe."""
        z = IT(0)
        for j in range(G.shape[0]):
            x = grad(G[j], gs, cv)
            v = lerp(V[j], x * x, w, w1, small)
            u = one / np.sqrt(at_least(v, eps1sq)) * x
            p = P[j] * keep + step * u
            z = IT(max(z, max(exponent_bits(p), exponent_bits(v))))
            if not dry:
                V[j] = v
                if copy:
                    Q[j] = p
                else:
                    P[j] = p
            if n_avg > 0:
                v0, v1, za = averaged(p, A0[j], A1[j] if n_avg > 1 else p, a0, a1)
                z = IT(max(z, za))
                if not dry:
                    A0[j] = v0
                    if n_avg > 1:
                        A1[j] = v1
        return z

    @jit
    def step_size(size, psq, usq, h):  # pragma: no cover
        """−α / max(1, RMS(U)/d) in the dtype; as torch, the norms in the dtype (the
        ``.item()`` of a float32 norm), the rest in float64."""
        root = np.sqrt(np.float64(size))
        alpha = max(h[EPS2], np.float64(DT(np.sqrt(psq))) / root) * h[RHO]
        return DT(-alpha / max(1.0, np.float64(DT(np.sqrt(usq))) / (root * h[D])))

    @jit
    def matrix(P, Q, G, R, C, Rn, Cn, A0, A1, col, batch, rows, cols, hd, h, a0, a1
               ):  # pragma: no cover
        """A factored tensor, ``batch`` matrices of ``rows`` × ``cols``: (Σ g², probe)."""
        gs, cv, w, w1, small = hd[GS], hd[CV], hd[W], hd[W1], abs(hd[W]) < 0.5
        gsq, psq, usq, z = 0.0, 0.0, 0.0, IT(0)
        n = rows * cols
        for b in range(batch):
            g1, p1, z1 = factors(P[b * n:(b + 1) * n], G[b * n:(b + 1) * n],
                                 R[b * rows:(b + 1) * rows], Rn[b * rows:(b + 1) * rows],
                                 C[b * cols:(b + 1) * cols], Cn[b * cols:(b + 1) * cols], col,
                                 rows, cols, gs, cv, w, w1, small)
            gsq, psq, z = gsq + g1, psq + p1, IT(max(z, z1))
        for b in range(batch):
            usq += factored_usq(G[b * n:(b + 1) * n], Rn[b * rows:(b + 1) * rows],
                                Cn[b * cols:(b + 1) * cols], rows, cols, gs, cv, hd[EPS1],
                                hd[EPS1SQ])
        step = step_size(batch * n, psq, usq, h)
        for b in range(batch):
            z1 = factored_step(P[b * n:(b + 1) * n], Q[b * n:(b + 1) * n], G[b * n:(b + 1) * n],
                               A0[b * n:(b + 1) * n], A1[b * n:(b + 1) * n],
                               Rn[b * rows:(b + 1) * rows], Cn[b * cols:(b + 1) * cols], rows,
                               cols, gs, cv, hd[EPS1], hd[EPS1SQ], hd[KEEP], step, a0, a1)
            z = IT(max(z, z1))
        return gsq, z

    return {"matrix": matrix, "full_usq": full_usq, "full_step": full_step,
            "no_grad": no_grad, "step_size": step_size}


@functools.cache
def adafactor_kernel(dtype: str, dry: bool, copy: bool, clip: bool, n_avg: int) -> Any:
    """The kernel for ``dtype``; ``dry``: probe only; ``copy``: parameters are read from
    ``P`` and written to ``Q`` (JAX's double buffer; else in place, ``Q`` ignored;
    ``Rn``/``Cn`` receive the new factors: the state's ``R``/``C`` themselves, or scratch);
    ``clip``: clipping by value compiled in; ``n_avg``: how many weight averages (``A0``,
    ``A1``) move. Clamps are written ``lo if x < lo else x``: a NaN passes through, as
    torch's ``clamp``."""
    parts = adafactor_parts(dtype, dry, copy, clip, n_avg)
    matrix, full_usq, full_step = parts["matrix"], parts["full_usq"], parts["full_step"]
    no_grad, step_size = parts["no_grad"], parts["step_size"]
    DT = np.dtype(dtype).type
    EXP = exp_field(dtype)
    jit = kernel_cache.jit(fastmath=_FASTMATH, error_model="numpy", nogil=True)

    @jit
    def kernel(P, Q, R, C, V, Rn, Cn, A0, A1, gptr, geo, Hd, H, order, col, out, bad, sync,
               spins):  # pragma: no cover
        """Claim tensors (in ``order``) until none is left; ``out[t]``: Σ g² of tensor
        ``t``'s raw gradient, ``bad[t]``: one of its new values is inf/NaN."""
        n = order.shape[0]
        slot = atomics.arrive(sync)  # this thread's range of pieces (:mod:`.atomics`)
        k = atomics.claim(sync, slot)
        while k < n:
            t = order[k]
            a, size = geo[t, OFF], geo[t, SIZE]
            b = a + size
            hd = Hd[t]
            a0 = hd[AVG] if n_avg > 0 else hd[0]
            a1 = hd[AVG + 1] if n_avg > 1 else hd[0]
            base = gptr[t]
            if base == 0:
                z = no_grad(P[a:b], Q[a:b], A0[a:b], A1[a:b], a0, a1)
            elif geo[t, ROWS] * geo[t, COLS]:
                ro, co = geo[t, ROFF], geo[t, COFF]
                rn, cn = geo[t, BATCH] * geo[t, ROWS], geo[t, BATCH] * geo[t, COLS]
                out[t], z = matrix(P[a:b], Q[a:b], numba.carray(voidptr(base), (size,), DT),
                                   R[ro:ro + rn], C[co:co + cn], Rn[ro:ro + rn], Cn[co:co + cn],
                                   A0[a:b], A1[a:b], col, geo[t, BATCH], geo[t, ROWS],
                                   geo[t, COLS], hd, H[t], a0, a1)
            else:
                G = numba.carray(voidptr(base), (size,), DT)
                S = V[geo[t, VOFF]:geo[t, VOFF] + size]
                small = abs(hd[W]) < 0.5
                out[t], psq, usq = full_usq(P[a:b], G, S, hd[GS], hd[CV], hd[W], hd[W1], small,
                                            hd[EPS1SQ])
                z = full_step(P[a:b], Q[a:b], G, S, A0[a:b], A1[a:b], hd[GS], hd[CV], hd[W],
                              hd[W1], small, hd[EPS1SQ], hd[KEEP],
                              step_size(size, psq, usq, H[t]), a0, a1)
            bad[t] = z == EXP
            atomics.piece_done(sync)
            k = atomics.claim(sync, slot)
        return atomics.all_done(sync, n, spins)

    return kernel


def run(kernel: Any, args: tuple, gptr: np.ndarray, geo: np.ndarray, Hd: np.ndarray,
        H: np.ndarray, order: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Run ``kernel`` on this thread and up to ``get_num_threads() - 1`` pool threads
    (each claims whole tensors, ``order`` first); returns ``out`` (per tensor: Σ g² of the
    raw gradient, float64) and ``bad`` (a new value is inf/NaN)."""
    n = len(order)
    out = np.zeros(len(geo), dtype=np.float64)
    bad = np.zeros(len(geo), dtype=np.bool_)
    sync = atomics.new_sync(n, 1)  # one queue: the largest tensors first
    cols = int(geo[:, COLS].max()) if len(geo) else 0
    workers = min(threads.get_num_threads(), n) - 1 if total >= threads.MIN_PARALLEL else 0
    tail = (gptr, geo, Hd, H, order)
    # each thread its own scratch row
    job = lambda spins: kernel(*args, *tail, np.empty(cols), out, bad, sync, spins)  # noqa: E731
    share(job, sync, n, workers, threads.SPINS)
    return out, bad
