"""The gradient prologue of the traced optax update (:mod:`.optax_transform`,
:mod:`.optax_tensorwise`): what the optimizer's ``update`` does to the gradients before its
math, as jittable JAX: centralization and normalization, unit-wise adaptive clipping, per-tensor norm / RMS clipping, the
global-norm clip (``max_norm / (norm + clip_eps)``: torch's 1e-6 by default, optax's 0 as
an option), clipping by value, and coupled or decoupled weight decay."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..utils.optimizers.elementwise import times_keep
from ..utils.optimizers.engines.common import norm_scale
from ..utils.optimizers.engines.jax_engine import scaled_norm
from .optax_scalars import _Plan, _value


def _tensor_clip_scales(plan: _Plan, grads: list[Any], dt: Any) -> tuple[list, list]:
    """Each tensor's factor from ``clip_tensor_norm`` (Keras ``clipnorm``: ``c / max(‖g‖,
    c)``) then ``clip_block_rms`` (optax ``clip_by_block_rms``: ``1 / max(1, rms(g) / c)``),
    as the engines' ``clipped_table``, and each tensor's Σ g²."""
    import jax.numpy as jnp

    factors, sumsq = [], []
    for i, g in enumerate(grads):
        w = g.astype(jnp.promote_types(g.dtype, jnp.float32))
        sq = jnp.sum(w * w).astype(dt)
        c_norm, c_rms = plan.tensor_clip[plan.index[i]]
        f = jnp.ones((), dt)
        if c_norm is not None:
            f = f * (c_norm / jnp.maximum(jnp.sqrt(sq), c_norm))
        if c_rms is not None:
            rms = jnp.sqrt(sq * f * f / max(int(np.prod(g.shape)), 1))
            f = f / jnp.maximum(1.0, rms / c_rms)
        factors.append(f)
        sumsq.append(sq)
    return factors, sumsq


def _adaptive_clip(g: Any, p: Any, clipping: float, eps: float, name: str) -> Any:
    """:func:`~mithril.utils.optimizers.clipping.adaptive_clip` (optax
    ``adaptive_grad_clip``) of one traced gradient, its norms taken in float32 at least; a
    shape it cannot norm is refused naming the parameter, as the optimizer's ``update``."""
    import jax.numpy as jnp

    from ..utils.optimizers.clipping import units

    try:
        n = units(tuple(g.shape))
    except ValueError as e:
        raise ValueError(f"adaptive_clip: parameter '{name}': {e}") from None
    acc = jnp.promote_types(g.dtype, jnp.float32)
    g2, p2 = g.astype(acc).reshape(-1, n), p.astype(acc).reshape(-1, n)
    g_norm, p_norm = jnp.sqrt(jnp.sum(g2 * g2, 0)), jnp.sqrt(jnp.sum(p2 * p2, 0))
    bound = jnp.maximum(p_norm, eps) * clipping
    scale = jnp.where(g_norm < bound, 1.0, bound / jnp.maximum(g_norm, 1e-6))
    return (g2 * scale[None, :]).reshape(g.shape).astype(g.dtype)


def _pre_clip(grads: list[Any], pre: list[tuple[bool, Any, float]]) -> list[Any]:
    """The traced :func:`~mithril.utils.optimizers.clipping.pre_clip`: each gradient
    centralized where its ``pre`` says, then the normalizing ones scaled by ``s / (‖g‖ +
    ε)`` (the norm of those together, in float32 at least, :func:`scaled_norm`)."""
    from ..utils.optimizers.clipping import centralize, normalize_factor

    grads = [centralize(g) if c else g for g, (c, _, _) in zip(grads, pre)]
    unit = [i for i, (_, s, _) in enumerate(pre) if s is not None]
    if unit:
        norm = scaled_norm([grads[i] for i in unit])
        for i in unit:
            _, s, e = pre[i]
            grads[i] = (grads[i] * normalize_factor(s, norm, e)).astype(grads[i].dtype)
    return grads


def _prologue(opt: Any, plan: _Plan, leaves: list[Any], grads: list[Any],
              rows: list[list[Any]], attrs: list[dict[str, Any]] | None = None,
              names: list[str] | None = None) -> tuple[list[Any], list[Any], Any, list[Any]]:
    """The gradients and params the math sees: first each clipped unit-wise against its
    parameter (``adaptive_clip``, the optimizer's ``update`` does it before anything else),
    then each by its own norm / RMS, then all by the global norm and by value; coupled
    weight decay added to the gradient, decoupled applied to the param (``rows[r][0]``, the
    keep factor). Also the global norm (None when clipping does not need it) and the
    gradients ``nonfinite="skip"`` requires finite (before any clip by norm or value could
    make them so). ``attrs``: each row's traced hyperparameters (``weight_decay``,
    ``clip_value``, ``clip_norm`` among them)."""
    import jax.numpy as jnp

    if getattr(plan, "pre", None) is not None:  # first of all, as the optimizer's update
        grads = _pre_clip(grads, plan.pre)
    if plan.agc is not None:
        names = names or [str(i) for i in range(len(leaves))]
        grads = [g if c is None else _adaptive_clip(g, p, c, eps, n)
                 for g, p, (c, eps), n in zip(grads, leaves, plan.agc, names)]
    attrs = attrs or [{} for _ in plan.views]
    clip_norm = _value(attrs[0].get("clip_norm", opt.clip_norm)) if attrs else opt.clip_norm
    eps = opt.clip_eps  # (never traced: optax_hyperparams)
    checked = list(grads)  # (skip reads whether these are finite: finite_grads)
    norm = scaled_norm(grads) if clip_norm is not None else None
    scales = _tensor_clip_scales(plan, grads, _wide()) if plan.tensor_clip else None
    factors: list[Any] = [None] * len(leaves)
    if scales is not None:
        if clip_norm is not None:  # the clipped gradients' norm
            f, sq = scales
            clipped = jnp.sqrt(sum(s * x * x for s, x in zip(sq, f)))
            gscale = norm_scale(jnp.asarray(clip_norm, clipped.dtype), clipped,
                                jnp.asarray(eps, clipped.dtype))
            factors = [x * gscale for x in f]
        else:
            factors = list(scales[0])
    elif clip_norm is not None:
        gscale = norm_scale(jnp.asarray(clip_norm, norm.dtype), norm, jnp.asarray(eps, norm.dtype))
        factors = [gscale] * len(leaves)
    gs, ps = [], []
    for i, (p, g) in enumerate(zip(leaves, grads)):
        r = plan.index[i]
        cv, l2, dwd = plan.static[r]
        live, a = plan.live[r], attrs[r]
        g = g.astype(p.dtype)
        if factors[i] is not None:
            g = g * factors[i].astype(p.dtype)
        if cv > 0 or "clip_value" in live:
            c = jnp.asarray(_value(a.get("clip_value", cv)), p.dtype)
            g = jnp.clip(g, -c, c)
        if l2 or ("weight_decay" in live and plan.decay[r] == "l2"):
            g = g + jnp.asarray(_value(a.get("weight_decay", l2)), p.dtype) * p
        gs.append(g)
        decays = dwd or ("weight_decay" in live and plan.decay[r] == "decoupled")
        keep = rows[r][0] if p.dtype.itemsize < 4 else rows[r][0].astype(p.dtype)
        ps.append(times_keep(p, keep) if decays else p)  # (half: keep not rounded to it)
    return gs, ps, norm, checked


def _wide() -> Any:
    """The dtype of the per-step scalars and values: float64 with ``jax_enable_x64``."""
    import jax
    import jax.numpy as jnp

    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


#: where an ``OptaxState`` counts the non-finite steps in a row (``max_consecutive_skips``)
CONSECUTIVE = "consecutive_skips"


def given_up(opt: Any, hyperparams: Any, finite: Any) -> tuple[Any, dict[str, Any]]:
    """``nonfinite="skip"`` inside the program: ``(apply, counts)``, whether the step is
    applied (``finite``, or ``max_consecutive_skips=N`` non-finite steps or more in a row
    before it: optax ``apply_if_finite``'s rule) and the new count for ``state.hyperparams``
    (none without ``N``: skipped forever)."""
    import jax.numpy as jnp

    from .optax_scalars import _INT32_MAX

    if opt.max_consecutive_skips is None:
        return finite, {}
    held = hyperparams.get(CONSECUTIVE, jnp.zeros((), jnp.int32))  # (an older state's: 0)
    more = jnp.minimum(held, _INT32_MAX - 1) + 1
    return finite | forced(opt, hyperparams), {
        CONSECUTIVE: jnp.where(finite, 0, more).astype(jnp.int32)}


def forced(opt: Any, hyperparams: Any) -> Any:
    """Whether this step is applied whatever it holds (traced): ``max_consecutive_skips``
    non-finite steps in a row before it (False without the limit)."""
    import jax.numpy as jnp

    n = opt.max_consecutive_skips
    if n is None:
        return jnp.asarray(False)
    return hyperparams.get(CONSECUTIVE, jnp.zeros((), jnp.int32)) >= n

