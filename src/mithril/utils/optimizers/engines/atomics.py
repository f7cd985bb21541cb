"""Atomic int64 operations on raw addresses, for numba kernels that share work between
threads (:mod:`.threads`): counters to claim pieces of work and one to count those done."""

from __future__ import annotations

from typing import Any

import llvmlite.ir as ir
import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import streaming

_I64 = ir.IntType(64)


def _ptr(builder: Any, addr: Any) -> Any:
    return builder.inttoptr(addr, _I64.as_pointer())


@intrinsic
def fetch_add(typingctx, addr, value):  # pragma: no cover - compiled by numba
    """Atomically add ``value`` to the int64 at ``addr`` (a full barrier); returns the
    previous value."""
    if isinstance(addr, types.Integer) and isinstance(value, types.Integer):
        def codegen(context, builder, sig, args):
            return builder.atomic_rmw("add", _ptr(builder, args[0]), args[1], "seq_cst")
        return types.int64(types.int64, types.int64), codegen
    return None


@intrinsic
def load_acquire(typingctx, addr):  # pragma: no cover - compiled by numba
    """The int64 at ``addr``; later reads see every write made before it was stored."""
    if isinstance(addr, types.Integer):
        def codegen(context, builder, sig, args):
            return builder.load_atomic(_ptr(builder, args[0]), "acquire", 8)
        return types.int64(types.int64), codegen
    return None


@intrinsic
def spin_pause(typingctx):  # pragma: no cover - compiled by numba
    """``pause`` on x86 (a polite busy-wait); nothing elsewhere."""
    def codegen(context, builder, sig, args):
        if streaming.AVAILABLE:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


# -- the protocol of a kernel whose pieces are shared between threads (:class:`.threads.Plan`),
# in an int64 array ``sync`` (:func:`new_sync`): [0] how many threads arrived, [1] the number
# of ranges, [2] of pieces; 64 bytes on (another cache line) the count of pieces done; from
# [16] one word per range, the pieces claimed from its front (low 32 bits) and back (high).
#
# The pieces are cut into one contiguous range per thread that may take part. A thread
# (``slot = arrive(sync)``: the calling thread arrives first) claims its own range's pieces
# front to back, so that it streams through contiguous memory as torch's statically split
# loops do (interleaved pieces restart every stream at each piece: 10% slower on 10M
# parameters); then it takes the others' pieces from their back ends, so a thread that is
# late or never comes costs nothing but its share. With one range every thread claims its
# front: the pieces go in order (a queue, e.g. largest first).

_LOW = (1 << 32) - 1


def new_sync(pieces: int, ranges: int) -> np.ndarray:
    """The ``sync`` array of a job of ``pieces`` pieces in ``ranges`` ranges (>= 1)."""
    sync = np.zeros(16 + max(ranges, 1), dtype=np.int64)
    sync[1], sync[2] = max(ranges, 1), pieces
    return sync


@numba.njit(inline="always", nogil=True)
def arrive(sync: Any) -> int:  # pragma: no cover - compiled by numba
    """This thread's slot: how many threads arrived before it."""
    return fetch_add(streaming.address(sync), 1)


@numba.njit(inline="always", nogil=True)
def claim(sync: Any, slot: int) -> int:  # pragma: no cover - compiled by numba
    """The next piece for the thread of ``slot`` (>= the number of pieces once all are taken):
    its own range's front, else another range's back."""
    base = streaming.address(sync)
    ranges, n = sync[1], sync[2]
    if ranges == 1:  # one queue, in order
        old = fetch_add(base + 128, 1)
        return old if old < n else n
    if slot < ranges:
        lo, hi = slot * n // ranges, (slot + 1) * n // ranges
        old = fetch_add(base + 8 * (16 + slot), 1)
        if lo + (old & _LOW) < hi - (old >> 32):
            return lo + (old & _LOW)
    for d in range(1, ranges + 1):  # (the own range last: exhausted, or slot >= ranges)
        r = (slot + d) % ranges
        lo, hi = r * n // ranges, (r + 1) * n // ranges
        word = base + 8 * (16 + r)
        now = load_acquire(word)
        if (now & _LOW) + (now >> 32) >= hi - lo:  # (a claim counts even when it fails)
            continue
        old = fetch_add(word, 1 << 32)
        if lo + (old & _LOW) < hi - (old >> 32):
            return hi - 1 - (old >> 32)
    return n


@numba.njit(inline="always", nogil=True)
def piece_done(sync: Any) -> None:  # pragma: no cover - compiled by numba
    """Count one piece done (after its results are written: the add is a full barrier)."""
    fetch_add(streaming.address(sync) + 64, 1)


@numba.njit(inline="always", nogil=True)
def all_done(sync: Any, pieces: int, spins: int) -> float:  # pragma: no cover - compiled by numba
    """1.0 once every piece is done, waiting up to ``spins`` busy-waits; else 0.0."""
    done = streaming.address(sync) + 64
    while load_acquire(done) < pieces:
        if spins == 0:
            return 0.0
        spin_pause()
        spins -= 1
    return 1.0
