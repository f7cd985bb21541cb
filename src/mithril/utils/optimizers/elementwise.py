"""Elementwise functions that optimizer math may call besides + - * / and **.

Each works on Python/NumPy scalars, ``numpy.ndarray``, ``jax.Array`` and ``torch.Tensor``,
and inside numba kernels (through the overloads below), so an optimizer's math is written
once and runs everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import types
from numba.extending import overload
from numba.np import numpy_support


def _module_of(x: Any) -> str:
    return type(x).__module__.split(".", 1)[0]


def sqrt(x: Any) -> Any:
    mod = _module_of(x)
    if mod == "torch":
        import torch

        return torch.sqrt(x)
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.sqrt(x)
    return np.sqrt(x)


def maximum(a: Any, b: Any) -> Any:
    mod = _module_of(a)
    if mod == "torch":
        import torch

        return torch.maximum(a, b) if isinstance(b, torch.Tensor) else torch.clamp_min(a, b)
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.maximum(a, b)
    return np.maximum(a, b)


@overload(sqrt)
def _sqrt_nb(x):  # pragma: no cover - compiled by numba
    return lambda x: np.sqrt(x)


@overload(maximum)
def _maximum_nb(a, b):  # pragma: no cover - compiled by numba
    if isinstance(a, types.Float) and isinstance(b, (types.Float, types.Integer)) and a != b:
        # keep a's precision: maximum(float32, 0.0) must not widen a float32 kernel to float64
        cast = numpy_support.as_dtype(a).type
        return lambda a, b: a if a >= cast(b) else cast(b)
    return lambda a, b: a if a >= b else b
