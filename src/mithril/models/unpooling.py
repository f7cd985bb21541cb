"""``MaxUnpool1D`` / ``MaxUnpool2D`` / ``MaxUnpool3D``, as torch's ``nn.MaxUnpool1d/2d/3d``: the
partial inverse of max pooling. Each input value is written at its ``indices`` entry (a
flat index into the output's spatial positions of its (n, c) plane, torch's
``max_pool(..., return_indices=True)`` form); every other output element is 0. The output's
spatial size per axis is (n − 1)·stride − 2·padding + kernel_size, or ``output_size`` (torch
allows that ± stride). The gradient w.r.t. the input reads the output cotangent at each
index, for every input, also where overlapping pooling windows repeat an index (torch's
rule; on JAX through a scatter-add whose value cancels). A repeated index holds the last
value written, as torch's CPU kernel and NumPy (JAX's scatter on CPU too; no backend
promises an order: torch's CUDA kernel does not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputValueError
from .conv import check_rank, ntuple
from .operator import Operator, Shape, ShapeError, backend_of, fmt, functional_of, stop_gradient


class _MaxUnpool(Operator):
    nd: int = 2
    layout: str = "N, C, H, W"
    inputs = ("input", "indices")
    int_inputs = value_checked_inputs = frozenset({"indices"})

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: int | Sequence[int] = 0,
                 output_size: Sequence[int] | None = None) -> None:
        who = type(self).__name__
        self.kernel_size = ntuple(kernel_size, self.nd, "kernel_size", who)
        self.stride = self.kernel_size if stride is None else ntuple(stride, self.nd, "stride", who)
        self.padding = ntuple(padding, self.nd, "padding", who, minimum=0)
        if output_size is not None:
            size = tuple(output_size) if isinstance(output_size, Sequence) else (output_size,)
            output_size = ntuple(size[-self.nd:] if len(size) in (self.nd, self.nd + 2) else size,
                                 self.nd, "output_size", who)
        self.output_size = output_size

    def out_sizes(self, spatial: Sequence[int | None]) -> tuple[int | None, ...]:
        """The default sizes, or ``output_size`` checked against torch's range for them."""
        who = type(self).__name__
        default = tuple(None if n is None else (n - 1) * s - 2 * p + k for n, k, s, p in
                        zip(spatial, self.kernel_size, self.stride, self.padding))
        if self.output_size is None:
            if any(d is not None and d < 1 for d in default):
                raise ShapeError(f"{who}: 'input' spatial size {fmt(tuple(spatial))} gives an "
                                 f"empty output {default}")
            return default
        for d, o, s in zip(default, self.output_size, self.stride):
            if d is not None and not d - s < o < d + s:
                raise ShapeError(f"{who}: output_size {self.output_size} must be within stride "
                                 f"{self.stride} of the default size {default} for 'input' "
                                 f"spatial size {fmt(tuple(spatial))} (exclusive, as torch)")
        return self.output_size

    def infer_shape(self, shapes):
        s, i = shapes.get("input"), shapes.get("indices")
        who = type(self).__name__
        check_rank(s, self.nd, who, self.layout)
        if s is not None and i is not None and (len(i) != len(s) or any(
                a is not None and b is not None and a != b for a, b in zip(s, i))):
            raise ShapeError(f"{who}: 'indices' {fmt(i)} must have 'input''s shape {fmt(s)}")
        if s is None:
            return None
        return (*s[:-self.nd], *self.out_sizes(s[-self.nd:]))

    def check_inputs(self, shapes: Mapping[str, Shape | None], dtypes: Mapping[str, str],
                     arrays: Mapping[str, Any], names: Mapping[str, str]) -> None:
        """Each index inside the output plane (an ``InputValueError`` naming the data key)."""
        s, idx = shapes.get("input"), arrays.get("indices")
        if s is None or idx is None or None in s[-self.nd:] or not math.prod(idx.shape):
            return
        idx = np.asarray(idx.cpu() if hasattr(idx, "cpu") else idx)
        size = math.prod(self.out_sizes(s[-self.nd:]))  # type: ignore[arg-type]
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= size:
            raise InputValueError(f"{type(self).__name__}: indices '{names['indices']}' holds "
                                  f"{lo if lo < 0 else hi}: indices must be in [0, {size - 1}] "
                                  f"(the output's {size} positions per plane)")

    def forward(self, xp: Any, input: Any, indices: Any) -> Any:
        F = functional_of(xp)
        sizes = self.out_sizes(input.shape[-self.nd:])
        if F is not None:
            fn = (F.max_unpool1d, F.max_unpool2d, F.max_unpool3d)[self.nd - 1]
            return fn(input, indices.long(), self.kernel_size, self.stride, self.padding,
                      output_size=sizes)
        lead = input.shape[:-self.nd]
        x, idx = input.reshape(-1, math.prod(input.shape[-self.nd:])), \
            indices.reshape(-1, math.prod(input.shape[-self.nd:]))
        rows = xp.arange(x.shape[0])[:, None]
        out = xp.zeros((x.shape[0], math.prod(sizes)), x.dtype)  # type: ignore[arg-type]
        if backend_of(xp) == "jax":  # the values written; every input's gradient is read at
            # its index, repeated or not (torch's): a scatter-add's, whose value cancels
            added = out.at[rows, idx].add(x)
            return (stop_gradient(xp, out.at[rows, idx].set(x)) +
                    (added - stop_gradient(xp, added))).reshape(*lead, *sizes)
        if idx.size and (idx.min() < 0 or idx.max() >= out.shape[1]):  # from a block (a MaxPool
            # of a larger input): torch's "invalid max index"; NumPy would wrap or IndexError
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise ValueError(f"{type(self).__name__}: indices holds {bad}: indices must be in "
                             f"[0, {out.shape[1] - 1}] (the output's {out.shape[1]} positions "
                             f"per plane; a MaxPool of a larger input needs output_size)")
        out[rows, idx] = x
        return out.reshape(*lead, *sizes)

    def vjp(self, g, out, args, wrt):
        x, idx = args["input"], args["indices"]
        rows = math.prod(x.shape[:-self.nd])
        gx = np.take_along_axis(g.reshape(rows, math.prod(g.shape[-self.nd:])),
                                idx.reshape(rows, math.prod(x.shape[-self.nd:])).astype(np.intp), 1)
        return {"input": gx.reshape(x.shape)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_size={self.output_size})")


class MaxUnpool1D(_MaxUnpool):
    """Max pooling's partial inverse over (N, C, L) or (C, L), as ``nn.MaxUnpool1d``: each
    value written at its index in an output of length (L − 1)·stride − 2·padding + kernel
    (or ``output_size``), zeros elsewhere (module docstring)."""

    nd, layout = 1, "N, C, L"


class MaxUnpool2D(_MaxUnpool):
    """Max pooling's partial inverse over (N, C, H, W) or (C, H, W), as ``nn.MaxUnpool2d``:
    each value written at its flat index h·W_out + w of its plane, zeros elsewhere (module
    docstring)."""


class MaxUnpool3D(_MaxUnpool):
    """Max pooling's partial inverse over (N, C, D, H, W) or (C, D, H, W), as
    ``nn.MaxUnpool3d``: each value written at its flat index (d·H_out + h)·W_out + w of its
    volume (``MaxPool3D(return_indices=True)``'s), zeros elsewhere (module docstring)."""

    nd, layout = 3, "N, C, D, H, W"
