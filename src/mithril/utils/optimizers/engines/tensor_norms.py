"""The read-only first pass of a fused per-tensor step (Adafactor's and SM3's numba kernels):
each tensor's Σ g², the global norm and the gradient scale that clipping asks for."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..clipping import norm_scale
from .common import must_skip
from .kernels import segment_sumsq_kernel


def clip_scales(opt: Any, state: Any, gptr: Any, gradients: Any, sizes: np.ndarray,
                index: np.ndarray, views: list[Any]) -> tuple[float | None, np.ndarray, bool]:
    """``(norm, scale, skip)`` for the tensors of ``state``'s layout (``sizes``: their
    element counts, in the kernel's geometry order; ``index`` / ``views``: each tensor's
    group row). Only where clipping needs it (``clip_norm``, a group's ``clip_tensor_norm``
    or ``clip_block_rms``) the gradients are read once: each tensor's Σ g² in float64 (its
    segments summed in order, so the result does not depend on the thread count), the global
    norm, each tensor's own scale, then ``clip_norm``'s over the scaled norm (‖g‖ +
    ``clip_eps``). ``norm`` is None (and ``scale`` ones) when nothing asked; ``skip``: the
    step is skipped (a non-finite norm under ``nonfinite="skip"``)."""
    from ..tensorwise import _tensor_clip  # (tensorwise imports the engines)

    scale = np.ones(len(sizes))
    per_tensor = any(getattr(v, "clip_tensor_norm", None) is not None
                     or getattr(v, "clip_block_rms", None) is not None for v in views)
    if opt.clip_norm is None and not per_tensor:
        return None, scale, False
    eng = state.engine
    plan = eng._plan
    seg = np.zeros(len(plan.seg_t), dtype=np.float64)
    plan.run(segment_sumsq_kernel(state.layout.dtype), (), gptr, (seg,), with_offsets=False)
    sq = np.zeros(len(sizes), dtype=np.float64)
    np.add.at(sq, plan.seg_t, seg)  # segments in order: thread-count independent
    norm = math.sqrt(sq.sum())
    if must_skip(opt, norm, gradients, eng.to_numpy):
        return norm, scale, True
    if per_tensor:
        scale = np.array([_tensor_clip(views[index[i]], sq[i], int(sizes[i]))
                          for i in range(len(sizes))])
    if opt.clip_norm is not None:
        clipped = math.sqrt(float(np.sum(scale * scale * sq)))
        scale = scale * norm_scale(opt.clip_norm, clipped, opt.clip_eps)
    return norm, scale, False


def dry_run_verdict(opt: Any, state: Any, params: Any, gradients: Any, norm: float | None,
                    out: np.ndarray, bad: np.ndarray) -> tuple[float, tuple | None]:
    """After a fused per-tensor step's dry run (``nonfinite="skip"`` / ``"raise"``: every
    new value computed, nothing stored): the global norm (from the run's per-tensor Σ g²
    where no clipping pass took it) and, where the step must not be applied, the engines'
    result for it ``(params, False, norm, finite)``; None: apply it. ``"raise"`` raises
    naming the tensors whose new values are not finite."""
    from .common import nonfinite_result_error

    if norm is None:
        norm = math.sqrt(float(out.sum()))
        if must_skip(opt, norm, gradients, state.engine.to_numpy):
            return norm, (dict(params), False, norm, True)
    if bad.any():
        if opt.nonfinite == "raise":
            names = state.layout.name_list
            raise nonfinite_result_error(opt, [names[i] for i in np.flatnonzero(bad)])
        return norm, (dict(params), False, norm, False)
    return norm, None
