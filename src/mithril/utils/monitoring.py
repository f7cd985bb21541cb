"""Training diagnostics on any backend: gradient norms and update/parameter ratios.

* :func:`gradient_norms` / :func:`parameter_norms`: ‖x‖₂ of every array of a dict.
* :func:`global_norm`: ‖g‖₂ over all arrays together (what ``clip_norm`` uses).
* :func:`update_ratios`: ‖p_after − p_before‖₂ / ‖p_before‖₂ per parameter, the relative size
  of one update (a common rule of thumb: around 1e-3; much larger means the learning rate is
  too high, much smaller that the parameter barely trains).
* :class:`TrainingMonitor` records all of them step by step.

Norms are accumulated in float64 on NumPy and torch; on JAX in float32 (float64 for float64
arrays, which needs ``jax_enable_x64``). Each call brings back Python floats (one device
synchronisation per call on torch and JAX).

**Take a snapshot before the update.** Built-in optimizers consume their ``params``: on NumPy
and torch the arrays ``update`` returns are views that the next update overwrites in place,
and on JAX they are donated to the next update (deleted). To compare before and after, copy
first::

    before = snapshot(params)
    params, state = optimizer.update(params, grads, state)
    ratios = update_ratios(before, params)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import KeyMismatchError, ShapeError

__all__ = ["TrainingMonitor", "global_norm", "gradient_norms", "parameter_norms", "snapshot",
           "update_ratios"]


def _module(x: Any) -> str:
    return type(x).__module__.split(".", 1)[0]


def _is_jax(x: Any) -> bool:
    return _module(x) in ("jax", "jaxlib")


_JAX_FNS: dict[str, Any] = {}


def _jax_fn(kind: str) -> Any:
    fn = _JAX_FNS.get(kind)
    if fn is None:
        import jax
        import jax.numpy as jnp

        def acc(x):
            return x.astype(jnp.promote_types(x.dtype, jnp.float32))

        def norms(xs):
            return [jnp.sqrt(jnp.sum(jnp.square(acc(x)))) for x in xs]

        def diff_norms(a, b):
            return [jnp.sqrt(jnp.sum(jnp.square(acc(x) - acc(y)))) for x, y in zip(a, b, strict=True)]

        fn = _JAX_FNS[kind] = jax.jit(norms if kind == "norms" else diff_norms)
    return fn


def _norm_list(arrays: list[Any]) -> list[float]:
    if not arrays:
        return []
    x0 = arrays[0]
    if _module(x0) == "torch":
        import torch

        # (an integer or bool tensor, which vector_norm refuses, widened first: as NumPy's
        # and JAX's norms of one)
        return torch.stack([torch.linalg.vector_norm(
            x.detach() if x.is_floating_point() or x.is_complex() else x.detach().double(),
            dtype=torch.float64) for x in arrays]).tolist()
    if _is_jax(x0):
        import jax

        return [float(v) for v in jax.device_get(_jax_fn("norms")(list(arrays)))]
    out = []
    for x in arrays:
        a = np.asarray(x, dtype=np.float64).reshape(-1)
        out.append(math.sqrt(float(np.dot(a, a))))
    return out


def _hosted(arrays: list[Any]) -> list[np.ndarray]:
    """float64 NumPy copies of ``arrays`` (torch tensors detached, from any device)."""
    return [x.detach().cpu().double().numpy() if _module(x) == "torch"
            else np.asarray(x, dtype=np.float64) for x in arrays]


def _diff_norm_list(before: list[Any], after: list[Any]) -> list[float]:
    if not before:
        return []
    x0 = after[0]
    if any(_module(x) != _module(x0) for x in (*before, *after)):  # (a snapshot of another
        before, after, x0 = _hosted(before), _hosted(after), None  # library: on the host)
    if _module(x0) == "torch":
        import torch

        return torch.stack([torch.linalg.vector_norm(a.detach().double() - b.detach().double())
                            for b, a in zip(before, after, strict=True)]).tolist()
    if _is_jax(x0):
        import jax

        return [float(v) for v in jax.device_get(_jax_fn("diff")(list(after), list(before)))]
    out = []
    for b, a in zip(before, after, strict=True):
        with np.errstate(invalid="ignore", over="ignore"):  # (inf - inf: NaN, reported)
            d = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).reshape(-1)
            out.append(math.sqrt(float(np.dot(d, d))))
    return out


def _check(tree: Any, what: str) -> Mapping[str, Any]:
    """``tree`` if it is a dict of NumPy, torch or JAX arrays; else a TypeError naming the
    key at fault (checked before any computation)."""
    from .optimizers.checks import is_array

    if not isinstance(tree, Mapping):
        raise TypeError(f"{what} must be a dict of arrays, got {type(tree).__name__}")
    for k, x in tree.items():
        if not is_array(x):
            raise TypeError(f"{what}['{k}'] is a {type(x).__name__}, not a NumPy, torch or JAX array")
    return tree


def gradient_norms(gradients: Mapping[str, Any]) -> dict[str, float]:
    """‖g‖₂ of every gradient, keyed like ``gradients``."""
    g = _check(gradients, "gradients")
    return dict(zip(g, _norm_list(list(g.values())), strict=True))


def parameter_norms(params: Mapping[str, Any]) -> dict[str, float]:
    """‖p‖₂ of every parameter."""
    p = _check(params, "params")
    return dict(zip(p, _norm_list(list(p.values())), strict=True))


def global_norm(arrays: Mapping[str, Any]) -> float:
    """‖·‖₂ over all arrays together: √(Σ‖xᵢ‖²); inf/NaN propagate."""
    return math.sqrt(sum(n * n for n in _norm_list(list(_check(arrays, "arrays").values()))))


def snapshot(params: Mapping[str, Any]) -> dict[str, Any]:
    """Independent copies of ``params`` (take one before an optimizer update)."""
    out = {}
    for k, x in _check(params, "params").items():
        if _module(x) == "torch":
            out[k] = x.detach().clone()
        elif _is_jax(x):
            import jax.numpy as jnp

            out[k] = jnp.array(x, copy=True)
        else:
            out[k] = np.array(x, copy=True)
    return out


def update_ratios(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float]:
    """‖after − before‖₂ / ‖before‖₂ per parameter (keys of ``before``).

    A parameter with ‖before‖ = 0 (e.g. a bias initialised to zeros) gives ``inf`` if it
    moved and ``0.0`` if it did not; a NaN in ``before`` or ``after`` gives NaN (as torch's
    ``(a - b).norm() / b.norm()``). ``before`` must be a :func:`snapshot`, not the dict you
    passed to ``update`` (see the module notes).
    """
    b, a = _check(before, "before"), _check(after, "after")
    missing = sorted(set(b) - set(a))
    if missing:
        raise KeyMismatchError(f"update_ratios: 'after' lacks {missing}")
    for k in b:
        if tuple(b[k].shape) != tuple(a[k].shape):
            raise ShapeError(f"update_ratios: before['{k}'] has shape {tuple(b[k].shape)}, "
                             f"after['{k}'] {tuple(a[k].shape)}")
    names = list(b)
    bl, al = [b[k] for k in names], [a[k] for k in names]
    deltas, norms = _diff_norm_list(bl, al), _norm_list(bl)
    out = {}
    for k, d, n in zip(names, deltas, norms, strict=True):
        if n > 0 or math.isnan(n) or math.isnan(d):  # (a NaN before or after stays NaN,
            out[k] = d / n if n > 0 else math.nan  # never "did not move")
        else:
            out[k] = math.inf if d > 0 else 0.0
    return out


class TrainingMonitor:
    """Records gradient norms and update ratios step by step::

        monitor = TrainingMonitor()
        for batch in batches:
            _, grads = model.evaluate(params, batch, output_gradients={"loss": 1.0})
            monitor.before_update(params)
            params, state = optimizer.update(params, grads, state)
            record = monitor.after_update(params, grads)

    Each record holds ``global_grad_norm``, ``grad_norms`` (per parameter), ``update_ratios``
    (per parameter) and ``nonfinite`` (names of gradients with an inf/NaN norm);
    ``history`` keeps them all (``keep_history=False`` keeps only the last).
    """

    def __init__(self, keep_history: bool = True) -> None:
        self.keep_history = keep_history
        self.history: list[dict[str, Any]] = []
        self._before: dict[str, Any] | None = None

    def before_update(self, params: Mapping[str, Any]) -> None:
        self._before = snapshot(params)

    def after_update(self, params: Mapping[str, Any], gradients: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
        rec: dict[str, Any] = {}
        if gradients is not None:
            norms = gradient_norms(gradients)
            rec["grad_norms"] = norms
            rec["global_grad_norm"] = math.sqrt(sum(n * n for n in norms.values()))
            rec["nonfinite"] = [k for k, n in norms.items() if not math.isfinite(n)]
        if self._before is not None:
            rec["update_ratios"] = update_ratios(self._before, params)
            self._before = None
        if self.keep_history:
            self.history.append(rec)
        else:
            self.history = [rec]
        return rec

    def series(self, key: str, name: str | None = None) -> list[Any]:
        """``history`` of one field, e.g. ``series("global_grad_norm")`` or
        ``series("update_ratios", "linear_0.weight")``."""
        return [r[key] if name is None else r[key][name] for r in self.history if key in r]
