"""``LocalResponseNorm``, as ``torch.nn.LocalResponseNorm``: normalisation across nearby
channels."""

from __future__ import annotations

from typing import Any

import numpy as np

from .activations import _number
from .half_precision import float32_forward, float32_vjp
from .operator import Operator, ShapeError, fmt, functional_of


def _window_sum(xp: Any, a: Any, before: int, after: int) -> Any:
    """Σ a[:, c − before .. c + after] along axis 1, zeros outside (a short loop: the
    window is a few channels)."""
    c = a.shape[1]
    pad = [(0, 0)] * a.ndim
    pad[1] = (before, after)
    p = xp.pad(a, pad)
    total = p[:, 0:c]
    for j in range(1, before + after + 1):
        total = total + p[:, j:j + c]
    return total


class LocalResponseNorm(Operator):
    """y = x / (k + α/size · Σ x²)^β, the sum over the ``size`` channels from c − ⌊size/2⌋
    to c + ⌊(size−1)/2⌋ (zeros beyond the edges, still divided by ``size``), as
    ``torch.nn.LocalResponseNorm(size, alpha=1e-4, beta=0.75, k=1.0)`` /
    ``F.local_response_norm``. ``input`` is (N, C, ...) with at least 3 axes, as torch
    demands. With D = k + α/size · S the denominator's base, the gradient is
    g·D^−β − 2αβ/size · x · Σ_{c: x's channel in window(c)} g_c·x_c·D_c^(−β−1)."""

    vjp_ignores = frozenset({"output"})

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75,
                 k: float = 1.0) -> None:
        if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) \
                or size < 1:
            raise ValueError(f"LocalResponseNorm: size must be a positive int, got {size!r}")
        self.size = int(size)
        self.alpha = _number(alpha, "LocalResponseNorm", "alpha")
        self.beta = _number(beta, "LocalResponseNorm", "beta")
        self.k = _number(k, "LocalResponseNorm", "k")

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is not None and len(s) < 3:
            raise ShapeError(f"LocalResponseNorm: 'input' must be (N, C, ...) with at least 3 "
                             f"axes (as torch), got shape {fmt(s)}")
        return s

    def _base(self, xp: Any, x: Any) -> Any:
        s = _window_sum(xp, x * x, self.size // 2, (self.size - 1) // 2)
        return self.k + self.alpha / self.size * s

    # (Σ x² in float32, rounded once: 300² passes float16's 65504; torch's kernel too, and
    # it pools 4-D and 5-D inputs with avg_pool3d, which has no CPU half kernel)
    @float32_forward(on_torch=True)
    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.local_response_norm(input, self.size, self.alpha, self.beta, self.k)
        return input / self._base(xp, input) ** self.beta

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x = args["input"]
        d = self._base(np, x)
        h = g * x * d ** (-self.beta - 1)
        back = _window_sum(np, h, (self.size - 1) // 2, self.size // 2)  # the transposed window
        return {"input": g * d ** -self.beta - 2 * self.alpha * self.beta / self.size * x * back}

    def __repr__(self) -> str:
        return (f"LocalResponseNorm({self.size}, alpha={self.alpha}, beta={self.beta}, "
                f"k={self.k})")
