"""Compiled loops for the NumPy ReLU and Linear's bias, where NumPy's ufuncs are slow.

``np.maximum(x, 0, out=x)`` runs at ~3 GB/s (NaN-propagating maximum against a broadcast
scalar: ~5.5 us for a (128, 128) float32 activation), and the VJP ``g * ~(out <= 0)`` is two
passes and a boolean temporary. :func:`relu` and :func:`relu_vjp` are one pass each,
~1 us there. The same results, bit for bit: ``x`` where ``x > 0`` or NaN, else +0 (NumPy's
maximum gives +0 for -0 too), and the VJP multiplies ``g`` by 1.0 or 0.0 (a NaN or infinite
cotangent where ``out <= 0`` gives NaN, as NumPy's product with the mask).

Linear's bias: ``y += b`` over the rows of a matrix (NumPy's broadcast add: ~2.5 us for a
(128, 128) float32 matrix, ~1 us here) and the bias gradient, the column sums of the
cotangent (``g.sum(axis=0)``: 3 us, ~1 us here; large matrices ~2x faster too). The same
results bit for bit: NumPy also adds the rows one after another into sums that start at
+0.

Compiled for float32 and float64 (C-contiguous arrays) on first use on a machine, then
cached on disk (:mod:`mithril.utils.optimizers.engines.kernel_cache`); other arrays take the
NumPy expressions.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

#: the dtypes the loops are compiled for
COMPILED = (np.dtype(np.float32), np.dtype(np.float64))


@functools.cache
def _kernels() -> tuple[Any, ...]:
    from ..utils.optimizers.engines import kernel_cache

    # NumPy's maximum(x, 0): x where x > 0 or NaN, else +0 (one unordered compare: a
    # vectorised select). ``zero`` (0 in the dtype) is read once, before the loop: were it
    # read inside, a store might change it, and the loop would not be vectorised. In-place
    # twins take one array: two that may overlap would run the scalar loop.
    @kernel_cache.jit(nogil=True)
    def relu(x, out, zero):  # pragma: no cover - compiled
        z = zero[0]
        for i in range(x.size):
            v = x[i]
            out[i] = v if not v <= z else z

    @kernel_cache.jit(nogil=True)
    def relu_inplace(x, zero):  # pragma: no cover - compiled
        z = zero[0]
        for i in range(x.size):
            v = x[i]
            x[i] = v if not v <= z else z

    # the VJP: g times the mask as 1 or 0 in g's dtype (0 * NaN = NaN, as NumPy); a NaN output
    # passes g, as torch's threshold_backward (out <= 0 picks 0)
    @kernel_cache.jit(nogil=True)
    def relu_vjp(g, out, res, zero):  # pragma: no cover - compiled
        z = zero[0]
        for i in range(g.size):
            res[i] = g[i] if not out[i] <= z else g[i] * z

    @kernel_cache.jit(nogil=True)
    def relu_vjp_inplace(g, out, zero):  # pragma: no cover - compiled
        z = zero[0]
        for i in range(g.size):
            g[i] = g[i] if not out[i] <= z else g[i] * z

    @kernel_cache.jit(nogil=True)
    def add_rows(y, b):  # pragma: no cover - compiled
        n, m = y.shape
        for i in range(n):
            for j in range(m):
                y[i, j] += b[j]

    @kernel_cache.jit(nogil=True)
    def column_sums(g, out):  # pragma: no cover - compiled
        n, m = g.shape  # from +0, each row added in turn, as NumPy (0 + -0 is +0)
        for j in range(m):
            out[j] = 0
        for i in range(n):
            for j in range(m):
                out[j] += g[i, j]

    return relu, relu_inplace, relu_vjp, relu_vjp_inplace, add_rows, column_sums


@functools.cache
def _zero(dtype: np.dtype) -> np.ndarray:
    return np.zeros(1, dtype)


def _flat(a: np.ndarray, b: np.ndarray | None = None, c: np.ndarray | None = None) -> bool:
    """Whether the loops take these arrays: one compiled dtype, one shape, C-contiguous.
    (Spelled out, not a generator: it runs several times in every step of a model.)"""
    dt = a.dtype
    if dt not in COMPILED or not a.flags.c_contiguous:
        return False
    if b is not None and (b.dtype != dt or b.shape != a.shape or not b.flags.c_contiguous):
        return False
    return c is None or (c.dtype == dt and c.shape == a.shape and c.flags.c_contiguous)


def relu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``np.maximum(x, 0)`` into ``out`` (``x`` itself: in place; None: a new array)."""
    if out is None:
        if not _flat(x):  # NumPy's result dtype (a bool input gives integers)
            return np.maximum(x, 0)
        out = np.empty_like(x, order="C")
    if not _flat(x, out):
        return np.maximum(x, 0, out=out)
    if out is x:
        _kernels()[1](x.reshape(-1), _zero(x.dtype))
    else:
        _kernels()[0](x.reshape(-1), out.reshape(-1), _zero(x.dtype))
    return out


def relu_vjp(g: np.ndarray, out: np.ndarray, res: np.ndarray | None = None) -> np.ndarray:
    """``g * ~(out <= 0)`` into ``res`` (``g`` itself: in place; None: a new array)."""
    if res is None:
        if not _flat(g, out):
            return g * ~(out <= 0)
        res = np.empty_like(g, order="C")
    if not _flat(g, out, res) or (res is not g and np.may_share_memory(res, g)) or (
            np.may_share_memory(res, out)):
        return np.multiply(g, ~(out <= 0), out=res)
    if res is g:
        _kernels()[3](g.reshape(-1), out.reshape(-1), _zero(g.dtype))
    else:
        _kernels()[2](g.reshape(-1), out.reshape(-1), res.reshape(-1), _zero(g.dtype))
    return res


def add_rows(y: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``y += b`` for a matrix ``y`` (rows, n) and a vector ``b`` (n,); returns ``y``."""
    if (y.ndim == 2 and b.ndim == 1 and y.dtype in COMPILED and b.dtype == y.dtype
            and y.flags.c_contiguous and y.flags.writeable and b.flags.c_contiguous
            and b.shape[0] == y.shape[1]):
        _kernels()[4](y, b)
        return y
    y += b
    return y


def column_sums(g: np.ndarray) -> np.ndarray:
    """``g.sum(axis=0)`` of a matrix ``g`` (rows, n)."""
    if g.ndim == 2 and g.shape[0] and g.dtype in COMPILED and g.flags.c_contiguous:
        out = np.empty(g.shape[1], g.dtype)
        _kernels()[5](g, out)
        return out
    return g.sum(axis=0)
