"""How a backend executes an optimizer's math fast.

* :class:`~.numba_engine.NumbaEngine` - NumPy, torch-CPU and JAX-CPU float32/float64: one
  fused numba loop (:mod:`.kernels`) over a flat parameter buffer (gradients read where they lie), whose
  pieces threads claim as they go (:mod:`.threads`, :mod:`.atomics`); NumPy and torch
  gradients are checked and located in one pass (:mod:`.ndarray_fields`, compiled by
  numba; :mod:`.torch_scan`, torch's own tensor guard: no C++ compiler is needed); JAX's
  double buffer is written with streaming stores when it exceeds the last-level cache
  (:mod:`.streaming`). The kernels prefer the CPU's widest vectors (:mod:`.vector_width`).
* :class:`~.jax_engine.JaxEngine` - JAX on accelerators, and params on a mesh of several
  devices (their sharding kept): one ``jax.jit`` step over flat
  buffers with donation; hyperparameters are arguments, so changing them never recompiles.
  On CPU (``MITHRIL_JAX_ENGINE=jit``; float16/bfloat16) each large tensor is updated in
  buffers of its own (:mod:`.jax_chunks`), and XLA compiles a kernel per output tensor,
  once per size where tensors share one (2,000 small tensors: ~12 s on 2 cores; once per
  machine, with JAX's cache). ``MITHRIL_JAX_CHUNK_TENSORS=k`` cuts an accelerator's one
  chunk into runs of k tensors (a measuring knob, :data:`.jax_chunks.CHUNK_TENSORS`).
* :mod:`.xla_ffi` - the one-program JAX train step on CPU: the same fused loop as one XLA
  custom call inside the step's program (a numba ``cfunc`` through XLA's typed FFI, its
  pieces shared with XLA's thread pool, :mod:`.xla_pool`), for elementwise optimizers.
* :class:`~.torch_fused.TorchFusedEngine` - torch on CUDA: torch's own fused kernels
  (``torch._fused_adam_``, ``_fused_adamw_``, ``_fused_sgd_``) on views of the flat buffers
  (with ``nonfinite="unchecked"`` nothing is read back to the host); other steps as
  :class:`~.array_engine.ArrayEngine`.
* :class:`~.array_engine.ArrayEngine` - the same math with array ops on flat buffers
  (float16/bfloat16 on CPU), and every state with a slot in a dtype of its own (optax's
  ``mu_dtype``: the fused kernels keep one dtype), JAX's in host buffers.
"""

from __future__ import annotations

import os
from typing import Any

#: set to "jit" to run JAX optimizers through the jitted engine even on CPU
JAX_ENGINE = os.environ.get("MITHRIL_JAX_ENGINE", "auto")
#: set to "fused-ops" to run torch-CPU optimizers through torch's fused kernels
#: (:mod:`.torch_fused`, what CUDA uses) instead of the numba engine
TORCH_ENGINE = os.environ.get("MITHRIL_TORCH_ENGINE", "auto")


def spans_devices(params: Any) -> bool:
    """Whether some JAX array of ``params`` lives on several devices (split or replicated
    over a mesh): the CPU kernels read one host buffer, the jitted engine keeps the
    arrays' sharding."""
    return any(len(getattr(getattr(p, "sharding", None), "device_set", ())) > 1
               for p in params.values())


def engine_for(backend: Any, layout: Any, several_devices: bool = False,
               slot_dtypes: dict[str, str] | None = None) -> Any:
    """The engine for ``layout``'s parameters on ``backend`` (see the module docs);
    ``several_devices``: JAX arrays on a mesh (the jitted engine); ``slot_dtypes``: slots
    kept in a dtype of their own (optax's ``mu_dtype``), which only the per-tensor
    :class:`~.array_engine.ArrayEngine` holds (on JAX, in host buffers)."""
    if slot_dtypes:
        from .array_engine import ArrayEngine

        return ArrayEngine(backend, layout, slot_dtypes)
    fused = layout.dtype in ("float32", "float64")
    if backend.name == "jax":
        if fused and backend.device.platform == "cpu" and JAX_ENGINE != "jit" and \
                not several_devices:
            from .numba_engine import NumbaEngine

            return NumbaEngine(backend, layout)
        from .jax_engine import JaxEngine

        return JaxEngine(backend, layout)
    if backend.name == "torch" and (backend.device.type != "cpu" or TORCH_ENGINE == "fused-ops"):
        from .torch_fused import TorchFusedEngine

        return TorchFusedEngine(backend, layout)
    if fused and backend.name in ("numpy", "torch"):
        from .numba_engine import NumbaEngine

        return NumbaEngine(backend, layout)
    from .array_engine import ArrayEngine

    return ArrayEngine(backend, layout)
