"""numba's start-up BLAS probe, answered without importing ``scipy.linalg``.

The first time a process types or loads any numba function, numba's CPU target imports
``numba.np.arraymath``. At import, that module asks whether BLAS is there for ``np.dot``
by importing ``scipy.linalg.cython_blas``, which runs the whole ``scipy.linalg`` package
first. Where scipy is installed (it comes with JAX, scikit-learn and most ML stacks), that
was 0.1-0.3 s of a fresh process's first optimizer step on a cached kernel, more than the
rest of the kernel's load. (A cached kernel now loads without that refresh, see
:mod:`.kernel_cache`; the probe still serves the first compile of a process, and a load
that takes numba's own path.)

:func:`prime` imports ``numba.np.arraymath`` first, with the probe answered from the file
system: scipy's ``cython_blas`` extension is installed or it is not, the same answer the
import gives. numba's own ``ensure_blas`` is put back at once, so it still imports scipy's
BLAS and checks its integer width when a function that calls BLAS is first compiled (the
probe's only other effect, ``_HAVE_BLAS``, picks a loop or BLAS for a 1-D ``np.dot``). The
probe changes nothing else: no module is put in ``sys.modules``, and nothing happens where
numba or scipy.linalg is already loaded or numba lays its code out otherwise.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import threading

_lock = threading.Lock()
_primed = False


def scipy_blas_installed() -> bool:
    """Whether ``scipy.linalg.cython_blas`` is installed, found without importing scipy."""
    try:
        spec = importlib.util.find_spec("scipy")
    except (ImportError, ValueError):  # ValueError: sys.modules["scipy"] is None (blocked)
        return False
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if os.path.isfile(os.path.join(root, "linalg", "cython_blas" + suffix)):
                return True
    return False


def prime() -> None:
    """Import ``numba.np.arraymath`` with its BLAS probe answered by
    :func:`scipy_blas_installed` (once per process, before numba's first kernel load)."""
    global _primed
    if _primed:
        return
    with _lock:
        if _primed:
            return
        _primed = True
        if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
            return
        try:
            from numba.core.compiler_lock import global_compiler_lock
            from numba.np import linalg
        except ImportError:  # pragma: no cover - another numba layout: nothing to prime
            return
        real = getattr(linalg, "ensure_blas", None)
        if real is None:  # pragma: no cover - another numba layout
            return

        def probe() -> None:
            if not scipy_blas_installed():
                raise ImportError("scipy.linalg.cython_blas is not installed")

        # numba calls ensure_blas only while compiling, under this (re-entrant) lock: no
        # compile in another thread sees the stand-in
        with global_compiler_lock:
            linalg.ensure_blas = probe
            try:
                import numba.np.arraymath  # noqa: F401
            except Exception:  # noqa: BLE001 - numba imports it again itself and reports it
                pass
            finally:
                linalg.ensure_blas = real
