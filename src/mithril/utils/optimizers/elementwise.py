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


def array_only(math: Any) -> Any:
    """Mark an elementwise math that only the array engine runs (optax's ``mu_dtype``
    order: it calls Python, :func:`~.adam.correction`, so numba never compiles it)."""
    math.array_only = True
    return math


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


def minimum(a: Any, b: Any) -> Any:
    """The smaller of ``a`` and ``b`` elementwise (``b`` may be a Python number)."""
    mod = _module_of(a)
    if mod == "torch":
        import torch

        return torch.minimum(a, b) if isinstance(b, torch.Tensor) else torch.clamp_max(a, b)
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.minimum(a, b)
    return np.minimum(a, b)


def abs_(x: Any) -> Any:
    """``|x|`` (named ``abs_`` so as not to shadow the builtin)."""
    mod = _module_of(x)
    if mod == "torch":
        import torch

        return torch.abs(x)
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.abs(x)
    return np.abs(x)


def sign(x: Any) -> Any:
    """-1, 0 or +1 with ``x``'s dtype (``sign(±0) = ±0``, ``sign(NaN) = NaN``), as
    ``torch.sign`` / ``jnp.sign`` / ``np.sign``."""
    mod = _module_of(x)
    if mod == "torch":
        import torch

        return torch.sign(x)
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.sign(x)
    return np.sign(x)


def where(cond: Any, a: Any, b: Any) -> Any:
    """``a`` where ``cond`` else ``b``, elementwise (``torch.where`` / ``jnp.where`` /
    ``np.where``); ``a``/``b`` may be Python numbers, which take the array's dtype. A plain
    bool ``cond`` (a comparison of two per-step scalars on a backend that passes them as
    Python floats) selects ``a`` or ``b`` whole."""
    if isinstance(cond, (bool, np.bool_)):
        return a if cond else b
    mod = next((m for m in map(_module_of, (cond, a, b)) if m in ("torch", "jax", "jaxlib")), "")
    if mod == "torch":
        import torch

        return torch.where(cond, a, b)
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.where(cond, a, b)
    return np.where(cond, a, b)


def _narrowest(*tys: Any) -> Any:
    """The NumPy scalar type of the narrowest float among numba types ``tys`` (None when
    they are all one type or none is a float): a float64 literal or int in a float32 kernel
    must not widen it to float64 (the per-step scalars arrive in the parameters' dtype)."""
    floats = [t for t in tys if isinstance(t, types.Float)]
    if not floats or all(t == tys[0] for t in tys):
        return None
    return numpy_support.as_dtype(min(floats, key=lambda t: t.bitwidth)).type


@overload(minimum)
def _minimum_nb(a, b):  # pragma: no cover - compiled by numba
    if isinstance(a, types.Float) and isinstance(b, (types.Float, types.Integer)) and a != b:
        cast = numpy_support.as_dtype(a).type  # keep a's precision, as maximum
        return lambda a, b: a if a <= cast(b) else cast(b)
    return lambda a, b: a if a <= b else b


@overload(abs_)
def _abs_nb(x):  # pragma: no cover - compiled by numba
    return lambda x: abs(x)


@overload(sign)
def _sign_nb(x):  # pragma: no cover - compiled by numba
    if isinstance(x, types.Float):
        cast = numpy_support.as_dtype(x).type  # keep x's precision; 0 and NaN pass through
        return lambda x: cast(1) if x > 0 else (cast(-1) if x < 0 else x)
    return lambda x: np.sign(x)


@overload(where)
def _where_nb(cond, a, b):  # pragma: no cover - compiled by numba
    cast = _narrowest(a, b)
    if cast is not None:
        return lambda cond, a, b: cast(a) if cond else cast(b)
    return lambda cond, a, b: a if cond else b


def helper(fn: Any) -> Any:
    """Decorate a function that optimizer math (or a reduction) calls, e.g. a direction
    shared by both passes of a two-pass optimizer: callable from Python as ever, and
    compiled and inlined inside the fused kernels, where its literals take the type of its
    first argument, as a math's do (:func:`~.engines.literals.typed_literals`)."""
    from numba.extending import register_jitable

    from .engines.literals import typed_literals

    return register_jitable(inline="always")(typed_literals(fn))


def times_keep(p: Any, keep: Any) -> Any:
    """``p · keep``, decoupled weight decay's ``p·(1 − lr·wd)``, rounded once to ``p``'s dtype
    (NumPy, torch or traced JAX): ``keep`` (a float, or a float32/float64 array) is not
    rounded to a float16 / bfloat16 ``p``'s dtype first, as NumPy's and JAX's weak scalars
    are (bfloat16 0.99 is 0.98828: 17% more decay than asked; 0.999 is 1: none), and as
    torch's ``param.mul_(1 - lr * wd)`` computes it (in float32)."""
    if getattr(p.dtype, "itemsize", 4) >= 4:
        return p * keep
    if hasattr(p, "float"):  # torch
        return (p.float() * keep).to(p.dtype)
    k = np.float32(keep) if isinstance(keep, (int, float)) else keep.astype(np.float32)
    return (p.astype(np.float32) * k).astype(p.dtype)
