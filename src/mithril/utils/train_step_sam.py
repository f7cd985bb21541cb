"""SAM / ASAM (:class:`~mithril.utils.optimizers.SAM`) in the one-program JAX train step:
the second gradient, at the perturbed point, is a second forward+VJP of the model inside
the same ``jax.jit`` program, and the base optimizer's transformation steps the params with
it. What ``SAM.update`` does with the model as its closure (``make_train_step``'s separate
calls), traced::

    g  = ∇L(w)           e = rho · g / (‖g‖ + eps)     (ASAM: rho · w²·g / (‖|w|·g‖ + eps))
    g' = ∇L(w + e)       w ← base step at w with g'

over the parameters the loss reaches (the others are not perturbed and not in ‖g‖; the
base leaves them out). ‖·‖ is taken in the values' dtype (float32 unless
``jax_enable_x64``), where ``update`` takes it in float64 on the host: rounding apart, the
same numbers. The outputs are those at ``w``. A model with context operators (Dropout,
BatchNorm: a mask or statistics per evaluation) and a loss-aware base keep the separate
calls; ``rho``, ``adaptive`` and ``eps`` are baked into the program (a change builds it
anew)."""

from __future__ import annotations

from typing import Any


def fuses(optimizer: Any, compiled: Any) -> bool:
    """Whether ``optimizer`` is a SAM the one program can run on ``compiled``."""
    from .optimizers.sam import SAM

    return (isinstance(optimizer, SAM) and not compiled.program.has_context
            and not getattr(optimizer.base_optimizer, "needs_loss", False))


def perturbed_gradients(ev: Any, sam: Any, ptuple: tuple, inputs: dict, cots: dict,
                        grads: tuple, unreached: frozenset[str]) -> tuple:
    """The gradients at ``w + e`` (module docs) of the parameters the loss reaches, the
    others' as they were (``grads``: at ``w``, in ``ev.names``' order)."""
    import jax.numpy as jnp

    from ..interop.optax_prologue import _wide

    names, wide = ev.names, _wide()
    on = [i for i, n in enumerate(names) if n not in unreached]
    scaled = [jnp.abs(ptuple[i]) * grads[i] if sam.adaptive else grads[i] for i in on]
    norm = jnp.sqrt(sum((jnp.vdot(s.astype(wide), s.astype(wide)) for s in scaled),
                        jnp.zeros((), wide)))
    denom = norm + jnp.asarray(sam.eps, wide)
    # (eps=0 and a zero gradient: NaN, as optax's normalize())
    scale = jnp.where(denom != 0, sam.rho / jnp.where(denom != 0, denom, 1), jnp.nan)
    point = list(ptuple)
    for i in on:
        p, g, s = ptuple[i], grads[i], scale.astype(ptuple[i].dtype)
        point[i] = p + (p * p * g * s if sam.adaptive else g * s)
    _, adv = ev._fwd_vjp(tuple(point), inputs, cots)
    keep = set(on)
    return tuple(adv[i] if i in keep else grads[i] for i in range(len(names)))
