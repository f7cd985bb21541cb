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


#: the largest integer a hyperparameter or counter may hold (int64's largest): larger ones
#: are refused as "too large" (they could not be converted to a float, stored in an int64
#: or raised to a power without overflowing)
MAX_INT = 2**63 - 1


def describe(value: Any) -> str:
    """``repr(value)``, shortened for huge integers and long texts (``repr`` of an int with
    more than 4300 digits raises, and a 400-digit number makes an unreadable message)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
            and abs(int(value)) > MAX_INT:
        return f"an integer of {abs(int(value)).bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def to_float(name: str, value: Any) -> float:
    """``float(value)`` for a number (a Python, NumPy or 0-d array scalar); ``TypeError``
    naming ``name`` for anything else (strings and bools included: ``float("0.1")`` and
    ``float(True)`` would pass), ``ValueError`` for a number too large for a float."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {describe(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large: got {describe(value)} (not representable as "
                         f"a float)") from None
    except Exception:  # TypeError, ValueError, torch's RuntimeError for a many-element tensor
        raise TypeError(f"{name} must be a number, got {describe(value)}") from None


def check_int(name: str, value: Any, minimum: int = 0, maximum: int = MAX_INT) -> int:
    """An integer (Python or NumPy; bools and floats refused with ``TypeError``) in
    ``[minimum, maximum]`` (``ValueError`` otherwise, naming ``name``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {describe(value)}")
    v = int(value)
    if v > maximum:
        raise ValueError(f"{name} is too large: got {describe(value)} (at most {maximum})")
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v}")
    return v


def check_positive(name: str, value: Any, allow_zero: bool = True) -> float:
    """A finite number ``>= 0`` (``> 0`` unless ``allow_zero``) as a float; ``TypeError`` for
    a non-number, ``ValueError`` (naming ``name``) for one out of range or too large."""
    v = to_float(name, value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, "
                         f"got {describe(value)}")
    return v


def rounds_to_zero(x: float, dtype: str) -> bool:
    """Whether ``x`` > 0 becomes 0 in ``dtype`` (float16's smallest subnormal is ~6e-8)."""
    return x > 0 and dtype == "float16" and float(np.float16(x)) == 0.0


def state_dict_count(d: Mapping[str, Any], key: str) -> int:
    """A non-negative integer counter of a state dict (0 where absent), at most ``MAX_INT``."""
    v = d.get(key, 0)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"state dict '{key}' must be a non-negative int, got {describe(v)}")
    if v > MAX_INT:
        raise ValueError(f"state dict '{key}' is too large: got {describe(v)} (at most {MAX_INT})")
    return int(v)


def check_flag(name: str, value: Any) -> bool:
    """A bool hyperparameter (``bool("no")`` would be True: only bools, 0 and 1 pass)."""
    if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1))):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return bool(value)


def check_unit(name: str, value: Any) -> float:
    """A number in ``[0, 1)`` as a float (errors as :func:`check_positive`)."""
    v = check_positive(name, value)
    if not v < 1:
        raise ValueError(f"{name} must be in [0, 1), got {describe(value)}")
    return v
