"""Sharing one FFI call's pieces with XLA's own intra-op thread pool (:mod:`.xla_ffi`).

XLA's C API gives a handler ``XLA_FFI_ThreadPool_NumThreads`` and
``XLA_FFI_ThreadPool_Schedule`` (words 18 and 17 of the ``XLA_FFI_Api`` table: after
``struct_size``, ``extension_start``, the three words of ``api_version``, ``internal_api``
and eleven functions, ``XLA_FFI_Error_Destroy`` the third of them, word 8). A task is a C
function of one ``void*``: the handler itself, given an integer with its top bit set
instead of a call frame (user-space pointers never have it), holding a job's slot and
generation.

A job lives in a slot of a table compiled into the handler's own code (a zeroed global of
:data:`SLOTS` records of :data:`RECORD` words), not in any of the call's buffers: a task
XLA starts after the call returned (the pool was busy) reads only that table, finds its
generation gone or the job closed, and returns. Words of a record: [0] generation, [1] the
call frame, [2] tasks inside the job, [3] closed, [4] owner count, [8] pieces claimed (its
own cache line), [16] pieces done, [24] non-finite gradients seen, [25] non-finite new
values seen, [26] pieces the tasks did, [32:37] the arguments of an XLA call. The calling
thread claims pieces with the tasks (:mod:`.atomics`' counters) and claims whatever no task
took, so a task that comes late or never costs nothing; it returns once every piece is done
and no task is inside the job (those inside are working, so the wait is short). The one
wait inside a job, ``nonfinite="skip"``'s (:mod:`.xla_ffi`: an update piece is claimed
once every dry piece is done), is as short: every dry piece is claimed by a running thread.
"""

from __future__ import annotations

from typing import Any

import llvmlite.ir as ir
import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .atomics import fetch_add, load_acquire, spin_pause
from .kernels import voidptr

SLOTS, RECORD = 64, 48
_TABLE = "mithril_xla_jobs"
_I64 = ir.IntType(64)
#: the top bit: a task's argument, not a call frame; with the next bit too, the handler's own
#: address (:func:`tell_address`)
TASK, OWN = -(1 << 63), 1 << 62


@intrinsic
def address(typingctx, ptr):  # pragma: no cover - compiled by numba
    """A void pointer as an int64."""
    if isinstance(ptr, types.RawPointer):
        def codegen(context, builder, sig, args):
            return builder.ptrtoint(args[0], _I64)
        return types.int64(ptr), codegen
    return None


@intrinsic
def call(typingctx, fn, arg):  # pragma: no cover - compiled by numba
    """``((void* (*)(void*)) fn)(arg)`` (addresses as int64s), its result as an int64."""
    if isinstance(fn, types.Integer) and isinstance(arg, types.Integer):
        def codegen(context, builder, sig, args):
            fnty = ir.FunctionType(cgutils.voidptr_t, [cgutils.voidptr_t])
            f = builder.inttoptr(args[0], fnty.as_pointer())
            return builder.ptrtoint(builder.call(f, [builder.inttoptr(args[1],
                                                                      cgutils.voidptr_t)]), _I64)
        return types.int64(types.int64, types.int64), codegen
    return None


@intrinsic
def job_table(typingctx):  # pragma: no cover - compiled by numba
    """The address of this code's own zeroed table of :data:`SLOTS` job records, then the
    handler's own address (:data:`OWN`, set by :func:`tell_address`)."""
    def codegen(context, builder, sig, args):
        ty = ir.ArrayType(_I64, SLOTS * RECORD + 8)
        try:  # (one table for every use in the module)
            g = builder.module.get_global(_TABLE)
        except KeyError:
            g = ir.GlobalVariable(builder.module, ty, _TABLE)
            g.linkage = "internal"
            g.initializer = ir.Constant(ty, None)
            g.align = 64
        return builder.ptrtoint(g, _I64)
    return types.int64(), codegen


def tell_address(fn: Any) -> None:
    """Call the compiled handler ``fn`` once with its own address (in every process, before
    XLA calls it): a handler schedules itself as the pool's task."""
    import ctypes

    ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int64)(fn.address)(TASK | OWN | fn.address)


@numba.njit(inline="always", nogil=True)
def own_address(table):  # pragma: no cover - compiled by numba
    """The handler's address :func:`tell_address` stored (0 before)."""
    return load_acquire(table + 8 * SLOTS * RECORD)


@numba.njit(inline="always", nogil=True)
def keep_address(table, x):  # pragma: no cover - compiled by numba
    numba.carray(voidptr(table + 8 * SLOTS * RECORD), (1,), np.int64)[0] = x & (OWN - 1)
    fetch_add(table + 8 * SLOTS * RECORD, 0)  # (a full barrier)


@numba.njit(inline="always", nogil=True)
def threads(api, ctx, rec):  # pragma: no cover - compiled by numba
    """The intra-op pool's thread count (1 where XLA has none or its API is older)."""
    A = numba.carray(voidptr(api), (19,), np.int64)
    if A[0] < 19 * 8:
        return 1
    W = numba.carray(voidptr(rec), (RECORD,), np.int64)
    W[32], W[33], W[34], W[35] = 32, 0, ctx, address(voidptr(rec + 8 * 36))
    W[36] = 1
    err = call(A[18], rec + 8 * 32)
    if err != 0:
        drop(A, err, rec)
        return 1
    return max(W[36], 1)


@numba.njit(inline="always", nogil=True)
def drop(A, err, rec):  # pragma: no cover - compiled by numba
    """``XLA_FFI_Error_Destroy`` of an error XLA returned."""
    W = numba.carray(voidptr(rec), (RECORD,), np.int64)
    W[32], W[33], W[34] = 24, 0, err
    call(A[8], rec + 8 * 32)


@numba.njit(inline="always", nogil=True)
def schedule(api, ctx, task, data, rec):  # pragma: no cover - compiled by numba
    """Schedule ``task(data)`` on the pool; False where XLA refused it."""
    A = numba.carray(voidptr(api), (19,), np.int64)
    W = numba.carray(voidptr(rec), (RECORD,), np.int64)
    W[32], W[33], W[34], W[35], W[36] = 40, 0, ctx, task, data
    err = call(A[17], rec + 8 * 32)
    if err != 0:
        drop(A, err, rec)
        return False
    return True


@numba.njit(inline="always", nogil=True)
def open_job(table, frame):  # pragma: no cover - compiled by numba
    """A free record (spinning while all are taken: each holder is working), reset for the
    call at ``frame``; returns (its address, the task argument of this job)."""
    s = 0
    while True:
        rec = table + 8 * RECORD * s
        if fetch_add(rec + 32, 1) == 0:
            break
        fetch_add(rec + 32, -1)
        s = (s + 1) % SLOTS
        if s == 0:
            spin_pause()
    W = numba.carray(voidptr(rec), (RECORD,), np.int64)
    W[1], W[3], W[8], W[16], W[24], W[25], W[26] = frame, 0, 0, 0, 0, 0, 0
    gen = (fetch_add(rec, 1) + 1) & 0xFFFFFFFF
    return rec, TASK | (s << 32) | gen


@numba.njit(inline="always", nogil=True)
def enter(x, table):  # pragma: no cover - compiled by numba
    """The record of the job of task argument ``x``, the task now inside it; 0 where that
    job is over (the task returns at once)."""
    rec = table + 8 * RECORD * ((x >> 32) & 0x7FFF)
    gen = x & 0xFFFFFFFF
    if (load_acquire(rec) & 0xFFFFFFFF) != gen:
        return 0
    fetch_add(rec + 16, 1)
    if (load_acquire(rec) & 0xFFFFFFFF) != gen or load_acquire(rec + 24) != 0:
        fetch_add(rec + 16, -1)
        return 0
    return rec


@numba.njit(inline="always", nogil=True)
def close_job(rec, pieces):  # pragma: no cover - compiled by numba
    """Wait for every piece and for the tasks inside to leave; then read the job's counts
    (non-finite gradients, non-finite new values, pieces the tasks did) and free the record
    (after: another call may take it at once)."""
    while load_acquire(rec + 128) < pieces:
        spin_pause()
    fetch_add(rec + 24, 1)
    while load_acquire(rec + 16) != 0:
        spin_pause()
    W = numba.carray(voidptr(rec), (RECORD,), np.int64)
    counts = (W[24], W[25], W[26])
    fetch_add(rec + 32, -1)
    return counts
