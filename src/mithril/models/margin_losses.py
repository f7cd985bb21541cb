"""Margin and embedding losses of torch: ``MarginRankingLoss``, ``HingeEmbeddingLoss``,
``SoftMarginLoss``, ``CosineEmbeddingLoss`` and ``TripletMarginLoss``, as
``torch.nn.functional``'s ``margin_ranking_loss``, ``hinge_embedding_loss``,
``soft_margin_loss``, ``cosine_embedding_loss`` and ``triplet_margin_loss``. Each takes
``reduction``: "mean" (default, as torch), "sum" or "none".

A hinge max(0, z) here is torch's ``clamp_min(z, 0)``: its gradient is 1 where z >= 0, so
at a tie (z exactly 0: a pair exactly at the margin, a zero cosine against margin 0) the
gradient is the active branch's, as torch's; the published Mithril's ``HingeLoss`` splits a
tie in half instead. Labels are read as torch reads them, without a check: a ±1 target picks
a branch, and a target that is neither counts as torch counts it (documented per loss)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import ShapeError
from .half_precision import float32_forward, float32_vjp
from .operator import Operator, backend_of, fmt, functional_of, unify
from .pointwise_losses import check_number, check_reduction, elementwise_cotangent, reduce

#: torch's ``cosine_embedding_loss`` adds this to each squared norm (a zero vector's cosine
#: is then 0, not NaN): 1e-12 rounded to float32 (ATen's constant is a float), 9.9999999600e-13
COSINE_EPS = float(np.float32(1e-12))


def hinge0(xp: Any, z: Any) -> Any:
    """max(z, 0) with torch's ``clamp_min`` gradient (1 where z >= 0; NaN stays NaN)."""
    return xp.where(z < 0, 0.0, z)


def _unify_all(who: str, shapes: Any, keys: tuple[str, ...]) -> Any:
    s = None
    for k in keys:
        try:
            s = unify(s, shapes.get(k), keys[0], k)
        except ShapeError as e:
            raise ShapeError(f"{who}: {e} (they must have one shape)") from None
    return s


def _reduced(shape: Any, reduction: str) -> Any:
    return shape if reduction == "none" or shape is None else ()


class _MarginLoss(Operator):
    reduction: str = "mean"

    def __repr__(self) -> str:
        extra = "".join(f"{k}={getattr(self, k)!r}, " for k in self._shown)
        return f"{type(self).__name__}({extra}reduction={self.reduction!r})"

    _shown: tuple[str, ...] = ()


class MarginRankingLoss(_MarginLoss):
    """The ranking hinge of two scores against a target y (1: ``input1`` should rank
    higher, −1: ``input2``), per element

        max(0, −y·(input1 − input2) + margin)

    as ``F.margin_ranking_loss(input1, input2, target, margin)``. All three have one shape
    and are differentiable (torch's target too: d/dy = −(input1 − input2) where active);
    ``margin`` is any finite number (torch takes a negative one too). The gradient passes
    where the hinge's argument is >= 0 (torch's clamp_min; see the module docstring)."""

    inputs = ("input1", "input2", "target")
    _shown = ("margin",)

    def __init__(self, margin: float = 0.0, reduction: str = "mean") -> None:
        self.margin = check_number("MarginRankingLoss", "margin", margin)
        self.reduction = check_reduction("MarginRankingLoss", reduction)

    def infer_shape(self, shapes):
        return _reduced(_unify_all("MarginRankingLoss", shapes, self.inputs), self.reduction)

    def forward(self, xp: Any, input1: Any, input2: Any, target: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.margin_ranking_loss(input1, input2, target, margin=self.margin,
                                         reduction=self.reduction)
        return reduce(xp, hinge0(xp, self.margin - target * (input1 - input2)), self.reduction)

    def vjp(self, g, out, args, wrt):
        x1, x2, t = args["input1"], args["input2"], args["target"]
        d = x1 - x2
        ga = elementwise_cotangent(g, d.shape, self.reduction) * (self.margin - t * d >= 0)
        grads = {"input1": -t * ga, "input2": t * ga, "target": -d * ga}
        return {k: grads[k] for k in wrt}


class HingeEmbeddingLoss(_MarginLoss):
    """torch's ``F.hinge_embedding_loss(input, target, margin)``: per element, for a
    distance-like ``input`` x and a label y,

        x                   where y = 1
        max(0, margin − x)  where y = −1

    and, as torch, both terms for a label that is neither (x + max(0, margin − x)).
    ``input`` and ``target`` have one shape; only ``input`` gets a gradient (the label
    selects a branch: its gradient is 0, torch gives none). ``margin`` is any finite number
    (torch takes a negative one too); the hinge's gradient passes where margin − x >= 0."""

    inputs = ("input", "target")
    _shown = ("margin",)

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        self.margin = check_number("HingeEmbeddingLoss", "margin", margin)
        self.reduction = check_reduction("HingeEmbeddingLoss", reduction)

    def infer_shape(self, shapes):
        return _reduced(_unify_all("HingeEmbeddingLoss", shapes, self.inputs), self.reduction)

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.hinge_embedding_loss(input, target, margin=self.margin,
                                          reduction=self.reduction)
        loss = xp.where(target != 1, hinge0(xp, self.margin - input), 0.0) + \
            xp.where(target != -1, input, 0.0)
        return reduce(xp, loss, self.reduction)

    def vjp(self, g, out, args, wrt):
        x, t = args["input"], args["target"]
        ge = elementwise_cotangent(g, x.shape, self.reduction)
        dx = (t != -1).astype(x.dtype) - ((t != 1) & (self.margin - x >= 0))
        return {k: ge * dx if k == "input" else np.zeros_like(t) for k in wrt}


def _softplus(xp: Any, z: Any) -> Any:
    """log(1 + e^z) without overflow (log1p(exp(z)) is inf for z > 709 in float64)."""
    if backend_of(xp) == "torch":
        return xp.t.logaddexp(z, xp.t.zeros_like(z))
    return xp.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) without overflow (NumPy)."""
    return np.exp(-np.logaddexp(0.0, -z))


class SoftMarginLoss(_MarginLoss):
    """The logistic loss of a score x against a label y = ±1, per element

        log(1 + exp(−y·x))

    as ``F.soft_margin_loss(input, target)``, computed as softplus(−y·x): finite where
    torch's log1p(exp(−y·x)) overflows (−y·x > 709 in float64: torch gives inf and a NaN
    gradient, this −y·x and −y). Both have one shape; the target is differentiable too
    (d/dy = −x·σ(−y·x); torch refuses a target that requires grad)."""

    inputs = ("input", "target")

    def __init__(self, reduction: str = "mean") -> None:
        self.reduction = check_reduction("SoftMarginLoss", reduction)

    def infer_shape(self, shapes):
        return _reduced(_unify_all("SoftMarginLoss", shapes, self.inputs), self.reduction)

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        return reduce(xp, _softplus(xp, -target * input), self.reduction)

    def vjp(self, g, out, args, wrt):
        x, t = args["input"], args["target"]
        s = elementwise_cotangent(g, x.shape, self.reduction) * _sigmoid(-t * x)
        return {k: -t * s if k == "input" else -x * s for k in wrt}


class CosineEmbeddingLoss(_MarginLoss):
    """torch's ``F.cosine_embedding_loss(input1, input2, target, margin)``: with
    cos = ⟨a, b⟩ / sqrt((|a|² + ε)(|b|² + ε)) over the last axis (ε = 1e−12 in float32,
    torch's: a zero vector has cosine 0), per row

        1 − cos                 where y = 1
        max(0, cos − margin)    where y = −1
        0                       for any other label (as torch)

    ``input1`` and ``input2`` are (N, D) with ``target`` (N,), or (D,) with a 0-d target (torch's
    only forms); one loss per row. The inputs are differentiable, the label is not (gradient 0).
    ``margin`` is any finite number (torch suggests [−1, 1] and checks nothing); the hinge's
    gradient passes where cos − margin >= 0 (a zero vector against margin 0 included)."""

    inputs = ("input1", "input2", "target")
    _shown = ("margin",)

    def __init__(self, margin: float = 0.0, reduction: str = "mean") -> None:
        self.margin = check_number("CosineEmbeddingLoss", "margin", margin)
        self.reduction = check_reduction("CosineEmbeddingLoss", reduction)

    def infer_shape(self, shapes):
        s = _unify_all("CosineEmbeddingLoss", shapes, ("input1", "input2"))
        t = shapes.get("target")
        if s is not None and len(s) not in (1, 2):
            raise ShapeError(f"CosineEmbeddingLoss: input1 and input2 must be (N, D) or (D,), "
                             f"got shape {fmt(s)}")
        if s is not None and t is not None:
            try:
                unify(s[:-1], t, "input1 without its last axis", "target")
            except ShapeError as e:
                raise ShapeError(f"CosineEmbeddingLoss: {e} (one label per row)") from None
        rows = None if s is None else s[:-1]
        return _reduced(rows if rows is not None else t, self.reduction)

    def _cos(self, xp: Any, a: Any, b: Any) -> tuple[Any, Any, Any, Any]:
        m1 = xp.sum(a * a, axis=-1) + COSINE_EPS
        m2 = xp.sum(b * b, axis=-1) + COSINE_EPS
        den = xp.sqrt(m1 * m2)
        return xp.sum(a * b, axis=-1) / den, m1, m2, den

    @float32_forward(on_torch=True)  # (torch.autocast's float32 op: |a|² of 1024 values of
    # 10 passes 65504, torch's float16 kernel too)
    def forward(self, xp: Any, input1: Any, input2: Any, target: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.cosine_embedding_loss(input1, input2, target, margin=self.margin,
                                           reduction=self.reduction)
        cos = self._cos(xp, input1, input2)[0]
        loss = xp.where(target == 1, 1 - cos, 0.0) + \
            xp.where(target == -1, hinge0(xp, cos - self.margin), 0.0)
        return reduce(xp, loss, self.reduction)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        a, b, t = args["input1"], args["input2"], args["target"]
        cos, m1, m2, den = self._cos(np, a, b)
        ge = elementwise_cotangent(g, cos.shape, self.reduction)
        slope = np.where(t == 1, -1.0, np.where((t == -1) & (cos - self.margin >= 0), 1.0, 0.0)
                         ).astype(cos.dtype, copy=False)
        gc = (ge * slope)[..., None]
        cos = cos[..., None]
        # d cos / da = b / den − cos · a / (|a|² + ε)
        grads = {"input1": lambda: gc * (b / den[..., None] - cos * a / m1[..., None]),
                 "input2": lambda: gc * (a / den[..., None] - cos * b / m2[..., None]),
                 "target": lambda: np.zeros_like(t)}
        return {k: grads[k]() for k in wrt}


def _distance(xp: Any, d: Any, p: float) -> Any:
    """The p-norm of ``d`` over its last axis, with torch's gradient conventions: 0 for a
    zero vector (and, for p < 1, at each zero element), ties of p = inf shared evenly."""
    a = d * xp.sign(d)  # |d| whose gradient is sign(d), 0 at 0 (JAX's abs has 1 there)
    if math.isinf(p):
        return xp.max(a, axis=-1)  # (JAX's and NumPy's VJP below split ties evenly)
    # the inner wheres keep the unpicked branches' gradients finite; != 0 (not > 0) lets a
    # NaN difference through to a NaN distance, as torch (it gave 0)
    pos = a != 0
    s = xp.sum(xp.where(pos, xp.where(pos, a, 1.0) ** p, 0.0), axis=-1)
    return xp.where(s != 0, xp.where(s != 0, s, 1.0) ** (1 / p), 0.0)


def _distance_vjp(d: np.ndarray, n: np.ndarray, p: float) -> np.ndarray:
    """d |d|_p / d d (the shape of ``d``), for the norms ``n`` of :func:`_distance`."""
    a, n = np.abs(d), n[..., None]
    if math.isinf(p):
        top = (a == n).astype(d.dtype)
        return np.sign(d) * top / top.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(a != 0, (a / np.where(n != 0, n, 1.0)) ** (p - 1), 0.0)
    return np.sign(d) * r


class TripletMarginLoss(_MarginLoss):
    """The triplet loss of torch's ``F.triplet_margin_loss(anchor, positive, negative,
    margin, p, eps, swap)``: with D(x, y) = |x − y + eps|_p over the last axis (torch's
    ``pairwise_distance``), per row

        max(0, margin + D(anchor, positive) − D(anchor, negative))

    and with ``swap=True`` D(anchor, negative) replaced by min(D(anchor, negative),
    D(positive, negative)) (a tie splits the gradient in half, as torch.minimum). The three
    inputs have one shape (rank >= 1: one loss per row of the leading axes) and are all
    differentiable. ``margin`` > 0 (torch's check), ``p`` > 0 (``math.inf``: the max norm,
    its ties sharing the gradient evenly as torch's), ``eps`` any finite number (torch's
    default 1e−6). The hinge's gradient passes where its argument is >= 0; a zero
    difference vector (eps = 0) has distance gradient 0, as torch's."""

    inputs = ("anchor", "positive", "negative")
    _shown = ("margin", "p", "eps", "swap")

    def __init__(self, margin: float = 1.0, p: float = 2.0, eps: float = 1e-6,
                 swap: bool = False, reduction: str = "mean") -> None:
        self.margin = check_number("TripletMarginLoss", "margin", margin, 0.0, open_lo=True)
        if isinstance(p, (int, float, np.integer, np.floating)) and not isinstance(p, bool) \
                and p == math.inf:
            self.p = math.inf
        else:
            self.p = check_number("TripletMarginLoss", "p (or math.inf)", p, 0.0, open_lo=True)
        self.eps = check_number("TripletMarginLoss", "eps", eps)
        if not isinstance(swap, (bool, np.bool_)):
            raise ValueError(f"TripletMarginLoss: swap must be a bool, got {swap!r}")
        self.swap = bool(swap)
        self.reduction = check_reduction("TripletMarginLoss", reduction)

    def infer_shape(self, shapes):
        s = _unify_all("TripletMarginLoss", shapes, self.inputs)
        if s is not None and not s:
            raise ShapeError("TripletMarginLoss: anchor, positive and negative need an axis "
                             "of features (the last), got shape ()")
        return _reduced(None if s is None else s[:-1], self.reduction)

    def _distances(self, xp: Any, a: Any, p: Any, n: Any) -> tuple[Any, ...]:
        e, q = self.eps, self.p
        return (_distance(xp, a - p + e, q), _distance(xp, a - n + e, q),
                _distance(xp, p - n + e, q) if self.swap else None)

    # (a half-precision statistic accumulates in float32, as torch's; on torch too:
    # torch.autocast's float32 op, whose half kernel's d(a, p) − d(a, n) is 15+ ulps off)
    @float32_forward(on_torch=True)
    def forward(self, xp: Any, anchor: Any, positive: Any, negative: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.triplet_margin_loss(anchor, positive, negative, margin=self.margin,
                                         p=self.p, eps=self.eps, swap=self.swap,
                                         reduction=self.reduction)
        dp, dn, ds = self._distances(xp, anchor, positive, negative)
        if ds is not None:
            dn = xp.minimum(dn, ds)
        return reduce(xp, hinge0(xp, self.margin + dp - dn), self.reduction)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        a, p, n = args["anchor"], args["positive"], args["negative"]
        dp, dn, ds = self._distances(np, a, p, n)
        wn = np.ones_like(dn) if ds is None else np.where(
            dn < ds, 1.0, np.where(dn == ds, 0.5, 0.0)).astype(dn.dtype, copy=False)
        near = dn if ds is None else np.minimum(dn, ds)
        gz = elementwise_cotangent(g, dp.shape, self.reduction) * (self.margin + dp - near >= 0)
        e, q = self.eps, self.p
        jp = gz[..., None] * _distance_vjp(a - p + e, dp, q)  # d/d(anchor − positive)
        jn = (gz * wn)[..., None] * _distance_vjp(a - n + e, dn, q)
        js = 0.0 if ds is None else (gz * (1 - wn))[..., None] * _distance_vjp(p - n + e, ds, q)
        grads = {"anchor": lambda: jp - jn, "positive": lambda: -jp - js,
                 "negative": lambda: jn + js}
        return {k: np.broadcast_to(grads[k](), a.shape) for k in wrt}
