"""Which rank owns which parameters, and where each lies in the buffers the collectives move.

Sharding is by whole tensors: rank ``r`` owns a contiguous run of the parameters (in the
params dict's order) whose sizes add up to about ``1/N`` of the total, the run ending at the
tensor whose middle crosses ``(r+1)/N`` of the total (so a rank holds its share within one
tensor). A rank then runs the wrapped optimizer on its own tensors only: per-tensor
reductions (LAMB's trust ratio, Novograd's second moment, per-tensor clipping) stay exact.

The collectives move fixed-size chunks: chunk ``r`` of a buffer of ``N·C`` elements holds
rank ``r``'s tensors packed one after another, then one presence flag per tensor (1 where
that rank has a gradient for it), then padding up to ``C``, the largest rank's need.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def assign(sizes: Sequence[int], world: int) -> list[tuple[int, int]]:
    """``(first, stop)`` tensor indices of each rank's contiguous run (a run may be empty
    when there are fewer tensors than ranks, or one tensor dominates)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    total = int(sizes.sum())
    if total == 0 or world == 1:
        return [(0, len(sizes))] + [(len(sizes), len(sizes))] * (world - 1)
    middles = np.cumsum(sizes) - sizes / 2.0  # each tensor's middle, in elements
    owner = np.minimum((middles * world / total).astype(np.int64), world - 1)
    bounds = []
    for r in range(world):
        idx = np.nonzero(owner == r)[0]
        first = int(idx[0]) if len(idx) else (bounds[-1][1] if bounds else 0)
        bounds.append((first, first + len(idx)))
    return bounds


class ChunkLayout:
    """Offsets of every tensor (and its presence flag) in the chunked buffers."""

    def __init__(self, sizes: Sequence[int], bounds: list[tuple[int, int]]) -> None:
        self.sizes = [int(s) for s in sizes]
        self.bounds = bounds
        self.world = len(bounds)
        self.owner = np.zeros(len(self.sizes), dtype=np.int64)
        self.local_offset = np.zeros(len(self.sizes), dtype=np.int64)
        self.data = []  # elements of tensor data in each rank's chunk
        for r, (a, b) in enumerate(bounds):
            self.owner[a:b] = r
            off = 0
            for i in range(a, b):
                self.local_offset[i] = off
                off += self.sizes[i]
            self.data.append(off)
        needs = [d + (b - a) for d, (a, b) in zip(self.data, bounds)]
        #: elements per chunk (every rank's tensors and flags fit)
        self.chunk = max(max(needs, default=0), 1)

    def span(self, i: int) -> tuple[int, int]:
        """``[start, stop)`` of tensor ``i`` in the full (``N·C``) buffer."""
        start = int(self.owner[i]) * self.chunk + int(self.local_offset[i])
        return start, start + self.sizes[i]

    def flag(self, i: int) -> int:
        """Index of tensor ``i``'s presence flag in the full buffer."""
        r = int(self.owner[i])
        return r * self.chunk + self.data[r] + (i - self.bounds[r][0])

    @property
    def total(self) -> int:
        return self.world * self.chunk
