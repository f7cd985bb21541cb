"""DP-SGD (:class:`~mithril.utils.optimizers.DifferentiallyPrivate`, :class:`~mithril.utils.optimizers.DPSGD`)
in the one-program JAX train step: the per-example gradients are ``jax.vmap`` of the
model's forward+VJP over the batch's examples (each a batch of one, as
:func:`~mithril.utils.per_example.per_example_gradients`), clipped, summed, noised and
averaged (the optimizer's own aggregation, its noise the same pure function of the seed,
the parameter's name and the step), then the base optimizer's transformation steps with the
mean; all inside the one ``jax.jit`` program. The outputs are the whole batch's (one more
forward, as the separate calls' ``evaluate``). The parameters the loss does not reach are
left out (not in an example's norm, no noise, no step), as there. Every data key is split
along axis 0; the model's constants are seen whole. The hyperparameters (``l2_norm_clip``,
``noise_multiplier``, ``seed``, ``expected_batch_size``, ``clip_epsilon``) are baked into
the program (a change builds it anew); the step count is the state's ``"dp_count"``."""

from __future__ import annotations

from typing import Any

from ..errors import ShapeError


def check_per_example_model(compiled: Any) -> None:
    """Refuse, at ``make_train_step``, a model whose per-example gradients are not each
    example's own (Dropout, BatchNorm) or that cannot run on one example."""
    prog = getattr(compiled, "_program", None)
    if prog is None:
        raise ShapeError("make_train_step: a DP-SGD step needs per-example gradients: "
                         "compile the model with shapes whose batch dimension is None "
                         "(e.g. shapes={'input': [None, 8]})")
    if prog.has_context:
        raise TypeError("make_train_step: a DP-SGD step needs per-example gradients, and "
                        "the model has Dropout or BatchNorm (random masks or batch "
                        "statistics: no example's gradient is its own)")


def private_gradients(ev: Any, dp: Any, consts: frozenset[str], ptuple: tuple, inputs: dict,
                      cots: dict, count: Any, unreached: frozenset[str]) -> tuple[dict, tuple]:
    """(the whole batch's outputs, the noised mean of the clipped per-example gradients in
    ``ev.names``' order: zeros for the parameters in ``unreached``) at the aggregated
    steps' ``count`` (the state's ``"dp_count"``, traced)."""
    import jax
    import jax.numpy as jnp

    from .optimizers.differentially_private import _aggregate
    from .optimizers.tensorwise import JaxOps

    many = {k: v for k, v in inputs.items() if k not in consts}
    whole = {k: v for k, v in inputs.items() if k in consts}
    sizes = {k: tuple(v.shape[:1]) for k, v in many.items()}
    if len(set(sizes.values())) != 1 or () in sizes.values():  # (while tracing: nothing ran)
        raise ShapeError(f"make_train_step: a DP-SGD step splits every data key along axis 0 "
                         f"into examples, and these disagree on it: "
                         f"{', '.join(f'{k!r} {tuple(many[k].shape)}' for k in many)}")
    batch = next(iter(sizes.values()))[0]
    if batch == 0 and dp.expected_batch_size is None:
        raise ShapeError(f"{type(dp).__name__}: per-example gradients of an empty batch "
                         f"(shapes {sizes}); with Poisson sampling set expected_batch_size, "
                         f"and an empty batch is a step of noise alone (as Opacus takes it)")
    out = ev._fwd(ptuple, inputs)
    if batch:
        def one(example: dict) -> Any:
            return ev._fwd_vjp(ptuple, {**whole, **example}, cots)[1]

        rows = jax.vmap(one)({k: v[:, None] for k, v in many.items()})  # (batches of one)
    else:  # (an empty batch, Poisson sampling's: noise alone, expected_batch_size)
        rows = tuple(jnp.zeros((0, *p.shape), p.dtype) for p in ptuple)
    names = ev.names
    on = {n: rows[i] for i, n in enumerate(names) if n not in unreached}
    clip, std = dp.l2_norm_clip, dp.l2_norm_clip * dp.noise_multiplier
    mean = _aggregate(JaxOps(), on, batch, dp.expected_batch_size or batch, clip,
                      dp.clip_epsilon, std, dp.seed, count.astype(jnp.int32) + 1, bool(std))
    return out, tuple(mean[n] if n in mean else jnp.zeros_like(p)
                      for n, p in zip(names, ptuple, strict=True))
