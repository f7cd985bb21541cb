"""How the jitted JAX engine's program meets the layout's chunks
(:func:`~.jax_chunks.chunk_bounds`): the chunks' flat arrays made from the tensors and cut
back into them (:class:`Parts`), and the arguments that carry what may differ between calls
of one program (:func:`selectors`, :func:`slice_offsets`) instead of constants, which
would make XLA compile a kernel per tensor."""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Any

import numpy as np

from .jax_segments import SpanPlan


def _uint(top: int) -> Any:
    """The smallest unsigned integer type that holds 0..``top`` (an index per element is
    read with every element: 1 B of uint8 where the table has up to 256 rows, not 4)."""
    return next(t for t in (np.uint8, np.uint16, np.uint32) if top <= np.iinfo(t).max)


def selectors(names: tuple[str, ...], bounds: tuple, rows: tuple[int, ...] | None,
              present: tuple[str, ...] | None, offsets: tuple) -> tuple[tuple, tuple, tuple]:
    """The arrays a jitted pass reads per chunk (:class:`Parts`): the rows of the scalar
    table (None for a one-row table; 0-d where the chunk's tensors share a row, else one per
    element, in the smallest unsigned integer type), the mask of the elements with a
    gradient (None: all have one) and the tensors' ``offsets`` (:func:`slice_offsets`).
    ``rows``: each tensor's row; ``present``: the names with a gradient (None: all)."""
    import jax.numpy as jnp

    sels, masks = [], []
    for chunk in bounds:
        sizes = [b - a for _, a, b in chunk]
        if rows is None or not chunk:
            sels.append(None)
        else:
            r = np.asarray([rows[i] for i, _, _ in chunk], dtype=_uint(max(rows)))
            sels.append(jnp.asarray(r[0] if (r == r[0]).all() else np.repeat(r, sizes)))
        m = None if present is None else np.array([names[i] in present for i, _, _ in chunk])
        masks.append(None if m is None or m.all() else jnp.asarray(np.repeat(m, sizes)))
    return tuple(sels), tuple(masks), offsets


def slice_offsets(bounds: tuple, platform: str) -> tuple:
    """Per chunk, None or per tensor its start in the chunk as a 0-d int32 array, or None:
    where the jitted step cuts the new parameters out of a chunk (:meth:`Parts.unflat`).
    XLA's CPU compiler makes a kernel of each slice, ~20 ms of compile each on 2 cores; at
    a constant offset, every slice is a kernel of its own (2,000 tensors: ~45 s of a 58 s
    first step), where slices that differ only in an argument are one kernel, compiled
    once. So on CPU a tensor whose size another tensor of its chunk shares takes its
    offset as an argument (one more, ~1 us a step to dispatch); others, and other
    platforms, keep constants."""
    import jax.numpy as jnp

    out: list[Any] = []
    for chunk in bounds:
        sizes = [b - a for _, a, b in chunk]
        if platform != "cpu" or len(chunk) < 2 or sum(sizes) >= 2**31:
            out.append(None)
            continue
        counts = Counter(sizes)
        starts = np.cumsum([0, *sizes[:-1]])
        out.append(tuple(jnp.asarray(np.int32(a)) if counts[n] > 1 else None
                         for a, n in zip(starts, sizes)))
    return tuple(out)


class Parts:
    """How a jitted pass meets the layout's chunks (:func:`~.jax_chunks.chunk_bounds`):
    per chunk its tensors' spans. What may differ between calls of one program - the row
    of the scalar table each element reads, which elements have a gradient - comes as
    arguments (:func:`selectors`), never as constants: an index per element
    baked into the program is 4 B a parameter of constant (one chunk of 10M parameters in
    two groups, as on an accelerator: 9 s more of XLA's compile), and a constant row index
    per tensor makes every tensor's loop a kernel of its own (LAMB on 200 tensors: 21.6 s
    of compile, where loops that differ only in their arguments compile once)."""

    def __init__(self, lay: Any, bounds: tuple) -> None:
        self.lay, self.bounds = lay, bounds
        spans = list(lay.spans())
        self.spans = [[spans[i] for i, _, _ in chunk] for chunk in bounds]
        #: per chunk of several tensors, how to sum per tensor (:mod:`.jax_segments`)
        self.plans = [SpanPlan([b - a for _, a, b in chunk]) if len(chunk) > 1 else None
                      for chunk in bounds]

    def sums(self, c: int, x: Any) -> Any:
        """Chunk ``c``'s flat ``x`` summed per tensor, shape (tensors of the chunk,)."""
        import jax.numpy as jnp

        plan = self.plans[c]
        return jnp.sum(x)[None] if plan is None else plan(x)

    def sumsq(self, chunks: list[Any], dtype: Any) -> Any:
        """Each tensor's Σ x² in ``dtype`` from the chunks' flat arrays, in layout order."""
        import jax.numpy as jnp

        return self.per_tensor([self.sums(c, jnp.square(x.astype(dtype)))
                                for c, x in enumerate(chunks)])

    @staticmethod
    def cols(table: Any, sels: tuple) -> list[Any]:
        """Each chunk's column getter: ``cols[c](j)`` is scalar j of chunk c's elements.
        ``sels``: per chunk None for a one-row table, else the chunk's row (0-d) or each
        element's (traced). A row's scalars are read once, whatever the chunks sharing it
        (200 chunks of a one-row table: 1,600 reads traced, ~0.5 s, where 8 do). (lax calls:
        ``table[sel, j]`` traced ~2 ms a scalar, seconds for 200 tensors.)"""
        from jax import lax

        def of_row(row: Any) -> Any:
            got: dict[int, Any] = {}

            def col(j: int) -> Any:
                if j not in got:
                    got[j] = lax.index_in_dim(row, j, keepdims=False)
                return got[j]
            return col

        shared = None
        out = []
        for sel in sels:
            if sel is None:
                if shared is None:
                    shared = of_row(lax.index_in_dim(table, 0, keepdims=False))
                out.append(shared)
            elif not sel.ndim:
                out.append(of_row(lax.dynamic_index_in_dim(table, sel, keepdims=False)))
            else:
                out.append(lambda j, sel=sel: lax.index_in_dim(
                    table, j, axis=1, keepdims=False).at[sel].get(mode="promise_in_bounds"))
        return out

    def flat(self, leaves: Any) -> list[Any]:
        """Each chunk's ``leaves`` as one flat array (zeros for a name ``leaves`` lacks)."""
        import jax.numpy as jnp
        from jax import lax

        # (lax.reshape, and none of a 1-d leaf: jnp's reshape traced ~0.25 ms a call)
        return [jnp.concatenate([(leaves[n] if len(shp) == 1 else lax.reshape(leaves[n], (b - a,)))
                                 if n in leaves else jnp.zeros(b - a, self.lay.dtype)
                                 for n, a, b, shp in sp])
                for sp in self.spans]

    def unflat(self, chunks: list[Any], offsets: tuple) -> dict[str, Any]:
        """The tensors of each chunk's flat array (in any order: ``jax.jit`` returns a
        dict's keys sorted; the engine puts them back in layout order). ``offsets``: per
        chunk, None or per tensor its start as a 0-d argument (:func:`slice_offsets`) or
        None (a constant slice)."""
        from jax import lax

        # (no wrapping of negative offsets: 3 ops a tensor fewer to trace, ~1 ms each;
        # the keyword is newer than JAX 0.4.30)
        kw = ({"allow_negative_indices": False} if "allow_negative_indices" in
              inspect.signature(lax.dynamic_slice).parameters else {})
        out = {}
        for sp, x, offs in zip(self.spans, chunks, offsets):
            at = 0
            for i, (n, a, b, shp) in enumerate(sp):
                o = None if offs is None else offs[i]
                piece = (x[at:at + b - a] if o is None else
                         lax.dynamic_slice(x, (o,), (b - a,), **kw))
                out[n] = piece if len(shp) == 1 else lax.reshape(piece, tuple(shp))
                at += b - a
        return out

    def per_tensor(self, rows: list[Any]) -> Any:
        """Per-chunk arrays of per-tensor rows, as one array in layout order."""
        import jax.numpy as jnp

        order = np.argsort([i for chunk in self.bounds for i, _, _ in chunk], kind="stable")
        return jnp.concatenate(rows, axis=0)[order]
