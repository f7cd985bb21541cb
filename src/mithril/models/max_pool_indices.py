"""``MaxPool1D/2D/3D(return_indices=True)``: the pool and its indices, as torch's
``max_pool{1,2,3}d(..., return_indices=True)``.

The indices (int64, the output's shape; int32 on JAX without x64, JAX's integers) hold, per output, the flat position of its window's
maximum within the input's (n, c) plane: l, h·W + w or (d·H + h)·W + w of the unpadded
input, torch's layout, which ``MaxUnpool1D`` / ``MaxUnpool2D`` read. The element is the one
the pool's gradient goes to (its first maximum in window order, its last NaN where the
window holds one, its first element inside the input where all are −inf), for every padding
(per side too), dilation, ``ceil_mode`` and an unbatched input. A dilated window of padding
only has no element: torch's index there is garbage, ours is clipped into the plane
(unspecified). The indices are piecewise constant: no gradient flows through them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .conv import offset_slices, out_sizes, unbatched
from .model import IOKey, Model
from .operator import Operator, backend_of


class MaxPoolIndices(Operator):
    """The indices output of a max pool ``pool`` (a ``MaxPool1D/2D/3D``; module docstring)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def infer_shape(self, shapes):
        return self.pool.infer_shape(shapes)

    def forward(self, xp: Any, input: Any) -> Any:
        pool = self.pool
        if unbatched(input, pool.nd):  # as a batch of one, as torch
            return self.forward(xp, input[None])[0]
        kind = backend_of(xp)
        if kind == "torch":
            return self._torch(input)
        if kind == "jax":
            return self._flat(xp, self._jax_code(input), tuple(input.shape[2:]))
        _, (res, _) = pool.forward_residuals(np, input)
        if isinstance(res, np.ndarray):  # the compiled pass: (N, *out, C) kernel offsets
            n, c = input.shape[:2]
            code = np.moveaxis(res.reshape(n, res.size // max(n * c, 1), c), -1, 1).reshape(
                n, c, *out_sizes(input.shape[2:], pool.kernel_size, pool.stride, pool.dilation,
                                 pool._pads(input.shape[2:]), type(pool).__name__))
        else:  # one-hot masks per kernel offset; none set: a window of padding only
            code = np.full(res[0].shape, len(res), np.int64)
            for k in range(len(res) - 1, -1, -1):
                np.copyto(code, k, where=res[k])
        return self._flat(np, code.astype(np.int64), tuple(input.shape[2:]))

    def _torch(self, x: Any) -> Any:
        """torch's indices; with padding per side, those of the −inf padded input (as the
        pool's ``_torch_asymmetric`` picks) moved to the unpadded plane."""
        import torch.nn.functional as F

        pool = self.pool
        fn, x = getattr(F, f"max_pool{pool.nd}d"), x.detach()
        if pool.symmetric:
            return fn(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                      ceil_mode=pool.ceil_mode, return_indices=True)[1]
        idx, flat, step = pool._torch_asymmetric(fn, F, x, indices=True), 0, 1
        for n, (lo, hi) in zip(reversed(x.shape[2:]), reversed(pool.pads)):
            flat = flat + (idx % (n + lo + hi) - lo).clamp(0, n - 1) * step
            idx, step = idx // (n + lo + hi), step * n
        return flat

    def _jax_code(self, x: Any) -> Any:
        """The kernel offset per output, as the pool's JAX JVP picks it."""
        import jax
        import jax.numpy as jnp
        from jax import lax

        pool, x = self.pool, lax.stop_gradient(x)
        spatial = tuple(x.shape[2:])
        pads = pool._pads(spatial)
        out = out_sizes(spatial, pool.kernel_size, pool.stride, pool.dilation, pads,
                        type(pool).__name__)
        offsets = [offset_slices(off, pool.stride, pool.dilation, out)
                   for off in np.ndindex(*pool.kernel_size)]
        xpad = jnp.pad(x, ((0, 0), (0, 0), *pads), constant_values=-np.inf)
        code = pool._jax_codes(xpad, pool._jax(x), offsets, spatial)
        return code.astype(jax.dtypes.canonicalize_dtype(np.int64))  # int32 without x64

    def _flat(self, xp: Any, code: Any, spatial: tuple[int, ...]) -> Any:
        """Kernel offsets (row-major) to flat positions in the unpadded input plane."""
        pool = self.pool
        pads, nd = pool._pads(spatial), pool.nd
        flat = 0
        for i, (n, k, s, d, (lo, _)) in enumerate(zip(spatial, pool.kernel_size, pool.stride,
                                                      pool.dilation, pads)):
            o = code.shape[2 + i]
            start = (np.arange(o, dtype=np.int64) * s - lo).reshape((o,) + (1,) * (nd - 1 - i))
            u = (code // math.prod(pool.kernel_size[i + 1:])) % k
            # a window of padding only (code = prod(kernel)) lands outside: clipped
            pos = xp.clip(xp.asarray(start) + u * d, 0, n - 1)
            flat = flat * n + pos
        return flat

    def vjp(self, g, out, args, wrt):
        return {"input": np.zeros_like(args["input"])}

    def __repr__(self) -> str:
        return f"MaxPoolIndices({self.pool!r})"


class MaxPoolWithIndices(Model):
    """A max pool with two outputs: ``output`` (the pool's) and ``indices``
    (:class:`MaxPoolIndices`); input ``input``. What ``MaxPool1D/2D/3D(...,
    return_indices=True)`` builds."""

    def __init__(self, pool: Any) -> None:
        super().__init__()
        self.pool = pool
        self |= pool.connect(input="input", output="output")
        self |= MaxPoolIndices(pool).connect(input="input", output=IOKey("indices"))
        self.set_cout("output")

    def __repr__(self) -> str:
        return repr(self.pool)[:-1] + ", return_indices=True)"

