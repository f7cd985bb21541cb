"""torch's ``F.cross_entropy`` options of :class:`~mithril.models.CrossEntropy`: class
``weight``, ``ignore_index`` and ``label_smoothing``.

A CrossEntropy with all three at their defaults never reaches this module: its fast paths
(NumPy's compiled loops, torch's fused kernel) are the ones it had. With any of them set,
the loss is torch's (``cross_entropy_loss_label_smoothing`` and
``cross_entropy_loss_prob_target`` of ATen's ``LossNLL.cpp``), written on the
log-probabilities ``logp`` (..., C), the class axis last, with ``ε`` the smoothing and
``w`` the weights (ones without):

* class-index targets ``t``: per row ``(1 − ε)·w[t]·(−logp[t]) + ε/C·Σ_c w_c·(−logp_c)``
  (the smoothing term weighs every class by its own weight, not the target's), 0 loss and 0
  gradient where ``t == ignore_index``; ``"mean"`` divides the sum by ``Σ w[t]`` over the
  rows not ignored (by their count without weights), so a batch whose every row is ignored
  has a NaN mean (0/0, as torch) and a zero gradient;
* probability rows ``q``: per row ``−Σ_c w_c·((1 − ε)·q_c + ε/C)·logp_c``; ``"mean"``
  divides by the number of rows: the weights do not enter the divisor (torch's rule), and
  ``ignore_index`` does not apply (torch refuses one >= 0 with them, and so does this).

On torch, logits go to ``F.cross_entropy`` itself with the options; NumPy has its own
forward and VJP (:meth:`TorchOptions.numpy_forward`, :meth:`TorchOptions.numpy_vjp`); JAX
(and torch with ``input_type`` "probs" / "log_probs") differentiates
:meth:`TorchOptions.forward`. With "probs" / "log_probs" the options act on the
log-probabilities the same way (for ``weight`` and ``ignore_index``, torch's
``F.nll_loss``).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ..errors import InputValueError, ShapeError
from .operator import backend_of, div_count, fmt, functional_of

#: torch's ignore_index when none is set: no class index (checked to be in [0, C)) equals it
_NO_INDEX = -(2**63)


def _iinfo(dtype: Any) -> Any:
    """The integer range of a NumPy / JAX dtype or a torch one."""
    if isinstance(dtype, np.dtype):
        return np.iinfo(dtype)
    import torch

    return torch.iinfo(dtype)


class TorchOptions:
    """The validated ``weight`` (a float64 NumPy array (C,) or None), ``ignore_index`` (int or
    None) and ``label_smoothing`` (float in [0, 1]) of a CrossEntropy, and its loss with them.
    :meth:`of` gives None for the defaults."""

    __slots__ = ("weight", "ignore_index", "label_smoothing", "_weights")

    def __init__(self, weight: np.ndarray | None, ignore_index: int | None,
                 label_smoothing: float) -> None:
        self.weight, self.ignore_index, self.label_smoothing = weight, ignore_index, label_smoothing
        self._weights: dict[tuple, Any] = {}  # the weights per (backend, dtype, device)

    @classmethod
    def of(cls, weight: Any = None, ignore_index: Any = None,
           label_smoothing: Any = 0.0) -> TorchOptions | None:
        """The options, validated (``TypeError`` / ``ValueError`` naming the argument); None
        when all are at their defaults."""
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
            raise TypeError(f"CrossEntropy: label_smoothing must be a float in [0, 1], got "
                            f"{label_smoothing!r}")
        eps = float(label_smoothing)
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"CrossEntropy: label_smoothing must be in [0, 1] (torch's range), "
                             f"got {label_smoothing!r}")
        if ignore_index is not None and (isinstance(ignore_index, bool) or
                                         not isinstance(ignore_index, (int, np.integer))):
            raise TypeError(f"CrossEntropy: ignore_index must be an int (the class-index value "
                            f"whose rows are ignored, torch's default -100) or None, got "
                            f"{ignore_index!r}")
        ii = None if ignore_index is None else int(ignore_index)
        w = None if weight is None else _weights(weight)
        if w is None and ii is None and eps == 0.0:
            return None
        return cls(w, ii, eps)

    # -- checks -------------------------------------------------------------------------

    def check_classes(self, n: int | None, what: str = "the input") -> None:
        """A ``ShapeError`` naming ``weight`` where it has not one entry per class."""
        if self.weight is not None and n is not None and len(self.weight) != n:
            raise ShapeError(f"CrossEntropy: weight has {len(self.weight)} entries but {what} "
                             f"has {n} classes: give one weight per class")

    def check_rows(self, target_shape: Any = None) -> None:
        """A ``ValueError`` naming ``ignore_index`` for probability-row targets where it is
        >= 0 (torch: "ignore_index is not supported for floating point target"; a negative one,
        as torch's default -100, is no class and is let through, as torch does)."""
        if self.ignore_index is not None and self.ignore_index >= 0:
            shape = "" if target_shape is None else f" (shape {fmt(tuple(target_shape))})"
            raise ShapeError(f"CrossEntropy: ignore_index={self.ignore_index} applies to "
                             f"class-index targets; the target{shape} holds one-hot / "
                             "probability rows, whose loss torch does not take an ignore_index "
                             "for either")

    def valid(self, t: Any) -> Any:
        """The rows of class indices ``t`` not ignored (a bool array), or None: no
        ``ignore_index``, or one the dtype of ``t`` cannot hold (torch and JAX would wrap it:
        -100 equals 156 as uint8)."""
        ii = self.ignore_index
        if ii is None:
            return None
        info = _iinfo(t.dtype)
        return t != ii if info.min <= ii <= info.max else None

    # -- the loss on any backend ---------------------------------------------------------

    def weight_like(self, xp: Any, like: Any) -> Any:
        """The weights as an array of ``like``'s backend, dtype (and device), made once."""
        kind = backend_of(xp)
        key = (kind, str(like.dtype), str(like.device) if kind == "torch" else "")
        w = self._weights.get(key)
        if w is None:
            if kind == "torch":
                w = xp.t.as_tensor(self.weight.copy(), dtype=like.dtype, device=like.device)
            else:  # NumPy, or a constant under jax.jit
                w = self.weight.astype(like.dtype)
            self._weights[key] = w
        return w

    def forward(self, op: Any, xp: Any, x: Any, target: Any) -> Any:
        """The loss of ``x`` (..., C) (class axis last) against ``target`` on any backend."""
        n = x.shape[-1]
        self.check_classes(n)
        index = op._is_index(xp, target)
        if not index:
            self.check_rows(target.shape)
        if xp is np:
            return self.numpy_forward(op, x, target)[0]
        F = functional_of(xp)
        if F is not None and op.input_type == "logits":
            return self._torch(F, xp, op.reduction, x, target, index)
        logp = op._log_probs(xp, x)
        w = None if self.weight is None else self.weight_like(xp, logp)
        eps = self.label_smoothing
        if not index:
            rows = -xp.sum(_q_rows(target, w, n, eps) * logp, axis=-1)
            return _reduce(xp, op.reduction, rows)
        t = target.long() if backend_of(xp) == "torch" else target
        valid = self.valid(t)
        ts = t if valid is None else xp.where(valid, t, 0)
        nll = -xp.take_along_axis(logp, ts[..., None], axis=-1)[..., 0]
        wt = None if w is None else (w[ts] if backend_of(xp) == "torch" else xp.take(w, ts))
        if wt is not None:
            nll = nll * wt
        smooth = -xp.sum(logp if w is None else logp * w, axis=-1) if eps else None
        if valid is not None:  # (a where, not a product: an inf 1/0 cotangent stays off them)
            nll = xp.where(valid, nll, 0)
            smooth = None if smooth is None else xp.where(valid, smooth, 0)
        if op.reduction != "mean":
            return _reduce(xp, op.reduction, nll if smooth is None else
                           (1 - eps) * nll + (eps / n) * smooth)
        if valid is None and wt is None:
            return _mixed(xp.mean(nll), None if smooth is None else xp.mean(smooth), eps, n)
        den = xp.sum(valid) if wt is None else xp.sum(wt if valid is None else xp.where(valid, wt, 0))
        return _mixed(xp.sum(nll) / den, None if smooth is None else xp.sum(smooth) / den, eps, n)

    def _torch(self, F: Any, xp: Any, reduction: str, x: Any, target: Any, index: bool) -> Any:
        """torch's own ``F.cross_entropy`` with the options, rows flattened."""
        n = x.shape[-1]
        x2 = x.reshape(-1, n)
        w = None if self.weight is None else self.weight_like(xp, x)
        eps = self.label_smoothing
        if index:
            t = target.reshape(-1)
            t = t if t.dtype == xp.t.int64 else t.long()
            ii = self.ignore_index
            ii = ii if ii is not None and _NO_INDEX <= ii < 2**63 else _NO_INDEX
            out = F.cross_entropy(x2, t, weight=w, ignore_index=ii, reduction=reduction,
                                  label_smoothing=eps)
            return out.reshape(target.shape) if reduction == "none" else out
        out = F.cross_entropy(x2, target.reshape(-1, n), weight=w, reduction=reduction,
                              label_smoothing=eps)
        return out.reshape(target.shape[:-1]) if reduction == "none" else out

    # -- NumPy ---------------------------------------------------------------------------

    def _index_parts(self, t: np.ndarray, n: int) -> tuple[Any, np.ndarray]:
        """The rows not ignored (or None) and the class indices with ignored ones set to 0;
        an ``InputValueError`` for an index out of [0, C) that is not ignored."""
        from .losses import _out_of_range

        valid = self.valid(t)
        what = _out_of_range(t if valid is None else t[valid], n)
        if what is not None:
            raise InputValueError(f"CrossEntropy: target: {what}")
        return valid, (t if valid is None else np.where(valid, t, 0))

    def _den(self, valid: Any, wt: Any, rows: int, dtype: Any) -> Any:
        """The divisor of a "mean": Σ w[t] over the rows not ignored, their count, or all."""
        if wt is not None:
            return wt.sum() if valid is None else wt.sum(where=valid)
        return dtype.type(rows if valid is None else np.count_nonzero(valid))

    def numpy_forward(self, op: Any, x: np.ndarray, target: np.ndarray) -> tuple[Any, Any]:
        """NumPy: the loss of ``x`` (..., C) (class axis last) and what :meth:`numpy_vjp`
        reuses (the softmax rows (N, C) of logits; None for the other input types)."""
        n = x.shape[-1]
        self.check_classes(n)
        index = op._is_index(np, target)
        x2 = x.reshape(-1, n)
        valid = ts = None
        if index:  # indices first: nothing computed for a bad one
            valid, ts = self._index_parts(target.reshape(-1), n)
        else:
            self.check_rows(target.shape)
        p = None
        if op.input_type == "logits" and x2.size:
            z = x2 - x2.max(axis=-1, keepdims=True)
            p = np.exp(z)
            s = p.sum(axis=-1, keepdims=True)
            logp = z - np.log(s)
            p /= s
        else:
            logp = op._log_probs(np, x2)
        w = None if self.weight is None else self.weight_like(np, x)
        eps = self.label_smoothing
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0: torch's NaN, silently
            if not index:
                rows = -(_q_rows(target.reshape(-1, n), w, n, eps) * logp).sum(axis=-1)
                if op.reduction == "none":
                    return rows.reshape(target.shape[:-1]), p
                total = rows.sum()
                return (total if op.reduction == "sum" else total / x.dtype.type(len(rows))), p
            nll = -logp[np.arange(len(ts)), ts]
            wt = None if w is None else w[ts]
            if wt is not None:
                nll *= wt
            smooth = -(logp.sum(axis=-1) if w is None else logp @ w) if eps else None
            if valid is not None:
                nll[~valid] = 0
                if smooth is not None:
                    smooth[~valid] = 0
            if op.reduction != "mean":
                rows = nll if smooth is None else (1 - eps) * nll + (eps / n) * smooth
                return (rows.reshape(target.shape) if op.reduction == "none" else rows.sum()), p
            den = self._den(valid, wt, len(nll), x.dtype)
            return x.dtype.type(_mixed(nll.sum() / den, None if smooth is None else
                                       smooth.sum() / den, eps, n)), p

    def numpy_vjp(self, op: Any, g: Any, x: np.ndarray, target: np.ndarray, wrt: Any,
                  p: Any = None) -> dict[str, np.ndarray]:
        """The NumPy VJP of :meth:`numpy_forward` (class axis last); ``p`` its softmax rows
        (None: recomputed)."""
        n = x.shape[-1]
        x2 = x.reshape(-1, n)
        rows, dt = len(x2), x.dtype
        index = op._is_index(np, target)
        w = None if self.weight is None else self.weight_like(np, x)
        eps = self.label_smoothing
        g = np.asarray(g, dtype=dt)
        with np.errstate(divide="ignore", invalid="ignore"):  # an all-ignored mean: 1/0
            if index:
                valid, ts = self._index_parts(target.reshape(-1), n)
                wt = None if w is None else w[ts]
                if op.reduction == "none":
                    a = g.reshape(-1)
                elif op.reduction == "sum":
                    a = np.broadcast_to(g, (rows,))
                elif valid is None and wt is None:
                    a = np.broadcast_to(div_count(g, rows), (rows,))
                else:
                    a = np.broadcast_to(g / self._den(valid, wt, rows, dt), (rows,))
                if valid is not None:  # 0, not 0·inf, where a row is ignored
                    a = np.where(valid, a, dt.type(0))
                if eps:
                    dlogp = np.multiply.outer(a, (-eps / n) * (np.ones(n, dt) if w is None else w))
                else:
                    dlogp = np.zeros((rows, n), dt)
                picked = a * (1 - eps) if wt is None else a * ((1 - eps) * wt)
                dlogp[np.arange(rows), ts] -= picked
            else:
                q = _q_rows(target.reshape(-1, n), w, n, eps)
                a = (g.reshape(-1, 1) if op.reduction == "none" else
                     g if op.reduction == "sum" else div_count(g, rows))
                dlogp = -(q * a)
            if op.input_type == "logits":
                if p is None and x2.size:
                    e = np.exp(x2 - x2.max(axis=-1, keepdims=True))
                    p = e / e.sum(axis=-1, keepdims=True)
                grad = dlogp - (p if p is not None else 0) * dlogp.sum(axis=-1, keepdims=True)
            elif op.input_type == "probs":
                den = np.maximum(x2, op._cutoff(dt)) if op.robust else x2
                grad = dlogp / den
            else:
                grad = dlogp
            res = {"input": grad.reshape(x.shape)}
            if "target" in wrt and not index:  # d loss / d q_c = -(1 - ε)·w_c·logp_c·a
                logp = op._log_probs(np, x2)
                scale = (1 - eps) if w is None else (1 - eps) * w
                res["target"] = (-(logp * scale) * a).reshape(target.shape)
        return {k: v for k, v in res.items() if k in wrt}

    def __repr__(self) -> str:
        parts = []
        if self.weight is not None:
            parts.append("weight=" + np.array2string(self.weight, separator=", ", threshold=8,
                                                     edgeitems=3))
        if self.ignore_index is not None:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing!r}")
        return ", ".join(parts)


def _q_rows(t: Any, w: Any, n: int, eps: float) -> Any:
    """The targets each log-probability is weighed by: ``w·((1 − ε)·t + ε/C)``."""
    q = t * (1 - eps) + eps / n if eps else t
    return q if w is None else q * w


def _mixed(nll: Any, smooth: Any, eps: float, n: int) -> Any:
    """torch's mean of a smoothed loss: ``(1 − ε)·mean(nll) + ε/C·mean(smooth)`` (each a
    quotient by the same divisor: a divisor 0 gives NaN, not ±inf, as torch)."""
    return nll if smooth is None else (1 - eps) * nll + (eps / n) * smooth


def _reduce(xp: Any, reduction: str, rows: Any) -> Any:
    if reduction == "none":
        return rows
    return xp.sum(rows) if reduction == "sum" else xp.mean(rows)


def _weights(weight: Any) -> np.ndarray:
    """``weight`` as a read-only float64 array (C,) of finite numbers (negative ones are
    taken, as torch takes them): a ``TypeError`` / ``ValueError`` naming ``weight`` for
    anything else."""
    if hasattr(weight, "detach"):  # a torch tensor (on any device)
        weight = weight.detach().cpu().numpy()
    try:
        a = np.asarray(weight)
    except Exception as e:  # whatever the array-like raised
        raise TypeError(f"CrossEntropy: weight must be a 1-D array of one float per class, "
                        f"got {type(weight).__name__}: {e}") from None
    if a.dtype.kind not in "iuf":
        raise TypeError(f"CrossEntropy: weight must be a 1-D array of one float per class, got "
                        f"dtype {a.dtype}")
    if a.ndim != 1 or not a.size:
        raise ValueError(f"CrossEntropy: weight must be a 1-D array of one float per class, got "
                         f"shape {fmt(a.shape)}")
    a = np.array(a, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:  # (torch takes it, and every loss is NaN: a number no one wants, silently)
        raise ValueError(f"CrossEntropy: weight must be finite, got {a[bad[0]]} for class "
                         f"{bad[0]} ({bad.size} of {a.size} not finite)")
    a.flags.writeable = False
    return a
