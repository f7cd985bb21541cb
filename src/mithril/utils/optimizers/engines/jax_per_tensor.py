"""Per-tensor scalars computed inside the jitted JAX engine's program: a two-pass
optimizer's (LAMB, LARS, ...) and per-tensor clipping's (``clip_tensor_norm``,
``clip_block_rms``).

Both need sums per tensor before the update: a two-pass step sums its ``reduce`` terms and
turns them into per-tensor scalars (``Optimizer.tensor_scalars``); per-tensor clipping sums
each gradient's squares and scales it. The engine used to run a program for the sums, read
them back and compute the scalars on the host: a wait for the device and a second program
per step (LAMB on 200k params in 20 tensors: 2.6 ms a step, 3.4x optax's; Adam with
``clip_tensor_norm``: 2.1 ms against Adam's 0.7). Here the update's program computes them
(:func:`second_table`, :func:`clip_scales`). A ``tensor_scalars`` that reads the optimizer's
settings, keeps tensor slots or state values, or does not trace keeps the host's pass
(:meth:`JaxEngine._traced_first <.jax_engine.JaxEngine._traced_first>`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class _NoSelf:
    """What a traced ``tensor_scalars`` gets as ``self``: reading any attribute fails, so
    one that reads the optimizer's settings is found when it is first traced."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"tensor_scalars reads self.{name}")


def extra_columns(fn: Any, n: int, k: int, n_own: int, sizes: np.ndarray) -> int | None:
    """How many columns ``tensor_scalars`` (the function ``fn``) adds for ``n`` tensors,
    ``k`` sums and ``n_own`` scalars, found by tracing it (``jax.eval_shape``: nothing
    runs); None where it does not trace without ``self``."""
    import jax

    spec = jax.ShapeDtypeStruct((n,), np.float32)
    try:
        out = jax.eval_shape(lambda t, sums, cols: fn(_NoSelf(), t, sums, cols, {}, {}, sizes),
                             jax.ShapeDtypeStruct((), np.int32), (spec,) * k, (spec,) * n_own)
        extra, tensors, values = out
    except Exception:  # noqa: BLE001 - anything that does not trace: the host's pass
        return None
    return None if tensors or values else len(extra)


def second_table(parts: Any, first: tuple, wide: Any, ps: list, gs: list, cols: list,
                  slots: Any, t: Any) -> Any:
    """Inside a one-program two-pass step: the per-tensor sums of the optimizer's
    ``reduce`` terms (per chunk: ``parts.sums``, :class:`~.jax_parts.Parts`), its
    ``tensor_scalars`` traced on them, and the per-tensor table ``wide`` with those columns
    inserted after the optimizer's own scalars (as :func:`~.common.two_pass_table` does on
    the host). ``first``: what :meth:`~.jax_engine.JaxEngine._traced_first` found."""
    import jax.numpy as jnp

    reduce_fn, own, n_own, fn, _ = first
    own_end = 4 + n_own  # (the prologue's four columns, then the optimizer's own)
    out = []
    for c, (p, g, col) in enumerate(zip(ps, gs, cols)):
        terms = reduce_fn(p * col(3), g, *(slots[s][c] for s in own),
                          *(col(j) for j in range(4, 4 + n_own)))
        out.append(jnp.stack([parts.sums(c, x.astype(wide.dtype)) for x in terms], axis=1))
    n = wide.shape[0]
    sums = parts.per_tensor(out) if out else jnp.zeros((n, 0), wide.dtype)
    extra = fn(_NoSelf(), t, tuple(sums[:, k] for k in range(sums.shape[1])),
               tuple(wide[:, j] for j in range(4, own_end)), {}, {}, parts.lay.sizes)[0]
    extra = [jnp.broadcast_to(jnp.asarray(e, wide.dtype), (n,)) for e in extra]
    return jnp.concatenate([wide[:, :own_end], *(e[:, None] for e in extra),
                            wide[:, own_end:]], axis=1)


def clip_spec(opt: Any, state: Any) -> tuple:
    """Per-tensor clipping as constants of the program (and part of its cache key): each
    tensor's ``clip_tensor_norm`` and ``clip_block_rms`` (None where off; a NaN would make
    every key a new one), its size, and whether ``clip_norm`` (global) applies to the
    clipped gradients."""
    index, views = opt.group_rows(state)
    per = [(getattr(views[r], "clip_tensor_norm", None), getattr(views[r], "clip_block_rms", None))
           for r in index]
    return (tuple(None if c is None else float(c) for c, _ in per),
            tuple(None if c is None else float(c) for _, c in per),
            tuple(int(x) for x in state.layout.sizes), opt.clip_norm is not None)


def clip_scales(parts: Any, spec: tuple, wide: Any, gs: list, clip_norm: Any) -> Any:
    """Inside the program: the per-tensor table ``wide`` with each tensor's clipping scale
    (and the global ``clip_norm``'s, measured on the clipped gradients) in column 0, from
    ``gs``, the chunks' flat gradients as the passes see them (after adaptive clipping).
    As :func:`~.common.clipped_table` on the host: Keras ``clipnorm`` scales a tensor by
    ``c / max(‖g‖, c)``, then optax ``clip_by_block_rms`` by ``1 / max(1, rms(g) / c)``."""
    import jax.numpy as jnp

    c_norm, c_rms, sizes, global_on = spec
    dt = wide.dtype
    sq = parts.sumsq(gs, dt)
    c_norm, c_rms = (np.array([np.nan if c is None else c for c in x]) for x in (c_norm, c_rms))
    f = jnp.ones_like(sq)
    if not np.isnan(c_norm).all():
        c = jnp.asarray(np.nan_to_num(c_norm, nan=1.0), dt)
        f = jnp.where(np.isnan(c_norm), f, c / jnp.maximum(jnp.sqrt(sq), c))
    if not np.isnan(c_rms).all():
        c = jnp.asarray(np.nan_to_num(c_rms, nan=1.0), dt)
        rms = jnp.sqrt(sq * f * f / np.maximum(np.asarray(sizes, np.float64), 1.0).astype(dt))
        f = jnp.where(np.isnan(c_rms), f, f / jnp.maximum(1.0, rms / c))
    if global_on:
        clipped = jnp.sqrt(jnp.sum(sq * f * f))
        f = f * jnp.minimum(1.0, clip_norm.astype(dt) / (clipped + 1e-6))
    return jnp.concatenate([wide[:, :1] * f[:, None], wide[:, 1:]], axis=1)
