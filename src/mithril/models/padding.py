"""Padding layers, as torch's ``nn.ConstantPad1d/2d/3d``, ``ZeroPad1d/2d/3d``,
``ReflectionPad1d/2d/3d``, ``ReplicationPad1d/2d/3d`` and ``CircularPad1d/2d/3d`` (and
``F.pad``'s modes on the last one, two or three axes).

:class:`Pad` takes ``padding`` in ``F.pad``'s order, the last axis first: ``(left, right)``
(1-D), ``(left, right, top, bottom)`` (2-D) or ``(left, right, top, bottom, front, back)``
(3-D); an int pads every side by it (the named classes,
as torch's modules). ``mode``:

* ``"constant"``: ``value`` outside the input;
* ``"reflect"``: mirrored without repeating the edge (x[1], x[0] | x[0], x[1], ...), each
  padding below the axis's size (as torch: a ``ShapeError`` otherwise);
* ``"replicate"``: the edge element repeated;
* ``"circular"``: wrapped around (x[n−1] | x[0], ...), each padding at most the axis's size.

Inputs (N, C, L) / (C, L) for 1-D, (N, C, H, W) / (C, H, W) for 2-D and (N, C, D, H, W) /
(C, D, H, W) for 3-D, as torch's reflection
and replication modules take them. A negative padding crops that side, as ``F.pad``: with
``"reflect"`` and ``"replicate"`` the whole input is padded and the result cropped (torch's
kernels: ``F.pad([1, 2, 3], (-1, 2), "reflect")`` is [2, 3, 2, 1]; the reflect limit is on
the input's size, and the output must keep an element); ``"constant"`` and ``"circular"`` crop
first and pad the cropped input (the circular limit on the cropped size). Forward: ``F.pad`` on
torch, ``pad`` (constant) or a gather of the source index per axis on NumPy / JAX. The NumPy
VJP adds each output position's cotangent onto the input element it copies (constant: the
cotangent cropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .conv import check_rank, source_index
from .operator import Operator, ShapeError, backend_of, fmt

#: F.pad's modes
PAD_MODES = ("constant", "reflect", "replicate", "circular")


def _is_pairs(padding: Any) -> bool:
    """``padding`` is the published (NumPy) ``pad_width``: a sequence of (before, after)."""
    return isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) > 0 \
        and all(isinstance(p, Sequence) and not isinstance(p, str) for p in padding)


def _from_pad_width(pad_width: Any, who: str) -> tuple[tuple[int, ...], int]:
    """NumPy's ``pad_width`` (one (before, after) pair per axis, the published ``Pad``'s) as
    ``F.pad``'s flat padding of the axes from the first padded one on, and the rank."""
    pairs = [tuple(p) for p in pad_width] if _is_pairs(pad_width) else []
    if not pairs or any(len(p) != 2 or not all(isinstance(v, (int, np.integer))
                                               and not isinstance(v, bool) for v in p) for p in pairs):
        raise ValueError(f"{who}: pad_width must be one (before, after) pair of ints per axis, "
                         f"got {pad_width!r}")
    first = next((i for i, p in enumerate(pairs) if p != (0, 0)), len(pairs) - 1)
    flat = tuple(int(v) for p in reversed(pairs[first:]) for v in p)
    return flat, len(pairs)


class Pad(Operator):
    """The input padded on its last ``nd`` axes (``nd`` = len(padding) // 2) as
    ``F.pad(input, padding, mode, value)``; see the module docstring. As published, NumPy's
    ``pad_width`` (one (before, after) pair per axis: ``Pad(pad_width=((0, 0), (0, 0), (0, 1),
    (0, 1)))``, or those pairs positionally) pads an input of exactly that rank."""

    fresh_output = True

    def __init__(self, padding: Sequence[Any] | None = None, mode: str = "constant",
                 value: float = 0.0, *, pad_width: Sequence[Sequence[int]] | None = None) -> None:
        who = type(self).__name__
        if mode not in PAD_MODES:
            raise ValueError(f"{who}: mode must be one of {PAD_MODES}, got {mode!r}")
        #: the published ``pad_width`` form: the input's rank (one (before, after) pair per axis)
        self.rank: int | None = None
        if pad_width is not None or _is_pairs(padding):
            if pad_width is not None and padding is not None:
                raise TypeError(f"{who}: give padding (F.pad's) or pad_width (NumPy's), not both")
            padding, self.rank = _from_pad_width(pad_width if pad_width is not None else padding, who)
        flat = tuple(padding) if isinstance(padding, Sequence) and not isinstance(padding, str) \
            else None
        sizes = (2, 4, 6) if self.rank is None else range(2, 2 * self.rank + 1, 2)
        if flat is None or len(flat) not in sizes or not all(
                isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in flat):
            raise ValueError(f"{who}: padding must be 2 ints (left, right), 4 (left, right, "
                             f"top, bottom) or 6 (..., front, back), got {padding!r}")
        if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
            raise TypeError(f"{who}: value must be a number, got {value!r}")
        if mode != "constant" and value != 0:  # F.pad refuses it too (0 it lets pass)
            raise ValueError(f"{who}: mode={mode!r} takes no value (only mode='constant' pads "
                             f"with one), got value={value!r}")
        self.padding = tuple(int(p) for p in flat)
        self.nd = len(flat) // 2
        self.mode, self.value = mode, float(value)
        signed = [(self.padding[2 * i], self.padding[2 * i + 1]) for i in reversed(range(self.nd))]
        #: (before, after) per padded axis, in axis order (the first padded axis first): the
        #: padding added, and what negative padding crops first (as F.pad: crop, then pad)
        self.pads = tuple((max(lo, 0), max(hi, 0)) for lo, hi in signed)
        self.crops = tuple((max(-lo, 0), max(-hi, 0)) for lo, hi in signed)

    @property
    def layout(self) -> str:
        return {1: "N, C, L", 2: "N, C, H, W", 3: "N, C, D, H, W"}[self.nd]

    @property
    def pads_first(self) -> bool:
        """torch's reflect and replicate kernels pad the whole input, then crop."""
        return self.mode in ("reflect", "replicate")

    def _check(self, spatial: Sequence[int | None]) -> None:
        who = type(self).__name__
        if self.pads_first:
            out = [None if n is None else n + lo + hi - a - b
                   for n, (lo, hi), (a, b) in zip(spatial, self.pads, self.crops)]
            if any(n is not None and n > 0 and o is not None and o < 1
                   for n, o in zip(spatial, out)):  # torch: "input ... is too small"
                raise ShapeError(f"{who}: the negative padding {self.padding} leaves no element "
                                 f"of the padded input's last {self.nd} axes (output sizes "
                                 f"{tuple(out)}; mode={self.mode!r} needs at least 1)")
        else:
            spatial = [None if n is None else n - a - b for n, (a, b) in zip(spatial, self.crops)]
            if any(n is not None and n < 0 for n in spatial):  # torch: size 0 is fine
                raise ShapeError(f"{who}: the negative padding {self.padding} crops more than "
                                 f"the input's last {self.nd} axes hold (sizes {tuple(spatial)} "
                                 f"left)")
        if self.mode == "constant":
            return
        if self.mode == "replicate" and any(n == 0 for n in spatial):
            raise ShapeError(f"{who}: mode='replicate' needs a non-empty input, got spatial "
                             f"sizes {tuple(spatial)}")
        for i, (n, (lo, hi)) in enumerate(zip(spatial, self.pads)):  # torch's limits
            if n is not None and (self.mode == "reflect" and max(lo, hi) >= n
                                  or self.mode == "circular" and max(lo, hi) > n):
                rule = "less than" if self.mode == "reflect" else "at most"
                raise ShapeError(f"{who}: mode={self.mode!r} needs each padding {rule} the input "
                                 f"size along its axis, got padding {lo}+{hi} on spatial axis "
                                 f"{i} of size {n}")

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if self.rank is None:
            check_rank(s, self.nd, type(self).__name__, self.layout)
        elif s is not None and len(s) != self.rank:
            raise ShapeError(f"{type(self).__name__}: pad_width has {self.rank} (before, after) "
                             f"pairs, one per axis, but 'input' has shape {fmt(s)}")
        if s is None:
            return None
        self._check(s[-self.nd:])
        return (*s[:-self.nd], *(None if n is None else n + lo + hi - a - b for n, (lo, hi), (a, b)
                                 in zip(s[-self.nd:], self.pads, self.crops)))

    def forward(self, xp: Any, input: Any) -> Any:
        if backend_of(xp) == "torch":
            import torch.nn.functional as F

            if self.mode == "constant":
                return F.pad(input, self.padding, value=self.value)
            if len(input.shape) == self.nd + 1:  # torch's non-constant modes want a batch axis
                return F.pad(input[None], self.padding, mode=self.mode)[0]
            return F.pad(input, self.padding, mode=self.mode)
        self._check(input.shape[-self.nd:])  # a size left free at compile time
        lead = len(input.shape) - self.nd
        input = input[self._cropped(input.shape)] if not self.pads_first else input
        if self.mode == "constant":
            return xp.pad(input, ((0, 0),) * lead + self.pads, constant_values=self.value)
        for ax, src in enumerate(self._sources(input.shape), start=lead):
            input = xp.take(input, src, axis=ax)
        return input

    def _sources(self, shape: Sequence[int]) -> list[np.ndarray]:
        """Per padded axis, the position of ``shape`` (the input, or for circular mode the
        cropped input) each output position copies."""
        out = []
        for n, (lo, hi), (a, b) in zip(shape[-self.nd:], self.pads, self.crops):
            src = source_index(n, lo, hi, self.mode)
            out.append(src[a:len(src) - b] if self.pads_first else src)
        return out

    def vjp(self, g, out, args, wrt):
        lead = g.ndim - self.nd
        if self.mode == "constant":
            g = g[(slice(None),) * lead + tuple(
                slice(lo, g.shape[ax] - hi) for ax, (lo, hi) in enumerate(self.pads, lead))]
            return {"input": self._uncrop(g.copy(), args["input"].shape)}
        shape = args["input"].shape
        if not self.pads_first:
            shape = np.zeros(shape, bool)[self._cropped(shape)].shape
        sources = self._sources(shape)
        for ax in reversed(range(lead, g.ndim)):  # each output position onto its source
            lo, src, n = self.pads[ax - lead][0], sources[ax - lead], shape[ax]
            a = self.crops[ax - lead][0] if self.pads_first else 0  # circular: cropped first
            # the run copied in order: output o reads o + a - lo (one of lo and a is 0)
            o_lo = min(max(lo - a, 0), g.shape[ax])
            o_hi = max(o_lo, min(g.shape[ax], n + lo - a))
            gm = np.moveaxis(g, ax, -1)
            acc = np.zeros((*gm.shape[:-1], n), g.dtype)
            acc[..., o_lo + a - lo:o_hi + a - lo] = gm[..., o_lo:o_hi]
            for j in (*range(o_lo), *range(o_hi, g.shape[ax])):
                acc[..., src[j]] += gm[..., j]
            g = np.moveaxis(acc, -1, ax)
        if self.pads_first:
            return {"input": np.ascontiguousarray(g)}
        return {"input": self._uncrop(g, args["input"].shape)}

    def _cropped(self, shape: Sequence[int]) -> tuple[slice, ...]:
        """What of an input of ``shape`` negative padding keeps."""
        lead = len(shape) - self.nd
        return (slice(None),) * lead + tuple(slice(a, shape[ax] - b) for ax, (a, b)
                                             in enumerate(self.crops, lead))

    def _uncrop(self, g: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """The cotangent of the cropped input as the input's: zeros where it was cropped."""
        if not any(map(any, self.crops)):
            return np.ascontiguousarray(g)
        gx = np.zeros(shape, g.dtype)
        gx[self._cropped(shape)] = g
        return gx

    def __repr__(self) -> str:
        value = f", value={self.value}" if self.mode == "constant" else ""
        return f"{type(self).__name__}({self.padding}, mode={self.mode!r}{value})"


def _pairs(padding: int | Sequence[int], nd: int, who: str) -> Sequence[int]:
    """torch's module padding: an int for every side, else the sides in F.pad's order."""
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        return (int(padding),) * (2 * nd)
    if not isinstance(padding, Sequence) or len(padding) != 2 * nd:
        raise ValueError(f"{who}: padding must be an int or {2 * nd} ints, got {padding!r}")
    return padding


class _NamedPad(Pad):
    nd_of_class: int = 1
    mode_of_class: str = "constant"

    def __init__(self, padding: int | Sequence[int]) -> None:
        super().__init__(_pairs(padding, self.nd_of_class, type(self).__name__),
                         self.mode_of_class)


class ConstantPad1D(Pad):
    """``value`` on both ends of the last axis, as ``nn.ConstantPad1d(padding, value)``:
    ``padding`` an int or (left, right)."""

    def __init__(self, padding: int | Sequence[int], value: float) -> None:
        super().__init__(_pairs(padding, 1, type(self).__name__), "constant", value)


class ConstantPad2D(Pad):
    """``value`` around the last two axes, as ``nn.ConstantPad2d(padding, value)``:
    ``padding`` an int or (left, right, top, bottom)."""

    def __init__(self, padding: int | Sequence[int], value: float) -> None:
        super().__init__(_pairs(padding, 2, type(self).__name__), "constant", value)


class ConstantPad3D(Pad):
    """``value`` around the last three axes, as ``nn.ConstantPad3d(padding, value)``:
    ``padding`` an int or (left, right, top, bottom, front, back)."""

    def __init__(self, padding: int | Sequence[int], value: float) -> None:
        super().__init__(_pairs(padding, 3, type(self).__name__), "constant", value)


class ZeroPad1D(_NamedPad):
    """Zeros on both ends of the last axis, as ``nn.ZeroPad1d``."""


class ZeroPad2D(_NamedPad):
    """Zeros around the last two axes, as ``nn.ZeroPad2d``."""

    nd_of_class = 2


class ReflectionPad1D(_NamedPad):
    """The last axis mirrored at its ends without repeating the edge, as ``nn.ReflectionPad1d``
    (each padding below the length)."""

    mode_of_class = "reflect"


class ReflectionPad2D(_NamedPad):
    """The last two axes mirrored without repeating the edge, as ``nn.ReflectionPad2d``
    (each padding below its axis's size)."""

    nd_of_class, mode_of_class = 2, "reflect"


class ReplicationPad1D(_NamedPad):
    """The last axis's edge elements repeated, as ``nn.ReplicationPad1d``."""

    mode_of_class = "replicate"


class ReplicationPad2D(_NamedPad):
    """The last two axes' edge elements repeated, as ``nn.ReplicationPad2d``."""

    nd_of_class, mode_of_class = 2, "replicate"


class CircularPad1D(_NamedPad):
    """The last axis wrapped around, as ``nn.CircularPad1d`` (each padding at most the length)."""

    mode_of_class = "circular"


class CircularPad2D(_NamedPad):
    """The last two axes wrapped around, as ``nn.CircularPad2d`` (each padding at most its
    axis's size)."""

    nd_of_class, mode_of_class = 2, "circular"


class ZeroPad3D(_NamedPad):
    """Zeros around the last three axes, as ``nn.ZeroPad3d``."""

    nd_of_class = 3


class ReflectionPad3D(_NamedPad):
    """The last three axes mirrored without repeating the edge, as ``nn.ReflectionPad3d``
    (each padding below its axis's size)."""

    nd_of_class, mode_of_class = 3, "reflect"


class ReplicationPad3D(_NamedPad):
    """The last three axes' edge elements repeated, as ``nn.ReplicationPad3d``."""

    nd_of_class, mode_of_class = 3, "replicate"


class CircularPad3D(_NamedPad):
    """The last three axes wrapped around, as ``nn.CircularPad3d`` (each padding at most its
    axis's size)."""

    nd_of_class, mode_of_class = 3, "circular"
