"""Elementwise activations and softmax."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import elementwise_kernels
from .half_precision import float32_forward, float32_vjp
from .operator import Operator, ShapeError, backend_of, functional_of, stop_gradient


class Relu(Operator):
    """max(x, 0), with gradient 0 at x = 0 on every backend (as torch)."""

    vjp_ignores = frozenset({"input"})
    fresh_output = True

    def forward(self, xp: Any, input: Any) -> Any:
        if xp is np:  # one compiled pass (float32/64)
            return elementwise_kernels.relu(input)
        if hasattr(xp, "t"):  # torch's namespace maps this to torch.relu
            return xp.maximum(input, 0)
        # jnp.maximum splits the gradient of a tie: it would give 0.5 at x = 0; the test is
        # x <= 0, not x > 0, so that NaN stays NaN (as torch.relu and jax.nn.relu)
        return xp.where(input <= 0, 0, input)

    def forward_inplace(self, xp: Any, input: Any) -> Any:
        return elementwise_kernels.relu(input, out=input)

    def vjp(self, g, out, args, wrt):
        return {"input": elementwise_kernels.relu_vjp(np.asarray(g), out)}

    def vjp_inplace(self, g, out, args, wrt):
        return {"input": elementwise_kernels.relu_vjp(g, out, res=g)}


class LeakyRelu(Operator):
    """x if x > 0 else slope·x (torch default slope 0.01)."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, slope: float = 0.01) -> None:
        if isinstance(slope, (bool, np.bool_)) or not isinstance(
                slope, (int, float, np.integer, np.floating)):
            raise ValueError(f"LeakyRelu: slope must be a number, got {slope!r}")
        self.slope = float(slope)

    def forward(self, xp: Any, input: Any) -> Any:
        return xp.where(input > 0, input, input * self.slope)

    def vjp(self, g, out, args, wrt):
        return {"input": np.where(args["input"] > 0, g, g * self.slope)}


def _expit(x: np.ndarray) -> np.ndarray:
    """NumPy's 1 / (1 + e^-x) with torch's relative accuracy for x < 0 (float16 / bfloat16
    through float32): e^-|x| / (1 + e^-|x|) there, as SciPy's expit (not imported: SciPy is
    no dependency, and its import would slow a process's first step)."""
    if x.dtype not in (np.float32, np.float64):
        return _expit(x.astype(np.float32)).astype(x.dtype)
    e = np.exp(-np.abs(x))
    r = 1 / (1 + e)  # sigmoid(|x|)
    return np.where(x >= 0, r, e * r)


class Sigmoid(Operator):
    """1 / (1 + e^-x), never overflowing and, for x < 0, as accurate as torch's (relative):
    torch.sigmoid, jax.nn.sigmoid and SciPy's expit are. (It was (1 + tanh(x/2)) / 2, where the
    1 + tanh cancels: 0 for x < -17 in float64 (x < -9 in float32), torch's 2e-9 at -20, and
    a log of it -inf.)"""

    vjp_ignores = frozenset({"input"})

    def forward(self, xp: Any, input: Any) -> Any:
        kind = backend_of(xp)
        if kind == "torch":
            return xp.t.sigmoid(input)
        if kind == "jax":
            import jax

            if input.dtype.itemsize < 4:  # e^12 overflows float16: in float32, as torch
                return jax.nn.sigmoid(input.astype("float32")).astype(input.dtype)
            return jax.nn.sigmoid(input)
        return _expit(input)

    def vjp(self, g, out, args, wrt):
        return {"input": g * out * (1 - out)}


class Tanh(Operator):
    """Hyperbolic tangent."""

    vjp_ignores = frozenset({"input"})

    def forward(self, xp: Any, input: Any) -> Any:
        return xp.tanh(input)

    def vjp(self, g, out, args, wrt):
        return {"input": g * (1 - out * out)}


_GELU_C = math.sqrt(2.0 / math.pi)


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        return np.vectorize(math.erf, otypes=[x.dtype])(x)
    return erf(x)


class Gelu(Operator):
    """GELU. ``approximate=False`` (the default, as torch and the published Mithril): the exact
    x·Φ(x) = ½·x·(1 + erf(x/√2)); ``approximate=True``: the tanh approximation
    ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (``jax.nn.gelu`` default; torch
    ``approximate="tanh"``). torch's strings ``"none"`` / ``"tanh"`` are taken too."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, approximate: bool | str = False) -> None:
        # torch's strings too: "none" is the exact form (bool("none") was True: the tanh one)
        if isinstance(approximate, str) and approximate in ("none", "tanh"):
            approximate = approximate == "tanh"
        if not isinstance(approximate, (bool, np.bool_)):
            raise ValueError(f"Gelu: approximate must be a bool, 'none' or 'tanh' (torch's), "
                             f"got {approximate!r}")
        self.approximate = bool(approximate)

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        kind = backend_of(xp)
        if kind == "numpy":
            return self.forward_residuals(xp, input)[0]
        x = input
        F = functional_of(xp)
        if F is not None:  # one kernel each way (torch's tanh form is the same formula)
            return F.gelu(x, approximate="tanh" if self.approximate else "none")
        if self.approximate:
            return 0.5 * x * (1 + xp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))
        import jax

        return jax.nn.gelu(x, approximate=False)

    @float32_forward
    def forward_residuals(self, xp: Any, input: Any) -> tuple[np.ndarray, np.ndarray]:
        """NumPy: the output and Φ(x) (exact) or the tanh (approximate): the VJP's erf / tanh."""
        x = input
        if self.approximate:
            t = np.tanh(_GELU_C * (x + 0.044715 * x * x * x))
            return 0.5 * x * (1 + t), t
        cdf = _erf(x * (1 / math.sqrt(2)))  # in place from here: no temporaries
        cdf += 1
        cdf *= 0.5
        return x * cdf, cdf

    @float32_vjp
    def vjp(self, g, out, args, wrt, residuals=None):
        x = args["input"]
        r = residuals if residuals is not None else self.forward_residuals(np, x)[1]
        if not self.approximate:  # g·(Φ(x) + x·φ(x)), in place on one temporary
            d = np.asarray(x * x)  # (an array: a 0-d input's square is a NumPy scalar)
            d *= -0.5
            np.exp(d, out=d)
            d *= x
            d *= 1 / math.sqrt(2 * math.pi)
            d += r
            d *= g
            return {"input": d}
        du = _GELU_C * (1 + 3 * 0.044715 * x * x)
        return {"input": g * (0.5 * (1 + r) + 0.5 * x * (1 - r * r) * du)}

    def __repr__(self) -> str:
        return f"Gelu(approximate={self.approximate})"


class Softmax(Operator):
    """exp(x - max) / Σ exp(x - max) along ``axis`` (default last); float16 / bfloat16 in
    float32, rounded once (:mod:`~mithril.models.half_precision`), as torch."""

    vjp_ignores = frozenset({"input"})

    def __init__(self, axis: int = -1) -> None:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"{type(self).__name__}: axis must be an int, got {axis!r}")
        self.axis = int(axis)

    def infer_shape(self, shapes):
        """The input's shape; an axis out of range is a ShapeError at compile time (the
        compiler adds the block's path), not a backend's error at evaluate."""
        s = shapes.get("input")
        if s is not None and not -len(s) <= self.axis < len(s):
            raise ShapeError(f"axis {self.axis} is out of range for rank {len(s)}")
        return s

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.softmax(input, dim=self.axis)
        if input.shape[self.axis] == 0:  # nothing to normalise: the (empty) input, as torch;
            return input * 1  # the max below has no identity over an empty axis and raised
        e = xp.exp(input - stop_gradient(xp, xp.max(input, axis=self.axis, keepdims=True)))
        return e / xp.sum(e, axis=self.axis, keepdims=True)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        return {"input": out * (g - (g * out).sum(axis=self.axis, keepdims=True))}


def _number(value: Any, who: str, name: str, *, positive: bool = False,
            nonzero: bool = False) -> float:
    """An activation's argument as a float: a finite number (not a bool), else a
    ``ValueError`` naming it."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    if ok and positive and not value > 0:
        ok = False
    if ok and nonzero and value == 0:
        ok = False
    if not ok:
        rule = " > 0" if positive else " != 0" if nonzero else ""
        raise ValueError(f"{who}: {name} must be a finite number{rule}, got {value!r}")
    return float(value)


class Softplus(Operator):
    """log(1 + e^(β·x)) / β, and x itself where β·x > ``threshold`` (for numerical
    stability), as ``torch.nn.Softplus(beta=1, threshold=20)`` / ``F.softplus``. The gradient
    is sigmoid(β·x) = e^(β·x) / (e^(β·x) + 1), and 1 above the threshold. ``beta`` > 0,
    ``threshold`` any finite number. A float16 / bfloat16 input is computed in float32 and
    rounded once, as torch's (in float16 e^(β·x) overflows from β·x ≈ 11.1, below the
    threshold: softplus(15) was inf, its gradient NaN)."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, beta: float = 1.0, threshold: float = 20.0) -> None:
        self.beta = _number(beta, "Softplus", "beta", positive=True)
        self.threshold = _number(threshold, "Softplus", "threshold")

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.softplus(input, self.beta, self.threshold)
        bx = input * self.beta
        # e^ of the clipped value: the linear part's e^(βx) would overflow (and on JAX give a
        # NaN gradient through the branch where() does not pick); where, not minimum: JAX
        # splits minimum's gradient at a tie, β·x = threshold
        with np.errstate(over="ignore"):
            soft = xp.log1p(xp.exp(xp.where(bx > self.threshold, self.threshold, bx))) / self.beta
        return xp.where(bx > self.threshold, input, soft)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        bx = args["input"] * self.beta
        with np.errstate(over="ignore", invalid="ignore"):
            z = np.exp(np.minimum(bx, self.threshold))
            return {"input": np.where(bx > self.threshold, g, g * z / (z + 1))}

    def __repr__(self) -> str:
        return f"Softplus(beta={self.beta}, threshold={self.threshold})"


class _EluFamily(Operator):
    """scale · (x if x > 0 else α·(e^(x/α_in) − 1)): ELU, SELU and CELU are torch's one
    kernel with these constants; the gradient at x = 0 is the negative side's
    (scale·α/α_in), as torch's."""

    vjp_ignores = frozenset({"output"})
    alpha: float = 1.0
    scale: float = 1.0
    input_scale: float = 1.0

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        # e^ of min(x, 0): the positive side's would overflow (a NaN gradient on JAX); where,
        # not minimum: JAX splits minimum's gradient at the tie x = 0
        neg = xp.expm1(xp.where(input > 0, 0.0, input) * self.input_scale) * self.alpha
        y = xp.where(input > 0, input, neg)
        return y if self.scale == 1.0 else y * self.scale

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x = args["input"]
        d = np.exp(np.minimum(x, 0) * self.input_scale) * (self.alpha * self.input_scale)
        gx = np.where(x > 0, g, g * d)
        return {"input": gx if self.scale == 1.0 else gx * self.scale}


class Elu(_EluFamily):
    """ELU: x if x > 0 else α·(e^x − 1), as ``torch.nn.ELU(alpha=1.0)`` / ``F.elu``; the
    gradient α·e^x for x <= 0 (α at 0, as torch). ``alpha`` any finite number."""

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = _number(alpha, "Elu", "alpha")

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        return F.elu(input, self.alpha) if F is not None else super().forward(xp, input)

    def __repr__(self) -> str:
        return f"Elu(alpha={self.alpha})"


class Selu(_EluFamily):
    """SELU: λ·(x if x > 0 else α·(e^x − 1)) with torch's constants α = 1.6732632423543772,
    λ = 1.0507009873554805, as ``torch.nn.SELU`` / ``F.selu``."""

    alpha = 1.6732632423543772848170429916717
    scale = 1.0507009873554804934193349852946

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        return F.selu(input) if F is not None else super().forward(xp, input)


class Celu(_EluFamily):
    """CELU: x if x > 0 else α·(e^(x/α) − 1), as ``torch.nn.CELU(alpha=1.0)`` / ``F.celu``;
    the gradient e^(x/α) for x <= 0. ``alpha`` a finite number != 0.

    The gradient is the derivative on every backend. torch's own CELU backward takes 1/α from
    α rounded to float32 (``1.0 / alpha.toFloat()``), ~1e-8 relative off it in float64 where
    α is no float32 value (0.1); the torch backend runs ``aten.elu`` with 1/α in float64."""

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = _number(alpha, "Celu", "alpha", nonzero=True)
        self.input_scale = 1 / self.alpha

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:  # F.celu's forward, with its gradient's 1/α in float64 (see above)
            return xp.t.ops.aten.elu(input, self.alpha, 1.0, 1.0 / self.alpha)
        return super().forward(xp, input)

    def __repr__(self) -> str:
        return f"Celu(alpha={self.alpha})"


class Mish(Operator):
    """x · tanh(softplus(x)), softplus(x) = log(1 + e^x), as ``torch.nn.Mish`` / ``F.mish``.
    The gradient is tanh(sp) + x·sigmoid(x)·(1 − tanh(sp)²)."""

    vjp_ignores = frozenset({"output"})

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.mish(input)
        return input * xp.tanh(xp.logaddexp(input, 0))  # softplus that never overflows

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x = args["input"]
        t = np.tanh(np.logaddexp(x, 0))
        return {"input": g * (t + x * _expit(x) * (1 - t * t))}


class Hardswish(Operator):
    """x · min(max(x + 3, 0), 6) / 6, as ``torch.nn.Hardswish`` / ``F.hardswish``: 0 up to
    −3, x from 3, x·(x + 3)/6 between. The gradient is torch's: 0 for x <= −3, x/3 + ½ for
    −3 < x < 3, 1 for x >= 3 (so 0 at −3 and 1 at 3)."""

    vjp_ignores = frozenset({"output"})

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.hardswish(input)
        # the branches picked as torch's backward picks them, so JAX's gradient is torch's;
        # the quadratic of the input only where it is picked (a NaN input's gradient there
        # is NaN, and where() multiplies it by 0: NaN, where torch's is 1)
        mid = xp.where((input > -3) & (input < 3), input, 0.0)
        return xp.where(input <= -3, 0 * input, xp.where(input < 3, mid * (mid + 3) / 6, input))

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        return {"input": np.where(x <= -3, 0 * g, np.where(x < 3, g * (x / 3 + 0.5), g))}


class Hardsigmoid(Operator):
    """min(max(x + 3, 0), 6) / 6, as ``torch.nn.Hardsigmoid`` / ``F.hardsigmoid``; the
    gradient 1/6 for −3 < x < 3 and 0 elsewhere (at ±3 too, as torch).

    The gradient is 1/6 in the input's dtype on every backend: torch's own backward
    multiplies by 1/6 rounded to float32 (0.16666667163), 3e-8 relative off in float64, so
    the torch backend runs this formula, not ``F.hardsigmoid``."""

    vjp_ignores = frozenset({"output"})

    def forward(self, xp: Any, input: Any) -> Any:
        # (constants where the input is ±inf: 0 · inf would be NaN; a NaN stays NaN with
        # gradient 0, as torch's mask -3 < x < 3: JAX's and torch's autodiff follow the branch)
        inside = (input > -3) & (input < 3)
        return xp.where(inside, (input + 3) / 6, xp.where(
            input >= 3, 1.0, xp.where(input <= -3, 0.0, stop_gradient(xp, input))))

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        return {"input": np.where((x > -3) & (x < 3), g / 6, 0 * g)}


class Silu(Operator):
    """SiLU (Swish): x · sigmoid(x), as ``torch.nn.SiLU`` / ``F.silu``. The gradient is
    s·(1 + x·(1 − s)), s = sigmoid(x)."""

    vjp_ignores = frozenset({"output"})

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.silu(input)
        if backend_of(xp) == "jax":
            import jax

            return jax.nn.silu(input)
        return input * _expit(input)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x = args["input"]
        s = _expit(x)
        return {"input": g * (s * (1 + x * (1 - s)))}


class LogSoftmax(Softmax):
    """log(softmax(x)) = x − max − log Σ exp(x − max) along ``axis`` (default last; torch's
    ``dim``), as ``torch.nn.LogSoftmax`` / ``F.log_softmax``; never log(0) = −inf from an
    underflowing softmax. The gradient is g − softmax(x)·Σ g along the axis."""

    @float32_forward
    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.log_softmax(input, dim=self.axis)
        if input.shape[self.axis] == 0:  # as Softmax: an empty axis has no max
            return input * 1
        z = input - stop_gradient(xp, xp.max(input, axis=self.axis, keepdims=True))
        return z - xp.log(xp.sum(xp.exp(z), axis=self.axis, keepdims=True))

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        return {"input": g - np.exp(out) * g.sum(axis=self.axis, keepdims=True)}

    def __repr__(self) -> str:
        return f"LogSoftmax(axis={self.axis})"


class Glu(Operator):
    """Gated linear unit: the input split in halves a, b along ``axis`` (default last;
    torch's ``dim``), a · sigmoid(b), as ``torch.nn.GLU`` / ``F.glu``. That axis must have
    an even length; the output has half of it."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, axis: int = -1) -> None:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"Glu: axis must be an int, got {axis!r}")
        self.axis = int(axis)

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        if not -len(s) <= self.axis < len(s):
            raise ShapeError(f"Glu: axis {self.axis} is out of range for rank {len(s)}")
        n = s[self.axis]
        if n is None:
            return tuple(None if i == self.axis % len(s) else d for i, d in enumerate(s))
        if n % 2:
            raise ShapeError(f"Glu: the input's axis {self.axis} must have an even length "
                             f"(halved), got {n}")
        return tuple(n // 2 if i == self.axis % len(s) else d for i, d in enumerate(s))

    def _halves(self, xp: Any, x: Any) -> tuple[Any, Any]:
        n = x.shape[self.axis] // 2
        idx = [slice(None)] * x.ndim
        a, b = list(idx), list(idx)
        a[self.axis], b[self.axis] = slice(0, n), slice(n, None)
        return x[tuple(a)], x[tuple(b)]

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.glu(input, dim=self.axis)
        a, b = self._halves(xp, input)
        if backend_of(xp) == "jax":
            import jax

            return a * jax.nn.sigmoid(b)
        return a * _expit(b)

    def vjp(self, g, out, args, wrt):
        a, b = self._halves(np, args["input"])
        s = _expit(b)
        return {"input": np.concatenate([g * s, g * a * s * (1 - s)], axis=self.axis)}

    def __repr__(self) -> str:
        return f"Glu(axis={self.axis})"


class Hardtanh(Operator):
    """min(max(x, min_val), max_val), as ``torch.nn.Hardtanh(min_val=-1, max_val=1)`` /
    ``F.hardtanh``; the gradient 1 strictly inside (min_val, max_val), 0 elsewhere (at the
    bounds too, as torch), and passed through at a NaN input on every backend (torch's
    backward gives 0 there in its vectorised loop, 1 in its scalar tail: by position).
    ``min_val <= max_val``, both finite."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0) -> None:
        self.min_val = _number(min_val, "Hardtanh", "min_val")
        self.max_val = _number(max_val, "Hardtanh", "max_val")
        if self.min_val > self.max_val:
            raise ValueError(f"Hardtanh: max_val ({max_val!r}) must be >= min_val "
                             f"({min_val!r})")

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.hardtanh(input, self.min_val, self.max_val)
        # where, not clip: JAX's clip gives gradient 1 at the bounds (torch 0); NaN stays NaN
        lo, hi = input <= self.min_val, input >= self.max_val
        inside = xp.where(lo | hi, 0.0, input)  # the input only where picked (JAX's gradient)
        return xp.where(lo, self.min_val + 0 * inside, xp.where(hi, self.max_val + 0 * inside,
                                                                 inside))

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        return {"input": np.where((x <= self.min_val) | (x >= self.max_val), 0 * g, g)}

    def __repr__(self) -> str:
        return f"Hardtanh(min_val={self.min_val}, max_val={self.max_val})"
