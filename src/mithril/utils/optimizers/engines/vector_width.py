"""The fused kernels use the CPU's widest vectors (512-bit where it has AVX-512).

LLVM tunes most AVX-512 CPUs (Intel's from Skylake-X on) to *prefer* 256-bit vectors
(its ``prefer-256-bit`` tuning: 512-bit instructions once lowered the clock on those
cores), so numba's loops use half the registers' width there. torch's CPU kernels use
512-bit registers wherever the CPU has them. On a Xeon (Sapphire Rapids class, 2 cores)
the fused Adam step on 1M float32 parameters ran 1.07-1.11 ms on one thread with LLVM's
choice against torch's fused 1.01 ms, and 0.78-0.81 ms preferring 512 bits (three
processes each; SGD-momentum, lighter, 0.56-0.63 → 0.55-0.60 ms). The vectoriser then
keeps the float64 Σg² in zmm registers (docs/performance.md, "The vector width").

:func:`njit` is ``numba.njit`` whose functions carry LLVM's ``"prefer-vector-width"``
attribute (:data:`WIDTH` bits): a function attribute, so it changes the code of these
kernels only, never the user's numba functions or numba's global target. On a CPU without
AVX-512 the attribute changes nothing (LLVM never vectorises wider than the registers).
``MITHRIL_VECTOR_WIDTH`` (``256``, ``512``; ``0``: LLVM's own choice) overrides it; the
kernel cache keys on it (:func:`~.kernel_cache.environment`).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numba


def _width() -> int:
    value = os.environ.get("MITHRIL_VECTOR_WIDTH", "512").strip()
    return int(value) if value in ("0", "128", "256", "512") else 512


#: the vector width the kernels prefer, in bits (0: LLVM's default for the CPU)
WIDTH = _width()


def _acc64() -> bool:
    """Whether the update kernels sum each tile's g² in float64 (see ``kernels._INNER_SRC``)
    rather than in the gradient's type.

    LLVM vectorises a loop at the width of its widest type. With 512-bit vectors the
    float64 Σg² holds 8 lanes, and the float32 update runs on 8 lanes too, the measured
    best on those CPUs: 16 float32 lanes (a float32 Σg², or none) ran slower on Zen 5.
    Where vectors are 256 bits or less (AVX2, NEON), the float64 Σg² halves the float32
    lanes (4 on AVX2: an Adam step on 1M params ~20% slower than with 8), so each tile is
    summed in the gradient's type there (and where numba compiles for a named CPU,
    ``NUMBA_CPU_NAME``, e.g. ``generic``, whose vectors the host's features do not tell).
    So also on the CPUs of :data:`HALF_WIDTH_512`, whose AVX-512 instructions run on 256-bit
    units: on Zen 4 the float32 Σg² took an SGD-momentum step on 1M params (two threads)
    from 139 to 108-112 µs, torch fused's time, and on 100k from 39-40 to 33-34."""
    try:
        import llvmlite.binding as ll

        avx512 = bool(ll.get_host_cpu_features().get("avx512f", False))
        name = ll.get_host_cpu_name()
    except Exception:  # noqa: BLE001 - llvmlite without the host query: no AVX-512 assumed
        avx512, name = False, ""
    return avx512 and WIDTH == 512 and not numba.config.CPU_NAME and name not in HALF_WIDTH_512


#: LLVM's names of the CPUs with AVX-512 on 256-bit execution units (AMD Zen 4: each 512-bit
#: instruction is two halves); Intel's AVX-512 CPUs and Zen 5 have 512-bit units
HALF_WIDTH_512 = frozenset({"znver4"})


#: the update kernels sum each tile's g² in float64, else in the gradient's type (:func:`_acc64`)
ACC64 = _acc64()

# a function definition's header in LLVM IR text: ``define <...> @name(<args>) <attrs> {``
_DEFINE = re.compile(r"^(define [^\n]*?)\s*\{[ \t]*$", re.M)


def _pipeline() -> type | None:
    """numba's nopython pipeline with one pass more, first: the function's code library
    then adds the width attribute to every function it is given (its LLVM IR as text,
    parsed back), before LLVM optimises (and vectorises) them."""
    try:
        import llvmlite.binding as ll
        from numba.core import cgutils
        from numba.core.compiler import CompilerBase, DefaultPassBuilder
        from numba.core.compiler_machinery import FunctionPass, register_pass
        from numba.core.untyped_passes import TranslateByteCode
    except ImportError:  # pragma: no cover - numba's internals moved: LLVM's default width
        return None
    attr = f' "prefer-vector-width"="{WIDTH}" {{'

    @register_pass(mutates_CFG=False, analysis_only=True)
    class PreferVectorWidth(FunctionPass):
        _name = "mithril_prefer_vector_width"

        def __init__(self) -> None:
            FunctionPass.__init__(self)

        def run_pass(self, state: Any) -> bool:
            if state.library is None:  # (what numba's lowering pass would create)
                state.library = state.targetctx.codegen().create_library(
                    state.func_id.func_qualname)
                state.library.enable_object_caching()
            lib = state.library

            def add_ir_module(ir_module: Any) -> None:
                try:
                    text = cgutils.normalize_ir_text(str(ir_module))
                    mod = ll.parse_assembly(_DEFINE.sub(lambda m: m.group(1) + attr, text))
                    mod.name = ir_module.name
                    mod.verify()
                except Exception:  # noqa: BLE001 - IR we cannot edit: LLVM's default width
                    type(lib).add_ir_module(lib, ir_module)
                    return
                lib.add_llvm_module(mod)

            lib.add_ir_module = add_ir_module
            return False

    class Pipeline(CompilerBase):
        def define_pipelines(self) -> list:
            pm = DefaultPassBuilder.define_nopython_pipeline(self.state)
            try:
                pm.add_pass_after(PreferVectorWidth, TranslateByteCode)
            except Exception:  # noqa: BLE001 - numba's pipeline changed: LLVM's default width
                pass
            pm.finalize()
            return [pm]

    return Pipeline


PIPELINE = _pipeline() if WIDTH else None


def njit(*args: Any, **options: Any) -> Any:
    """``numba.njit(*args, **options)``, the functions preferring :data:`WIDTH`-bit
    vectors (see the module docs)."""
    if PIPELINE is not None and "pipeline_class" not in options:
        options["pipeline_class"] = PIPELINE
    return numba.njit(*args, **options)
