"""NumPy backend: gradients from the operators' hand-written VJPs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..compiler.interpret import numpy_backward, outputs_of, run_forward
from .backend import Backend, Evaluator


def numpy_dtype(name: str) -> Any:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - ml_dtypes ships with jax
            raise ValueError("NumpyBackend(dtype='bfloat16') needs the ml_dtypes package") from None
        return ml_dtypes.bfloat16
    return np.dtype(name)


class NumpyBackend(Backend):
    """Arrays are ``numpy.ndarray``; runs eagerly (``jit`` has no effect)."""

    name = "numpy"

    def array(self, data: Any, dtype: str | None = None) -> np.ndarray:
        a = np.asarray(data)
        if dtype is not None:
            return np.ascontiguousarray(a, dtype=numpy_dtype(dtype))
        if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
            return np.ascontiguousarray(a, dtype=numpy_dtype(self.dtype))
        return a

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def zeros_like(self, x: Any) -> np.ndarray:
        return np.zeros_like(x)

    def ones_like(self, x: Any) -> np.ndarray:
        return np.ones_like(x)

    def is_native(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def evaluator(self, program: Any, jit: bool) -> Evaluator:
        return _NumpyEvaluator(program)


class _NumpyEvaluator(Evaluator):
    def __init__(self, program: Any) -> None:
        self.prog = program

    def forward(self, params: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
        return outputs_of(self.prog, run_forward(self.prog, np, params, inputs))

    def forward_vjp(self, params, inputs, cotangents):
        env = run_forward(self.prog, np, params, inputs)
        return outputs_of(self.prog, env), numpy_backward(self.prog, env, params, cotangents)
