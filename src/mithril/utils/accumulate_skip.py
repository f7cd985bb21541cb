"""Skipping single micro-batches in :class:`~mithril.utils.accumulation.Accumulate`:
``optax.MultiSteps``' ``should_skip_update_fn``.

A predicate ``fn(gradients, windows, params) -> (should_skip, skip_state)`` is asked about
every micro-batch before it is buffered, as ``MultiSteps`` asks about each mini-step with
``(updates, gradient_step, params)``: ``windows`` is ``state.windows`` (its
``gradient_step``). A micro-batch it skips is as if it never came: not added to the sums,
not counted toward ``k`` (its window is completed by the next micro-batch that is not
skipped), nothing else changed but ``state.skip_state`` (the predicate's ``skip_state`` of
the last call, skipped or not, as ``MultiSteps``' ``skip_state``) and the count
``state.num_skipped_micro_batches``.

``should_skip`` is a bool or a boolean scalar array (NumPy, torch or JAX; anything else is
refused with ``ValueError``, as ``MultiSteps`` refuses it). The two predicates here are
optax's, on any backend's gradients (optax's own take JAX and NumPy gradients only):

* :func:`skip_not_finite`: skip a micro-batch with any inf or NaN
  (``{"should_skip", "num_not_finite"}``);
* :func:`skip_large_updates` with ``max_squared_norm`` bound (``functools.partial``): skip
  one whose squared global norm Σ‖g‖² is not below it, NaN included
  (``{"should_skip", "norm_squared"}``). Σ‖g‖² is summed in float64 on NumPy and torch, in
  at least float32 on JAX (optax sums in the gradients' dtype: float16 overflows past
  65504, skipping micro-batches whose norm is finite).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["skip_large_updates", "skip_not_finite"]

#: ``fn(gradients, windows, params) -> (should_skip, skip_state)``
ShouldSkipUpdateFn = Callable[[Mapping[str, Any], int, Any], tuple[Any, Any]]


def _lib(x: Any) -> str:
    return type(x).__module__.split(".", 1)[0]


def _count_not_finite(x: Any) -> int:
    lib = _lib(x)
    if lib == "torch":
        import torch

        return int((~torch.isfinite(x.detach())).sum())
    if lib in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return int(jnp.sum(~jnp.isfinite(x)))
    return int(np.count_nonzero(~np.isfinite(x)))


def _squared_norm(x: Any) -> float:
    lib = _lib(x)
    if lib == "torch":
        return float((x.detach().double() ** 2).sum())
    if lib in ("jax", "jaxlib"):
        import jax.numpy as jnp

        # (float64 needs JAX's x64: at least float32, a float16 sum overflowing at 65504)
        return float(jnp.sum(jnp.square(jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32)))))
    with np.errstate(all="ignore"):
        return float(np.sum(np.square(x, dtype=np.float64)))


def skip_not_finite(gradients: Mapping[str, Any], windows: Any = None, params: Any = None
                    ) -> tuple[bool, dict[str, Any]]:
    """``optax.skip_not_finite``: skip iff a gradient holds inf or NaN. Returns
    ``(should_skip, {"should_skip": should_skip, "num_not_finite": n})``, ``n`` the number of
    non-finite entries over all gradients."""
    n = sum(_count_not_finite(g) for g in gradients.values())
    return n > 0, {"should_skip": n > 0, "num_not_finite": n}


def skip_large_updates(gradients: Mapping[str, Any], windows: Any, params: Any,
                       max_squared_norm: float) -> tuple[bool, dict[str, Any]]:
    """``optax.skip_large_updates``: skip iff ``not Σ‖g‖² < max_squared_norm`` (a NaN norm
    skips). Bind ``max_squared_norm`` with ``functools.partial``. Returns ``(should_skip,
    {"should_skip": should_skip, "norm_squared": Σ‖g‖²})``."""
    norm_sq = sum(_squared_norm(g) for g in gradients.values())
    skip = not norm_sq < max_squared_norm
    return skip, {"should_skip": skip, "norm_squared": norm_sq}


def ask(fn: ShouldSkipUpdateFn, gradients: Mapping[str, Any], windows: int, params: Any
        ) -> tuple[bool, Any]:
    """``fn``'s verdict on one micro-batch as a Python bool, and its ``skip_state``
    (``ValueError`` for anything but a pair led by a boolean scalar)."""
    out = fn(gradients, windows, params)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"should_skip_update_fn must return (should_skip, skip_state), got "
                         f"{type(out).__name__}")
    flag, info = out
    if isinstance(flag, (bool, np.bool_)):
        return bool(flag), info
    dtype = str(getattr(flag, "dtype", None)).removeprefix("torch.")
    shape = getattr(flag, "shape", None)
    shape = None if shape is None else tuple(shape)
    if shape != () or dtype != "bool":
        raise ValueError(f"should_skip_update_fn must return a boolean scalar first, got "
                         f"{type(flag).__name__} of dtype {dtype} and shape {shape}")
    return bool(flag), info
