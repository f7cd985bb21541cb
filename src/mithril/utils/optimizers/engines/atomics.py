"""Atomic int64 operations on raw addresses, for numba kernels that share work between
threads (:mod:`.threads`): a counter to claim pieces of work and one to count those done."""

from __future__ import annotations

from typing import Any

import llvmlite.ir as ir
import numba
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


# -- the protocol of a kernel whose pieces are shared between threads (:class:`.threads.Plan`):
# ``sync`` holds the next piece to claim and, 64 bytes on (another cache line), the count of
# pieces done.

@numba.njit(inline="always", nogil=True)
def claim(sync: Any) -> int:  # pragma: no cover - compiled by numba
    """The next unclaimed piece (>= the number of pieces once all are taken)."""
    return fetch_add(streaming.address(sync), 1)


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
