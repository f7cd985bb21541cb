"""Resizing, as torch's ``nn.Upsample`` / ``F.interpolate`` (modes nearest, nearest-exact,
linear, bilinear, trilinear, bicubic, area)
and ``nn.PixelShuffle`` / ``nn.PixelUnshuffle``.

Nearest and linear resizing, and adaptive average pooling, are a fixed linear map along each
spatial axis whose output j reads a few taps: sum_k w[j, k] · x[idx[j, k]] over the slots k
where mask[j, k] (:class:`Separable`; bilinear = linear along H, then along W; trilinear
along D, H, W). A gather, not
a dense matrix: a NaN or inf stays in the outputs that read it (0 · inf would spread it), and
a tap of weight 0 is still read where torch's kernel reads it (linear: λ = 0). The NumPy VJP
adds w · g onto idx (one ``bincount`` per axis).

Sizes and source positions as torch (aten/src/ATen/native/UpSample.h): the output size is
``size``, or floor(n · scale_factor). The scale ``r`` is in/out when ``size`` is given or
``recompute_scale_factor=True``, else 1/scale_factor. Nearest: output j reads
min(floor(j · r), n − 1), in float32 as torch's kernel (``floorf``; r rounded to float32);
in 2-D an output of size n or 2n reads j or j // 2 (torch's shortcut). torch's 1-D and 3-D
forwards take no shortcut (scale_factor=1.2, n = 3: [x0, x0, x1]) but its backward does (as if it
were [x0, x1, x2]: gradient [1, 1, 1] where its forward's is [2, 1, 0]); ours is that
forward's and its true gradient (on torch too: a gather there). Nearest-exact: output j
reads min(floor((j + ½)·r), n − 1) (torch's ``nearest_exact_idx``, no shortcut; its backward
agrees). Linear: source s = r · j with
``align_corners=True`` (r = (n − 1)/(out − 1), 0 for out = 1), else max(r · (j + ½) − ½, 0);
output j = (1 − λ)·x[⌊s⌋] + λ·x[min(⌊s⌋ + 1, n − 1)], λ = s − ⌊s⌋; an axis of unchanged size
is copied (torch's forward and backward both; s = j even for scale_factor=1.2 on 3). Bicubic (2-D, per axis):
the same source s without the clamp at 0, four taps ⌊s⌋ − 1 .. ⌊s⌋ + 2 each clamped into
[0, n − 1] (torch's border: the edge pixel repeated), weighted by Keys' cubic convolution
with A = −0.75 at distances 1 + t, t, 1 − t, 2 − t (t = s − ⌊s⌋), as torch's
``get_cubic_upsample_coefficients``; outputs may overshoot the input's range, as torch's.
Where the output has the input's size (a ``scale_factor`` such as 1.2 on 3 pixels) torch's
bicubic backward copies the cotangent (its same-size shortcut) while its forward
interpolates; ours is that forward's and its true gradient, on torch too (the taps there).
Area: adaptive average pooling to the output size (torch's ``F.interpolate(mode="area")``),
each output the mean of the window ⌊j·n/out⌋ .. ⌈(j + 1)·n/out⌉ − 1.

Forward: ``F.interpolate`` / ``F.pixel_shuffle`` on torch; on NumPy and JAX the taps gathered
and summed per axis, the pixel shuffles a reshape and transpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ShapeError
from .operator import Operator, backend_of, fmt

UPSAMPLE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "bicubic",
                  "area")
NEAREST_MODES = ("nearest", "nearest-exact")
NO_CORNERS = (*NEAREST_MODES, "area")  # the modes that take no align_corners (as torch)


#: per axis: (idx, weight, mask), each (out, K): output j is sum over the slots k where
#: mask[j, k] of weight[j, k] · x[idx[j, k]]
Taps = tuple[np.ndarray, np.ndarray, np.ndarray]


def apply_taps(xp: Any, x: Any, taps: Sequence[Taps]) -> Any:
    """``x`` with its last ``len(taps)`` axes each mapped by its taps (the forward)."""
    nd = len(taps)
    for i, (idx, w, mask) in enumerate(taps):
        ax = len(x.shape) - nd + i
        xm = xp.moveaxis(x, ax, -1)
        terms = xm[..., idx] * w.astype(x.dtype)  # (..., out, K)
        if not mask.all():
            terms = xp.where(mask, terms, 0)
        x = xp.moveaxis(terms.sum(axis=-1), -1, ax)
    return x


def scatter_taps(g: np.ndarray, shape: Sequence[int], taps: Sequence[Taps]) -> np.ndarray:
    """The VJP of :func:`apply_taps` (NumPy) for an input of ``shape``: along each axis, from
    the last, each output's cotangent times its weights added onto the positions it read."""
    nd = len(taps)
    for i in reversed(range(nd)):
        idx, w, mask = taps[i]
        ax, n = len(shape) - nd + i, shape[len(shape) - nd + i]
        gm = np.moveaxis(g, ax, -1)
        lead = gm.shape[:-1]
        rows = int(np.prod(lead))
        contrib = gm[..., None] * np.where(mask, w, 0)  # (..., out, K)
        flat = (np.arange(rows)[:, None] * n + idx.reshape(-1)).reshape(-1)
        gx = np.bincount(flat, weights=contrib.reshape(-1), minlength=rows * n)
        g = np.moveaxis(gx.astype(g.dtype, copy=False).reshape(*lead, n), -1, ax)
    return np.ascontiguousarray(g)


class Separable(Operator):
    """A linear map along each of the last ``nd`` axes given by ``taps(spatial)`` (see the
    module docstring): forward :func:`apply_taps`, NumPy VJP :func:`scatter_taps`."""

    nd: int = 2

    def spatial_nd(self, rank: int) -> int:
        """How many trailing axes are mapped, for an input of rank ``rank``."""
        return self.nd

    def taps(self, spatial: Sequence[int]) -> list[Taps]:
        raise NotImplementedError

    def vjp(self, g, out, args, wrt):
        shape = args["input"].shape
        return {"input": scatter_taps(g, shape, self.taps(shape[-self.spatial_nd(g.ndim):]))}


def nearest_taps(n: int, out: int, scale: float | None, fast: bool = True,
                 exact: bool = False) -> Taps:
    """torch's nearest source index, one tap of weight 1 per output: ``nearest_idx`` with its
    out = n and out = 2n shortcuts (``fast``), or without them (torch's 1-D forward); with
    ``exact`` ``nearest_exact_idx``: min(floor((j + ½)·r), n − 1), no shortcut, the product in
    double of the float32 scale, then floorf's float32."""
    j = np.arange(out)
    if exact:
        r = np.float32(1.0 / scale) if scale is not None and scale > 0 else \
            np.float32(n) / np.float32(out)
        src = np.floor(((j + 0.5) * np.float64(r)).astype(np.float32)).astype(np.int64)
        src = np.minimum(src, n - 1)
    elif fast and out == n:
        src = j
    elif fast and out == 2 * n:
        src = j >> 1
    else:  # in float32, as torch's kernel (floorf; the scale rounded to float)
        r = np.float32(1.0 / scale) if scale is not None and scale > 0 else \
            np.float32(n) / np.float32(out)
        src = np.minimum(np.floor(j.astype(np.float32) * r).astype(np.int64), n - 1)
    return src[:, None], np.ones((out, 1)), np.ones((out, 1), bool)


def linear_taps(n: int, out: int, scale: float | None, align_corners: bool) -> Taps:
    """torch's linear interpolation: taps ⌊s⌋ and min(⌊s⌋ + 1, n − 1), weights 1 − λ, λ; an
    axis whose size does not change is copied (torch's ``compute_source_index_and_lambda``),
    even where a ``scale_factor`` such as 1.2 would move its source positions."""
    j = np.arange(out, dtype=np.float64)
    if out == n:
        s = j
    elif align_corners:
        s = j * ((n - 1) / (out - 1) if out > 1 else 0.0)
    else:
        r = 1.0 / scale if scale is not None and scale > 0 else n / out
        s = np.maximum(r * (j + 0.5) - 0.5, 0.0)
    lo = np.minimum(np.floor(s).astype(np.int64), n - 1)
    lam = np.clip(s - lo, 0.0, 1.0)
    return (np.stack([lo, np.minimum(lo + 1, n - 1)], 1), np.stack([1.0 - lam, lam], 1),
            np.ones((out, 2), bool))


def cubic_taps(n: int, out: int, scale: float | None, align_corners: bool,
               a: float = -0.75) -> Taps:
    """torch's bicubic interpolation along one axis: taps ⌊s⌋ − 1 .. ⌊s⌋ + 2 clamped into the
    axis, weights Keys' cubic convolution (A = −0.75) of their distances to s."""
    j = np.arange(out, dtype=np.float64)
    if align_corners:
        s = j * ((n - 1) / (out - 1) if out > 1 else 0.0)
    else:  # no clamp at 0 for the cubic (torch's area_pixel_compute_source_index)
        s = (1.0 / scale if scale is not None and scale > 0 else n / out) * (j + 0.5) - 0.5
    lo = np.floor(s)
    t = (s - lo)[:, None]
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    w = np.concatenate([far(t + 1), near(t), near(1 - t), far(2 - t)], 1)
    idx = np.clip(lo.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n - 1)
    return idx, w, np.ones((out, 4), bool)


class Upsample(Separable):
    """``nn.Upsample`` / ``F.interpolate`` on (N, C, L) (nearest, linear), (N, C, H, W)
    (nearest, bilinear, bicubic) or (N, C, D, H, W) (nearest, trilinear); nearest-exact and
    area (adaptive average pooling to the output size) on any of them: exactly one of ``size`` (an int or one per axis) and
    ``scale_factor`` (a positive number or one per axis); ``align_corners`` (linear and cubic
    modes only; default False) and ``recompute_scale_factor`` as torch (see the module docstring)."""

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
        if align_corners is not None and mode in NO_CORNERS:
            raise ValueError(f"{who}: align_corners can only be set with the interpolating modes "
                             f"linear / bilinear / trilinear / bicubic (as torch), got "
                             f"mode={mode!r}")
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
        self.mode_nd = {"linear": 1, "bilinear": 2, "trilinear": 3, "bicubic": 2}.get(mode, 0)  # 0: from the input (nearest)

    def spatial_nd(self, rank: int) -> int:
        nd = rank - 2
        if nd not in (1, 2, 3) or self.mode_nd and nd != self.mode_nd:
            want = {1: "3 (N, C, L)", 2: "4 (N, C, H, W)", 3: "5 (N, C, D, H, W)"}
            ranks = want[self.mode_nd] if self.mode_nd else f"{want[1]}, {want[2]} or {want[3]}"
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

    def taps(self, spatial: Sequence[int]) -> list[Taps]:
        out, scales = self.sizes(spatial)
        if self.mode == "area":
            from .adaptive_pooling import window_taps  # it imports this module

            return [window_taps(n, o) for n, o in zip(spatial, out)]
        if self.mode in NEAREST_MODES:
            # torch's 1-D and 3-D forwards skip nearest_idx's shortcuts (their backwards take them)
            return [nearest_taps(n, o, r, fast=len(spatial) == 2,
                                 exact=self.mode == "nearest-exact")
                    for n, o, r in zip(spatial, out, scales)]
        axis_taps = cubic_taps if self.mode == "bicubic" else linear_taps
        return [axis_taps(n, o, r, self.align_corners) for n, o, r in zip(spatial, out, scales)]

    def forward(self, xp: Any, input: Any) -> Any:
        nd = self.spatial_nd(len(input.shape))
        if backend_of(xp) == "torch" and self.mode == "nearest" and nd != 2:
            import torch  # a gather: F.interpolate's 1-D / 3-D backward disagrees with its forward

            for ax, (idx, _, _) in enumerate(self.taps(input.shape[-nd:]), len(input.shape) - nd):
                input = input.index_select(ax, torch.as_tensor(idx[:, 0], device=input.device))
            return input
        if backend_of(xp) == "torch" and self.mode == "bicubic" and \
                self.sizes(input.shape[-nd:])[0] == list(input.shape[-nd:]):
            # same size, not the identity (a scale_factor's source positions): torch's backward
            # takes its identity shortcut there, its forward does not; the taps give both
            import torch

            for ax, (idx, w, _) in enumerate(self.taps(input.shape[-nd:]), input.ndim - nd):
                terms = input.movedim(ax, -1)[..., torch.as_tensor(idx, device=input.device)]
                input = (terms * torch.as_tensor(w, dtype=input.dtype, device=input.device)
                         ).sum(-1).movedim(-1, ax)
            return input
        if backend_of(xp) == "torch":
            import torch.nn.functional as F

            kw = {"align_corners": self.align_corners} if self.mode not in NO_CORNERS else {}
            return F.interpolate(input, size=self.size, scale_factor=self.scale_factor,
                                 mode=self.mode, recompute_scale_factor=self.recompute_scale_factor
                                 if self.scale_factor is not None else None, **kw)
        return apply_taps(xp, input, self.taps(input.shape[-nd:]))

    def __repr__(self) -> str:
        return (f"Upsample(size={self.size}, scale_factor={self.scale_factor}, mode={self.mode!r}"
                + (f", align_corners={self.align_corners}" if self.mode not in NO_CORNERS
                   else "")
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
            y = x.reshape(*b, c // (r * r), r, r, h, w)
            move = y.permute if hasattr(y, "permute") else y.transpose  # torch's; NumPy's, JAX's
            return move(*lead, k, k + 3, k + 1, k + 4, k + 2).reshape(
                *b, c // (r * r), h * r, w * r)
        y = x.reshape(*b, c, h // r, r, w // r, r)
        move = y.permute if hasattr(y, "permute") else y.transpose
        return move(*lead, k, k + 2, k + 4, k + 1, k + 3).reshape(*b, c * r * r, h // r, w // r)

    def forward(self, xp: Any, input: Any) -> Any:
        if backend_of(xp) == "torch" and input.numel():  # torch's empty-input paths: the
            import torch.nn.functional as F  # unshuffle keeps the shape, the shuffle's backward

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
