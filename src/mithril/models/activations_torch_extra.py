"""The small elementwise modules of ``torch.nn`` the other activation modules lack: Identity,
Softmin, Tanhshrink, Threshold, ReLU6, RReLU, and the torch-named aliases CELU / SELU of
:class:`~mithril.models.Celu` / :class:`~mithril.models.Selu` (for porting)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .activations import Celu, Hardtanh, Selu, Softmax, _number
from .operator import Operator, backend_of, functional_of

#: torch.nn's names of two blocks Mithril has under its own
CELU, SELU = Celu, Selu


class Identity(Operator):
    """y = x, as ``torch.nn.Identity`` (its constructor's arguments are ignored, as torch's);
    the gradient passes through. The output is a new array (``x * 1``), never the input."""

    vjp_ignores = frozenset({"input", "output"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def forward(self, xp: Any, input: Any) -> Any:
        return input * 1

    def vjp(self, g, out, args, wrt):
        return {"input": g}


class Softmin(Softmax):
    """softmax(−x) along ``axis`` (default last), as ``torch.nn.Softmin(dim)`` /
    ``F.softmin``. With y the output, the gradient is −y · (g − Σ g·y)."""

    def forward(self, xp: Any, input: Any) -> Any:
        return super().forward(xp, -input)

    def vjp(self, g, out, args, wrt):
        return {"input": -super().vjp(g, out, args, wrt)["input"]}


class Tanhshrink(Operator):
    """x − tanh(x), as ``torch.nn.Tanhshrink`` / ``F.tanhshrink``; the gradient tanh(x)²."""

    vjp_ignores = frozenset({"output"})

    def forward(self, xp: Any, input: Any) -> Any:
        return input - xp.tanh(input)

    def vjp(self, g, out, args, wrt):
        return {"input": g * np.tanh(args["input"]) ** 2}


class Threshold(Operator):
    """y = x if x > threshold else value, as ``torch.nn.Threshold(threshold, value)`` /
    ``F.threshold`` (both finite numbers). The gradient is 1 where x > threshold and 0 where
    x <= threshold (0 at the tie, as torch); a NaN input stays NaN with gradient 1, as
    torch's kernel (``x <= threshold ? value : x``)."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, threshold: float, value: float) -> None:
        self.threshold = _number(threshold, "Threshold", "threshold")
        self.value = _number(value, "Threshold", "value")

    def forward(self, xp: Any, input: Any) -> Any:
        below = input <= self.threshold
        # the input only where picked: JAX's gradient of the other branch is then 0
        kept = xp.where(below, 0.0, input)
        return xp.where(below, self.value + 0 * kept, kept)

    def vjp(self, g, out, args, wrt):
        return {"input": np.where(args["input"] <= self.threshold, 0 * g, g)}

    def __repr__(self) -> str:
        return f"Threshold(threshold={self.threshold}, value={self.value})"


class ReLU6(Hardtanh):
    """min(max(x, 0), 6), as ``torch.nn.ReLU6`` / ``F.relu6`` (torch's Hardtanh(0, 6)): the
    gradient 1 strictly inside (0, 6), 0 elsewhere, the bounds included."""

    def __init__(self) -> None:
        super().__init__(0.0, 6.0)

    def __repr__(self) -> str:
        return "ReLU6()"


class RReLU(Operator):
    """The randomized leaky ReLU, as ``torch.nn.RReLU(lower=1/8, upper=1/3)`` / ``F.rrelu``:
    y = x for x >= 0, a · x for x < 0 (0 <= lower <= upper, finite).

    Inference mode: a = (lower + upper) / 2, a fixed slope (torch's ``leaky_relu``: the
    gradient is a at x = 0 too, as torch's ``x > 0 ? g : a·g``). Training mode: one slope
    a ~ U(lower, upper) per element where x <= 0 (a = 1 elsewhere), drawn from the model's
    seed and step as :class:`~mithril.models.Dropout`'s masks (the same on NumPy, JAX and
    torch, not torch's generator); the gradient is a · g with the same slopes."""

    context = True
    random = True
    vjp_ignores = frozenset({"output"})

    def __init__(self, lower: float = 1.0 / 8, upper: float = 1.0 / 3) -> None:
        self.lower = _number(lower, "RReLU", "lower")
        self.upper = _number(upper, "RReLU", "upper")
        if not 0.0 <= self.lower <= self.upper:
            raise ValueError(f"RReLU: need 0 <= lower <= upper, got lower={lower!r}, "
                             f"upper={upper!r}")

    def slopes(self, xp: Any, input: Any, ctx: Any) -> Any:
        """The factor y / x: 1 where x > 0, the slope a elsewhere."""
        if not ctx.training:
            return xp.where(input > 0, 1.0, (self.lower + self.upper) / 2)
        bits = ctx.random_bits(input) >> 8  # 24 bits: u in [0, 1), exact in float32
        kind = backend_of(xp)
        # (a half input's slope drawn in float32 and rounded: 2^24 overflows float16, inf)
        if kind == "torch":
            wide = input.dtype if input.dtype.itemsize >= 4 else xp.t.float32
            u = bits.to(wide)
        else:
            wide = input.dtype if input.dtype.itemsize >= 4 else np.float32
            u = bits.astype(wide)
        a = self.lower + (self.upper - self.lower) * (u * 2.0**-24)
        a = a.to(input.dtype) if kind == "torch" else a.astype(input.dtype)
        return xp.where(input > 0, 1.0, a)

    def forward(self, xp: Any, input: Any, *, ctx: Any) -> Any:
        F = functional_of(xp)
        if F is not None and not ctx.training:
            return F.leaky_relu(input, (self.lower + self.upper) / 2)
        return input * self.slopes(xp, input, ctx)

    def vjp(self, g, out, args, wrt):
        return {"input": g * self.slopes(np, args["input"], args["ctx"])}

    def __repr__(self) -> str:
        return f"RReLU(lower={self.lower}, upper={self.upper})"
