"""The torch gradient scan: checks and locates a step's gradients in two C-speed passes,
with no compiler.

A torch step over thousands of small tensors is dominated by reading each tensor's type,
shape, dtype, contiguity, device and address from Python (~0.4 us per tensor, 0.8 ms for
2,000). Here one call of torch's own tensor guard (the C++ check ``torch.compile`` runs on
its inputs: exact type, dispatch keys - device, layout, lazy negation or conjugation -, dtype,
``requires_grad``, sizes and strides) checks every gradient at once, and one ``map`` of
``Tensor.data_ptr`` reads the addresses (~0.1 us per tensor in all). The guard is a private
torch API: where it is missing or behaves otherwise than expected, or with
``MITHRIL_TORCH_SCAN=0``, :func:`make` returns None and the engine reads each tensor from
Python instead - the same results, slower on many tensors.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np


def enabled() -> bool:
    return os.environ.get("MITHRIL_TORCH_SCAN", "1").strip().lower() not in ("0", "false", "no", "off")


class Scan:
    """``scan(vals)``: the data addresses of ``vals`` (a list, in layout order) when every
    one is an exact ``torch.Tensor`` on the CPU, dense, contiguous (row-major strides), of
    the expected shape and dtype, with no lazy negation or conjugation and no
    ``requires_grad``; else None (the engine then takes its checked path, which names a
    fault or makes a contiguous copy)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: Any) -> None:
        import torch
        from torch._C._dynamo.guards import TensorGuards

        self._data_ptr = torch.Tensor.data_ptr
        # views of one buffer stand for the expected tensors (only their metadata is read;
        # an untouched allocation commits no memory)
        base = torch.empty(max(map(math.prod, shapes), default=0), dtype=dtype)
        examples = [base[:math.prod(s)].view(s) for s in shapes]
        self._guard = TensorGuards(
            *examples, dynamic_dims_sizes=[list(t.shape) for t in examples],
            dynamic_dims_strides=[list(t.stride()) for t in examples])
        self._n = len(examples)
        # the guard must accept the expected tensors and refuse others, or it is not used
        if not self._guard.check(*examples):
            raise RuntimeError("the torch tensor guard refuses the expected tensors")
        if examples:
            odd = [torch.empty(examples[0].shape, dtype=torch.int8), *examples[1:]]
            if self._guard.check(*odd):
                raise RuntimeError("the torch tensor guard accepts a tensor of another dtype")

    def __call__(self, vals: list) -> np.ndarray | None:
        if len(vals) != self._n or not self._guard.check(*vals):
            return None
        return np.fromiter(map(self._data_ptr, vals), np.int64, self._n)


#: torch releases whose private tensor guard this was checked against; on others (whose
#: guard constructor might crash rather than raise) the engine takes the Python path
TESTED_TORCH = ("2.13.",)


def make(shapes: list[tuple[int, ...]], dtype: Any) -> Scan | None:
    """The scan for gradients of these shapes and torch ``dtype``; None if disabled, on a
    torch release it was not checked against, or if this torch has no usable tensor guard."""
    import torch

    if not enabled() or not torch.__version__.startswith(TESTED_TORCH):
        return None
    try:
        return Scan(shapes, dtype)
    except Exception:  # noqa: BLE001 - another torch version: only costs speed
        return None
