"""The array helpers of the published Mithril's ``Backend``: creation, randomness, math and
shape functions a user program calls on ``backend`` (``backend.randn(8, 3)``,
``backend.linspace(0, 1, 5)``, ``backend.stack([a, b])``, ``backend.pi``).

They run on every backend and return the backend's native arrays. Random draws come from
the backend's one NumPy generator (:meth:`~mithril.backends.Backend.set_seed`), so a seed
gives the same numbers on NumPy, JAX and torch; ``key=<int>`` draws from a generator seeded
with ``key`` instead (the same key, the same array) and leaves the backend's stream alone.
Arguments are checked before anything is created: a bad shape is a
:class:`~mithril.errors.ShapeError`, a bad dtype a :class:`~mithril.errors.DTypeError`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DTypeError, ShapeError

#: dtype names a helper's ``dtype=`` accepts (also as ``backend.<name>``, the native dtype)
DTYPE_NAMES = ("bool", "uint8", "int8", "int16", "int32", "int64",
               "float16", "bfloat16", "float32", "float64")
_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}


def shape_arg(shape: tuple[Any, ...], who: str = "shape") -> tuple[int, ...]:
    """``(3, 4)`` from ``(3, 4)``, ``((3, 4),)`` or ``([3, 4],)``; ``ShapeError`` for a negative
    or non-integer size."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    out = []
    for d in shape:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)):
            raise ShapeError(f"{who}: sizes must be ints, got {d!r} in shape {shape!r}")
        if d < 0:
            raise ShapeError(f"{who}: sizes must be >= 0, got {int(d)} in shape {tuple(shape)!r}")
        out.append(int(d))
    return tuple(out)


def host_array(data: Any) -> np.ndarray:
    """``data`` as a NumPy array; a torch tensor (which ``np.asarray`` refuses when it
    requires grad, lives on a GPU or is bfloat16) detached, on the CPU, bfloat16 as
    ml_dtypes' (the same bits; float32 without ml_dtypes)."""
    if type(data).__module__.startswith("torch") and hasattr(data, "detach"):
        import torch

        t = data.detach().cpu()
        if t.dtype == torch.bfloat16:
            try:
                import ml_dtypes
            except ImportError:  # (a torch-only install: the same values in float32)
                return t.float().numpy()
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(data)


def dtype_arg(dtype: Any, who: str = "dtype") -> str | None:
    """The name of ``dtype`` (``"float32"``, ``ml.float32``, ``np.float32``, ``torch.float32``,
    ``jnp.int32``, ``bool``), ``None`` for ``None``; ``DTypeError`` for anything else."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype
    else:
        name = getattr(dtype, "name", None) if not isinstance(dtype, type) else None
        if not isinstance(name, str):
            text = str(dtype)
            if text.startswith("torch."):
                name = text.removeprefix("torch.")
            else:
                try:
                    name = np.dtype(dtype).name
                except TypeError:
                    name = None
    if name not in DTYPE_NAMES:
        raise DTypeError(f"{who}: unsupported dtype {dtype!r} (use one of {DTYPE_NAMES})")
    return name


#: the published ``precision=`` of a backend, as the float dtype it names
PRECISIONS = {16: "float16", 32: "float32", 64: "float64"}


def resolve_dtype(dtype: Any, precision: Any, who: str) -> Any:
    """The backend dtype from ``dtype=`` and the published ``precision=`` (16, 32 or 64 bits):
    either alone, or both when they agree (``dtype="bfloat16", precision=16``); ``None``
    for neither. A bad precision, or one that disagrees with ``dtype``, is a ``ValueError``
    naming both."""
    if precision is None:
        return dtype
    if isinstance(precision, bool) or precision not in PRECISIONS:
        raise ValueError(f"{who}(precision=...) must be 16, 32 or 64, got {precision!r}")
    if dtype is None:
        return PRECISIONS[int(precision)]
    name = getattr(dtype, "name", dtype)
    if _BITS.get(name) != precision:
        raise ValueError(f"{who}(dtype={name!r}, precision={precision!r}): dtype and precision "
                         "disagree; give one of them")
    return dtype


def refuse_device_mesh(device_mesh: Any, who: str) -> None:
    """The published ``device_mesh=`` (sharded tensors) is not offered: a ``ValueError``
    that names :mod:`mithril.distributed` unless ``device_mesh`` is ``None``."""
    if device_mesh is not None:
        raise ValueError(
            f"{who}(device_mesh={device_mesh!r}): device meshes and sharded tensors are not "
            "offered here; for data-parallel training use mithril.distributed (torch: "
            "DataParallel under torchrun; JAX: mithril.distributed.jax_parallel."
            "make_sharded_train_step); see docs/distributed.md")


def _int_bound(v: Any, who: str) -> int:
    """A ``randint`` bound as an int; a ``TypeError`` naming it for a float or anything else
    that is not an integer (torch's ``randint`` refuses them; NumPy would truncate 0.5)."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"randint(): {who} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"randint(): {who} must be an int, got {v!r}") from None


class ArrayHelpers:
    """Mixed into :class:`~mithril.backends.Backend`. Each backend supplies ``array``,
    ``to_numpy``, ``_xp()`` (its NumPy-like namespace) and the few overrides in its module."""

    dtype: str
    int_dtype: str
    native_type: type
    _rng: np.random.Generator

    # provided by Backend
    def array(self, data: Any, dtype: Any = None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def native_dtype(self, name: str | None = None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _ns(self) -> Any:
        """The backend's NumPy-like namespace (``numpy``, ``jax.numpy``, a torch shim)."""
        raise NotImplementedError

    def _native(self, x: Any) -> Any:
        return x if isinstance(x, self.native_type) else self.array(x)

    # -- constants and dtypes ----------------------------------------------------------------
    pi: float = math.pi
    e: float = math.e
    inf: float = math.inf
    nan: float = math.nan

    @property
    def precision(self) -> int:
        """Bits of the backend's float dtype (32 for ``float32``)."""
        return _BITS[self.dtype]

    @property
    def default_dtype(self) -> str:
        return self.dtype

    @property
    def backend_type(self) -> str:
        """``"numpy"``, ``"jax"`` or ``"torch"``."""
        return self.name  # type: ignore[attr-defined]

    @property
    def DataType(self) -> type:  # noqa: N802 - the published name
        """The backend's array class."""
        return self.native_type

    def get_backend_array_type(self) -> type:
        return self.native_type

    def get_device(self) -> Any:
        return getattr(self, "device", "cpu")

    def _dt(self, dtype: Any, who: str, default: str | None = None) -> str | None:
        return dtype_arg(dtype, f"{type(self).__name__}.{who}(dtype=...)") or default

    def _float_dt(self, dtype: Any, who: str) -> str:
        """The float dtype of a draw from a continuous distribution (``randn``, ``rand``,
        ``rand_uniform``): an integer or bool ``dtype`` is a ``DTypeError``, as torch and
        ``jax.random`` refuse it (the samples would be truncated, ``rand`` to all zeros)."""
        dt = self._dt(dtype, who, self.dtype)
        if dt not in _BITS:
            raise DTypeError(f"{type(self).__name__}.{who}(dtype={dtype!r}): samples of a "
                             f"continuous distribution need a float dtype, one of {tuple(_BITS)}")
        return dt  # type: ignore[return-value]

    # -- creation ----------------------------------------------------------------------------
    def zeros(self, *shape: int | Sequence[int], dtype: Any = None, device_mesh: Any = None) -> Any:
        """Zeros of ``shape`` (``zeros(2, 3)`` or ``zeros((2, 3))``), backend dtype by default."""
        refuse_device_mesh(device_mesh, f"{type(self).__name__}.zeros")
        dt = self._dt(dtype, "zeros", self.dtype)
        return self.array(np.zeros(shape_arg(shape, "zeros")), dt)

    def ones(self, *shape: int | Sequence[int], dtype: Any = None, device_mesh: Any = None) -> Any:
        """Ones of ``shape``, backend dtype by default."""
        refuse_device_mesh(device_mesh, f"{type(self).__name__}.ones")
        dt = self._dt(dtype, "ones", self.dtype)
        return self.array(np.ones(shape_arg(shape, "ones")), dt)

    def zeros_like(self, input: Any, *, dtype: Any = None, device_mesh: Any = None) -> Any:
        """Zeros with ``input``'s shape and (unless ``dtype``) dtype."""
        refuse_device_mesh(device_mesh, f"{type(self).__name__}.zeros_like")
        dt = self._dt(dtype, "zeros_like")
        out = self._ns().zeros_like(self._native_like(input))
        return out if dt is None else self.array(out, dt)

    def ones_like(self, input: Any, *, dtype: Any = None, device_mesh: Any = None) -> Any:
        """Ones with ``input``'s shape and (unless ``dtype``) dtype."""
        refuse_device_mesh(device_mesh, f"{type(self).__name__}.ones_like")
        dt = self._dt(dtype, "ones_like")
        out = self._ns().ones_like(self._native_like(input))
        return out if dt is None else self.array(out, dt)

    def _native_like(self, x: Any) -> Any:
        """``x`` as a native array of its own dtype where it has one (another framework's
        array: ``jnp.zeros_like(np.float16 array)`` is float16), else as :meth:`array`
        makes it (a list of floats in the backend dtype)."""
        if isinstance(x, self.native_type) or not hasattr(x, "dtype"):
            return self._native(x)
        a = host_array(x)
        return self.array(a, a.dtype.name if a.dtype.name in DTYPE_NAMES else None)

    def cast(self, value: Any, dtype: Any = None) -> Any:
        """``value`` as a native array of ``dtype`` (default: the backend's float dtype)."""
        return self.array(value, self._dt(dtype, "cast", self.dtype))

    def arange(self, *args: float, dtype: Any = None, device_mesh: Any = None) -> Any:
        """``arange(stop)``, ``arange(start, stop)`` or ``arange(start, stop, step)``, as
        ``numpy.arange``: integers (the backend's int dtype) unless an argument is a float."""
        refuse_device_mesh(device_mesh, f"{type(self).__name__}.arange")
        if not 1 <= len(args) <= 3:
            raise TypeError(f"arange() takes 1 to 3 positional arguments, got {len(args)}")
        if len(args) == 3 and args[2] == 0:
            raise ValueError("arange(): step must not be 0")
        is_float = any(isinstance(a, (float, np.floating)) for a in args)
        dt = self._dt(dtype, "arange", self.dtype if is_float else self.int_dtype)
        return self.array(np.arange(*args), dt)

    def linspace(self, start: Any, stop: Any, steps: int, dtype: Any = None,
                 device_mesh: Any = None) -> Any:
        """``steps`` evenly spaced values from ``start`` to ``stop`` (both included)."""
        refuse_device_mesh(device_mesh, f"{type(self).__name__}.linspace")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"linspace(): steps must be an int >= 0, got {steps!r}")
        dt = self._dt(dtype, "linspace", self.dtype)
        return self.array(np.linspace(self._scalar(start), self._scalar(stop), int(steps)), dt)

    def _scalar(self, x: Any) -> Any:
        return self.to_numpy(x) if isinstance(x, self.native_type) else host_array(x)

    # -- randomness --------------------------------------------------------------------------
    def _drawn(self, data: np.ndarray, dtype: str) -> Any:
        """Float64 draws as a native array of ``dtype``, rounded once on the host to a half
        dtype: torch rounds float64 to float16 / bfloat16 through float32 (twice: 1 + 2**-8
        + 2**-30 gives bfloat16 1.0, NumPy 1.0078125), so the same seed gave other half
        parameters on torch than on NumPy and JAX."""
        if dtype in ("float16", "bfloat16"):
            try:
                from .numpy_backend import numpy_dtype

                data = np.asarray(data, dtype=numpy_dtype(dtype))
            except ValueError:  # (bfloat16 without ml_dtypes: torch's own rounding)
                pass
        return self.array(data, dtype)

    def _gen(self, key: int | None) -> np.random.Generator:
        return self._rng if key is None else np.random.default_rng(self._key(key))

    def _key(self, key: Any) -> int:
        """``key=`` as the seed it is: an int >= 0 (a float or a string was truncated or
        parsed, a negative one NumPy's "expected non-negative integer")."""
        if isinstance(key, (bool, np.bool_)):
            raise TypeError(f"key must be an int (the seed of the draw), got {key!r}")
        try:
            k = operator.index(key)
        except TypeError:
            raise TypeError(f"key must be an int (the seed of the draw), got {key!r}") from None
        if k < 0:
            raise ValueError(f"key must be >= 0 (the seed of the draw), got {k}")
        return k

    def randn(self, *shape: int | Sequence[int], dtype: Any = None, key: int | None = None,
              device_mesh: Any = None) -> Any:
        """Standard-normal samples of ``shape`` (``randn(32, 784)`` or ``randn((32, 784))``)."""
        refuse_device_mesh(device_mesh, f"{type(self).__name__}.randn")
        s, dt = shape_arg(shape, "randn"), self._float_dt(dtype, "randn")
        return self._drawn(self._gen(key).standard_normal(s), dt)

    def rand(self, *shape: int | Sequence[int], dtype: Any = None, key: int | None = None,
             device_mesh: Any = None) -> Any:
        """Uniform samples in [0, 1) of ``shape``."""
        refuse_device_mesh(device_mesh, f"{type(self).__name__}.rand")
        s, dt = shape_arg(shape, "rand"), self._float_dt(dtype, "rand")
        return self._drawn(self._gen(key).random(s), dt)

    def rand_uniform(self, low: Any, high: Any, *shape: int | Sequence[int], dtype: Any = None,
                     key: int | None = None, device_mesh: Any = None) -> Any:
        """Uniform samples in [low, high) of ``shape`` (no shape: one sample, or the broadcast
        shape of array bounds)."""
        refuse_device_mesh(device_mesh, f"{type(self).__name__}.rand_uniform")
        s, dt = shape_arg(shape, "rand_uniform"), self._float_dt(dtype, "rand_uniform")
        lo, hi = self._scalar(low), self._scalar(high)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):  # (as torch's uniform_)
            raise ValueError(f"rand_uniform(): low and high must be finite, got {low!r}, {high!r}")
        if np.any(lo > hi):
            raise ValueError(f"rand_uniform(): low must be <= high, got {low!r} > {high!r}")
        return self._drawn(self._gen(key).uniform(lo, hi, s or None), dt)

    def randint(self, low: int, high: int, *shape: int | Sequence[int], dtype: Any = None,
                key: int | None = None, device_mesh: Any = None) -> Any:
        """Integers in [low, high) of ``shape`` (the backend's int dtype by default:
        int64 on NumPy and torch, int32 on JAX)."""
        refuse_device_mesh(device_mesh, f"{type(self).__name__}.randint")
        s, dt = shape_arg(shape, "randint"), self._dt(dtype, "randint", self.int_dtype)
        low, high = _int_bound(low, "low"), _int_bound(high, "high")
        if high <= low:
            raise ValueError(f"randint(): high must be > low, got low={low}, high={high}")
        if dt not in _BITS:  # (as torch and NumPy: no draw wrapped around into the dtype)
            info = None if dt == "bool" else np.iinfo(dt)
            lo, hi = (0, 1) if info is None else (int(info.min), int(info.max))
            if low < lo or high - 1 > hi:
                raise ValueError(f"randint(low={low}, high={high}, dtype={dt!r}): [low, high) "
                                 f"must lie in the range of {dt}, [{lo}, {hi}]")
        return self.array(self._gen(key).integers(low, high, s), dt)

    def multinomial(self, probs: Any, num_samples: int, replacement: bool = False,
                    key: int | None = None) -> Any:
        """``num_samples`` category indices per row of ``probs`` (normalised per row; 1-d or
        more, the last axis the categories). As ``torch.multinomial``, a bad argument is a
        ``ValueError`` naming it: ``num_samples`` < 1, a 0-d ``probs``, a negative or
        non-finite probability, a row summing to 0."""
        p = np.asarray(self._scalar(probs), dtype=np.float64)
        if isinstance(num_samples, (bool, np.bool_)) or not isinstance(num_samples, (int, np.integer)) \
                or num_samples < 1:
            raise ValueError(f"multinomial(): num_samples must be an int >= 1, got {num_samples!r}")
        if p.ndim == 0:
            raise ValueError("multinomial(): probs must have at least 1 dimension (the "
                             "categories), got a 0-d array")
        rows = p.reshape(-1, p.shape[-1])
        if not replacement and num_samples > rows.shape[-1]:
            raise ValueError("multinomial(): num_samples > categories needs replacement=True")
        if not np.all(np.isfinite(rows)) or np.any(rows < 0) or np.any(rows.sum(-1) <= 0):
            raise ValueError("multinomial(): probs must be finite and >= 0, with every row "
                             "summing to more than 0")
        if not replacement and np.any(np.count_nonzero(rows, axis=-1) < num_samples):
            raise ValueError(f"multinomial(): a row of probs has fewer than num_samples="
                             f"{num_samples} categories above 0, which replacement=False needs")
        g = self._gen(key)
        out = np.array([g.choice(r.size, num_samples, replace=replacement, p=r / r.sum())
                        for r in rows], dtype=np.int64).reshape(len(rows), num_samples)
        return self.array(out.reshape(*p.shape[:-1], num_samples), self.int_dtype)

    # -- math ----------------------------------------------------------------------------------
    def _floating(self, input: Any) -> Any:
        """``input`` as a native array, an integer or bool one in the backend's float dtype:
        the input of a function with float results (``sin``, ``exp``, ``mean``, ...), which
        torch would give in its default float32 and JAX in float32 for int32, also on a
        float64 backend (NumPy in float64 on a float32 one)."""
        x = self._native(input)
        name = str(x.dtype).removeprefix("torch.")
        return x if name in _BITS or name.startswith("complex") else self.array(x, self.dtype)

    def abs(self, input: Any) -> Any:
        return self._ns().abs(self._native(input))

    def sign(self, input: Any) -> Any:
        return self._ns().sign(self._native(input))

    def sin(self, input: Any) -> Any:
        return self._ns().sin(self._floating(input))

    def cos(self, input: Any) -> Any:
        return self._ns().cos(self._floating(input))

    def tanh(self, input: Any) -> Any:
        return self._ns().tanh(self._floating(input))

    def exp(self, input: Any) -> Any:
        return self._ns().exp(self._floating(input))

    def log(self, input: Any) -> Any:
        return self._ns().log(self._floating(input))

    def sqrt(self, input: Any) -> Any:
        return self._ns().sqrt(self._floating(input))

    def relu(self, input: Any) -> Any:
        """max(x, 0); NaN stays NaN (as ``torch.relu``, ``jax.nn.relu`` and the ``Relu`` block)."""
        x, xp = self._native(input), self._ns()
        return xp.where(x <= 0, xp.zeros_like(x), x)

    def leaky_relu(self, input: Any, slope: float | Any) -> Any:
        x = self._native(input)
        return self._ns().where(x > 0, x, slope * x)

    def sigmoid(self, input: Any) -> Any:
        return 1 / (1 + self._ns().exp(-self._floating(input)))

    def softplus(self, input: Any) -> Any:
        x, xp = self._floating(input), self._ns()
        return xp.where(x > 0, x, xp.zeros_like(x)) + xp.log(1 + xp.exp(-xp.abs(x)))

    def softmax(self, input: Any, dim: int = -1) -> Any:
        x, xp = self._floating(input), self._ns()
        e = xp.exp(x - xp.max(x, axis=dim, keepdims=True))
        return e / xp.sum(e, axis=dim, keepdims=True)

    def isnan(self, input: Any) -> Any:
        return self._ns().isnan(self._native(input))

    def nan_to_num(self, input: Any, nan: float = 0.0, posinf: float | None = None,
                   neginf: float | None = None) -> Any:
        return self._ns().nan_to_num(self._native(input), nan=nan, posinf=posinf, neginf=neginf)

    def clip(self, input: Any, min: Any, max: Any) -> Any:
        x = self._native(input)
        return self._ns().clip(x, min, max)

    def where(self, cond: Any, input1: Any, input2: Any) -> Any:
        xp = self._ns()
        return xp.where(self._native(cond), self._native(input1), self._native(input2))

    def stop_gradient(self, input: Any) -> Any:
        return input

    # -- reductions ----------------------------------------------------------------------------
    def sum(self, input: Any, axis: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Any:
        return self._ns().sum(self._native(input), axis=axis, keepdims=keepdim)

    def mean(self, input: Any, axis: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Any:
        """The mean, of integers and bools too (``mean(pred == labels)``, an accuracy) in the
        backend's float dtype (torch refuses them; JAX gives float32 for int32 or bool)."""
        return self._ns().mean(self._floating(input), axis=axis, keepdims=keepdim)

    def max(self, input: Any, axis: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Any:
        return self._ns().max(self._native(input), axis=axis, keepdims=keepdim)

    def min(self, input: Any, axis: int | tuple[int, ...] | None = None, keepdim: bool = False) -> Any:
        return self._ns().min(self._native(input), axis=axis, keepdims=keepdim)

    def argmax(self, input: Any, axis: int | None = None, keepdim: bool = False) -> Any:
        return self._ns().argmax(self._native(input), axis=axis, keepdims=keepdim)

    def argmin(self, input: Any, axis: int | None = None, keepdim: bool = False) -> Any:
        return self._ns().argmin(self._native(input), axis=axis, keepdims=keepdim)

    def all(self, input: Any) -> Any:
        return self._ns().all(self._native(input))

    def any(self, input: Any) -> Any:
        return self._ns().any(self._native(input))

    def sort(self, input: Any, axis: int = -1, descending: bool = False) -> Any:
        """``input`` sorted along ``axis``; ``descending``: the ascending sort reversed, as
        ``torch.sort(descending=True)`` (NaN first; unsigned and bool inputs too, which
        negating would wrap or refuse)."""
        x, xp = self._native(input), self._ns()
        out = xp.sort(x, axis=axis)
        return xp.flip(out, axis=axis) if descending else out

    def topk(self, input: Any, k: int) -> Any:
        """The ``k`` largest values along the last axis, largest first."""
        x = self._native(input)
        if not 0 <= k <= x.shape[-1]:
            raise ValueError(f"topk(): k must be in [0, {x.shape[-1]}], got {k}")
        return self.sort(x, axis=-1, descending=True)[..., :k]

    # -- shapes --------------------------------------------------------------------------------
    def reshape(self, input: Any, shape: Sequence[int]) -> Any:
        return self._ns().reshape(self._native(input), tuple(shape))

    def transpose(self, input: Any, axes: Sequence[int] | None = None) -> Any:
        x = self._native(input)
        return self._ns().transpose(x, tuple(axes) if axes is not None else tuple(range(x.ndim))[::-1])

    def squeeze(self, input: Any) -> Any:
        return self._ns().squeeze(self._native(input))

    def expand_dims(self, input: Any, axis: int) -> Any:
        return self._ns().expand_dims(self._native(input), axis)

    def flatten(self, input: Any, start_dim: int = 0, end_dim: int = -1) -> Any:
        """``input`` with the axes ``start_dim`` .. ``end_dim`` (inclusive) merged into one."""
        x = self._native(input)
        n = x.ndim
        for key, d in (("start_dim", start_dim), ("end_dim", end_dim)):
            if not -max(n, 1) <= d < max(n, 1):  # (torch: a 0-d input's axes are [-1, 0])
                raise IndexError(f"flatten(): {key}={d} is out of range for an input of "
                                 f"{n} dimensions")
        if n == 0:
            return self.reshape(x, (1,))
        s, e = start_dim % n, end_dim % n
        if s > e:
            raise ValueError(f"flatten(): start_dim {start_dim} comes after end_dim {end_dim}")
        shape = tuple(x.shape)
        return self.reshape(x, (*shape[:s], int(np.prod(shape[s:e + 1])), *shape[e + 1:]))

    def stack(self, inputs: Sequence[Any], axis: int = 0) -> Any:
        """The arrays of ``inputs`` (same shape) stacked along a new axis ``axis``."""
        return self._ns().stack([self._native(x) for x in inputs], axis=axis)

    def cat(self, input: Sequence[Any], axis: int = 0) -> Any:
        """The arrays of ``input`` joined along the existing axis ``axis``."""
        return self._ns().concatenate([self._native(x) for x in input], axis=axis)

    def concat(self, input: Sequence[Any], axis: int = 0) -> Any:
        """The same as :meth:`cat`."""
        return self.cat(input, axis)

    def pad(self, input: Any, pad_width: Any) -> Any:
        """Zero padding, ``pad_width`` as ``numpy.pad``'s: integers >= 0 (a float is a
        ``TypeError``, a negative width a ``ValueError``, as NumPy's; torch's ``F.pad`` would
        crop)."""
        x = self._native(input)
        given = np.asarray(pad_width)
        if given.dtype.kind not in "iu":
            raise TypeError(f"pad(): pad_width must be integers, got {pad_width!r}")
        if np.any(given < 0):
            raise ValueError(f"pad(): pad_width must be >= 0, got {pad_width!r}")
        widths = np.broadcast_to(given.astype(np.int64), (x.ndim, 2))
        return self._ns().pad(x, [tuple(int(v) for v in w) for w in widths])

    def atleast_1d(self, inputs: Any) -> Any:
        xs = inputs if isinstance(inputs, tuple) else (inputs,)
        out = tuple(self.reshape(x, (1,)) if self._native(x).ndim == 0 else self._native(x) for x in xs)
        return out if isinstance(inputs, tuple) else out[0]

    def atleast_2d(self, inputs: Any) -> Any:
        xs = inputs if isinstance(inputs, tuple) else (inputs,)
        out = tuple(self.reshape(x, (1, -1)) if self._native(x).ndim < 2 else self._native(x) for x in xs)
        return out if isinstance(inputs, tuple) else out[0]

    # -- devices -------------------------------------------------------------------------------
    def to_device(self, data: Any, device: str, asynchronous: bool = True) -> Any:
        """``data`` on ``device`` (NumPy: only ``"cpu"``)."""
        if str(device) != "cpu":
            raise ValueError(f"{type(self).__name__}: unknown device {device!r}")
        return data

    def block_until_ready(self, data: Any = None) -> Any:
        """Wait until ``data`` is computed (JAX dispatches asynchronously); returns it."""
        return data

    def empty_cache(self) -> None:
        """Free cached device memory (nothing to do on the CPU)."""
