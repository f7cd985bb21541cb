"""Tensorwise optimizers' updates in the one-program JAX train step on CPU as ONE call of
the NumPy engine's own per-tensor passes, through XLA's typed FFI, as :mod:`.xla_ffi` runs
the elementwise optimizers: Adafactor's (:func:`.factored_kernels.adafactor_parts`) and
SM3's (:func:`.sm3_kernels.sm3_parts`).

Why: traced, every tensor's update (Adafactor's row and column statistics, the RMS of the
parameter and of the update; SM3's per-axis accumulators) is a dozen XLA fusions to
compile; on a 50-layer MLP the first epoch took 1.7x ``optax.adafactor``'s (``optax.sm3``'s
likewise). The handler is compiled once per machine (numba's cache) and the program holds
one custom call whatever the tensor count.

How: the call frame is read as :mod:`.xla_ffi`'s handlers read it (the same handler, its
``work`` this module's). A piece is one whole tensor (largest first), done by the thread
that claims it, as the NumPy engine does: the results do not depend on the thread count.
Arguments: the table ``H`` (a row per tensor: the kernel's columns, then the averaging
weights, in the parameters' dtype), each tensor's row (``arange``: unused), the piece
table, ``nonfinite="skip"``'s "forced" flag where it has one, the geometry (int32, a row
per tensor: Adafactor's ``(size, batch, rows, cols)``, SM3's ``(size, rank, *shape)``),
then per tensor its param, gradient and slots (the optimizer's, then the averages);
results: per tensor the param and its slots (aliased to the inputs), then int32
``[gradients finite, new values finite, pieces the pool did]``. ``"skip"``'s variant runs
the dry passes first (new statistics in scratch), then the update only where every
gradient and new value was finite.

Adafactor's step size's scalars (ρ, eps2, d) are in the parameters' dtype here (float64 in
the NumPy engine's table; the traced update's are float32 too).
"""

from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np

from . import factored_kernels as fk
from . import kernel_cache
from . import sm3_kernels as sk
from .kernels import voidptr
from .xla_ffi import _HANDLER_SRC, MAX_TENSOR, _register, call_in_place

_WORK_SRC = """
def work(fa, rec):
    # claim tensors (whole: one thread does a tensor's passes) until none is left
    args, rets, H, group, pieces, segs, pt = views(fa)
    n = group.shape[0]
    geo = carray(voidptr(data(args[FIRST - 1])), (n, GEO), np.int32)
    force = True
    if SKIP:
        force = forced(args)
    scr = scratch(geo)  # (this thread's)
    ext = np.empty(1 + NS, np.int64)  # a tensor's buffers (param, slots): their sizes
    ad = np.empty(1 + NS, np.int64)  # ... and their addresses
    did = 0
    while True:
        k, dry = claim(rec, pieces, force)  # (SKIP: the dry passes first, see claim)
        if k < 0:
            return did
        did += 1
        t = pt[3 + pieces + pt[2 + k]]
        extent(geo[t], ext)
        a = FIRST + (2 + NS) * t
        o = (1 + NS) * t
        for q in range(1 + NS):  # the param and slots: the inputs (dry), else the results'
            # buffers (the same buffers where XLA aliased them, as it does: nothing to copy)
            src = data(args[a if q == 0 else a + 1 + q])
            ad[q] = src
            if not dry:
                ad[q] = data(rets[o + q])
                if src != ad[q]:
                    copy(src, ad[q], ext[q], DTYPE)
        hd = H[t]
        a0 = hd[AVG] if NAVG > 0 else hd[0]
        a1 = hd[AVG + 1] if NAVG > 1 else hd[0]
        G = carray(voidptr(data(args[a + 1])), (ext[0],), DTYPE)
        P = carray(voidptr(ad[0]), (ext[0],), DTYPE)
        A0 = carray(voidptr(ad[0]), (0,), DTYPE)  # (no average: not read)
        A1 = A0
        if NAVG > 0:
            A0 = carray(voidptr(ad[1 + NOWN]), (ext[0],), DTYPE)
        if NAVG > 1:
            A1 = carray(voidptr(ad[2 + NOWN]), (ext[0],), DTYPE)
        gsq, z = tensor(dry, geo[t], ext, ad, P, G, A0, A1, hd, a0, a1, scr)
        if dry or force:  # (the update after a dry pass: that pass counted)
            if not np.isfinite(gsq) and not finite(data(args[a + 1]), ext[0], DTYPE):
                fetch_add(rec + 8 * 24, 1)
            if z == EXP:
                fetch_add(rec + 8 * 25, 1)
        fetch_add(rec + 128, 1)
"""

_ADAFACTOR_SRC = """
def scratch(geo):
    # a matrix's column sums (float64)
    width = 1
    for t in range(geo.shape[0]):
        width = max(width, geo[t, 3])
    return np.empty(width, np.float64)


def extent(g, ext):
    # the sizes of the param and its row_var, col_var, variance (and averages)
    size, batch, rows, cols = g[0], g[1], g[2], g[3]
    ext[:] = size
    ext[1] = batch * rows
    ext[2] = batch * cols
    ext[3] = size if rows * cols == 0 else 0


def tensor(dry, g, ext, ad, P, G, A0, A1, hd, a0, a1, col):
    # (Σ g², probe) of one tensor's passes
    batch, rows, cols = np.int64(g[1]), np.int64(g[2]), np.int64(g[3])
    R = carray(voidptr(ad[1]), (ext[1],), DTYPE)
    C = carray(voidptr(ad[2]), (ext[2],), DTYPE)
    if rows * cols != 0:
        if dry:  # (the new factors in scratch)
            return dmatrix(P, P, G, R, C, np.empty(ext[1], DTYPE), np.empty(ext[2], DTYPE),
                           A0, A1, col, batch, rows, cols, hd, hd, a0, a1)
        return umatrix(P, P, G, R, C, R, C, A0, A1, col, batch, rows, cols, hd, hd, a0, a1)
    V = carray(voidptr(ad[3]), (ext[3],), DTYPE)
    small = abs(hd[W]) < 0.5
    gsq, psq, usq = full_usq(P, G, V, hd[GS], hd[CV], hd[W], hd[W1], small, hd[EPS1SQ])
    step = step_size(ext[0], psq, usq, hd)
    if dry:
        return gsq, dfull_step(P, P, G, V, A0, A1, hd[GS], hd[CV], hd[W], hd[W1], small,
                               hd[EPS1SQ], hd[KEEP], step, a0, a1)
    return gsq, ufull_step(P, P, G, V, A0, A1, hd[GS], hd[CV], hd[W], hd[W1], small,
                           hd[EPS1SQ], hd[KEEP], step, a0, a1)
"""

_SM3_SRC = """
def scratch(geo):
    # two blocks and a cell (sm3_kernels.scratch_size), as the blocks axes takes
    n = geo.shape[0]
    ranks = np.zeros(n, np.int64)
    inner = np.zeros(n, np.int64)
    for t in range(n):
        ranks[t] = geo[t, 1]
        if ranks[t] >= 1:
            inner[t] = geo[t, 1 + ranks[t]]
    return blocks(np.empty(scratch_size(ranks, inner), DTYPE))


def extent(g, ext):
    # the sizes of the param and its mu, m (and averages)
    ext[:] = g[0]
    if g[1] >= 2:
        ext[1] = 0
        for d in range(g[1]):
            ext[1] += g[2 + d]


def tensor(dry, g, ext, ad, P, G, A0, A1, hd, a0, a1, scr):
    # (Σ g², probe) of one tensor's pass
    mn, acc, accb, cell, cellb = scr
    MU = carray(voidptr(ad[1]), (ext[1],), DTYPE)
    M = carray(voidptr(ad[2]), (ext[0],), DTYPE)
    rank = np.int64(g[1])
    if rank < 2:
        if dry:
            return dvector(P, P, G, M, MU, A0, A1, acc, hd, a0, a1)
        return uvector(P, P, G, M, MU, A0, A1, acc, hd, a0, a1)
    dims = np.empty(rank, np.int64)
    for d in range(rank):
        dims[d] = g[2 + d]
    MUn = np.empty(ext[1], DTYPE)  # (the new accumulators, built while the old are read)
    if dry:
        return daxes(P, P, G, M, MU, MUn, A0, A1, dims, rank, mn, acc, accb, cell, cellb, hd,
                     a0, a1)
    return uaxes(P, P, G, M, MU, MUn, A0, A1, dims, rank, mn, acc, accb, cell, cellb, hd,
                 a0, a1)
"""


def _target(kind: str, src: str, dtype: str, n_own: int, n_avg: int, skip: bool,
            geo: int, parts: dict[str, Any]) -> str:
    """Register the handler of ``src`` (``scratch``, ``extent`` and ``tensor`` for one
    optimizer, ``n_own`` slots of its own) with ``parts`` (its kernel's functions, the
    update's ``u…`` and the dry pass's ``d…``) in its namespace."""
    ns: dict[str, Any] = {"np": np, "carray": numba.carray, "voidptr": voidptr,
                          "EXP": fk.exp_field(dtype), "SKIP": skip, "FIRST": 5 if skip else 4,
                          "NAVG": n_avg, "NOWN": n_own, "GEO": geo, **parts}
    kernel_cache.exec_source(src, f"{kind}_tensor", ns)
    for k in ("scratch", "extent", "tensor"):
        ns[k] = numba.njit(inline="always")(ns[k])
    return _register(ns, _HANDLER_SRC + _WORK_SRC, f"{kind}_{dtype}", n_own + n_avg, dtype,
                     kind)


@functools.cache
def adafactor_target(dtype: str, clip: bool, n_avg: int, skip: bool = False) -> str:
    """The registered FFI target of Adafactor's update in ``dtype`` (``clip``: clipping by
    value compiled in; ``n_avg`` weight averages; ``skip``: the variant that writes nothing
    unless the whole step is finite), named by its content as :func:`.xla_ffi.target`'s."""
    up = fk.adafactor_parts(dtype, False, False, clip, n_avg)
    dry = fk.adafactor_parts(dtype, True, False, clip, n_avg) if skip else up
    return _target("adafactor", _ADAFACTOR_SRC, dtype, 3, n_avg, skip, 4, {
        "umatrix": up["matrix"], "ufull_step": up["full_step"], "dmatrix": dry["matrix"],
        "dfull_step": dry["full_step"], "full_usq": up["full_usq"],
        "step_size": up["step_size"], "GS": fk.GS, "CV": fk.CV, "KEEP": fk.KEEP, "W": fk.W,
        "W1": fk.W1, "EPS1SQ": fk.EPS1SQ, "AVG": fk.AVG})


@functools.cache
def sm3_target(dtype: str, clip: bool, n_avg: int, skip: bool = False) -> str:
    """The registered FFI target of SM3's update, as :func:`adafactor_target`'s."""
    up = sk.sm3_parts(dtype, False, False, clip, n_avg)
    dry = sk.sm3_parts(dtype, True, False, clip, n_avg) if skip else up
    return _target("sm3", _SM3_SRC, dtype, 2, n_avg, skip, 2 + sk.MAX_RANK, {
        "uvector": up["vector"], "uaxes": up["axes"], "dvector": dry["vector"],
        "daxes": dry["axes"], "blocks": up["scratch"],
        "scratch_size": numba.njit(inline="always")(sk.scratch_size), "AVG": sk.AVG})


def adafactor_geometry(shapes: list[tuple[int, ...]]) -> np.ndarray:
    """int32 ``(size, batch, rows, cols)`` per tensor (rows, cols: its last two axes, 0 for
    a tensor of rank < 2, which has a full second moment)."""
    geo = fk.geometry(shapes, [0] * len(shapes), {s: [0] * len(shapes) for s in
                                                 ("row_var", "col_var", "variance")})
    return geo[:, [fk.SIZE, fk.BATCH, fk.ROWS, fk.COLS]].astype(np.int32)


def sm3_geometry(shapes: list[tuple[int, ...]]) -> np.ndarray:
    """int32 ``(size, rank, *shape)`` per tensor (``MAX_RANK`` shape columns)."""
    geo = sk.geometry(shapes, [0] * len(shapes), [0] * len(shapes))
    return geo[:, [sk.SIZE, sk.RANK, *range(sk.DIMS, sk.DIMS + sk.MAX_RANK)]].astype(np.int32)


def whole_pieces(sizes: np.ndarray) -> np.ndarray:
    """The piece table (:func:`.xla_ffi.piece_table`'s format) of one piece per non-empty
    tensor, the largest first (ties in order)."""
    order = np.argsort(-sizes, kind="stable")
    order = order[sizes[order] > 0]
    n = len(order)
    return np.array([n, n, *range(n + 1), *order, *([0] * n), *sizes[order]], dtype=np.int32)


def fused_adafactor(table: Any, clip: bool, ps: list[Any], gs: list[Any],
                    slots: list[list[Any]], skip: Any = None) -> tuple[list, list, Any, Any]:
    """Adafactor's update of every tensor in one call (traced): ``table`` a row per tensor
    (:data:`.factored_kernels.GS` ... then the averaging weights, in the params' dtype),
    ``slots[s][i]`` slot ``s`` (``row_var``, ``col_var``, ``variance``, then the averages)
    of tensor ``i``; ``skip``: as :func:`.xla_ffi.fused_update`'s. Returns the new params,
    the new slots (as ``slots``) and whether the gradients and whether the new values were
    all finite (traced booleans)."""
    geo = adafactor_geometry([tuple(p.shape) for p in ps])
    name = adafactor_target(np.dtype(ps[0].dtype).name, clip, len(slots) - 3, skip is not None)
    return _call(name, table, geo, ps, gs, slots, skip)


def fused_sm3(table: Any, clip: bool, ps: list[Any], gs: list[Any], slots: list[list[Any]],
              skip: Any = None) -> tuple[list, list, Any, Any]:
    """SM3's update of every tensor in one call (traced), as :func:`fused_adafactor`:
    ``table``'s columns :data:`.sm3_kernels.GS` ..., the slots ``mu``, ``m``, then the
    averages. Ranks up to :data:`.sm3_kernels.MAX_RANK`."""
    geo = sm3_geometry([tuple(p.shape) for p in ps])
    name = sm3_target(np.dtype(ps[0].dtype).name, clip, len(slots) - 2, skip is not None)
    return _call(name, table, geo, ps, gs, slots, skip)


def _call(name: str, table: Any, geo: np.ndarray, ps: list[Any], gs: list[Any],
          slots: list[list[Any]], skip: Any) -> tuple[list, list, Any, Any]:
    """The custom call ``name`` over every tensor (arguments and results as the module doc
    says): (new params, new slots, gradients finite, new values finite)."""
    import jax

    if len(geo) and int(geo[:, 0].max()) > MAX_TENSOR:
        raise ValueError(f"a tensor of more than {MAX_TENSOR} elements")
    args: list[Any] = [table, np.arange(len(ps), dtype=np.int32),
                       whole_pieces(geo[:, 0].astype(np.int64))]
    if skip is not None:
        args.append(jax.numpy.asarray(skip, np.int32).reshape(1))
    args.append(geo)
    new_ps, new_slots, flags = call_in_place(name, args, ps, gs, slots)
    return new_ps, new_slots, flags[0] != 0, flags[1] != 0
