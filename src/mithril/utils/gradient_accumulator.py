"""The gradient buffer of :mod:`mithril.utils.accumulation`: :class:`GradientAccumulator`,
summing micro-batch gradients (NumPy, torch or JAX arrays, checked before anything is
written) for one optimizer step; :class:`~mithril.utils.accumulation.Accumulate` keeps one.
The conventions (float32 sums for half-precision gradients, exact shapes and dtypes) are in
that module's docs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import DTypeError, KeyMismatchError, ShapeError
from .optimizers.checks import describe, to_float

__all__ = ["GradientAccumulator"]


_KINDS = {"numpy": "a NumPy array", "torch": "a torch tensor", "jax": "a JAX array"}


def _kind(x: Any) -> str | None:
    """``"numpy"``, ``"torch"`` or ``"jax"`` for an array of that library, else None."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__.split(".", 1)[0]
    if mod == "torch":
        import torch

        return "torch" if isinstance(x, torch.Tensor) else None
    if mod in ("jax", "jaxlib"):
        import jax

        return "jax" if isinstance(x, jax.Array) else None
    return None


def _is_float(x: Any, kind: str) -> bool:
    if kind == "torch":
        return bool(x.is_floating_point())
    if kind == "jax":
        import jax.numpy as jnp

        return bool(jnp.issubdtype(x.dtype, jnp.floating))
    # (ml_dtypes' bfloat16, NumPy's kind "V", is no np.floating)
    return bool(np.issubdtype(x.dtype, np.floating)) or _is_half_dtype(x.dtype)


_HALF = ("float16", "bfloat16")


def _is_half_dtype(dtype: Any) -> bool:
    return str(dtype).removeprefix("torch.") in _HALF


def _is_half(x: Any) -> bool:
    return _is_half_dtype(x.dtype)


def _widen(x: Any) -> Any:
    """``x`` itself, or a float32 copy of a float16 / bfloat16 ``x`` (the buffers' dtype)."""
    return _copy(x) if _is_half(x) else x


def _copy(x: Any) -> Any:
    """A copy of ``x``, in float32 if ``x`` is float16 / bfloat16 (the buffers' dtype)."""
    mod = _kind(x)
    half = _is_half(x)
    if mod == "torch":
        import torch

        return x.detach().to(torch.float32) if half else x.detach().clone()
    if mod == "jax":
        import jax.numpy as jnp

        # (a copy: on CPU, optimizer-owned JAX arrays change in place)
        return jnp.array(x, dtype=jnp.float32 if half else None, copy=True)
    return np.array(x, dtype=np.float32 if half else None, copy=True)


def _as(x: Any, like: Any) -> Any:
    """``x`` in the dtype of ``like`` (same kind)."""
    if x.dtype == like.dtype:
        return x
    return x.to(like.dtype) if _kind(x) == "torch" else x.astype(like.dtype)


def _add_into(buf: Any, g: Any, w: float) -> Any:
    """``buf + w·g``, in place where the array type allows (``buf`` and ``g`` checked alike)."""
    mod = _kind(buf)
    if mod == "torch":  # (a half gradient into its float32 buffer: promoted in the kernel)
        return buf.add_(g.detach(), alpha=w) if w != 1 else buf.add_(g.detach())
    if mod == "jax":
        g = _as(g, buf)  # (else g * w would round in the half dtype)
        return buf + g * w if w != 1 else buf + g
    with np.errstate(all="ignore"):  # an overflow to inf is the optimizer's to report
        if w != 1:
            buf += np.multiply(g, w, dtype=buf.dtype)
        else:
            buf += g
    return buf


def _added(buf: Any, g: Any, w: float) -> Any:
    """``buf + w·g`` as a new array, with the same arithmetic as :func:`_add_into`."""
    mod = _kind(buf)
    if mod == "torch":
        import torch

        g = g.detach()
        return torch.add(buf, g, alpha=w) if w != 1 else torch.add(buf, g)
    if mod == "jax":
        g = _as(g, buf)
        return buf + g * w if w != 1 else buf + g
    with np.errstate(all="ignore"):  # (np.asarray: a 0-d array, not NumPy's scalar, for 0-d)
        return np.asarray(buf + np.multiply(g, w, dtype=buf.dtype) if w != 1 else buf + g)


def _scaled(x: Any, s: float) -> Any:
    """``x·s`` as a new array in ``x``'s dtype."""
    mod = _kind(x)
    if mod == "jax":
        return x * np.asarray(s, dtype=x.dtype)
    if mod == "torch":
        return x.detach() * s
    with np.errstate(all="ignore"):
        return np.asarray(x * x.dtype.type(s))  # (a 0-d array stays an array)


def _check_weight(weight: Any) -> float:
    """A finite number > 0 (bools and strings refused with ``TypeError``)."""
    w = to_float("weight", weight)
    if not (math.isfinite(w) and w > 0):
        raise ValueError(f"weight must be positive and finite, got {describe(weight)}")
    return w


class GradientAccumulator:
    """Sums gradient dicts; :meth:`mean` is their (weighted) mean.

    ``add(grads, weight=1.0)``: accumulate one micro-batch. With a mean-reduced loss, pass
    ``weight=micro_batch_size`` when the micro-batches differ in size, so that :meth:`mean`
    equals the gradient of the concatenated batch. Every ``add`` must have the same keys, and
    per key the same array kind, shape, dtype (and torch device) as the first one; an
    ``add`` that raises changes nothing.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._sum: dict[str, Any] | None = None
        #: the gradients' dtype per key where the buffer's differs (float32 for half)
        self._dtypes: dict[str, Any] = {}
        self.count = 0
        self.total_weight = 0.0

    # -- checks (nothing is written before they all pass) -----------------------------------
    def _check(self, gradients: Any, weight: Any) -> float:
        """Validate one ``add(gradients, weight)``; returns the weight as a float."""
        if not isinstance(gradients, Mapping):
            raise TypeError(f"gradients must be a dict of arrays, got {type(gradients).__name__}")
        w = _check_weight(weight)
        if not math.isfinite(self.total_weight + w):
            raise ValueError(f"weight={describe(weight)}: the total weight "
                             f"{self.total_weight!r} + weight is not finite")
        if self._sum is None:
            self._check_first(gradients)
        else:
            self._check_next(gradients)
        return w

    @staticmethod
    def _check_first(gradients: Mapping[str, Any]) -> None:
        first: tuple[str, str] | None = None
        for k, g in gradients.items():
            kind = _kind(g)
            if kind is None:
                raise TypeError(f"gradients['{k}'] is a {type(g).__name__}, not a NumPy, torch "
                                f"or JAX array")
            if first is not None and kind != first[1]:
                raise TypeError(f"gradients['{k}'] is {_KINDS[kind]} but gradients['{first[0]}'] "
                                f"is {_KINDS[first[1]]}: all gradients must be of one kind")
            first = first or (k, kind)
            if kind == "torch" and str(g.layout) != "torch.strided":
                raise TypeError(f"gradients['{k}'] is a {g.layout} tensor; only dense "
                                f"(strided) tensors can be accumulated")
            if not _is_float(g, kind):
                raise DTypeError(f"gradients['{k}'] has dtype {g.dtype}; gradients must be "
                                 f"floating point")

    def _check_next(self, gradients: Mapping[str, Any]) -> None:
        assert self._sum is not None
        if gradients.keys() != self._sum.keys():
            raise KeyMismatchError(
                f"accumulated gradients have keys {sorted(self._sum)}, got {sorted(gradients)}")
        for k, g in gradients.items():
            buf = self._sum[k]
            kind, want = _kind(g), _kind(buf)
            if kind != want:
                got = _KINDS[kind] if kind else f"a {type(g).__name__}"
                raise TypeError(f"gradients['{k}'] is {got}, but the accumulated gradients are "
                                f"{_KINDS[str(want)]}s")
            if tuple(g.shape) != tuple(buf.shape):
                raise ShapeError(f"gradients['{k}'] has shape {tuple(g.shape)}, the accumulated "
                                 f"gradient has shape {tuple(buf.shape)} (no broadcasting)")
            want = self._dtypes.get(k, buf.dtype)
            if g.dtype != want:
                raise DTypeError(f"gradients['{k}'] has dtype {g.dtype}, the accumulated "
                                 f"gradients have dtype {want}")
            if kind == "torch" and (g.device != buf.device or g.layout != buf.layout):
                raise ValueError(f"gradients['{k}'] is a {g.layout} tensor on {g.device}, the "
                                 f"accumulated gradient a {buf.layout} one on {buf.device}")

    # -- accumulation -------------------------------------------------------------------------
    def add(self, gradients: Mapping[str, Any], weight: float = 1.0) -> None:
        """Add ``weight·gradients`` to the sums (checked first: if it raises, nothing changed).

        ``weight`` is a finite number > 0. Raises ``TypeError`` for a non-array or an array
        of another kind, :class:`~mithril.errors.KeyMismatchError`,
        :class:`~mithril.errors.ShapeError` or :class:`~mithril.errors.DTypeError` naming the
        key whose array differs from the first ``add``'s.
        """
        w = self._check(gradients, weight)
        if self._sum is None:
            self._sum = {k: _scaled(_widen(g), w) if w != 1 else _copy(g)
                         for k, g in gradients.items()}
            self._dtypes = {k: g.dtype for k, g in gradients.items() if _is_half(g)}
        else:
            for k, g in gradients.items():
                self._sum[k] = _add_into(self._sum[k], g, w)
        self.count += 1
        self.total_weight += w

    def _mean_with(self, gradients: Mapping[str, Any], weight: float, mean: bool = True
                   ) -> dict[str, Any]:
        """The :meth:`mean` (``mean=False``: the sum) that ``add(gradients, weight)`` would
        give, as new arrays, leaving the accumulator unchanged (checked as :meth:`add`)."""
        w = self._check(gradients, weight)
        inv = 1.0 / (self.total_weight + w) if mean else 1.0
        if self._sum is None:
            return {k: _as(_scaled(_scaled(_widen(g), w) if w != 1 else _widen(g), inv), g)
                    for k, g in gradients.items()}
        return {k: _as(_scaled(_added(self._sum[k], g, w), inv), g)
                for k, g in gradients.items()}

    def sum(self) -> dict[str, Any]:
        """The weighted sum Σ wᵢ·gᵢ (the internal buffers, in float32 for half-precision
        gradients; do not modify)."""
        if self._sum is None:
            raise RuntimeError("nothing accumulated yet")
        return dict(self._sum)

    def mean(self) -> dict[str, Any]:
        """Σ wᵢ·gᵢ / Σ wᵢ (new arrays)."""
        s = self.sum()
        inv = 1.0 / self.total_weight
        out = {k: _scaled(v, inv) for k, v in s.items()}
        for k, dt in self._dtypes.items():  # (back to the gradients' half dtype)
            out[k] = out[k].to(dt) if _kind(out[k]) == "torch" else out[k].astype(dt)
        return out

    def _restore(self, sums: Mapping[str, Any], dtypes: Mapping[str, Any], count: int,
                 total_weight: float) -> None:
        """Hold ``sums`` (buffers, as :meth:`sum` gives them) of gradients of ``dtypes``
        (key -> the gradients' dtype), ``count`` micro-batches weighing ``total_weight``:
        a saved window resumed (half-precision sums widened to float32)."""
        self._sum = {k: _copy(v) if _is_half(v) else v for k, v in sums.items()}
        self._dtypes = {k: dtypes[k] for k, v in sums.items() if _is_half_dtype(dtypes[k])}
        self.count, self.total_weight = count, float(total_weight)

    def __repr__(self) -> str:
        return f"GradientAccumulator(count={self.count}, total_weight={self.total_weight})"
