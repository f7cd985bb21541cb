"""Adaptive pooling, as torch's ``nn.AdaptiveAvgPool1d/2d/3d`` and ``nn.AdaptiveMaxPool1d/2d/3d``.

The output has ``output_size`` positions per spatial axis (an int, or one per axis; ``None``
keeps that axis's size, as torch). Output i of an axis of size n pools the input's
[⌊i·n/o⌋, ⌈(i + 1)·n/o⌉): windows of unequal size that overlap when o does not divide n
(torch's ``start_index`` / ``end_index``). Inputs (N, C, L) / (C, L), (N, C, H, W) /
(C, H, W) and (N, C, D, H, W) / (C, D, H, W).

Average: a linear map per axis (:class:`~mithril.models.resampling.Separable`: weight
1/len on each window element), so the VJP spreads each cotangent evenly over its window.
Max: the window's first maximum in row-major window order, or its last NaN (torch's
``val > max || isnan``), and the gradient goes to that one element (ties: the first, as
torch). NumPy and JAX gather
the windows padded to the longest with −inf (after the real elements: never picked before
one), take the argmax and read that element (JAX differentiates the read, so one element
gets the gradient); the NumPy VJP adds each cotangent there. torch: its own kernels.
``return_indices=True`` is refused by name.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .conv import check_rank, unbatched
from .half_precision import float32_forward
from .operator import Operator, ShapeError, backend_of, fmt
from .resampling import Separable, Taps, apply_taps


def windows(n: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's adaptive window of each output: start ⌊i·n/o⌋, end ⌈(i + 1)·n/o⌉."""
    i = np.arange(out)
    return (i * n) // out, -((-(i + 1) * n) // out)


def window_taps(n: int, out: int) -> Taps:
    """Each output's window as taps: its positions (padded to the longest window: the padding
    slots masked off, their index clipped into the axis) with weight 1/len."""
    start, end = windows(n, out)
    pos = start[:, None] + np.arange(int((end - start).max()))
    return np.minimum(pos, n - 1), np.broadcast_to(1.0 / (end - start)[:, None], pos.shape), \
        pos < end[:, None]


class _Adaptive(Operator):
    nd: int = 2
    layout: str = "N, C, H, W"

    def __init__(self, output_size: int | None | Sequence[int | None],
                 return_indices: bool = False) -> None:
        who = type(self).__name__
        if return_indices:
            raise ValueError(f"{who}: return_indices=True is not supported (the indices are not "
                             f"returned)")
        vals = tuple(output_size) if isinstance(output_size, Sequence) else (output_size,) * self.nd
        if len(vals) != self.nd or not all(
                v is None or isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                for v in vals):
            raise ValueError(f"{who}: output_size must be a positive int (or None) or {self.nd} "
                             f"of them, got {output_size!r}")
        self.output_size = tuple(None if v is None else int(v) for v in vals)

    def out_sizes(self, spatial: Sequence[int]) -> list[int]:
        return [n if o is None else o for n, o in zip(spatial, self.output_size)]

    def infer_shape(self, shapes):
        s = shapes.get("input")
        who = type(self).__name__
        check_rank(s, self.nd, who, self.layout)
        if s is None:
            return None
        sp = s[-self.nd:]
        if any(n == 0 for n in sp):
            raise ShapeError(f"{who}: 'input' has an empty spatial axis: {fmt(s)} (torch refuses it)")
        return (*s[:-self.nd], *(n if o is None else o for n, o in zip(sp, self.output_size)))

    def __repr__(self) -> str:
        size = self.output_size[0] if self.nd == 1 else self.output_size
        return f"{type(self).__name__}({size})"


class _AdaptiveAvg(_Adaptive, Separable):
    def taps(self, spatial: Sequence[int]) -> list[Taps]:
        return [window_taps(n, o) for n, o in zip(spatial, self.out_sizes(spatial))]

    # (a half-precision mean accumulates in float32, as torch's; on torch too in 3-D, whose
    # CPU half adaptive_avg_pool3d rounds as it sums, torch.autocast's float32 op)
    @float32_forward(on_torch=lambda op: op.nd == 3)
    def forward(self, xp: Any, input: Any) -> Any:
        if backend_of(xp) == "torch":
            import torch.nn.functional as F

            fn = getattr(F, f"adaptive_avg_pool{self.nd}d")
            return fn(input, self.output_size[0] if self.nd == 1 else self.output_size)
        return apply_taps(xp, input, self.taps(input.shape[-self.nd:]))


class _AdaptiveMax(_Adaptive):
    def _gather(self, spatial: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per output position and window slot (row-major), the flat spatial index it reads
        and whether the slot is inside the window: arrays of shape (*out, K)."""
        axes = [(idx, keep) for idx, _, keep in
                (window_taps(n, o) for n, o in zip(spatial, self.out_sizes(spatial)))]
        nd = self.nd
        if nd == 1:
            return axes[0]

        def spread(a: np.ndarray, i: int) -> np.ndarray:  # (out_i, K_i) at axes i and nd + i
            shape = [1] * (2 * nd)
            shape[i], shape[nd + i] = a.shape
            return a.reshape(shape)

        o = (*(len(idx) for idx, _ in axes), -1)  # (*out, prod(slots)), slots row-major
        flat = sum(spread(idx, i) * int(np.prod(spatial[i + 1:], dtype=np.int64))
                   for i, (idx, _) in enumerate(axes))
        keep = functools.reduce(np.logical_and, [spread(k, i) for i, (_, k) in enumerate(axes)])
        return np.broadcast_to(flat, keep.shape).reshape(o), keep.reshape(o)

    def _pick(self, xp: Any, x: Any) -> tuple[Any, Any, Any]:
        """The maxima, each one's slot and the flat index table (see :meth:`_gather`)."""
        spatial = tuple(x.shape[-self.nd:])
        idx, keep = self._gather(spatial)
        xf = x.reshape(*x.shape[:-self.nd], math.prod(spatial))  # -1: ambiguous for 0 rows
        w = xf[..., idx]  # (..., *out, K)
        w = xp.where(keep, w, -np.inf)
        isnan = xp.isnan(w)
        k = w.shape[-1]
        last_nan = k - 1 - xp.argmax(isnan[..., ::-1], axis=-1)
        slot = xp.where(isnan.any(axis=-1), last_nan, xp.argmax(xp.where(isnan, -np.inf, w), axis=-1))
        m = xp.take_along_axis(w, slot[..., None], axis=-1)[..., 0]
        return m, slot, idx

    def forward(self, xp: Any, input: Any) -> Any:
        if backend_of(xp) == "torch":
            import torch.nn.functional as F

            fn = getattr(F, f"adaptive_max_pool{self.nd}d")
            return fn(input, self.output_size[0] if self.nd == 1 else self.output_size)
        return self._pick(xp, input)[0]

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        if unbatched(x, self.nd):
            x, g = x[None], g[None]
        _, slot, idx = self._pick(np, x)
        src = np.take_along_axis(np.broadcast_to(idx, (*slot.shape, idx.shape[-1])),
                                 slot[..., None], axis=-1)[..., 0]
        rows = int(np.prod(x.shape[:-self.nd]))
        gx = np.zeros((rows, int(np.prod(x.shape[-self.nd:]))), g.dtype)
        per_row = math.prod(g.shape[-self.nd:])
        np.add.at(gx, (np.arange(rows)[:, None], src.reshape(rows, per_row)),
                  g.reshape(rows, per_row))
        return {"input": gx.reshape(args["input"].shape)}


class AdaptiveAvgPool1D(_AdaptiveAvg):
    """Mean over torch's adaptive windows of (N, C, L) or (C, L), as
    ``nn.AdaptiveAvgPool1d(output_size)``."""

    nd, layout = 1, "N, C, L"


class AdaptiveAvgPool2D(_AdaptiveAvg):
    """Mean over torch's adaptive windows of (N, C, H, W) or (C, H, W), as
    ``nn.AdaptiveAvgPool2d(output_size)`` (an int, a pair, None keeps an axis)."""


class AdaptiveMaxPool1D(_AdaptiveMax):
    """Max over torch's adaptive windows of (N, C, L) or (C, L), as
    ``nn.AdaptiveMaxPool1d(output_size)``; the gradient goes to the first maximum."""

    nd, layout = 1, "N, C, L"


class AdaptiveMaxPool2D(_AdaptiveMax):
    """Max over torch's adaptive windows of (N, C, H, W) or (C, H, W), as
    ``nn.AdaptiveMaxPool2d(output_size)``; the gradient goes to the first maximum in
    row-major window order."""


class AdaptiveAvgPool3D(_AdaptiveAvg):
    """Mean over torch's adaptive windows of (N, C, D, H, W) or (C, D, H, W), as
    ``nn.AdaptiveAvgPool3d(output_size)`` (an int, a triple, None keeps an axis)."""

    nd, layout = 3, "N, C, D, H, W"


class AdaptiveMaxPool3D(_AdaptiveMax):
    """Max over torch's adaptive windows of (N, C, D, H, W) or (C, D, H, W), as
    ``nn.AdaptiveMaxPool3d(output_size)``; the gradient goes to the first maximum in
    row-major window order."""

    nd, layout = 3, "N, C, D, H, W"
