"""Pooling over channels-first inputs, with torch's semantics.

Every pool but ``GlobalAvgPool2D`` also takes one example without the batch axis, (C, L) /
(C, H, W) / (C, D, H, W), as torch (run as a batch of one). ``padding``: an int, one per
axis, or a ``(before, after)`` pair per axis (1-D: also one bare pair), each side at most half the
kernel; torch's pools pad symmetrically only, so the torch backend runs pairs as ``F.pad``
(−inf or zeros) then an unpadded pool (keeping the −inf windows' gradient routing below).

``MaxPool1D`` / ``MaxPool2D`` / ``MaxPool3D``: windows padded with −inf, ``stride`` defaults
to ``kernel_size``, ``padding`` at most half the kernel (as torch). ``ceil_mode=True`` (every
pool) rounds the output size up, as torch: the last window may run past the end (it must
start inside the input or the padding before it: torch's ``pooling_output_shape_pad_lr``);
NumPy and JAX pad that part further, with −inf (max) or zeros left out of the mean
(average), and run the same code; torch gets ``ceil_mode``. The NumPy VJP routes each cotangent to its window's first maximum in window
order (row-major over the kernel), which is the element torch's (and XLA's) max pooling
picks on ties (and to its last NaN, where a window holds one: NaN is its maximum, as torch;
where a window's elements inside the input are all −inf, to the first of them, never the
padding). JAX's forward is XLA's ``reduce_window`` with a JVP that picks the same element
(XLA's own derivative picks others for those windows). A dilated window that reads padding
only is −inf (as torch) and routes no gradient, on every backend (torch's own index there is garbage, and its backward writes out of bounds: the
torch backend replaces those windows).

NumPy (float32/float64, 1-D and 2-D) finds each window's maximum and where it came from in
one compiled pass (:func:`~mithril.models.window_kernels.max_pool`: per output, the kernel offset, one
byte), and the VJP puts the cotangents there (a gather when the windows are disjoint: every
input element written once). 3-D pools and other dtypes work one kernel offset at a time on
strided slices (a loop over the kernel, never over pixels), in the input's memory order (channels-last
activations stay channels-last): the max is a running ``np.maximum``; a forward that will be
differentiated also keeps, per offset, which windows take their maximum there first (the
residual), so the VJP is one multiply per offset.

``AvgPool1D`` / ``AvgPool2D`` / ``AvgPool3D``: zero padding (both sides, not the
``ceil_mode`` part past it) counted in the mean (``count_include_pad=True``, torch's default), or not (``count_include_pad=False``: each window's sum divided by the
number of input elements it covers); ``divisor_override`` (a nonzero int) divides every
window's sum by itself instead (torch's; on the torch backend 1-D runs as 2-D with one row:
``F.avg_pool1d`` has none). ``GlobalAvgPool2D``: the mean over H and W,
(N, C, H, W) -> (N, C).

The max pools' code lives in :mod:`mithril.models.max_pooling` (re-exported here), the base
both kinds share in :mod:`mithril.models.pool_base`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .conv import check_rank, offset_slices, out_sizes, pad_like, refuse_unknown, unbatched
from .half_precision import float32_forward
from .max_pooling import MaxPool1D, MaxPool2D, MaxPool3D
from .operator import Operator, ShapeError, div_count, fmt
from .pool_base import _Pool

__all__ = ["AvgPool1D", "AvgPool2D", "AvgPool3D", "GlobalAvgPool2D", "MaxPool1D", "MaxPool2D",
           "MaxPool3D"]


class _AvgPool(_Pool):
    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: Any = 0, count_include_pad: bool = True,
                 ceil_mode: bool = False, divisor_override: int | None = None,
                 **unknown: Any) -> None:
        refuse_unknown(type(self).__name__, unknown)
        super().__init__(kernel_size, stride, padding, ceil_mode=ceil_mode)
        who = type(self).__name__
        if not isinstance(count_include_pad, (bool, np.bool_)):
            raise TypeError(f"{who}: count_include_pad must be a bool, got {count_include_pad!r}")
        self.count_include_pad = bool(count_include_pad)
        if divisor_override is not None and (
                not isinstance(divisor_override, (int, np.integer))
                or isinstance(divisor_override, (bool, np.bool_)) or divisor_override == 0):
            raise ValueError(f"{who}: divisor_override must be None or a nonzero int (as "
                             f"torch), got {divisor_override!r}")
        self.divisor_override = None if divisor_override is None else int(divisor_override)

    def _divisor(self, spatial: Sequence[int], out: Sequence[int], dtype: Any) -> Any:
        """What each window's sum is divided by, as torch: the kernel's size, or, when windows
        differ, an array of the output's spatial shape (a window is a box: the product of
        per-axis counts). ``count_include_pad=False``: the input elements a window covers;
        ``ceil_mode``: a window past the given padding counts only up to its end.
        ``divisor_override``: that number for every window (torch: padding counts or not)."""
        if self.divisor_override is not None:
            return self.divisor_override
        if not self.ceil_mode and (self.count_include_pad or not any(map(any, self.pads))):
            return math.prod(self.kernel_size)
        counts = np.ones((), dtype=np.int64)
        for n, m, k, st, (lo, hi) in zip(spatial, out, self.kernel_size, self.stride, self.pads):
            start = np.arange(m) * st - lo
            if self.count_include_pad:  # the padding after ends the counted part
                per_axis = np.minimum(start + k, n + hi) - start
            else:
                per_axis = np.minimum(start + k, n) - np.maximum(start, 0)
            counts = np.multiply.outer(counts, per_axis)
        return counts.astype(dtype)

    # (a half-precision mean accumulates in float32, as torch's; on torch too where its half
    # kernel falls short: no CPU avg_pool3d, and the padded pairs' window sums overflow)
    @float32_forward(on_torch=lambda op: op.nd == 3 or not op.symmetric)
    def forward(self, xp: Any, input: Any) -> Any:
        return super().forward(xp, input)

    def _torch(self, F: Any, x: Any) -> Any:
        if not self.symmetric:
            return self._torch_asymmetric(F, x)
        if self.nd >= 2:
            pool = F.avg_pool3d if self.nd == 3 else F.avg_pool2d
            return pool(x, self.kernel_size, self.stride, self.padding, ceil_mode=self.ceil_mode,
                        count_include_pad=self.count_include_pad,
                        divisor_override=self.divisor_override)
        if self.divisor_override is None:
            return F.avg_pool1d(x, self.kernel_size, self.stride, self.padding,
                                ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad)
        # F.avg_pool1d has no divisor_override: as 2-D with one row
        return F.avg_pool2d(x[:, :, None], (1, *self.kernel_size), (1, *self.stride),
                            (0, *self.padding), ceil_mode=self.ceil_mode,
                            count_include_pad=self.count_include_pad,
                            divisor_override=self.divisor_override)[:, :, 0]

    def _torch_asymmetric(self, F: Any, x: Any) -> Any:
        """Padding that differs before and after: torch's window sums (``divisor_override=1``)
        of the zero-padded input (``F.pad``), divided by :meth:`_divisor`."""
        xp = F.pad(x, self._flat_pads())
        if self.nd == 1:
            xp = xp[:, :, None]
        pool = F.avg_pool3d if self.nd == 3 else F.avg_pool2d
        one = (1,) * max(0, 2 - self.nd)
        s = pool(xp, one + self.kernel_size, one + self.stride, 0, ceil_mode=self.ceil_mode,
                 divisor_override=1)
        s = self._crop_torch(s[:, :, 0] if self.nd == 1 else s, tuple(x.shape[2:]))
        d = self._divisor(tuple(x.shape[2:]), tuple(s.shape[2:]), np.float64)
        return s / (d if isinstance(d, int) else x.new_tensor(d))

    def _jax(self, x: Any) -> Any:
        from jax import lax

        one = (1, 1)
        s = lax.reduce_window(x, np.array(0, dtype=x.dtype), lax.add, (*one, *self.kernel_size),
                              (*one, *self.stride), ((0, 0), (0, 0), *self._pads(x.shape[2:])))
        return s / self._divisor(x.shape[2:], s.shape[2:], x.dtype)

    def _numpy(self, x: np.ndarray) -> np.ndarray:
        pads = self._pads(x.shape[2:])
        out = out_sizes(x.shape[2:], self.kernel_size, self.stride, self.dilation, pads,
                        type(self).__name__)
        xp = pad_like(x, pads)  # the divisor says which zeros count in the mean
        parts = [xp[offset_slices(off, self.stride, self.dilation, out)]
                 for off in np.ndindex(*self.kernel_size)]
        s = parts[0].copy(order="K") if len(parts) == 1 else np.add(parts[0], parts[1])
        for part in parts[2:]:
            np.add(s, part, out=s)
        s /= self._divisor(x.shape[2:], out, x.dtype)
        return s

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        if unbatched(x, self.nd):  # as a batch of one
            return {"input": self.vjp(g[None], None, {"input": x[None]}, wrt)["input"][0]}
        return {"input": self._scatter(x.shape, x, g / self._divisor(x.shape[2:], g.shape[2:],
                                                                      g.dtype), None)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, count_include_pad={self.count_include_pad}, "
                f"ceil_mode={self.ceil_mode}"
                + ("" if self.divisor_override is None else
                   f", divisor_override={self.divisor_override}") + ")")


class AvgPool1D(_AvgPool):
    """Mean over windows of (N, C, L), as ``torch.nn.AvgPool1d`` (``ceil_mode`` too): the
    zero padding counted in the mean by default; ``count_include_pad=False`` divides each
    window's sum by the number of input elements it covers instead; ``divisor_override``
    divides every window's sum by that int (``F.avg_pool2d``'s; ``nn.AvgPool1d`` has none)."""

    nd = 1
    layout = "N, C, L"


class AvgPool2D(_AvgPool):
    """Mean over windows of (N, C, H, W), as ``torch.nn.AvgPool2d`` (``ceil_mode`` too): the
    zero padding counted in the mean by default (``count_include_pad=True``);
    ``count_include_pad=False`` divides each window's sum by the number of input elements it
    covers instead; ``divisor_override`` divides every window's sum by that int, as torch."""

    nd = 2
    layout = "N, C, H, W"


class AvgPool3D(_AvgPool):
    """Mean over windows of (N, C, D, H, W) or (C, D, H, W), as ``torch.nn.AvgPool3d``
    (``ceil_mode``, ``count_include_pad``, ``divisor_override`` as :class:`AvgPool2D`). As
    torch's ``avg_pool3d`` (not its 2-D one), each spatial size must be at least the kernel's,
    padding or not: a ``ShapeError`` otherwise."""

    nd = 3
    layout = "N, C, D, H, W"

    def infer_shape(self, shapes):
        out = super().infer_shape(shapes)
        s = shapes.get("input")
        if s is not None and any(n is not None and n < k for n, k in zip(s[-3:], self.kernel_size)):
            raise ShapeError(f"AvgPool3D: 'input' of shape {fmt(s)} is smaller than the kernel "
                             f"size {self.kernel_size} along a spatial axis (torch's avg_pool3d "
                             "refuses it, padding or not)")
        return out


class GlobalAvgPool2D(Operator):
    """The mean over H and W: (N, C, H, W) -> (N, C) (``AdaptiveAvgPool2d(1)`` then flatten)."""

    def infer_shape(self, shapes):
        s = shapes.get("input")
        check_rank(s, 2, "GlobalAvgPool2D", "N, C, H, W", unbatched_ok=False)
        if s is None:
            return None
        if any(d == 0 for d in s[2:]):
            raise ShapeError(f"GlobalAvgPool2D: 'input' has an empty spatial axis: {fmt(s)}")
        return s[:2]

    @float32_forward  # (a half-precision mean accumulates in float32, as torch's)
    def forward(self, xp: Any, input: Any) -> Any:
        return xp.mean(input, axis=(2, 3))

    def vjp(self, g, out, args, wrt):
        shape = args["input"].shape
        return {"input": np.broadcast_to(div_count(g, shape[2] * shape[3])[..., None, None],
                                         shape).copy()}
