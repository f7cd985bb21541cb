"""``MaxPool1D`` / ``MaxPool2D`` / ``MaxPool3D`` and their NumPy, torch and JAX paths (the
semantics: :mod:`mithril.models.pooling`, which re-exports them)."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import numpy as np

from .conv import disjoint, offset_slices, out_sizes, pad_like, stacked_like, unbatched
from .pool_base import _Pool
from .window_kernels import compiled, max_pool, max_pool_vjp


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
