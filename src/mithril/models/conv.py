"""Convolutions over channels-first inputs, with torch's layouts, numerics and initialisation.

``Convolution1D`` takes (N, C, L), ``Convolution2D`` (N, C, H, W) and ``Convolution3D``
(N, C, D, H, W), or one example without the batch axis, (C, *spatial), as torch (run as a
batch of one); the weight is (out_channels, C / groups, *kernel_size) and the bias
(out_channels,), as ``torch.nn.Conv1d`` / ``Conv2d`` / ``Conv3d``. Weights start as torch's
``kaiming_uniform_(a=√5)``, U(±1/√fan_in), and biases as U(±1/√fan_in), with
fan_in = C / groups · prod(kernel_size).

Forward per backend: ``torch.nn.functional.conv1d/2d/3d`` on torch,
``jax.lax.conv_general_dilated`` on JAX, and on NumPy an im2col (each window copied into a
row) times the weight: a matmul of (images·out positions, C·kernel) by
(C·kernel, out_channels) per group. The NumPy side works channels-last in memory: the
im2col rows are channels-last windows and the output is the matmul's (N·positions,
out_channels) result seen as (N, out_channels, *spatial) — a transposed view, no copy; NumPy
keeps that memory order through elementwise operators, so the next convolution reads its
input without transposing it. The batch is cut into chunks of about :data:`CHUNK_BYTES` of
im2col rows, copied into one reused buffer and multiplied while they are in cache (a 3×3
kernel's rows are 9x its input: written whole, they would go to memory and back). The VJP
keeps only the input and rebuilds each chunk's rows for the weight gradient; the input
gradient is each chunk's columns g·W gathered back onto the input (col2im, a compiled loop:
:mod:`mithril.models.window_kernels`) while they are in cache.

The window helpers here (argument checks, output sizes, per-offset slices, layout-keeping
padding) are shared with :mod:`mithril.models.pooling`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .operator import Operator, ShapeError, backend_of, fmt
from .window_nd import col2im, im2col

Pads = tuple[tuple[int, int], ...]
#: the im2col rows of one chunk of images, about: in cache while the matmuls read them
CHUNK_BYTES = 1 << 21


# -- argument normalisation -------------------------------------------------------------------
def jax_spec(nd: int) -> tuple[str, str, str]:
    """``lax.conv_general_dilated``'s dimension numbers of a channels-first ``nd``-D convolution."""
    sp = "DHW"[3 - nd:]
    return f"NC{sp}", f"OI{sp}", f"NC{sp}"


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
    """Per spatial axis ``(before, after)`` padding from an int, ``nd`` ints (each both before
    and after, as torch), ``nd`` ``(before, after)`` pairs (for 1-D also one bare pair
    ``(before, after)``: torch's 1-tuple ``(p,)`` is the symmetric form), ``"valid"`` (none) or
    ``"same"`` (output size = input size, stride 1 only; an odd total puts the extra element
    after, as torch)."""
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{who}: padding='same' needs stride 1 (as torch), got stride {stride}")
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise ValueError(f"{who}: padding must be an int, a sequence, 'same' or 'valid', got {padding!r}")
    return int_padding_pairs(padding, nd, who)


def int_padding_pairs(padding: Any, nd: int, who: str) -> Pads:
    """:func:`padding_pairs` without the strings (pooling's form): an int, ``nd`` ints, ``nd``
    ``(before, after)`` pairs, or for 1-D one ``(before, after)`` pair; every number >= 0."""
    if isinstance(padding, Sequence) and not isinstance(padding, str):
        if any(isinstance(p, Sequence) and not isinstance(p, str) for p in padding):
            if len(padding) != nd or not all(isinstance(p, Sequence) for p in padding):
                raise ValueError(f"{who}: padding must hold one (before, after) pair per spatial "
                                 f"axis ({nd}), got {padding!r}")
            return tuple(ntuple(p, 2, "padding pair (before, after)", who, minimum=0)  # type: ignore[misc]
                         for p in padding)
        if nd == 1 and len(padding) == 2:  # 1-D: a bare (before, after) pair
            return (ntuple(padding, 2, "padding pair (before, after)", who, minimum=0),)  # type: ignore[return-value]
        if nd == 1 and len(padding) != 1:
            raise ValueError(f"{who}: padding must be an int, (p,), a (before, after) pair or "
                             f"((before, after),), got {padding!r}")
    return tuple((p, p) for p in ntuple(padding, nd, "padding", who, minimum=0))


def check_rank(s: tuple | None, nd: int, who: str, layout: str, unbatched_ok: bool = True) -> None:
    """An input of rank ``nd + 2`` (batched) or, ``unbatched_ok``, ``nd + 1`` (one example, no
    batch axis: as torch's ConvNd and pooling layers take it)."""
    if s is not None and len(s) not in ((nd + 1, nd + 2) if unbatched_ok else (nd + 2,)):
        alt = f" or {nd + 1} (without the batch axis)" if unbatched_ok else ""
        raise ShapeError(f"{who}: 'input' must have rank {nd + 2} ({layout}){alt}, got shape "
                         f"{fmt(s)}")


def unbatched(x: Any, nd: int) -> bool:
    """``x`` (an array or a cotangent) has no batch axis: rank ``nd + 1``."""
    return x is not None and len(x.shape) == nd + 1


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


#: torch's ``padding_mode``s: F.pad's "reflect" / "replicate" / "circular" before the convolution
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def source_index(n: int, lo: int, hi: int, mode: str) -> np.ndarray:
    """Per position of an axis of size ``n`` padded by ``lo`` / ``hi``, the input position it
    copies under ``mode`` (torch's F.pad: "reflect" mirrors without repeating the edge,
    "replicate" repeats the edge, "circular" wraps around)."""
    j = np.arange(-lo, n + hi)
    if mode == "replicate":
        return np.clip(j, 0, n - 1)
    if mode == "circular":
        return j % n
    j = np.abs(j)  # reflect (every pad < n: one reflection at each end)
    return np.where(j > n - 1, 2 * (n - 1) - j, j)


def check_mode_pads(spatial: Sequence[int | None], pads: Pads, mode: str, who: str) -> None:
    """torch's limits: a reflect padding below the axis's size, a circular one at most it."""
    for i, (n, (lo, hi)) in enumerate(zip(spatial, pads)):
        if n is None or mode == "replicate":
            continue
        if mode == "reflect" and max(lo, hi) >= n or mode == "circular" and max(lo, hi) > n:
            rule = "less than" if mode == "reflect" else "at most"
            raise ShapeError(f"{who}: padding_mode={mode!r} needs each padding {rule} the input "
                             f"size along its axis, got padding {lo}+{hi} on spatial axis {i} of "
                             f"size {n}")


# -- convolution ------------------------------------------------------------------------------
#: torch's arguments of the convolution and pooling layers that are not ours: what instead
TORCH_ONLY = {"bias": "ours is use_bias, a bool", "in_channels": "read from the input's shape",
              "output_padding": "transposed convolutions have it: ConvTranspose1D / 2D / 3D",
              "return_indices": "MaxPool1D / 2D / 3D take it; adaptive pools do not",
              "device": "the backend places the arrays", "dtype": "the backend's dtype is used"}


def refuse_unknown(who: str, unknown: dict[str, Any]) -> None:
    """A ``TypeError`` naming the public layer and the first argument it does not take (with
    what to use instead where it is torch's), rather than Python's about an internal class."""
    if unknown:
        name = next(iter(unknown))
        raise TypeError(f"{who}: no {name}= argument "
                        f"({TORCH_ONLY.get(name, 'not an argument of this layer')})")


class ConvParams:
    """What a convolution and a transposed one share: torch's init (weight
    ``kaiming_uniform_(a=√5)``, bias U(±1/√fan_in), ``_fan_in`` set by ``param_shapes``) and
    the input channels' check against ``groups``."""

    @property
    def param_init(self) -> dict[str, str]:
        init = {"weight": "kaiming_uniform"}
        if self.use_bias:
            init["bias"] = f"fan_in_uniform:{self._fan_in}" if self._fan_in else "zeros"
        return init

    def _in_channels(self, shapes) -> int | None:
        s = shapes.get("input")
        who = type(self).__name__
        check_rank(s, self.nd, who, self.layout)
        c = None if s is None else s[-self.nd - 1]
        if c is not None and c % self.groups:
            raise ShapeError(f"{who}: input channels ({c}) must be divisible by groups "
                             f"({self.groups}); 'input' has shape {fmt(s)}")
        return c


class _Convolution(ConvParams, Operator):
    nd: int = 2
    layout: str = "N, C, H, W"
    vjp_ignores = frozenset({"input", "bias", "output"})  # the im2col residual has the input
    fresh_output = True  # a view of the matmul's result
    positional = ("input", "weight")  # (the published connect's first two)

    def __init__(self, kernel_size: int | Sequence[int], out_channels: int | None = None,
                 stride: int | Sequence[int] = 1, padding: Any = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, use_bias: bool = True,
                 padding_mode: str = "zeros", **unknown: Any) -> None:
        who = type(self).__name__
        refuse_unknown(who, unknown)
        if not isinstance(out_channels, (int, np.integer)) or isinstance(out_channels, bool) \
                or out_channels <= 0:
            raise ValueError(f"{who}: out_channels must be a positive int, got {out_channels!r}")
        if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups <= 0:
            raise ValueError(f"{who}: groups must be a positive int, got {groups!r}")
        if not isinstance(use_bias, (bool, np.bool_)):  # "no" or None: not read as truthiness
            raise TypeError(f"{who}: use_bias must be a bool, got {use_bias!r}")
        if out_channels % groups:
            raise ValueError(f"{who}: out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        self.kernel_size = ntuple(kernel_size, self.nd, "kernel_size", who)
        self.stride = ntuple(stride, self.nd, "stride", who)
        self.dilation = ntuple(dilation, self.nd, "dilation", who)
        self.pads = padding_pairs(padding, self.nd, self.kernel_size, self.dilation, self.stride, who)
        self.padding = padding
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{who}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        #: a non-zeros mode's padding, applied to the input before a convolution without any
        #: (as torch's ConvNd); ``pads`` is then all zeros
        self.mode_pads: Pads | None = None
        if padding_mode != "zeros" and any(lo or hi for lo, hi in self.pads):
            self.mode_pads, self.pads = self.pads, ((0, 0),) * self.nd
        self.out_channels, self.groups, self.use_bias = int(out_channels), int(groups), bool(use_bias)
        self._fan_in: int | None = None

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
        who = type(self).__name__
        spatial = s[-self.nd:]
        if self.mode_pads is not None:
            check_mode_pads(spatial, self.mode_pads, self.padding_mode, who)
        sp = out_sizes(spatial, self.kernel_size, self.stride, self.dilation,
                       self.mode_pads or self.pads, who)
        return (*s[:-self.nd - 1], self.out_channels, *sp)

    def _mode_pad(self, xp: Any, x: Any) -> Any:
        """``x`` padded by ``padding_mode`` (as is for "zeros"): F.pad on torch, a gather of
        :func:`source_index` per axis on NumPy and JAX."""
        if self.mode_pads is None:
            return x
        if backend_of(xp) == "torch":
            import torch.nn.functional as F

            flat = [p for pair in reversed(self.mode_pads) for p in pair]  # last axis first
            return F.pad(x, flat, mode=self.padding_mode)
        check_mode_pads(x.shape[2:], self.mode_pads, self.padding_mode, type(self).__name__)
        for ax, (lo, hi) in enumerate(self.mode_pads, start=2):
            x = xp.take(x, source_index(x.shape[ax], lo, hi, self.padding_mode), axis=ax)
        return x

    def _mode_unpad(self, g: np.ndarray) -> np.ndarray:
        """The VJP of :meth:`_mode_pad` (NumPy): each padded position's gradient added onto
        the input position it copies, axis by axis from the last."""
        assert self.mode_pads is not None
        for ax in reversed(range(2, 2 + self.nd)):
            lo, hi = self.mode_pads[ax - 2]
            n = g.shape[ax] - lo - hi
            src = source_index(n, lo, hi, self.padding_mode)
            gm = np.moveaxis(g, ax, -1)
            out = gm[..., lo:lo + n].copy()
            for j in (*range(lo), *range(lo + n, lo + n + hi)):  # the pad positions only
                out[..., src[j]] += gm[..., j]
            g = np.moveaxis(out, -1, ax)
        return g

    # -- forward ----------------------------------------------------------------------------
    def forward(self, xp: Any, input: Any, weight: Any, bias: Any = None) -> Any:
        if unbatched(input, self.nd):  # (C, *spatial): as a batch of one, as torch
            return self.forward(xp, input[None], weight, bias)[0]
        kind = backend_of(xp)
        if kind == "torch":
            return self._torch(xp.t, self._mode_pad(xp, input), weight, bias)
        if kind == "jax":
            return self._jax(self._mode_pad(xp, input), weight, bias)
        return self.forward_residuals(xp, input, weight, bias)[0]

    def forward_residuals(self, xp: Any, input: Any, weight: Any, bias: Any = None) -> Any:
        """NumPy: the output and (the input, and its im2col rows when they took one chunk):
        the VJP rebuilds the rows of a larger input chunk by chunk, as the forward does,
        rather than keeping them (9x the input for a 3×3 kernel, and cold by then). With a
        ``padding_mode`` other than "zeros", "the input" is the padded one. An input without a
        batch axis: as a batch of one (the residuals too)."""
        if unbatched(input, self.nd):
            y, res = self.forward_residuals(xp, input[None], weight, bias)
            return y[0], res
        input = self._mode_pad(np, input)
        out = self._out(input)
        n, p = input.shape[0], math.prod(out)
        g, o = self.groups, self.out_channels
        wk = self._wk(weight)                                           # (G, Og, kernel·Cg)
        y = np.empty((n * p, o), dtype=np.result_type(input.dtype, weight.dtype))
        cols = None
        for s, e, cols in self._chunks(input, out):                     # cols (rows, G, kernel·Cg)
            ys = y[s * p:e * p]
            if g == 1:
                np.matmul(cols[:, 0], wk[0].T, out=ys)
            else:  # (G, rows, Og) -> (rows, G·Og)
                np.copyto(ys.reshape(-1, g, o // g),
                          np.matmul(cols.transpose(1, 0, 2), wk.transpose(0, 2, 1)).transpose(1, 0, 2))
            if bias is not None:
                ys += bias
        # channels-last in memory, (N, O, *out) to the caller: no transposing copy; one chunk
        # (small enough to stay in cache): its rows are kept for the weight gradient
        return np.moveaxis(y.reshape(n, *out, o), -1, 1), (input, cols if cols is not None and len(cols) == n * p else None)

    def _torch(self, torch: Any, x: Any, w: Any, b: Any) -> Any:
        import torch.nn.functional as F

        conv = getattr(F, f"conv{self.nd}d")
        if all(lo == hi for lo, hi in self.pads):
            return conv(x, w, b, self.stride, tuple(lo for lo, _ in self.pads), self.dilation,
                        self.groups)
        flat = [p for pair in reversed(self.pads) for p in pair]  # F.pad: last axis first
        return conv(F.pad(x, flat), w, b, self.stride, 0, self.dilation, self.groups)

    def _jax(self, x: Any, w: Any, b: Any) -> Any:
        from jax import lax

        y = lax.conv_general_dilated(x, w, self.stride, list(self.pads),
                                     rhs_dilation=self.dilation, dimension_numbers=jax_spec(self.nd),
                                     feature_group_count=self.groups,
                                     precision=lax.Precision.HIGHEST)
        return y if b is None else y + b.reshape((-1,) + (1,) * self.nd)

    def _chunks(self, x: np.ndarray, out: tuple[int, ...], fill: bool = True) -> Any:
        """``(first, stop, cols)`` per chunk of images whose im2col rows take about
        :data:`CHUNK_BYTES` (as many chunks, of even sizes): ``cols`` (rows, G, kernel·Cg)
        holds their rows (:func:`~mithril.models.window_kernels.im2col`), in one buffer
        reused by every chunk (each is done with before the next), so that the matmuls read
        them while they are in cache. ``fill=False``: ``cols`` None."""
        n, c, g, nd = x.shape[0], x.shape[1], self.groups, self.nd
        p, width = math.prod(out), math.prod(self.kernel_size) * c
        per = self._per(n, p * width * x.itemsize)
        xl = x.transpose(0, *range(2, 2 + nd), 1)                      # (N, *spatial, C): a view
        buf = np.empty((min(per, n) * p, g, width // g), dtype=x.dtype) if fill else None
        for s in range(0, n, per):
            e = min(n, s + per)
            cols = None
            if buf is not None:
                cols = buf[:(e - s) * p]
                im2col(xl[s:e], cols.reshape(e - s, *out, g, *self.kernel_size, c // g),
                       self.pads, self.stride, self.dilation)
            yield s, e, cols

    @staticmethod
    def _per(n: int, image_bytes: int) -> int:
        """Images per chunk: about :data:`CHUNK_BYTES` of rows, in chunks of even sizes."""
        per = max(1, CHUNK_BYTES // max(1, image_bytes))
        return -(-n // -(-n // per)) if n else per

    def _out(self, x: np.ndarray) -> tuple[int, ...]:
        return out_sizes(x.shape[2:], self.kernel_size, self.stride, self.dilation, self.pads,
                         type(self).__name__)  # type: ignore[return-value]

    def _wk(self, w: np.ndarray) -> np.ndarray:
        """The weight as (G, Og, kernel·Cg), columns ordered as the im2col rows."""
        nd = self.nd
        return w.transpose(0, *range(2, 2 + nd), 1).reshape(self.groups, self.out_channels // self.groups, -1)

    def vjp(self, g, out, args, wrt, residuals=None):
        """Chunk by chunk of images (as the forward): the weight gradient g·cols summed over
        the chunks, and the input gradient's columns g·W gathered back onto the input
        (:func:`~mithril.models.window_kernels.col2im`) while they are in cache. A cotangent
        without a batch axis (an unbatched input): as a batch of one."""
        if unbatched(g, self.nd):
            x = args.get("input")
            res = self.vjp(g[None], None if out is None else out[None],
                           {**args, "input": None if x is None else x[None]}, wrt, residuals)
            if "input" in res:
                res["input"] = res["input"][0]
            return res
        x, kept = residuals if residuals is not None else (self._mode_pad(np, args["input"]), None)
        n, c = x.shape[:2]
        gr, o = self.groups, self.out_channels
        og, cg = o // gr, c // gr
        res = {}
        g2 = np.moveaxis(g, 1, -1).reshape(-1, o)       # (N·P, O): free when g is channels-last
        if "bias" in wrt:
            res["bias"] = g2.sum(axis=0)
        want_w, want_x = "weight" in wrt, "input" in wrt
        if not (want_w or want_x):
            return res
        outs = self._out(x)
        p = math.prod(outs)
        wk = self._wk(args["weight"])
        gw = None
        if want_x:
            gx = np.empty((n, *x.shape[2:], c), dtype=g2.dtype)
            per = self._per(n, p * wk.shape[2] * gr * x.itemsize)    # as _chunks' chunks
            gbuf = np.empty((min(n, per) * p, gr, wk.shape[2]), dtype=g2.dtype)
        chunks = [(0, n, kept)] if kept is not None else self._chunks(x, outs, fill=want_w)
        for s, e, cols in chunks:
            gs = g2[s * p:e * p]                                        # (rows, O)
            if want_w:
                part = gs.T @ cols[:, 0] if gr == 1 else (
                    gs.reshape(-1, gr, og).transpose(1, 2, 0) @ cols.transpose(1, 0, 2))
                gw = part if gw is None else np.add(gw, part, out=gw)
            if want_x:
                gc = gbuf[:(e - s) * p]
                if gr == 1:
                    np.matmul(gs, wk[0], out=gc[:, 0])
                else:
                    np.copyto(gc.transpose(1, 0, 2), gs.reshape(-1, gr, og).transpose(1, 0, 2) @ wk)
                col2im(gc.reshape(e - s, *outs, gr, *self.kernel_size, cg), tuple(x.shape[2:]),
                       self.pads, self.stride, self.dilation, out=gx[s:e])
        if want_w:  # (Og, kernel·Cg) or (G, Og, kernel·Cg) -> (O, Cg, *kernel)
            if gw is None:  # an empty batch
                gw = np.zeros((o, wk.shape[2]), dtype=g2.dtype)
            gw = np.moveaxis(gw.reshape(o, *self.kernel_size, cg), -1, 1)
            res["weight"] = np.ascontiguousarray(gw)
        if want_x:
            res["input"] = np.moveaxis(gx, -1, 1)
            if self.mode_pads is not None:
                res["input"] = self._mode_unpad(res["input"])
        return res

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kernel_size}, {self.out_channels}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
                f"groups={self.groups}, use_bias={self.use_bias}"
                + ("" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}")
                + ")")


class Convolution1D(_Convolution):
    """1-D convolution (cross-correlation, as torch) of (N, C, L) into (N, out_channels, L');
    weight (out_channels, C / groups, k), bias (out_channels,); (C, L) without a batch axis
    gives (out_channels, L'). ``padding``: an int, ``(p,)``, a ``(before, after)`` pair (bare
    or in a 1-sequence), ``"valid"`` or ``"same"`` (stride 1).
    ``padding_mode``: torch's "zeros" (default), "reflect", "replicate" or "circular" (the
    input padded so by ``F.pad`` first, as ``nn.Conv1d``; reflect needs each padding below
    the length, circular at most it: a ``ShapeError`` otherwise)."""

    nd = 1
    layout = "N, C, L"


class Convolution2D(_Convolution):
    """2-D convolution (cross-correlation, as torch) of (N, C, H, W) into
    (N, out_channels, H', W') (or (C, H, W) into (out_channels, H', W'), as torch); weight
    (out_channels, C / groups, kh, kw), bias (out_channels,).
    ``kernel_size``, ``stride``, ``dilation``: an int or a pair; ``padding``: an int, a pair,
    a pair of ``(before, after)`` pairs, ``"valid"`` or ``"same"`` (stride 1).
    ``padding_mode``: torch's "zeros" (default), "reflect", "replicate" or "circular" (the
    input padded so by ``F.pad`` first, as ``nn.Conv2d``; reflect needs each padding below
    its axis's size, circular at most it: a ``ShapeError`` otherwise)."""

    nd = 2
    layout = "N, C, H, W"


class Convolution3D(_Convolution):
    """3-D convolution (cross-correlation, as torch) of (N, C, D, H, W) into
    (N, out_channels, D', H', W') (or (C, D, H, W) into (out_channels, D', H', W'), as torch);
    weight (out_channels, C / groups, kd, kh, kw), bias (out_channels,), as ``nn.Conv3d``.
    ``kernel_size``, ``stride``, ``dilation``: an int or a triple; ``padding``: an int, a
    triple, three ``(before, after)`` pairs, ``"valid"`` or ``"same"`` (stride 1);
    ``padding_mode`` as :class:`Convolution2D`'s. NumPy: im2col / col2im one kernel offset at
    a time (:mod:`mithril.models.window_nd`)."""

    nd = 3
    layout = "N, C, D, H, W"
