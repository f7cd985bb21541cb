"""Gradient clipping and the global gradient norm, on any backend's arrays.

The global-norm clip's floor, two conventions (``tests/test_clip_norm_eps.py`` and
``tests/test_clip_eps_option.py`` check both against their peers, a tiny norm and a zero one
included):

* torch's ``clip_grad_norm_``: scale ``min(1, c / (‖g‖ + 1e-6))``. The default of the
  optimizers' fused ``clip_norm=c`` (``clip_eps=1e-6``: every engine, ``optax_transformation``
  and ``make_train_step`` too) and of :func:`clip_gradients`. The 1e-6 keeps a zero norm
  finite, and it counts where ``c`` is small: at ‖g‖ = 1e-7 > c the step is ``c/11``, not
  ``c``; a norm just below ``c`` is still scaled by ``c / (‖g‖ + 1e-6) < 1``.
* optax's ``clip_by_global_norm`` and Keras's ``global_clipnorm``: ``c / ‖g‖`` where
  ``‖g‖ >= c``, else unchanged (no floor): an optimizer's ``clip_eps=0.0`` (the same
  everywhere ``clip_norm`` is fused), or ``clip_gradients(grads, clip_norm=c, eps=0.0)``
  before ``update`` of an optimizer built without ``clip_norm``.

:func:`norm_scale` is the rule, written once for Python numbers, torch tensors and traced
JAX arrays alike (an all-zero gradient with ``eps=0`` is left as it is, as optax leaves it)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .checks import check_positive, is_array
from .engines.common import norm_scale as norm_scale  # (public here: the rule's home)
from .engines.common import normalize_factor


def _sumsq(g: Any) -> float:
    mod = type(g).__module__.split(".", 1)[0]
    if mod == "torch":
        import torch

        return float(torch.sum(g.detach().double() ** 2))
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return float(jnp.sum(jnp.square(g.astype(jnp.float32 if g.dtype.itemsize < 4 else g.dtype))))
    a = np.asarray(g)
    if a.dtype in (np.float32, np.float16):  # squares summed in float64, without a float64 copy
        a = a.ravel()
        return float(np.einsum("i,i->", a, a, dtype=np.float64))
    a = np.asarray(a, dtype=np.float64)
    return float(np.dot(a.ravel(), a.ravel()))


def check_clip_eps(eps: Any) -> float:
    """``clip_eps`` (the global-norm clip's floor) as a float: finite and ``>= 0``."""
    return check_positive("clip_eps", eps)


def _checked(gradients: Any, fn: str) -> Mapping[str, Any]:
    """``gradients`` if it is a dict of NumPy, torch or JAX floating-point arrays; else a
    TypeError naming the key at fault."""
    if not isinstance(gradients, Mapping):
        raise TypeError(f"{fn}: gradients must be a dict of arrays, got {type(gradients).__name__}")
    for k, g in gradients.items():
        if not is_array(g):
            raise TypeError(f"{fn}: gradients['{k}'] is a {type(g).__name__}, not an array")
        # (an integer or bool array was clipped into a float one of another dtype; optax's
        # clip_by_global_norm refuses it, torch's gradients are never integer)
        if (not (g.is_floating_point() or g.is_complex()) if hasattr(g, "is_floating_point")
                else np.dtype(g.dtype).kind in "biu"):
            raise TypeError(f"{fn}: gradients['{k}'] has dtype {g.dtype}; gradients must be "
                            f"floating point")
    return gradients


def global_norm(gradients: Mapping[str, Any]) -> float:
    """‖g‖₂ over all gradients together (accumulated in float64 on NumPy/torch)."""
    return math.sqrt(sum(_sumsq(g) for g in _checked(gradients, "global_norm").values()))


def clip_gradients(gradients: Mapping[str, Any], clip_value: float | None = None,
                   clip_norm: float | None = None, *, eps: float = 1e-6) -> dict[str, Any]:
    """``gradients`` clipped, in a new dict; the arrays given are never modified (those
    nothing clipped, under ``clip_norm`` alone with the norm within it, are returned as
    they are, not copied).

    ``clip_value``: clamp every element to [−clip_value, clip_value].
    ``clip_norm``: scale all gradients by ``min(1, clip_norm / (‖g‖₂ + eps))`` where
    ‖g‖₂ is the global norm (:func:`norm_scale`: torch ``clip_grad_norm_``'s ``eps=1e-6``;
    ``eps=0`` is optax's ``clip_by_global_norm`` and Keras's ``global_clipnorm``, as an
    optimizer's fused ``clip_norm=`` with ``clip_eps=0``; an all-zero gradient with
    ``eps=0`` is left as it is, as optax leaves it). When both are given the norm is
    clipped first, then the values: the same order as the optimizers'
    ``clip_norm=``/``clip_value=``.
    """
    if clip_value is None and clip_norm is None:
        raise ValueError("clip_gradients needs clip_value or clip_norm")
    cv = None if clip_value is None else check_positive("clip_value", clip_value, allow_zero=False)
    cn = None if clip_norm is None else check_positive("clip_norm", clip_norm, allow_zero=False)
    eps = check_positive("eps", eps)
    out = dict(_checked(gradients, "clip_gradients"))
    if cn is not None:
        norm = global_norm(out)
        if not math.isfinite(norm):
            raise FloatingPointError(f"clip_gradients: the global gradient norm is {norm}")
        scale = norm_scale(cn, norm, eps)
        if scale < 1.0:
            out = {k: _scale(g, scale) for k, g in out.items()}
    if cv is not None:
        out = {k: _clip(g, cv) for k, g in out.items()}
    return out


def zero_nans(gradients: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
    """optax ``zero_nans()``: ``gradients`` with every NaN replaced by 0 (inf kept, as
    optax keeps it), in a new dict of new arrays (those given are not modified), and per
    key whether it held a NaN (optax's ``ZeroNansState.found_nan``). Use it before an
    ``update`` or ``Accumulate``'s, where optax chains ``zero_nans()`` first. NumPy, torch
    or JAX arrays (checked first: ``TypeError`` naming the key)."""
    out, found = {}, {}
    for k, g in _checked(gradients, "zero_nans").items():
        mod = type(g).__module__.split(".", 1)[0]
        if mod == "torch":
            import torch

            nan = torch.isnan(g)
            out[k] = torch.where(nan, torch.zeros((), dtype=g.dtype, device=g.device), g)
            found[k] = bool(nan.any())
        elif mod in ("jax", "jaxlib"):
            import jax.numpy as jnp

            nan = jnp.isnan(g)
            out[k], found[k] = jnp.where(nan, jnp.zeros((), g.dtype), g), bool(nan.any())
        else:
            nan = np.isnan(g)
            out[k], found[k] = np.where(nan, g.dtype.type(0), g), bool(nan.any())
    return out, found


def _clip(g: Any, c: float) -> Any:
    mod = type(g).__module__.split(".", 1)[0]
    if mod == "torch":
        import torch

        return torch.clamp(g, -c, c)
    if mod in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp.clip(g, -c, c)
    return np.asarray(np.clip(g, -c, c))  # 0-d stays an array, not a NumPy scalar


def _scale(g: Any, s: float) -> Any:
    return np.asarray(g * s) if isinstance(g, np.ndarray) else g * s


def units(shape: tuple[int, ...]) -> int:
    """How many units :func:`adaptive_clip` norms a tensor of ``shape`` in (optax's
    ``unitwise_norm``): 1 for scalars and vectors (also ``(1, n)``), else the elements of
    the axes it keeps, which are trailing in C order: ``shape[1:]`` for 2-D and 3-D tensors
    (``(in, out)`` layers, multi-head ones), the last axis for 4-D and 5-D kernels."""
    if sum(d != 1 for d in shape) <= 1:
        return 1
    if len(shape) in (2, 3):
        return math.prod(shape[1:])
    if len(shape) in (4, 5):
        return shape[-1]
    raise ValueError(f"adaptive clipping norms tensors of 1 to 5 dimensions, got shape {shape}")


def adaptive_clip(g: Any, p: Any, clipping: float, eps: float = 1e-3) -> Any:
    """optax ``adaptive_grad_clip`` (Brock et al., 2021) for one tensor: each unit ``u`` of
    ``g`` (see :func:`units`) scaled by ``c·max(‖p_u‖, ε) / ‖g_u‖`` where ``‖g_u‖`` exceeds
    that bound, else left as it is. Returns a new array of ``g``'s dtype; ``g`` and ``p`` are
    not modified. float16: the norms and the factor in float32, the factor rounded to
    float16 (a unit's Σ g² past 65504, a norm past 256, was inf there, as in optax's float16:
    the unit's gradient became 0 and its parameter never moved)."""
    from .elementwise import maximum, sqrt, where

    shape = tuple(g.shape)
    n = units(shape)
    if math.prod(shape) == 0:  # no element to clip, and reshape(-1, 0) is ambiguous (raised)
        return g * 1
    g2, p2 = g.reshape(-1, n), p.reshape(-1, n)
    half = str(g.dtype).removeprefix("torch.") == "float16"
    wide = (lambda x: x.float()) if hasattr(g, "float") else (lambda x: x.astype(np.float32))
    gw, pw = (wide(g2), wide(p2)) if half else (g2, p2)
    g_norm, p_norm = sqrt((gw * gw).sum(0)), sqrt((pw * pw).sum(0))
    bound = maximum(p_norm, eps) * clipping
    scale = where(g_norm < bound, 1.0, bound / maximum(g_norm, 1e-6))
    cast = (lambda x: x.to(g.dtype)) if hasattr(g, "float") else (lambda x: x.astype(g.dtype))
    out = (g2 * (cast(scale) if half else scale)[None, :]).reshape(shape)
    return out if out.dtype == g.dtype else cast(out)  # (NumPy bfloat16: was float32)


# -- before every clip: centralization and normalization (the same functions on every path) --
def centralize(g: Any) -> Any:
    """optax ``centralize`` (Yong et al., 2020) of one tensor: a tensor of two or more axes
    less its mean over all axes but the first (``g − mean(g, axes 1..)``, one mean per
    leading index); scalars and vectors unchanged. NumPy, torch or (traced) JAX."""
    if len(g.shape) < 2 or math.prod(g.shape) == 0:
        return g
    return g - g.mean(axis=tuple(range(1, len(g.shape))), keepdims=True)


def pre_clip(gradients: Mapping[str, Any], specs: Mapping[str, tuple[bool, Any, float]]
             ) -> dict[str, Any]:
    """``gradients`` as every clip sees them (new arrays where changed; those given are not
    modified): each tensor ``name`` with ``specs[name] = (centralize, normalize_grad,
    normalize_eps)`` centralized (:func:`centralize`) where the flag is set, then the
    normalizing ones (``normalize_grad`` not None) scaled by ``s / (‖g‖ + ε)``
    (:func:`~.engines.common.normalize_factor`), ‖g‖ the norm of those tensors together,
    after centralization (float64 on NumPy/torch). The numba engine normalizes inside its
    step instead (:func:`~.engines.common.clipped_table`)."""
    out = {n: centralize(g) if specs[n][0] else g for n, g in gradients.items()}
    unit = [n for n in out if specs[n][1] is not None]
    if unit:
        norm = math.sqrt(sum(_sumsq(out[n]) for n in unit))
        for n in unit:
            f = normalize_factor(specs[n][1], norm, specs[n][2])
            out[n] = _scale(out[n], f) if f != 1.0 else out[n]
    return out
