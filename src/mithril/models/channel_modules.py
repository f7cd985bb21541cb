"""torch's channel-wise modules ``nn.ChannelShuffle`` and ``nn.Softmax2d``.

``ChannelShuffle(groups)``: the C channels (axis 1 of an input of rank >= 3) seen as
(groups, C/groups) and transposed: output channel i·groups + j is input channel
j·(C/groups) + i. A permutation: its VJP is the inverse permutation (C/groups groups).
``Softmax2D``: the softmax over the channels of (N, C, H, W) or (C, H, W), at each position
(axis −3, as torch's).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .activations import Softmax
from .operator import Operator, ShapeError, backend_of, fmt, functional_of


def _shuffle(xp: Any, x: Any, groups: int) -> Any:
    """Channels (axis 1) as (groups, C/groups), transposed to (C/groups, groups)."""
    n, c, rest = x.shape[0], x.shape[1], tuple(x.shape[2:])
    y = x.reshape(n, groups, c // groups, *rest)
    y = y.transpose(1, 2) if backend_of(xp) == "torch" else xp.swapaxes(y, 1, 2)
    return y.reshape(n, c, *rest)


class ChannelShuffle(Operator):
    """``nn.ChannelShuffle(groups)`` on (N, C, *) (rank >= 3, as torch), C divisible by
    ``groups`` (module docstring)."""

    def __init__(self, groups: int) -> None:
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ValueError(f"ChannelShuffle: groups must be an int >= 1, got {groups!r}")
        self.groups = int(groups)

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        if len(s) < 3:
            raise ShapeError(f"ChannelShuffle: 'input' must have rank >= 3 (N, C, *), got {fmt(s)}")
        if s[1] is not None and s[1] % self.groups:
            raise ShapeError(f"ChannelShuffle: 'input' {fmt(s)} has {s[1]} channels, not "
                             f"divisible by groups={self.groups}")
        return s

    def forward(self, xp: Any, input: Any) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.channel_shuffle(input, self.groups)
        return _shuffle(xp, input, self.groups)

    def vjp(self, g, out, args, wrt):
        return {"input": _shuffle(np, g, g.shape[1] // self.groups)}

    def __repr__(self) -> str:
        return f"ChannelShuffle(groups={self.groups})"


class Softmax2D(Softmax):
    """``nn.Softmax2d``: softmax over the channels (axis −3) of (N, C, H, W) or (C, H, W)."""

    def __init__(self) -> None:
        super().__init__(axis=-3)

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is not None and len(s) not in (3, 4):
            raise ShapeError(f"Softmax2D: 'input' must be (N, C, H, W) or (C, H, W), got {fmt(s)}")
        return super().infer_shape(shapes)

    def __repr__(self) -> str:
        return "Softmax2D()"
