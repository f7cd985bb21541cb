"""Compiled loops for the NumPy cross-entropy of logits against class indices.

With NumPy, a softmax cross-entropy of (N, C) logits is about ten array calls (max, shift,
exp, sum, divide, log, gather, mean, then the gradient's scale and scatter), each a few
microseconds of overhead for a small batch: ~22 us for (128, 10), more than one of its
model's matmuls. :func:`softmax_nll` does the forward in two passes over the rows with
NumPy's vectorised ``exp`` between them (a compiled loop's ``exp`` is scalar: 3x slower), ~4
us, and :func:`softmax_nll_vjp` the gradient in one, ~2 us.

The arithmetic is the NumPy path's, row by row in the logits' dtype: ``m = max(x)``,
``e = exp(x − m)``, ``s = Σ e`` (in order), ``nll = (m + log s) − x[t]``, softmax ``e / s``;
only the mean over rows is summed in float64 (NumPy: pairwise, in the dtype). Compiled for
float32 and float64 on first use on a machine, then cached on disk
(:mod:`mithril.utils.optimizers.engines.kernel_cache`); other dtypes take NumPy's path.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

#: the dtypes the loops are compiled for
COMPILED = (np.dtype(np.float32), np.dtype(np.float64))


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    from ..utils.optimizers.engines import kernel_cache

    @kernel_cache.jit(nogil=True)
    def shift(x, t, e, m):  # pragma: no cover - compiled
        n, c = x.shape
        for i in range(n):  # indices first: nothing is written for a bad one
            if t[i] < 0 or t[i] >= c:
                return i
        for i in range(n):
            mi = x[i, 0]
            for j in range(1, c):
                if x[i, j] > mi or x[i, j] != x[i, j]:  # NaN wins, as np.max
                    mi = x[i, j]
            m[i] = mi
            for j in range(c):
                e[i, j] = x[i, j] - mi
        return -1

    @kernel_cache.jit(nogil=True)
    def finish(x, t, e, m, nll, total):  # pragma: no cover - compiled
        n, c = x.shape
        for i in range(n):
            s = e[i, 0]  # (0 + e0: NumPy's sum, in the logits' dtype)
            for j in range(1, c):
                s += e[i, j]
            nll[i] = (m[i] + np.log(s)) - x[i, t[i]]
            total[0] += nll[i]
            for j in range(c):
                e[i, j] /= s

    @kernel_cache.jit(nogil=True)
    def backward(e, t, gt):  # pragma: no cover - compiled
        n, c = e.shape
        for i in range(n):
            g = gt[i if gt.shape[0] > 1 else 0]
            for j in range(c):
                e[i, j] *= g
            e[i, t[i]] -= g

    return shift, finish, backward


def usable(x: np.ndarray, t: np.ndarray) -> bool:
    """Whether the loops take (N, C) logits ``x`` and class indices ``t`` (N,)."""
    return (x.dtype in COMPILED and x.ndim == 2 and x.shape[0] > 0 and x.shape[1] > 0
            and t.ndim == 1 and t.dtype.kind in "iu")


def softmax_nll(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, float, np.ndarray] | None:
    """``(nll (N,), Σ nll (in float64), softmax (N, C))`` of logits ``x`` against class
    indices ``t``; None (nothing computed) where an index is out of ``[0, C)``."""
    shift, finish, _ = _kernels()
    e = np.empty(x.shape, x.dtype)
    m = np.empty(x.shape[0], x.dtype)
    if shift(x, t, e, m) >= 0:
        return None
    np.exp(e, out=e)  # NumPy's own (vectorised) exp: a compiled loop's is scalar, 3x slower
    nll = np.empty(x.shape[0], x.dtype)
    total = np.zeros(1)
    finish(x, t, e, m, nll, total)
    return nll, float(total[0]), e


def softmax_nll_vjp(e: np.ndarray, t: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """``gt · (e − onehot(t))`` written over ``e`` (N, C), the softmax of
    :func:`softmax_nll`; ``gt`` is one cotangent per row (N,) or one for all (1,)."""
    _kernels()[2](e, t, gt)
    return e
