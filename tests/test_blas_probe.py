"""numba's start-up BLAS probe (:mod:`mithril.utils.optimizers.engines.blas_probe`): a fresh
process's first optimizer step does not import ``scipy.linalg``, numba's answer is the one
its own import gives, and numba's BLAS still works (and imports scipy's) when a function
needs it. Each case is a fresh interpreter: the probe runs once, before numba's first
refresh, which a kernel load skips unless ``kernel_cache.LIGHT_LOAD`` is off (as here) or
the kernel is compiled."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from conftest import run_python

STEP = """
import json, sys
if {block!r}:
    sys.modules["scipy"] = None  # an install without scipy: any import of it fails
import numpy as np
from mithril.utils.optimizers import Adam
from mithril.utils.optimizers.engines import kernel_cache
kernel_cache.LIGHT_LOAD = False  # numba's own load path: its refresh, where the probe runs
rng = np.random.default_rng(0)
p = {{"w": rng.standard_normal((40, 30)).astype(np.float32), "b": np.zeros(30, np.float32)}}
g = {{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}}
opt = Adam(1e-2)
q, s = opt.update(p, g, opt.init(p))
linalg_after_step = "scipy.linalg" in sys.modules
import numba.np.arraymath
out = {{"linalg_after_step": linalg_after_step, "have_blas": numba.np.arraymath._HAVE_BLAS,
        "w": q["w"].astype(float).tolist(), "b": q["b"].astype(float).tolist()}}
if not {block!r}:
    import numba
    @numba.njit
    def dot(a, b):
        return np.dot(a, b)
    a, m = np.arange(5.0), np.arange(12.0).reshape(3, 4)
    out["dot1"] = float(dot(a, a))
    out["dot2"] = dot(m, m.T).tolist()
    import scipy.linalg
    out["linalg_after_dot"] = "scipy.linalg" in sys.modules
    out["attribute"] = hasattr(scipy.linalg, "cython_blas")
print(json.dumps(out))
"""


def _run(code: str) -> Any:
    return json.loads(run_python(code, timeout=300).strip().splitlines()[-1])


def _adam(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """One float32 Adam step from zero moments (lr 1e-2, torch's defaults otherwise)."""
    m, v = 0.1 * g, 0.001 * g * g
    return p - 1e-2 * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)


def test_first_step_does_not_import_scipy_linalg_and_blas_still_works():
    pytest.importorskip("scipy")
    out = _run(STEP.format(block=False))
    assert out["linalg_after_step"] is False
    assert out["have_blas"] is True  # scipy's BLAS is installed: numba's own answer
    a, m = np.arange(5.0), np.arange(12.0).reshape(3, 4)
    assert out["dot1"] == float(a @ a)
    assert np.array_equal(out["dot2"], m @ m.T)
    # numba imported scipy's BLAS when it compiled the 2-D dot, the usual way
    assert out["linalg_after_dot"] is True and out["attribute"] is True
    rng = np.random.default_rng(0)
    p = rng.standard_normal((40, 30)).astype(np.float32)
    g = rng.standard_normal((40, 30)).astype(np.float32)
    assert np.allclose(out["w"], _adam(p.astype(float), g.astype(float)), rtol=1e-5, atol=1e-6)


def test_without_scipy_numba_sees_no_blas_and_the_step_is_the_same():
    pytest.importorskip("scipy")
    plain, blocked = _run(STEP.format(block=False)), _run(STEP.format(block=True))
    assert blocked["have_blas"] is False
    assert (blocked["w"], blocked["b"]) == (plain["w"], plain["b"])


def test_the_probe_gives_numbas_own_answer():
    """Unprimed, numba imports scipy.linalg.cython_blas to answer; the file-system answer
    is the same, with scipy there and with it blocked."""
    code = """
        import json, sys
        if {block!r}:
            sys.modules["scipy"] = None
        from mithril.utils.optimizers.engines import blas_probe
        probe = blas_probe.scipy_blas_installed()
        import numba.np.arraymath  # numba's own probe: imports scipy.linalg where it can
        print(json.dumps([probe, numba.np.arraymath._HAVE_BLAS]))
    """
    for block in (False, True):
        probe, numba_says = _run(code.format(block=block))
        assert probe == numba_says
