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
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .conv import (
    check_rank,
    crop,
    disjoint,
    int_padding_pairs,
    ntuple,
    offset_slices,
    out_sizes,
    pad_like,
    refuse_unknown,
    same_layout,
    stacked_like,
    unbatched,
)
from .half_precision import float32_forward
from .operator import Operator, ShapeError, backend_of, div_count, fmt
from .window_kernels import compiled, max_pool, max_pool_vjp


class _Pool(Operator):
    nd: int = 2
    layout: str = "N, C, H, W"
    reducer: str = "max"

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: Any = 0, dilation: int | Sequence[int] = 1,
                 ceil_mode: bool = False, **unknown: Any) -> None:
        who = type(self).__name__
        refuse_unknown(who, unknown)
        if not isinstance(ceil_mode, (bool, np.bool_)):
            raise TypeError(f"{who}: ceil_mode must be a bool, got {ceil_mode!r}")
        self.ceil_mode = bool(ceil_mode)
        self.kernel_size = ntuple(kernel_size, self.nd, "kernel_size", who)
        self.stride = self.kernel_size if stride is None else ntuple(stride, self.nd, "stride", who)
        self.pads = int_padding_pairs(padding, self.nd, who)
        #: the padding as given: one int per axis when before = after (torch's form), else the
        #: (before, after) pairs
        self.padding: tuple = tuple(lo for lo, _ in self.pads) if self.symmetric else self.pads
        self.dilation = ntuple(dilation, self.nd, "dilation", who)
        for k, (lo, hi) in zip(self.kernel_size, self.pads):
            if max(lo, hi) > k // 2:
                raise ValueError(f"{who}: padding must be at most half the kernel size (as torch; "
                                 f"before and after each), got padding {self.padding} for "
                                 f"kernel_size {self.kernel_size}")

    @property
    def symmetric(self) -> bool:
        """The same padding before and after on every axis (torch's pooling's only form)."""
        return all(lo == hi for lo, hi in self.pads)

    def _pads(self, spatial: Sequence[int | None]) -> tuple[tuple[int, int], ...]:
        """``(before, after)`` padding per axis for an input of size ``spatial``: the given
        padding, and with ``ceil_mode`` as much more after as the last window, rounded up,
        reaches past it (torch's rule: a window must start inside the input or the padding
        before it). Pooling pads that with −inf (max) or zeros not counted (average)."""
        if not self.ceil_mode:
            return self.pads
        pads = []
        for n, k, s, d, (lo, hi) in zip(spatial, self.kernel_size, self.stride, self.dilation,
                                        self.pads):
            eff = d * (k - 1) + 1
            out = None if n is None else -(-(n + lo + hi - eff) // s) + 1
            if out is not None and (out - 1) * s >= n + lo:  # torch's pooling_output_shape_pad_lr
                out -= 1
            if out is None or out < 1:  # unknown, or too small (out_sizes says so)
                pads.append((lo, hi))
                continue
            pads.append((lo, hi + max(0, (out - 1) * s + eff - (n + lo + hi))))
        return tuple(pads)

    def infer_shape(self, shapes):
        s = shapes.get("input")
        who = type(self).__name__
        check_rank(s, self.nd, who, self.layout)
        if s is None:
            return None
        sp = s[-self.nd:]
        return (*s[:-self.nd], *out_sizes(sp, self.kernel_size, self.stride, self.dilation,
                                          self._pads(sp), who))

    def forward(self, xp: Any, input: Any) -> Any:
        if unbatched(input, self.nd):  # (C, *spatial): as a batch of one, as torch
            return self.forward(xp, input[None])[0]
        kind = backend_of(xp)
        if kind == "torch":
            import torch.nn.functional as F

            return self._torch(F, input)
        if kind == "jax":
            return self._jax(input)
        return self._numpy(input)

    def _scatter(self, xshape: tuple[int, ...], like: np.ndarray, g: np.ndarray,
                 masks: list[np.ndarray] | None) -> np.ndarray:
        """The input cotangent (of shape ``xshape``): ``g`` (times ``masks[k]``, when given)
        put at kernel offset k's slice of the padded input for every k, then the padding
        cropped. One strided multiply (disjoint windows) or add (overlapping ones) per
        offset, in the memory order of ``like`` (the input or an array laid out as it)."""
        out = g.shape[2:]
        pads = self._pads(xshape[2:])
        shape = (*xshape[:2], *(n + lo + hi for n, (lo, hi) in zip(xshape[2:], pads)))
        tiles = disjoint(self.kernel_size, self.stride, self.dilation)
        exact = tiles and all(d == 1 and s == k and n == s * m for k, s, d, n, m in zip(
            self.kernel_size, self.stride, self.dilation, shape[2:], out))
        # every element is written when the windows tile the input exactly: no zero fill
        gx = (np.empty_like if exact else np.zeros_like)(like, dtype=g.dtype, shape=shape)
        g = same_layout(g, like)  # e.g. channels-last activations, NCHW cotangent of a Flatten
        for k, off in enumerate(np.ndindex(*self.kernel_size)):
            dest = gx[offset_slices(off, self.stride, self.dilation, out)]
            if masks is None:  # average: every offset gets the (scaled) cotangent
                if tiles:
                    np.copyto(dest, g)
                else:
                    dest += g
            elif tiles:
                np.multiply(g, masks[k], out=dest)
            else:
                dest += g * masks[k]
        if not any(lo or hi for lo, hi in pads):
            return gx  # not a view: a ReLU's VJP before it may then write over it
        return gx[crop(pads, xshape[2:])]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, ceil_mode={self.ceil_mode})")

    def _flat_pads(self) -> list[int]:
        """The padding in ``F.pad``'s order: (before, after) per axis, the last axis first."""
        return [p for pair in reversed(self.pads) for p in pair]

    def _crop_torch(self, y: Any, spatial: tuple[int, ...]) -> Any:
        """torch's ceil_mode output of the explicitly padded input, cut to this pool's size:
        on the padded input a window may start anywhere in it, here only inside the input or
        the padding before it (torch's rule with padding given per side)."""
        out = out_sizes(spatial, self.kernel_size, self.stride, self.dilation,
                        self._pads(spatial), type(self).__name__)
        return y[(slice(None), slice(None), *(slice(0, o) for o in out))]


class _MaxPool(_Pool):
    vjp_ignores = frozenset({"input", "output"})  # the residual masks are laid out as the input
    fresh_output = True

    def __new__(cls, *args: Any, return_indices: bool = False, **kwargs: Any) -> Any:
        """``return_indices=True``: a block of outputs ``output`` and ``indices`` (torch's
        flat positions in the input plane, int64: :mod:`.max_pool_indices`)."""
        if not isinstance(return_indices, (bool, np.bool_)):
            raise TypeError(f"{cls.__name__}: return_indices must be a bool, got "
                            f"{return_indices!r}")
        if not return_indices:
            return super().__new__(cls)
        from .max_pool_indices import MaxPoolWithIndices

        return MaxPoolWithIndices(cls(*args, **kwargs))

    def __init__(self, *args: Any, return_indices: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # (return_indices: read by __new__)

    def __init_subclass__(cls, **kwargs: Any) -> None:  # (help() and inspect see the
        # arguments, not __new__'s *args: _Pool's and return_indices)
        super().__init_subclass__(**kwargs)
        *ps, rest = inspect.signature(_Pool).parameters.values()
        cls.__signature__ = inspect.Signature([*ps, inspect.Parameter(
            "return_indices", inspect.Parameter.KEYWORD_ONLY, default=False,
            annotation="bool"), rest])

    def _torch(self, F: Any, x: Any) -> Any:
        fn = getattr(F, f"max_pool{self.nd}d")
        if not self.symmetric:
            return self._torch_asymmetric(fn, F, x)
        inside = self._windows_inside(tuple(x.shape[2:]))
        if inside is None:
            return fn(x, self.kernel_size, self.stride, self.padding, self.dilation,
                      ceil_mode=self.ceil_mode)
        # torch's index of a window of padding only is garbage (its backward writes out of
        # bounds, or onto another element): take torch's index elsewhere, −inf there
        import torch

        out, idx = fn(x, self.kernel_size, self.stride, self.padding, self.dilation,
                      ceil_mode=self.ceil_mode, return_indices=True)
        keep = torch.as_tensor(inside, device=x.device)
        idx = torch.where(keep, idx, 0).flatten(2)
        picked = x.flatten(2).gather(2, idx).view_as(out)
        return torch.where(keep, picked, torch.full_like(picked, -math.inf))

    def _torch_asymmetric(self, fn: Any, F: Any, x: Any, indices: bool = False) -> Any:
        """Padding that differs before and after (torch pools pad symmetrically): torch's max
        pooling of the input padded with −inf by ``F.pad``, and its indices, except where a
        window's maximum is −inf: there the first element inside the input (as the NumPy and
        JAX backends and torch's own padding; on the padded input torch would pick the −inf
        padding) or, a window of padding only, −inf and no gradient. ``indices``: those
        indices (into the padded plane) instead."""
        import torch

        spatial = tuple(x.shape[2:])
        xp = F.pad(x, self._flat_pads(), value=-math.inf)
        y, idx = fn(xp, self.kernel_size, self.stride, 0, self.dilation,
                    ceil_mode=self.ceil_mode, return_indices=True)
        y, idx = self._crop_torch(y, spatial), self._crop_torch(idx, spatial)
        first = torch.as_tensor(self._first_inside(spatial, tuple(y.shape[2:])), device=x.device)
        idx = torch.where((y == -math.inf) & (first >= 0), first, idx)
        idx = torch.where(first >= 0, idx, 0)
        if indices:  # into the padded input's plane
            return idx
        picked = xp.flatten(2).gather(2, idx.flatten(2)).view_as(y)
        return torch.where(first >= 0, picked, torch.full_like(picked, -math.inf))

    def _first_inside(self, spatial: tuple[int, ...], out: tuple[int, ...]) -> np.ndarray:
        """Per output position, the flat index into the padded input (its spatial axes) of
        its window's first element inside the input, in window order; −1 for a window of
        padding only. A window's inside elements are a box, so per axis the first one."""
        flat, keep = np.zeros((), np.int64), np.ones((), bool)
        for n, o, k, st, d, (lo, hi) in zip(spatial, out, self.kernel_size, self.stride,
                                            self.dilation, self.pads):
            pos = np.full(o, -1, np.int64)
            for j in range(o):
                pos[j] = next((j * st + u * d for u in range(k) if 0 <= j * st + u * d - lo < n), -1)
            flat = np.add.outer(flat * (n + lo + hi), np.maximum(pos, 0))
            keep = np.logical_and.outer(keep, pos >= 0)
        return np.where(keep, flat, -1)

    def _windows_inside(self, spatial: tuple[int, ...]) -> np.ndarray | None:
        """Per output position, whether its window holds an input element; None when all do
        (always without dilation: the padding is at most half the kernel)."""
        if all(d == 1 for d in self.dilation):
            return None
        out = out_sizes(spatial, self.kernel_size, self.stride, self.dilation, self._pads(spatial),
                        type(self).__name__)
        axes = [np.array([any(0 <= j * s + u * d - p < n for u in range(k)) for j in range(o)])
                for n, o, k, s, d, (p, _) in zip(spatial, out, self.kernel_size, self.stride,
                                                 self.dilation, self.pads)]  # type: ignore[arg-type]
        nd = len(axes)  # the axes' outer AND (np.ix_ would read booleans as masks)
        mask = functools.reduce(np.logical_and, [a.reshape((1,) * i + (-1,) + (1,) * (nd - 1 - i))
                                                 for i, a in enumerate(axes)])
        return None if mask.all() else mask

    def _jax(self, x: Any) -> Any:
        """XLA's ``reduce_window`` max (NaN propagates, as torch), with a JVP that takes each
        window's tangent at torch's element (:meth:`_jax_codes`): XLA's own derivative sends
        a NaN window's gradient past the NaN, an all −inf window's to the −inf padding, and
        has none for a dilated window. A JVP, so forward mode works too; JAX transposes it."""
        import jax
        import jax.numpy as jnp
        from jax import lax

        one = (1, 1)
        spatial = tuple(x.shape[2:])
        pads = self._pads(spatial)
        out = out_sizes(spatial, self.kernel_size, self.stride, self.dilation, pads,
                        type(self).__name__)
        offsets = [offset_slices(off, self.stride, self.dilation, out)
                   for off in np.ndindex(*self.kernel_size)]

        @jax.custom_jvp
        def pool(v: Any) -> Any:
            return lax.reduce_window(v, np.array(-np.inf, dtype=v.dtype), lax.max,
                                     (*one, *self.kernel_size), (*one, *self.stride),
                                     ((0, 0), (0, 0), *pads), window_dilation=(*one, *self.dilation))

        @pool.defjvp
        def pool_jvp(primals: Any, tangents: Any) -> Any:
            (v,), (t,) = primals, tangents
            m = pool(v)
            code = self._jax_codes(jnp.pad(v, ((0, 0), (0, 0), *pads), constant_values=-np.inf),
                                   m, offsets, spatial)
            tp = jnp.pad(t, ((0, 0), (0, 0), *pads))
            dm = sum(jnp.where(code == k, tp[sl], 0) for k, sl in enumerate(offsets))
            return m, dm

        return pool(x)

    def _jax_codes(self, xpad: Any, m: Any, offsets: list[tuple[slice, ...]],
                   spatial: tuple[int, ...]) -> Any:
        """Per output, the kernel offset (row-major) torch's max pooling takes, from the
        −inf padded input and the maxima ``m``: the last NaN where the window holds one, else
        the first element equal to the maximum among those inside the input (an all −inf
        window: its first element inside, never the padding), else ``len(offsets)`` (a
        dilated window of padding only: −inf, no gradient). Elementwise, one offset at a time
        (no (…, K) stack of windows)."""
        import jax.numpy as jnp

        k_none = len(offsets)
        inside = pad_like(np.ones((1, 1, *spatial), bool), self._pads(spatial), False)
        first = jnp.full(m.shape, k_none, dtype=np.int32)
        last_nan = jnp.full(m.shape, k_none, dtype=np.int32)
        for k, sl in enumerate(offsets):
            v = xpad[sl]
            hit = (v == m) & inside[sl]  # static mask: shapes are known at trace time
            first = jnp.where((first == k_none) & hit, k, first)
            last_nan = jnp.where(jnp.isnan(v), k, last_nan)
        return jnp.where(jnp.isnan(m), last_nan, first)

    def _slices(self, x: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
        """The −inf padded input (in ``x``'s memory order) and each kernel offset's slice."""
        pads = self._pads(x.shape[2:])
        out = out_sizes(x.shape[2:], self.kernel_size, self.stride, self.dilation, pads,
                        type(self).__name__)
        return pad_like(x, pads, -np.inf), [offset_slices(off, self.stride, self.dilation, out)
                                            for off in np.ndindex(*self.kernel_size)]

    @staticmethod
    def _max(xp: np.ndarray, slices: list[tuple[slice, ...]]) -> np.ndarray:
        m = xp[slices[0]].copy(order="K") if len(slices) == 1 else np.maximum(xp[slices[0]], xp[slices[1]])
        for sl in slices[2:]:
            np.maximum(m, xp[sl], out=m)  # NaN propagates, as torch's
        return m

    def _numpy(self, x: np.ndarray) -> np.ndarray:
        xp, slices = self._slices(x)
        return self._max(xp, slices)

    def forward_residuals(self, xp: Any, input: Any) -> tuple[np.ndarray, Any]:
        """NumPy: the output and (per kernel offset, the windows whose first maximum in window
        order is there: one-hot boolean masks of the output's shape and the input's memory
        order; the input's shape). An input without a batch axis: as a batch of one."""
        if unbatched(input, self.nd):
            m, res = self.forward_residuals(xp, input[None])
            return m[0], res
        pads = self._pads(input.shape[2:])
        if self.nd <= 2 and compiled(input):  # one compiled pass: the maxima and their offsets
            out = out_sizes(input.shape[2:], self.kernel_size, self.stride, self.dilation,
                            pads, type(self).__name__)
            m, code = max_pool(input, out, self.kernel_size, pads, self.stride, self.dilation)
            return m, (code, input)
        x, slices = self._slices(input)
        m = self._max(x, slices)
        masks = stacked_like(m, len(slices), bool)  # one allocation for all of them
        taken = masks[0]
        last = len(slices) - 1
        for k, (sl, eq) in enumerate(zip(slices, masks, strict=True)):
            if 0 < k == last:  # no earlier maximum: this one (a window without NaN has one)
                np.logical_not(taken, out=eq)
                break
            np.equal(x[sl], m, out=eq)
            if k:
                np.greater(eq, taken, out=eq)  # eq and not taken: the first maximum wins ties
                taken = taken | eq if k == 1 else np.logical_or(taken, eq, out=taken)
        nan = np.isnan(m)
        if nan.any():  # a NaN window's maximum is its last NaN (torch: ``val > max || isnan``)
            taken = np.zeros_like(m, dtype=bool)
            for sl, eq in zip(slices[::-1], masks[::-1], strict=True):
                at = np.isnan(x[sl])
                np.greater(at, taken, out=at)  # the last NaN: the first one seen backwards
                taken |= at
                np.greater(eq, nan, out=eq)
                eq |= at
        if any(lo or hi for lo, hi in pads):
            neg = np.isneginf(m)
            if neg.any():  # a window of −inf values: torch routes to its first element inside
                # the input (its windows start there), not to the −inf padding
                inside = pad_like(np.ones((1, 1, *input.shape[2:]), bool), pads, False)
                taken = np.zeros_like(m, dtype=bool)
                for sl, eq in zip(slices, masks, strict=True):
                    first = inside[sl] & ~taken
                    np.copyto(eq, first, where=neg)
                    taken |= first
        return m, (masks, input.shape)

    def vjp(self, g, out, args, wrt, residuals=None):
        if unbatched(g, self.nd):  # an input without a batch axis: as a batch of one
            x = args.get("input")
            return {"input": self.vjp(g[None], None, {"input": None if x is None else x[None]},
                                      wrt, residuals)["input"][0]}
        if residuals is None:
            residuals = self.forward_residuals(np, args["input"])[1]
        masks, shape = residuals
        if isinstance(masks, np.ndarray):  # the compiled pass's offsets, and its input
            return {"input": max_pool_vjp(g, masks, shape, self.kernel_size,
                                          self._pads(shape.shape[2:]), self.stride, self.dilation,
                                          disjoint(self.kernel_size, self.stride, self.dilation))}
        return {"input": self._scatter(shape, masks[0], g, masks)}


class MaxPool1D(_MaxPool):
    """Max over windows of (N, C, L) or (C, L): ``kernel_size``, ``stride`` (default
    ``kernel_size``), ``padding`` (−inf, at most kernel_size // 2; an int or a
    ``(before, after)`` pair), ``dilation`` and ``ceil_mode`` as
    ``torch.nn.MaxPool1d``."""

    nd = 1
    layout = "N, C, L"


class MaxPool2D(_MaxPool):
    """Max over windows of (N, C, H, W) or (C, H, W): ``kernel_size``, ``stride`` (default
    ``kernel_size``), ``padding`` (−inf, at most half the kernel; also a ``(before, after)``
    pair per axis), ``dilation`` (each an int or a pair) and
    ``ceil_mode`` as ``torch.nn.MaxPool2d``."""

    nd = 2
    layout = "N, C, H, W"


class MaxPool3D(_MaxPool):
    """Max over windows of (N, C, D, H, W) or (C, D, H, W): ``kernel_size``, ``stride``
    (default ``kernel_size``), ``padding`` (−inf, at most half the kernel; also a
    ``(before, after)`` pair per axis), ``dilation`` (each an int or a triple) and
    ``ceil_mode`` as ``torch.nn.MaxPool3d``."""

    nd = 3
    layout = "N, C, D, H, W"


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
