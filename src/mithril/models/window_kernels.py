"""Compiled loops for the NumPy window operators, where NumPy's strided slices are slow.

The col2im of a convolution's input gradient adds, for each kernel offset, a strided slice of
the (N, *out, G, *kernel, Cg) column gradient onto the padded input. With NumPy that is one
``+=`` per offset whose inner loop is one pixel's channels (32 floats for a 32-channel
layer): the per-loop overhead, not the memory, sets its speed (~6x this kernel's time).

:func:`col2im` gathers instead: each input pixel sums the columns that read it, offsets in
the same row-major order and from the same zero, so its result is bit for bit the strided
adds'. The kernel is compiled on its first use on a machine and then cached on disk
(:mod:`mithril.utils.optimizers.engines.kernel_cache`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


@functools.cache
def _col2im_kernel() -> Any:
    from ..utils.optimizers.engines import kernel_cache

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

    return col2im_2d


def col2im(gcols: np.ndarray, spatial: tuple[int, ...], pads: tuple[tuple[int, int], ...],
           stride: tuple[int, ...], dilation: tuple[int, ...]) -> np.ndarray:
    """The input gradient (N, *spatial, C), channels-last, of a 1-D or 2-D convolution from
    its column gradient ``gcols`` (N, *out, G, *kernel, Cg): the sum, over kernel offsets in
    row-major order, of the columns each input element was read into (padding dropped)."""
    nd = len(spatial)
    if nd == 1:  # as 2-D with one row
        gcols = gcols[:, None, :, :, None]
        spatial, pads, stride, dilation = (1, *spatial), ((0, 0), *pads), (1, *stride), (1, *dilation)
    n, g, cg = gcols.shape[0], gcols.shape[3], gcols.shape[-1]
    gx = np.empty((n, *spatial, g * cg), dtype=gcols.dtype)
    _col2im_kernel()(gcols, gx, pads[0][0], pads[1][0], *stride, *dilation)
    return gx.reshape(n, *spatial[2 - nd:], g * cg)
