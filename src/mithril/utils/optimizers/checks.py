"""Checks of what users give the optimizers: hyperparameters, the backend of their params,
and the counters of a state dict. Each error names the value at fault."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def is_array(x: Any) -> bool:
    """Whether ``x`` is a NumPy, torch or JAX array."""
    mod = type(x).__module__.split(".", 1)[0]
    return isinstance(x, np.ndarray) or (mod in ("torch", "jax", "jaxlib") and hasattr(x, "dtype"))


def infer_backend(params: Mapping[str, Any]) -> Any:
    """A backend matching the arrays in ``params`` (dtype and device of the first one)."""
    from ...backends import JaxBackend, NumpyBackend, TorchBackend

    if not params:
        return NumpyBackend()
    name, x = next(iter(params.items()))
    mod = type(x).__module__.split(".", 1)[0]
    if not is_array(x):
        raise TypeError(f"params['{name}'] is a {type(x).__name__}, not a NumPy, JAX or torch "
                        f"array (cannot infer a backend)")
    dt = str(x.dtype).removeprefix("torch.")
    dt = dt if dt in ("float16", "bfloat16", "float32", "float64") else "float32"
    if mod == "torch":
        return TorchBackend(dtype=dt, device=str(x.device))
    if mod in ("jax", "jaxlib"):
        return JaxBackend(dtype=dt) if dt != "float64" else JaxBackend(dtype="float64")
    if isinstance(x, np.ndarray):
        return NumpyBackend(dtype=dt)
    raise TypeError(f"params['{name}'] is a {type(x).__name__}: cannot infer a backend")


def check_positive(name: str, value: Any, allow_zero: bool = True) -> float:
    if isinstance(value, (str, bytes, bool)):  # float("0.1") / float(True) would pass
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")
    return v


def rounds_to_zero(x: float, dtype: str) -> bool:
    """Whether ``x`` > 0 becomes 0 in ``dtype`` (float16's smallest subnormal is ~6e-8)."""
    return x > 0 and dtype == "float16" and float(np.float16(x)) == 0.0


def state_dict_count(d: Mapping[str, Any], key: str) -> int:
    """A non-negative integer counter of a state dict (0 where absent)."""
    v = d.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"state dict '{key}' must be a non-negative int, got {v!r}")
    return int(v)


def check_flag(name: str, value: Any) -> bool:
    """A bool hyperparameter (``bool("no")`` would be True: only bools, 0 and 1 pass)."""
    if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1))):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_unit(name: str, value: Any) -> float:
    v = check_positive(name, value)
    if not v < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return v
