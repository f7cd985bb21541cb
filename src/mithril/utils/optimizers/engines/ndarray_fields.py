"""Validate NumPy gradients and collect their addresses in one compiled pass.

Reading ``shape``, ``dtype`` and ``ctypes.data`` from Python costs ~1 us per array: for
2,000 small tensors that is more than the update itself. The fields live in NumPy's
public C struct (``PyArrayObject_fields``: ``data, nd, dimensions, strides, base, descr,
flags`` after the object header), so a numba loop reads them from the objects' addresses
while the caller holds references to the objects. The offsets are checked against
NumPy's own answers on first use; where they differ (debug or free-threaded CPython
builds), :func:`scan` returns None and callers take the Python path.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from numba import types
from numba.extending import intrinsic

from . import kernel_cache

_HEAD = object.__basicsize__  # ob_refcnt + ob_type (16 bytes on a regular 64-bit build)
_TYPE, _DATA, _ND, _DIMS, _DESCR, _FLAGS = 8, _HEAD, _HEAD + 8, _HEAD + 16, _HEAD + 40, _HEAD + 48
_C_CONTIGUOUS = 0x1


@intrinsic
def _load(typingctx, addr, ty):  # pragma: no cover - compiled by numba
    """The value of type ``ty`` (int32 or int64) stored at integer address ``addr``."""
    if isinstance(addr, types.Integer) and isinstance(ty, types.NumberClass):
        to = ty.instance_type

        def codegen(context, builder, signature, args):
            ptr = builder.inttoptr(args[0], context.get_value_type(to).as_pointer())
            return builder.load(ptr)
        return to(addr, ty), codegen
    return None


@kernel_cache.jit(nogil=True)
def _scan(ids, type_addr, descr_addr, ndims, dims, dim_off, out):  # pragma: no cover - numba
    """Fill ``out`` with the data addresses of the arrays at ``ids``; return -1, or the index
    of the first one that is not a C-contiguous ndarray of the expected dtype and shape."""
    for i in range(ids.shape[0]):
        obj = ids[i]
        if _load(obj + _TYPE, np.int64) != type_addr or _load(obj + _DESCR, np.int64) != descr_addr:
            return i
        nd = _load(obj + _ND, np.int32)
        if nd != ndims[i] or (_load(obj + _FLAGS, np.int32) & _C_CONTIGUOUS) == 0:
            return i
        dp = _load(obj + _DIMS, np.int64)
        for k in range(nd):
            if _load(dp + 8 * k, np.int64) != dims[dim_off[i] + k]:
                return i
        out[i] = _load(obj + _DATA, np.int64)
    return -1


class Expected:
    """What :func:`scan` checks arrays against: one dtype and a shape per array."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.ndims = np.array([len(s) for s in shapes], dtype=np.int32)
        self.dims = np.array([d for s in shapes for d in s] or [0], dtype=np.int64)
        self.dim_off = np.concatenate([[0], np.cumsum(self.ndims)[:-1]]).astype(np.int64)


def scan(vals: list, expected: Expected) -> np.ndarray | None:
    """Data addresses of ``vals`` if every one is a C-contiguous ``np.ndarray`` of the
    expected dtype and shape, else None (the caller then checks them one by one)."""
    if not _verified() or len(vals) != len(expected.ndims):
        return None
    ids = np.fromiter(map(id, vals), np.int64, len(vals))
    out = np.empty(len(vals), dtype=np.int64)
    bad = _scan(ids, id(np.ndarray), id(expected.dtype), expected.ndims, expected.dims,
                expected.dim_off, out)
    return out if bad < 0 else None


def _scan_one(a: Any, shape: tuple, dtype: Any) -> int | None:
    """The address :func:`_scan` reads for ``a`` checked against ``shape``/``dtype``, or None."""
    exp = Expected([shape], dtype)
    out = np.zeros(1, dtype=np.int64)
    bad = _scan(np.array([id(a)], dtype=np.int64), id(np.ndarray), id(exp.dtype), exp.ndims,
                exp.dims, exp.dim_off, out)
    return int(out[0]) if bad < 0 else None


@functools.cache
def _verified() -> bool:
    """Whether the struct offsets hold on this interpreter (checked once, on sample arrays)."""
    try:
        samples = [np.zeros((3, 4), np.float32), np.zeros(5, np.float64), np.zeros((2, 3))[:, 1],
                   np.zeros(()), np.zeros((2, 0, 3), np.float32)]
        for a in samples:
            want = a.ctypes.data if a.flags.c_contiguous else None
            if _scan_one(a, a.shape, a.dtype) != want:
                return False
        a = samples[0]  # a wrong shape and a wrong dtype are caught
        return _scan_one(a, (4, 3), a.dtype) is None and _scan_one(a, a.shape, np.float64) is None
    except Exception:  # pragma: no cover - an interpreter numba cannot compile this for
        return False
