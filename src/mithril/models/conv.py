"""Convolutions over channels-first inputs, with torch's layouts, numerics and initialisation.

``Convolution1D`` takes (N, C, L) and ``Convolution2D`` (N, C, H, W); the weight is
(out_channels, C / groups, *kernel_size) and the bias (out_channels,), as ``torch.nn.Conv1d`` /
``Conv2d``. Weights start as torch's ``kaiming_uniform_(a=√5)``, U(±1/√fan_in), and biases as
U(±1/√fan_in), with fan_in = C / groups · prod(kernel_size).

Forward per backend: ``torch.nn.functional.conv1d/conv2d`` on torch,
``jax.lax.conv_general_dilated`` on JAX, and on NumPy an im2col of strided windows
(``sliding_window_view``) times the weight (one batched matmul). The NumPy VJP scatters the
input cotangent back one kernel offset at a time (a loop over the kernel, never over pixels).

The window helpers here (padding, output sizes, windows and their transpose) are shared with
:mod:`mithril.models.pooling`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .operator import Operator, ShapeError, backend_of, fmt

Pads = tuple[tuple[int, int], ...]


# -- backend dispatch -------------------------------------------------------------------------
# -- argument normalisation -------------------------------------------------------------------
def ntuple(value: Any, nd: int, name: str, who: str, minimum: int = 1) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ``nd`` ints) as an ``nd``-tuple of ints >= ``minimum``."""
    vals = (value,) * nd if isinstance(value, (int, np.integer)) else tuple(value) \
        if isinstance(value, Sequence) and not isinstance(value, str) else None
    if vals is None or len(vals) != nd or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum for v in vals):
        kind = "an int" if nd == 1 else f"an int or a sequence of {nd} ints"
        raise ValueError(f"{who}: {name} must be {kind}, each >= {minimum}, got {value!r}")
    return tuple(int(v) for v in vals)


def padding_pairs(padding: Any, nd: int, kernel: tuple[int, ...], dilation: tuple[int, ...],
                  stride: tuple[int, ...], who: str) -> Pads:
    """Per spatial axis ``(before, after)`` zero padding from an int, ``nd`` ints, ``nd``
    ``(before, after)`` pairs, ``"valid"`` (none) or ``"same"`` (output size = input size,
    stride 1 only; an odd total puts the extra element after, as torch)."""
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{who}: padding='same' needs stride 1 (as torch), got stride {stride}")
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise ValueError(f"{who}: padding must be an int, a sequence, 'same' or 'valid', got {padding!r}")
    if isinstance(padding, Sequence) and len(padding) == nd and all(
            isinstance(p, Sequence) and not isinstance(p, str) for p in padding):
        pairs = tuple(tuple(ntuple(p, 2, "padding pair", who, minimum=0)) for p in padding)
        return pairs  # type: ignore[return-value]
    return tuple((p, p) for p in ntuple(padding, nd, "padding", who, minimum=0))


def check_rank(s: tuple | None, nd: int, who: str, layout: str) -> None:
    if s is not None and len(s) != nd + 2:
        raise ShapeError(f"{who}: 'input' must have rank {nd + 2} ({layout}), got shape {fmt(s)}")


def out_sizes(spatial: Sequence[int | None], kernel: tuple[int, ...], stride: tuple[int, ...],
              dilation: tuple[int, ...], pads: Pads, who: str) -> tuple[int | None, ...]:
    """floor((n + before + after − dilation·(k − 1) − 1) / stride) + 1 per axis (``None`` stays
    ``None``); a ``ShapeError`` when the (dilated) kernel is larger than the padded input."""
    out: list[int | None] = []
    for i, (n, k, s, d, (lo, hi)) in enumerate(zip(spatial, kernel, stride, dilation, pads)):
        if n is None:
            out.append(None)
            continue
        eff, padded = d * (k - 1) + 1, n + lo + hi
        if eff > padded:
            what = f"kernel size {k}" + (f" (dilated to {eff})" if d > 1 else "")
            raise ShapeError(f"{who}: {what} is larger than the padded input along spatial axis "
                             f"{i} (size {n} + padding {lo}+{hi} = {padded})")
        out.append((padded - eff) // s + 1)
    return tuple(out)


# -- NumPy window machinery -------------------------------------------------------------------
def pad(x: np.ndarray, pads: Pads, value: float = 0.0) -> np.ndarray:
    if not any(lo or hi for lo, hi in pads):
        return x
    return np.pad(x, ((0, 0), (0, 0), *pads), constant_values=value)


def windows(xp: np.ndarray, kernel: tuple[int, ...], stride: tuple[int, ...],
            dilation: tuple[int, ...]) -> np.ndarray:
    """A view (N, C, *out, *kernel) of the windows of the padded ``xp`` (N, C, *spatial)."""
    nd = len(kernel)
    eff = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    v = sliding_window_view(xp, eff, axis=tuple(range(2, 2 + nd)))
    return v[(slice(None), slice(None), *(slice(None, None, s) for s in stride),
              *(slice(None, None, d) for d in dilation))]


def offset_slices(off: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
                  out: Sequence[int]) -> tuple[slice, ...]:
    """The elements of a padded (N, C, *spatial) array at kernel offset ``off`` of every window."""
    return (slice(None), slice(None), *(slice(o * d, o * d + s * (n - 1) + 1, s)
                                        for o, d, s, n in zip(off, dilation, stride, out)))


def fold(gwin: np.ndarray, padded_shape: tuple[int, ...], stride: tuple[int, ...],
         dilation: tuple[int, ...], pads: Pads) -> np.ndarray:
    """The transpose of :func:`windows` then padding: scatter-add ``gwin`` (N, C, *out, *kernel)
    onto the padded input and crop the padding off. One strided add per kernel offset."""
    nd = len(stride)
    kernel, out = gwin.shape[-nd:], gwin.shape[2:2 + nd]
    gx = np.zeros(padded_shape, dtype=gwin.dtype)
    for off in np.ndindex(*kernel):
        gx[offset_slices(off, stride, dilation, out)] += gwin[(..., *off)]
    crop = tuple(slice(lo, gx.shape[2 + i] - hi) for i, (lo, hi) in enumerate(pads))
    return gx[(slice(None), slice(None), *crop)]


# -- convolution ------------------------------------------------------------------------------
class _Convolution(Operator):
    nd: int = 2
    layout: str = "N, C, H, W"

    def __init__(self, kernel_size: int | Sequence[int], out_channels: int | None = None,
                 stride: int | Sequence[int] = 1, padding: Any = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, use_bias: bool = True) -> None:
        who = type(self).__name__
        if not isinstance(out_channels, (int, np.integer)) or isinstance(out_channels, bool) \
                or out_channels <= 0:
            raise ValueError(f"{who}: out_channels must be a positive int, got {out_channels!r}")
        if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups <= 0:
            raise ValueError(f"{who}: groups must be a positive int, got {groups!r}")
        if out_channels % groups:
            raise ValueError(f"{who}: out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        self.kernel_size = ntuple(kernel_size, self.nd, "kernel_size", who)
        self.stride = ntuple(stride, self.nd, "stride", who)
        self.dilation = ntuple(dilation, self.nd, "dilation", who)
        self.pads = padding_pairs(padding, self.nd, self.kernel_size, self.dilation, self.stride, who)
        self.padding = padding
        self.out_channels, self.groups, self.use_bias = int(out_channels), int(groups), use_bias
        self._fan_in: int | None = None

    @property
    def param_init(self) -> dict[str, str]:  # type: ignore[override]
        """torch's defaults: weight ``kaiming_uniform_(a=√5)``, bias U(±1/√fan_in)."""
        init = {"weight": "kaiming_uniform"}
        if self.use_bias:
            init["bias"] = f"fan_in_uniform:{self._fan_in}" if self._fan_in else "zeros"
        return init

    def _in_channels(self, shapes) -> int | None:
        s = shapes.get("input")
        who = type(self).__name__
        check_rank(s, self.nd, who, self.layout)
        c = None if s is None else s[1]
        if c is not None and c % self.groups:
            raise ShapeError(f"{who}: input channels ({c}) must be divisible by groups "
                             f"({self.groups}); 'input' has shape {fmt(s)}")
        return c

    def param_shapes(self, shapes):
        c = self._in_channels(shapes)
        if c is None:
            return {}
        w = (self.out_channels, c // self.groups, *self.kernel_size)
        self._fan_in = math.prod(w[1:])
        return {"weight": w, "bias": (self.out_channels,)} if self.use_bias else {"weight": w}

    def infer_shape(self, shapes):
        self._in_channels(shapes)
        s = shapes.get("input")
        if s is None:
            return None
        sp = out_sizes(s[2:], self.kernel_size, self.stride, self.dilation, self.pads,
                       type(self).__name__)
        return (s[0], self.out_channels, *sp)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, xp: Any, input: Any, weight: Any, bias: Any = None) -> Any:
        kind = backend_of(xp)
        if kind == "torch":
            return self._torch(xp.t, input, weight, bias)
        if kind == "jax":
            return self._jax(input, weight, bias)
        y, _ = self._numpy(input, weight)
        if bias is not None:
            y = y + bias.reshape((-1,) + (1,) * self.nd)
        return y

    def _torch(self, torch: Any, x: Any, w: Any, b: Any) -> Any:
        import torch.nn.functional as F

        conv = F.conv1d if self.nd == 1 else F.conv2d
        if all(lo == hi for lo, hi in self.pads):
            return conv(x, w, b, self.stride, tuple(lo for lo, _ in self.pads), self.dilation,
                        self.groups)
        flat = [p for pair in reversed(self.pads) for p in pair]  # F.pad: last axis first
        return conv(F.pad(x, flat), w, b, self.stride, 0, self.dilation, self.groups)

    def _jax(self, x: Any, w: Any, b: Any) -> Any:
        from jax import lax

        spec = ("NCH", "OIH", "NCH") if self.nd == 1 else ("NCHW", "OIHW", "NCHW")
        y = lax.conv_general_dilated(x, w, self.stride, list(self.pads),
                                     rhs_dilation=self.dilation, dimension_numbers=spec,
                                     feature_group_count=self.groups,
                                     precision=lax.Precision.HIGHEST)
        return y if b is None else y + b.reshape((-1,) + (1,) * self.nd)

    def _cols(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        """im2col: (N, G, P, Cg·prod(kernel)) with P = prod(output spatial), and the output
        spatial sizes."""
        n, c = x.shape[:2]
        g, nd = self.groups, self.nd
        win = windows(pad(x, self.pads), self.kernel_size, self.stride, self.dilation)
        out = win.shape[2:2 + nd]
        win = win.reshape(n, g, c // g, *win.shape[2:])            # (N, G, Cg, *out, *k)
        order = (0, 1, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
        return win.transpose(order).reshape(n, g, math.prod(out), -1), out

    def _numpy(self, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols, out = self._cols(x)
        n, g = x.shape[0], self.groups
        og = self.out_channels // g
        wk = w.reshape(g, og, -1)                                   # (G, Og, K)
        if g == 1:
            y = (cols.reshape(-1, cols.shape[-1]) @ wk[0].T).reshape(n, 1, -1, og)
        else:
            y = cols @ wk.transpose(0, 2, 1)                         # (N, G, P, Og)
        return y.transpose(0, 1, 3, 2).reshape(n, self.out_channels, *out), cols

    def vjp(self, g, out, args, wrt):
        x, w = args["input"], args["weight"]
        n, c = x.shape[:2]
        gr, nd = self.groups, self.nd
        og = self.out_channels // gr
        res = {}
        if "bias" in wrt:
            res["bias"] = g.sum(axis=(0, *range(2, 2 + nd)))
        if not {"input", "weight"} & wrt:
            return res
        osp = g.shape[2:]
        gt = g.reshape(n, gr, og, -1).transpose(0, 1, 3, 2)          # (N, G, P, Og)
        wk = w.reshape(gr, og, -1)                                   # (G, Og, K)
        if "weight" in wrt:
            cols, _ = self._cols(x)
            gw = np.matmul(gt.transpose(1, 3, 0, 2).reshape(gr, og, -1),
                           cols.transpose(1, 0, 2, 3).reshape(gr, -1, cols.shape[-1]))
            res["weight"] = gw.reshape(w.shape)
        if "input" in wrt:
            gcols = gt @ wk                                          # (N, G, P, K)
            gwin = gcols.reshape(n, gr, *osp, c // gr, *self.kernel_size)
            order = (0, 1, 2 + nd, *range(2, 2 + nd), *range(3 + nd, 3 + 2 * nd))
            gwin = gwin.transpose(order).reshape(n, c, *osp, *self.kernel_size)
            padded = (n, c, *(s + lo + hi for s, (lo, hi) in zip(x.shape[2:], self.pads)))
            res["input"] = fold(gwin, padded, self.stride, self.dilation, self.pads)
        return res

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kernel_size}, {self.out_channels}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
                f"groups={self.groups}, use_bias={self.use_bias})")


class Convolution1D(_Convolution):
    """1-D convolution (cross-correlation, as torch) of (N, C, L) into (N, out_channels, L');
    weight (out_channels, C / groups, k), bias (out_channels,). ``padding``: an int, a
    ``(before, after)`` pair in a 1-sequence, ``"valid"`` or ``"same"`` (stride 1)."""

    nd = 1
    layout = "N, C, L"


class Convolution2D(_Convolution):
    """2-D convolution (cross-correlation, as torch) of (N, C, H, W) into
    (N, out_channels, H', W'); weight (out_channels, C / groups, kh, kw), bias (out_channels,).
    ``kernel_size``, ``stride``, ``dilation``: an int or a pair; ``padding``: an int, a pair,
    a pair of ``(before, after)`` pairs, ``"valid"`` or ``"same"`` (stride 1)."""

    nd = 2
    layout = "N, C, H, W"
