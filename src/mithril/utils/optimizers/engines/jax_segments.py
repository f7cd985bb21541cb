"""Per-tensor sums over a flat array of contiguous tensors, in JAX, without a scatter.

The jitted engine (:mod:`.jax_engine`) keeps several tensors in one flat chunk (every
tensor on an accelerator, the small ones on CPU) and sums per tensor for two-pass
optimizers (LAMB's ‖p‖², ‖u‖²) and per-tensor clipping (Σ g²). ``jax.ops.segment_sum`` is a
scatter-add: on XLA's CPU backend 10M values into 200 segments took 64 ms (a plain sum of
10M values: 2.4 ms), and on GPUs jaxlib 0.10.2-0.11.0 adds float32 values into few
segments up to ~5000x slower than into many (cusp-ai-oss/kUPS#248: a compare-and-swap loop
per value on one address).

Here the tensors' spans are static (the layout), so a :class:`SpanPlan` made once on the
host turns the sums into reductions over rows: the array is cut into blocks of ``B``
elements and each block is summed (a row reduction: 31 ms for those 10M values on XLA's
CPU backend, whose row reductions of a computed input are its slow path, and the kind of
reduction GPUs do best). A block that lies inside one tensor counts for that tensor; a
block cut by a tensor's boundary (and the last, partial block) is summed again per tensor,
from a gathered copy of its row masked to the tensor's part (at most two pieces per tensor,
its head and its tail). The blocks' sums per tensor are the same problem on an array ``B``
times shorter: the plan recurses until no block is whole. Every value is added, never
subtracted (no cancellation), in a tree of blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: the largest block (a gathered piece is one block's row: a tensor costs two rows at most)
MAX_BLOCK = 1024
#: the smallest block (below it, a level would not shorten the array enough to pay)
MIN_BLOCK = 16


class SpanPlan:
    """How to sum an array of ``sizes[0] + sizes[1] + ...`` elements per span, the spans
    contiguous and in order (empty ones allowed: their sum is 0). Made with NumPy from the
    static sizes; :meth:`__call__` runs inside ``jax.jit`` (or eagerly)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        sizes = [int(s) for s in sizes]
        if any(s < 0 for s in sizes) or not sizes:
            raise ValueError(f"span sizes must be one or more counts >= 0, got {sizes}")
        self.n, self.total = len(sizes), sum(sizes)
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # block size: pieces (two rows per span) cost about a sixteenth of the array's reads
        b = self.total // (16 * self.n) if self.n > 1 else self.total
        self.block = int(min(MAX_BLOCK, max(MIN_BLOCK, 1 << max(int(b).bit_length() - 1, 0))))
        B = self.block
        self.full = self.total // B  # whole blocks (the rest is one partial block)
        a, e = starts[:-1], starts[1:]
        first, last = a // B, (e - 1) // B  # each span's first and last block
        inner = starts[1:-1]  # the boundaries between spans
        cut = np.zeros(self.full + 1, dtype=bool)  # blocks a boundary falls inside
        cut[(inner // B)[inner % B != 0]] = True
        cut[self.full] = True  # the partial block (if any) is always summed in pieces
        nonempty = e > a
        # head: the span's part of its first block, where that block is cut; tail: its part
        # of its last block, where that is cut and is not its first
        head = nonempty & cut[np.minimum(first, self.full)]
        tail = nonempty & (last > first) & cut[np.minimum(last, self.full)]
        rows = np.stack([np.where(head, first, 0), np.where(tail, last, 0)], axis=1)
        lo = np.stack([np.where(head, a - first * B, 0), np.zeros_like(a)], axis=1)
        hi = np.stack([np.where(head, np.minimum(e, (first + 1) * B) - first * B, 0),
                       np.where(tail, e - last * B, 0)], axis=1)
        #: each span's two pieces (head, tail) as rows of blocks (``full``: the partial
        #: one) and the [lo, hi) of the row they take (empty where a span has no piece)
        self.rows = rows.reshape(-1).astype(np.int32)
        self.lo = lo.reshape(-1).astype(np.int32)
        self.hi = hi.reshape(-1).astype(np.int32)
        self.pieces = bool((hi > lo).any())
        self.next: SpanPlan | None = None
        if self.full and not cut[:self.full].all():
            # the whole blocks not cut, per span: span i owns blocks [c_i, c_{i+1}), c_i its
            # first whole block, the cut ones among them zeroed
            owned = np.minimum(-(-a // B), self.full)
            owned[0] = 0
            self.next = SpanPlan(np.diff(np.append(owned, self.full)))
            self.zero = cut[:self.full]

    def __call__(self, x: Any) -> Any:
        """``x`` (1-d, ``total`` elements) summed per span, shape ``(n,)``, in ``x``'s
        dtype."""
        import jax.numpy as jnp

        if x.shape != (self.total,):
            raise ValueError(f"expected {self.total} elements, got shape {x.shape}")
        B, out = self.block, jnp.zeros(self.n, x.dtype)
        blocks = x[:self.full * B].reshape(self.full, B)
        if self.pieces:
            rest = self.total - self.full * B  # the partial block, padded as a row
            last = jnp.pad(x[self.full * B:], (0, B - rest))[None]
            if self.full:  # (a gather of the rows, never a copy of the whole array)
                got = jnp.where((self.rows == self.full)[:, None], last,
                                blocks[np.minimum(self.rows, self.full - 1)])
            else:
                got = jnp.broadcast_to(last, (self.rows.size, B))
            at = jnp.arange(B, dtype=np.int32)
            mask = (at >= self.lo[:, None]) & (at < self.hi[:, None])
            out = jnp.where(mask, got, jnp.zeros((), x.dtype)).sum(axis=1).reshape(-1, 2).sum(1)
        if self.next is not None:
            sums = jnp.where(self.zero, jnp.zeros((), x.dtype), blocks.sum(axis=1))
            out = out + self.next(sums)
        return out
