"""The backend interface: array creation, randomness and program execution.

Every backend draws random numbers from one NumPy generator seeded by
:meth:`Backend.set_seed`, so the same seed gives the same initial parameters on
NumPy, JAX and torch (handy for comparing backends), and converts to native arrays.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..dtypes import check_dtype
from ..errors import DTypeError
from .helpers import DTYPE_NAMES, ArrayHelpers, dtype_arg, resolve_dtype


class Evaluator(ABC):
    """Executes one compiled program: ``forward`` and ``forward_vjp``. ``run`` (a
    :class:`~mithril.models.context.RunContext`, given when the program has context
    operators) carries the mode, randomness and state; the evaluator leaves the new state,
    as native arrays, in ``run.new_state``."""

    @abstractmethod
    def forward(self, params: Mapping[str, Any], inputs: Mapping[str, Any],
                run: Any = None) -> dict[str, Any]: ...

    @abstractmethod
    def forward_vjp(self, params: Mapping[str, Any], inputs: Mapping[str, Any],
                    cotangents: Mapping[str, Any],
                    run: Any = None) -> tuple[dict[str, Any], dict[str, Any]]: ...


class Backend(ArrayHelpers, ABC):
    """Base class of :class:`NumpyBackend`, :class:`JaxBackend` and :class:`TorchBackend`.

    Besides running compiled programs, a backend has the published Mithril's array helpers
    (:class:`~mithril.backends.helpers.ArrayHelpers`: ``randn``, ``rand_uniform``,
    ``randint``, ``arange``, ``linspace``, ``stack``, ``cat``, ``sin``, ``pi``, ...) and its
    dtypes as attributes (``backend.float32`` is the native dtype object).
    ``Backend[DataType]`` is accepted in annotations, as published."""

    def __class_getitem__(cls, item: Any) -> type[Backend]:
        return cls

    name: ClassVar[str]

    def __init__(self, dtype: str | None = None, seed: int = 0, *, precision: int | None = None) -> None:
        """``dtype``: the float dtype to compute in (default ``"float32"``); ``precision``: the
        published spelling of it in bits (16, 32 or 64), refused when it disagrees with
        ``dtype``; ``seed``: of the generator behind parameter initialisation."""
        if dtype is not None and not isinstance(dtype, str):  # np.float64, torch.float64
            try:
                dtype = dtype_arg(dtype)
            except DTypeError:
                pass  # (check_dtype's ValueError names it)
        dtype = resolve_dtype(dtype, precision, type(self).__name__)
        self.dtype = check_dtype("float32" if dtype is None else dtype)
        self.set_seed(seed)

    # -- randomness ------------------------------------------------------------------
    def set_seed(self, seed: int) -> None:
        """Re-seed the generator behind ``randn``, ``rand`` and parameter initialisation."""
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    # -- arrays ----------------------------------------------------------------------
    int_dtype: ClassVar[str] = "int64"

    @abstractmethod
    def array(self, data: Any, dtype: str | None = None) -> Any:
        """A native array from ``data``; float data takes the backend dtype unless ``dtype``."""

    @abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray: ...

    #: the backend's array class (set by each backend's ``__init__``)
    native_type: type

    def is_native(self, x: Any) -> bool:
        return isinstance(x, self.native_type)

    @abstractmethod
    def native_dtype(self, name: str | None = None) -> Any:
        """The backend's dtype object for ``name`` (default: the backend's float dtype)."""

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype).removeprefix("torch.")

    # -- execution ---------------------------------------------------------------------
    @abstractmethod
    def evaluator(self, program: Any, jit: bool) -> Evaluator: ...

    def init_param(self, shape: tuple[int, ...], kind: str) -> Any:
        """A new parameter: ``glorot`` uniform, ``normal`` N(0,1), ``zeros`` or ``ones``;
        ``kaiming_uniform`` is torch's default weight init of ``nn.Linear`` / ``nn.Conv*d``
        (``kaiming_uniform_(a=√5)``: U(±1/√fan_in), fan_in = prod(shape[1:])) and
        ``fan_in_uniform:<n>`` their bias init, U(±1/√n) with n the weight's fan_in;
        ``normal_zero_row:<k>`` is N(0,1) with row k zeros (an embedding's padding row);
        ``constant:<v>`` every entry v;
        ``xavier_normal`` is torch's ``xavier_normal_``: N(0, 2/(fan_in + fan_out)) with torch's
        fans (fan_in = shape[1]·r, fan_out = shape[0]·r, r = prod(shape[2:]))."""
        if kind == "kaiming_uniform" or kind.startswith("fan_in_uniform:"):
            fan_in = int(kind.split(":")[1]) if ":" in kind else int(np.prod(shape[1:]))
            limit = 1.0 / np.sqrt(fan_in) if fan_in > 0 else 0.0
            data = self._rng.uniform(-limit, limit, shape)
        elif kind == "glorot":
            fan_out, fan_in = (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (shape[0], shape[0])
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            data = self._rng.uniform(-limit, limit, shape)
        elif kind == "xavier_normal":
            if len(shape) < 2:
                raise ValueError(f"xavier_normal needs at least 2 dimensions, got shape {shape}")
            r = int(np.prod(shape[2:]))
            std = np.sqrt(2.0 / (shape[0] * r + shape[1] * r)) if shape[0] * shape[1] * r else 0.0
            data = self._rng.normal(0.0, std, shape)
        elif kind == "normal" or kind.startswith("normal_zero_row:"):
            data = self._rng.standard_normal(shape)
            if ":" in kind:  # nn.Embedding(padding_idx=k): row k starts at zeros
                data[int(kind.split(":")[1])] = 0.0
        elif kind in ("zeros", "ones"):
            data = np.full(shape, 0.0 if kind == "zeros" else 1.0)
        elif kind.startswith("constant:"):  # (PReLU's init=0.25)
            data = np.full(shape, float(kind.split(":", 1)[1]))
        else:
            raise ValueError(f"unknown initialiser {kind!r}")
        return self._drawn(data, self.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dtype={self.dtype!r})"


def _dtype_property(name: str) -> property:
    return property(lambda self: self.native_dtype(name), doc=f"The backend's native {name} dtype.")


for _name in DTYPE_NAMES:  # backend.float32, backend.int64, backend.bool, ...
    setattr(Backend, _name, _dtype_property(_name))
