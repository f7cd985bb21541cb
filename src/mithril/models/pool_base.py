"""The shared base of the max and average pools (:mod:`mithril.models.pooling`,
:mod:`mithril.models.max_pooling`): arguments as torch's pools, their checks, the padding per
axis (``ceil_mode``'s extra padding after), the output shape, dispatch to each backend, and
the NumPy VJP's scatter of cotangents over kernel offsets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .conv import (
    check_rank,
    crop,
    disjoint,
    int_padding_pairs,
    ntuple,
    offset_slices,
    out_sizes,
    refuse_unknown,
    same_layout,
    unbatched,
)
from .operator import Operator, backend_of


class _Pool(Operator):
    nd: int = 2
    layout: str = "N, C, H, W"
    reducer: str = "max"

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: Any = 0, dilation: int | Sequence[int] = 1,
                 ceil_mode: bool = False, **unknown: Any) -> None:
        who = type(self).__name__
        refuse_unknown(who, unknown)
        if not isinstance(ceil_mode, (bool, np.bool_)):
            raise TypeError(f"{who}: ceil_mode must be a bool, got {ceil_mode!r}")
        self.ceil_mode = bool(ceil_mode)
        self.kernel_size = ntuple(kernel_size, self.nd, "kernel_size", who)
        self.stride = self.kernel_size if stride is None else ntuple(stride, self.nd, "stride", who)
        self.pads = int_padding_pairs(padding, self.nd, who)
        #: the padding as given: one int per axis when before = after (torch's form), else the
        #: (before, after) pairs
        self.padding: tuple = tuple(lo for lo, _ in self.pads) if self.symmetric else self.pads
        self.dilation = ntuple(dilation, self.nd, "dilation", who)
        for k, (lo, hi) in zip(self.kernel_size, self.pads):
            if max(lo, hi) > k // 2:
                raise ValueError(f"{who}: padding must be at most half the kernel size (as torch; "
                                 f"before and after each), got padding {self.padding} for "
                                 f"kernel_size {self.kernel_size}")

    @property
    def symmetric(self) -> bool:
        """The same padding before and after on every axis (torch's pooling's only form)."""
        return all(lo == hi for lo, hi in self.pads)

    def _pads(self, spatial: Sequence[int | None]) -> tuple[tuple[int, int], ...]:
        """``(before, after)`` padding per axis for an input of size ``spatial``: the given
        padding, and with ``ceil_mode`` as much more after as the last window, rounded up,
        reaches past it (torch's rule: a window must start inside the input or the padding
        before it). Pooling pads that with −inf (max) or zeros not counted (average)."""
        if not self.ceil_mode:
            return self.pads
        pads = []
        for n, k, s, d, (lo, hi) in zip(spatial, self.kernel_size, self.stride, self.dilation,
                                        self.pads):
            eff = d * (k - 1) + 1
            out = None if n is None else -(-(n + lo + hi - eff) // s) + 1
            if out is not None and (out - 1) * s >= n + lo:  # torch's pooling_output_shape_pad_lr
                out -= 1
            if out is None or out < 1:  # unknown, or too small (out_sizes says so)
                pads.append((lo, hi))
                continue
            pads.append((lo, hi + max(0, (out - 1) * s + eff - (n + lo + hi))))
        return tuple(pads)

    def infer_shape(self, shapes):
        s = shapes.get("input")
        who = type(self).__name__
        check_rank(s, self.nd, who, self.layout)
        if s is None:
            return None
        sp = s[-self.nd:]
        return (*s[:-self.nd], *out_sizes(sp, self.kernel_size, self.stride, self.dilation,
                                          self._pads(sp), who))

    def forward(self, xp: Any, input: Any) -> Any:
        if unbatched(input, self.nd):  # (C, *spatial): as a batch of one, as torch
            return self.forward(xp, input[None])[0]
        kind = backend_of(xp)
        if kind == "torch":
            import torch.nn.functional as F

            return self._torch(F, input)
        if kind == "jax":
            return self._jax(input)
        return self._numpy(input)

    def _scatter(self, xshape: tuple[int, ...], like: np.ndarray, g: np.ndarray,
                 masks: list[np.ndarray] | None) -> np.ndarray:
        """The input cotangent (of shape ``xshape``): ``g`` (times ``masks[k]``, when given)
        put at kernel offset k's slice of the padded input for every k, then the padding
        cropped. One strided multiply (disjoint windows) or add (overlapping ones) per
        offset, in the memory order of ``like`` (the input or an array laid out as it)."""
        out = g.shape[2:]
        pads = self._pads(xshape[2:])
        shape = (*xshape[:2], *(n + lo + hi for n, (lo, hi) in zip(xshape[2:], pads)))
        tiles = disjoint(self.kernel_size, self.stride, self.dilation)
        exact = tiles and all(d == 1 and s == k and n == s * m for k, s, d, n, m in zip(
            self.kernel_size, self.stride, self.dilation, shape[2:], out))
        # every element is written when the windows tile the input exactly: no zero fill
        gx = (np.empty_like if exact else np.zeros_like)(like, dtype=g.dtype, shape=shape)
        g = same_layout(g, like)  # e.g. channels-last activations, NCHW cotangent of a Flatten
        for k, off in enumerate(np.ndindex(*self.kernel_size)):
            dest = gx[offset_slices(off, self.stride, self.dilation, out)]
            if masks is None:  # average: every offset gets the (scaled) cotangent
                if tiles:
                    np.copyto(dest, g)
                else:
                    dest += g
            elif tiles:
                np.multiply(g, masks[k], out=dest)
            else:
                dest += g * masks[k]
        if not any(lo or hi for lo, hi in pads):
            return gx  # not a view: a ReLU's VJP before it may then write over it
        return gx[crop(pads, xshape[2:])]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, ceil_mode={self.ceil_mode})")

    def _flat_pads(self) -> list[int]:
        """The padding in ``F.pad``'s order: (before, after) per axis, the last axis first."""
        return [p for pair in reversed(self.pads) for p in pair]

    def _crop_torch(self, y: Any, spatial: tuple[int, ...]) -> Any:
        """torch's ceil_mode output of the explicitly padded input, cut to this pool's size:
        on the padded input a window may start anywhere in it, here only inside the input or
        the padding before it (torch's rule with padding given per side)."""
        out = out_sizes(spatial, self.kernel_size, self.stride, self.dilation,
                        self._pads(spatial), type(self).__name__)
        return y[(slice(None), slice(None), *(slice(0, o) for o in out))]
