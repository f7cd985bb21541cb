"""im2col / col2im for windows of any number of spatial axes (3-D convolutions).

:mod:`mithril.models.window_kernels` compiles loops for 1-D and 2-D windows; these two
functions pass 1-D and 2-D calls on to it and do 3-D (and more) with NumPy: one strided copy
(im2col) or add (col2im) per kernel offset, whose inner loop is a whole channels-last
(…, C) slab, in row-major offset order from the same zero as the compiled col2im (the same
sums, bit for bit, as the 2-D kernels' NumPy fallback).
"""

from __future__ import annotations

import numpy as np

from . import window_kernels

Pads = tuple[tuple[int, int], ...]


def _offset(off: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
            out: tuple[int, ...]) -> tuple[slice, ...]:
    """The (N, *padded, …) elements at kernel offset ``off`` of every window."""
    return (slice(None), *(slice(o * d, o * d + s * (n - 1) + 1, s)
                           for o, d, s, n in zip(off, dilation, stride, out)))


def im2col(x: np.ndarray, cols: np.ndarray, pads: Pads, stride: tuple[int, ...],
           dilation: tuple[int, ...]) -> None:
    """Fill ``cols`` (N, *out, G, *kernel, Cg) with the windows of ``x`` (N, *spatial, C),
    channels-last: each row one window ordered (group, *kernel, channel), zeros where it
    reads the padding (as :func:`mithril.models.window_kernels.im2col`, any rank)."""
    nd = x.ndim - 2
    if nd <= 2:
        window_kernels.im2col(x, cols, pads, stride, dilation)
        return
    n, c = x.shape[0], x.shape[-1]
    out, g = cols.shape[1:1 + nd], cols.shape[1 + nd]
    if any(lo or hi for lo, hi in pads):
        buf = np.zeros((n, *(s + lo + hi for s, (lo, hi) in zip(x.shape[1:-1], pads)), c), x.dtype)
        buf[(slice(None), *(slice(lo, lo + s) for s, (lo, _) in zip(x.shape[1:-1], pads)))] = x
        x = buf
    for off in np.ndindex(*cols.shape[2 + nd:-1]):
        part = x[_offset(off, stride, dilation, out)]                  # (N, *out, C)
        cols[(Ellipsis, *off, slice(None))] = part.reshape(*part.shape[:-1], g, c // g)


def col2im(gcols: np.ndarray, spatial: tuple[int, ...], pads: Pads, stride: tuple[int, ...],
           dilation: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """The input gradient (N, *spatial, C), channels-last, from the column gradient
    ``gcols`` (N, *out, G, *kernel, Cg): per kernel offset in row-major order, its columns
    added onto the (zero-)padded input, the padding then dropped (as
    :func:`mithril.models.window_kernels.col2im`, any rank). ``out``: where to write it."""
    nd = len(spatial)
    if nd <= 2:
        return window_kernels.col2im(gcols, spatial, pads, stride, dilation, out=out)
    n, outs = gcols.shape[0], gcols.shape[1:1 + nd]
    g, cg = gcols.shape[1 + nd], gcols.shape[-1]
    padded = np.zeros((n, *(s + lo + hi for s, (lo, hi) in zip(spatial, pads)), g, cg), gcols.dtype)
    for off in np.ndindex(*gcols.shape[2 + nd:-1]):
        padded[_offset(off, stride, dilation, outs)] += gcols[(Ellipsis, *off, slice(None))]
    gx = padded[(slice(None), *(slice(lo, lo + s) for s, (lo, _) in zip(spatial, pads)))]
    gx = gx.reshape(n, *spatial, g * cg)
    if out is None:
        return np.ascontiguousarray(gx)
    out = out.reshape(gx.shape)
    out[...] = gx
    return out
