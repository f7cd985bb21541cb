"""Losses of probabilities: ``BinaryCrossEntropy`` (of probabilities or logits) and
``KLDivergence``, as torch's ``F.binary_cross_entropy`` / ``F.binary_cross_entropy_with_logits``
and ``F.kl_div`` and the published Mithril's blocks of those names.

The published Mithril's *robust* log continues log(x) linearly below a cutoff c (default:
the smallest normal number of the dtype), log(c) + x/c − 1, so a probability of 0 has a
finite log and gradient (1/c). ``KLDivergence`` always takes it; ``BinaryCrossEntropy`` with
``robust=True``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .operator import Operator, ShapeError, backend_of, fmt, functional_of, unify
from .pointwise_losses import (
    REDUCTIONS,
    check_number,
    check_reduction,
    elementwise_cotangent,
    reduce,
)

#: torch's F.binary_cross_entropy clamps each log at -100: below e^-100 the log is -100
_LOG_FLOOR = -100.0
_FLOOR_ARG = math.exp(_LOG_FLOOR)


def tiny(dtype: Any) -> float:
    """The smallest positive normal number of a float dtype (NumPy, JAX or torch)."""
    name = str(dtype).rsplit(".", 1)[-1]
    return float(np.finfo(name if name in ("float16", "float32", "float64") else "float32").tiny)


def robust_log(xp: Any, x: Any, c: float) -> Any:
    """log(x) for x >= c, log(c) + x/c − 1 below (the inner wheres keep the unpicked
    branches finite: the log's gradient on JAX and torch, and x/c, which overflows for
    x > 8 in float64)."""
    below = x < c
    return xp.where(below, math.log(c) + xp.where(below, x, 0.0) / c - 1,
                    xp.log(xp.where(below, 1.0, x)))


def robust_log_slope(x: np.ndarray, c: float) -> np.ndarray:
    """d robust_log / dx: 1/x for x >= c, 1/c below."""
    return 1 / np.maximum(x, c)


def _floored_log(xp: Any, x: Any) -> Any:
    """max(log x, −100) as torch's BCE; the gradient 0 below e^−100 (never 0 · inf)."""
    return xp.where(x > _FLOOR_ARG, xp.log(xp.where(x > _FLOOR_ARG, x, 1.0)), _LOG_FLOOR)


def _floored_log1m(xp: Any, p: Any) -> Any:
    """max(log(1 − p), −100) as torch's BCE, by log1p(−p) (exact for tiny p, as torch's)."""
    keep = 1 - p > _FLOOR_ARG
    log1p = xp.t.log1p if backend_of(xp) == "torch" else xp.log1p
    return xp.where(keep, log1p(-xp.where(keep, p, 0.0)), _LOG_FLOOR)


def _floored_log_slope(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(x > _FLOOR_ARG, 1 / np.where(x > _FLOOR_ARG, x, 1.0), 0.0)


class BinaryCrossEntropy(Operator):
    """Binary cross-entropy of ``input`` against a ``target`` in [0, 1] of the same shape, per
    element (then reduced by ``reduction``: "mean", the default as torch's, "sum" or "none",
    the published Mithril's only form):

    * ``input_type="logits"`` (default, as the published Mithril): with x the logit,
      (1 − t)·x + w·softplus(−x), w = (pos_weight − 1)·t + 1, as
      ``F.binary_cross_entropy_with_logits(x, t, pos_weight=pos_weight)``;
    * ``input_type="probs"``: −(pos_weight·t·log p + (1 − t)·log(1 − p)), as
      ``F.binary_cross_entropy`` (which has no pos_weight; 1 gives it). Each log is floored
      at −100 and log(1 − p) is log1p(−p), as torch's, so p = 0 or 1 gives a finite loss; the gradient is the exact
      −pos_weight·t/p + (1 − t)/(1 − p) (0 where a log is floored), as the published
      Mithril's (torch's backward divides by max(p·(1 − p), 1e−12) instead, which differs
      only where p·(1 − p) < 1e−12). With ``robust=True`` the logs are the robust log
      (module docstring) with cutoff ``cutoff``, not floored, as the published Mithril's.

    ``pos_weight`` is a positive number, or a 1-d sequence of them (a list, a NumPy array or
    a torch tensor, as torch's ``pos_weight``), one per class: broadcast over
    the last axis (its length that axis's, or 1), as torch's ``pos_weight`` tensor (the
    published "auto", a weight from the batch's labels, is not offered); ``robust`` changes nothing for logits (the log there is of a
    number >= 1). ``weight`` (torch's): a fixed array of finite numbers broadcast to the
    input's shape (a list, a NumPy array or a torch tensor) that multiplies each element's
    loss before the reduction; "mean" still divides by the number of elements, as torch's.
    Both ``input`` and ``target`` are differentiable."""

    inputs = ("input", "target")

    def __init__(self, input_type: str = "logits",
                 pos_weight: float | Sequence[float] | np.ndarray = 1.0, robust: bool = False,
                 cutoff: float | None = None, reduction: str = "mean",
                 weight: Sequence[float] | np.ndarray | None = None) -> None:
        if input_type not in ("logits", "probs"):
            raise ValueError("BinaryCrossEntropy: input_type must be 'logits' or 'probs', got "
                             f"{input_type!r}")
        if isinstance(pos_weight, str):
            raise ValueError("BinaryCrossEntropy: pos_weight must be a positive number (the "
                             f"published 'auto' is not offered), got {pos_weight!r}")
        self.pos_weight: float | np.ndarray
        if hasattr(pos_weight, "detach"):  # a torch tensor, as torch's pos_weight (no grad)
            pos_weight = pos_weight.detach().cpu().numpy()
        if isinstance(pos_weight, np.ndarray) and pos_weight.ndim == 0:  # one number
            pos_weight = pos_weight.item()
        if isinstance(pos_weight, (list, tuple, np.ndarray)):  # per class (the last axis)
            pw = np.asarray(pos_weight)
            if pw.ndim != 1 or not pw.size or pw.dtype.kind not in "iuf" \
                    or not (np.isfinite(pw) & (pw > 0)).all():
                raise ValueError("BinaryCrossEntropy: pos_weight must be a positive number or a "
                                 f"1-d sequence of them (one per class), got {pos_weight!r}")
            self.pos_weight = pw.astype(np.float64)
        else:
            self.pos_weight = check_number("BinaryCrossEntropy", "pos_weight", pos_weight,
                                           0.0, open_lo=True)
        if not isinstance(robust, (bool, np.bool_)):
            raise TypeError(f"BinaryCrossEntropy: robust must be a bool, got {robust!r}")
        self.input_type, self.robust = input_type, bool(robust)
        self.cutoff = None if cutoff is None else check_number(
            "BinaryCrossEntropy", "cutoff", cutoff, 0.0, open_lo=True)
        self.reduction = check_reduction("BinaryCrossEntropy", reduction)
        self.weight = None
        if weight is not None:
            if hasattr(weight, "detach"):  # a torch tensor, as torch's weight (no grad)
                weight = weight.detach().cpu().numpy()
            w = np.asarray(weight)
            if w.dtype.kind not in "iuf" or not np.isfinite(w).all():
                raise ValueError("BinaryCrossEntropy: weight must be an array of finite numbers "
                                 f"(broadcast to the input's shape), got {weight!r}")
            self.weight = w.astype(np.float64)

    def infer_shape(self, shapes):
        s = unify(shapes.get("input"), shapes.get("target"), "input", "target")
        w = self.weight
        if w is not None and s is not None and (w.ndim > len(s) or any(
                n not in (1, m) and m is not None for n, m in zip(w.shape[::-1], s[::-1]))):
            raise ShapeError(f"BinaryCrossEntropy: weight of shape {w.shape} does not broadcast "
                             f"to the input's shape {fmt(s)}")
        pw = self.pos_weight
        if isinstance(pw, np.ndarray) and pw.size != 1 and s is not None and (
                not len(s) or s[-1] not in (None, pw.size)):
            raise ShapeError(f"BinaryCrossEntropy: pos_weight has {pw.size} classes, the "
                             f"input's last axis must have as many, got shape {fmt(s)}")
        return s if self.reduction == "none" else ()

    def _weight(self, xp: Any, like: Any) -> Any:
        """pos_weight: the float, or the per-class array in ``like``'s backend and dtype."""
        w = self.pos_weight
        if not isinstance(w, np.ndarray):
            return w
        if backend_of(xp) == "torch":
            return like.new_tensor(w)
        return xp.asarray(w, dtype=like.dtype)

    def _unit(self) -> bool:
        return not isinstance(self.pos_weight, np.ndarray) and self.pos_weight == 1.0

    def _logs(self, xp: Any, p: Any) -> tuple[Any, Any]:
        if self.robust:
            c = self.cutoff or tiny(p.dtype)
            return robust_log(xp, p, c), robust_log(xp, 1 - p, c)
        return _floored_log(xp, p), _floored_log1m(xp, p)

    def _rescale(self, xp: Any, like: Any) -> Any:
        """``weight`` in ``like``'s backend and dtype (None: none)."""
        if self.weight is None:
            return None
        if backend_of(xp) == "torch":
            return like.new_tensor(self.weight)
        return xp.asarray(self.weight, dtype=like.dtype)

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        w, rescale = self._weight(xp, input), self._rescale(xp, input)
        if self.input_type == "logits":
            F = functional_of(xp)
            if F is not None:
                pw = None if self._unit() else input.new_tensor(self.pos_weight)
                return F.binary_cross_entropy_with_logits(input, target, reduction=self.reduction,
                                                          pos_weight=pw, weight=rescale)
            if backend_of(xp) == "jax":
                import jax

                sp = jax.nn.softplus(-input)
            else:
                sp = xp.logaddexp(0.0, -input)
            lw = 1.0 if self._unit() else (w - 1) * target + 1
            loss = (1 - target) * input + lw * sp
        else:
            lp, l1p = self._logs(xp, input)
            loss = -((target if self._unit() else w * target) * lp + (1 - target) * l1p)
        return reduce(xp, loss if rescale is None else loss * rescale, self.reduction)

    def vjp(self, g, out, args, wrt):
        x, t = args["input"], args["target"]
        w = self._weight(np, x)
        ge = elementwise_cotangent(g, x.shape, self.reduction)
        if self.weight is not None:
            ge = ge * self.weight.astype(x.dtype)
        res = {}
        if self.input_type == "logits":
            lw = (w - 1) * t + 1
            sig_neg = 1 / (1 + np.exp(np.minimum(x, 700.0)))  # σ(−x), no overflow
            if "input" in wrt:
                res["input"] = ge * ((1 - t) - lw * sig_neg)
            if "target" in wrt:
                res["target"] = ge * (-x + (w - 1) * np.logaddexp(0.0, -x))
            return res
        if self.robust:
            c = self.cutoff or tiny(x.dtype)
            dlp, dl1p = robust_log_slope(x, c), robust_log_slope(1 - x, c)
        else:
            dlp, dl1p = _floored_log_slope(x), _floored_log_slope(1 - x)
        if "input" in wrt:
            res["input"] = ge * (-(w * t) * dlp + (1 - t) * dl1p)
        if "target" in wrt:
            lp, l1p = self._logs(np, x)
            res["target"] = ge * (l1p - w * lp)
        return res

    def __repr__(self) -> str:
        pw = self.pos_weight
        extra = "" if self._unit() else \
            f", pos_weight={pw.tolist() if isinstance(pw, np.ndarray) else pw}"
        extra += "" if self.weight is None else f", weight={self.weight.tolist()}"
        extra += ", robust=True" if self.robust else ""
        extra += "" if self.cutoff is None else f", cutoff={self.cutoff}"
        return (f"BinaryCrossEntropy(input_type={self.input_type!r}{extra}, "
                f"reduction={self.reduction!r})")


class KLDivergence(Operator):
    """The Kullback-Leibler divergence terms of a distribution ``target`` (p) from a
    predicted one ``input`` (q), per element: p·(log p − log q), with both logs robust
    (module docstring; cutoff ``cutoff``, default the dtype's smallest normal number), as the
    published Mithril's ``KLDivergence``. Note the argument order: torch's
    ``F.kl_div(log q, p, reduction="none")`` takes the *log* of the prediction first; here
    ``input`` is the probability q itself. For p, q >= the cutoff the two agree; a target of
    0 gives 0 (torch's 0·log 0 = 0), a prediction of 0 a finite loss. ``reduction``: "none"
    (default, the published form), "mean" (over every element, torch's "mean"), "sum" or
    "batchmean" (torch's: the sum divided by the first axis's length, the true KL divergence
    per sample). ``log_target=True`` (torch's): ``target`` is log p, the terms
    e^t·(t − log q). Both inputs are differentiable: d/dq = −p/q, d/dp = log p + 1 − log q
    (above the cutoff)."""

    inputs = ("input", "target")

    def __init__(self, cutoff: float | None = None, reduction: str = "none",
                 log_target: bool = False) -> None:
        self.cutoff = None if cutoff is None else check_number(
            "KLDivergence", "cutoff", cutoff, 0.0, open_lo=True)
        if reduction not in (*REDUCTIONS, "batchmean"):  # torch's "batchmean" too
            raise ValueError(f"KLDivergence: reduction must be one of "
                             f"{(*REDUCTIONS, 'batchmean')}, got {reduction!r}")
        self.reduction = reduction
        if not isinstance(log_target, (bool, np.bool_)):
            raise TypeError(f"KLDivergence: log_target must be a bool, got {log_target!r}")
        self.log_target = bool(log_target)

    def infer_shape(self, shapes):
        s = unify(shapes.get("input"), shapes.get("target"), "input", "target")
        return s if self.reduction == "none" else ()

    @staticmethod
    def _batch(shape: tuple[int, ...]) -> int:
        """torch's "batchmean" divisor: the first axis's length (1 for a 0-d input)."""
        return shape[0] if len(shape) else 1

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        c = self.cutoff or tiny(input.dtype)
        if self.log_target:  # target = log p: p·(log p − log q) without a log of p
            loss = xp.exp(target) * (target - robust_log(xp, input, c))
        else:
            loss = target * (robust_log(xp, target, c) - robust_log(xp, input, c))
        if self.reduction == "batchmean":
            return reduce(xp, loss, "sum") / self._batch(input.shape)
        return reduce(xp, loss, self.reduction)

    def vjp(self, g, out, args, wrt):
        q, p = args["input"], args["target"]
        c = self.cutoff or tiny(q.dtype)
        if self.reduction == "batchmean":
            ge = np.broadcast_to(g / self._batch(q.shape), q.shape)
        else:
            ge = elementwise_cotangent(g, q.shape, self.reduction)
        res = {}
        if self.log_target:  # p = e^t: d/dq = −e^t/q, d/dt = e^t·(t − log q + 1)
            e = np.exp(p)
            if "input" in wrt:
                res["input"] = ge * (-e * robust_log_slope(q, c))
            if "target" in wrt:
                res["target"] = ge * (e * (p - robust_log(np, q, c) + 1))
            return res
        if "input" in wrt:
            res["input"] = ge * (-p * robust_log_slope(q, c))
        if "target" in wrt:
            res["target"] = ge * (robust_log(np, p, c) - robust_log(np, q, c)
                                  + p * robust_log_slope(p, c))
        return res

    def __repr__(self) -> str:
        extra = "" if self.cutoff is None else f"cutoff={self.cutoff}, "
        extra += "log_target=True, " if self.log_target else ""
        return f"KLDivergence({extra}reduction={self.reduction!r})"
