"""In-memory state dicts of an :class:`~mithril.utils.accumulation.Accumulate` run, mid-window
included: :func:`state_dict` / :func:`load_state_dict`, behind
:meth:`Accumulate.state_dict <mithril.utils.accumulation.Accumulate.state_dict>` and
:meth:`Accumulate.load_state_dict <mithril.utils.accumulation.Accumulate.load_state_dict>`.

The same conventions as the optimizers' own ``state_dict``: plain Python values and arrays,
NumPy ones or, with ``arrays="torch"``, CPU torch tensors (``torch.save`` then
``torch.load(weights_only=True)`` with no allowed globals; a load takes either), the wrapped
optimizer's state dict (of the same ``arrays``) nested under ``"inner"``, everything checked
before anything changes. Keys::

    optimizer          "Accumulate"
    k                  the int k, or None for a callable k (an every-k schedule: code, which
                       the loading Accumulate must have itself)
    inner              the wrapped optimizer's state_dict(state.inner)
    # with a state only (all or none of them):
    windows            windows emitted (optax.MultiSteps' gradient_step)
    count              micro-batches buffered in the current window (MultiSteps' mini_step)
    total_weight       their summed weights (0.0 when none)
    sums               parameter -> the buffered weighted gradient sum (an array of
                       ``arrays``; float32 for half-precision gradients), for the
                       parameters with gradients
    applied            whether the last update stepped the wrapped optimizer
    last_step_skipped  whether that step was skipped (non-finite)
    # optional, with the window (absent from older state dicts: 0)
    num_skipped_micro_batches   micro-batches a should_skip_update_fn skipped
                                (``state.skip_state``, the predicate's last output, is not
                                saved: None when loaded)

Loaded, each buffered sum is for gradients of its parameter's dtype (float32 buffers for
float16 / bfloat16 parameters) on its parameter's backend and device, as the resumed run's
gradients will be (the convention of :mod:`.checkpoint_accumulate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import KeyMismatchError, ShapeError
from .accumulation import Accumulate, AccumulateState
from .gradient_accumulator import _is_half_dtype, _kind
from .optimizers.checks import check_int, describe
from .optimizers.serialization import _numeric, _torch_tensor

__all__ = ["check_window", "load_state_dict", "refuse_overflow", "state_dict"]

_TOP = ("optimizer", "k", "inner")
_WINDOW = ("windows", "count", "total_weight", "sums", "applied", "last_step_skipped")
_SKIPPED = "num_skipped_micro_batches"


def _to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of a buffered sum (never bfloat16 / float16: those buffers are float32)."""
    if _kind(x) == "torch":
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True)


def check_window(acc: Accumulate, state: AccumulateState) -> None:
    """``ValueError`` if ``state`` buffers ``k`` or more micro-batches (``acc.k`` lowered
    mid-window: the next update emits them all), which no load would take back."""
    k, count = acc.k_for(state), state.accumulator.count
    if count >= k:
        raise ValueError(f"the state buffers {count} micro-batch(es) but k is now {k} (set "
                         f"mid-window): the next update emits them; save after it")


def state_dict(acc: Accumulate, state: AccumulateState | None = None, *,
               arrays: str = "numpy") -> dict[str, Any]:
    """``acc``'s state dict (see the module docs); with ``state``, the window too.
    ``arrays``: the wrapped optimizer's slots' and the buffered sums' type, ``"numpy"`` or
    ``"torch"`` (CPU tensors: ``torch.load(weights_only=True)`` with no allowed globals)."""
    if arrays not in ("numpy", "torch"):
        raise ValueError(f"Accumulate.state_dict: arrays must be 'numpy' or 'torch', got "
                         f"{arrays!r:.40}")
    inner_sd = getattr(acc.optimizer, "state_dict", None)
    if not callable(inner_sd):
        raise TypeError(f"Accumulate.state_dict: the wrapped {type(acc.optimizer).__name__} "
                        f"has no state_dict")
    if state is not None and not isinstance(state, AccumulateState):
        raise TypeError(f"Accumulate.state_dict: state must come from Accumulate.init/update "
                        f"(an AccumulateState), got {type(state).__name__}")
    out: dict[str, Any] = {"optimizer": "Accumulate",
                           "k": None if callable(acc.k) else int(acc.k),
                           "inner": inner_sd(None if state is None else state.inner,
                                             **({"arrays": arrays} if arrays != "numpy" else {}))}
    if state is not None:
        check_window(acc, state)
        buf = state.accumulator
        host = _torch_tensor if arrays == "torch" else np.asarray
        out.update(windows=int(state.windows), count=int(buf.count),
                   total_weight=float(buf.total_weight),
                   sums={n: host(_to_numpy(v)) for n, v in (buf._sum or {}).items()},
                   applied=bool(state.applied), last_step_skipped=bool(state.last_step_skipped),
                   num_skipped_micro_batches=int(state.num_skipped_micro_batches))
    return out


def _checked_k(acc: Accumulate, d: Mapping[str, Any]) -> Any:
    """The ``k`` to set (the saved int, or ``acc``'s own schedule for a saved None)."""
    k = d["k"]
    if k is None:
        if not callable(acc.k):
            raise ValueError("state dict 'k' is None (saved with a callable k, an every-k "
                             "schedule): load it into an Accumulate constructed with the "
                             "schedule")
        return acc.k
    return check_int("state dict 'k'", k, minimum=1)


def _flag(d: Mapping[str, Any], key: str) -> bool:
    v = d[key]
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"state dict '{key}' must be a bool, got {describe(v)}")
    return bool(v)


def refuse_overflow(a: np.ndarray, dtype: np.dtype, where: str, error: type) -> None:
    """``error`` naming ``where`` if a finite value of the saved sum ``a`` is beyond the
    range of the buffer's ``dtype`` (a float64 sum into a float32 buffer): cast, it became
    inf silently. Refused as the optimizers' slots are."""
    if a.dtype != dtype:
        with np.errstate(over="ignore", invalid="ignore"):
            lost = np.isfinite(a) & ~np.isfinite(a.astype(dtype))
        if lost.any():
            raise error(f"{where} holds {float(a[lost].flat[0])!r}, beyond the range of the "
                        f"buffer's {dtype}")


def _buffer(name: str, saved: Any, p: Any) -> Any:
    """The saved sum of ``name`` as a buffer for gradients like parameter ``p``."""
    a = _numeric(saved, f"state dict 'sums' of '{name}'")  # (NumPy, or a torch tensor)
    if a.shape != tuple(p.shape):
        raise ShapeError(f"state dict 'sums' of '{name}' has shape {a.shape}, the parameter "
                         f"{tuple(p.shape)}")
    kind = _kind(p)
    dt = str(p.dtype).removeprefix("torch.")
    if kind is None or dt not in ("float16", "bfloat16", "float32", "float64"):
        raise TypeError(f"params['{name}'] must be a floating-point NumPy, torch or JAX "
                        f"array, got {type(p).__name__} of dtype {getattr(p, 'dtype', None)}")
    np_dt = np.dtype("float32" if _is_half_dtype(dt) else dt)
    refuse_overflow(a, np_dt, f"state dict 'sums' of '{name}'", ValueError)
    if kind == "torch":
        import torch

        return torch.from_numpy(np.array(a, dtype=np_dt)).to(p.device)
    if kind == "jax":
        import jax

        return jax.device_put(np.array(a, dtype=np_dt), next(iter(p.devices())))
    return np.array(a, dtype=np_dt)


def load_state_dict(acc: Accumulate, d: Mapping[str, Any],
                    params: Mapping[str, Any] | None = None) -> AccumulateState | None:
    """Restore ``acc`` (``k``, the wrapped optimizer through its own ``load_state_dict``)
    and, given ``params`` and a state dict saved with a state, return the
    :class:`AccumulateState` holding the saved window. Everything is checked first
    (errors name the key); a call that raises changes nothing."""
    if not isinstance(d, Mapping):
        raise TypeError(f"state dict must be a dict, got {type(d).__name__}")
    if d.get("optimizer") != "Accumulate":
        raise ValueError(f"state dict is for {d.get('optimizer')!r}, not Accumulate")
    missing = sorted(set(_TOP) - set(d))
    window = [key for key in _WINDOW if key in d]
    unknown = sorted(map(str, set(d) - set(_TOP) - set(_WINDOW) - {_SKIPPED}))
    if _SKIPPED in d and not window:
        unknown.append(_SKIPPED)  # (a count of the window's, without it)
    if missing or unknown or window not in ([], list(_WINDOW)):
        raise KeyError(f"state dict keys: missing {missing or sorted(set(_WINDOW) - set(d))}, "
                       f"unknown {unknown} (the window's {list(_WINDOW)} go all together)")
    if not isinstance(d["inner"], Mapping):
        raise TypeError(f"state dict 'inner' must be the wrapped optimizer's state dict, got "
                        f"{type(d['inner']).__name__}")
    k = _checked_k(acc, d)
    if not window or params is None:
        acc.optimizer.load_state_dict(d["inner"])
        acc.k = k
        return None
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    if "step" not in d["inner"]:
        raise ValueError("state dict 'inner' was saved without the wrapped optimizer's state "
                         "(no 'step'), yet the window's keys are there")
    windows = check_int("state dict 'windows'", d["windows"])
    count = check_int("state dict 'count'", d["count"])
    skipped = check_int(f"state dict '{_SKIPPED}'", d.get(_SKIPPED, 0))
    probe = AccumulateState(None)
    probe.windows = windows
    k_now = acc.k_for(probe) if callable(k) else k
    if count >= k_now:
        raise ValueError(f"state dict 'count' is {count}, not below k = {k_now}")
    w = given = d["total_weight"]
    if isinstance(w, int) and not isinstance(w, bool) and w.bit_length() > 1024:
        w = math.inf  # (math.isfinite of an int too large for a float raised OverflowError)
    if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, float, np.floating)) or \
            not math.isfinite(w) or w < 0 or (w > 0) != (count > 0):
        raise ValueError(f"state dict 'total_weight' is {describe(given)}, not a finite number "
                         f">= 0 that is 0 exactly when nothing is buffered (count={count})")
    applied, last_skipped = _flag(d, "applied"), _flag(d, "last_step_skipped")
    sums = d["sums"]
    if not isinstance(sums, Mapping) or bool(sums) != (count > 0):
        raise TypeError(f"state dict 'sums' must be a dict of parameter -> array, non-empty "
                        f"exactly when micro-batches are buffered (count={count})")
    unknown = sorted(map(str, set(sums) - set(params)))
    if unknown:
        raise KeyMismatchError(f"state dict 'sums' names unknown parameter(s) {unknown}")
    buffers = {n: _buffer(n, v, params[n]) for n, v in sums.items()}
    state = AccumulateState(acc.optimizer.load_state_dict(d["inner"], params))
    # (the wrapped optimizer has checked and loaded; what follows cannot fail)
    acc.k = k
    state.windows, state.applied, state.last_step_skipped = windows, applied, last_skipped
    state.num_skipped_micro_batches = skipped
    if count:
        state.accumulator._restore(buffers, {n: params[n].dtype for n in buffers}, count,
                                   float(w))
    return state
