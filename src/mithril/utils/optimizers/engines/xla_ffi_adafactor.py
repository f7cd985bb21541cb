"""Adafactor's update in the one-program JAX train step on CPU as ONE call of the NumPy
engine's own per-tensor passes (:func:`.factored_kernels.adafactor_parts`), through XLA's
typed FFI, as :mod:`.xla_ffi` runs the elementwise optimizers.

Why: traced, every tensor's factored update (row and column statistics, the RMS of the
parameter and of the update, the step) is a dozen XLA fusions to compile; on a 50-layer MLP
the first epoch took 1.7x ``optax.adafactor``'s. The handler is compiled once per machine
(numba's cache) and the program holds one custom call whatever the tensor count.

How: the call frame is read as :mod:`.xla_ffi`'s handlers read it (the same handler, its
``work`` this module's). A piece is one whole tensor (largest first), done by the thread
that claims it, as the NumPy engine does: the results do not depend on the thread count.
Arguments: the table ``H`` (a row per tensor: :data:`.factored_kernels.GS` ... and the
averaging weights, in the parameters' dtype), each tensor's row (``arange``: unused),
the piece table, ``nonfinite="skip"``'s "forced" flag where it has one, the geometry
(int32 ``(size, batch, rows, cols)`` per tensor), then per tensor its param, gradient,
``row_var``, ``col_var``, ``variance`` and averages; results: per tensor the param and its
slots (aliased to the inputs), then int32 ``[gradients finite, new values finite, pieces
the pool did]``. ``"skip"``'s variant runs the dry passes first (the new factors in
scratch), then the update only where every gradient and new value was finite.

The step size's scalars (ρ, eps2, d) are in the parameters' dtype here (float64 in the
NumPy engine's table; the traced update's are float32 too).
"""

from __future__ import annotations

import functools
from typing import Any

import numba
import numpy as np

from . import factored_kernels as fk
from .kernels import voidptr
from .xla_ffi import _HANDLER_SRC, MAX_TENSOR, _register

_WORK_SRC = """
def work(fa, rec):
    # claim tensors (whole: one thread does a tensor's passes) until none is left; SKIP:
    # pieces [0, pieces) the dry passes (nothing written), [pieces, 2 pieces) the update,
    # claimed once every dry piece is done and only where all was finite
    args, rets, H, group, pieces, segs, pt = views(fa)
    n = group.shape[0]
    geo = carray(voidptr(data(args[FIRST - 1])), (n, 4), np.int32)
    force = True
    if SKIP:
        force = forced(args)
    total = pieces if force else 2 * pieces
    width = 1
    for t in range(n):
        width = max(width, geo[t, 3])
    col = np.empty(width, np.float64)  # (this thread's: a matrix's column sums)
    did = 0
    while True:
        k = fetch_add(rec + 64, 1)
        if k >= total:
            return did
        dry = not force and k < pieces
        if not force and k >= pieces:
            k -= pieces
            while load_acquire(rec + 128) < pieces:  # (short: the dry pieces are in hand)
                spin_pause()
            if load_acquire(rec + 8 * 24) != 0 or load_acquire(rec + 8 * 25) != 0:
                return did
        did += 1
        t = pt[3 + pieces + pt[2 + k]]
        size, batch = np.int64(geo[t, 0]), np.int64(geo[t, 1])
        rows, cols = np.int64(geo[t, 2]), np.int64(geo[t, 3])
        nr, nc = batch * rows, batch * cols
        nv = size if rows * cols == 0 else 0
        sizes = (size, nr, nc, nv, size, size)
        a = FIRST + (2 + NS) * t
        o = (1 + NS) * t
        hd = H[t]
        a0 = hd[AVG] if NAVG > 0 else hd[0]
        a1 = hd[AVG + 1] if NAVG > 1 else hd[0]
        G = carray(voidptr(data(args[a + 1])), (size,), DTYPE)
        if dry:  # the step computed from the inputs, not stored (new factors in scratch)
            P = carray(voidptr(data(args[a])), (size,), DTYPE)
            R = carray(voidptr(data(args[a + 2])), (nr,), DTYPE)
            C = carray(voidptr(data(args[a + 3])), (nc,), DTYPE)
            V = carray(voidptr(data(args[a + 4])), (nv,), DTYPE)
        else:
            for q in range(1 + NS):  # the param and slots in their results' buffers (the
                # same buffers where XLA aliased them, as it does: nothing to copy)
                src = data(args[a if q == 0 else a + 1 + q])
                if src != data(rets[o + q]):
                    copy(src, data(rets[o + q]), sizes[q], DTYPE)
            P = carray(voidptr(data(rets[o])), (size,), DTYPE)
            R = carray(voidptr(data(rets[o + 1])), (nr,), DTYPE)
            C = carray(voidptr(data(rets[o + 2])), (nc,), DTYPE)
            V = carray(voidptr(data(rets[o + 3])), (nv,), DTYPE)
        A0 = carray(voidptr(data(args[a])), (0,), DTYPE)  # (no average: not read)
        A1 = A0
        if NAVG > 0:
            A0 = carray(voidptr(data(args[a + 5] if dry else rets[o + 4])), (size,), DTYPE)
        if NAVG > 1:
            A1 = carray(voidptr(data(args[a + 6] if dry else rets[o + 5])), (size,), DTYPE)
        if rows * cols != 0:
            if dry:
                gsq, z = dmatrix(P, P, G, R, C, np.empty(nr, DTYPE), np.empty(nc, DTYPE), A0,
                                 A1, col, batch, rows, cols, hd, hd, a0, a1)
            else:
                gsq, z = umatrix(P, P, G, R, C, R, C, A0, A1, col, batch, rows, cols, hd, hd,
                                 a0, a1)
        else:
            small = abs(hd[W]) < 0.5
            gsq, psq, usq = full_usq(P, G, V, hd[GS], hd[CV], hd[W], hd[W1], small,
                                     hd[EPS1SQ])
            step = step_size(size, psq, usq, hd)
            if dry:
                z = dfull_step(P, P, G, V, A0, A1, hd[GS], hd[CV], hd[W], hd[W1], small,
                               hd[EPS1SQ], hd[KEEP], step, a0, a1)
            else:
                z = ufull_step(P, P, G, V, A0, A1, hd[GS], hd[CV], hd[W], hd[W1], small,
                               hd[EPS1SQ], hd[KEEP], step, a0, a1)
        if dry or force:  # (the update after a dry pass: that pass counted)
            if not np.isfinite(gsq) and not finite(data(args[a + 1]), size, DTYPE):
                fetch_add(rec + 8 * 24, 1)
            if z == EXP:
                fetch_add(rec + 8 * 25, 1)
        fetch_add(rec + 128, 1)
"""


@functools.cache
def target(dtype: str, clip: bool, n_avg: int, skip: bool = False) -> str:
    """The registered FFI target of Adafactor's update in ``dtype`` (``clip``: clipping by
    value compiled in; ``n_avg`` weight averages; ``skip``: the variant that writes nothing
    unless the whole step is finite), named by its content as :func:`.xla_ffi.target`'s."""
    up = fk.adafactor_parts(dtype, False, False, clip, n_avg)
    dry = fk.adafactor_parts(dtype, True, False, clip, n_avg) if skip else up
    ns: dict[str, Any] = {
        "np": np, "carray": numba.carray, "voidptr": voidptr, "EXP": fk.exp_field(dtype),
        "umatrix": up["matrix"], "ufull_step": up["full_step"], "dmatrix": dry["matrix"],
        "dfull_step": dry["full_step"], "full_usq": up["full_usq"],
        "step_size": up["step_size"], "SKIP": skip, "FIRST": 5 if skip else 4,
        "NAVG": n_avg, "GS": fk.GS, "CV": fk.CV, "KEEP": fk.KEEP, "W": fk.W, "W1": fk.W1,
        "EPS1SQ": fk.EPS1SQ, "AVG": fk.AVG}
    return _register(ns, _HANDLER_SRC + _WORK_SRC, f"adafactor_{dtype}", 3 + n_avg, dtype,
                     "adafactor")


def geometry(shapes: list[tuple[int, ...]]) -> np.ndarray:
    """int32 ``(size, batch, rows, cols)`` per tensor (rows, cols: its last two axes, 0 for
    a tensor of rank < 2, which has a full second moment)."""
    geo = fk.geometry(shapes, [0] * len(shapes), {s: [0] * len(shapes) for s in
                                                 ("row_var", "col_var", "variance")})
    return geo[:, [fk.SIZE, fk.BATCH, fk.ROWS, fk.COLS]].astype(np.int32)


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
    import jax

    n_slots, dtype = len(slots), np.dtype(ps[0].dtype).name
    shapes = [tuple(p.shape) for p in ps]
    geo = geometry(shapes)
    if len(geo) and int(geo[:, 0].max()) > MAX_TENSOR:
        raise ValueError(f"a tensor of more than {MAX_TENSOR} elements")
    name = target(dtype, clip, n_slots - 3, skip is not None)
    args: list[Any] = [table, np.arange(len(ps), dtype=np.int32),
                       whole_pieces(geo[:, 0].astype(np.int64))]
    if skip is not None:
        args.append(jax.numpy.asarray(skip, np.int32).reshape(1))
    args.append(geo)
    outs, aliases = [], {}
    for i, (p, g) in enumerate(zip(ps, gs)):
        base, out = len(args), len(outs)
        args += [p, g, *(s[i] for s in slots)]
        outs += [jax.ShapeDtypeStruct(p.shape, p.dtype)]
        outs += [jax.ShapeDtypeStruct(s[i].shape, s[i].dtype) for s in slots]
        aliases[base] = out
        aliases.update({base + 2 + k: out + 1 + k for k in range(n_slots)})
    outs.append(jax.ShapeDtypeStruct((3,), np.int32))
    res = jax.ffi.ffi_call(name, outs, input_output_aliases=aliases)(*args)
    k = 1 + n_slots
    return ([res[k * i] for i in range(len(ps))],
            [[res[k * i + 1 + s] for i in range(len(ps))] for s in range(n_slots)],
            res[-1][0] != 0, res[-1][1] != 0)
