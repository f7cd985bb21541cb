"""Pooling over channels-first inputs, with torch's semantics (``ceil_mode=False``).

``MaxPool1D`` / ``MaxPool2D``: windows padded with −inf, ``stride`` defaults to
``kernel_size``, ``padding`` at most half the kernel (as torch). The NumPy VJP routes each
cotangent to its window's first maximum in window order (row-major over the kernel), which
is the element torch's (and XLA's) max pooling picks on ties.

``AvgPool1D`` / ``AvgPool2D``: zero padding counted in the mean (``count_include_pad=True``,
torch's default). ``GlobalAvgPool2D``: the mean over H and W, (N, C, H, W) -> (N, C).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .conv import check_rank, fold, ntuple, offset_slices, out_sizes, pad, windows
from .operator import Operator, ShapeError, backend_of, fmt


class _Pool(Operator):
    nd: int = 2
    layout: str = "N, C, H, W"
    reducer: str = "max"

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1) -> None:
        who = type(self).__name__
        self.kernel_size = ntuple(kernel_size, self.nd, "kernel_size", who)
        self.stride = self.kernel_size if stride is None else ntuple(stride, self.nd, "stride", who)
        self.padding = ntuple(padding, self.nd, "padding", who, minimum=0)
        self.dilation = ntuple(dilation, self.nd, "dilation", who)
        for k, p in zip(self.kernel_size, self.padding):
            if p > k // 2:
                raise ValueError(f"{who}: padding must be at most half the kernel size (as torch), "
                                 f"got padding {self.padding} for kernel_size {self.kernel_size}")
        self.pads = tuple((p, p) for p in self.padding)

    def infer_shape(self, shapes):
        s = shapes.get("input")
        who = type(self).__name__
        check_rank(s, self.nd, who, self.layout)
        if s is None:
            return None
        return (*s[:2], *out_sizes(s[2:], self.kernel_size, self.stride, self.dilation,
                                   self.pads, who))

    def _torch_fn(self, F: Any) -> Any:
        raise NotImplementedError

    def forward(self, xp: Any, input: Any) -> Any:
        kind = backend_of(xp)
        if kind == "torch":
            import torch.nn.functional as F

            return self._torch(F, input)
        if kind == "jax":
            return self._jax(input)
        return self._numpy(input)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation})")


class _MaxPool(_Pool):
    def _torch(self, F: Any, x: Any) -> Any:
        fn = F.max_pool1d if self.nd == 1 else F.max_pool2d
        return fn(x, self.kernel_size, self.stride, self.padding, self.dilation)

    def _jax(self, x: Any) -> Any:
        from jax import lax

        one = (1, 1)
        if any(d > 1 for d in self.dilation):
            # JAX has no VJP of a dilated max reduce_window: gather the windows and take each
            # one's first maximum (argmax), so the gradient goes where torch's does on ties
            import jax.numpy as jnp

            out = out_sizes(x.shape[2:], self.kernel_size, self.stride, self.dilation, self.pads,
                            type(self).__name__)
            xpad = jnp.pad(x, ((0, 0), (0, 0), *self.pads), constant_values=-np.inf)
            win = jnp.stack([xpad[offset_slices(off, self.stride, self.dilation, out)]
                             for off in np.ndindex(*self.kernel_size)], axis=-1)
            idx = jnp.argmax(win, axis=-1, keepdims=True)
            return jnp.take_along_axis(win, idx, axis=-1)[..., 0]
        return lax.reduce_window(x, np.array(-np.inf, dtype=x.dtype), lax.max,
                                 (*one, *self.kernel_size), (*one, *self.stride),
                                 ((0, 0), (0, 0), *self.pads),
                                 window_dilation=(*one, *self.dilation))

    def _argmax(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The windows (N, C, *out, K) and each window's first maximum (argmax, keepdims)."""
        win = windows(pad(x, self.pads, -np.inf), self.kernel_size, self.stride, self.dilation)
        win = win.reshape(*win.shape[:2 + self.nd], -1)
        return win, np.argmax(win, axis=-1, keepdims=True)

    def _numpy(self, x: np.ndarray) -> np.ndarray:
        win, idx = self._argmax(x)
        return np.take_along_axis(win, idx, axis=-1)[..., 0]

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        _, idx = self._argmax(x)
        k = math.prod(self.kernel_size)
        gwin = np.where(idx == np.arange(k), g[..., None], 0.0).astype(g.dtype, copy=False)
        gwin = gwin.reshape(*gwin.shape[:-1], *self.kernel_size)
        padded = (*x.shape[:2], *(s + 2 * p for s, p in zip(x.shape[2:], self.padding)))
        return {"input": fold(gwin, padded, self.stride, self.dilation, self.pads)}


class MaxPool1D(_MaxPool):
    """Max over windows of (N, C, L): ``kernel_size``, ``stride`` (default ``kernel_size``),
    ``padding`` (−inf, at most kernel_size // 2) and ``dilation`` as ``torch.nn.MaxPool1d``."""

    nd = 1
    layout = "N, C, L"


class MaxPool2D(_MaxPool):
    """Max over windows of (N, C, H, W): ``kernel_size``, ``stride`` (default ``kernel_size``),
    ``padding`` (−inf, at most half the kernel) and ``dilation`` (each an int or a pair) as
    ``torch.nn.MaxPool2d``."""

    nd = 2
    layout = "N, C, H, W"


class _AvgPool(_Pool):
    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: int | Sequence[int] = 0) -> None:
        super().__init__(kernel_size, stride, padding)

    def _torch(self, F: Any, x: Any) -> Any:
        fn = F.avg_pool1d if self.nd == 1 else F.avg_pool2d
        return fn(x, self.kernel_size, self.stride, self.padding)

    def _jax(self, x: Any) -> Any:
        from jax import lax

        one = (1, 1)
        s = lax.reduce_window(x, np.array(0, dtype=x.dtype), lax.add, (*one, *self.kernel_size),
                              (*one, *self.stride), ((0, 0), (0, 0), *self.pads))
        return s / math.prod(self.kernel_size)

    def _numpy(self, x: np.ndarray) -> np.ndarray:
        win = windows(pad(x, self.pads), self.kernel_size, self.stride, self.dilation)
        return win.sum(axis=tuple(range(-self.nd, 0))) / math.prod(self.kernel_size)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        gk = g / math.prod(self.kernel_size)
        gwin = np.broadcast_to(gk[(..., *([None] * self.nd))], (*g.shape, *self.kernel_size))
        padded = (*x.shape[:2], *(s + 2 * p for s, p in zip(x.shape[2:], self.padding)))
        return {"input": fold(gwin, padded, self.stride, self.dilation, self.pads)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kernel_size}, stride={self.stride}, padding={self.padding})"


class AvgPool1D(_AvgPool):
    """Mean over windows of (N, C, L), zero padding counted (``torch.nn.AvgPool1d`` defaults)."""

    nd = 1
    layout = "N, C, L"


class AvgPool2D(_AvgPool):
    """Mean over windows of (N, C, H, W), zero padding counted (``torch.nn.AvgPool2d``
    defaults: ``count_include_pad=True``, ``ceil_mode=False``)."""

    nd = 2
    layout = "N, C, H, W"


class GlobalAvgPool2D(Operator):
    """The mean over H and W: (N, C, H, W) -> (N, C) (``AdaptiveAvgPool2d(1)`` then flatten)."""

    def infer_shape(self, shapes):
        s = shapes.get("input")
        check_rank(s, 2, "GlobalAvgPool2D", "N, C, H, W")
        if s is None:
            return None
        if any(d == 0 for d in s[2:]):
            raise ShapeError(f"GlobalAvgPool2D: 'input' has an empty spatial axis: {fmt(s)}")
        return s[:2]

    def forward(self, xp: Any, input: Any) -> Any:
        return xp.mean(input, axis=(2, 3))

    def vjp(self, g, out, args, wrt):
        shape = args["input"].shape
        return {"input": np.broadcast_to((g / (shape[2] * shape[3]))[..., None, None], shape).copy()}
