"""Non-temporal ("streaming") stores for kernels that write a buffer they do not read.

A normal store first reads the cache line it writes (write-allocate): a kernel that reads
``P`` and writes a second buffer ``Q`` moves 4 extra bytes per float32 element. Streaming
stores skip that read. Only JAX's double-buffered parameters (:mod:`.numba_engine`) need
them; elsewhere parameters are updated in place, where the line is read anyway.

Used on x86-64 only, over 64-byte aligned runs whose length is a multiple of 16 elements
(the kernel checks), ended by an ``sfence`` so the data is visible before the kernel
returns; and only when a step's buffers do not fit in the last-level cache (:func:`worth_it`):
a streaming store always goes to memory, while a cached one may never have to.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import llvmlite.ir as ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

AVAILABLE = platform.machine().lower() in ("x86_64", "amd64")
_DEFAULT_CACHE = 32 << 20


@functools.cache
def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs; 32 MiB where it cannot be read)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=_DEFAULT_CACHE)


def worth_it(working_set_bytes: int) -> bool:
    """Whether streaming stores pay for a step touching ``working_set_bytes``: only when that
    exceeds the last-level cache, so that the written lines would be evicted anyway."""
    return AVAILABLE and working_set_bytes > last_level_cache_bytes()


@intrinsic
def stream_store(typingctx, arr, idx, val):  # pragma: no cover - compiled by numba
    """``arr[idx] = val`` as a non-temporal store (``arr`` contiguous, ``idx`` in range).

    The store claims 32-byte alignment so that LLVM may vectorise it into aligned
    streaming vector stores: callers use it only from a 64-byte aligned start, for a
    multiple of 16 elements, indexing from 0 with step 1."""
    if isinstance(arr, types.Array) and isinstance(idx, types.Integer):
        def codegen(context, builder, sig, args):
            a, i, v = args
            ary = context.make_array(sig.args[0])(context, builder, a)
            v = context.cast(builder, v, sig.args[2], sig.args[0].dtype)
            store = builder.store(v, builder.gep(ary.data, [i]))
            store.align = 32
            store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
            return context.get_dummy_value()
        return types.void(arr, idx, val), codegen
    return None


@intrinsic
def store_fence(typingctx):  # pragma: no cover - compiled by numba
    """``sfence``: order streaming stores before any later store (no-op off x86)."""
    def codegen(context, builder, sig, args):
        if AVAILABLE:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse.sfence")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def address(typingctx, arr):  # pragma: no cover - compiled by numba
    """The address of ``arr``'s first element, as an integer."""
    if isinstance(arr, types.Array):
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            return builder.ptrtoint(ary.data, ir.IntType(64))
        return types.int64(arr), codegen
    return None
