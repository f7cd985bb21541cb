"""A tensorwise optimizer's ``tensor_update`` traced by JAX: the ops namespace
(:class:`TracedOps`) and the function itself with ``math``, ``max`` and ``min`` taking traced
values (:func:`traceable_update`). The jitted engine (:mod:`.engines.tensorwise_jit`) and
the optax transformation (:mod:`mithril.interop.optax_tensorwise`, which re-exports them)
share them; the optimizer's source is never changed."""

from __future__ import annotations

import builtins
import functools
import math
import operator
import types
from collections.abc import Callable
from typing import Any

from .tensorwise import JaxOps


def wide() -> Any:
    """The dtype of the traced norms and scalars: float64 with ``jax_enable_x64``."""
    import jax
    import jax.numpy as jnp

    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


class TracedOps(JaxOps):
    """:class:`~.tensorwise.JaxOps` for ``tensor_update`` under ``jax.jit``: ``norm`` is a
    0-d JAX value (not a Python float), ``lerp`` takes a traced weight (both of its forms
    computed, the one ``|w| < 0.5`` picks kept: the same numbers), and the bfloat16
    rounding is ``jax.lax.reduce_precision``."""

    def norm(self, x: Any) -> Any:
        m = self.m
        acc = m.promote_types(x.dtype, wide())
        return m.sqrt(m.sum(m.square(x.astype(acc))))

    def lerp(self, a: Any, b: Any, w: Any) -> Any:
        if isinstance(w, (int, float)):
            return super().lerp(a, b, w)
        return self.m.where(abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1 - w))

    def rnd(self, x: Any) -> Any:
        import jax

        return jax.lax.reduce_precision(x.astype(self.m.float32), exponent_bits=8,
                                        mantissa_bits=7)


def jnp_math() -> dict[str, Callable]:
    """The ``math`` functions with a JAX counterpart, by name."""
    import jax.numpy as jnp

    return {"sqrt": jnp.sqrt, "exp": jnp.exp, "log": jnp.log, "log1p": jnp.log1p,
            "expm1": jnp.expm1, "log2": jnp.log2, "log10": jnp.log10, "pow": jnp.power,
            "fabs": jnp.abs, "sin": jnp.sin, "cos": jnp.cos, "tan": jnp.tan,
            "tanh": jnp.tanh, "atan": jnp.arctan, "floor": jnp.floor, "ceil": jnp.ceil,
            "isfinite": jnp.isfinite, "isnan": jnp.isnan, "isinf": jnp.isinf,
            "copysign": jnp.copysign, "hypot": jnp.hypot}


def _same(x: Any) -> Any:
    return x


class MathShim(types.ModuleType):
    """``math`` whose functions take JAX values too (Python numbers still go to ``math``);
    ``unwrap`` turns an argument into the value it stands for first (the optax
    transformation's lazy scalars)."""

    def __init__(self, unwrap: Callable[[Any], Any] = _same) -> None:
        super().__init__("math")
        for name, fn in jnp_math().items():
            setattr(self, name, _on_numbers(getattr(math, name), fn, unwrap))

    def __getattr__(self, name: str) -> Any:
        return getattr(math, name)


def _on_numbers(real: Callable, traced: Callable, unwrap: Callable) -> Callable:
    @functools.wraps(real)
    def fn(*args: Any) -> Any:
        if all(isinstance(a, (int, float)) for a in args):  # Python / NumPy numbers
            return real(*args)
        return traced(*map(unwrap, args))

    return fn


def _extremum(real: Callable, later_wins: Callable) -> Callable:
    """``max`` / ``min`` that take JAX values too, elementwise with Python's rule: the
    first argument unless a later one is greater (smaller), so that a NaN after the first
    is passed over, as in torch's ``max(1.0, x.item())`` (``jnp.maximum`` would give NaN)."""
    import jax.numpy as jnp

    @functools.wraps(real)
    def fn(*args: Any, **kw: Any) -> Any:
        if kw or len(args) < 2 or all(isinstance(a, (int, float)) for a in args):
            return real(*args, **kw)
        out = args[0]
        for a in args[1:]:
            out = jnp.where(later_wins(a, out), a, out)
        return out

    return fn


@functools.cache
def traceable_update(fn: Callable, unwrap: Callable[[Any], Any] = _same) -> Callable:
    """``fn`` (a ``tensor_update``) with ``math`` (and functions imported from it) and the
    builtins ``max`` / ``min`` in its globals taking JAX values too (``unwrap``: see
    :class:`MathShim`)."""

    if not isinstance(fn, types.FunctionType):
        return fn
    g = fn.__globals__
    shim = MathShim(unwrap)
    swap: dict[str, Any] = {k: shim for k, v in g.items() if v is math}
    swap.update({k: getattr(shim, v.__name__) for k, v in g.items()
                 if isinstance(v, types.BuiltinFunctionType)
                 and getattr(v, "__module__", None) == "math" and v.__name__ in jnp_math()})
    swap["max"] = _extremum(builtins.max, operator.gt)
    swap["min"] = _extremum(builtins.min, operator.lt)
    new = types.FunctionType(fn.__code__, {**g, **swap}, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new
