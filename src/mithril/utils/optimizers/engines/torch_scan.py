"""The torch gradient scan: checks and locates a step's gradients in C-speed passes, with no
compiler.

A torch step over thousands of small tensors is dominated by reading each tensor's type,
shape, dtype, contiguity, device and address from Python (~0.4 us per tensor, 0.8 ms for
2,000). Here one call of torch's own tensor guard (the C++ check ``torch.compile`` runs on
its inputs: exact type, dispatch keys - device, layout, lazy negation or conjugation -, dtype,
``requires_grad``, sizes and strides) checks every gradient at once, and the addresses are
read by one numba pass over the tensors' objects (:func:`_locate`).

Why a compiled pass for the addresses: a training step has just streamed megabytes through
the cache, so each tensor's metadata is cold, and ``Tensor.data_ptr`` from Python follows
three dependent pointers (the Python object, its ``TensorImpl``, its ``StorageImpl``) one
tensor at a time: ~0.6 ms for 2,000 tensors, the guard after it ~0.4 ms more. The numba loop
issues those loads for many tensors at once (the CPU overlaps the misses: ~0.1 ms) and
leaves the ``TensorImpl`` lines in cache for the guard, which runs next. The offsets it
reads are torch internals, not a public ABI, so they are found on first use by looking for
known values (``Tensor._cdata``, the storage's address and data pointer, a storage offset)
in sample tensors' memory, and used only where each is the one offset that agrees on every
sample; every scan also compares its first and last addresses with ``data_ptr()``. Where
anything disagrees the addresses are read by ``data_ptr`` from Python; so are one or two
tensors' (that comparison reads them all: the pass would only add its dispatch).

The guard is a private torch API: where it is missing or behaves otherwise than expected,
or with ``MITHRIL_TORCH_SCAN=0``, :func:`make` returns None and the engine reads each
tensor from Python instead - the same results, slower on many tensors.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from typing import Any

import numpy as np
from numba import types
from numba.extending import intrinsic

from . import kernel_cache

log = logging.getLogger(__name__)


@intrinsic
def _load(typingctx, addr):  # pragma: no cover - compiled by numba
    """The int64 stored at integer address ``addr``."""
    if isinstance(addr, types.Integer):
        def codegen(context, builder, signature, args):
            return builder.load(builder.inttoptr(args[0], context.get_value_type(
                types.int64).as_pointer()))
        return types.int64(addr), codegen
    return None


@kernel_cache.jit(nogil=True)
def _locate(ids, type_addr, o_impl, o_storage, o_offset, o_data, itemsize, out):  # pragma: no cover
    """Fill ``out[:n]`` with the data addresses of the ``n`` tensors at ``ids`` (object
    addresses): storage data + storage offset x itemsize (``out[n]``: the XOR of the words
    read only to bring the tensors' metadata into cache, all within the first 200 bytes of
    a ``TensorImpl``, whose fields reach further). Returns -1, or the index of the first
    object that is not exactly a ``torch.Tensor`` with an implementation and a storage (its
    fields are read only after its type is checked: only a tensor's own memory is read)."""
    touch = 0
    for i in range(ids.shape[0]):
        obj = ids[i]
        if _load(obj + 8) != type_addr:
            return i
        impl = _load(obj + o_impl)
        if impl == 0:
            return i
        storage = _load(impl + o_storage)
        if storage == 0:
            return i
        # the lines of the TensorImpl that the guard reads next (sizes, dtype, dispatch keys)
        touch ^= _load(impl + 64) ^ _load(impl + 128) ^ _load(impl + 192)
        out[i] = _load(storage + o_data) + _load(impl + o_offset) * itemsize
    out[ids.shape[0]] = touch  # (kept: the loads are not optimised away)
    return -1


def _words(addr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(addr)).copy()


def _offset(samples: list, base: Any, n: int, want: Any) -> int | None:
    """The one offset (a multiple of 8 below ``8 n``) at which every sample's memory at
    ``base(t)`` holds ``want(t)``; None if there is not exactly one."""
    common = None
    for t in samples:
        hits = {8 * int(k) for k in np.flatnonzero(_words(base(t), n) == want(t))}
        common = hits if common is None else common & hits
    return common.pop() if common is not None and len(common) == 1 else None


@functools.cache
def _layout() -> tuple[int, int, int, int] | None:
    """(object -> TensorImpl, TensorImpl -> StorageImpl, TensorImpl -> storage offset,
    StorageImpl -> data) offsets of this torch, found and checked on sample tensors; None
    where any is not found unambiguously."""
    import torch

    try:
        base = torch.zeros(40000)
        leaf = torch.zeros(3, requires_grad=True)
        (leaf * 2).sum().backward()
        samples = [base[12345:12351].view(2, 3), base[777:780], base[1:2].view(()),
                   torch.from_numpy(np.arange(7.0)), torch.arange(9, dtype=torch.int64)[2:],
                   leaf.grad, torch.zeros(2, 0, 3), torch.ones(()), torch.randn(4, 5)]
        if any(type(t) is not torch.Tensor for t in samples):
            return None
        basic = torch.Tensor.__basicsize__ // 8
        o_impl = _offset(samples, id, basic, lambda t: t._cdata)
        if o_impl is None:
            return None
        impl = lambda t: int(_words(id(t) + o_impl, 1)[0])  # noqa: E731
        o_storage = _offset(samples, impl, 24, lambda t: t.untyped_storage()._cdata)
        o_offset = _offset(samples, impl, 24, lambda t: t.storage_offset())
        o_data = _offset(samples, lambda t: t.untyped_storage()._cdata, 6,
                         lambda t: t.untyped_storage().data_ptr())
        if None in (o_storage, o_offset, o_data):
            return None
        found = (o_impl, o_storage, o_offset, o_data)
        for t in samples:  # each sample on its own itemsize
            one = np.zeros(2, dtype=np.int64)
            if _locate(np.array([id(t)], np.int64), id(torch.Tensor), *found, t.element_size(),
                       one) != -1 or int(one[0]) != t.data_ptr():
                return None
        return found
    except Exception as e:  # noqa: BLE001 - another torch: only costs speed
        log.debug("torch tensor fields not located: %s", e)
        return None


def enabled() -> bool:
    return os.environ.get("MITHRIL_TORCH_SCAN", "1").strip().lower() not in ("0", "false", "no", "off")


def fields_enabled() -> bool:
    """Whether addresses are read by :func:`_locate` (``MITHRIL_TORCH_SCAN=guard``: by
    ``data_ptr`` from Python, after the guard)."""
    return os.environ.get("MITHRIL_TORCH_SCAN", "1").strip().lower() != "guard"


class Scan:
    """``scan(vals)``: the data addresses of ``vals`` (a list, in layout order) when every
    one is an exact ``torch.Tensor`` on the CPU, dense, contiguous (row-major strides), of
    the expected shape and dtype, with no lazy negation or conjugation and no
    ``requires_grad``; else None (the engine then takes its checked path, which names a
    fault or makes a contiguous copy)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: Any) -> None:
        import torch
        from torch._C._dynamo.guards import TensorGuards

        self._data_ptr = torch.Tensor.data_ptr
        # views of one buffer stand for the expected tensors (only their metadata is read;
        # an untouched allocation commits no memory)
        base = torch.empty(max(map(math.prod, shapes), default=0), dtype=dtype)
        examples = [base[:math.prod(s)].view(s) for s in shapes]
        self._type, self._itemsize = id(torch.Tensor), base.element_size()
        self._fields = _layout() if fields_enabled() else None
        self._guard = TensorGuards(
            *examples, dynamic_dims_sizes=[list(t.shape) for t in examples],
            dynamic_dims_strides=[list(t.stride()) for t in examples])
        self._n = len(examples)
        # the guard must accept the expected tensors and refuse others, or it is not used
        if not self._guard.check(*examples):
            raise RuntimeError("the torch tensor guard refuses the expected tensors")
        if examples:
            odd = [torch.empty(examples[0].shape, dtype=torch.int8), *examples[1:]]
            if self._guard.check(*odd):
                raise RuntimeError("the torch tensor guard accepts a tensor of another dtype")

    def __call__(self, vals: list) -> np.ndarray | None:
        n = self._n
        if len(vals) != n:
            return None
        if self._fields is not None and n > 2:  # (up to two, the check below reads them all)
            out = np.empty(n + 1, dtype=np.int64)
            bad = _locate(np.fromiter(map(id, vals), np.int64, n), self._type, *self._fields,
                          self._itemsize, out)
            out = out[:n]
            if bad >= 0 or not self._guard.check(*vals):
                return None
            if out[0] == self._data_ptr(vals[0]) and out[-1] == self._data_ptr(vals[-1]):
                return out
            log.warning("torch tensor fields read wrong addresses; reading data_ptr instead")
            self._fields = None
        elif not self._guard.check(*vals):
            return None
        return np.fromiter(map(self._data_ptr, vals), np.int64, n)


#: torch releases whose private tensor guard this was checked against; on others (whose
#: guard constructor might crash rather than raise) the engine takes the Python path
TESTED_TORCH = ("2.13.",)


def make(shapes: list[tuple[int, ...]], dtype: Any) -> Scan | None:
    """The scan for gradients of these shapes and torch ``dtype``; None if disabled, on a
    torch release it was not checked against, or if this torch has no usable tensor guard."""
    import torch

    if not enabled() or not torch.__version__.startswith(TESTED_TORCH):
        return None
    try:
        return Scan(shapes, dtype)
    except Exception:  # noqa: BLE001 - another torch version: only costs speed
        return None
