"""The one-program JAX train step's elementwise update on CPU as ONE call of the engines'
own fused loop (:func:`.kernels.inner_namespace`), through XLA's typed FFI.

Why: XLA compiles the traced update and its finiteness probe per tensor, ~1 s of a
50-layer MLP's first step on two cores (its 100 tensors) where optax's step compiles in
~0.5 s; a custom call of one kernel compiles in a few milliseconds whatever the tensor count,
and the kernel itself is compiled once per machine (numba's cache, :mod:`.kernel_cache`),
whatever the model.

How: the handler is a numba ``cfunc`` (no C compiler) that reads XLA's C call frame, whose
layout is ``xla/ffi/api/c_api.h`` (shipped in ``jaxlib/include``; its structs only grow,
each led by its size):

* ``XLA_FFI_CallFrame`` (64-bit): ``extension_start`` at 8, ``stage`` at 32, arguments'
  count at 56 and their buffers at 72, results' count at 96 and their buffers at 112;
* ``XLA_FFI_Buffer``: data at 24, rank at 32, dims at 40;
* a metadata query (extension type 1) is answered with the header's API version and no
  traits; the stages before execute (3) do nothing.

Arguments: the table ``H`` (a row per parameter group: gscale, clip value, coupled L2,
decoupled keep factor, then the optimizer's scalars, in the parameters' dtype, as the
NumPy engine's), each tensor's row (int32), the pieces (:func:`piece_table`), then per
tensor its param, gradient and slots; results: per tensor the new param and slots
(aliased to the inputs: written in place), then int32 ``[gradients finite, new values
finite, pieces the pool did]``, from the loop's own probe (Σ g² and the exponent bits of
every new value, :func:`.kernels.update_kernel`), a piece read again only where that probe
says something is not finite. The pieces are shared with XLA's intra-op thread pool
(:mod:`.xla_pool`), as the NumPy engine shares its pieces with its workers.

``nonfinite="skip"`` has a variant of its own (argument 3: whether the step is forced,
``max_consecutive_skips`` reached): a dry pass over the pieces (the step computed, nothing
stored, as the NumPy engine's ``dry`` kernel), then the update pass only where every
gradient and new value was finite. A skipped step thus leaves the aliased buffers as they
were, and the program holds no conditional between new and old arrays (which made XLA
keep a copy of every param and slot: a 2.2M-param MLP's step 2.35x optax's, 1.03x since).
A two-pass optimizer's first pass (LAMB's, LARS'...) is a handler of its own
(:func:`fused_reduce`: per segment the sums of its terms, read only), the step between
the passes traced, the second pass this update with a row of scalars per tensor.

Used by :class:`~mithril.utils.training.TrainStep` only (where params lie on one CPU device,
float32 or float64, every slot in their dtype): ``vmap`` and ``grad`` have no rule for the
call. ``MITHRIL_JAX_FFI=0`` turns it off (the traced update then runs, as on accelerators).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import types

from . import atomics, kernel_cache, xla_pool
from .kernels import _FASTMATH, inner_namespace, reduce_namespace, voidptr

#: off with ``MITHRIL_JAX_FFI=0``
ENABLED = os.environ.get("MITHRIL_JAX_FFI", "1").strip().lower() not in ("0", "false", "no",
                                                                         "off")
#: the largest tensor the kernel takes (its piece table's offsets are int32); beyond, the
#: traced update
MAX_TENSOR = (1 << 31) - 1
#: elements of a piece the threads claim (a tensor's slice, or small tensors together)
PIECE = 1 << 15


def _data(buf):  # pragma: no cover - compiled by numba
    return numba.carray(voidptr(buf), (4,), np.int64)[3]


def _finite(addr, k, dtype):  # pragma: no cover - compiled by numba
    X = numba.carray(voidptr(addr), (k,), dtype)
    for j in range(k):
        if not np.isfinite(X[j]):
            return False
    return True


def _forced(args):  # pragma: no cover - compiled by numba
    """``nonfinite="skip"``'s argument 3: the step applied whatever the probe says
    (``max_consecutive_skips`` reached), in one pass as without ``skip``."""
    buf = numba.carray(voidptr(args[3]), (4,), np.int64)  # (its data: word 3 of the buffer)
    return numba.carray(voidptr(buf[3]), (1,), np.int32)[0] != 0


def _copy(src, dst, k, dtype):  # pragma: no cover - compiled by numba
    X, Y = numba.carray(voidptr(src), (k,), dtype), numba.carray(voidptr(dst), (k,), dtype)
    for j in range(k):
        Y[j] = X[j]


_HANDLER_SRC = """
def handler(frame):
    x = address(frame)
    main = x >= 0
    if x < 0 and (x & OWN) != 0:  # (once per process: its own address, the pool's task)
        keep_address(job_table(), x)
        return voidptr(0)
    if main:
        cf = carray(frame, (15,), np.int64)
        if cf[1] != 0:  # the metadata query: the API version this handler was built against
            ext = carray(voidptr(cf[1]), (4,), np.int64)
            if (ext[1] & 0xFFFFFFFF) == 1:
                md = carray(voidptr(ext[3]), (9,), np.int32)
                md[6] = MAJOR
                md[7] = MINOR
                md[8] = 0
                return voidptr(0)
        if (cf[4] & 0xFFFFFFFF) != 3:  # instantiate, prepare, initialize: nothing to do
            return voidptr(0)
        rec, task = open_job(job_table(), x)
        pt = carray(voidptr(data(carray(voidptr(cf[9]), (3,), np.int64)[2])), (2,), np.int32)
        me = own_address(job_table())
        n = min(threads(cf[2], cf[3], rec) - 1, pt[0] - 1) if me != 0 else 0
        for i in range(n):  # (the pool's threads but the calling one; it may be one of them)
            if not schedule(cf[2], cf[3], me, task, rec):
                break
    else:  # a task of the pool: the job of its slot, unless that is over
        rec = enter(x, job_table())
        if rec == 0:
            return voidptr(0)
    did = work(load_acquire(rec + 8), rec)
    if not main:
        fetch_add(rec + 8 * 26, did)
        fetch_add(rec + 16, -1)
        return voidptr(0)
    cf = carray(frame, (15,), np.int64)
    args = carray(voidptr(cf[9]), (cf[7],), np.int64)
    rets = carray(voidptr(cf[14]), (cf[12],), np.int64)
    flags = carray(voidptr(data(rets[cf[12] - 1])), (3,), np.int32)
    pt = carray(voidptr(data(args[2])), (2,), np.int32)
    n_done = pt[0]
    if SKIP and not forced(args):  # the update pass ran after the dry one where all was finite
        while load_acquire(rec + 128) < pt[0]:
            spin_pause()
        if load_acquire(rec + 8 * 24) == 0 and load_acquire(rec + 8 * 25) == 0:
            n_done = 2 * pt[0]
    bad_g, bad_v, by_pool = close_job(rec, n_done)
    flags[0] = 1 if bad_g == 0 else 0
    flags[1] = 1 if bad_v == 0 else 0
    flags[2] = by_pool
    return voidptr(0)


def claim(rec, pieces, force):
    # the next piece this thread does and whether it is the dry pass's (-1: none left);
    # SKIP, not forced: pieces [0, pieces) the dry pass (nothing written), [pieces,
    # 2 pieces) the update, claimed once every dry piece is done and only where all was
    # finite
    k = fetch_add(rec + 64, 1)
    if k >= (pieces if force else 2 * pieces):
        return -1, False
    if force or k < pieces:
        return k, not force
    while load_acquire(rec + 128) < pieces:  # (short: the dry pieces are in hand)
        spin_pause()
    if load_acquire(rec + 8 * 24) != 0 or load_acquire(rec + 8 * 25) != 0:
        return -1, False
    return k - pieces, False


def views(fa):
    # the call's arguments and results (buffer addresses), the table H, each tensor's row,
    # the piece count, the segment count, the piece table
    cf = carray(voidptr(fa), (15,), np.int64)
    args = carray(voidptr(cf[9]), (cf[7],), np.int64)
    rets = carray(voidptr(cf[14]), (cf[12],), np.int64)
    hb = carray(voidptr(args[0]), (6,), np.int64)
    hd = carray(voidptr(hb[5]), (2,), np.int64)
    H = carray(voidptr(hb[3]), (hd[0], hd[1]), DTYPE)
    group = carray(voidptr(data(args[1])), ((cf[7] - FIRST) // (2 + NS),), np.int32)
    head = carray(voidptr(data(args[2])), (2,), np.int32)
    pt = carray(voidptr(data(args[2])), (3 + head[0] + 3 * head[1],), np.int32)
    return args, rets, H, group, head[0], head[1], pt
"""

_WORK_SRC = """
def work(fa, rec):
    # claim pieces (runs of segments: a tensor's elements [first, first + size)) until none
    # is left; arguments: H, each tensor's row, the piece table, then per tensor its param,
    # gradient and slots; results: per tensor the param and slots, then the flags
    args, rets, H, group, pieces, segs, pt = views(fa)
    force = True
    if SKIP:
        force = forced(args)
    did = 0
    while True:
        k, dry = claim(rec, pieces, force)
        if k < 0:
            return did
        did += 1
        for e in range(pt[2 + k], pt[3 + k]):
            t = pt[3 + pieces + e]
            f = pt[3 + pieces + segs + e]
            m = pt[3 + pieces + 2 * segs + e]
            a = FIRST + (2 + NS) * t
            o = (1 + NS) * t
            off = f * ITEMSIZE
            r = group[t]
            if SKIP:
                if dry:  # the step computed from the inputs, not stored: its probe
                    P = carray(voidptr(data(args[a]) + off), (m,), DTYPE)
                    G = carray(voidptr(data(args[a + 1]) + off), (m,), DTYPE)
{dry_slots}
                    s = inner_dry(P, P, {slot_args}G, {row})
                    if not np.isfinite(s):  # (the new values unseen: taken as non-finite)
                        fetch_add(rec + 8 * 25, 1)
                        if not finite(data(args[a + 1]) + off, m, DTYPE):
                            fetch_add(rec + 8 * 24, 1)
                    continue
            for q in range(1 + NS):  # the param and slots in their results' buffers (the
                # same buffers where XLA aliased them, as it does: nothing to copy)
                src = data(args[a if q == 0 else a + 1 + q]) + off
                if src != data(rets[o + q]) + off:
                    copy(src, data(rets[o + q]) + off, m, DTYPE)
            P = carray(voidptr(data(rets[o]) + off), (m,), DTYPE)
            G = carray(voidptr(data(args[a + 1]) + off), (m,), DTYPE)
{slots}
            s = inner(P, P, {slot_args}G, {row})
            if force and not np.isfinite(s):  # (rare) which of the two is not finite
                if not finite(data(args[a + 1]) + off, m, DTYPE):
                    fetch_add(rec + 8 * 24, 1)
                for q in range(1 + NS):
                    if not finite(data(rets[o + q]) + off, m, DTYPE):
                        fetch_add(rec + 8 * 25, 1)
        fetch_add(rec + 128, 1)
"""

_REDUCE_WORK_SRC = """
def work(fa, rec):
    # a two-pass optimizer's first pass: per segment e of the piece table, the sums of the
    # terms into row e of the result R (segments, terms), reading only; arguments as the
    # update's; results: R, then the flags
    args, rets, H, group, pieces, segs, pt = views(fa)
    R = carray(voidptr(data(rets[0])), (segs, NTERMS), DTYPE)
    did = 0
    while True:
        k = fetch_add(rec + 64, 1)
        if k >= pieces:
            return did
        did += 1
        for e in range(pt[2 + k], pt[3 + k]):
            t = pt[3 + pieces + e]
            m = pt[3 + pieces + 2 * segs + e]
            a = 3 + (2 + NS) * t
            off = pt[3 + pieces + segs + e] * ITEMSIZE
            P = carray(voidptr(data(args[a]) + off), (m,), DTYPE)
            G = carray(voidptr(data(args[a + 1]) + off), (m,), DTYPE)
{slots}
            r = group[t]
            rinner(P, {slot_args}G, R[e], {row})
        fetch_add(rec + 128, 1)
"""


def piece_table(sizes: list[int], piece: int) -> np.ndarray:
    """The pieces the threads claim over tensors of ``sizes`` elements: runs of segments
    (a tensor's ``[first, first + size)``) of about ``piece`` elements each, a large
    tensor cut into several, small ones joined. ``[pieces, segments, bounds (pieces + 1),
    tensor, first, size (one per segment)]``, int32 (JAX passes no int64 without x64)."""
    seg_t, seg_f, seg_m, bounds, filled = [], [], [], [0], 0
    for t, n in enumerate(sizes):
        f = 0
        while f < n or (n == 0 and f == 0):
            m = min(piece - filled, n - f)
            seg_t.append(t)
            seg_f.append(f)
            seg_m.append(m)
            f, filled = f + m, filled + m
            if filled >= piece:
                bounds.append(len(seg_t))
                filled = 0
            if n == 0:
                break
    if bounds[-1] != len(seg_t):
        bounds.append(len(seg_t))
    return np.array([len(bounds) - 1, len(seg_t), *bounds, *seg_t, *seg_f, *seg_m],
                    dtype=np.int32)


@functools.cache
def api_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the XLA FFI C API jaxlib ships (its header), or None where the
    header is missing or its major version is not the 0 this layout was written for."""
    try:
        import jaxlib

        text = (Path(jaxlib.__file__).parent / "include/xla/ffi/api/c_api.h").read_text()
        major = int(re.search(r"#define XLA_FFI_API_MAJOR (\d+)", text).group(1))
        minor = int(re.search(r"#define XLA_FFI_API_MINOR (\d+)", text).group(1))
    except (ImportError, OSError, AttributeError, ValueError):
        return None
    return (major, minor) if major == 0 else None


def usable(leaves: list[Any], slot_dtypes: list[Any]) -> bool:
    """Whether the step over ``leaves`` (traced params) may run as one call here: on, the
    API known, one CPU device in the process, one float32/float64 dtype for every param and
    slot, no tensor beyond :data:`MAX_TENSOR` elements."""
    if not (ENABLED and leaves and api_version() is not None):
        return False
    import jax

    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    dt = leaves[0].dtype
    if dt not in (np.float32, np.float64) or any(x.dtype != dt for x in leaves) or any(
            d is not None and np.dtype(d) != dt for d in slot_dtypes):
        return False
    return max(int(np.prod(p.shape, dtype=np.int64)) for p in leaves) <= MAX_TENSOR


@functools.cache
def target(math_fn: Any, n_slots: int, n_scal: int, dtype: str, clip: bool,
           skip: bool = False) -> str:
    """The registered FFI target running ``math_fn`` (a name that depends on the kernel's
    content only, so that JAX's persistent cache finds a program in a later process,
    which registers the same name on its first trace); ``skip``: the variant that writes
    nothing unless the whole step is finite (:func:`fused_update`)."""
    ns, _, name = inner_namespace(math_fn, n_slots, n_scal, dtype, clip=clip)
    # (the dry loop only where it runs: each loop costs its compile on a first-ever run)
    ns["inner_dry"] = inner_namespace(math_fn, n_slots, n_scal, dtype, clip=clip,
                                      dry=True)[0]["inner"] if skip else ns["inner"]
    ns.update(SKIP=skip, FIRST=4 if skip else 3)
    slots = [f"S{i}" for i in range(n_slots)]
    src = _HANDLER_SRC + _WORK_SRC.format(
        slots="\n".join(f"            {s} = carray(voidptr(data(rets[o + {1 + i}]) + off), (m,), "
                        f"DTYPE)" for i, s in enumerate(slots)),
        dry_slots="\n".join(f"                    {s} = carray(voidptr(data(args[a + {2 + i}]) + "
                            f"off), (m,), DTYPE)" for i, s in enumerate(slots)),
        slot_args="".join(f"{s}, " for s in slots),
        row=", ".join(f"H[r, {i}]" for i in range(4 + n_scal)))
    return _register(ns, src, name, n_slots, dtype, "update")


@functools.cache
def reduce_target(reduce_fn: Any, n_slots: int, n_scal: int, n_terms: int, dtype: str,
                  clip: bool) -> str:
    """The registered FFI target of a two-pass optimizer's first pass (``reduce_fn``'s
    ``n_terms`` sums per segment, :func:`fused_reduce`), named as :func:`target`'s."""
    ns, _, name = reduce_namespace(reduce_fn, n_slots, n_scal, n_terms, dtype, clip)
    ns.update(SKIP=False, FIRST=3, NTERMS=n_terms)
    slots = [f"S{i}" for i in range(n_slots)]
    src = _HANDLER_SRC + _REDUCE_WORK_SRC.format(
        slots="\n".join(f"            {s} = carray(voidptr(data(args[a + {2 + i}]) + off), "
                        f"(m,), DTYPE)" for i, s in enumerate(slots)),
        slot_args="".join(f"{s}, " for s in slots),
        row=", ".join(f"H[r, {i}]" for i in range(4 + n_scal)))
    return _register(ns, src, name, n_slots, dtype, "reduce")


def _register(ns: dict[str, Any], src: str, name: str, n_slots: int, dtype: str,
              kind: str) -> str:
    """Compile the handler ``src`` in ``ns`` (its loop's namespace) as a C callable through
    the kernel cache, register it with XLA as ``mithril_<kind>_<cache key>`` and tell it
    its own address (:func:`.xla_pool.tell_address`)."""
    import jax

    major, minor = api_version()
    ns.update(forced=numba.njit(inline="always")(_forced), spin_pause=atomics.spin_pause,
              MAJOR=major, MINOR=minor, NS=n_slots, DTYPE=np.dtype(dtype).type,
              ITEMSIZE=np.dtype(dtype).itemsize, OWN=xla_pool.OWN,
              data=numba.njit(inline="always")(_data),
              finite=numba.njit(inline="always")(_finite),
              copy=numba.njit(inline="always")(_copy),
              address=xla_pool.address, job_table=xla_pool.job_table,
              open_job=xla_pool.open_job, enter=xla_pool.enter, close_job=xla_pool.close_job,
              threads=xla_pool.threads, schedule=xla_pool.schedule,
              own_address=xla_pool.own_address, keep_address=xla_pool.keep_address,
              fetch_add=atomics.fetch_add, load_acquire=atomics.load_acquire)
    kernel_cache.exec_source(src, name, ns)
    ns["work"] = numba.njit(inline="always")(ns["work"])
    ns["views"] = numba.njit(inline="always")(ns["views"])
    ns["claim"] = numba.njit(inline="always")(ns["claim"])
    fn = kernel_cache.cfunc(types.voidptr(types.voidptr), ns["handler"], fastmath=_FASTMATH,
                            error_model="numpy", nogil=True)
    module = getattr(fn._pyfunc, "__module__", "") or ""
    key = module.rsplit("_", 1)[-1] if module.startswith("_mithril_kernel_") else \
        f"p{os.getpid()}x{id(fn):x}"  # (compiled in memory: this process's own name)
    tname = f"mithril_{kind}_{key}"
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p,
                                                   ctypes.c_void_p]
    jax.ffi.register_ffi_target(tname, new(fn.address, None, None), platform="cpu")
    xla_pool.tell_address(fn)
    _keep.append(fn)  # (XLA holds the address only)
    return tname


_keep: list[Any] = []


def fused_update(math_fn: Any, clip: bool, table: Any, group: np.ndarray, ps: list[Any],
                 gs: list[Any], slots: list[list[Any]], pool: list | None = None,
                 skip: Any = None) -> tuple[list, list, Any, Any]:
    """One call updating every tensor (traced): ``table`` the rows of scalars
    (``[gscale, clip value, l2, keep, *scalars]``, the params' dtype), ``group`` each
    tensor's row, ``slots[s][i]`` slot ``s`` of tensor ``i``. Returns the new params, the
    new slots (as ``slots``), and whether the gradients and whether the new values were
    all finite (traced booleans); ``pool``, where given, gets how many pieces the thread
    pool's tasks did (traced int32: the rest the calling thread did).

    ``skip`` (``nonfinite="skip"``): a traced boolean, True where the step is applied
    whatever it holds (``max_consecutive_skips`` reached: one pass, as without ``skip``);
    else a dry pass computes the step without storing it, and the update pass follows only
    where its gradients and new values were all finite: a skipped step returns the inputs
    untouched, with no copy of the old arrays kept aside (the booleans are the dry pass's,
    so the step was applied exactly where both are True, or where forced)."""
    import jax

    dtype = np.dtype(ps[0].dtype).name
    name = target(math_fn, len(slots), table.shape[1] - 4, dtype, clip, skip is not None)
    sizes = [int(np.prod(p.shape, dtype=np.int64)) for p in ps]
    args: list[Any] = [table, np.asarray(group, np.int32), piece_table(sizes, PIECE)]
    if skip is not None:
        args.append(jax.numpy.asarray(skip, np.int32).reshape(1))
    new_ps, new_slots, flags = call_in_place(name, args, ps, gs, slots)
    if pool is not None:
        pool.append(flags[2])
    return new_ps, new_slots, flags[0] != 0, flags[1] != 0


def call_in_place(name: str, head: list[Any], ps: list[Any], gs: list[Any],
                  slots: list[list[Any]]) -> tuple[list, list, Any]:
    """The custom call ``name`` (traced) of the arguments ``head``, then per tensor its
    param, gradient (in the param's dtype) and slots; its results per tensor the new param
    and slots, each aliased to its argument (XLA writes them in place where it can: no
    copy), then the three int32 flags. Returns (new params, new slots as ``slots``, the
    flags)."""
    import jax

    n_slots = len(slots)
    args, outs, aliases = list(head), [], {}
    for i, (p, g) in enumerate(zip(ps, gs)):
        base, out = len(args), len(outs)
        args += [p, g.astype(p.dtype), *(s[i] for s in slots)]
        outs += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (p, *(s[i] for s in slots))]
        aliases[base] = out
        aliases.update({base + 2 + k: out + 1 + k for k in range(n_slots)})
    outs.append(jax.ShapeDtypeStruct((3,), np.int32))
    res = jax.ffi.ffi_call(name, outs, input_output_aliases=aliases)(*args)
    k = 1 + n_slots
    return ([res[k * i] for i in range(len(ps))],
            [[res[k * i + 1 + s] for i in range(len(ps))] for s in range(n_slots)], res[-1])


def fused_reduce(reduce_fn: Any, n_terms: int, clip: bool, table: Any, group: np.ndarray,
                 ps: list[Any], gs: list[Any], slots: list[list[Any]]) -> list[Any]:
    """A two-pass optimizer's first pass as one call (traced): per tensor, the sums of the
    ``n_terms`` terms of ``reduce_fn(p, g, *slots, *scalars)`` (the gradient scaled,
    clipped and decayed by ``table``'s first four columns, as :func:`fused_update`'s;
    its other columns the optimizer's own scalars), a list of ``n_terms`` arrays of shape
    ``(len(ps),)`` in the params' dtype. Each segment is summed in the kernel (in float64,
    tile by tile as :func:`.kernels.reduce_namespace`), the segments of a tensor here, in
    order: the sums do not depend on which thread did a piece."""
    import jax

    dtype = np.dtype(ps[0].dtype).name
    name = reduce_target(reduce_fn, len(slots), table.shape[1] - 4, n_terms, dtype, clip)
    sizes = [int(np.prod(p.shape, dtype=np.int64)) for p in ps]
    pt = piece_table(sizes, PIECE)
    pieces, segs = int(pt[0]), int(pt[1])
    args: list[Any] = [table, np.asarray(group, np.int32), pt]
    for i, (p, g) in enumerate(zip(ps, gs)):
        args += [p, g.astype(p.dtype), *(s[i] for s in slots)]
    res = jax.ffi.ffi_call(name, [jax.ShapeDtypeStruct((segs, n_terms), ps[0].dtype),
                                  jax.ShapeDtypeStruct((3,), np.int32)])(*args)
    seg_t = pt[3 + pieces:3 + pieces + segs]
    sums = jax.ops.segment_sum(res[0], seg_t, num_segments=len(ps), indices_are_sorted=True)
    return [sums[:, k] for k in range(n_terms)]
