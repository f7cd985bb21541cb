"""Elementwise primitives: unary math, Subtract / Divide / Power, Where, Cast and Buffer.

Each operator holds, in one place, its shape rule, its forward (written once against the
array namespace ``xp``; a torch-only branch where torch spells a function differently)
and its NumPy VJP. Binary operators broadcast as NumPy does. Gradients at ties follow
torch on every backend (``Absolute`` has gradient 0 at 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .operator import (
    Operator,
    backend_of,
    broadcast_shapes,
    promote,
    restored_on_error,
    torch_of,
    unbroadcast,
)
from .probability_losses import robust_log, robust_log_slope, tiny


# -- unary -----------------------------------------------------------------------------------
class Buffer(Operator):
    """The identity: output = input (names a wire, or turns an input into an output)."""

    any_dtype_inputs = frozenset({"input"})

    def forward(self, xp: Any, input: Any) -> Any:
        return input

    def passes_value(self, values: Mapping[str, Any]) -> Any:
        return values.get("input")

    def vjp(self, g, out, args, wrt):
        return {"input": g}


class Exponential(Operator):
    """e^x."""

    def forward(self, xp: Any, input: Any) -> Any:
        return xp.exp(input)

    def vjp(self, g, out, args, wrt):
        return {"input": g * out}


def _robust_args(name: str, robust: Any, threshold: Any) -> tuple[bool, float | None]:
    """Check ``robust`` (a bool) and ``threshold`` (``None`` or a positive finite number)."""
    if not isinstance(robust, (bool, np.bool_)):
        raise TypeError(f"{name}: robust must be a bool, got {robust!r}")
    if threshold is not None:
        if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, float, np.number)) \
                or not (0 < float(threshold) < float("inf")):
            raise ValueError(f"{name}: threshold must be a positive finite number, got {threshold!r}")
        if not robust:
            raise ValueError(f"{name}: threshold is read only with robust=True")
        threshold = float(threshold)
    return bool(robust), threshold


def _robust_repr(name: str, robust: bool, threshold: float | None, *extra: str) -> str:
    parts = [*extra, *(["robust=True"] if robust else []),
             *([f"threshold={threshold!r}"] if threshold is not None else [])]
    return f"{name}({', '.join(parts)})"


def _abs(xp: Any, x: Any) -> Any:
    """|x| with gradient sign(x), 0 at 0, on every backend (as :class:`Absolute`)."""
    if xp is np or torch_of(xp) is not None:
        return abs(x)
    return x * xp.sign(x)


class Log(Operator):
    """Natural logarithm. ``Log(robust=True)`` is the published Mithril's robust log, finite
    everywhere: with c = ``threshold`` (default: the dtype's smallest normal number),

        log(c) + |x|/c − 1   where |x| < c,   log|x| elsewhere,

    gradient sign(x)/c below c (0 at x = 0, torch's published gradient) and 1/x elsewhere."""

    def __init__(self, robust: bool = False, threshold: float | None = None) -> None:
        self.robust, self.threshold = _robust_args("Log", robust, threshold)

    def _c(self, dtype: Any) -> float:
        return self.threshold if self.threshold is not None else tiny(dtype)

    def forward(self, xp: Any, input: Any) -> Any:
        if not self.robust:
            if xp is np:  # log(0) = -inf and log(-1) = NaN without a warning, as torch and JAX
                with np.errstate(divide="ignore", invalid="ignore"):
                    return np.log(input)
            return xp.log(input)
        return robust_log(xp, _abs(xp, input), self._c(input.dtype))

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        if not self.robust:
            with np.errstate(divide="ignore", invalid="ignore"):
                return {"input": g / x}
        return {"input": g * np.sign(x) * robust_log_slope(np.abs(x), self._c(x.dtype))}

    def __repr__(self) -> str:
        return _robust_repr("Log", self.robust, self.threshold)


class Sqrt(Operator):
    """√x. ``Sqrt(robust=True)`` is the published Mithril's robust square root: with
    c = ``threshold`` (default: the dtype's smallest normal number),

        |x|/√c   where |x| < c,   √|x| elsewhere,

    gradient sign(x)/√c below c (0 at x = 0, torch's published gradient) and
    sign(x)/(2√|x|) elsewhere."""

    def __init__(self, robust: bool = False, threshold: float | None = None) -> None:
        self.robust, self.threshold = _robust_args("Sqrt", robust, threshold)

    def _c(self, dtype: Any) -> float:
        return self.threshold if self.threshold is not None else tiny(dtype)

    def forward(self, xp: Any, input: Any) -> Any:
        if not self.robust:
            return xp.sqrt(input)
        c = self._c(input.dtype)
        a = _abs(xp, input)
        below = a < c  # (the inner wheres keep the unpicked branches' gradients finite)
        return xp.where(below, xp.where(below, a, 0.0) / math.sqrt(c),
                        xp.sqrt(xp.where(below, 1.0, a)))

    def vjp(self, g, out, args, wrt):
        if not self.robust:
            return {"input": g / (2 * out)}
        x = args["input"]
        c = self._c(x.dtype)
        below = np.abs(x) < c
        slope = np.where(below, 1 / math.sqrt(c), 1 / (2 * np.where(below, 1.0, out)))
        return {"input": g * np.sign(x) * slope}

    def __repr__(self) -> str:
        return _robust_repr("Sqrt", self.robust, self.threshold)


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
        left, right = promote(left, right)
        return left - right

    def vjp(self, g, out, args, wrt):
        sign = {"left": 1, "right": -1}
        return {k: unbroadcast(sign[k] * g, args[k].shape) for k in wrt}


class Divide(_Broadcasting):
    """numerator / denominator."""

    inputs = ("numerator", "denominator")

    def forward(self, xp: Any, numerator: Any, denominator: Any) -> Any:
        numerator, denominator = promote(numerator, denominator)
        t = torch_of(xp)
        if t is not None and not numerator.is_floating_point() and \
                not denominator.is_floating_point():
            # (torch's int / int is in its default dtype, float32, in a float64 model too;
            # NumPy's in float64, given in the model's dtype: so here)
            q = numerator.to(t.float64) / denominator.to(t.float64)
            return q.to(getattr(xp, "float_dtype", t.float32))
        return numerator / denominator

    def vjp(self, g, out, args, wrt):
        d = promote(g, args["denominator"])[1]
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
    exponent's 0 where the exponent is >= 0 (not 0·0⁻¹ or 0·log 0, NaN).

    ``Power(robust=True)`` is the published Mithril's robust power, with gradients finite at
    base 0: with b the base, e the exponent and c = ``threshold`` (default: the dtype's
    smallest normal number),

        |b|/c    where |b| < c and e < 1 − log c / log|b|,   |b|^e elsewhere

    (the two agree on the boundary in e). Gradients, of the branch taken: sign(b)/c and 0 for
    the exponent on the linear one; sign(b)·e·|b|^(e−1) and |b|^e·log|b| elsewhere (the
    base's 0 at b = 0, the exponent's 0 at b = 0 for e >= 0, as torch)."""

    def __init__(self, exponent: float | None = None, robust: bool = False,
                 threshold: float | None = None) -> None:
        self._exponent = None if exponent is None else float(exponent)
        self.inputs = ("base",) if exponent is not None else ("base", "exponent")
        self.robust, self.threshold = _robust_args("Power", robust, threshold)

    def _c(self, dtype: Any) -> float:
        return self.threshold if self.threshold is not None else tiny(dtype)

    def _linear(self, xp: Any, a: Any, e: Any, c: float) -> Any:
        """Where the robust power takes its linear branch (a = |base|; a boolean array)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return (e < 1 - math.log(c) / xp.log(a)) & (a < c)

    def forward(self, xp: Any, base: Any, exponent: Any = None) -> Any:
        if exponent is not None:
            base, exponent = promote(base, exponent)
        e = self._exponent if exponent is None else exponent
        if self.robust:
            c = self._c(base.dtype)
            a = _abs(xp, base)
            lin = self._linear(xp, a, e, c)
            # (the inner wheres keep the unpicked branches' gradients finite: 1^e there)
            a_lin = xp.where(lin, a, 0.0) / c
            base = xp.where(lin, 1.0, a)
        if backend_of(xp) == "jax":  # torch's derivatives at base 0 (torch has them itself)
            out = _jax_power()(base, xp.asarray(e, dtype=base.dtype))
        else:
            out = base ** e
        return xp.where(lin, a_lin, out) if self.robust else out

    def vjp(self, g, out, args, wrt):
        b = args["base"]
        e = self._exponent if self._exponent is not None else args["exponent"]
        if self._exponent is None:
            b, e = promote(b, e)
        res = {}
        if self.robust:
            a, s = np.abs(b), np.sign(b)
            with np.errstate(divide="ignore", invalid="ignore"):
                lin = self._linear(np, a, e, self._c(b.dtype))
                if "base" in wrt:
                    d = np.where(lin, 1 / self._c(b.dtype), np.where(e == 0, 0, e * a ** (e - 1)))
                    res["base"] = unbroadcast(g * np.where(s == 0, 0, s * d), b.shape)
                if "exponent" in wrt:
                    d = np.where(lin | ((a == 0) & (e >= 0)), 0, out * np.log(a))
                    res["exponent"] = unbroadcast(g * d, np.shape(e))
            return res
        with np.errstate(divide="ignore", invalid="ignore"):
            if "base" in wrt:  # 0 where the exponent is 0 (torch), not 0·0⁻¹ at base 0
                res["base"] = unbroadcast(g * np.where(e == 0, 0, e * b ** (e - 1)), b.shape)
            if "exponent" in wrt:  # 0 at base 0 for an exponent >= 0 (torch), not 0·log 0
                d = np.where((b == 0) & (e >= 0), 0, out * np.log(b))
                res["exponent"] = unbroadcast(g * d, np.shape(e))
        return res

    def __repr__(self) -> str:
        return _robust_repr("Power", self.robust, self.threshold,
                            *([] if self._exponent is None else [f"exponent={self._exponent}"]))


class Where(_Broadcasting):
    """input1 where cond else input2 (cond: booleans, or numbers read as cond != 0)."""

    inputs = ("cond", "input1", "input2")
    any_dtype_inputs = frozenset({"cond"})

    def forward(self, xp: Any, cond: Any, input1: Any, input2: Any) -> Any:
        input1, input2 = promote(input1, input2)
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
_CAST_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
                "uint8", "bool")


class Cast(Operator):
    """The input in ``dtype`` (a name such as ``"int64"``, or ``ml.float32``). The gradient
    flows back in the input's dtype; an integer or bool result has none.

    As published, the dtype may be given in ``connect(dtype=...)`` instead (``Cast().connect(
    input=x, dtype=ml.float32)``), also as another connection's dtype, ``dtype=xq.dtype()``
    (the published flux ``apply_rope``): that connection is then an extra input
    ``dtype_ref`` read for its dtype only (no gradient)."""

    any_dtype_inputs = frozenset({"input", "dtype_ref"})

    def __init__(self, dtype: Any = None) -> None:
        self._set_dtype(dtype)

    def _set_dtype(self, dtype: Any) -> None:
        from .expressions import DtypeOf

        self.inputs = ("input",)
        if dtype is None or type(dtype).__name__ == "ToBeDetermined":
            self.dtype = None
            return
        if isinstance(dtype, DtypeOf):
            # "float": what the compiler's dtype walk reads (the published uses cast to a
            # float connection's dtype); the forward takes dtype_ref's own
            self.dtype, self.inputs = "float", ("input", "dtype_ref")
            return
        name = getattr(dtype, "name", dtype)
        if name not in _CAST_DTYPES:
            raise ValueError(f"Cast: dtype must be one of {_CAST_DTYPES} or a connection's "
                             f"dtype (x.dtype()), got {dtype!r}")
        self.dtype = str(name)

    def connect(self, *args: Any, **connections: Any) -> Any:
        """As any block's; positionally ``input``, ``dtype``, ``output`` (published)."""
        from .expressions import DtypeOf

        connections = self._named(args, connections, ("input", "dtype", "output"))
        if "dtype" not in connections:
            if self.dtype is None:
                raise TypeError("Cast: no dtype given: Cast(dtype) or connect(input=..., dtype=...)")
            return super().connect(**connections)
        if self.dtype is not None:
            raise TypeError(f"Cast: the dtype is given twice (Cast({self.dtype!r}) and "
                            "connect(dtype=...))")
        dtype = connections.pop("dtype")
        with restored_on_error(self):
            self._set_dtype(dtype)
            if isinstance(dtype, DtypeOf):
                connections["dtype_ref"] = dtype.conn
            return super().connect(**connections)

    __call__ = connect

    def infer_shape(self, shapes: Any) -> Any:
        if self.dtype is None:
            raise TypeError("Cast: no dtype given: Cast(dtype) or connect(input=..., dtype=...)")
        return shapes.get("input")

    def forward(self, xp: Any, input: Any, dtype_ref: Any = None) -> Any:
        if dtype_ref is not None:  # (x.dtype(): the dtype that connection has)
            return input.to(dtype_ref.dtype) if torch_of(xp) is not None else \
                input.astype(dtype_ref.dtype)
        torch = torch_of(xp)
        if torch is not None:
            return input.to(getattr(torch, self.dtype))
        if xp is np and self.dtype == "bfloat16":
            import ml_dtypes

            return input.astype(ml_dtypes.bfloat16)
        if xp is np:  # (inf / NaN to an int: torch's silence; the value is unspecified in both)
            with np.errstate(invalid="ignore"):
                return input.astype(self.dtype)
        return input.astype(self.dtype)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        ref = args.get("dtype_ref")  # (read for its dtype: no gradient)
        extra = {"dtype_ref": np.zeros_like(ref)} if "dtype_ref" in wrt else {}
        if x.dtype.kind != "f" or out.dtype.kind != "f":
            return {"input": np.zeros_like(x), **extra}
        return {"input": g.astype(x.dtype), **extra}

    def __repr__(self) -> str:
        return "Cast(dtype_ref)" if "dtype_ref" in self.inputs else f"Cast({self.dtype!r})"
