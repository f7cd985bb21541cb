"""How a backend executes an optimizer's math fast.

* :class:`~.numba_engine.NumbaEngine` - NumPy and torch-CPU float32/float64: one fused,
  parallel numba loop over a flat parameter buffer (gradients read where they lie).
* :class:`~.jax_engine.JaxEngine` - one ``jax.jit`` step over flat buffers with donation;
  hyperparameters are arguments, so changing them never recompiles.
* :class:`~.array_engine.ArrayEngine` - the same math with array ops on flat buffers
  (torch on GPU, float16/bfloat16).
"""

from __future__ import annotations

from typing import Any


def engine_for(backend: Any, layout: Any) -> Any:
    if backend.name == "jax":
        from .jax_engine import JaxEngine

        return JaxEngine(backend, layout)
    if layout.dtype in ("float32", "float64"):
        if backend.name == "numpy" or (backend.name == "torch" and backend.device.type == "cpu"):
            from .numba_engine import NumbaEngine

            return NumbaEngine(backend, layout)
    from .array_engine import ArrayEngine

    return ArrayEngine(backend, layout)
