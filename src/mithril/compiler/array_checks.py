"""The checks ``evaluate`` makes of each array it is given (parameters, inputs, state,
output gradients): shape, kind and dtype, by one rule on every backend, converting arrays of
another framework only after their dtype is checked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DTypeError, ShapeError
from ..models.operator import fmt

if TYPE_CHECKING:
    from ..backends.backend import Backend
    from .program import Program

#: input data in these dtypes is cast to the model's float dtype on every backend (NumPy's and
#: Python's float64 and float32 data); other float dtypes must be the model's (DTypeError)
_CASTABLE = ("float32", "float64")


#: arrays that must have the model's float dtype whatever their framework (a NumPy float64
#: weight is refused by a float32 model on every backend, not cast by torch and JAX only)
_STRICT = ("parameter", "output gradient", "state")


def _float_name(x: Any) -> str | None:
    """The dtype name of array-like ``x`` when it is a float dtype (``None`` otherwise)."""
    dt = getattr(x, "dtype", None)
    name = str(dt).removeprefix("torch.") if dt is not None else None
    return name if name in ("float16", "bfloat16", "float32", "float64") else None


def _given(orig: Any, b: Backend, x: Any) -> str:
    """The dtype name of the array the caller passed (``orig``, before any conversion to
    ``x``): an error names what the user gave, the same on every backend."""
    dt = getattr(orig, "dtype", None)
    if dt is not None:
        return str(dt).removeprefix("torch.")
    if isinstance(orig, (int, float, bool, list, tuple)):
        try:
            return np.asarray(orig).dtype.name
        except (TypeError, ValueError):
            pass
    return b.dtype_name(x)


def shape_matches(shape: tuple, pattern: tuple | None) -> bool:
    """``shape`` fits ``pattern`` (``None`` entries, or a ``None`` pattern: any size)."""
    if pattern is None:
        return True
    return len(shape) == len(pattern) and all(p is None or p == s for s, p in zip(shape, pattern, strict=True))


def check_array(b: Backend, kind: str, key: str, x: Any, pattern: tuple | None, want: str,
                fdtype: Any, also: str | None = None) -> Any:
    """``x`` as a native array of backend ``b``, of shape ``pattern`` and kind ``want``
    (``fdtype`` is the backend's native float dtype; ``also`` another float dtype taken as
    it is: a ``Cast`` output's own, for its gradient), or a ``ShapeError`` /
    ``TypeError`` naming ``key``."""
    orig = x
    if not b.is_native(x):
        keep = None
        if want == "float" and kind in _STRICT and getattr(x, "dtype", None) is not None:
            # parameters and output gradients must have the model's dtype whatever the
            # array's framework: checked before converting, as a native array is
            own = str(x.dtype).removeprefix("torch.")
            keep = own if own == also else None
            if own != str(b.dtype).removeprefix("torch.") and keep is None and np.ndim(x) > 0:
                raise DTypeError(f"{kind} '{key}': expected dtype {b.dtype}, got {own}")
        if isinstance(x, (int, float, list, tuple, np.ndarray, np.generic)) or hasattr(x, "__array__"):
            # input data keeps a float16/bfloat16 dtype, to be refused below as on a backend
            # whose own arrays they are; float32/float64 data is cast (see _CASTABLE)
            own = _float_name(x) if kind == "input" and want == "float" else None
            try:
                x = b.array(x, None if keep is None and (own is None or own in _CASTABLE)
                            else keep or own)
            except (DTypeError, ShapeError):
                raise
            except (RuntimeError, TypeError, ValueError) as e:  # (a torch tensor that requires
                # grad, a ragged list: the framework's own message named no key)
                raise TypeError(f"{kind} '{key}': cannot make a {b.name} array of this "
                                f"{type(orig).__name__}: {e}") from None
        else:
            raise TypeError(f"{kind} '{key}': expected an array, got {type(x).__name__}")
    shape = x.shape
    if shape != pattern and not shape_matches(tuple(shape), pattern):
        raise ShapeError(f"{kind} '{key}': expected shape {fmt(pattern)}, got {fmt(tuple(shape))}")
    if want == "float":
        if x.dtype != fdtype and kind == "input" and b.dtype_name(x) in _CASTABLE:
            x = b.array(x, b.dtype)
        elif x.dtype != fdtype and (also is None or b.dtype_name(x) != also):
            raise DTypeError(f"{kind} '{key}': expected dtype {b.dtype}, got {_given(orig, b, x)}")
    elif want == "int" and "int" not in b.dtype_name(x):
        raise DTypeError(f"{kind} '{key}': expected an integer dtype, got {_given(orig, b, x)}")
    elif want == "bool" and b.dtype_name(x) != "bool":  # (IOKey(type=Tensor[bool]))
        raise DTypeError(f"{kind} '{key}': expected dtype bool, got {_given(orig, b, x)}")
    elif "|" in want:  # (IOKey(type=Tensor[int | bool]) read by blocks taking any kind)
        name = b.dtype_name(x)
        own = "bool" if name == "bool" else "int" if "int" in name else "float"
        if own not in want.split("|"):
            raise DTypeError(f"{kind} '{key}': expected a {' or '.join(want.split('|'))} "
                             f"dtype, got {_given(orig, b, x)}")
    return x


def cast_dtype(program: Program, name: str) -> str | None:
    """The float dtype of output ``name`` when a ``Cast`` to another float dtype makes it
    (its gradient may have that dtype as well as the model's), else None."""
    from ..models.primitives import Cast

    w = program.outputs.get(name)
    for node in program.nodes:
        if node.out == w and isinstance(node.op, Cast) and "dtype_ref" not in node.ins \
                and node.op.dtype.startswith(("float", "bfloat")):  # (x.dtype(): not known here)
            return node.op.dtype
    return None


def handed_out(backend: Backend, params: dict[str, Any]) -> dict[str, Any]:
    """The model's stored parameters as the caller's own: on JAX copies (a user's
    ``jax.jit(..., donate_argnums=0)`` would otherwise delete the model's), elsewhere the
    arrays themselves (a new dict)."""
    if backend.name != "jax":
        return dict(params)
    import jax.numpy as jnp

    return {k: jnp.array(v, copy=True) for k, v in params.items()}


def warn_traced_random(params: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Warn where a training-mode evaluate of a model drawing random bits runs inside a JAX
    trace without ``step=``: the step counter is read once, at trace time, so every call of
    the user's jitted function draws the same masks."""
    import sys
    import warnings

    jax = sys.modules.get("jax")
    first = next(iter({**inputs, **params}.values()), None)
    if jax is not None and isinstance(first, jax.core.Tracer):
        warnings.warn("evaluate inside jax.jit / grad / vmap without step=: the model's random "
                      "step counter is read once, when the function is traced, so every call "
                      "draws the same Dropout masks. Pass step= (a traced int that changes per "
                      "call), or use make_train_step", UserWarning, stacklevel=5)

