"""``Unfold`` (im2col) and ``Fold`` (col2im), as torch's ``nn.Unfold`` / ``nn.Fold``.

With ``kernel_size`` (kh, kw), ``dilation`` d, ``padding`` p (zeros, both sides of each axis)
and ``stride`` s, the sliding blocks of an H × W image number L = Lh · Lw, with
Lh = ⌊(H + 2p_h − d_h(kh − 1) − 1) / s_h⌋ + 1 (and the same for w). ``Unfold`` takes
(N, C, H, W) (or (C, H, W)) to (N, C·kh·kw, L): row c·kh·kw + i·kw + j of column
l = lh·Lw + lw holds the padded input at (c, lh·s_h + i·d_h, lw·s_w + j·d_w). ``Fold`` is its
adjoint: (N, C·kh·kw, L) (or (C·kh·kw, L)) to (N, C, H, W) for ``output_size`` (H, W),
summing the entries that land on one pixel (the padding's are dropped). Each is the other's
VJP. Both are gathers / scatter-adds over one index table (NumPy, JAX); torch runs its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .conv import ntuple
from .operator import Operator, ShapeError, backend_of, fmt, functional_of


class _Blocks(Operator):
    """The block geometry shared by :class:`Unfold` and :class:`Fold`."""

    def __init__(self, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, stride: int | Sequence[int] = 1) -> None:
        who = type(self).__name__
        self.kernel_size = ntuple(kernel_size, 2, "kernel_size", who)
        self.dilation = ntuple(dilation, 2, "dilation", who)
        self.padding = ntuple(padding, 2, "padding", who, minimum=0)
        self.stride = ntuple(stride, 2, "stride", who)

    @property
    def k(self) -> int:
        return math.prod(self.kernel_size)

    def blocks(self, spatial: Sequence[int | None], key: str) -> tuple[int | None, ...]:
        """Blocks per axis (``None`` for an unknown size); a ``ShapeError`` when none fit."""
        out = []
        for n, k, d, p, s in zip(spatial, self.kernel_size, self.dilation, self.padding,
                                 self.stride):
            b = None if n is None else (n + 2 * p - d * (k - 1) - 1) // s + 1
            if b is not None and b < 1:
                raise ShapeError(f"{type(self).__name__}: {key} {fmt(tuple(spatial))} padded by "
                                 f"{self.padding} is smaller than the dilated kernel "
                                 f"{self.kernel_size} (dilation {self.dilation}): no block fits")
            out.append(b)
        return tuple(out)

    def index(self, spatial: Sequence[int]) -> np.ndarray:
        """(K, L): each block element's flat index into the padded image."""
        rows = [np.arange(k)[:, None] * d + np.arange(b)[None, :] * s  # (k, b) per axis
                for k, d, s, b in zip(self.kernel_size, self.dilation, self.stride,
                                      self.blocks(spatial, "size"))]
        (rh, rw), wp = rows, spatial[1] + 2 * self.padding[1]
        idx = rh[:, None, :, None] * wp + rw[None, :, None, :]  # (kh, kw, Lh, Lw)
        return idx.reshape(self.k, -1)

    def _unfold(self, xp: Any, x: Any) -> Any:
        """(N, C, H, W) -> (N, C·K, L) (NumPy / JAX)."""
        (ph, pw), (n, c, h, w) = self.padding, x.shape
        if ph or pw:
            x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        idx = self.index((h, w))  # sizes spelled out: -1 is ambiguous for a batch of 0
        cols = x.reshape(n, c, x.shape[2] * x.shape[3])[:, :, idx]  # (N, C, K, L)
        return cols.reshape(n, c * self.k, idx.shape[1])

    def _fold(self, xp: Any, y: Any, size: Sequence[int]) -> Any:
        """(N, C·K, L) -> (N, C, H, W), summing overlaps (NumPy / JAX)."""
        (ph, pw), (h, w), n = self.padding, size, y.shape[0]
        idx, hp, wp = self.index(size), h + 2 * ph, w + 2 * pw
        y = y.reshape(n, y.shape[1] // self.k, self.k, idx.shape[1])
        if backend_of(xp) == "jax":
            out = xp.zeros((*y.shape[:2], hp * wp), y.dtype).at[:, :, idx].add(y)
        else:  # one kernel offset's blocks land on distinct pixels: no scatter-add needed
            out = np.zeros((*y.shape[:2], hp * wp), y.dtype)
            for i in range(self.k):
                out[:, :, idx[i]] += y[:, :, i]
        return out.reshape(*y.shape[:2], hp, wp)[:, :, ph:ph + h, pw:pw + w]

    def _args(self) -> str:
        return (f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"padding={self.padding}, stride={self.stride}")


class Unfold(_Blocks):
    """im2col, as ``nn.Unfold(kernel_size, dilation=1, padding=0, stride=1)``: (N, C, H, W)
    or (C, H, W) to (N, C·kh·kw, L) or (C·kh·kw, L), the sliding blocks as columns (layout:
    the module docstring). ``kernel_size``, ``dilation``, ``padding`` (zeros, both sides) and
    ``stride`` are an int or a pair."""

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        if len(s) not in (3, 4):
            raise ShapeError(f"Unfold: 'input' must be (N, C, H, W) or (C, H, W), got {fmt(s)}")
        b = self.blocks(s[-2:], "'input'")
        c = s[-3]
        return (*s[:-3], None if c is None else c * self.k,
                None if None in b else math.prod(b))  # type: ignore[arg-type]

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.unfold(input, self.kernel_size, self.dilation, self.padding, self.stride)
        if input.ndim == 3:
            return self._unfold(xp, input[None])[0]
        return self._unfold(xp, input)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        gb = g[None] if x.ndim == 3 else g
        return {"input": self._fold(np, gb, x.shape[-2:]).reshape(x.shape)}

    def __repr__(self) -> str:
        return f"Unfold({self._args()})"


class Fold(_Blocks):
    """col2im, as ``nn.Fold(output_size, kernel_size, dilation=1, padding=0, stride=1)``:
    (N, C·kh·kw, L) or (C·kh·kw, L) to (N, C, H, W) or (C, H, W) for ``output_size`` (H, W),
    summing the block entries that meet on one pixel (the adjoint of :class:`Unfold`; ``Fold``
    of ``Unfold`` multiplies each pixel by the number of blocks covering it). L must be the
    block count of ``output_size``."""

    def __init__(self, output_size: int | Sequence[int], kernel_size: int | Sequence[int],
                 dilation: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 stride: int | Sequence[int] = 1) -> None:
        super().__init__(kernel_size, dilation, padding, stride)
        self.output_size = ntuple(output_size, 2, "output_size", "Fold")
        try:
            self.count = math.prod(self.blocks(self.output_size, "output_size"))  # type: ignore[arg-type]
        except ShapeError as e:  # an argument: a ValueError
            raise ValueError(str(e)) from None

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        if len(s) not in (2, 3):
            raise ShapeError(f"Fold: 'input' must be (N, C·kh·kw, L) or (C·kh·kw, L), got {fmt(s)}")
        ck, blocks = s[-2:]
        if ck is not None and ck % self.k:
            raise ShapeError(f"Fold: 'input' {fmt(s)}: its axis {len(s) - 2} ({ck}) must be "
                             f"divisible by the kernel's {self.k} elements "
                             f"(kernel_size={self.kernel_size})")
        if blocks is not None and blocks != self.count:
            raise ShapeError(f"Fold: 'input' {fmt(s)} has {blocks} blocks, but output_size "
                             f"{self.output_size} with {self._args()} has {self.count}")
        return (*s[:-2], None if ck is None else ck // self.k, *self.output_size)

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.fold(input, self.output_size, self.kernel_size, self.dilation,
                          self.padding, self.stride)
        if input.ndim == 2:
            return self._fold(xp, input[None], self.output_size)[0]
        return self._fold(xp, input, self.output_size)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        gb = g[None] if x.ndim == 2 else g
        return {"input": self._unfold(np, gb).reshape(x.shape)}

    def __repr__(self) -> str:
        return f"Fold(output_size={self.output_size}, {self._args()})"
