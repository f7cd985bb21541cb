"""Group normalisation over channels-first inputs, as ``torch.nn.GroupNorm``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .operator import Operator, ShapeError, backend_of, fmt


class GroupNorm(Operator):
    """(x − mean) / √(var + eps) over each group of C / num_groups channels (and every spatial
    position) of (N, C, *), biased variance; then ``weight`` · y + ``bias`` per channel when
    ``affine``. Init as torch: weight ones, bias zeros."""

    param_init = {"weight": "ones", "bias": "zeros"}

    def __init__(self, num_groups: int, eps: float = 1e-5, affine: bool = True) -> None:
        if not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups, bool) \
                or num_groups <= 0:
            raise ValueError(f"GroupNorm: num_groups must be a positive int, got {num_groups!r}")
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
        xg = x.reshape((x.shape[0], self.num_groups, -1))
        xc = xg - xp.mean(xg, axis=-1, keepdims=True)
        inv = 1 / xp.sqrt(xp.mean(xc * xc, axis=-1, keepdims=True) + self.eps)
        return xc * inv, inv

    def forward(self, xp: Any, input: Any, weight: Any = None, bias: Any = None) -> Any:
        if backend_of(xp) == "torch":
            import torch.nn.functional as F

            return F.group_norm(input, self.num_groups, weight, bias, self.eps)
        y, _ = self._normalise(xp, input)
        y = y.reshape(input.shape)
        per_channel = (-1,) + (1,) * (input.ndim - 2)
        if weight is not None:
            y = y * weight.reshape(per_channel)
        return y if bias is None else y + bias.reshape(per_channel)

    def vjp(self, g, out, args, wrt):
        x = args["input"]
        xhat, inv = self._normalise(np, x)
        per_channel = (-1,) + (1,) * (x.ndim - 2)
        axes = (0, *range(2, x.ndim))
        res = {}
        if "weight" in wrt:
            res["weight"] = (g * xhat.reshape(x.shape)).sum(axis=axes)
        if "bias" in wrt:
            res["bias"] = g.sum(axis=axes)
        if "input" in wrt:
            gx = g * args["weight"].reshape(per_channel) if "weight" in args else g
            gx = gx.reshape(xhat.shape)
            gi = inv * (gx - gx.mean(-1, keepdims=True) - xhat * (gx * xhat).mean(-1, keepdims=True))
            res["input"] = gi.reshape(x.shape)
        return res

    def __repr__(self) -> str:
        return f"GroupNorm({self.num_groups}, eps={self.eps}, affine={self.affine})"
