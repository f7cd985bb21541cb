"""Elementwise primitives: unary math, Subtract / Divide / Power, Where, Cast and Buffer.

Each operator holds, in one place, its shape rule, its forward (written once against the
array namespace ``xp``; a torch-only branch where torch spells a function differently)
and its NumPy VJP. Binary operators broadcast as NumPy does. Gradients at ties follow
torch on every backend (``Absolute`` has gradient 0 at 0).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .operator import Operator, backend_of, broadcast_shapes, torch_of, unbroadcast


# -- unary -----------------------------------------------------------------------------------
class Buffer(Operator):
    """The identity: output = input (names a wire, or turns an input into an output)."""

    any_dtype_inputs = frozenset({"input"})

    def forward(self, xp: Any, input: Any) -> Any:
        return input

    def vjp(self, g, out, args, wrt):
        return {"input": g}


class Exponential(Operator):
    """e^x."""

    def forward(self, xp: Any, input: Any) -> Any:
        return xp.exp(input)

    def vjp(self, g, out, args, wrt):
        return {"input": g * out}


class Log(Operator):
    """Natural logarithm."""

    def forward(self, xp: Any, input: Any) -> Any:
        return xp.log(input)

    def vjp(self, g, out, args, wrt):
        return {"input": g / args["input"]}


class Sqrt(Operator):
    """√x."""

    def forward(self, xp: Any, input: Any) -> Any:
        return xp.sqrt(input)

    def vjp(self, g, out, args, wrt):
        return {"input": g / (2 * out)}


class Absolute(Operator):
    """|x|, gradient sign(x) (0 at 0 on every backend)."""

    def forward(self, xp: Any, input: Any) -> Any:
        if xp is np or torch_of(xp) is not None:
            return abs(input)
        return input * xp.sign(input)  # jnp.abs has gradient 1 at 0; x·sign(x) has sign(0) = 0

    def vjp(self, g, out, args, wrt):
        return {"input": g * np.sign(args["input"])}


class Negate(Operator):
    """−x."""

    def forward(self, xp: Any, input: Any) -> Any:
        return -input

    def vjp(self, g, out, args, wrt):
        return {"input": -g}


class Square(Operator):
    """x²."""

    def forward(self, xp: Any, input: Any) -> Any:
        return input * input

    def vjp(self, g, out, args, wrt):
        return {"input": 2 * g * args["input"]}


# -- binary ----------------------------------------------------------------------------------
class _Broadcasting(Operator):
    def infer_shape(self, shapes):
        ins = [shapes.get(k) for k in self.inputs]
        if any(s is None for s in ins):
            return None
        out = ins[0]
        for k, s in zip(self.inputs[1:], ins[1:], strict=True):
            out = broadcast_shapes(out, s, f"'{self.inputs[0]}' and '{k}'")
        return out


class Subtract(_Broadcasting):
    """left − right."""

    inputs = ("left", "right")

    def forward(self, xp: Any, left: Any, right: Any) -> Any:
        return left - right

    def vjp(self, g, out, args, wrt):
        sign = {"left": 1, "right": -1}
        return {k: unbroadcast(sign[k] * g, args[k].shape) for k in wrt}


class Divide(_Broadcasting):
    """numerator / denominator."""

    inputs = ("numerator", "denominator")

    def forward(self, xp: Any, numerator: Any, denominator: Any) -> Any:
        return numerator / denominator

    def vjp(self, g, out, args, wrt):
        d = args["denominator"]
        res = {}
        if "numerator" in wrt:
            res["numerator"] = unbroadcast(g / d, args["numerator"].shape)
        if "denominator" in wrt:
            res["denominator"] = unbroadcast(-g * out / d, d.shape)
        return res


@functools.cache
def _jax_power() -> Any:
    """``base ** exponent`` for JAX with torch's derivatives at base 0 (see :class:`Power`):
    JAX's own give NaN there (0·0⁻¹ for exponent 0, 0·log 0 for the exponent)."""
    import jax
    import jax.numpy as jnp

    @jax.custom_jvp
    def power(b: Any, e: Any) -> Any:
        return b ** e

    @power.defjvp
    def power_jvp(primals: Any, tangents: Any) -> Any:
        b, e = primals
        db, de = tangents
        out = b ** e
        d_base = jnp.where(e == 0, 0, e * b ** (e - 1))
        d_exp = jnp.where((b == 0) & (e >= 0), 0, out * jnp.log(b))
        return out, d_base * db + d_exp * de

    return power


class Power(_Broadcasting):
    """base ** exponent. ``Power(exponent=2.0)`` fixes the exponent: only ``base`` is an input.
    The exponent's gradient is out·log(base) (NaN for a negative base, as torch). At base 0
    the gradients are torch's on every backend: the base's is 0 where the exponent is 0, the
    exponent's 0 where the exponent is >= 0 (not 0·0⁻¹ or 0·log 0, NaN)."""

    def __init__(self, exponent: float | None = None) -> None:
        self._exponent = None if exponent is None else float(exponent)
        self.inputs = ("base",) if exponent is not None else ("base", "exponent")

    def forward(self, xp: Any, base: Any, exponent: Any = None) -> Any:
        e = self._exponent if exponent is None else exponent
        if backend_of(xp) == "jax":  # torch's derivatives at base 0 (torch has them itself)
            return _jax_power()(base, xp.asarray(e, dtype=base.dtype))
        return base ** e

    def vjp(self, g, out, args, wrt):
        b = args["base"]
        e = self._exponent if self._exponent is not None else args["exponent"]
        res = {}
        with np.errstate(divide="ignore", invalid="ignore"):
            if "base" in wrt:  # 0 where the exponent is 0 (torch), not 0·0⁻¹ at base 0
                res["base"] = unbroadcast(g * np.where(e == 0, 0, e * b ** (e - 1)), b.shape)
            if "exponent" in wrt:  # 0 at base 0 for an exponent >= 0 (torch), not 0·log 0
                d = np.where((b == 0) & (e >= 0), 0, out * np.log(b))
                res["exponent"] = unbroadcast(g * d, np.shape(e))
        return res

    def __repr__(self) -> str:
        return "Power()" if self._exponent is None else f"Power(exponent={self._exponent})"


class Where(_Broadcasting):
    """input1 where cond else input2 (cond: booleans, or numbers read as cond != 0)."""

    inputs = ("cond", "input1", "input2")
    any_dtype_inputs = frozenset({"cond"})

    def forward(self, xp: Any, cond: Any, input1: Any, input2: Any) -> Any:
        return xp.where(cond != 0, input1, input2)

    def vjp(self, g, out, args, wrt):
        c = args["cond"] != 0
        res = {}
        if "input1" in wrt:
            res["input1"] = unbroadcast(np.where(c, g, 0), args["input1"].shape)
        if "input2" in wrt:
            res["input2"] = unbroadcast(np.where(c, 0, g), args["input2"].shape)
        return res


# -- dtype -----------------------------------------------------------------------------------
_CAST_DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64", "bool")


class Cast(Operator):
    """The input in ``dtype`` (a name such as ``"int64"``, or ``ml.float32``). The gradient
    flows back in the input's dtype; an integer or bool result has none."""

    any_dtype_inputs = frozenset({"input"})

    def __init__(self, dtype: Any) -> None:
        name = getattr(dtype, "name", dtype)
        if name not in _CAST_DTYPES:
            raise ValueError(f"Cast: dtype must be one of {_CAST_DTYPES}, got {dtype!r}")
        self.dtype = str(name)

    def forward(self, xp: Any, input: Any) -> Any:
        torch = torch_of(xp)
        if torch is not None:
            return input.to(getattr(torch, self.dtype))
        if xp is np and self.dtype == "bfloat16":
            import ml_dtypes

            return input.astype(ml_dtypes.bfloat16)
        return input.astype(self.dtype)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        if x.dtype.kind != "f" or out.dtype.kind != "f":
            return {"input": np.zeros_like(x)}
        return {"input": g.astype(x.dtype)}

    def __repr__(self) -> str:
        return f"Cast({self.dtype!r})"
