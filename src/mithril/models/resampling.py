"""Resizing, as torch's ``nn.Upsample`` / ``F.interpolate`` (modes nearest, linear, bilinear)
and ``nn.PixelShuffle`` / ``nn.PixelUnshuffle``.

Nearest and linear resizing map each spatial axis by a fixed (out, in) matrix M, so the
output is ``x ×_axis M`` axis by axis (bilinear = linear along H, then along W) and the VJP is
the cotangent times Mᵀ. :class:`Separable` holds that: an operator gives
:meth:`Separable.matrices` for the input's spatial sizes; adaptive average pooling is one too.

Sizes and source positions as torch (aten/src/ATen/native/UpSample.h): the output size is
``size``, or floor(n · scale_factor). The scale ``r`` is in/out when ``size`` is given or
``recompute_scale_factor=True``, else 1/scale_factor. Nearest: output j reads
min(floor(j · r), n − 1), in float32 as torch's kernel (``floorf``; r rounded to float32);
an output of size n or 2n reads j or j // 2. Linear: source s = r · j with
``align_corners=True`` (r = (n − 1)/(out − 1), 0 for out = 1), else max(r · (j + ½) − ½, 0);
output j = (1 − λ)·x[⌊s⌋] + λ·x[min(⌊s⌋ + 1, n − 1)], λ = s − ⌊s⌋.

Forward: ``F.interpolate`` / ``F.pixel_shuffle`` on torch; on NumPy and JAX one ``tensordot``
per axis (nearest reads one element: M is 0/1), the pixel shuffles a reshape and transpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ShapeError
from .operator import Operator, backend_of, fmt

UPSAMPLE_MODES = ("nearest", "linear", "bilinear")


def apply_axes(xp: Any, x: Any, mats: Sequence[np.ndarray], transpose: bool = False) -> Any:
    """``x`` with its last ``len(mats)`` axes each multiplied by its (out, in) matrix (or, for
    ``transpose``, by Mᵀ: the VJP)."""
    nd = len(mats)
    for i, m in enumerate(mats):
        ax = x.ndim - nd + i
        m = (m.T if transpose else m).astype(x.dtype)
        if backend_of(xp) == "jax":
            import jax.numpy as jnp

            m = jnp.asarray(m)
        x = xp.moveaxis(xp.tensordot(x, m, axes=([ax], [1])), -1, ax)
    return x


class Separable(Operator):
    """A linear map along each of the last ``nd`` axes: ``matrices(spatial)`` gives the (out,
    in) matrices; forward ``x ×_axis M``, VJP ``g ×_axis Mᵀ``."""

    nd: int = 2

    def spatial_nd(self, rank: int) -> int:
        """How many trailing axes are mapped, for an input of rank ``rank``."""
        return self.nd

    def matrices(self, spatial: Sequence[int]) -> list[np.ndarray]:
        raise NotImplementedError

    def vjp(self, g, out, args, wrt):
        nd = self.spatial_nd(g.ndim)
        return {"input": np.ascontiguousarray(
            apply_axes(np, g, self.matrices(args["input"].shape[-nd:]), transpose=True))}


def nearest_matrix(n: int, out: int, scale: float | None) -> np.ndarray:
    """(out, n) 0/1 matrix of torch's nearest source index (``nearest_idx``)."""
    j = np.arange(out)
    if out == n:
        src = j
    elif out == 2 * n:
        src = j >> 1
    else:
        r = np.float32(1.0 / scale) if scale is not None and scale > 0 else \
            np.float32(n) / np.float32(out)
        src = np.minimum(np.floor(j.astype(np.float32) * r).astype(np.int64), n - 1)
    m = np.zeros((out, n))
    m[j, src] = 1.0
    return m


def linear_matrix(n: int, out: int, scale: float | None, align_corners: bool) -> np.ndarray:
    """(out, n) matrix of torch's linear interpolation weights (two per row)."""
    j = np.arange(out, dtype=np.float64)
    if align_corners:
        s = j * ((n - 1) / (out - 1) if out > 1 else 0.0)
    else:
        r = 1.0 / scale if scale is not None and scale > 0 else n / out
        s = np.maximum(r * (j + 0.5) - 0.5, 0.0)
    lo = np.minimum(np.floor(s).astype(np.int64), n - 1)
    lam = np.clip(s - lo, 0.0, 1.0)
    hi = np.minimum(lo + 1, n - 1)
    m = np.zeros((out, n))
    np.add.at(m, (np.arange(out), lo), 1.0 - lam)
    np.add.at(m, (np.arange(out), hi), lam)
    return m


class Upsample(Separable):
    """``nn.Upsample`` / ``F.interpolate`` on (N, C, L) (nearest, linear) or (N, C, H, W)
    (nearest, bilinear): exactly one of ``size`` (an int or one per axis) and
    ``scale_factor`` (a positive number or one per axis); ``align_corners`` (linear modes
    only; default False) and ``recompute_scale_factor`` as torch (see the module docstring)."""

    def __init__(self, size: int | Sequence[int] | None = None,
                 scale_factor: float | Sequence[float] | None = None, mode: str = "nearest",
                 align_corners: bool | None = None,
                 recompute_scale_factor: bool | None = None) -> None:
        who = "Upsample"
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"{who}: mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
        if (size is None) == (scale_factor is None):
            raise ValueError(f"{who}: give exactly one of size and scale_factor (as torch), got "
                             f"size={size!r}, scale_factor={scale_factor!r}")
        if align_corners is not None and mode == "nearest":
            raise ValueError(f"{who}: align_corners can only be set with the interpolating modes "
                             f"linear / bilinear (as torch), got mode='nearest'")
        if recompute_scale_factor and size is not None:
            raise ValueError(f"{who}: recompute_scale_factor is not meaningful with an explicit "
                             f"size (as torch)")
        for name, v, kind in (("size", size, (int, np.integer)),
                              ("scale_factor", scale_factor, (int, float, np.number))):
            vals = v if isinstance(v, Sequence) else () if v is None else (v,)
            if not all(isinstance(a, kind) and not isinstance(a, bool) and a > 0 for a in vals):
                raise ValueError(f"{who}: {name} must be positive (one or one per spatial axis), "
                                 f"got {v!r}")
        self.size, self.scale_factor, self.mode = size, scale_factor, mode
        self.align_corners = bool(align_corners)
        self.recompute_scale_factor = bool(recompute_scale_factor)
        self.mode_nd = {"linear": 1, "bilinear": 2}.get(mode, 0)  # 0: from the input (nearest)

    def spatial_nd(self, rank: int) -> int:
        nd = rank - 2
        if nd not in (1, 2) or self.mode_nd and nd != self.mode_nd:
            want = {1: "3 (N, C, L)", 2: "4 (N, C, H, W)"}
            ranks = want[self.mode_nd] if self.mode_nd else f"{want[1]} or {want[2]}"
            raise ShapeError(f"Upsample: mode={self.mode!r} needs an 'input' of rank {ranks}, "
                             f"got rank {rank}")
        for name, v in (("size", self.size), ("scale_factor", self.scale_factor)):
            if isinstance(v, Sequence) and len(v) != nd:
                raise ShapeError(f"Upsample: {name} {tuple(v)} has {len(v)} entries for an "
                                 f"input with {nd} spatial axes")
        return nd

    def sizes(self, spatial: Sequence[int]) -> tuple[list[int], list[float | None]]:
        """The output sizes and the scale factors torch passes its kernels (None: in/out)."""
        nd = len(spatial)
        if self.size is not None:
            out = list(self.size) if isinstance(self.size, Sequence) else [self.size] * nd
            return [int(o) for o in out], [None] * nd
        sf = list(self.scale_factor) if isinstance(self.scale_factor, Sequence) \
            else [self.scale_factor] * nd
        out = [math.floor(float(n) * float(s)) for n, s in zip(spatial, sf)]
        return out, [None] * nd if self.recompute_scale_factor else [float(s) for s in sf]

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        nd = self.spatial_nd(len(s))
        if any(n is None for n in s[-nd:]):
            return (*s[:-nd], *((None,) * nd)) if self.size is None else \
                (*s[:-nd], *self.sizes([1] * nd)[0])
        out = self.sizes(s[-nd:])[0]
        if any(n == 0 for n in s[-nd:]) or any(o < 1 for o in out):
            raise ShapeError(f"Upsample: input {fmt(s)} gives an empty output size {tuple(out)}")
        return (*s[:-nd], *out)

    def matrices(self, spatial: Sequence[int]) -> list[np.ndarray]:
        out, scales = self.sizes(spatial)
        if self.mode == "nearest":
            return [nearest_matrix(n, o, r) for n, o, r in zip(spatial, out, scales)]
        return [linear_matrix(n, o, r, self.align_corners) for n, o, r in zip(spatial, out, scales)]

    def forward(self, xp: Any, input: Any) -> Any:
        nd = self.spatial_nd(len(input.shape))
        if backend_of(xp) == "torch":
            import torch.nn.functional as F

            kw = {"align_corners": self.align_corners} if self.mode != "nearest" else {}
            return F.interpolate(input, size=self.size, scale_factor=self.scale_factor,
                                 mode=self.mode, recompute_scale_factor=self.recompute_scale_factor
                                 if self.scale_factor is not None else None, **kw)
        return apply_axes(xp, input, self.matrices(input.shape[-nd:]))

    def __repr__(self) -> str:
        return (f"Upsample(size={self.size}, scale_factor={self.scale_factor}, mode={self.mode!r}"
                + (f", align_corners={self.align_corners}" if self.mode != "nearest" else "")
                + ")")


class _Shuffle(Operator):
    """Channels to space (:class:`PixelShuffle`) or back (:class:`PixelUnshuffle`); each
    one's VJP is the other."""

    up: bool = True

    def __init__(self, factor: int) -> None:
        if not isinstance(factor, (int, np.integer)) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"{type(self).__name__}: the factor must be a positive int, got "
                             f"{factor!r}")
        self.factor = int(factor)

    def infer_shape(self, shapes):
        s = shapes.get("input")
        who, r = type(self).__name__, self.factor
        if s is None:
            return None
        if len(s) < 3:
            raise ShapeError(f"{who}: 'input' must have rank >= 3 (*, C, H, W), got {fmt(s)}")
        *b, c, h, w = s
        if self.up:
            if c is not None and c % (r * r):
                raise ShapeError(f"{who}: the channels {c} must be divisible by "
                                 f"upscale_factor² = {r * r}")
            return (*b, None if c is None else c // (r * r), *(None if n is None else n * r
                                                               for n in (h, w)))
        if any(n is not None and n % r for n in (h, w)):
            raise ShapeError(f"{who}: H and W {(h, w)} must be divisible by downscale_factor {r}")
        return (*b, None if c is None else c * r * r, *(None if n is None else n // r
                                                        for n in (h, w)))

    def _move(self, x: Any, up: bool) -> Any:
        *b, c, h, w = x.shape
        r, k = self.factor, len(x.shape) - 3
        lead = tuple(range(k))
        if up:  # (c, i, j, h, w) -> (c, h, i, w, j)
            y = x.reshape(*b, c // (r * r), r, r, h, w).transpose(
                *lead, k, k + 3, k + 1, k + 4, k + 2)
            return y.reshape(*b, c // (r * r), h * r, w * r)
        y = x.reshape(*b, c, h // r, r, w // r, r).transpose(*lead, k, k + 2, k + 4, k + 1, k + 3)
        return y.reshape(*b, c * r * r, h // r, w // r)

    def forward(self, xp: Any, input: Any) -> Any:
        if backend_of(xp) == "torch":
            import torch.nn.functional as F

            fn = F.pixel_shuffle if self.up else F.pixel_unshuffle
            return fn(input, self.factor)
        return self._move(input, self.up)

    def vjp(self, g, out, args, wrt):
        return {"input": np.ascontiguousarray(self._move(g, not self.up))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.factor})"


class PixelShuffle(_Shuffle):
    """(*, C·r², H, W) -> (*, C, H·r, W·r), as ``nn.PixelShuffle(r)``: output
    [c, h·r + i, w·r + j] = input[c·r² + i·r + j, h, w]."""


class PixelUnshuffle(_Shuffle):
    """(*, C, H·r, W·r) -> (*, C·r², H, W), as ``nn.PixelUnshuffle(r)``: the inverse of
    :class:`PixelShuffle`."""

    up = False
