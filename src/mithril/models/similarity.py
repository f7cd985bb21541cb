"""torch's similarity modules of two inputs: ``CosineSimilarity`` and ``PairwiseDistance``,
as ``F.cosine_similarity`` / ``F.pairwise_distance`` (broadcasting included)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .activations import _number
from .distance_models import _full
from .half_precision import float32_forward, float32_vjp
from .margin_losses import _distance, _distance_vjp
from .operator import (
    Operator,
    ShapeError,
    broadcast_shapes,
    fmt,
    functional_of,
    stop_gradient,
    unbroadcast,
)


def _pair(shapes: Any, who: str) -> tuple | None:
    a, b = shapes.get("input1"), shapes.get("input2")
    if a is None or b is None:
        return None
    return broadcast_shapes(a, b, f"{who}: 'input1' and 'input2'")


class CosineSimilarity(Operator):
    """x1·x2 / (max(‖x1‖, eps) · max(‖x2‖, eps)) along ``dim`` (default 1), as
    ``torch.nn.CosineSimilarity(dim=1, eps=1e-8)`` / ``F.cosine_similarity``: each norm is
    clamped on its own (so a zero vector gives 0, not NaN), the inputs broadcast against each
    other, and ``dim`` is removed from the output.

    The gradient is torch's, whose clamp does not enter its autograd graph: with r the
    norms, n̂ = max(r, eps), b̂ = x2/n̂2 and y the output, d/dx1 = g·(b̂ − y·x1/r1)/n̂1 (and
    the same for x2), a norm below eps included: ‖x‖'s derivative stays x/r there, 0 at a
    zero vector (torch's masking)."""

    inputs = ("input1", "input2")
    vjp_ignores = frozenset({"output"})

    def __init__(self, dim: int = 1, eps: float = 1e-8) -> None:
        if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"CosineSimilarity: dim must be an int, got {dim!r}")
        self.dim = int(dim)
        self.eps = _number(eps, "CosineSimilarity", "eps")
        if self.eps < 0:  # (torch: 'eps must be non-negative', at the first call)
            raise ValueError(f"CosineSimilarity: eps must be a finite number >= 0, got {eps!r}")

    def _axis(self, rank: int) -> int:
        if not -max(rank, 1) <= self.dim < max(rank, 1):  # (0-d: dim 0 or -1, as torch)
            raise ShapeError(f"CosineSimilarity: dim {self.dim} is out of range for inputs of "
                             f"rank {rank}")
        return self.dim % max(rank, 1)

    def infer_shape(self, shapes):
        s = _pair(shapes, "CosineSimilarity")
        if s is None:
            return None
        ax = self._axis(len(s))
        return s[:ax] + s[ax + 1:]

    def _unit(self, xp: Any, x: Any, ax: int) -> Any:
        """x / max(‖x‖, eps) whose norm's gradient is ‖x‖'s, x/‖x‖ (0 at 0), as torch's (its
        clamp is not differentiated): the clamped value plus a term of value 0 with that
        gradient. x is first divided by its largest |x| m, a constant (the result does not
        change, its gradient neither): ‖x‖ of values near 1e200 overflows float64, where
        torch's F.cosine_similarity gives 0 and an unscaled NaN."""
        t = _full(xp)
        m = stop_gradient(xp, xp.max(t.abs(x), axis=ax, keepdims=True))
        m = xp.where((m > 0) & (m < math.inf), m, 1.0)  # (0: a zero vector; inf: NaN stays)
        s = x / m
        sq = xp.sum(s * s, axis=ax, keepdims=True)
        nz = sq > 0
        r = xp.where(nz, xp.sqrt(xp.where(nz, sq, 1.0)), 0.0)  # (no NaN gradient at 0)
        return s / (stop_gradient(xp, xp.maximum(r, self.eps / m)) + (r - stop_gradient(xp, r)))

    # (a half-precision statistic accumulates in float32, as torch's; on torch too: its CPU
    # half cosine_similarity is 30+ ulps off for inputs of 300, torch.autocast's float32 op)
    @float32_forward(on_torch=True)
    def forward(self, xp: Any, input1: Any, input2: Any) -> Any:
        ax = self._axis(max(input1.ndim, input2.ndim))
        t = _full(xp)  # (torch too: its F.cosine_similarity overflows, see _unit)
        a, b = (t.broadcast_tensors if t is not xp else xp.broadcast_arrays)(input1, input2)
        if a.ndim == 0:  # two numbers, dim 0 or -1 (as torch): JAX has no axis 0 there
            return self.forward(xp, a.reshape(1), b.reshape(1)).reshape(())
        return xp.sum(self._unit(xp, a, ax) * self._unit(xp, b, ax), axis=ax)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x1, x2 = args["input1"], args["input2"]
        ax = self._axis(max(x1.ndim, x2.ndim))
        a, b = np.broadcast_arrays(x1, x2)
        # (each vector scaled by its largest |x| m, as the forward's _unit: n = m·max(r, eps/m))
        m1, m2 = (np.abs(v).max(ax, keepdims=True) for v in (a, b))
        m1, m2 = (np.where((m > 0) & (m < np.inf), m, 1.0) for m in (m1, m2))
        a, b = a / m1, b / m2
        r1, r2 = (np.sqrt((v * v).sum(ax, keepdims=True)) for v in (a, b))
        n1, n2 = np.maximum(r1, self.eps / m1), np.maximum(r2, self.eps / m2)
        g, y = np.expand_dims(g, ax), np.expand_dims(out, ax)
        with np.errstate(divide="ignore", invalid="ignore"):  # x/r: 0 at a zero vector
            u1, u2 = np.where(r1 > 0, a / r1, 0.0), np.where(r2 > 0, b / r2, 0.0)
        res = {}
        if "input1" in wrt:
            res["input1"] = unbroadcast(g * (b / n2 - y * u1) / n1 / m1, x1.shape)
        if "input2" in wrt:
            res["input2"] = unbroadcast(g * (a / n1 - y * u2) / n2 / m2, x2.shape)
        return res

    def __repr__(self) -> str:
        return f"CosineSimilarity(dim={self.dim}, eps={self.eps})"


def _negative_distance(xp: Any, d: Any, p: float) -> Any:
    """torch's p-"norm" of ``d`` over its last axis for p < 0: (Σ |d|^p)^(1/p), 0 where a
    component is 0 (|0|^p = inf), inf where all are inf; p = -inf: the smallest |d|."""
    a = d * xp.sign(d)  # |d| whose gradient is sign(d), 0 at 0 (JAX's abs has 1 there)
    if math.isinf(p):
        return xp.min(a, axis=-1)  # (JAX's and NumPy's VJP split ties evenly)
    pos = a != 0  # (a NaN passes: a NaN distance, as torch)
    s = xp.sum(xp.where(pos, xp.where(pos, a, 1.0) ** p, 0.0), axis=-1)
    root = xp.where(s != 0, xp.where(s != 0, s, 1.0) ** (1 / p), math.inf)
    # (a NaN in the row wins over a 0, as torch's)
    return xp.where(xp.all(pos, axis=-1) | xp.any(a != a, axis=-1), root, 0.0)


class PairwiseDistance(Operator):
    """‖x1 − x2 + eps‖_p over the last axis, as ``torch.nn.PairwiseDistance(p=2.0,
    eps=1e-6, keepdim=False)`` / ``F.pairwise_distance`` (the inputs broadcast; ``keepdim``
    keeps the last axis with size 1). ``p`` any number, ``inf`` or ``-inf``: p = 0 counts
    the non-zero differences (gradient 0), p = inf is the largest |difference| and p = -inf
    the smallest (the gradient shared evenly among ties, as torch), otherwise (Σ |d|^p)^(1/p)
    with gradient sign(d)·|d|^(p−1) / n^(p−1), and 0 where the distance n is 0 or where a
    component d is 0 (torch's masking, also for p < 1 where |0|^(p−1) would be inf): the
    p-norm and its VJP are ``TripletMarginLoss``'s (:func:`~mithril.models.margin_losses.
    _distance`). For p < 0, as torch's, a zero component makes the distance 0 (|0|^p = inf),
    with gradient 0 in that whole row."""

    inputs = ("input1", "input2")
    vjp_ignores = frozenset({"output"})

    def __init__(self, p: float = 2.0, eps: float = 1e-6, keepdim: bool = False) -> None:
        ok = not isinstance(p, (bool, np.bool_)) and isinstance(
            p, (int, float, np.integer, np.floating)) and not math.isnan(p)
        if not ok:  # (torch takes any p, p < 0 and -inf included)
            raise ValueError(f"PairwiseDistance: p must be a number (or ±inf), got {p!r}")
        self.p = float(p)
        self.eps = _number(eps, "PairwiseDistance", "eps")
        if not isinstance(keepdim, (bool, np.bool_)):
            raise ValueError(f"PairwiseDistance: keepdim must be a bool, got {keepdim!r}")
        self.keepdim = bool(keepdim)

    def infer_shape(self, shapes):
        s = _pair(shapes, "PairwiseDistance")
        if s is None:
            return None
        if not s:
            raise ShapeError(f"PairwiseDistance: the inputs need at least 1 axis, got shape "
                             f"{fmt(s)}")
        return s[:-1] + (1,) * self.keepdim

    def _norm(self, xp: Any, d: Any) -> Any:
        if self.p == 0:
            # (an inf or NaN difference counts 1, as torch: 0·inf was NaN)
            return xp.sum((d != 0).astype(d.dtype), axis=-1, keepdims=self.keepdim)
        n = _distance(xp, d, self.p) if self.p > 0 else _negative_distance(xp, d, self.p)
        return n[..., None] if self.keepdim else n

    @float32_forward  # (a half-precision statistic accumulates in float32, as torch's)
    def forward(self, xp: Any, input1: Any, input2: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.pairwise_distance(input1, input2, self.p, self.eps, self.keepdim)
        return self._norm(xp, input1 - input2 + self.eps)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x1, x2 = args["input1"], args["input2"]
        d = x1 - x2 + self.eps
        g = g if self.keepdim else g[..., None]
        if self.p == 0:  # piecewise constant
            gd = np.zeros_like(d)
        else:
            n = _distance(np, d, self.p) if self.p > 0 else _negative_distance(np, d, self.p)
            with np.errstate(divide="ignore", invalid="ignore"):  # (p < 0: 0 where n = 0)
                gd = g * np.where(n[..., None] != 0, _distance_vjp(d, n, self.p), 0.0)
        res = {}
        if "input1" in wrt:
            res["input1"] = unbroadcast(gd, x1.shape)
        if "input2" in wrt:
            res["input2"] = unbroadcast(-gd, x2.shape)
        return res

    def __repr__(self) -> str:
        return f"PairwiseDistance(p={self.p}, eps={self.eps}, keepdim={self.keepdim})"
