"""Elementwise activations and softmax."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import elementwise_kernels
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

    def vjp(self, g, out, args, wrt, residuals=None):
        x = args["input"]
        r = residuals if residuals is not None else self.forward_residuals(np, x)[1]
        if not self.approximate:  # g·(Φ(x) + x·φ(x)), in place on one temporary
            d = x * x
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
    """exp(x - max) / Σ exp(x - max) along ``axis`` (default last)."""

    vjp_ignores = frozenset({"input"})

    def __init__(self, axis: int = -1) -> None:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"Softmax: axis must be an int, got {axis!r}")
        self.axis = int(axis)

    def infer_shape(self, shapes):
        """The input's shape; an axis out of range is a ShapeError at compile time (the
        compiler adds the block's path), not a backend's error at evaluate."""
        s = shapes.get("input")
        if s is not None and not -len(s) <= self.axis < len(s):
            raise ShapeError(f"axis {self.axis} is out of range for rank {len(s)}")
        return s

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.softmax(input, dim=self.axis)
        if input.shape[self.axis] == 0:  # nothing to normalise: the (empty) input, as torch;
            return input * 1  # the max below has no identity over an empty axis and raised
        e = xp.exp(input - stop_gradient(xp, xp.max(input, axis=self.axis, keepdims=True)))
        return e / xp.sum(e, axis=self.axis, keepdims=True)

    def vjp(self, g, out, args, wrt):
        return {"input": out * (g - (g * out).sum(axis=self.axis, keepdims=True))}
