"""Compiled loops for the NumPy window operators, where NumPy's strided slices are slow.

:func:`im2col` copies a convolution's input windows into rows: with NumPy, a copy from a
``sliding_window_view`` whose inner loop is one pixel's channels (3 floats for an RGB
image), overhead-bound; here one pass that also writes the padding's zeros.

The col2im of a convolution's input gradient adds, for each kernel offset, a strided slice of
the (N, *out, G, *kernel, Cg) column gradient onto the padded input. With NumPy that is one
``+=`` per offset whose inner loop is one pixel's channels (32 floats for a 32-channel
layer): the per-loop overhead, not the memory, sets its speed (~6x this kernel's time).

:func:`col2im` gathers instead: each input pixel sums the columns that read it, offsets in
the same row-major order and from the same zero, so its result is bit for bit the strided
adds'.

:func:`max_pool` takes each window's maximum and the offset it came from in one pass (NumPy:
a running maximum per offset, then about a dozen passes for the first-maximum masks), and
:func:`max_pool_vjp` puts each cotangent there.

The loops take (N, *spatial, C) channels-last arrays, 1-D as 2-D with one row, and are
compiled for float32 and float64 (other dtypes take NumPy's strided operations, the same
results) on their first use on a machine, then cached on disk
(:mod:`mithril.utils.optimizers.engines.kernel_cache`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: the dtypes the loops are compiled for (others take NumPy's strided operations)
_COMPILED = (np.dtype(np.float32), np.dtype(np.float64))


@functools.cache
def _conv_kernels() -> tuple[Any, Any]:
    from ..utils.optimizers.engines import kernel_cache

    @kernel_cache.jit(nogil=True)
    def im2col_2d(x, cols, ph, pw, sh, sw, dh, dw):  # pragma: no cover - compiled
        n, oh, ow, ng, kh, kw, cg = cols.shape
        h, w = x.shape[1], x.shape[2]
        for i in range(n):
            for a in range(oh):
                for b in range(ow):
                    for g in range(ng):
                        for u in range(kh):
                            r = a * sh + u * dh - ph
                            for v in range(kw):
                                q = b * sw + v * dw - pw
                                if 0 <= r < h and 0 <= q < w:
                                    for k in range(cg):
                                        cols[i, a, b, g, u, v, k] = x[i, r, q, g * cg + k]
                                else:
                                    for k in range(cg):
                                        cols[i, a, b, g, u, v, k] = 0

    @kernel_cache.jit(nogil=True)
    def col2im_2d(gc, gx, ph, pw, sh, sw, dh, dw):  # pragma: no cover - compiled
        n, oh, ow, ng, kh, kw, cg = gc.shape
        h, w = gx.shape[1], gx.shape[2]
        for i in range(n):
            for p in range(h):
                for q in range(w):
                    for c in range(ng * cg):
                        gx[i, p, q, c] = 0
                    for u in range(kh):
                        t = p + ph - u * dh
                        if t < 0 or t % sh != 0 or t // sh >= oh:
                            continue
                        a = t // sh
                        for v in range(kw):
                            s = q + pw - v * dw
                            if s < 0 or s % sw != 0 or s // sw >= ow:
                                continue
                            b = s // sw
                            for g in range(ng):
                                for k in range(cg):
                                    gx[i, p, q, g * cg + k] += gc[i, a, b, g, u, v, k]

    return im2col_2d, col2im_2d


def _as_2d(pads: tuple[tuple[int, int], ...], stride: tuple[int, ...],
           dilation: tuple[int, ...]) -> tuple[tuple, tuple, tuple]:
    """A 1-D window's padding, stride and dilation as a 2-D one's with a one-row first axis."""
    return ((0, 0), *pads), (1, *stride), (1, *dilation)


def im2col(x: np.ndarray, cols: np.ndarray, pads: tuple[tuple[int, int], ...],
           stride: tuple[int, ...], dilation: tuple[int, ...]) -> None:
    """Fill ``cols`` (N, *out, G, *kernel, Cg), C-contiguous, with the windows of ``x``
    (N, *spatial, C), channels-last (any strides) of a 1-D or 2-D convolution: each row one
    window ordered (group, *kernel, channel), zeros where it reads the padding."""
    if x.ndim == 3:  # 1-D, as 2-D with one row
        x, cols = x[:, None], cols[:, None, :, :, None]
        pads, stride, dilation = _as_2d(pads, stride, dilation)
    if x.dtype not in _COMPILED or cols.dtype != x.dtype:  # e.g. bfloat16: NumPy's copy
        np.copyto(cols, _windows(x, cols.shape[3], cols.shape[4:6], pads, stride, dilation))
        return
    _conv_kernels()[0](x, cols, pads[0][0], pads[1][0], *stride, *dilation)


def _windows(x: np.ndarray, groups: int, kernel: tuple[int, ...], pads: tuple[tuple[int, int], ...],
             stride: tuple[int, ...], dilation: tuple[int, ...]) -> np.ndarray:
    """The (N, OH, OW, G, KH, KW, Cg) windows of ``x`` (N, H, W, C) as a strided view of its
    zero-padded copy (NumPy's im2col, for dtypes the kernels are not compiled for)."""
    n, c = x.shape[0], x.shape[-1]
    if any(lo or hi for lo, hi in pads):
        buf = np.zeros((n, *(s + lo + hi for s, (lo, hi) in zip(x.shape[1:3], pads)), c), x.dtype)
        buf[:, pads[0][0]:pads[0][0] + x.shape[1], pads[1][0]:pads[1][0] + x.shape[2]] = x
        x = buf
    eff = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    win = sliding_window_view(x, eff, axis=(1, 2))[:, ::stride[0], ::stride[1], :, ::dilation[0],
                                                   ::dilation[1]]   # (N, OH, OW, C, KH, KW)
    win = win.reshape(*win.shape[:3], groups, c // groups, *win.shape[4:])
    return win.transpose(0, 1, 2, 3, 5, 6, 4)


def col2im(gcols: np.ndarray, spatial: tuple[int, ...], pads: tuple[tuple[int, int], ...],
           stride: tuple[int, ...], dilation: tuple[int, ...],
           out: np.ndarray | None = None) -> np.ndarray:
    """The input gradient (N, *spatial, C), channels-last, of a 1-D or 2-D convolution from
    its column gradient ``gcols`` (N, *out, G, *kernel, Cg): the sum, over kernel offsets in
    row-major order, of the columns each input element was read into (padding dropped).
    ``out``: a C-contiguous array of that shape to write it into (every element written)."""
    nd = len(spatial)
    if nd == 1:  # as 2-D with one row
        gcols, spatial = gcols[:, None, :, :, None], (1, *spatial)
        pads, stride, dilation = _as_2d(pads, stride, dilation)
    n, g, cg = gcols.shape[0], gcols.shape[3], gcols.shape[-1]
    gx = np.empty((n, *spatial, g * cg), dtype=gcols.dtype) if out is None else out.reshape(
        n, *spatial, g * cg)
    if gcols.dtype in _COMPILED and gx.dtype == gcols.dtype:
        _conv_kernels()[1](gcols, gx, pads[0][0], pads[1][0], *stride, *dilation)
    else:  # e.g. bfloat16: NumPy's strided adds, one per kernel offset (the same sums)
        padded = np.zeros((n, *(s + lo + hi for s, (lo, hi) in zip(spatial, pads)), g, cg), gx.dtype)
        oh, ow = gcols.shape[1:3]
        for u, v in np.ndindex(*gcols.shape[4:6]):
            r, q = u * dilation[0], v * dilation[1]
            padded[:, r:r + stride[0] * (oh - 1) + 1:stride[0],
                   q:q + stride[1] * (ow - 1) + 1:stride[1]] += gcols[:, :, :, :, u, v]
        gx[...] = padded[:, pads[0][0]:pads[0][0] + spatial[0],
                         pads[1][0]:pads[1][0] + spatial[1]].reshape(gx.shape)
    return gx.reshape(n, *spatial[2 - nd:], g * cg)


@functools.cache
def _max_pool_kernels() -> tuple[Any, Any]:
    from ..utils.optimizers.engines import kernel_cache

    @kernel_cache.jit(nogil=True)
    def max_pool_2d(x, m, code, ph, pw, sh, sw, dh, dw, kh, kw):  # pragma: no cover - compiled
        n, oh, ow, nc = m.shape
        h, w = x.shape[1], x.shape[2]
        for i in range(n):
            for a in range(oh):
                for b in range(ow):
                    first = -1
                    for u in range(kh):
                        r = a * sh + u * dh - ph
                        for v in range(kw):
                            q = b * sw + v * dw - pw
                            if 0 <= r < h and 0 <= q < w:
                                k = u * kw + v
                                if first < 0:  # torch: the first element inside, at -inf
                                    first = k
                                    for c in range(nc):
                                        m[i, a, b, c] = x[i, r, q, c]
                                        code[i, a, b, c] = k
                                else:
                                    for c in range(nc):
                                        val = x[i, r, q, c]
                                        if val > m[i, a, b, c] or val != val:  # NaN: the last
                                            m[i, a, b, c] = val
                                            code[i, a, b, c] = k
                    if first < 0:  # every element in the padding (a dilated window): −inf,
                        for c in range(nc):  # as torch, and a code no offset has: no gradient
                            m[i, a, b, c] = -np.inf
                            code[i, a, b, c] = kh * kw

    @kernel_cache.jit(nogil=True)
    def max_pool_2d_vjp(g, code, gx, ph, pw, sh, sw, dh, dw, kh, kw):  # pragma: no cover
        n, oh, ow, nc = g.shape
        for i in range(n):
            for a in range(oh):
                for b in range(ow):
                    for c in range(nc):
                        k = code[i, a, b, c]
                        if k >= kh * kw:  # a window of padding only: nothing to route to
                            continue
                        gx[i, a * sh + (k // kw) * dh - ph, b * sw + (k % kw) * dw - pw, c] += g[i, a, b, c]

    @kernel_cache.jit(nogil=True)
    def max_pool_2d_vjp_disjoint(g, code, gx, ph, pw, sh, sw, dh, dw, kh, kw):  # pragma: no cover
        n, h, w, nc = gx.shape
        oh, ow = g.shape[1], g.shape[2]
        for i in range(n):
            for r in range(h):
                a = (r + ph) // sh
                du = r + ph - a * sh
                row = a < oh and du % dh == 0 and du // dh < kh
                for q in range(w):
                    b = (q + pw) // sw
                    dv = q + pw - b * sw
                    if row and b < ow and dv % dw == 0 and dv // dw < kw:
                        k = (du // dh) * kw + dv // dw
                        for c in range(nc):
                            gx[i, r, q, c] = g[i, a, b, c] if code[i, a, b, c] == k else 0
                    else:  # in no window
                        for c in range(nc):
                            gx[i, r, q, c] = 0

    return max_pool_2d, max_pool_2d_vjp, max_pool_2d_vjp_disjoint


def _channels_last(x: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) as (N, *spatial, C), copied to contiguous memory unless it already is:
    the loops read a pixel's channels in their inner loop (strided, they run several times
    slower than the copy)."""
    xl = np.moveaxis(x, 1, -1)
    return xl if xl.flags.c_contiguous else np.ascontiguousarray(xl)


def compiled(x: np.ndarray) -> bool:
    """Whether the loops here are compiled for ``x``'s dtype."""
    return x.dtype in _COMPILED


def max_pool(x: np.ndarray, out: tuple[int, ...], kernel: tuple[int, ...],
             pads: tuple[tuple[int, int], ...], stride: tuple[int, ...],
             dilation: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Max pooling of ``x`` (N, C, *spatial), 1-D or 2-D, in one pass: the maxima (N, C, *out),
    laid out channels-last, and per output the kernel offset (row-major) it came from, as
    torch's: the first maximum in window order, the last NaN where a window holds one, the
    first element inside the input where a window holds only −inf (padding excluded); a
    (dilated) window of padding only is −inf with the code ``prod(kernel)``, which routes no
    gradient (torch's own indices there are garbage: its backward writes out of bounds)."""
    nd = len(out)
    xl = _channels_last(x)
    if nd == 1:
        xl, out, kernel = xl[:, None], (1, *out), (1, *kernel)
        pads, stride, dilation = _as_2d(pads, stride, dilation)
    n, c = x.shape[:2]
    m = np.empty((n, *out, c), dtype=x.dtype)
    code = np.empty((n, *out, c), dtype=np.uint8 if math.prod(kernel) < 256 else np.int32)
    _max_pool_kernels()[0](xl, m, code, pads[0][0], pads[1][0], *stride, *dilation, *kernel)
    return np.moveaxis(m.reshape(n, *out[2 - nd:], c), -1, 1), code


def max_pool_vjp(g: np.ndarray, code: np.ndarray, like: np.ndarray, kernel: tuple[int, ...],
                 pads: tuple[tuple[int, int], ...], stride: tuple[int, ...],
                 dilation: tuple[int, ...], tiles: bool) -> np.ndarray:
    """The input cotangent of :func:`max_pool` (shaped and laid out as ``like``, its input; a
    new array, no view): each of ``g``'s values added where its window's maximum was.
    ``tiles``: the windows are disjoint, so each input element is written once, by a gather
    (no zero fill); else zeros, then each value added where its maximum was."""
    nd = like.ndim - 2
    gx = (np.empty_like if tiles else np.zeros_like)(like, dtype=g.dtype)  # like's memory order
    gl, gxl = _channels_last(g), np.moveaxis(gx, 1, -1)
    if nd == 1:
        gl, gxl, kernel = gl[:, None], gxl[:, None], (1, *kernel)
        pads, stride, dilation = _as_2d(pads, stride, dilation)
    _, scatter, gather = _max_pool_kernels()
    if tiles:
        gather(gl, code, gxl, pads[0][0], pads[1][0], *stride, *dilation, *kernel)
    else:
        scatter(gl, code, gxl, pads[0][0], pads[1][0], *stride, *dilation, *kernel)
    return gx
