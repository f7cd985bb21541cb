"""``InstanceNorm1D`` / ``2D`` / ``3D``, as ``torch.nn.InstanceNorm1d/2d/3d``, running
statistics (``track_running_stats=True``) included. Imported by :mod:`mithril.models.norms`
(the public path)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from .half_precision import float32_forward, float32_vjp, narrow, widen
from .norms import GroupNorm, check_eps
from .operator import ShapeError, backend_of, fmt


class _InstanceNorm(GroupNorm):
    """(x − mean) / √(var + eps) over the spatial positions of each (sample, channel) of
    (N, C, *spatial), biased variance; then ``weight`` · y + ``bias`` per channel when
    ``affine`` (defaults as torch's: ``affine=False``, ``track_running_stats=False``). The
    batch statistics are GroupNorm's with one group per channel: its kernels.

    ``track_running_stats=True`` keeps torch's buffers ``running_mean`` (zeros) and
    ``running_var`` (ones), (C,), as model state (see BatchNorm: ``evaluate(...,
    state=...)`` returns the next state). Training mode normalises by the instance
    statistics and, with μ_nc and σ²_nc the mean and unbiased variance (over the L spatial
    positions: · L / (L − 1)) of sample n, channel c, writes

        running_mean ← (1 − m) · running_mean + m · mean_n(μ_nc)
        running_var  ← (1 − m) · running_var + m · mean_n(σ²_nc)

    (torch averages the N per-instance updates); m = ``momentum`` (keyword-only: torch's
    third positional argument is our ``affine``, kept for the existing calls), and
    ``momentum=None`` is torch's 0 (the statistics stay as they are: torch passes 0 to its
    kernel; BatchNorm's cumulative average is not used here). Inference mode normalises
    by them: y = (x − running_mean) / √(running_var + eps), one position per instance then
    allowed, as torch. torch's ``num_batches_tracked`` buffer is not kept: its InstanceNorm
    never counts (it stays 0). Batch statistics need more than one spatial position: a
    ``ShapeError`` at compile time without running statistics, a ``ValueError`` in training
    mode with them.

    An unbatched input, (C, L) / (C, H, W) / (C, D, H, W), is normalised (and tracked) as a batch of one
    and the output has its shape, as torch's modules (``unsqueeze(0)`` ... ``squeeze(0)``);
    its channels must equal ``num_features`` (torch only warns without ``affine``)."""

    rank: ClassVar[int]

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False,
                 track_running_stats: bool = False, *, momentum: float | None = 0.1) -> None:
        who = type(self).__name__
        if not isinstance(num_features, (int, np.integer)) or isinstance(num_features, bool) \
                or num_features <= 0:
            raise ValueError(f"{who}: num_features must be a positive int, got {num_features!r}")
        check_eps(eps, who)
        for name, v in (("affine", affine), ("track_running_stats", track_running_stats)):
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"{who}: {name} must be a bool, got {v!r}")
        if momentum is not None and (isinstance(momentum, (bool, np.bool_)) or not isinstance(
                momentum, (int, float, np.integer, np.floating)) or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"{who}: momentum must be in [0, 1] or None, got {momentum!r}")
        super().__init__(int(num_features), eps, affine)
        self.momentum = 0.0 if momentum is None else float(momentum)  # None: torch's 0
        self.track_running_stats = bool(track_running_stats)
        if self.track_running_stats:  # the mode and the state reach forward / vjp as ctx
            self.context = True  # type: ignore[misc]
            self.state_init = {"running_mean": "zeros", "running_var": "ones"}  # type: ignore[misc]

    def _channels(self, shapes) -> int | None:
        s = shapes.get("input")
        if s is None:
            return None
        who = type(self).__name__
        if len(s) not in (self.rank, self.rank - 1):
            spatial = {3: "L", 4: "H, W", 5: "D, H, W"}[self.rank]
            raise ShapeError(f"{who}: 'input' must have rank {self.rank} (N, C, {spatial}) or "
                             f"{self.rank - 1} (C, {spatial}: unbatched), got shape {fmt(s)}")
        c, spatial = s[len(s) - self.rank + 1], s[len(s) - self.rank + 2:]
        if c is not None and c != self.num_groups:
            raise ShapeError(f"{who}: input channels ({c}) must equal num_features "
                             f"({self.num_groups}); 'input' has shape {fmt(s)}")
        if not self.track_running_stats and all(d is not None for d in spatial) \
                and math.prod(spatial) == 1:
            # as torch: one value per instance has no variance to normalise by
            raise ShapeError(f"{who}: 'input' must have more than 1 spatial element, got "
                             f"shape {fmt(s)}")
        return c

    def state_shapes(self, shapes):
        c = self.num_groups
        return {"running_mean": (c,), "running_var": (c,)} if self.track_running_stats else {}

    def _running(self, ctx: Any) -> bool:
        """Normalise by the running statistics (inference mode with them)."""
        return self.track_running_stats and not ctx.training

    def _update(self, xp: Any, x: Any, ctx: Any) -> None:
        """Check the spatial size, then write the next running statistics (training mode; a
        forward pass without ``state=`` outside ``evaluate`` does not track them)."""
        length = math.prod(int(d) for d in x.shape[2:])
        if length <= 1:
            raise ValueError(f"{type(self).__name__}: training mode needs more than 1 spatial "
                             f"element per instance (as torch), got input of shape "
                             f"{tuple(x.shape)}")
        if not ctx.has_state("running_mean"):
            return
        torch = backend_of(xp) == "torch"
        x = widen(x.detach() if torch else x)  # (half precision: float32 statistics, as torch)
        flat = x.reshape((*x.shape[:2], length))
        mean = flat.mean(-1)
        xc = flat - mean[..., None]
        var = (xc * xc).sum(-1) / (length - 1)
        rm, rv, m = ctx.state("running_mean"), ctx.state("running_var"), self.momentum
        ctx.update("running_mean", narrow(m * mean.mean(0) + (1 - m) * rm, rm.dtype))
        ctx.update("running_var", narrow(m * var.mean(0) + (1 - m) * rv, rv.dtype))

    @float32_forward
    def forward(self, xp: Any, input: Any, weight: Any = None, bias: Any = None, *,
                ctx: Any = None) -> Any:
        if input.ndim == self.rank - 1:  # unbatched: a batch of one, as torch
            return self.forward(xp, input[None], weight, bias, ctx=ctx)[0]
        if ctx is None:
            return super().forward(xp, input, weight, bias)
        if backend_of(xp) == "torch" and self._running(ctx):
            import torch.nn.functional as F

            return F.batch_norm(input, ctx.state("running_mean"), ctx.state("running_var"),
                                weight, bias, False, 0.0, self.eps)
        if backend_of(xp) == "torch":
            self._update(xp, input, ctx)
            return super().forward(xp, input, weight, bias)
        return self.forward_residuals(xp, input, weight, bias, ctx=ctx)[0]

    @float32_forward
    def forward_residuals(self, xp: Any, input: Any, weight: Any = None, bias: Any = None, *,
                          ctx: Any = None) -> tuple[Any, Any]:
        """NumPy / JAX: the output and ``(x̂, 1/σ)``: grouped as GroupNorm's with the
        instance statistics, shaped as the input and per channel with the running ones."""
        if input.ndim == self.rank - 1:  # unbatched: a batch of one (residuals batched)
            out, res = self.forward_residuals(xp, input[None], weight, bias, ctx=ctx)
            return out[0], res
        if ctx is None or not self._running(ctx):
            if ctx is not None and ctx.training:
                self._update(xp, input, ctx)
            return super().forward_residuals(xp, input, weight, bias)
        xhat, inv = self._normalise_running(xp, input, ctx)
        per_channel = (1, -1) + (1,) * (input.ndim - 2)
        y = xhat if weight is None else xhat * weight.reshape(per_channel)
        return (y if bias is None else y + bias.reshape(per_channel)), (xhat, inv)

    def _normalise_running(self, xp: Any, x: Any, ctx: Any) -> tuple[Any, Any]:
        per_channel = (1, -1) + (1,) * (x.ndim - 2)
        inv = (1 / xp.sqrt(ctx.state("running_var") + self.eps)).reshape(per_channel)
        return (x - ctx.state("running_mean").reshape(per_channel)) * inv, inv

    @float32_vjp
    def vjp(self, g, out, args, wrt, residuals=None):
        if g.ndim == self.rank - 1:  # unbatched (g has the input's shape): a batch of one
            args = {k: v[None] if k == "input" and v is not None else v for k, v in args.items()}
            res = self.vjp(g[None], None if out is None else out[None], args, wrt, residuals)
            return {k: v[0] if k == "input" else v for k, v in res.items()}
        ctx = args.get("ctx")
        if ctx is None or not self._running(ctx):
            return super().vjp(g, out, args, wrt, residuals)
        # the running statistics are constants: y = x̂ · w + b with x̂ = (x − μ) · inv
        xhat, inv = residuals if residuals is not None else \
            self._normalise_running(np, args["input"], ctx)
        axes = (0, *range(2, g.ndim))
        res = {}
        if "weight" in wrt:
            res["weight"] = (g * xhat).sum(axis=axes)
        if "bias" in wrt:
            res["bias"] = g.sum(axis=axes)
        if "input" in wrt:
            w = args.get("weight")
            res["input"] = g * inv if w is None else g * (w.reshape(inv.shape) * inv)
        return res

    def __repr__(self) -> str:
        extra = f", track_running_stats=True, momentum={self.momentum}" \
            if self.track_running_stats else ""
        return f"{type(self).__name__}({self.num_groups}, eps={self.eps}, affine={self.affine}{extra})"


class InstanceNorm1D(_InstanceNorm):
    """Instance normalisation of (N, C, L) or unbatched (C, L) over L, as
    ``torch.nn.InstanceNorm1d``."""

    rank = 3


class InstanceNorm2D(_InstanceNorm):
    """Instance normalisation of (N, C, H, W) or unbatched (C, H, W) over H·W, as
    ``torch.nn.InstanceNorm2d``."""

    rank = 4


class InstanceNorm3D(_InstanceNorm):
    """Instance normalisation of (N, C, D, H, W) or unbatched (C, D, H, W) over D·H·W, as
    ``torch.nn.InstanceNorm3d``."""

    rank = 5
