"""What the whole-tensor kernels (Adafactor's :mod:`.factored_kernels`, SM3's
:mod:`.sm3_kernels`) share: an element's weight averages (EMA/SWA, :mod:`..averaging`) and
their probe, a tensor without gradient, and the per-layout cache of a kernel's geometry
table and claim order. The numba functions are made by the caller's factory, compiled with
the caller's flags (its fastmath set or IEEE), so each kernel's results stay its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..averaging import _jitable, average
from .kernels import exponent_bits


def average_parts(IT: Any, copy: bool, dry: bool, n_avg: int, jit: Any, inline: Any
                  ) -> tuple[Any, Any]:
    """``(averaged, no_grad)`` for a kernel whose probe is the integer ``IT`` (see
    :func:`.kernels.exponent_bits`), ``n_avg`` averages (``A0``, ``A1``) moving, nothing
    written where ``dry``, the params read from ``P`` and written to ``Q`` where ``copy``:

    * ``averaged(p, x0, x1, a0, a1) -> (v0, v1, probe)``: the new averages of an element
      whose new value is ``p`` (old averages ``x0``, ``x1``, weights ``a0``, ``a1``);
      ``v1`` is ``v0`` with one average, so the probe is of the averages alone. Scalars
      only: an array argument of an inlined function keeps its loop from being vectorised.
    * ``no_grad(P, Q, A0, A1, a0, a1) -> probe``: a tensor without gradient, unchanged
      (copied to ``Q``), its averages moving toward it.
    """
    avg = _jitable(average)

    @inline
    def averaged(p, x0, x1, a0, a1):  # pragma: no cover - compiled by numba
        v0 = avg(p, x0, a0) if n_avg > 0 else p
        v1 = avg(p, x1, a1) if n_avg > 1 else v0
        return v0, v1, IT(max(exponent_bits(v0), exponent_bits(v1)))

    @jit
    def no_grad(P, Q, A0, A1, a0, a1):  # pragma: no cover - compiled by numba
        z = IT(0)
        for j in range(P.shape[0]):
            p = P[j]
            if copy and not dry:
                Q[j] = p
            if n_avg > 0:
                v0, v1, za = averaged(p, A0[j], A1[j] if n_avg > 1 else p, a0, a1)
                z = IT(max(z, za))
                if not dry:
                    A0[j] = v0
                    if n_avg > 1:
                        A1[j] = v1
        return z

    return averaged, no_grad


def layout_geometry(opt: Any, state: Any, attr: str,
                    build: Callable[[Any], np.ndarray | None]) -> tuple | None:
    """``(geometry table, claim order)`` of ``state``'s layout, the table ``build(layout)``
    (None: the kernel does not take these tensors), cached on ``opt`` under ``attr`` for
    the last few layouts. The order is the NumPy engines': whole tensors, largest first
    (stable), empty ones left out; None where ``build`` gave None."""
    lay = state.layout
    cache = opt.__dict__.setdefault(attr, {})
    hit = cache.get(id(lay))
    if hit is None or hit[0] is not lay:
        if len(cache) >= 4:
            cache.clear()
        geo = build(lay)
        if geo is None:
            hit = cache[id(lay)] = (lay, None)
        else:
            sizes = geo[:, 1]  # (both tables' column 1: the tensor's size)
            order = np.argsort(-sizes, kind="stable")
            hit = cache[id(lay)] = (lay, (geo, order[sizes[order] > 0].astype(np.int64)))
    return hit[1]
