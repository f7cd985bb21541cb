"""Normalisation: ``GroupNorm``, ``InstanceNorm1D`` / ``2D`` / ``3D`` (in :mod:`.instance_norm`)
and ``BatchNorm1D`` / ``BatchNorm2D`` / ``BatchNorm3D`` over channels-first
inputs, as ``torch.nn.GroupNorm`` / ``BatchNorm1d`` / ``2d`` / ``3d``, and ``RMSNorm`` over
trailing axes, as ``torch.nn.RMSNorm``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .half_precision import float32_forward, float32_vjp, narrow, widen
from .operator import Operator, ShapeError, backend_of, fmt


def check_eps(eps: Any, who: str) -> None:
    """A normalisation's eps: a finite number >= 0 (not a bool), else a ``ValueError``. An
    int >= 2 is refused too: it is torch's first argument (``LayerNorm(16)``'s
    normalized_shape, ``GroupNorm(2, 6)``'s num_channels) landing on our eps."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) \
            or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{who}: eps must be a finite float >= 0, got {eps!r}")
    if isinstance(eps, (int, np.integer)) and eps >= 2:
        raise ValueError(f"{who}: eps={eps} is an int >= 2, which looks like torch's "
                         f"normalized_shape / num_channels / num_features: ours are read from "
                         f"the input's shape (pass eps by name, as a float, if {eps} is meant)")


def _group_mean(xp: Any, x: Any) -> Any:
    """The mean over the last axis (kept), as ``mean`` computes it; 0 over no positions (an
    empty output), where ``mean`` warns "Mean of empty slice"."""
    return xp.sum(x, axis=-1, keepdims=True) / max(int(x.shape[-1]), 1)


class GroupNorm(Operator):
    """(x − mean) / √(var + eps) over each group of C / num_groups channels (and every spatial
    position) of (N, C, *), biased variance; then ``weight`` · y + ``bias`` per channel when
    ``affine``. Init as torch: weight ones, bias zeros."""

    param_init = {"weight": "ones", "bias": "zeros"}
    vjp_ignores = frozenset({"input", "output"})  # x̂ and 1/σ are the residuals

    def __init__(self, num_groups: int, eps: float = 1e-5, affine: bool = True) -> None:
        if not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups, bool) \
                or num_groups <= 0:
            raise ValueError(f"GroupNorm: num_groups must be a positive int, got {num_groups!r}")
        check_eps(eps, "GroupNorm")
        self.num_groups, self.eps, self.affine = int(num_groups), float(eps), bool(affine)
        # the compiler drops parameters switched off by these
        self.use_scale = self.use_bias = self.affine

    def _channels(self, shapes) -> int | None:
        s = shapes.get("input")
        if s is None:
            return None
        if len(s) < 2:
            raise ShapeError(f"GroupNorm: 'input' must have rank >= 2 (N, C, *), got shape {fmt(s)}")
        c = s[1]
        if c is not None and c % self.num_groups:
            raise ShapeError(f"GroupNorm: input channels ({c}) must be divisible by num_groups "
                             f"({self.num_groups}); 'input' has shape {fmt(s)}")
        return c

    def param_shapes(self, shapes):
        c = self._channels(shapes)
        if c is None or not self.affine:
            return {}
        return {"weight": (c,), "bias": (c,)}

    def infer_shape(self, shapes):
        self._channels(shapes)
        return shapes.get("input")

    def _normalise(self, xp: Any, x: Any) -> tuple[Any, Any]:
        """y and 1/σ, both grouped as (N, G, C/G · prod(spatial))."""
        # the group size itself, not -1: ambiguous (refused) for an empty batch
        xg = x.reshape((x.shape[0], self.num_groups, math.prod(x.shape[1:]) // self.num_groups))
        xc = xg - _group_mean(xp, xg)
        inv = 1 / xp.sqrt(_group_mean(xp, xc * xc) + self.eps)
        return xc * inv, inv

    @float32_forward
    def forward(self, xp: Any, input: Any, weight: Any = None, bias: Any = None) -> Any:
        if backend_of(xp) == "torch":
            if input.numel() == 0 and weight is not None:
                # an empty output: torch's kernel gives the weight a NaN gradient (an empty
                # sum is 0, as on NumPy and JAX)
                per_channel = (-1,) + (1,) * (input.ndim - 2)
                y = input * weight.reshape(per_channel)
                return y if bias is None else y + bias.reshape(per_channel)
            # the op, not F.group_norm: that one also refuses one value per group when
            # N · C / num_groups is 1 (its batch-norm check: an unnamed torch ValueError
            # where NumPy and JAX normalise)
            return xp.t.group_norm(input, self.num_groups, weight, bias, self.eps)
        return self.forward_residuals(xp, input, weight, bias)[0]

    @float32_forward
    def forward_residuals(self, xp: Any, input: Any, weight: Any = None,
                          bias: Any = None) -> tuple[Any, Any]:
        """The output and ``(x̂, 1/σ)``, grouped as (N, G, C/G · prod(spatial))."""
        xhat, inv = self._normalise(xp, input)
        y = xhat.reshape(input.shape)
        per_channel = (-1,) + (1,) * (input.ndim - 2)
        if weight is not None:
            y = y * weight.reshape(per_channel)
        return (y if bias is None else y + bias.reshape(per_channel)), (xhat, inv)

    @float32_vjp
    def vjp(self, g, out, args, wrt, residuals=None):
        xhat, inv = residuals if residuals is not None else self._normalise(np, args["input"])
        per_channel = (-1,) + (1,) * (g.ndim - 2)  # g has the input's shape
        axes = (0, *range(2, g.ndim))
        res = {}
        if "weight" in wrt:
            res["weight"] = (g * xhat.reshape(g.shape)).sum(axis=axes)
        if "bias" in wrt:
            res["bias"] = g.sum(axis=axes)
        if "input" in wrt:
            gx = g * args["weight"].reshape(per_channel) if "weight" in args else g
            gx = gx.reshape(xhat.shape)
            gi = inv * (gx - _group_mean(np, gx) - xhat * _group_mean(np, gx * xhat))
            res["input"] = gi.reshape(g.shape)
        return res

    def __repr__(self) -> str:
        return f"GroupNorm({self.num_groups}, eps={self.eps}, affine={self.affine})"



class _BatchNorm(Operator):
    """Batch normalisation of (N, C, *) per channel c, as torch's ``BatchNorm*d``.

    Training mode (or ``track_running_stats=False``, in either mode), over the n = N · prod(*)
    values of channel c: μ = mean, σ² = biased variance, y = (x − μ) / √(σ² + eps). With
    running statistics, training mode also returns the next state (torch's buffers):

        running_mean ← (1 − m) · running_mean + m · μ
        running_var  ← (1 − m) · running_var + m · σ² · n / (n − 1)   (unbiased, as torch)
        num_batches_tracked ← num_batches_tracked + 1

    with m = ``momentum``, or m = 1 / num_batches_tracked (the new count: a cumulative average)
    when ``momentum=None``. Inference mode: y = (x − running_mean) / √(running_var + eps).
    Then y · weight + bias per channel when ``affine``.

    Parameters: ``weight`` (C,) ones, ``bias`` (C,) zeros; state: ``running_mean`` (C,) zeros,
    ``running_var`` (C,) ones, ``num_batches_tracked`` () integer 0 (none without
    ``track_running_stats``). Batch statistics (training mode, or either mode without running
    statistics) refuse n = 1: a ``ValueError``, as torch; an empty batch (n = 0) gives an
    empty output, leaves the running statistics and counts in ``num_batches_tracked``, as torch.
    """

    context = True
    param_init = {"weight": "ones", "bias": "zeros"}
    vjp_ignores = frozenset({"input", "output"})  # x̂ and 1/σ are the residuals
    state_init = {"running_mean": "zeros", "running_var": "ones", "num_batches_tracked": "int_zeros"}
    ranks: ClassVar[tuple[int, ...]] = ()
    layout: ClassVar[str] = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        who = type(self).__name__
        if not isinstance(num_features, (int, np.integer)) or isinstance(num_features, bool) \
                or num_features <= 0:
            raise ValueError(f"{who}: num_features must be a positive int, got {num_features!r}")
        check_eps(eps, who)
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(
                momentum, (int, float, np.floating)) or not 0.0 <= float(momentum) <= 1.0):
            raise ValueError(f"{who}: momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features, self.eps = int(num_features), float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        self.use_scale = self.use_bias = self.affine  # the compiler drops switched-off params

    def _check(self, shapes: Mapping[str, Any]) -> None:
        s = shapes.get("input")
        if s is None:
            return
        who = type(self).__name__
        if len(s) not in self.ranks:
            raise ShapeError(f"{who}: 'input' must be {self.layout}, got shape {fmt(s)}")
        if s[1] is not None and s[1] != self.num_features:
            raise ShapeError(f"{who}: 'input' has {s[1]} channels (axis 1) but num_features is "
                             f"{self.num_features}; 'input' has shape {fmt(s)}")

    def param_shapes(self, shapes):
        self._check(shapes)
        c = self.num_features
        return {"weight": (c,), "bias": (c,)} if self.affine else {}

    def state_shapes(self, shapes):
        if not self.track_running_stats:
            return {}
        c = self.num_features
        return {"running_mean": (c,), "running_var": (c,), "num_batches_tracked": ()}

    def infer_shape(self, shapes):
        self._check(shapes)
        return shapes.get("input")

    def _batch_stats(self, ctx: Any) -> bool:
        return ctx.training or not self.track_running_stats

    @staticmethod
    def _axes(x: Any) -> tuple[int, ...]:
        return (0, *range(2, x.ndim))

    def _count(self, x: Any) -> int:
        """The values per channel; one is refused (torch's check), none is an empty batch."""
        n = int(x.shape[0]) * int(np.prod(x.shape[2:], dtype=np.int64))
        if n == 1:
            raise ValueError(f"{type(self).__name__}: the batch statistics (training mode, or "
                             f"track_running_stats=False) need more than one value per "
                             f"channel, got input of shape {tuple(x.shape)}")
        return n

    def _update(self, ctx: Any, mean: Any, var_unbiased: Any, empty: bool = False) -> None:
        """Write the next running statistics (when the state is there: a forward pass
        without ``state=`` outside ``evaluate`` just does not track them). An ``empty``
        batch only counts, as torch's (its kernel leaves the statistics as they are)."""
        if not (ctx.training and self.track_running_stats and ctx.has_state("running_mean")):
            return
        rm, rv = ctx.state("running_mean"), ctx.state("running_var")
        count = ctx.state("num_batches_tracked") + 1
        m = self.momentum
        if empty:
            m = 0.0
        elif m is None:  # cumulative average: 1 / count (+ 0·rm[:1]: in the statistics' dtype)
            m = 1.0 / (count + rm[:1] * 0)
        # (half precision: the statistics are float32, the state rounded once, as torch)
        ctx.update("running_mean", narrow((1 - m) * rm + m * mean, rm.dtype))
        ctx.update("running_var", narrow((1 - m) * rv + m * var_unbiased, rv.dtype))
        ctx.update("num_batches_tracked", count)

    @float32_forward
    def forward(self, xp: Any, input: Any, weight: Any = None, bias: Any = None, *, ctx: Any) -> Any:
        batch = self._batch_stats(ctx)
        if backend_of(xp) == "torch":
            import torch.nn.functional as F

            if batch:
                # (also without running statistics in inference mode, as torch)
                empty = self._count(input) == 0
                if ctx.training:
                    x = widen(input.detach())  # (half precision: float32 statistics, as torch)
                    if empty:
                        zero = x.sum(dim=self._axes(x))
                        self._update(ctx, zero, zero, empty=True)
                    else:
                        self._update(ctx, x.mean(dim=self._axes(x)),
                                     x.var(dim=self._axes(x), correction=1))
                if self.eps > 0:
                    return F.batch_norm(input, None, None, weight, bias, True, 0.0, self.eps)
                return self._torch_batch_stats(input, weight, bias)
            return F.batch_norm(input, ctx.state("running_mean"), ctx.state("running_var"),
                                weight, bias, False, 0.0, self.eps)
        return self.forward_residuals(xp, input, weight, bias, ctx=ctx)[0]

    def _torch_batch_stats(self, x: Any, weight: Any, bias: Any) -> Any:
        """torch, eps = 0: the batch-statistics formula, which F.batch_norm refuses in training
        mode ("eps must be positive") where NumPy and JAX take it."""
        axes = self._axes(x)
        xc = x - x.mean(dim=axes, keepdim=True)
        y = xc * (xc * xc).mean(dim=axes, keepdim=True).rsqrt()
        per_channel = (1, -1) + (1,) * (x.ndim - 2)
        if weight is not None:
            y = y * weight.reshape(per_channel)
        return y if bias is None else y + bias.reshape(per_channel)

    @float32_forward
    def forward_residuals(self, xp: Any, input: Any, weight: Any = None, bias: Any = None, *,
                          ctx: Any) -> tuple[Any, Any]:
        """NumPy / JAX: the output and ``(x̂, 1/σ)`` (1/σ shaped per channel); training mode
        writes the next running statistics."""
        xhat, inv = self._normalise(xp, input, ctx, update=True)
        per_channel = (1, -1) + (1,) * (input.ndim - 2)
        y = xhat
        if weight is not None:
            y = y * weight.reshape(per_channel)
        return (y if bias is None else y + bias.reshape(per_channel)), (xhat, inv)

    def _normalise(self, xp: Any, x: Any, ctx: Any, update: bool) -> tuple[Any, Any]:
        """x̂ and 1/σ from the batch (or running) statistics; ``update``: also write the next
        running statistics (a VJP recomputing them must not)."""
        per_channel = (1, -1) + (1,) * (x.ndim - 2)
        if self._batch_stats(ctx):
            # batch statistics need two values per channel in either mode (torch refuses one:
            # its x̂ would be 0, the output the bias, whatever the input)
            n = self._count(x)
            axes = self._axes(x)
            if n == 0:  # an empty batch: an empty output (mean 0, var 1: no warning)
                mean = xp.sum(x, axis=axes)
                var = mean + 1
            else:
                mean = xp.mean(x, axis=axes)
            xc = x - mean.reshape(per_channel)
            if n:
                var = xp.mean(xc * xc, axis=axes)
            if ctx.training and update:
                self._update(ctx, mean, var * (n / (n - 1)), empty=n == 0)
        else:
            mean, var = ctx.state("running_mean"), ctx.state("running_var")
            xc = x - mean.reshape(per_channel)
        inv = (1 / xp.sqrt(var + self.eps)).reshape(per_channel)
        return xc * inv, inv

    @float32_vjp
    def vjp(self, g, out, args, wrt, residuals=None):
        ctx = args["ctx"]
        axes = self._axes(g)  # g has the input's shape
        per_channel = (1, -1) + (1,) * (g.ndim - 2)
        if residuals is None:  # recomputed without writing the running statistics again
            residuals = self._normalise(np, args["input"], ctx, False)
        xhat, inv = residuals
        res = {}
        if "weight" in wrt:
            res["weight"] = (g * xhat).sum(axis=axes)
        if "bias" in wrt:
            res["bias"] = g.sum(axis=axes)
        if "input" in wrt:
            gx = g * args["weight"].reshape(per_channel) if "weight" in args else g
            if self._batch_stats(ctx) and gx.size:
                gx = gx - gx.mean(axis=axes, keepdims=True) \
                    - xhat * (gx * xhat).mean(axis=axes, keepdims=True)
            res["input"] = gx * inv
        return res

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats})")


class BatchNorm1D(_BatchNorm):
    __doc__ = "Batch normalisation of (N, C) or (N, C, L), as ``torch.nn.BatchNorm1d``.\n" \
        + (_BatchNorm.__doc__ or "")
    ranks = (2, 3)
    layout = "(N, C) or (N, C, L)"


class BatchNorm2D(_BatchNorm):
    __doc__ = "Batch normalisation of (N, C, H, W), as ``torch.nn.BatchNorm2d``.\n" \
        + (_BatchNorm.__doc__ or "")
    ranks = (4,)
    layout = "(N, C, H, W)"


class BatchNorm3D(_BatchNorm):
    __doc__ = "Batch normalisation of (N, C, D, H, W), as ``torch.nn.BatchNorm3d``.\n" \
        + (_BatchNorm.__doc__ or "")
    ranks = (5,)
    layout = "(N, C, D, H, W)"


class RMSNorm(Operator):
    """Root-mean-square normalisation over the trailing axes ``normalized_shape``, as
    ``torch.nn.RMSNorm`` / ``F.rms_norm``:

        y = x / √(mean(x²) + eps) · weight

    the mean over the last ``len(normalized_shape)`` axes, which must have those sizes (a
    ``ShapeError`` at compile time otherwise); no centring and no bias. ``weight`` has shape
    ``normalized_shape`` and starts at ones; ``elementwise_affine=False`` drops it.
    ``eps=None`` (the default) is torch's: the machine epsilon of the computation type,
    ``finfo(float64).eps`` (2.2e-16) for float64 inputs and ``finfo(float32).eps`` (1.19e-7)
    for float32, float16 and bfloat16 ones.
    """

    param_init = {"weight": "ones"}
    vjp_ignores = frozenset({"input", "output"})  # x̂ and 1/rms are the residuals
    use_bias = False

    def __init__(self, normalized_shape: int | tuple[int, ...] | list[int],
                 eps: float | None = None, elementwise_affine: bool = True) -> None:
        dims = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) \
            else normalized_shape
        if not isinstance(dims, (tuple, list)) or not dims or not all(
                isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) and d > 0
                for d in dims):
            raise ValueError(f"RMSNorm: normalized_shape must be a positive int or a non-empty "
                             f"tuple of them, got {normalized_shape!r}")
        if eps is not None:
            check_eps(eps, "RMSNorm")
        if not isinstance(elementwise_affine, (bool, np.bool_)):
            raise ValueError(f"RMSNorm: elementwise_affine must be a bool, got {elementwise_affine!r}")
        self.normalized_shape = tuple(int(d) for d in dims)
        self.eps = None if eps is None else float(eps)
        self.elementwise_affine = self.use_scale = bool(elementwise_affine)

    def _check(self, shapes) -> None:
        s, want = shapes.get("input"), self.normalized_shape
        if s is not None and (len(s) < len(want) or any(
                a is not None and a != b for a, b in zip(s[len(s) - len(want):], want))):
            raise ShapeError(f"RMSNorm: 'input' of shape {fmt(s)} does not end in "
                             f"normalized_shape {want}")

    def param_shapes(self, shapes):
        self._check(shapes)
        return {"weight": self.normalized_shape} if self.elementwise_affine else {}

    def infer_shape(self, shapes):
        self._check(shapes)
        return shapes.get("input")

    def eps_for(self, dtype: Any) -> float:
        """The eps used for inputs of ``dtype`` (torch's finfo convention when ``eps=None``)."""
        if self.eps is not None:
            return self.eps
        wide = np.dtype(dtype) == np.float64 if isinstance(dtype, (type, np.dtype)) \
            else str(dtype).rsplit(".", 1)[-1] == "float64"  # (torch's, bfloat16: not NumPy's)
        return float(np.finfo(np.float64 if wide else np.float32).eps)

    def _axes(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim - len(self.normalized_shape), ndim))

    def _normalise(self, xp: Any, x: Any) -> tuple[Any, Any]:
        inv = 1 / xp.sqrt(xp.mean(x * x, axis=self._axes(x.ndim), keepdims=True)
                          + self.eps_for(x.dtype))
        return x * inv, inv

    @float32_forward
    def forward(self, xp: Any, input: Any, weight: Any = None) -> Any:
        if backend_of(xp) == "torch":  # one kernel each way (eps None: torch's own default)
            import torch.nn.functional as F

            return F.rms_norm(input, self.normalized_shape, weight, self.eps)
        return self.forward_residuals(xp, input, weight)[0]

    @float32_forward
    def forward_residuals(self, xp: Any, input: Any, weight: Any = None) -> tuple[Any, Any]:
        """The output and ``(x̂, 1/rms)``, which the NumPy VJP reuses."""
        xhat, inv = self._normalise(xp, input)
        return (xhat if weight is None else xhat * weight), (xhat, inv)

    @float32_vjp
    def vjp(self, g, out, args, wrt, residuals=None):
        # with u = g·weight: dx = (u − x̂ · mean(u · x̂)) / rms (the mean over the normalised axes)
        xhat, inv = residuals if residuals is not None else self._normalise(np, args["input"])
        axes = self._axes(g.ndim)
        res = {}
        if "weight" in wrt:
            res["weight"] = (g * xhat).sum(axis=tuple(range(axes[0])))
        if "input" in wrt:
            u = g * args["weight"] if "weight" in args else g
            res["input"] = inv * (u - xhat * (u * xhat).mean(axis=axes, keepdims=True))
        return res

    def __repr__(self) -> str:
        return (f"RMSNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine})")


# InstanceNorm1D / 2D / 3D live in their own module (GroupNorm's subclasses); this stays their path
from .instance_norm import InstanceNorm1D, InstanceNorm2D, InstanceNorm3D  # noqa: E402, F401
