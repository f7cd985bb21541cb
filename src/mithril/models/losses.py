"""Losses. ``reduction`` is "mean" (default for the scalar losses), "sum" or "none"."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import DTypeError, InputValueError
from . import loss_kernels
from .cross_entropy_options import TorchOptions
from .half_precision import accumulate, float32_forward, float32_vjp
from .operator import (
    Operator,
    Shape,
    ShapeError,
    div_count,
    fmt,
    functional_of,
    pair_shape,
    stop_gradient,
    unbroadcast,
    unify,
)

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(r: str) -> str:
    if r not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {r!r}")
    return r


def _logits(shape: Shape, names: Mapping[str, str]) -> str:
    return f"the logits '{names['input']}' have shape {fmt(shape)}"


def _out_of_range(labels: Any, n: int) -> str | None:
    """What is wrong with class indices ``labels`` (a NumPy array, or a torch tensor) for
    ``n`` classes ("3 of 128 class indices out of range (e.g. 12): ..."), or None where all
    are in [0, n)."""
    size = math.prod(labels.shape)
    if not size or _below(labels, n):
        return None
    if hasattr(labels, "aminmax"):  # torch: one pass, one read back (a sync on CUDA)
        lo, hi = _torch_reducible(labels).aminmax()
        if labels.is_cuda:
            import torch

            lo, hi = torch.stack((lo, hi)).tolist()
        lo, hi = int(lo), int(hi)
    else:
        lo, hi = int(labels.min()), int(labels.max())  # two scalars, no array copy
    if lo >= 0 and hi < n:
        return None
    count = int(((labels < 0) | (labels >= n)).sum())
    hint = ("; -100 is torch's default ignore_index: CrossEntropy(ignore_index=-100) "
            "ignores those rows") if lo <= -100 and bool((labels == -100).any()) else ""
    return (f"{count} of {size} class indices out of range (e.g. "
            f"{hi if hi >= n else lo}): {n} classes, so labels must be in [0, {n - 1}]{hint}")


#: torch integer dtypes with a min/max reduction (not uint16/32/64: see _torch_reducible)
_TORCH_MINMAX = frozenset({"int64", "int32", "int16", "int8", "uint8"})


def _refuse(labels: np.ndarray, n: int) -> None:
    """The NumPy forward's own range check (see ``numpy_checked_inputs``)."""
    what = _out_of_range(labels, n)
    if what is not None:
        raise InputValueError(f"CrossEntropy: target: {what}")


def _torch_reducible(t: Any) -> Any:
    """A torch integer tensor ``t`` as one its min/max reductions take: torch implements
    none for uint16/32/64 (token ids stored as uint16, as nanoGPT's), so those are widened
    to int64."""
    import torch

    return t.to(torch.int64) if t.dtype in (torch.uint16, torch.uint32, torch.uint64) else t


def _below(labels: Any, n: int) -> bool:
    """Whether every class index in ``labels`` (a NumPy integer array) is in [0, n), by one
    reduction: seen as unsigned integers of their size, a negative one is >= 2^(bits-1), so
    all are below n exactly when they are in range. False for anything else (the caller
    then reads the min and the max)."""
    if type(labels) is not np.ndarray or labels.dtype.kind not in "iu":
        return False
    u = labels.view(labels.dtype.str.replace("i", "u"))
    return bool(np.maximum.reduce(u, axis=None) < n)


class SquaredError(Operator):
    """(input − target)², elementwise by default; ``reduction="mean"`` gives the MSE."""

    inputs = ("input", "target")

    def __init__(self, reduction: str = "none") -> None:
        self.reduction = _check_reduction(reduction)

    def infer_shape(self, shapes):
        s = pair_shape(shapes, type(self).__name__)
        return s if self.reduction == "none" else ()

    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        d = input - target
        sq = d * d
        if self.reduction == "none":
            return sq
        return accumulate(xp.mean if self.reduction == "mean" else xp.sum, sq)

    def vjp(self, g, out, args, wrt):
        d = args["input"] - args["target"]
        # an empty input's mean has an empty gradient: no 2/0 (a ZeroDivisionError)
        scale = 2.0 / max(d.size, 1) if self.reduction == "mean" else 2.0
        gi = (g * scale) * d  # (the broadcast shape: summed back to each input's)
        return {k: unbroadcast(gi if k == "input" else -gi, np.shape(args[k])) for k in wrt}


class MeanSquaredError(SquaredError):
    """mean((input − target)²) over every element."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction)


_INPUT_TYPES = ("logits", "probs", "log_probs")


def _move(xp: Any, a: Any, src: int, dst: int) -> Any:
    """``a`` with axis ``src`` moved to ``dst`` (NumPy / JAX ``moveaxis``, torch ``movedim``)."""
    torch = getattr(xp, "t", None) if functional_of(xp) is not None else None
    return torch.movedim(a, src, dst) if torch is not None else xp.moveaxis(a, src, dst)


class CrossEntropy(Operator):
    """Cross-entropy of ``input`` (..., C) against ``target``.

    ``input_type`` says what ``input`` holds: ``"logits"`` (default: a log-softmax is taken),
    ``"probs"`` (its log is taken) or ``"log_probs"`` (used as is). With ``"probs"``,
    ``robust=True`` continues the log linearly below ``cutoff`` (default: the smallest
    normal number of the input's dtype), log(c) + x/c − 1, so a probability of 0 gives a
    finite loss and gradient, as the published Mithril (``threshold=``, its name, is taken
    too). ``target`` is either integer class
    indices of shape (...) or one-hot / probability rows of shape (..., C) (told apart by
    dtype). Reduced over the leading dims by ``reduction``.

    ``axis`` is the class axis: the last by default (as optax and Keras, for (B, T, V)
    logits); ``axis=1`` is torch's ``F.cross_entropy`` and the published Mithril's, for
    (N, C, d1, ...) logits against (N, d1, ...) indices or (N, C, d1, ...) rows. It is moved
    last before the loss (and the gradient moved back), so one kernel serves every axis.

    torch's ``F.cross_entropy`` options, keyword-only, with torch's semantics on every
    backend and input type, every axis and reduction (see
    :mod:`~mithril.models.cross_entropy_options` for the formulas):

    * ``weight``: one weight per class, a constant array (C,) (a length other than C is a
      ``ShapeError`` naming ``weight`` at compile time). Against class indices a row's loss
      is scaled by ``weight[target]`` and ``"mean"`` divides by the sum of those; against
      probability rows each class's term is scaled and ``"mean"`` divides by the number of
      rows (torch's rule: no weight in the divisor).
    * ``ignore_index``: an int; rows whose class index equals it have loss 0 and gradient 0,
      and ``"mean"`` averages over the others only (weighted: divided by their weights' sum),
      so a batch with every row ignored has a NaN mean, as torch. The default None ignores
      nothing: a label -100 (torch's default ``ignore_index``) is then an out-of-range error
      that says to pass ``ignore_index=-100``. Against probability rows only a negative one
      is taken (it matches nothing), as torch.
    * ``label_smoothing``: ε in [0, 1]; the target becomes ``(1 − ε)·target + ε/C`` (with
      ``weight``, the uniform part of a class-index target is weighed by every class's own
      weight, as torch).

    At their defaults (None, None, 0.0) the loss runs the fast paths it had.
    """

    inputs = ("input", "target")
    any_dtype_inputs = frozenset({"target"})
    #: the compiler passes these (when they are model inputs) to check_inputs; the NumPy
    #: forward checks the class indices itself (its compiled pass reads them anyway)
    value_checked_inputs = numpy_checked_inputs = frozenset({"target"})

    def __init__(self, reduction: str = "mean", input_type: str = "logits", robust: bool = False,
                 cutoff: float | None = None, axis: int = -1, *, weight: Any = None,
                 ignore_index: int | None = None, label_smoothing: float = 0.0,
                 threshold: float | None = None) -> None:
        if threshold is not None:  # (the published Mithril's name of cutoff)
            if cutoff is not None:
                raise TypeError("CrossEntropy: threshold is the published name of cutoff: "
                                "pass one of them")
            cutoff = threshold
        self.reduction = _check_reduction(reduction)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"CrossEntropy: axis must be an int, got {axis!r}")
        self.axis = int(axis)
        if input_type not in _INPUT_TYPES:
            raise ValueError(f"CrossEntropy: input_type must be one of {_INPUT_TYPES}, got {input_type!r}")
        self.input_type, self.robust = input_type, bool(robust)
        self.cutoff = None if cutoff is None else float(cutoff)
        #: torch's options (None at their defaults: the fast paths)
        self._options = TorchOptions.of(weight, ignore_index, label_smoothing)

    @property
    def weight(self) -> np.ndarray | None:
        """The class weights (a read-only float64 array (C,)), or None."""
        return None if self._options is None else self._options.weight

    @property
    def ignore_index(self) -> int | None:
        """The class-index value whose rows are ignored, or None."""
        return None if self._options is None else self._options.ignore_index

    @property
    def label_smoothing(self) -> float:
        """The label smoothing ε in [0, 1]."""
        return 0.0 if self._options is None else self._options.label_smoothing

    def _class_axis(self, rank: int) -> int:
        """The class axis of logits of rank ``rank``, as a non-negative int."""
        if not -rank <= self.axis < rank:
            raise ShapeError(f"CrossEntropy: axis {self.axis} is out of range for logits of rank {rank}")
        return self.axis % rank

    def _last(self, s: Shape) -> Shape:
        """Shape ``s`` of the logits with the class axis moved last."""
        ax = self._class_axis(len(s))
        return (*s[:ax], *s[ax + 1:], s[ax])

    def _moved(self, xp: Any, input: Any, target: Any) -> tuple[int | None, Any, Any]:
        """The class axis (None: already last) and the logits and target with it last (the
        target only when it holds rows of the logits' shape)."""
        ax = self._class_axis(input.ndim)
        if ax == input.ndim - 1:
            return None, input, target
        if target.ndim == input.ndim:
            target = _move(xp, target, ax, -1)
        return ax, _move(xp, input, ax, -1), target

    @property
    def half_in_float32(self) -> bool:
        """Whether float16 / bfloat16 logits are computed in float32 (``half_precision``):
        all but robust probabilities with the default cutoff, which is their own dtype's."""
        return not (self.robust and self.input_type == "probs" and self.cutoff is None)

    def _cutoff(self, dtype: Any) -> float:
        if self.cutoff is not None:
            return self.cutoff
        name = str(dtype).rsplit(".", 1)[-1]
        return float(np.finfo(name if name in ("float16", "float32", "float64") else "float32").tiny)

    def _log_probs(self, xp: Any, x: Any) -> Any:
        if self.input_type == "log_probs":
            return x
        if self.input_type == "probs":
            if not self.robust:
                return xp.log(x)
            c = self._cutoff(x.dtype)
            return xp.where(x < c, math.log(c) + x / c - 1, xp.log(xp.maximum(x, c)))
        m = stop_gradient(xp, xp.max(x, axis=-1, keepdims=True))  # a shift: no gradient
        return x - (m + xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True)))

    def check_inputs(self, shapes: Mapping[str, Shape | None], dtypes: Mapping[str, str],
                     arrays: Mapping[str, np.ndarray], names: Mapping[str, str]) -> None:
        """The rules that need the concrete target (called by ``evaluate`` before the backend
        runs): class indices are an integer array shaped like the logits without their class
        axis, each in ``[0, C)``; float targets are one-hot / probability rows shaped like the
        logits. Raises ``DTypeError``, ``ShapeError`` or ``ValueError`` naming the data key."""
        s, t, dt = shapes.get("input"), shapes.get("target"), dtypes.get("target")
        if s is None or t is None or dt is None or not s:
            return
        key = names["target"]
        rows = self._last(s)[:-1]  # the logits without their class axis
        n = s[self._class_axis(len(s))]
        if "int" in dt:
            if tuple(t) != tuple(rows):
                raise ShapeError(f"input '{key}': integer class indices must have shape "
                                 f"{fmt(rows)} (one per row of logits; {_logits(s, names)}), "
                                 f"got {fmt(t)}")
            labels = arrays.get("target")
            if labels is not None and self._options is not None:
                keep = self._options.valid(labels)  # (the ignored rows hold any value)
                labels = labels if keep is None else labels[keep]
            what = None if labels is None else _out_of_range(labels, n)
            if what is not None:
                raise ValueError(f"input '{key}': {what} ({_logits(s, names)})")
        elif "float" in dt or dt == "bool":
            if len(t) == len(s) - 1:
                raise DTypeError(f"input '{key}': class indices must have an integer dtype, got "
                                 f"{dt} (a float or bool target holds one-hot / probability rows of "
                                 f"shape {fmt(s)}; {_logits(s, names)})")
            if tuple(t) != tuple(s):
                raise ShapeError(f"input '{key}': one-hot / probability targets must have shape "
                                 f"{fmt(s)} ({_logits(s, names)}), got {fmt(t)}")
            if self._options is not None:
                self._options.check_rows(t)
        else:
            raise DTypeError(f"input '{key}': expected integer class indices or float one-hot / "
                             f"probability rows, got dtype {dt}")

    def steady_check(self, shapes: Mapping[str, Shape | None], dtypes: Mapping[str, str],
                     names: Mapping[str, str]) -> Any:
        """:meth:`check_inputs`'s value check for inputs of these shapes and dtypes, which
        passed it before (a training loop's steady state, :mod:`mithril.compiler.steady`):
        ``check(arrays)``, raising what :meth:`check_inputs` raises; None where there is
        nothing to read (empty or one-hot targets). The rest of the rule is a function of the
        shapes and dtypes: done once."""
        s, dt = shapes.get("input"), dtypes.get("target")
        full = self.check_inputs
        if self._options is not None or s is None or not s or dt is None or "int" not in dt:
            return lambda arrays: full(shapes, dtypes, arrays, names)
        n = s[self._class_axis(len(s))]
        if 0 in s or not n:
            return lambda arrays: full(shapes, dtypes, arrays, names)

        def check(arrays: Mapping[str, Any]) -> None:
            labels = arrays.get("target")
            if labels is None:
                return
            if type(labels) is not np.ndarray and dt in _TORCH_MINMAX and not labels.is_cuda:
                lo, hi = labels.aminmax()  # (one pass, two reads)
                if int(lo) >= 0 and int(hi) < n:
                    return
            elif _out_of_range(labels, n) is None:
                return
            full(shapes, dtypes, arrays, names)  # (a label out of range: raises, naming it)

        return check

    def infer_shape(self, shapes):
        s, t = shapes.get("input"), shapes.get("target")
        if s is not None and not s:
            raise ShapeError("CrossEntropy: the logits 'input' need a class axis, got shape ()")
        if s is None:
            return None
        rows = self._last(s)[:-1]  # one loss per row: the logits without their class axis
        if self._options is not None:
            ax = self._class_axis(len(s))
            self._options.check_classes(s[ax], f"the logits {fmt(s)} (class axis {ax})")
        if t is not None:
            if len(t) == len(s):
                if self._options is not None:
                    self._options.check_rows(t)
                rows = self._last(unify(s, t, "input", "target"))[:-1]
            elif len(t) == len(s) - 1:
                rows = unify(rows, t, "input (without its class axis)", "target")
            else:
                raise ShapeError(f"'target' shape {fmt(t)} fits neither 'input' {fmt(s)} "
                                 f"(one-hot) nor {fmt(rows)} (class indices)")
        return () if self.reduction != "none" else rows

    @staticmethod
    def _is_index(xp: Any, target: Any) -> bool:
        """Whether ``target`` holds integer class indices (NumPy / JAX dtypes by their kind,
        torch's by its flags: no string formatting on the hot path)."""
        dt = target.dtype
        kind = getattr(dt, "kind", None)
        if kind is not None:
            return kind in "iu"
        if dt.is_floating_point or dt.is_complex:
            return False
        return dt.itemsize > 1 or "int" in str(dt)  # of the 1-byte ones int8/uint8, not bool

    # (on torch too with options: F.cross_entropy's float16 label smoothing sums -logp over
    # the classes into inf past 65504; torch.autocast runs cross_entropy in float32)
    @float32_forward(on_torch=lambda op: op._options is not None)
    def forward(self, xp: Any, input: Any, target: Any) -> Any:
        _, input, target = self._moved(xp, input, target)
        if self._options is not None:
            return self._options.forward(self, xp, input, target)
        return self._forward_last(xp, input, target)

    @float32_forward
    def forward_residuals(self, xp: Any, input: Any, target: Any) -> tuple[Any, Any]:
        """:meth:`_forward_residuals_last` with the class axis moved last."""
        _, input, target = self._moved(xp, input, target)
        if self._options is not None:
            return self._options.numpy_forward(self, input, target) if xp is np else (
                self._options.forward(self, xp, input, target), None)
        return self._forward_residuals_last(xp, input, target)

    @float32_vjp
    def vjp(self, g, out, args, wrt, residuals=None):
        """:meth:`_vjp_last` of the logits and target with the class axis moved last; the
        gradients moved back (a loss per row keeps the rows' order, so ``g`` is as is)."""
        ax, x, t = self._moved(np, args["input"], args["target"])
        grads = self._vjp_last(g, out, {"input": x, "target": t}, wrt, residuals) \
            if self._options is None else self._options.numpy_vjp(self, g, x, t, wrt, residuals)
        if ax is None:
            return grads
        return {k: np.moveaxis(v, -1, ax) if np.ndim(v) == x.ndim else v for k, v in grads.items()}

    def _forward_last(self, xp: Any, input: Any, target: Any) -> Any:
        F = functional_of(xp)
        if F is not None and self.input_type == "logits" and self._is_index(xp, target):
            # one fused log-softmax + NLL each way; rows flattened, as F.cross_entropy wants
            # (only where they are not: a reshape is a node of autograd's graph, ~40 us of a
            # small MLP's backward on CPU)
            t = target if target.ndim == 1 else target.reshape(-1)
            x = input if input.ndim == 2 else input.reshape(-1, input.shape[-1])
            nll = F.cross_entropy(x, t if t.dtype == xp.t.int64 else t.long(),
                                  reduction=self.reduction)
            return (nll.reshape(target.shape) if self.reduction == "none" and t is not target
                    else nll)
        if (xp is np and self.input_type == "logits" and input.shape[-1]
                and self._is_index(xp, target)):
            return self._forward_residuals_last(xp, input, target)[0]  # the same arithmetic
        return self._forward(xp, input, target)

    def _forward(self, xp: Any, input: Any, target: Any) -> Any:
        if xp is np and self._is_index(xp, target):
            _refuse(target, input.shape[-1])
        logp = self._log_probs(xp, input)
        if self._is_index(xp, target):
            nll = -xp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        else:
            nll = -xp.sum(target * logp, axis=-1)
        if self.reduction == "none":
            return nll
        return xp.mean(nll) if self.reduction == "mean" else xp.sum(nll)

    def _forward_residuals_last(self, xp: Any, input: Any, target: Any) -> tuple[Any, Any]:
        """NumPy: the loss and, for logits against class indices, the softmax rows (N, C)
        its VJP turns into ``g·(softmax − onehot)`` in place: one exp, not two. The loss is
        the same arithmetic as :meth:`forward` on the picked entries only."""
        if self.input_type != "logits" or not input.shape[-1] or not self._is_index(np, target):
            return self._forward(xp, input, target), None
        x = input.reshape(-1, input.shape[-1])
        t = target.reshape(-1)
        if loss_kernels.usable(x, t):  # one compiled pass, the indices checked first
            got = loss_kernels.softmax_nll(np.ascontiguousarray(x), t)
            if got is not None:
                nll, total, e = got
                if self.reduction == "none":
                    return nll.reshape(target.shape), e
                return x.dtype.type(total / len(x) if self.reduction == "mean" else total), e
        _refuse(t, x.shape[-1])  # (what the compiled pass refused, or NumPy's path)
        m = x.max(axis=-1, keepdims=True)
        e = np.exp(np.subtract(x, m), out=np.empty_like(x))
        s = e.sum(axis=-1, keepdims=True)
        nll = (m[:, 0] + np.log(s[:, 0])) - x[np.arange(len(x)), target.reshape(-1)]
        e /= s
        if self.reduction == "none":
            return nll.reshape(target.shape), e
        return (np.mean(nll) if self.reduction == "mean" else np.sum(nll)), e

    def _vjp_last(self, g, out, args, wrt, residuals=None):
        x, t = args["input"], args["target"]
        n = x.size // x.shape[-1]
        gt = g[..., None] if self.reduction == "none" else (div_count(g, n) if self.reduction == "mean" else g)
        if residuals is not None:  # softmax rows of logits against class indices
            gt = np.asarray(gt, dtype=residuals.dtype).reshape(-1, 1) if self.reduction == "none" \
                else residuals.dtype.type(gt)
            ti = t.reshape(-1)
            if loss_kernels.usable(residuals, ti):  # (indices checked by the forward)
                cot = gt.reshape(-1) if self.reduction == "none" else np.full(1, gt)
                return {"input": loss_kernels.softmax_nll_vjp(residuals, ti, cot).reshape(x.shape)}
            grad = np.multiply(residuals, gt, out=residuals)
            grad[np.arange(n), ti] -= gt[:, 0] if self.reduction == "none" else gt
            return {"input": grad.reshape(x.shape)}
        if self._is_index(np, t):
            dlogp = np.zeros_like(x)
            np.put_along_axis(dlogp, t[..., None], 1.0, axis=-1)
        else:
            dlogp = t.astype(x.dtype, copy=False)
        dlogp = -dlogp * gt  # d loss / d log-probabilities
        if self.input_type == "logits":
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            grad = dlogp - e / e.sum(axis=-1, keepdims=True) * dlogp.sum(axis=-1, keepdims=True)
        elif self.input_type == "probs":
            den = np.maximum(x, self._cutoff(x.dtype)) if self.robust else x
            with np.errstate(divide="ignore", invalid="ignore"):
                grad = dlogp / den
        else:
            grad = dlogp
        res = {"input": grad}
        if "target" in wrt and not self._is_index(np, t):
            res["target"] = -self._log_probs(np, x) * gt
        return {k: v for k, v in res.items() if k in wrt}

    def __repr__(self) -> str:
        extra = "" if self.input_type == "logits" else f", input_type={self.input_type!r}"
        extra += "" if self.axis == -1 else f", axis={self.axis}"
        extra += "" if self._options is None else f", {self._options!r}"
        return f"CrossEntropy(reduction={self.reduction!r}{extra})"


from .robust_losses import HuberLoss, SmoothL1Loss  # noqa: E402, F401  (the losses' module path)
