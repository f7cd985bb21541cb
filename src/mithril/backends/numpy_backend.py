"""NumPy backend: gradients from the operators' hand-written VJPs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..compiler.codegen import forward_plan, forward_vjp_plan
from .backend import Backend, Evaluator
from .helpers import dtype_arg, host_array


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
    native_type = np.ndarray
    is_manualgrad = True  # gradients from hand-written VJPs, as the published NumpyBackend
    device = "cpu"

    def __init__(self, dtype: str | None = None, seed: int = 0, device: str = "cpu", *,
                 precision: int | None = None) -> None:
        """As :class:`~mithril.backends.Backend`; ``device`` (as published) can only be the CPU."""
        if str(device) not in ("cpu", "cpu:0"):
            raise ValueError(f"NumpyBackend(device={device!r}): NumPy runs on the CPU only "
                             "(device='cpu'); for a GPU use TorchBackend or JaxBackend")
        super().__init__(dtype, seed, precision=precision)

    def _ns(self) -> Any:
        return np

    def native_dtype(self, name: str | None = None) -> Any:
        return numpy_dtype(name or self.dtype)

    def array(self, data: Any, dtype: Any = None) -> np.ndarray:
        """``data`` (a list, number or array) as an ndarray; floats in the backend dtype
        unless ``dtype`` (a name, ``ml.float32`` or a NumPy dtype) says otherwise."""
        dtype = dtype if dtype is None or isinstance(dtype, str) else dtype_arg(dtype)
        a = host_array(data)
        if dtype is None and (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
            dtype = self.dtype
        # not ascontiguousarray: it turns 0-d arrays into shape (1,)
        return a if dtype is None else np.asarray(a, dtype=numpy_dtype(dtype), order="C")

    def to_numpy(self, x: Any) -> np.ndarray:
        return host_array(x)

    def evaluator(self, program: Any, jit: bool) -> Evaluator:
        return _NumpyEvaluator(program, self.native_dtype())


def _cast(arrays: dict[str, Any], dt: Any, kept: frozenset[str] = frozenset()
          ) -> dict[str, Any]:
    """``arrays`` as ndarrays (reductions give NumPy scalars) with floats in ``dt``
    (ml_dtypes' bfloat16 matmul and scalar products compute in float32), but ``kept``'s:
    outputs a ``Cast`` gives another float dtype on purpose (torch and JAX keep it too)."""
    for k, v in arrays.items():
        if v.dtype is dt and type(v) is np.ndarray:  # (the usual case, by identity)
            continue
        if v.dtype != dt and (v.dtype.kind == "f" or v.dtype.name == "bfloat16") \
                and k not in kept:
            arrays[k] = np.asarray(v, dtype=dt)
        elif type(v) is not np.ndarray:
            arrays[k] = np.asarray(v)
    return arrays


class _NumpyEvaluator(Evaluator):
    """Runs the program as straight-line Python generated from it (:mod:`~mithril.compiler.
    codegen`: the interpreter's calls without its per-node bookkeeping), one function for
    the forward and one per set of output cotangents for forward + VJP, made on first use."""

    def __init__(self, program: Any, dtype: Any) -> None:
        self.prog, self.dtype = program, dtype
        self._forward: Any = None
        self._kept: frozenset[str] | None = None
        self._vjps: dict[tuple[str, ...], Any] = {}

    def forward(self, params: Mapping[str, Any], inputs: Mapping[str, Any],
                run: Any = None) -> dict[str, Any]:
        if self._forward is None:
            self._forward = forward_plan(self.prog)
        out = _cast(self._forward(np, params, inputs, run), self.dtype, self._cast_outputs())
        if run is not None:
            _cast(run.new_state, self.dtype)
        return out

    def _cast_outputs(self) -> frozenset[str]:
        """The outputs whose declared dtype is another float one than the model's (a
        ``Cast``'s, through blocks that keep their input's dtype)."""
        if self._kept is None:
            from types import SimpleNamespace

            from ..compiler.output_gradients import output_dtypes

            model = np.dtype(self.dtype).name
            declared = output_dtypes(self.prog, {}, SimpleNamespace(dtype=model))
            self._kept = frozenset(k for k, d in declared.items() if d != model
                                   and (d.startswith("float") or d == "bfloat16"))
        return self._kept

    def forward_vjp(self, params, inputs, cotangents, run=None):
        keys = tuple(cotangents)
        plan = self._vjps.get(keys)
        if plan is None:
            if len(self._vjps) >= 16:  # (every subset of many outputs: start again)
                self._vjps.clear()
            plan = self._vjps[keys] = forward_vjp_plan(self.prog, keys)
        out, grads = plan(np, params, inputs, cotangents, run)
        if run is not None:
            _cast(run.new_state, self.dtype)
        return _cast(out, self.dtype, self._cast_outputs()), _cast(grads, self.dtype)
