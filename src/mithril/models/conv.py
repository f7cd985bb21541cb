"""Convolutions over channels-first inputs, with torch's layouts, numerics and initialisation.

``Convolution1D`` takes (N, C, L) and ``Convolution2D`` (N, C, H, W); the weight is
(out_channels, C / groups, *kernel_size) and the bias (out_channels,), as ``torch.nn.Conv1d`` /
``Conv2d``. Weights start as torch's ``kaiming_uniform_(a=√5)``, U(±1/√fan_in), and biases as
U(±1/√fan_in), with fan_in = C / groups · prod(kernel_size).

Forward per backend: ``torch.nn.functional.conv1d/conv2d`` on torch,
``jax.lax.conv_general_dilated`` on JAX, and on NumPy an im2col of strided windows
(``sliding_window_view``) times the weight: one matmul of (N·out positions, C·kernel) by
(C·kernel, out_channels) per group. The NumPy side works channels-last in memory: the
im2col rows are channels-last windows and the output is the matmul's (N·positions,
out_channels) result seen as (N, out_channels, *spatial) — a transposed view, no copy; NumPy
keeps that memory order through elementwise operators, so the next convolution reads its
input without transposing it. A forward that will be differentiated keeps the im2col matrix
as its residual (the weight gradient is one matmul with it); the input cotangent is the
matmul by the weight gathered back onto the input (col2im, a compiled loop:
:mod:`mithril.models.window_kernels`).

The window helpers here (argument checks, output sizes, per-offset slices, layout-keeping
padding) are shared with :mod:`mithril.models.pooling`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .operator import Operator, ShapeError, backend_of, fmt
from .window_kernels import col2im

Pads = tuple[tuple[int, int], ...]


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
def offset_slices(off: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
                  out: Sequence[int]) -> tuple[slice, ...]:
    """The elements of a padded (N, C, *spatial) array at kernel offset ``off`` of every window."""
    return (slice(None), slice(None), *(slice(o * d, o * d + s * (n - 1) + 1, s)
                                        for o, d, s, n in zip(off, dilation, stride, out)))


def pad_like(x: np.ndarray, pads: Pads, value: float = 0.0) -> np.ndarray:
    """``x`` (N, C, *spatial) padded with ``value``, in ``x``'s memory order (a channels-last
    array stays channels-last: ``empty_like`` keeps the layout)."""
    if not any(lo or hi for lo, hi in pads):
        return x
    shape = (*x.shape[:2], *(n + lo + hi for n, (lo, hi) in zip(x.shape[2:], pads)))
    out = np.full_like(x, value, shape=shape)
    out[crop(pads, x.shape[2:])] = x
    return out


def crop(pads: Pads, spatial: Sequence[int]) -> tuple[slice, ...]:
    """The unpadded region of a padded (N, C, *spatial) array."""
    return (slice(None), slice(None), *(slice(lo, lo + n) for n, (lo, _) in zip(spatial, pads)))


def same_layout(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``a`` in the memory order of ``like`` (same rank): a copy only when the orders differ.
    NumPy's elementwise operations on operands of different orders run short strided inner
    loops, ten times slower than one copy first."""
    def order(x: np.ndarray) -> list[int]:
        return sorted((i for i in range(x.ndim) if x.shape[i] > 1), key=lambda i: -abs(x.strides[i]))

    if order(a) == order(like):
        return a
    out = np.empty_like(like, dtype=a.dtype, shape=a.shape)
    np.copyto(out, a)
    return out


def stacked_like(like: np.ndarray, count: int, dtype: Any) -> list[np.ndarray]:
    """``count`` arrays of ``like``'s shape and memory order, from one allocation."""
    order = sorted(range(like.ndim), key=lambda i: -abs(like.strides[i]))
    buf = np.empty((count, *(like.shape[i] for i in order)), dtype=dtype)
    back = tuple(np.argsort(order))
    return [b.transpose(back) for b in buf]


def disjoint(kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> bool:
    """No element is in two windows (or twice in one), so scattering back can assign."""
    return all(s >= d * (k - 1) + 1 for k, s, d in zip(kernel, stride, dilation))


# -- convolution ------------------------------------------------------------------------------
class _Convolution(Operator):
    nd: int = 2
    layout: str = "N, C, H, W"
    vjp_ignores = frozenset({"input", "bias", "output"})  # the im2col residual has the input
    fresh_output = True  # a view of the matmul's result

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
        return self.forward_residuals(xp, input, weight, bias)[0]

    def forward_residuals(self, xp: Any, input: Any, weight: Any, bias: Any = None) -> Any:
        """NumPy: the output and (the im2col matrix: the weight gradient's other factor,
        the input's shape)."""
        cols, out = self._cols(input)
        g, o = self.groups, self.out_channels
        wk = self._wk(weight)
        if g == 1:
            y = cols[:, 0] @ wk[0].T                                    # (N·P, O)
        else:  # (G, N·P, Og) -> (N·P, G·Og)
            y = np.matmul(cols.transpose(1, 0, 2), wk.transpose(0, 2, 1)).transpose(1, 0, 2)
            y = y.reshape(-1, o)
        if bias is not None:
            y += bias
        # channels-last in memory, (N, O, *out) to the caller: no transposing copy
        return np.moveaxis(y.reshape(input.shape[0], *out, o), -1, 1), (cols, input.shape)

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
        """im2col, channels-last: (N·P, G, kernel·Cg) with P = prod(output spatial), each row
        one window ordered (*kernel, channel); and the output spatial sizes."""
        n, c = x.shape[:2]
        g, nd = self.groups, self.nd
        xl = x.transpose(0, *range(2, 2 + nd), 1)                      # (N, *spatial, C): a view
        if any(lo or hi for lo, hi in self.pads):
            buf = np.zeros((n, *(s + lo + hi for s, (lo, hi) in zip(x.shape[2:], self.pads)), c),
                           dtype=x.dtype)
            buf[(slice(None), *(slice(lo, lo + s) for s, (lo, _) in zip(x.shape[2:], self.pads)))] = xl
            xl = buf
        eff = tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))
        win = sliding_window_view(xl, eff, axis=tuple(range(1, 1 + nd)))   # (N, *, C, *eff)
        if any(s > 1 for s in self.stride) or any(d > 1 for d in self.dilation):
            win = win[(slice(None), *(slice(None, None, s) for s in self.stride), slice(None),
                       *(slice(None, None, d) for d in self.dilation))]
        out = win.shape[1:1 + nd]
        if g > 1:  # (N, *out, G, Cg, *kernel)
            win = win.reshape(*win.shape[:1 + nd], g, c // g, *win.shape[2 + nd:])
        # (N, *out, [G,] *kernel, C / Cg): the one copy
        order = (*range(1 + nd + (g > 1)), *range(2 + nd + (g > 1), 2 + 2 * nd + (g > 1)),
                 1 + nd + (g > 1))
        return win.transpose(order).reshape(n * math.prod(out), g, -1), out

    def _wk(self, w: np.ndarray) -> np.ndarray:
        """The weight as (G, Og, kernel·Cg), columns ordered as :meth:`_cols`' rows."""
        nd = self.nd
        return w.transpose(0, *range(2, 2 + nd), 1).reshape(self.groups, self.out_channels // self.groups, -1)

    def vjp(self, g, out, args, wrt, residuals=None):
        w = args["weight"]
        cols, shape = residuals if residuals is not None else (None, args["input"].shape)
        n, c = shape[:2]
        gr, o = self.groups, self.out_channels
        og, cg = o // gr, c // gr
        res = {}
        g2 = np.moveaxis(g, 1, -1).reshape(-1, o)       # (N·P, O): free when g is channels-last
        if "bias" in wrt:
            res["bias"] = g2.sum(axis=0)
        if not {"input", "weight"} & wrt:
            return res
        g3 = g2.reshape(-1, gr, og).transpose(1, 0, 2)              # (G, N·P, Og)
        if "weight" in wrt:
            if cols is None:
                cols = self._cols(args["input"])[0]
            gw = g3[0].T @ cols[:, 0] if gr == 1 else g3.transpose(0, 2, 1) @ cols.transpose(1, 0, 2)
            gw = np.moveaxis(gw.reshape(o, *self.kernel_size, cg), -1, 1)
            res["weight"] = np.ascontiguousarray(gw)
        if "input" in wrt:
            gcols = g3 @ self._wk(w)                                     # (G, N·P, kernel·Cg)
            gcols = gcols.transpose(1, 0, 2).reshape(n, *g.shape[2:], gr, *self.kernel_size, cg)
            res["input"] = self._col2im(gcols, shape)
        return res

    def _col2im(self, gcols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The transpose of :meth:`_cols`: each input element sums the ``gcols`` (N, *out,
        G, *kernel, Cg) entries it was read into (a compiled gather,
        :func:`~mithril.models.window_kernels.col2im`)."""
        gx = col2im(gcols, tuple(shape[2:]), self.pads, self.stride, self.dilation)
        return np.moveaxis(gx, -1, 1)

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
