"""Multi-class and multi-label margin losses of torch: ``MultiMarginLoss``,
``MultiLabelMarginLoss`` and ``MultiLabelSoftMarginLoss``, as ``torch.nn.functional``'s
``multi_margin_loss``, ``multilabel_margin_loss`` and ``multilabel_soft_margin_loss``. Each
gives one loss per row of scores (the class axis last) and takes ``reduction``: "mean"
(default, as torch: over the rows), "sum" or "none".

The two margin losses are torch's kernels: a hinge term counts (and gets a gradient) only
where its argument is > 0, so a score exactly at the margin contributes 0 and no gradient,
as torch's. Their class-index targets are checked before a run (a ``ValueError`` naming the
data key), as torch refuses them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputValueError, ShapeError
from .half_precision import float32_forward, float32_vjp
from .operator import Operator, Shape, backend_of, fmt, functional_of, unify
from .pointwise_losses import check_number, check_reduction, elementwise_cotangent, reduce


def class_weights(who: str, weight: Any) -> np.ndarray | None:
    """``weight`` as a float64 array (C,), or None; a ``ValueError`` naming it unless a 1-d
    sequence of finite numbers (torch's "weight must be one-dimensional")."""
    if weight is None:
        return None
    w = np.asarray(weight)
    if w.ndim != 1 or not w.size or w.dtype.kind not in "iuf" or not np.isfinite(w).all():
        raise ValueError(f"{who}: weight must be a 1-d sequence of finite numbers (one per "
                         f"class), got {weight!r}")
    return w.astype(np.float64)


def _torch_reduction(input: Any, reduction: str) -> str:
    """The reduction to hand torch's margin kernel: "none" for the mean of no rows (the kernel
    leaves that mean unset, uninitialised memory; its ``.mean()`` is NaN, as NumPy, JAX and
    torch's other losses give)."""
    return "none" if reduction == "mean" and not input.numel() else reduction


def _weight_like(xp: Any, w: np.ndarray, like: Any) -> Any:
    """``w`` in ``like``'s backend and dtype."""
    if backend_of(xp) == "torch":
        return like.new_tensor(w)
    return xp.asarray(w, dtype=like.dtype)


def _scores(who: str, s: Shape | None) -> None:
    """A ``ShapeError`` unless the scores are (N, C) or (C,) with C > 0 (torch's forms)."""
    if s is not None and (len(s) not in (1, 2) or s[-1] == 0):
        raise ShapeError(f"{who}: input must be (N, C) or (C,) scores with C > 0 classes, got "
                         f"shape {fmt(s)}")


def _index_range(labels: Any) -> tuple[int, int] | None:
    """(min, max) of an integer array (NumPy or torch), None when empty."""
    if not math.prod(labels.shape):
        return None
    if hasattr(labels, "aminmax"):  # torch
        from .losses import _torch_reducible

        lo, hi = _torch_reducible(labels).aminmax()
        return int(lo), int(hi)
    return int(labels.min()), int(labels.max())


class _ClassIndexLoss(Operator):
    """Scores ``input`` against integer class indices ``target``, checked before a run."""

    inputs = ("input", "target")
    int_inputs = value_checked_inputs = frozenset({"target"})
    reduction: str = "mean"
    _lowest = 0  # the smallest index allowed (MultiLabelMarginLoss: −1, its padding)

    def check_inputs(self, shapes: Mapping[str, Shape | None], dtypes: Mapping[str, str],
                     arrays: Mapping[str, Any], names: Mapping[str, str]) -> None:
        """Each class index in [lowest, C) (a ``ValueError`` naming the data key)."""
        s, labels = shapes.get("input"), arrays.get("target")
        if s is None or not s or labels is None:
            return
        c, rng = s[-1], _index_range(labels)
        if rng is not None and (rng[0] < self._lowest or rng[1] >= c):
            bad = rng[0] if rng[0] < self._lowest else rng[1]
            raise InputValueError(
                f"{type(self).__name__}: target '{names['target']}' holds class index {bad} out "
                f"of range: the input has {c} classes, so indices must be in "
                f"[{self._lowest}, {c - 1}]")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"


class MultiMarginLoss(_ClassIndexLoss):
    """The multi-class hinge loss of torch's ``F.multi_margin_loss(input, target, p, margin,
    weight)``: for scores x (C classes) and the class y of the row,

        Σ_{i ≠ y} w[y] · max(0, margin − x[y] + x[i])^p / C

    with ``p`` 1 or 2 (torch's only ones), ``margin`` any finite number, ``weight`` None or one
    number per class (w = 1 without). ``input`` is (N, C) with ``target`` (N,) or (C,) with a
    0-d target; targets are integers in [0, C). Only ``input`` is differentiable; a term at
    exactly 0 has no gradient (torch's strict ``> 0``)."""

    def __init__(self, p: int = 1, margin: float = 1.0, weight: Sequence[float] | None = None,
                 reduction: str = "mean") -> None:
        if isinstance(p, bool) or p not in (1, 2):
            raise ValueError(f"MultiMarginLoss: p must be 1 or 2 (torch's only ones), got {p!r}")
        self.p = int(p)
        self.margin = check_number("MultiMarginLoss", "margin", margin)
        self.weight = class_weights("MultiMarginLoss", weight)
        self.reduction = check_reduction("MultiMarginLoss", reduction)

    def infer_shape(self, shapes):
        s, t = shapes.get("input"), shapes.get("target")
        _scores("MultiMarginLoss", s)
        if s is not None and self.weight is not None and s[-1] not in (None, self.weight.size):
            raise ShapeError(f"MultiMarginLoss: weight has {self.weight.size} entries but the "
                             f"input {fmt(s)} has {s[-1]} classes: give one weight per class")
        rows = None if s is None else s[:-1]
        if rows is not None and t is not None:
            try:
                unify(rows, t, "input without its class axis", "target")
            except ShapeError as e:
                raise ShapeError(f"MultiMarginLoss: {e} (one class index per row)") from None
        rows = rows if rows is not None else t
        return rows if self.reduction == "none" or rows is None else ()

    def _terms(self, xp: Any, x: Any, t: Any) -> tuple[Any, Any]:
        """margin − x[y] + x[i] (..., C) and where i ≠ y."""
        ti = t[..., None]
        z = self.margin - xp.take_along_axis(x, ti, axis=-1) + x
        return z, xp.arange(x.shape[-1]) != ti

    @float32_forward(on_torch=True)  # (the sum over the classes; torch.autocast's float32
    # op; torch has no CPU half multi_margin_loss)
    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        F = functional_of(xp)
        w = None if self.weight is None else _weight_like(xp, self.weight, input)
        if F is not None:
            red = _torch_reduction(input, self.reduction)
            y = F.multi_margin_loss(input, target.long(), p=self.p, margin=self.margin,
                                    weight=w, reduction=red)
            return y if red == self.reduction else y.mean()
        z, other = self._terms(xp, input, target)
        h = xp.where(other & (z > 0), z, 0.0)
        h = h * h if self.p == 2 else h
        loss = xp.sum(h, axis=-1) / input.shape[-1]
        return reduce(xp, loss if w is None else w[target] * loss, self.reduction)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x, t = args["input"], args["target"]
        z, other = self._terms(np, x, t)
        gl = elementwise_cotangent(g, t.shape, self.reduction) / x.shape[-1]
        if self.weight is not None:
            gl = gl * self.weight.astype(x.dtype)[t]
        act = other & (z > 0)
        gi = gl[..., None] * np.where(act, 2 * z if self.p == 2 else 1.0, 0.0)
        # x[y] enters every term with −1
        gi = gi - np.where(other, 0.0, gi.sum(axis=-1, keepdims=True))
        return {k: gi if k == "input" else np.zeros(t.shape) for k in wrt}

    def __repr__(self) -> str:
        w = "" if self.weight is None else f", weight={self.weight.tolist()}"
        return (f"MultiMarginLoss(p={self.p}, margin={self.margin}{w}, "
                f"reduction={self.reduction!r})")


class MultiLabelMarginLoss(_ClassIndexLoss):
    """The multi-label hinge loss of torch's ``F.multilabel_margin_loss(input, target)``: the
    ``target`` row lists the row's classes as indices, ended by the first −1 (the rest of
    the row is ignored; a row without −1 lists C classes); with J those classes (a class
    listed twice counts twice) and I the classes not in J, per row

        Σ_{j ∈ J} Σ_{i ∈ I} max(0, 1 − (x[j] − x[i])) / C

    ``input`` and ``target`` (integers in [−1, C), torch's check) have one shape, (N, C) or
    (C,). Only ``input`` is differentiable; a term at exactly 0 has no gradient (torch's
    strict ``> 0``). The NumPy and JAX forms hold every (listed slot, class) pair of a row
    at once: N·C² elements (torch's kernel loops over them)."""

    _lowest = -1

    def __init__(self, reduction: str = "mean") -> None:
        self.reduction = check_reduction("MultiLabelMarginLoss", reduction)

    def infer_shape(self, shapes):
        s, t = shapes.get("input"), shapes.get("target")
        _scores("MultiLabelMarginLoss", s)
        try:
            s = unify(s, t, "input", "target")
        except ShapeError as e:
            raise ShapeError(f"MultiLabelMarginLoss: {e} (the target lists class indices "
                             "in a row of the input's shape, padded with -1)") from None
        return s[:-1] if self.reduction == "none" and s is not None else (
            None if s is None else ())

    def _parts(self, xp: Any, x: Any, t: Any) -> tuple[Any, Any, Any]:
        """The hinge arguments 1 − (x[j_k] − x[i]) (..., K, C), where a term counts, and the
        listed classes as a one-hot (..., K, C) (K = C list slots)."""
        listed = xp.cumprod((t >= 0).astype(np.int32), axis=-1) > 0  # slots before the first −1
        onehot = (t[..., :, None] == xp.arange(x.shape[-1])) & listed[..., :, None]
        xj = xp.take_along_axis(x, xp.where(listed, t, 0), axis=-1)
        z = 1 - (xj[..., :, None] - x[..., None, :])
        counts = listed[..., :, None] & ~xp.any(onehot, axis=-2)[..., None, :]
        return z, counts & (z > 0), onehot

    @float32_forward(on_torch=True)  # (torch.autocast's float32 op; no CPU half kernel)
    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            red = _torch_reduction(input, self.reduction)
            y = F.multilabel_margin_loss(input, target.long(), reduction=red)
            return y if red == self.reduction else y.mean()
        z, act, _ = self._parts(xp, input, target)
        loss = xp.sum(xp.where(act, z, 0.0), axis=(-2, -1)) / input.shape[-1]
        return reduce(xp, loss, self.reduction)

    @float32_vjp  # (NumPy has no bfloat16 einsum)
    def vjp(self, g, out, args, wrt):
        x, t = args["input"], args["target"]
        _, act, onehot = self._parts(np, x, t)
        gl = elementwise_cotangent(g, x.shape[:-1], self.reduction) / x.shape[-1]
        act = act.astype(x.dtype)
        # +1 for each active term's x[i], −1 for its x[j] (scattered through the one-hot)
        gi = act.sum(axis=-2) - np.einsum("...k,...kc->...c", act.sum(axis=-1),
                                          onehot.astype(x.dtype))
        return {k: gl[..., None] * gi if k == "input" else np.zeros(t.shape) for k in wrt}


class MultiLabelSoftMarginLoss(Operator):
    """The multi-label logistic loss of torch's ``F.multilabel_soft_margin_loss(input,
    target, weight)``: for scores x and targets y in [0, 1] over C classes (the last axis),
    per row

        Σ_c w_c · (y_c · softplus(−x_c) + (1 − y_c) · softplus(x_c)) / C

    (softplus(−x) = −log σ(x)). ``input`` and ``target`` have one shape of rank >= 1 (one loss
    per row of the leading axes); ``weight`` None or one number per class. Both are
    differentiable: d/dx = w·(σ(x) − y)/C, d/dy = −w·x/C."""

    inputs = ("input", "target")

    def __init__(self, weight: Sequence[float] | None = None, reduction: str = "mean") -> None:
        self.weight = class_weights("MultiLabelSoftMarginLoss", weight)
        self.reduction = check_reduction("MultiLabelSoftMarginLoss", reduction)

    def infer_shape(self, shapes):
        try:
            s = unify(shapes.get("input"), shapes.get("target"), "input", "target")
        except ShapeError as e:
            raise ShapeError(f"MultiLabelSoftMarginLoss: {e}") from None
        if s is not None and not s:
            raise ShapeError("MultiLabelSoftMarginLoss: input needs a class axis (the last), "
                             "got shape ()")
        w = self.weight
        if s is not None and w is not None and s[-1] not in (None, w.size) and w.size != 1:
            raise ShapeError(f"MultiLabelSoftMarginLoss: weight has {w.size} entries but the "
                             f"input {fmt(s)} has {s[-1]} classes: give one weight per class")
        return s[:-1] if self.reduction == "none" and s is not None else (
            None if s is None else ())

    @float32_forward  # (the sum over the classes: in bfloat16 it stagnates past 256)
    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        w = None if self.weight is None else _weight_like(xp, self.weight, input)
        F = functional_of(xp)
        if F is not None:
            return F.multilabel_soft_margin_loss(input, target, weight=w,
                                                 reduction=self.reduction)
        if backend_of(xp) == "jax":
            import jax

            sp = jax.nn.softplus
        else:
            def sp(v: Any) -> Any:
                return xp.logaddexp(0.0, v)
        loss = target * sp(-input) + (1 - target) * sp(input)
        loss = xp.sum(loss if w is None else loss * w, axis=-1) / input.shape[-1]
        return reduce(xp, loss, self.reduction)

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        x, t = args["input"], args["target"]
        gl = (elementwise_cotangent(g, x.shape[:-1], self.reduction) / x.shape[-1])[..., None]
        if self.weight is not None:
            gl = gl * self.weight.astype(x.dtype)
        grads = {"input": lambda: gl * (np.exp(-np.logaddexp(0.0, -x)) - t),
                 "target": lambda: gl * -x}
        return {k: np.broadcast_to(grads[k](), x.shape) for k in wrt}

    def __repr__(self) -> str:
        w = "" if self.weight is None else f"weight={self.weight.tolist()}, "
        return f"MultiLabelSoftMarginLoss({w}reduction={self.reduction!r})"
