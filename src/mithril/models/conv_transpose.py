"""Transposed convolutions, as ``torch.nn.ConvTranspose1d`` / ``2d`` / ``3d``.

``ConvTranspose1D`` takes (N, C_in, L), ``ConvTranspose2D`` (N, C_in, H, W) and
``ConvTranspose3D`` (N, C_in, D, H, W), or one example
without the batch axis; the weight is (C_in, out_channels / groups, *kernel_size) and the bias
(out_channels,), as torch's (a state_dict copies by name). Per spatial axis the output size is

    (n − 1)·stride − 2·padding + dilation·(k − 1) + output_padding + 1.

The operator is the input-gradient (adjoint) of a convolution with the same stride, padding,
dilation and groups whose weight is this one read as (out = C_in, in / groups, *kernel):
every input element x[c, i] adds x[c, i]·W[c, o, u] onto output position i·stride + u·dilation
− padding. ``output_padding`` (< stride or < dilation, as torch) adds positions at the end of
each axis, which pick the extra ambiguity of a strided convolution's input size.

Forward per backend: ``F.conv_transpose1d/2d/3d`` on torch; on JAX ``lax.conv_general_dilated``
with the input dilated by the stride (``lhs_dilation``), the kernel flipped and its in/out
channels swapped per group, and padding dilation·(k − 1) − padding before and that plus
output_padding after; on NumPy the convolution's own column gradient: per input position the
columns x·W (a matmul) gathered onto the output (:func:`~mithril.models.window_kernels.col2im`).
The NumPy VJP: the input gradient is a plain convolution of the cotangent with the weight
(:func:`~mithril.models.window_kernels.im2col`, then a matmul), the weight gradient the input
times those same rows. Initialisation as torch's: its fan_in of a transposed weight is
weight.size(1)·prod(kernel) = out_channels / groups · prod(kernel): ``kaiming_uniform_(a=√5)``
weights, U(±1/√fan_in) biases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ShapeError
from .conv import ConvParams, jax_spec, ntuple, refuse_unknown, unbatched
from .operator import Operator, backend_of
from .window_nd import col2im, im2col


def _positive_int(value: Any, name: str, who: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")
    return int(value)


class _ConvTranspose(ConvParams, Operator):
    nd: int = 2
    layout: str = "N, C, H, W"
    inputs = ("input",)

    def __init__(self, kernel_size: int | Sequence[int], out_channels: int | None = None,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 output_padding: int | Sequence[int] = 0, groups: int = 1,
                 use_bias: bool = True, dilation: int | Sequence[int] = 1, **unknown: Any) -> None:
        who = type(self).__name__
        refuse_unknown(who, unknown)  # torch's bias= / in_channels= / padding_mode=: named
        self.out_channels = _positive_int(out_channels, "out_channels", who)
        self.groups = _positive_int(groups, "groups", who)
        if not isinstance(use_bias, (bool, np.bool_)):
            raise TypeError(f"{who}: use_bias must be a bool, got {use_bias!r}")
        if self.out_channels % self.groups:
            raise ValueError(f"{who}: out_channels ({out_channels}) must be divisible by "
                             f"groups ({groups})")
        self.kernel_size = ntuple(kernel_size, self.nd, "kernel_size", who)
        self.stride = ntuple(stride, self.nd, "stride", who)
        self.dilation = ntuple(dilation, self.nd, "dilation", who)
        self.padding = ntuple(padding, self.nd, "padding", who, minimum=0)
        self.output_padding = ntuple(output_padding, self.nd, "output_padding", who, minimum=0)
        for op, s, d in zip(self.output_padding, self.stride, self.dilation):
            if op >= s and op >= d:  # torch's rule
                raise ValueError(f"{who}: output_padding {self.output_padding} must be smaller "
                                 f"than either stride {self.stride} or dilation {self.dilation} "
                                 "on each axis")
        self.use_bias = bool(use_bias)
        self._fan_in: int | None = None

    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        return tuple((p, p) for p in self.padding)

    def param_shapes(self, shapes):
        c = self._in_channels(shapes)
        if c is None:
            return {}
        w = (c, self.out_channels // self.groups, *self.kernel_size)
        self._fan_in = math.prod(w[1:])  # (torch's for a transposed weight: out/groups · prod(k))
        return {"weight": w, "bias": (self.out_channels,)} if self.use_bias else {"weight": w}

    def _sizes(self, spatial: Sequence[int | None]) -> tuple[int | None, ...]:
        out: list[int | None] = []
        for i, (n, k, s, d, p, op) in enumerate(zip(spatial, self.kernel_size, self.stride,
                                                    self.dilation, self.padding, self.output_padding)):
            if n is None:
                out.append(None)
                continue
            size = (n - 1) * s - 2 * p + d * (k - 1) + op + 1
            if size <= 0:
                raise ShapeError(f"{type(self).__name__}: the output along spatial axis {i} would "
                                 f"have size {size} (input size {n}, padding {p}): padding too large")
            out.append(size)
        return tuple(out)

    def infer_shape(self, shapes):
        self._in_channels(shapes)
        s = shapes.get("input")
        if s is None:
            return None
        return (*s[:-self.nd - 1], self.out_channels, *self._sizes(s[-self.nd:]))

    # -- forward ----------------------------------------------------------------------------
    def forward(self, xp: Any, input: Any, weight: Any, bias: Any = None) -> Any:
        if unbatched(input, self.nd):  # (C, *spatial): as a batch of one, as torch
            return self.forward(xp, input[None], weight, bias)[0]
        kind = backend_of(xp)
        if kind == "torch":
            import torch.nn.functional as F

            conv = getattr(F, f"conv_transpose{self.nd}d")
            return conv(input, weight, bias, self.stride, self.padding, self.output_padding,
                        self.groups, self.dilation)
        if kind == "jax":
            return self._jax(input, weight, bias)
        return self._numpy(input, weight, bias)

    def _jax(self, x: Any, w: Any, b: Any) -> Any:
        import jax.numpy as jnp
        from jax import lax

        g, nd = self.groups, self.nd
        cin, og = w.shape[:2]
        # (C_in, Og, *k) -> (G·Og, C_in / G, *k), flipped: a plain grouped convolution's weight
        wk = w.reshape(g, cin // g, og, *self.kernel_size).swapaxes(1, 2)
        wk = jnp.flip(wk.reshape(g * og, cin // g, *self.kernel_size), axis=tuple(range(2, 2 + nd)))
        pads = [(d * (k - 1) - p, d * (k - 1) - p + op) for k, d, p, op in
                zip(self.kernel_size, self.dilation, self.padding, self.output_padding)]
        y = lax.conv_general_dilated(x, wk, (1,) * nd, pads, lhs_dilation=self.stride,
                                     rhs_dilation=self.dilation, dimension_numbers=jax_spec(nd),
                                     feature_group_count=g, precision=lax.Precision.HIGHEST)
        return y if b is None else y + b.reshape((-1,) + (1,) * nd)

    def _wk(self, w: np.ndarray) -> np.ndarray:
        """The weight (C_in, Og, *k) as (G, C_in / G, kernel·Og), columns ordered as the
        (group, *kernel, channel) rows of im2col / col2im."""
        g = self.groups
        return np.moveaxis(w, 1, -1).reshape(g, w.shape[0] // g, -1)

    def _numpy(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        n, c, g, nd = x.shape[0], x.shape[1], self.groups, self.nd
        spatial, out = x.shape[2:], self._sizes(x.shape[2:])
        og = self.out_channels // g
        rows = x.transpose(0, *range(2, 2 + nd), 1).reshape(-1, g, c // g)  # (N·P, G, Cg)
        wk = self._wk(w)                                                    # (G, Cg, k·Og)
        dtype = np.result_type(x.dtype, w.dtype)
        cols = np.matmul(rows.transpose(1, 0, 2), wk).transpose(1, 0, 2)   # (N·P, G, k·Og)
        cols = np.ascontiguousarray(cols, dtype=dtype)
        y = col2im(cols.reshape(n, *spatial, g, *self.kernel_size, og), out,  # type: ignore[arg-type]
                   self.pads, self.stride, self.dilation)                   # (N, *out, O)
        if b is not None:
            y += b
        return np.moveaxis(y, -1, 1)

    def vjp(self, g, out, args, wrt):
        """The input gradient: the cotangent convolved with the weight (im2col rows of the
        cotangent times the weight); the weight gradient: the input times those rows; the
        bias gradient: the cotangent summed over all but its channels. A cotangent without a
        batch axis: as a batch of one."""
        if unbatched(g, self.nd):
            x = args["input"]
            res = self.vjp(g[None], None, {**args, "input": x[None]}, wrt)
            if "input" in res:
                res["input"] = res["input"][0]
            return res
        x, w = args["input"], args["weight"]
        n, c, gr, nd = x.shape[0], x.shape[1], self.groups, self.nd
        cg, og, spatial = c // gr, self.out_channels // gr, x.shape[2:]
        res = {}
        if "bias" in wrt:
            res["bias"] = g.sum(axis=(0, *range(2, 2 + nd)))
        if not ({"input", "weight"} & set(wrt)):
            return res
        gl = np.ascontiguousarray(g.transpose(0, *range(2, 2 + nd), 1))   # (N, *out, O)
        cols = np.empty((n, *spatial, gr, *self.kernel_size, og), dtype=g.dtype)
        im2col(gl, cols, self.pads, self.stride, self.dilation)
        cols = cols.reshape(-1, gr, math.prod(self.kernel_size) * og)      # (N·P, G, k·Og)
        if "input" in wrt:
            gx = np.matmul(cols.transpose(1, 0, 2), self._wk(w).transpose(0, 2, 1))  # (G, N·P, Cg)
            gx = gx.transpose(1, 0, 2).reshape(n, *spatial, c)
            res["input"] = np.moveaxis(gx, -1, 1)
        if "weight" in wrt:
            rows = x.transpose(0, *range(2, 2 + nd), 1).reshape(-1, gr, cg)  # (N·P, G, Cg)
            gw = np.matmul(rows.transpose(1, 2, 0), cols.transpose(1, 0, 2))  # (G, Cg, k·Og)
            gw = gw.reshape(c, *self.kernel_size, og)
            res["weight"] = np.ascontiguousarray(np.moveaxis(gw, -1, 1))
        return res

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kernel_size}, {self.out_channels}, "
                f"stride={self.stride}, padding={self.padding}, "
                f"output_padding={self.output_padding}, groups={self.groups}, "
                f"use_bias={self.use_bias}, dilation={self.dilation})")


class ConvTranspose1D(_ConvTranspose):
    """1-D transposed convolution (``torch.nn.ConvTranspose1d``) of (N, C, L) into
    (N, out_channels, L'), L' = (L − 1)·stride − 2·padding + dilation·(k − 1) +
    output_padding + 1; weight (C, out_channels / groups, k), bias (out_channels,); (C, L)
    without a batch axis gives (out_channels, L'). ``padding`` (an int) is taken off both
    ends of the output; ``output_padding`` (< stride or < dilation) added at its end."""

    nd = 1
    layout = "N, C, L"


class ConvTranspose2D(_ConvTranspose):
    """2-D transposed convolution (``torch.nn.ConvTranspose2d``) of (N, C, H, W) into
    (N, out_channels, H', W') (or (C, H, W) into (out_channels, H', W')), per axis
    (n − 1)·stride − 2·padding + dilation·(k − 1) + output_padding + 1; weight
    (C, out_channels / groups, kh, kw), bias (out_channels,). ``kernel_size``, ``stride``,
    ``padding``, ``output_padding``, ``dilation``: an int or a pair."""

    nd = 2
    layout = "N, C, H, W"


class ConvTranspose3D(_ConvTranspose):
    """3-D transposed convolution (``torch.nn.ConvTranspose3d``) of (N, C, D, H, W) into
    (N, out_channels, D', H', W') (or (C, D, H, W) into (out_channels, D', H', W')), per axis
    (n − 1)·stride − 2·padding + dilation·(k − 1) + output_padding + 1; weight
    (C, out_channels / groups, kd, kh, kw), bias (out_channels,). ``kernel_size``, ``stride``,
    ``padding``, ``output_padding``, ``dilation``: an int or a triple."""

    nd = 3
    layout = "N, C, D, H, W"
