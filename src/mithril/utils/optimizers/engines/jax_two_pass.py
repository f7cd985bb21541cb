"""Two-pass optimizers (LAMB, LARS, ...) on the jitted JAX engine in one program.

A two-pass step sums per tensor in a first pass (``Optimizer.reduce``), turns the sums
into per-tensor scalars (``Optimizer.tensor_scalars``) and updates with them. The engine
used to run the first pass as a program of its own, read its sums back and compute the
scalars on the host: a wait and a second program per step (LAMB on 200k params in 20
tensors: 2.6 ms a step, 3.4x optax's). Where ``tensor_scalars`` traces without the
optimizer (arithmetic on its arguments only, no tensor slots or state values to commit),
:meth:`JaxEngine._traced_first <.jax_engine.JaxEngine._traced_first>` puts it in the
update's program (:func:`second_table`); otherwise the host's pass stays.
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
    ``reduce`` terms (per chunk: ``parts.sums``, :class:`~.jax_engine._Parts`), its
    ``tensor_scalars`` traced on them, and the per-tensor table ``wide`` with those columns
    inserted after the optimizer's own scalars (as :func:`~.common.two_pass_table` does on
    the host). ``first``: what :meth:`~.jax_engine.JaxEngine._traced_first` found."""
    import jax.numpy as jnp

    reduce_fn, own, n_own, own_end, fn, _ = first
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
