"""More elementwise activations, as torch's: PReLU (a learnable slope per channel),
LogSigmoid, Softsign, Softshrink and Hardshrink (the rest are in :mod:`.activations`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .activations import _expit, _number
from .operator import Operator, ShapeError, backend_of, functional_of


class PReLU(Operator):
    """Parametric ReLU, as ``torch.nn.PReLU(num_parameters=1, init=0.25)`` / ``F.prelu``:

        y = x if x > 0 else weight · x

    ``weight`` is a learnable parameter of shape ``(num_parameters,)`` (torch's name, so a
    ``state_dict``'s ``weight`` copies in) starting at ``init``. With ``num_parameters=1``
    the one slope applies to every element (any rank, 0-d too); with C > 1 the input must
    have rank >= 2 and C channels on axis 1 (torch's channel axis, ``(N, C, ...)``), and
    weight[c] applies to channel c. The gradients are torch's: g where x > 0, weight·g
    elsewhere (x = 0 and NaN too) for the input; Σ x·g over the elements with x <= 0 (or
    NaN) of each channel for the weight.

    The initial value is the initialiser ``"constant:<init>"`` (``"zeros"`` / ``"ones"`` for
    0 and 1): a backend's ``init_param`` must know that kind to draw it.
    """

    vjp_ignores = frozenset({"output"})

    def __init__(self, num_parameters: int = 1, init: float = 0.25) -> None:
        if isinstance(num_parameters, (bool, np.bool_)) or not isinstance(
                num_parameters, (int, np.integer)) or num_parameters < 1:
            raise ValueError(f"PReLU: num_parameters must be a positive int, got "
                             f"{num_parameters!r}")
        self.num_parameters = int(num_parameters)
        self.init = _number(init, "PReLU", "init")

    @property
    def param_init(self) -> dict[str, str]:  # type: ignore[override]
        kind = {0.0: "zeros", 1.0: "ones"}.get(self.init, f"constant:{self.init!r}")
        return {"weight": kind}

    def _check(self, shapes) -> None:
        s, c = shapes.get("input"), self.num_parameters
        if s is None or c == 1:
            return
        if len(s) < 2:
            raise ShapeError(f"PReLU: num_parameters={c} needs an input of rank >= 2 (the "
                             f"channels on axis 1), got rank {len(s)}")
        if s[1] is not None and s[1] != c:
            raise ShapeError(f"PReLU: num_parameters={c} does not match the input's {s[1]} "
                             f"channels (axis 1)")

    def param_shapes(self, shapes):
        self._check(shapes)
        return {"weight": (self.num_parameters,)}

    def infer_shape(self, shapes):
        self._check(shapes)
        return shapes.get("input")

    def _slope(self, w: Any, ndim: int) -> Any:
        """The weight broadcast against an input of rank ``ndim``."""
        if self.num_parameters == 1:
            return w.reshape(())
        return w.reshape((self.num_parameters,) + (1,) * (ndim - 2))

    def forward(self, xp: Any, input: Any, weight: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.prelu(input, weight)
        # the slope times the non-positive part only: JAX's weight gradient would be
        # x·0 = NaN at x = +inf where() does not pick (torch's: 0)
        neg = xp.where(input > 0, 0.0, input)
        return xp.where(input > 0, input, self._slope(weight, input.ndim) * neg)

    def vjp(self, g, out, args, wrt):
        x, w = args["input"], args["weight"]
        res = {}
        if "input" in wrt:
            res["input"] = np.where(x > 0, g, self._slope(w, x.ndim) * g)
        if "weight" in wrt:
            gw = np.where(x > 0, 0 * g, x * g)
            if self.num_parameters == 1:
                res["weight"] = np.reshape(gw.sum(), (1,)).astype(gw.dtype, copy=False)
            else:
                res["weight"] = gw.sum(axis=(0, *range(2, gw.ndim)))
        return res

    def __repr__(self) -> str:
        return f"PReLU(num_parameters={self.num_parameters}, init={self.init})"


class LogSigmoid(Operator):
    """log(sigmoid(x)) = −softplus(−x) = min(x, 0) − log(1 + e^−|x|), as
    ``torch.nn.LogSigmoid`` / ``F.logsigmoid``: never log(0) (−x at x → −∞, −inf at −inf,
    0 at +inf). The gradient is 1 − sigmoid(x) = sigmoid(−x) (1 at −inf, 0 at +inf)."""

    vjp_ignores = frozenset({"output"})

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.logsigmoid(input)
        if backend_of(xp) == "jax":
            import jax

            return jax.nn.log_sigmoid(input)
        return np.minimum(input, 0) - np.log1p(np.exp(-np.abs(input)))

    def vjp(self, g, out, args, wrt):
        return {"input": g * _expit(-args["input"])}


class Softsign(Operator):
    """x / (1 + |x|), as ``torch.nn.Softsign`` / ``F.softsign`` (torch's own formula, so
    ±inf gives NaN as torch's does, inf / inf). The gradient is 1 / (1 + |x|)², computed
    as torch's autograd of that formula (1/(1 + |x|) − x·sign(x)/(1 + |x|)²: 1 at 0, NaN at
    ±inf, as torch)."""

    vjp_ignores = frozenset({"output"})

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.softsign(input)
        with np.errstate(invalid="ignore"):  # ±inf / inf: NaN, as torch
            return input / (xp.abs(input) + 1)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        d = np.abs(x) + 1
        with np.errstate(invalid="ignore"):
            return {"input": g / d - g * x * np.sign(x) / (d * d)}


def _lambd(value: Any, who: str, *, nonnegative: bool) -> float:
    lam = _number(value, who, "lambd")
    if nonnegative and lam < 0:
        raise ValueError(f"{who}: lambd must be a finite number >= 0, got {value!r}")
    return lam


class Softshrink(Operator):
    """x − λ for x > λ, x + λ for x < −λ, 0 between, as ``torch.nn.Softshrink(lambd=0.5)`` /
    ``F.softshrink`` (λ a finite number >= 0, as torch demands). The gradient is torch's:
    0 for −λ <= x <= λ (so 0 at exactly ±λ), 1 elsewhere. At a NaN input (output NaN) the
    gradient is passed through (1) on every backend: torch's backward gives 0 there in its
    vectorised loop and 1 in its scalar tail, by position (as Hardtanh's)."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, lambd: float = 0.5) -> None:
        self.lambd = _lambd(lambd, "Softshrink", nonnegative=True)

    def forward(self, xp: Any, input: Any) -> Any:
        # where() on torch too (not F.softshrink): the gradient at NaN passes through
        lam = self.lambd
        inside = (input >= -lam) & (input <= lam)
        return xp.where(inside, 0.0, xp.where(input < -lam, input + lam, input - lam))

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        return {"input": np.where((x >= -self.lambd) & (x <= self.lambd), 0 * g, g)}

    def __repr__(self) -> str:
        return f"Softshrink(lambd={self.lambd})"


class Hardshrink(Operator):
    """x for |x| > λ, 0 for −λ <= x <= λ, as ``torch.nn.Hardshrink(lambd=0.5)`` /
    ``F.hardshrink`` (λ any finite number, as torch; a negative one is the identity). The
    gradient is torch's: 0 for −λ <= x <= λ (so 0 at exactly ±λ), 1 elsewhere; 1 at a NaN
    input on every backend (torch's is 0 or 1 by position, see :class:`Softshrink`)."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, lambd: float = 0.5) -> None:
        self.lambd = _lambd(lambd, "Hardshrink", nonnegative=False)

    def forward(self, xp: Any, input: Any) -> Any:
        # where() on torch too (not F.hardshrink): the gradient at NaN passes through
        inside = (input >= -self.lambd) & (input <= self.lambd)
        return xp.where(inside, 0.0, input)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        return {"input": np.where((x >= -self.lambd) & (x <= self.lambd), 0 * g, g)}

    def __repr__(self) -> str:
        return f"Hardshrink(lambd={self.lambd})"
